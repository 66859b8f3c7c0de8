"""Latency of the export-safe real DFT (edgesr.reparam.dft) against torch.fft.

Round trip rfft2 -> irfft2 on a (1, C, S, S) float32 tensor, eager PyTorch:
  torch.fft      torch.fft.rfft2 + torch.fft.irfft2 (pocketfft / MKL)
  factorized     RealRFFT2 + RealIRFFT2 (Cooley-Tukey split matmuls, the export form)
  direct         the same with factorize=False (one dense DFT matmul per axis, O(N^3))
plus, at --onnx-size, the exported round trip in the runtimes: onnxruntime with the
per-bin pair in digit-reversed order (edgesr.reparam.dft_spectral, what an ONNX export of
DarkIR / SRConvNet uses), with the natural-order factorized form (layout="onnx") and with
torch.fft exported as ONNX DFT nodes; with --tflite also LiteRT with the natural-order
"tflite" layout (what a TFLite export uses) and with the per-bin pair.  --blocks adds the
models' whole FFT blocks (DarkIR FreMLP, SRConvNet FourierUnit): the official block in
eager PyTorch (torch.fft, abs/angle/cos/sin, complex) against its export-safe deploy form
exported to each runtime.  Eager columns use layout="onnx".  Variants are timed
interleaved, round after round, and the minimum and median over rounds are reported, so a
noisy machine hurts all columns alike.

    python benchmarks/safe_ops.py                      # S = 64, 256, 1024; C = 32; 2 threads
    python benchmarks/safe_ops.py --sizes 256 --rounds 20 --tflite --blocks
    python benchmarks/safe_ops.py --threads 1 --clock cpu   # on a busy machine: CPU time
                                                            # of the one compute thread
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
from edgesr.reparam.dft import RealIRFFT2, RealRFFT2  # noqa: E402
from edgesr.reparam.dft_spectral import SpectralIRFFT2, SpectralRFFT2, per_bin_dft  # noqa: E402


class RoundTrip(torch.nn.Module):
    def __init__(self, s: int, factorize: bool, layout: str = "onnx"):
        super().__init__()
        self.f = RealRFFT2(s, s, "ortho", factorize=factorize, layout=layout)
        self.g = RealIRFFT2(s, s, "ortho", factorize=factorize, layout=layout)

    def forward(self, x):
        return self.g(*self.f(x))


class SpectralRoundTrip(torch.nn.Module):
    """The per-bin pair (digit-reversed bin order): what an ONNX export of the FFT models uses."""

    def __init__(self, s: int):
        super().__init__()
        self.f, self.g = SpectralRFFT2(s, s, "ortho"), SpectralIRFFT2(s, s, "ortho")

    def forward(self, x):
        return self.g(*self.f(x))


class TorchFFT(torch.nn.Module):
    def forward(self, x):
        return torch.fft.irfft2(torch.fft.rfft2(x, norm="ortho"), s=x.shape[-2:], norm="ortho")


def gmacs(mod, x) -> float:
    with FlopCounterMode(display=False) as fc:
        mod(x)
    return fc.get_total_flops() / 2e9


def time_interleaved(fns: dict, rounds: int, budget_s: float, clock=time.perf_counter) -> dict:
    """min and median (ms) per variant; each round runs every variant once."""
    for f in fns.values():  # warm-up
        f()
    times = {k: [] for k in fns}
    t_end = time.perf_counter() + budget_s
    for r in range(rounds):
        for k, f in fns.items():
            t0 = clock()
            f()
            times[k].append((clock() - t0) * 1e3)
        if r >= 2 and time.perf_counter() > t_end:
            break
    return {k: (min(v), statistics.median(v), len(v)) for k, v in times.items()}


def export_onnx_file(mod, x, path) -> None:
    """The plain torch.onnx (dynamo, opset 18) export these benchmarks time; one input "x"."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(mod, (x,), path, dynamo=True, opset_version=18, external_data=False,
                          input_names=["x"], verbose=False)


def onnx_session(mod, x, path, threads, reference=None):
    import onnxruntime as ort

    export_onnx_file(mod, x, path)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    feed = {"x": x.numpy()}
    ref = x.numpy() if reference is None else reference.numpy()  # a round trip reproduces x
    err = float(abs(sess.run(None, feed)[0] - ref).max())
    return (lambda: sess.run(None, feed)), err


def tflite_runner(mod, x, path, threads, reference=None):
    import litert_torch
    from ai_edge_litert.interpreter import Interpreter

    litert_torch.convert(mod, (x,)).export(path)
    runner = Interpreter(model_path=path, num_threads=threads).get_signature_runner()
    xn = x.numpy()
    ref = xn if reference is None else reference.numpy()
    err = float(abs(runner(args_0=xn)["output_0"] - ref).max())
    return (lambda: runner(args_0=xn)), err


