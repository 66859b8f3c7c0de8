"""The per-bin DFT pair in digit-reversed order (edgesr.reparam.dft_spectral).

References: torch.fft (CPU) and numpy.fft.  The stored order is checked through
``bin_frequencies`` against the full ``fft2``, the inverse on deliberately non-Hermitian
spectra (SRConvNet's case) with random values in the extra columns it must ignore, and a
per-bin block (channel mixing of re/im, then a nonlinearity) against the same block
written with torch.fft, on a real image.  Export runs the real runtimes.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from edgesr.reparam.dft import DIRECT_MAX, LAYOUTS, RealIRFFT2, RealRFFT2
from edgesr.reparam.dft_spectral import SpectralIRFFT2, SpectralRFFT2, per_bin_dft
from conftest import rel_err as _rel

NORMS = ("backward", "ortho", "forward")
SHAPES = [(1, 1), (1, 2), (2, 1), (2, 2), (3, 5), (4, 4), (7, 13), (8, 8), (12, 18), (16, 30),
          (31, 47), (33, 47), (45, 99), (64, 64), (100, 128), (127, 2), (128, 128), (130, 72)]
FP64_TOL = 1e-12  # max abs error relative to max |reference|
FP32_TOL = 1e-5
fast = settings(max_examples=25, deadline=None)


def _check_forward(lead, h, w, norm, dtype, tol, seed=0, direct_max=DIRECT_MAX):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, h, w, generator=g, dtype=torch.float64)
    f = SpectralRFFT2(h, w, norm, dtype=dtype, direct_max=direct_max)
    re, im = f(x.to(dtype))
    kh, kw = f.bin_frequencies()
    ref = torch.fft.fft2(x, norm=norm)[..., kh[:, None], kw[None, :]]
    assert re.shape == im.shape == (*lead, h, f.kwp) and re.dtype == dtype
    err = max(_rel(re, ref.real), _rel(im, ref.imag))
    assert err <= tol, (lead, h, w, norm, direct_max, err)


def _stored(f: SpectralRFFT2, zr: torch.Tensor, zi: torch.Tensor, seed: int):
    """Natural half spectrum -> stored order; the extra columns get random values."""
    kh, kw = f.bin_frequencies()
    g = torch.Generator().manual_seed(seed + 100)
    shape = (*zr.shape[:-1], f.kwp)
    sr, si = torch.randn(shape, generator=g, dtype=zr.dtype), torch.randn(shape, generator=g, dtype=zr.dtype)
    keep = kw < f.wf
    sr[..., keep] = zr[..., kh, :][..., kw[keep]]
    si[..., keep] = zi[..., kh, :][..., kw[keep]]
    return sr, si


def _check_inverse(lead, h, w, norm, dtype, tol, seed=0, direct_max=DIRECT_MAX):
    g = torch.Generator().manual_seed(seed)
    shape = (*lead, h, w // 2 + 1)  # non-Hermitian: DC/Nyquist imag != 0, no symmetry
    zr, zi = torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g, dtype=torch.float64)
    ref = torch.fft.irfft2(torch.complex(zr, zi), s=(h, w), norm=norm)
    ref_np = np.fft.irfft2(zr.numpy() + 1j * zi.numpy(), s=(h, w), norm=norm)
    f = SpectralRFFT2(h, w, norm, direct_max=direct_max)
    sr, si = _stored(f, zr, zi, seed)
    y = SpectralIRFFT2(h, w, norm, dtype=dtype, direct_max=direct_max)(sr.to(dtype), si.to(dtype))
    assert y.shape == ref.shape and y.dtype == dtype
    err = max(_rel(y, ref), _rel(y, torch.from_numpy(ref_np)))
    assert err <= tol, (lead, h, w, norm, direct_max, err)


# --------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("direct_max", [1, DIRECT_MAX])
@pytest.mark.parametrize("h, w", SHAPES)
def test_forward_fp64_matches_fft2_at_the_stored_bins(h, w, direct_max):
    _check_forward((2, 3), h, w, "backward", torch.float64, FP64_TOL, direct_max=direct_max)


@pytest.mark.parametrize("direct_max", [1, DIRECT_MAX])
@pytest.mark.parametrize("h, w", SHAPES)
def test_inverse_fp64_non_hermitian_matches_torch_cpu_and_numpy(h, w, direct_max):
    _check_inverse((2, 3), h, w, "ortho", torch.float64, FP64_TOL, direct_max=direct_max)


@given(lead=st.sampled_from([(), (3,), (2, 3), (1, 1, 2)]), h=st.integers(1, 96), w=st.integers(1, 96),
       norm=st.sampled_from(NORMS), seed=st.integers(0, 2**16), direct_max=st.sampled_from([1, DIRECT_MAX]))
@fast
def test_fp64_property(lead, h, w, norm, seed, direct_max):
    _check_forward(lead, h, w, norm, torch.float64, FP64_TOL, seed, direct_max)
    _check_inverse(lead, h, w, norm, torch.float64, FP64_TOL, seed, direct_max)


@pytest.mark.parametrize("h, w", [(1, 1), (7, 13), (33, 47), (64, 64), (256, 256)])
@pytest.mark.parametrize("norm", ["backward", "ortho"])
def test_fp32_rounding_level(h, w, norm):
    _check_forward((1, 2), h, w, norm, torch.float32, FP32_TOL)
    _check_inverse((1, 2), h, w, norm, torch.float32, FP32_TOL)


@pytest.mark.parametrize("h, w", [(1, 1), (5, 2), (33, 47), (96, 130)])
def test_round_trip_and_bin_order(h, w):
    f, g = SpectralRFFT2(h, w, "ortho", torch.float64, 1), SpectralIRFFT2(h, w, "ortho", torch.float64, 1)
    x = torch.randn(2, h, w, dtype=torch.float64)
    assert _rel(g(*f(x)), x) <= FP64_TOL
    kh, kw = f.bin_frequencies()
    assert sorted(kh.tolist()) == list(range(h))  # every row frequency once
    kept = sorted(k for k in kw.tolist() if k < f.wf)
    assert kept == list(range(f.wf))  # every half-spectrum column once ...
    assert all(f.wf <= k < max(w, 1) for k in kw.tolist() if k >= f.wf)  # ... extras are real bins


def test_constant_image_and_zero_input():
    """A constant image has one nonzero bin (DC); zero in gives exactly zero out."""
    f, g = SpectralRFFT2(40, 36, "backward"), SpectralIRFFT2(40, 36, "backward")
    re, im = f(torch.full((1, 40, 36), 0.25))
    kh, kw = f.bin_frequencies()
    dc = (kh[:, None] == 0) & (kw[None, :] == 0)
    assert abs(float(re[0][dc]) - 0.25 * 40 * 36) < 1e-3
    assert float(re[0][~dc].abs().max()) < 1e-4 and float(im.abs().max()) < 1e-4
    z = torch.zeros(1, 40, f.kwp)
    assert torch.equal(g(z, z), torch.zeros(1, 40, 36))


@pytest.mark.parametrize("h, w", [(48, 70), (66, 72), (33, 47)])
def test_per_bin_block_on_real_image_equals_torch_fft_block(h, w):
    """The pair's contract: any per-bin map in between (here SRConvNet-like: a 1x1 conv
    mixing re/im of all channels, GELU -- non-Hermitian result) gives what the same block
    gives with torch.fft; on a real image, split axes (> DIRECT_MAX) included."""
    from conftest import real_image

    x = real_image(h, w).double()  # (1, 3, h, w)
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(6, 6, 1, bias=False).double().requires_grad_(False)

    def block(re, im):
        y = torch.nn.functional.gelu(conv(torch.cat([re, im], 1)))
        return y[:, :3], y[:, 3:]

    z = torch.fft.rfft2(x, norm="ortho")
    ref = torch.fft.irfft2(torch.complex(*block(z.real, z.imag)), s=(h, w), norm="ortho")
    f, g = SpectralRFFT2(h, w, "ortho", torch.float64), SpectralIRFFT2(h, w, "ortho", torch.float64)
    assert _rel(g(*block(*f(x))), ref) <= FP64_TOL
    f32, g32 = SpectralRFFT2(h, w, "ortho"), SpectralIRFFT2(h, w, "ortho")
    conv.float()
    assert _rel(g32(*block(*f32(x.float()))), ref) <= FP32_TOL


# --------------------------------------------------------------------------- structure
def test_buffers_contiguous_distinct_and_not_in_state_dict():
    for mod in (SpectralRFFT2(100, 128), SpectralIRFFT2(100, 128)):
        bufs = list(mod.buffers())
        assert len(bufs) == 4 and mod.state_dict() == {}
        assert all(b.is_contiguous() and b.dtype == torch.float32 for b in bufs)
        assert len({b.data_ptr() for b in bufs}) == len(bufs)


def test_bad_arguments():
    with pytest.raises(ValueError, match="height and width"):
        SpectralRFFT2(0, 4)
    with pytest.raises(ValueError, match="norm"):
        SpectralIRFFT2(4, 4, norm="nope")
    with pytest.raises(ValueError, match=r"expected \(\.\.\., 4, 6\)"):
        SpectralRFFT2(4, 6)(torch.zeros(1, 4, 5))
    g = SpectralIRFFT2(4, 6)
    with pytest.raises(ValueError, match="expected re, im"):
        g(torch.zeros(1, 4, 4), torch.zeros(1, 4, 3))
    with pytest.raises(ValueError, match="target"):
        per_bin_dft(4, 4, "ortho", torch.float32, "coreml")


def test_per_bin_dft_picks_the_pair_per_target_and_size():
    fwd, inv = per_bin_dft(72, 66, "ortho", torch.float32, "onnx")  # both axes split
    assert isinstance(fwd, SpectralRFFT2) and isinstance(inv, SpectralIRFFT2)
    fwd, inv = per_bin_dft(128, 32, "ortho", torch.float32, "onnx")  # one axis split
    assert isinstance(fwd, SpectralRFFT2) and isinstance(inv, SpectralIRFFT2)
    for h, w in ((64, 64), (67, 33)):  # direct axes only (<= DIRECT_MAX, or prime)
        fwd, inv = per_bin_dft(h, w, "ortho", torch.float32, "onnx")
        assert isinstance(fwd, RealRFFT2) and isinstance(inv, RealIRFFT2) and fwd.layout == "onnx"
    fwd, inv = per_bin_dft(72, 66, "ortho", torch.float32, "tflite")
    assert isinstance(fwd, RealRFFT2) and isinstance(inv, RealIRFFT2) and fwd.layout == inv.layout == "tflite"
    assert set(LAYOUTS) == {"onnx", "tflite"}


# --------------------------------------------------------------------------- export
class _RoundTripBlock(torch.nn.Module):
    """Forward, a per-bin scale (so the spectrum is used, not just passed through), inverse."""

    def __init__(self, h, w, direct_max):
        super().__init__()
        self.f = SpectralRFFT2(h, w, "ortho", direct_max=direct_max)
        self.g = SpectralIRFFT2(h, w, "ortho", direct_max=direct_max)

    def forward(self, x):
        re, im = self.f(x)
        gain = torch.sigmoid(re * re + im * im)
        return self.g(re * gain, im * gain)


def _torch_fft_block(x):
    z = torch.fft.rfft2(x.double(), norm="ortho")
    gain = torch.sigmoid(z.real ** 2 + z.imag ** 2)
    return torch.fft.irfft2(z * gain, s=x.shape[-2:], norm="ortho")


ALLOWED_ATEN = {"matmul", "permute", "transpose", "reshape", "view", "cat", "select", "slice",
                "unsqueeze", "clone", "contiguous", "_unsafe_view", "expand", "mul", "add", "sigmoid"}
# 64x64 direct; 64x64 and 33x47 (3*11 split, prime 47 direct) with direct_max=1 split.
EXPORT_CASES = [(64, 64, DIRECT_MAX), (64, 64, 1), (33, 47, 1)]


@pytest.mark.parametrize("h, w, direct_max", EXPORT_CASES)
def test_torch_export_strict_has_no_fft_or_complex(h, w, direct_max):
    x = torch.randn(1, 4, h, w)
    ep = torch.export.export(_RoundTripBlock(h, w, direct_max).eval(), (x,), strict=True)
    for node in ep.graph.nodes:
        val = node.meta.get("val")
        assert not (isinstance(val, torch.Tensor) and val.is_complex()), node
        if node.op == "call_function":
            assert str(node.target).split(".")[1] in ALLOWED_ATEN, node.target
    assert _rel(ep.module()(x).detach(), _torch_fft_block(x)) <= FP32_TOL


@pytest.mark.parametrize("h, w, direct_max", EXPORT_CASES + [(256, 256, DIRECT_MAX)])
def test_onnx_export_runs_in_onnxruntime_with_four_transposes(h, w, direct_max, tmp_path):
    import onnx
    import onnxruntime as ort

    x = torch.randn(1, 4, h, w)
    path = str(tmp_path / "spectral.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_RoundTripBlock(h, w, direct_max).eval(), (x,), path, dynamo=True, opset_version=18,
                          external_data=False, input_names=["x"], verbose=False)
    ops = [n.op_type for n in onnx.load(path).graph.node]
    assert not set(ops) & {"DFT", "STFT", "Atan", "Cos", "Sin"}, ops
    assert ops.count("Transpose") <= 4, ops  # the four per-plane 2-D transposes, nothing else moves data
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    out = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    assert _rel(torch.from_numpy(out), _torch_fft_block(x)) <= FP32_TOL


@pytest.mark.parametrize("h, w, direct_max", EXPORT_CASES)
def test_tflite_export_runs_in_litert(h, w, direct_max, tmp_path):
    """Not what a TFLite export uses (``per_bin_dft`` keeps the natural "tflite" layout
    there), but the pair must still convert and run correctly if chosen."""
    import litert_torch
    from ai_edge_litert.interpreter import Interpreter

    x = torch.randn(1, 4, h, w)
    path = str(tmp_path / "spectral.tflite")
    litert_torch.convert(_RoundTripBlock(h, w, direct_max).eval(), (x,)).export(path)
    runner = Interpreter(model_path=path, num_threads=2).get_signature_runner()
    out = runner(args_0=x.numpy())["output_0"]
    assert _rel(torch.from_numpy(out), _torch_fft_block(x)) <= FP32_TOL
