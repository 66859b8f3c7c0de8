"""Exactness and exportability of the real-matmul DFT (edgesr.reparam.dft).

The references are torch.fft (CPU) and numpy.fft.  Export checks run the real
runtimes: onnxruntime for torch.onnx (dynamo, opset 18) and ai_edge_litert for
litert-torch, including 64x64, where an earlier unfactorized version was silently
miscompiled by litert-torch (non-contiguous constants were merged).  Everything runs
for both op layouts (``layout="onnx"`` / ``"tflite"``); the tflite layout must also
never broadcast a basis (no BROADCAST_TO in TFLite), also inside the DarkIR and
SRConvNet deploy forms for the "tflite" target.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from edgesr.reparam.dft import DIRECT_MAX, LAYOUTS, RealIRFFT2, RealRFFT2, split_factor, unit_phase
from edgesr.reparam.dft_spectral import SpectralIRFFT2, SpectralRFFT2
from conftest import rel_err as _rel

NORMS = ("backward", "ortho", "forward")
# 1, 2, tiny, primes (direct matmul), odd composites, powers of two, mixed.
SHAPES = [(1, 1), (1, 2), (2, 1), (2, 2), (3, 5), (4, 4), (7, 13), (8, 8), (12, 18),
          (16, 30), (31, 47), (33, 47), (45, 99), (64, 64), (100, 128), (127, 2), (128, 128)]
FP64_TOL = 1e-12  # max abs error relative to max |reference|
FP32_TOL = 1e-5

dims = st.integers(min_value=1, max_value=96)
leads = st.sampled_from([(), (3,), (2, 3), (1, 1, 2)])
norms = st.sampled_from(NORMS)
# 1: split every composite axis (exercises the Cooley-Tukey path at small sizes);
# DIRECT_MAX: the default (direct matmul up to 64).
direct = st.sampled_from([1, DIRECT_MAX])
layouts = st.sampled_from(LAYOUTS)
fast = settings(max_examples=25, deadline=None)
by_layout = pytest.mark.parametrize("layout", LAYOUTS)


def _check_rfft2(lead, h, w, norm, dtype, tol, seed=0, direct_max=DIRECT_MAX, layout="onnx"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, h, w, generator=g, dtype=torch.float64)
    ref = torch.fft.rfft2(x, norm=norm)
    re, im = RealRFFT2(h, w, norm, dtype=dtype, direct_max=direct_max, layout=layout)(x.to(dtype))
    assert re.shape == im.shape == ref.shape and re.dtype == dtype
    err = max(_rel(re, ref.real), _rel(im, ref.imag))
    assert err <= tol, (lead, h, w, norm, err)


def _spectrum(lead, h, w, seed, dtype=torch.float64):
    """Random, deliberately non-Hermitian half spectrum (DC/Nyquist imag != 0, no symmetry)."""
    g = torch.Generator().manual_seed(seed)
    shape = (*lead, h, w // 2 + 1)
    return torch.randn(shape, generator=g, dtype=dtype), torch.randn(shape, generator=g, dtype=dtype)


def _check_irfft2(lead, h, w, norm, dtype, tol, seed=0, direct_max=DIRECT_MAX, layout="onnx"):
    zr, zi = _spectrum(lead, h, w, seed)
    ref = torch.fft.irfft2(torch.complex(zr, zi), s=(h, w), norm=norm)
    ref_np = np.fft.irfft2(zr.numpy() + 1j * zi.numpy(), s=(h, w), norm=norm)
    y = RealIRFFT2(h, w, norm, dtype=dtype, direct_max=direct_max, layout=layout)(zr.to(dtype), zi.to(dtype))
    assert y.shape == ref.shape and y.dtype == dtype
    err = max(_rel(y, ref), _rel(y, torch.from_numpy(ref_np)))
    assert err <= tol, (lead, h, w, norm, err)


# --------------------------------------------------------------------------- exactness
@by_layout
@pytest.mark.parametrize("direct_max", [1, DIRECT_MAX])
@pytest.mark.parametrize("h, w", SHAPES)
def test_rfft2_fp64_matches_torch(h, w, direct_max, layout):
    for norm in NORMS:
        _check_rfft2((2,), h, w, norm, torch.float64, FP64_TOL, direct_max=direct_max, layout=layout)


@by_layout
@pytest.mark.parametrize("direct_max", [1, DIRECT_MAX])
@pytest.mark.parametrize("h, w", SHAPES)
def test_irfft2_fp64_non_hermitian_matches_torch_cpu_and_numpy(h, w, direct_max, layout):
    for norm in NORMS:
        _check_irfft2((2,), h, w, norm, torch.float64, FP64_TOL, direct_max=direct_max, layout=layout)


@by_layout
@pytest.mark.parametrize("direct_max", [1, DIRECT_MAX])
@pytest.mark.parametrize("h, w", [(1, 1), (2, 2), (7, 13), (33, 47), (64, 64), (128, 128)])
@pytest.mark.parametrize("norm", ["backward", "ortho"])
def test_fp32_rounding_level(h, w, norm, direct_max, layout):
    _check_rfft2((1, 3), h, w, norm, torch.float32, FP32_TOL, direct_max=direct_max, layout=layout)
    _check_irfft2((1, 3), h, w, norm, torch.float32, FP32_TOL, direct_max=direct_max, layout=layout)


@fast
@given(lead=leads, h=dims, w=dims, norm=norms, seed=st.integers(0, 2**16), direct_max=direct,
       layout=layouts)
def test_rfft2_fp64_property(lead, h, w, norm, seed, direct_max, layout):
    _check_rfft2(lead, h, w, norm, torch.float64, FP64_TOL, seed, direct_max, layout)


@fast
@given(lead=leads, h=dims, w=dims, norm=norms, seed=st.integers(0, 2**16), direct_max=direct,
       layout=layouts)
def test_irfft2_fp64_property(lead, h, w, norm, seed, direct_max, layout):
    _check_irfft2(lead, h, w, norm, torch.float64, FP64_TOL, seed, direct_max, layout)


@settings(max_examples=15, deadline=None)
@given(h=dims, w=dims, norm=st.sampled_from(["backward", "ortho"]), seed=st.integers(0, 2**16),
       direct_max=direct, layout=layouts)
def test_fp32_property(h, w, norm, seed, direct_max, layout):
    _check_rfft2((2,), h, w, norm, torch.float32, FP32_TOL, seed, direct_max, layout)
    _check_irfft2((2,), h, w, norm, torch.float32, FP32_TOL, seed, direct_max, layout)


@by_layout
@pytest.mark.parametrize("h, w", [(1, 1), (5, 2), (33, 47), (64, 64)])
def test_round_trip_and_dc_nyquist_imag_ignored(h, w, layout):
    x = torch.randn(3, h, w, dtype=torch.float64)
    f = RealRFFT2(h, w, "ortho", torch.float64, direct_max=1, layout=layout)
    g = RealIRFFT2(h, w, "ortho", torch.float64, direct_max=1, layout=layout)
    assert _rel(g(*f(x)), x) <= FP64_TOL
    # After the full complex inverse along H, the imaginary parts of the DC and (even W)
    # Nyquist columns do not reach the output: add P = i*DFT_H(r) (r real), whose
    # H-inverse is purely imaginary, to those columns.
    zr, zi = _spectrum((3,), h, w, 1)
    zr2, zi2 = zr.clone(), zi.clone()
    cols = [0, w // 2] if w % 2 == 0 else [0]
    for col in cols:
        p = 1j * torch.fft.fft(torch.randn(3, h, dtype=torch.float64), dim=-1)
        zr2[..., col] += p.real
        zi2[..., col] += p.imag
    assert _rel(g(zr, zi), g(zr2, zi2)) <= FP64_TOL
    zr2 = zr.clone()
    zr2[..., 0] += 1.0  # ...while their real parts do
    assert _rel(g(zr, zi), g(zr2, zi)) > 1e-3


@by_layout
def test_unfactorized_equals_factorized(layout):
    for h, w in [(12, 18), (33, 47), (64, 64), (65, 96)]:
        x = torch.randn(2, h, w, dtype=torch.float64)
        zr, zi = _spectrum((2,), h, w, 2)
        fa = RealRFFT2(h, w, dtype=torch.float64, direct_max=1, layout=layout)
        fd = RealRFFT2(h, w, dtype=torch.float64, factorize=False, layout=layout)
        assert (fd.h1, fd.w1) == (h, w) and (fa.h1, fa.w1) == (split_factor(h), split_factor(w))
        for a, b in zip(fa(x), fd(x)):
            assert _rel(a, b) <= FP64_TOL
        ga = RealIRFFT2(h, w, dtype=torch.float64, direct_max=1, layout=layout)
        gd = RealIRFFT2(h, w, dtype=torch.float64, factorize=False, layout=layout)
        assert _rel(ga(zr, zi), gd(zr, zi)) <= FP64_TOL


@pytest.mark.parametrize("h, w", [(12, 18), (33, 47), (65, 96), (130, 72)])
def test_layouts_agree(h, w):
    """Same sums, different op order: the two layouts agree to fp64 rounding."""
    x = torch.randn(2, 3, h, w, dtype=torch.float64)
    zr, zi = _spectrum((2, 3), h, w, 3)
    f = [RealRFFT2(h, w, dtype=torch.float64, direct_max=1, layout=lay) for lay in LAYOUTS]
    g = [RealIRFFT2(h, w, dtype=torch.float64, direct_max=1, layout=lay) for lay in LAYOUTS]
    for a, b in zip(f[0](x), f[1](x)):
        assert _rel(a, b) <= FP64_TOL
    assert _rel(g[0](zr, zi), g[1](zr, zi)) <= FP64_TOL
    assert f[1].layout == "tflite" and "layout='tflite'" in repr(f[1])


def test_split_factor_and_default_plan():
    assert [split_factor(n) for n in (1, 2, 3, 4, 6, 12, 47, 64, 100, 256, 1024, 1018)] == \
        [1, 2, 3, 2, 2, 3, 47, 8, 10, 16, 32, 2]
    m = RealRFFT2(64, 180)  # default: direct up to DIRECT_MAX, split above
    assert (m.h1, m.h2, m.w1, m.w2) == (64, 1, 12, 15)
    m = RealIRFFT2(256, 127)  # prime: direct
    assert (m.h1, m.h2, m.w1, m.w2) == (16, 16, 127, 1)


@by_layout
def test_buffers_contiguous_distinct_and_not_in_state_dict(layout):
    for mod in (RealRFFT2(64, 64, direct_max=1, layout=layout),
                RealIRFFT2(33, 47, direct_max=1, layout=layout), RealRFFT2(47, 1, layout=layout)):
        bufs = list(mod.buffers())
        assert bufs and mod.state_dict() == {}
        assert all(b.is_contiguous() and b.dtype == torch.float32 for b in bufs)
        assert len({b.untyped_storage().data_ptr() for b in bufs}) == len(bufs)
    assert all(b.dtype == torch.float64 for b in RealIRFFT2(8, 8, dtype=torch.float64).buffers())


def test_bad_arguments():
    with pytest.raises(ValueError):
        RealRFFT2(8, 8, norm="unitary")
    with pytest.raises(ValueError):
        RealIRFFT2(0, 8)
    with pytest.raises(ValueError):
        RealRFFT2(8, 8)(torch.randn(1, 8, 9))
    with pytest.raises(ValueError):
        RealIRFFT2(8, 8)(torch.randn(8, 5), torch.randn(8, 4))
    with pytest.raises(ValueError):
        RealRFFT2(8, 8, layout="coreml")


# --------------------------------------------------------------------------- unit_phase
def test_unit_phase_matches_angle_and_zero_bins():
    x = torch.randn(4, 24, 31)
    x[0] = 1.0  # constant: every non-DC bin is ~0 or exactly 0
    z = torch.fft.rfft2(x)
    z[1, 3, 4] = 0
    re, im = z.real.contiguous(), z.imag.contiguous()
    c, s = unit_phase(re, im)
    m = z.abs()
    assert torch.isfinite(c).all() and torch.isfinite(s).all()
    zero = m == 0
    assert zero.any()
    assert torch.equal(c[zero], torch.ones_like(c[zero])) and torch.equal(s[zero], torch.zeros_like(s[zero]))
    # Elsewhere: cos/sin of torch.angle (exactly-zero bins are backend-defined there, see spec).
    ang = torch.angle(z)
    nz = ~zero
    assert torch.allclose(c[nz], torch.cos(ang)[nz], atol=1e-6)
    assert torch.allclose(s[nz], torch.sin(ang)[nz], atol=1e-6)
    assert torch.allclose((c * c + s * s)[nz], torch.ones(()), atol=1e-6)
    # no eps: tiny magnitudes keep an exact unit phase
    c2, s2 = unit_phase(torch.tensor([3e-15, 0.0, -0.0]), torch.tensor([4e-15, 0.0, 0.0]))
    assert torch.allclose(c2, torch.tensor([0.6, 1.0, 1.0])) and torch.allclose(s2, torch.tensor([0.8, 0.0, 0.0]))


def test_unit_phase_gradient_is_finite_at_zero():
    re = torch.tensor([0.0, 1.0], requires_grad=True)
    im = torch.tensor([0.0, 1.0], requires_grad=True)
    c, s = unit_phase(re, im)
    (c + s).sum().backward()
    assert torch.isfinite(re.grad).all() and torch.isfinite(im.grad).all()


# --------------------------------------------------------------------------- export
class _Both(torch.nn.Module):
    """rfft2 of x and (independently) irfft2 of a non-Hermitian spectrum, one graph."""

    def __init__(self, h, w, direct_max, norm="ortho", layout="onnx"):
        super().__init__()
        self.f = RealRFFT2(h, w, norm, direct_max=direct_max, layout=layout)
        self.g = RealIRFFT2(h, w, norm, direct_max=direct_max, layout=layout)

    def forward(self, x, zr, zi):
        re, im = self.f(x)
        return re, im, self.g(zr, zi)


def _export_case(h, w, direct_max, layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, h, w, generator=g)
    zr, zi = _spectrum((1, 4), h, w, seed + 1, torch.float32)
    ref_f = torch.fft.rfft2(x.double(), norm="ortho")
    ref_i = torch.fft.irfft2(torch.complex(zr.double(), zi.double()), s=(h, w), norm="ortho")
    return _Both(h, w, direct_max, layout=layout).eval(), (x, zr, zi), (ref_f.real, ref_f.imag, ref_i)


def _split(h, w, direct_max) -> bool:
    m = RealRFFT2(h, w, direct_max=direct_max)
    return m.h2 > 1 or m.w2 > 1


def _broadcasts(ep) -> list:
    """``aten.expand`` nodes that really broadcast (output shape != input shape) in the
    decomposed graph (what ONNX and litert-torch lower): a broadcast basis in a batched
    matmul shows up here (and as BROADCAST_TO in TFLite)."""
    ep = ep.run_decompositions()
    return [n for n in ep.graph.nodes if n.op == "call_function" and "expand" in str(n.target)
            and tuple(n.args[0].meta["val"].shape) != tuple(n.meta["val"].shape)]


def _assert_outputs(outs, refs):
    for o, r in zip(outs, refs, strict=True):
        assert tuple(o.shape) == tuple(r.shape)
        assert _rel(torch.as_tensor(np.asarray(o)), r) <= FP32_TOL


def _basis_present(mod, constants):
    """Every DFT basis appears as a constant (possibly transposed): nothing was merged."""
    for name, b in mod.named_buffers():
        b = b.numpy()
        assert any(c.shape == v.shape and np.array_equal(c, v)
                   for c in constants for v in (b, b.swapaxes(-1, -2))), name


ALLOWED_ATEN = {"matmul", "permute", "reshape", "view", "pad", "constant_pad_nd", "stack", "cat",
                "select", "slice", "unsqueeze", "clone", "contiguous", "_unsafe_view", "expand"}


# 64x64 direct is the form litert-torch once miscompiled (merged constants); 64x64 and
# 33x47 (= 3*11 split, prime 47 direct) with direct_max=1 run the Cooley-Tukey graph.
EXPORT_CASES = [(64, 64, DIRECT_MAX), (64, 64, 1), (33, 47, 1)]


@by_layout
@pytest.mark.parametrize("h, w, direct_max", EXPORT_CASES + [(1, 2, 1)])
def test_torch_export_strict_has_no_fft_or_complex(h, w, direct_max, layout):
    mod, args, refs = _export_case(h, w, direct_max, layout)
    ep = torch.export.export(mod, args, strict=True)
    for node in ep.graph.nodes:
        val = node.meta.get("val")
        for v in val if isinstance(val, (tuple, list)) else [val]:
            assert not (isinstance(v, torch.Tensor) and v.is_complex()), node
        if node.op == "call_function":
            name = str(node.target)
            assert "fft" not in name and "complex" not in name and "angle" not in name, name
            assert name.split(".")[1] in ALLOWED_ATEN, name
    _assert_outputs([t.detach() for t in ep.module()(*args)], refs)
    if layout == "tflite":
        assert not _broadcasts(ep)
    elif _split(h, w, direct_max):  # control: the onnx layout does broadcast its twiddled bases
        assert _broadcasts(ep)


@by_layout
@pytest.mark.parametrize("h, w, direct_max", EXPORT_CASES)
def test_onnx_export_runs_in_onnxruntime(h, w, direct_max, layout, tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnx import numpy_helper

    mod, args, refs = _export_case(h, w, direct_max, layout)
    path = str(tmp_path / "dft.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(mod, args, path, dynamo=True, opset_version=18, external_data=False,
                          input_names=["x", "zr", "zi"], verbose=False)
    model = onnx.load(path)
    ops = {n.op_type for n in model.graph.node}
    assert not ops & {"DFT", "STFT", "Atan", "Cos", "Sin"}, ops
    _basis_present(mod, [numpy_helper.to_array(t) for t in model.graph.initializer])
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    outs = sess.run(None, {k: v.numpy() for k, v in zip(["x", "zr", "zi"], args)})
    _assert_outputs(outs, refs)


@by_layout
@pytest.mark.parametrize("h, w, direct_max", EXPORT_CASES)
def test_tflite_export_runs_in_litert(h, w, direct_max, layout, tmp_path):
    litert_torch = pytest.importorskip("litert_torch")
    interpreter = pytest.importorskip("ai_edge_litert.interpreter")
    from edgesr.export.tflite import inspect_tflite

    mod, args, refs = _export_case(h, w, direct_max, layout)
    path = str(tmp_path / "dft.tflite")
    litert_torch.convert(mod, args).export(path)
    with open(path, "rb") as fh:
        ops = inspect_tflite(fh.read()).ops
    assert "BATCH_MATMUL" in ops or "FULLY_CONNECTED" in ops, ops
    if layout == "tflite":
        assert "BROADCAST_TO" not in ops, ops
    elif _split(h, w, direct_max):  # control: the check can fail
        assert "BROADCAST_TO" in ops, ops
    it = interpreter.Interpreter(model_path=path, num_threads=2)
    constants = []
    for d in it.get_tensor_details():
        try:
            constants.append(it.get_tensor(d["index"]))
        except ValueError:  # activations are not readable before invoke
            pass
    _basis_present(mod, constants)
    runner = it.get_signature_runner()
    out = runner(**{f"args_{i}": a.numpy() for i, a in enumerate(args)})
    _assert_outputs([out[k] for k in sorted(out)], refs)
    assert math.prod(out["output_2"].shape) == 4 * h * w


# --------------------------------------------------------------------------- callers
def _with_gains(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Nonzero residual gains (DarkIR's zero-init gamma/beta would bypass every FreMLP)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("gamma", "beta", "layer_scale")):
                p.copy_(torch.rand(p.shape, generator=g) * 1.0 + 0.5)
    return model


def _small_models():
    from edgesr.models import darkir, srconvnet

    torch.manual_seed(0)
    dk = darkir.DarkIR(width=8, enc_blk_nums=[1, 1, 1], dec_blk_nums=[1, 1, 1],
                       middle_blk_num_enc=1, middle_blk_num_dec=1)
    sr = srconvnet.SRConvNet(scale=2, dim=16, num_blocks=1)
    # model, input size (first-level feature size > DIRECT_MAX: split), rewritten FFT block type
    return {"darkir": (dk, (72, 66), darkir.SafeFreMLP), "srconvnet": (sr, (66, 72), srconvnet.SafeFourierUnit)}


@pytest.mark.parametrize("name", ["darkir", "srconvnet"])
def test_deploy_tflite_target_uses_tflite_layout_without_broadcast(name):
    """``make_export_safe(m, target)`` (so ``edgesr.deploy``) picks the DFT pair of the
    target: for "tflite" the natural-order "tflite" layout, with no basis broadcast in the
    graph litert-torch lowers (so no BROADCAST_TO); for "onnx" the digit-reversed per-bin
    pair, which does broadcast (control).  Feature sizes > DIRECT_MAX,
    so the Cooley-Tukey (batched) stages are in the graph; outputs equal the train form."""
    from conftest import real_image

    import edgesr
    from edgesr.models import darkir
    from edgesr.reparam.rules import apply_folds

    model, (h, w), safe_type = _small_models()[name]
    model = _with_gains(model).eval()
    x = real_image(h, w)
    folded = apply_folds(model)
    for target in ("onnx", "tflite"):
        dep = edgesr.make_export_safe(folded, target)  # == edgesr.deploy without its probe report
        units = [m for m in dep.modules() if isinstance(m, safe_type)]
        assert units and all(u.layout == target for u in units)
        with torch.no_grad():
            ref, out = model(x), dep(x)
        assert (out - ref).abs().max() <= 1e-5 * max(1.0, float(ref.abs().max()))
        ep = torch.export.export(dep, (x,), strict=False)  # the litert-torch capture mode
        assert bool(_broadcasts(ep)) == (target == "onnx"), target
        if name == "darkir":  # bases live in the module-level cache, keyed by layout too
            pair = darkir.dft_bases(h, w, torch.float32, torch.device("cpu"), target)
            dfts = [pair.rfft, pair.irfft]
        else:  # bases live on the module (the eager forward above built them)
            dfts = [m for m in dep.modules()
                    if isinstance(m, (RealRFFT2, RealIRFFT2, SpectralRFFT2, SpectralIRFFT2))]
        if target == "tflite":  # natural order, tflite layout
            assert dfts and all(isinstance(m, (RealRFFT2, RealIRFFT2)) and m.layout == target and m.h2 > 1
                                for m in dfts)
        else:  # split sizes: the digit-reversed per-bin pair (edgesr.reparam.dft_spectral.per_bin_dft)
            assert dfts and all(isinstance(m, (SpectralRFFT2, SpectralIRFFT2)) and m.hi > 1 for m in dfts)