def fmt(t):
    return f"{t[0]:9.2f} {t[1]:9.2f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 256, 1024])
    ap.add_argument("--channels", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=15, help="max timing rounds per size")
    ap.add_argument("--budget", type=float, default=20.0, help="seconds of timing per size (>= 3 rounds)")
    ap.add_argument("--direct-max", type=int, default=1024, help="skip the direct form above this S")
    ap.add_argument("--onnx-size", type=int, nargs="*", default=[256], help="sizes for onnxruntime")
    ap.add_argument("--tflite", action="store_true", help="also time LiteRT at --onnx-size (and --blocks)")
    ap.add_argument("--blocks", action="store_true", help="also time the models' whole FFT blocks")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: process CPU time, meaningful with --threads 1 on a shared machine")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    print(f"torch {torch.__version__}, {args.threads} threads, input (1, {args.channels}, S, S) float32, "
          f"rfft2+irfft2 round trip, norm='ortho'; {args.clock} time in ms (min / median over rounds)\n")

    hdr = (f"{'S':>5} {'split':>7} | {'torch.fft':>19} | {'factorized':>19} | {'direct':>19} | "
           f"{'fact/fft':>8} {'dir/fact':>8} | {'GMAC fact':>9} {'GMAC dir':>9} | max err")
    print(hdr)
    print("-" * len(hdr))
    extra = []
    for s in args.sizes:
        x = torch.randn(1, args.channels, s, s)
        fft, fac = TorchFFT().eval(), RoundTrip(s, True).eval()
        fns = {"fft": lambda: fft(x), "fac": lambda: fac(x)}
        with torch.no_grad():
            err = float((fac(x) - fft(x)).abs().max())
            g_fac = gmacs(fac, x)
            use_direct = s <= args.direct_max
            if use_direct:
                dire = RoundTrip(s, False).eval()
                fns["dir"] = lambda: dire(x)
                g_dir = gmacs(dire, x)
            t = time_interleaved(fns, args.rounds, args.budget, clock)
        d = t.get("dir", (float("nan"),) * 3)
        print(f"{s:5d} {f'{fac.f.h1}x{fac.f.h2}':>7} | {fmt(t['fft'])} | {fmt(t['fac'])} | {fmt(d)} | "
              f"{t['fac'][0] / t['fft'][0]:8.2f} {d[0] / t['fac'][0]:8.2f} | {g_fac:9.2f} "
              f"{(g_dir if use_direct else float('nan')):9.2f} | {err:.1e}", flush=True)

        if s in args.onnx_size:
            with tempfile.TemporaryDirectory() as tmp:
                run_spec, e_spec = onnx_session(SpectralRoundTrip(s).eval(), x, os.path.join(tmp, "spec.onnx"),
                                                args.threads)
                run_fac, e_fac = onnx_session(fac, x, os.path.join(tmp, "fac.onnx"), args.threads)
                run_dft, e_dft = onnx_session(fft, x, os.path.join(tmp, "dft.onnx"), args.threads)
                # [export] marks the form per_bin_dft gives an ONNX export at this size.
                spec_used = isinstance(per_bin_dft(s, s, "ortho", torch.float32, "onnx")[0], SpectralRFFT2)
                k_spec = "ORT per-bin pair" + (" [export]" if spec_used else "")
                k_fac = "ORT natural order" + ("" if spec_used else " [export]")
                fns = {"eager torch.fft": lambda: fft(x), k_spec: run_spec, k_fac: run_fac, "ORT native DFT": run_dft}
                errs = {k_spec: e_spec, k_fac: e_fac, "ORT native DFT": e_dft}
                if args.tflite:
                    for k, mod in (("LiteRT tflite layout [export]", RoundTrip(s, True, "tflite").eval()),
                                   ("LiteRT per-bin pair", SpectralRoundTrip(s).eval())):
                        fns[k], errs[k] = tflite_runner(mod, x, os.path.join(tmp, f"{len(fns)}.tflite"),
                                                        args.threads)
                with torch.no_grad():
                    t = time_interleaved(fns, args.rounds, args.budget, clock)
            base = t["eager torch.fft"][0]
            for k, v in t.items():
                e = f"   round-trip err {errs[k]:.1e}" if k in errs else ""
                extra.append(f"{s:5d}  {k:30s} {fmt(v)}   x{v[0] / base:5.2f} of eager torch.fft{e}")
    if extra:
        print(f"\nRuntimes at S in {args.onnx_size} (min / median ms, ratio of minima; [export] = the form "
              "an export of the FFT models uses):")
        print("\n".join(extra))
    if args.blocks:
        print("\nWhole FFT blocks: official block in eager PyTorch vs its deploy form exported "
              "(min / median ms, ratio of minima):")
        print("\n".join(block_rows(args, clock)))


def block_rows(args, clock) -> list[str]:
    """The models' FFT blocks at the sizes they run at: DarkIR-m's first-level FreMLP
    (32 channels at the input size, 256x256) and SRConvNet's FourierUnit (64 channels at
    the input size: 64x64, the input of a x4 256x256 output, and 256x256, the input size
    of the model benchmarks)."""
    import edgesr
    from edgesr.models import darkir, srconvnet

    torch.manual_seed(0)
    cases = [("DarkIR FreMLP", darkir.FreMLP(32), (1, 32, 256, 256)),
             ("SRConvNet FourierUnit", srconvnet.FourierUnit(64), (1, 64, 64, 64)),
             ("SRConvNet FourierUnit", srconvnet.FourierUnit(64), (1, 64, 256, 256))]
    rows = []
    for name, block, shape in cases:
        block = block.eval()
        x = torch.rand(shape)
        with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
            fns = {"eager official (torch.fft)": lambda b=block: b(x)}
            run, e_onnx = onnx_session(edgesr.make_export_safe(block, "onnx"), x, os.path.join(tmp, "b.onnx"),
                                       args.threads, reference=block(x))
            fns["ORT deploy block"] = run
            errs = {"ORT deploy block": e_onnx}
            if args.tflite:
                fns["LiteRT deploy block"], errs["LiteRT deploy block"] = tflite_runner(
                    edgesr.make_export_safe(block, "tflite"), x, os.path.join(tmp, "b.tflite"), args.threads,
                    reference=block(x))
            t = time_interleaved(fns, args.rounds, args.budget, clock)
        base = t["eager official (torch.fft)"][0]
        label = f"{name} {tuple(shape)}"
        for k, v in t.items():
            e = f"   max-abs vs official {errs[k]:.1e}" if k in errs else ""
            rows.append(f"{label:36s} {k:28s} {fmt(v)}   x{v[0] / base:5.2f}{e}")
    return rows


if __name__ == "__main__":
    main()
