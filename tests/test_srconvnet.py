"""SRConvNet: official keys and counts, train-form forward, train.py checkpoints, and the
exact export-safe rewrites (matmul DFT, dynamic conv in two forms, interleave fold)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import noise_image, real_image
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import edgesr
from edgesr.models import srconvnet as sc
from edgesr.models.checkpoint import detect_architecture
from edgesr.models.registry import get_spec
from edgesr.reparam import make_export_safe, safe_ops
from edgesr.reparam.dft import RealIRFFT2
from edgesr.reparam.rules import apply_folds

TRAINABLE = {2: 990_851, 3: 1_011_651, 4: 1_007_491}
HYP = settings(deadline=None, max_examples=12, derandomize=True)


def _randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Trained-looking weights: layer_scale ~ U(0.5, 2) (the 1e-6 init would hide the Fourier
    branch behind a uniform softmax), nonzero kernel-bank biases, perturbed LayerNorms."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, sc.FConvMod):
                mod.layer_scale.copy_(torch.rand(mod.layer_scale.shape, generator=g) * 1.5 + 0.5)
            elif isinstance(mod, sc.KernelAggregation) and mod.bias is not None:
                mod.bias.copy_(torch.randn(mod.bias.shape, generator=g) * 0.1)
            elif isinstance(mod, sc.LayerNorm):
                mod.weight.add_(torch.randn(mod.weight.shape, generator=g) * 0.1)
                mod.bias.add_(torch.randn(mod.bias.shape, generator=g) * 0.1)
    return model


def _small(scale: int = 2, blocks: int = 1, dim: int = 64) -> sc.SRConvNet:
    torch.manual_seed(1)
    return _randomize_(sc.SRConvNet(scale=scale, dim=dim, num_blocks=blocks).eval())


def _deploy_quick(model: nn.Module, target: str = "onnx", form: str | None = None) -> nn.Module:
    """fold + make_export_safe without the fold report's probe forwards."""
    if form is None:
        return make_export_safe(apply_folds(model), target)
    with safe_ops.dynamic_conv_form(form):
        return make_export_safe(apply_folds(model), target)


# ---------------------------------------------------------------------------- keys / counts


def _expected_shapes(scale: int) -> dict[str, tuple[int, ...]]:
    d, k = 64, 16
    e = {
        "sub_mean.weight": (3, 3, 1, 1), "sub_mean.bias": (3,),
        "add_mean.weight": (3, 3, 1, 1), "add_mean.bias": (3,),
        "to_feat.weight": (d, 3, 3, 3), "to_feat.bias": (d,),
        "tail.weight": (3, d, 3, 3), "tail.bias": (3,),
    }
    for i in range(8):
        p = f"blocks.{i}."
        e.update({
            p + "attention.layer_scale": (8,),
            p + "attention.norm.weight": (d,), p + "attention.norm.bias": (d,),
            p + "attention.a.conv_layer.weight": (2 * d, 2 * d, 1, 1),
            p + "attention.v.weight": (d, d, 1, 1), p + "attention.v.bias": (d,),
            p + "attention.CPE.weight": (d, 1, 3, 3), p + "attention.CPE.bias": (d,),
            p + "attention.proj.weight": (d, d, 1, 1), p + "attention.proj.bias": (d,),
            p + "ffn.proj_in.weight": (2 * d, d, 1, 1), p + "ffn.proj_in.bias": (2 * d,),
            p + "ffn.proj_out.weight": (d, 2 * d, 1, 1), p + "ffn.proj_out.bias": (d,),
            p + "ffn.norm.weight": (d,), p + "ffn.norm.bias": (d,),
        })
        for j, ks in ((1, 5), (2, 7)):
            q = f"{p}ffn.conv{j}.conv."
            e.update({
                q + "attention.conv1.weight": (8, d, 1, 1), q + "attention.conv1.bias": (8,),
                q + "attention.conv2.weight": (k, 8, 1, 1), q + "attention.conv2.bias": (k,),
                q + "aggregation.weight": (k, d, 1, ks, ks), q + "aggregation.bias": (k, d),
            })
    if scale == 4:
        for i in (0, 3):
            e[f"upsampling.{i}.weight"], e[f"upsampling.{i}.bias"] = (4 * d, d, 1, 1), (4 * d,)
    else:
        e["upsampling.0.weight"], e["upsampling.0.bias"] = (d * scale**2, d, 1, 1), (d * scale**2,)
    return e


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {s: _randomize_(edgesr.create_model("srconvnet", scale=s), seed=s) for s in (2, 3, 4)}


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_keys_shapes_and_parameter_counts(models, scale):
    m = models[scale]
    sd = m.state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == _expected_shapes(scale)
    trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
    frozen = [p for p in m.parameters() if not p.requires_grad]
    assert trainable == TRAINABLE[scale]
    assert sum(p.numel() for p in frozen) == 24
    banks = sum(v.numel() for k, v in sd.items() if k.startswith("blocks.0.") and k.endswith("aggregation.weight"))
    assert banks == 75_776
    mean = torch.tensor(sc.RGB_MEAN) * 255
    assert torch.equal(sd["sub_mean.weight"].flatten(1).squeeze(), torch.eye(3))
    torch.testing.assert_close(sd["sub_mean.bias"], -mean)
    torch.testing.assert_close(sd["add_mean.bias"], mean)


def test_spec_contract():
    spec = get_spec("srconvnet")
    assert spec.input_range == 255.0
    assert (spec.size_rule.min_size, spec.size_rule.multiple_of) == (1, 1)
    assert spec.dynamic_shapes is False
    v = spec.variant(None)
    assert (v.name, v.scales, v.default_scale) == ("base", (2, 3, 4), 4)
    assert dict(v.config) == {"dim": 64, "num_blocks": 8, "num_heads": 8, "num_kernels": 16,
                              "colors": 3, "rgb_range": 255.0}


def test_detection(models):
    for s, m in models.items():
        sd = m.state_dict()
        assert sc._detect(sd) == ("base", s)
        assert [(c[0].name, c[1], c[2]) for c in detect_architecture(sd)] == [("srconvnet", "base", s)]
    sd = dict(models[4].state_dict())
    foreign = [
        {},
        {"to_feat.weight": "not a tensor"},
        {k: v for k, v in sd.items() if not k.startswith("upsampling")},
        {**sd, "to_feat.weight": torch.zeros(64)},
        {**{k: v for k, v in sd.items() if k != "upsampling.3.weight"}, "upsampling.0.weight": torch.zeros(100, 64, 1, 1)},
        {**{k: v for k, v in sd.items() if k != "upsampling.3.weight"}, "upsampling.0.weight": torch.zeros(64 * 25, 64, 1, 1)},
        {"body.0.weight": torch.zeros(3, 3, 3, 3)},
    ]
    for f in foreign:
        assert sc._detect(f) is None


# ---------------------------------------------------------------------------- checkpoints


def test_train_py_checkpoint_round_trip(tmp_path):
    """train.py saves {'epoch', 'model_state_dict' (DataParallel: 'module.' keys),
    'optimizer_state_dict', 'scheduler_state_dict', 'stat_dict'}."""
    torch.manual_seed(0)
    model = _randomize_(edgesr.create_model("srconvnet", scale=3))
    dp = nn.DataParallel(model)
    opt = torch.optim.Adam(dp.parameters(), lr=5e-4, eps=1e-8)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[250, 400, 450, 475], gamma=0.5)
    for p in dp.parameters():
        if p.requires_grad:
            p.grad = torch.randn_like(p) * 1e-3
    opt.step()
    sched.step()
    stat = {"losses": [0.12, 0.08], "epochs": 2,
            "set5": {"psnrs": [30.1], "ssims": [0.88], "best_psnr": {"value": 30.1, "epoch": 2},
                     "best_ssim": {"value": 0.88, "epoch": 2}}}
    path = tmp_path / "model_x3_latest.pt"
    torch.save({"epoch": 2, "model_state_dict": dp.state_dict(), "optimizer_state_dict": opt.state_dict(),
                "scheduler_state_dict": sched.state_dict(), "stat_dict": stat}, path)
    raw = torch.load(path, weights_only=True)  # optimizer/scheduler state is weights_only-safe
    assert all(k.startswith("module.") for k in raw["model_state_dict"])
    assert len(raw["optimizer_state_dict"]["state"]) > 0

    loaded, report = edgesr.load_model(path, return_report=True)
    assert (report.wrapper, report.stripped_prefix) == ("model_state_dict", "module.")
    assert loaded.edgesr_info["model"] == "srconvnet" and loaded.edgesr_info["scale"] == 3
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    x = noise_image(6, 7) * 255
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))


def test_non_base_checkpoint_loads_with_its_own_config():
    # issue 15: widths/depths are read off the shapes, never forced into the base config
    src = sc.SRConvNet(scale=4, dim=48, num_blocks=2).eval()
    loaded = edgesr.load_model(src.state_dict())
    assert loaded.edgesr_info["variant"] == "custom-dim48-b2-h8-k16"
    assert (loaded.dim, loaded.num_blocks) == (48, 2)
    x = noise_image(6, 5) * 255
    with torch.no_grad():
        assert torch.equal(loaded(x), src(x))


# ---------------------------------------------------------------------------- train form


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_forward_shapes(models, scale):
    m = models[scale]
    with torch.no_grad():
        for h, w in [(1, 1), (7, 5), (12, 17)]:
            x = noise_image(h, w, seed=h) * 255
            y = m(x)
            assert y.shape == (1, 3, scale * h, scale * w)
            assert torch.isfinite(y).all()
        x = torch.rand(2, 3, 6, 9) * 255  # batch of 2: batch-folded dynamic conv
        y = m(x)
        torch.testing.assert_close(y[1:], m(x[1:]), rtol=0, atol=1e-3)


def _official_fconvmod(m: sc.FConvMod, x: torch.Tensor) -> torch.Tensor:
    """FConvMod.forward as published (split into N//4 chunks + cat), minus the debug dumps."""
    b, c, h, w = x.shape
    n = h * w
    pos = m.CPE(x)
    xn = m.norm(x)
    a, v = m.a(xn), m.v(xn)
    a = a.reshape(b, m.num_heads, c // m.num_heads, n)
    v = v.reshape(b, m.num_heads, c // m.num_heads, n)
    attns = []
    for ai, vi in zip(torch.split(a, math.ceil(n // 4), dim=-1), torch.split(v, math.ceil(n // 4), dim=-1)):
        attns.append(m.layer_scale.unsqueeze(-1).unsqueeze(-1) * (ai * vi))
    y = F.softmax(torch.cat(attns, dim=-1), dim=-1).reshape(b, c, h, w)
    return m.proj(y + pos) + x


@pytest.mark.parametrize("size", [(2, 2), (5, 7), (6, 9), (11, 4)])
def test_official_split_is_a_no_op(size):
    torch.manual_seed(0)
    m = _randomize_(sc.FConvMod(16, 8)).double()
    x = torch.randn(2, 16, *size, dtype=torch.float64)
    assert torch.equal(m(x), _official_fconvmod(m, x))


def _gelu_np(z: np.ndarray) -> np.ndarray:
    return F.gelu(torch.from_numpy(z)).numpy()


@pytest.mark.parametrize("size", [(5, 7), (6, 8), (1, 4), (9, 1)])
def test_fourier_unit_train_form_matches_numpy(size):
    """Independent reference: numpy rfft2/irfft2 (ortho) with the legacy interleaved channels."""
    torch.manual_seed(0)
    fu = sc.FourierUnit(3).double()
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    X = np.fft.rfft2(x.numpy(), norm="ortho")
    inter = np.stack([X.real, X.imag], axis=2).reshape(2, 6, *X.shape[-2:])  # [re_0, im_0, re_1, ...]
    wmat = fu.conv_layer.weight.detach().numpy()[:, :, 0, 0]
    z = _gelu_np(np.einsum("oi,bihw->bohw", wmat, inter)).reshape(2, 3, 2, *X.shape[-2:])
    ref = np.fft.irfft2(z[:, :, 0] + 1j * z[:, :, 1], s=size, norm="ortho")
    np.testing.assert_allclose(fu(x).detach().numpy(), ref, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------- non-Hermitian spectra


def _canonical_irfft2(z: np.ndarray, w: int) -> np.ndarray:
    """The documented semantics, written out: full complex inverse DFT along H, then
    y[h, x] = sum_k d_k Re(B[h, k] exp(2 pi i k x / W)), i.e. the imaginary parts of
    B's DC and (even W) Nyquist columns are ignored; ortho scaling."""
    h = z.shape[-2]
    n_h = np.arange(h)
    e_h = np.exp(2j * np.pi * np.outer(n_h, n_h) / h)
    bmat = np.einsum("hm,...mk->...hk", e_h, z)
    k = np.arange(z.shape[-1])
    d = np.where((k == 0) | ((w % 2 == 0) & (k == w // 2)), 1.0, 2.0)
    phase = np.exp(2j * np.pi * np.outer(k, np.arange(w)) / w)
    return np.einsum("...hk,kx->...hx", bmat * d, phase).real / math.sqrt(h * w)


@pytest.mark.parametrize("size", [(6, 7), (5, 8)])
def test_non_hermitian_spectrum_semantics(size):
    """The FourierUnit spectrum is not Hermitian; torch CPU irfft2, numpy and the export-safe
    RealIRFFT2 all implement the canonical semantics, which differs from symmetrising."""
    h, w = size
    torch.manual_seed(0)
    fu = sc.FourierUnit(4).double()
    x = torch.randn(1, 4, h, w, dtype=torch.float64)
    f = torch.view_as_real(torch.fft.rfft2(x, norm="ortho")).permute(0, 1, 4, 2, 3).reshape(1, 8, h, w // 2 + 1)
    z = fu.act(fu.conv_layer(f)).view(1, 4, 2, h, w // 2 + 1).detach()
    zc = (z[:, :, 0] + 1j * z[:, :, 1]).numpy()
    # Not Hermitian: the DC column is not conjugate-symmetric along H.
    dc = zc[..., 0]
    assert np.abs(dc - np.conj(dc[..., (-np.arange(h)) % h])).max() > 1e-2

    ref = _canonical_irfft2(zc, w)
    y_torch = torch.fft.irfft2(torch.complex(z[:, :, 0], z[:, :, 1]), s=(h, w), norm="ortho").numpy()
    y_numpy = np.fft.irfft2(zc, s=(h, w), norm="ortho")
    y_safe = RealIRFFT2(h, w, "ortho", dtype=torch.float64)(z[:, :, 0], z[:, :, 1]).numpy()
    for y in (y_torch, y_numpy, y_safe):
        np.testing.assert_allclose(y, ref, rtol=0, atol=1e-12)
    # The whole unit (train form vs export-safe form) agrees on this input too.
    safe = sc.SafeFourierUnit(fu)
    np.testing.assert_allclose(safe(x).detach().numpy(), fu(x).detach().numpy(), rtol=0, atol=1e-12)
    # Equivalently, the DC (and even-W Nyquist) columns are projected onto their Hermitian
    # part along H: the anti-Hermitian part only feeds the dropped imaginary parts.
    mirror = (-np.arange(h)) % h
    proj = zc.copy()
    cols = [0] + ([w // 2] if w % 2 == 0 else [])
    for c in cols:
        proj[..., c] = 0.5 * (zc[..., c] + np.conj(zc[..., mirror, c]))
    np.testing.assert_allclose(np.fft.irfft2(proj, s=(h, w), norm="ortho"), ref, rtol=0, atol=1e-12)
    # A backend that assumes Hermitian input and rebuilds the lower half of those columns
    # from the upper half (what a C2R-only 2-D transform may do, cf. pytorch#154496) differs.
    half = zc.copy()
    for c in cols:
        for m in range(h // 2 + 1, h):
            half[..., m, c] = np.conj(zc[..., h - m, c])
    assert np.abs(np.fft.irfft2(half, s=(h, w), norm="ortho") - ref).max() > 1e-3


# ---------------------------------------------------------------------------- rewrites


@HYP
@given(h=st.integers(1, 24), w=st.integers(1, 24), b=st.integers(1, 2))
def test_safe_fourier_unit_matches_fft(h, w, b):
    torch.manual_seed(h * 31 + w)
    fu = sc.FourierUnit(4).double()
    safe = make_export_safe(fu, "tflite")
    assert isinstance(safe, sc.SafeFourierUnit)
    x = torch.randn(b, 4, h, w, dtype=torch.float64)
    with torch.no_grad():
        ref = fu(x)
        torch.testing.assert_close(safe(x), ref, rtol=0, atol=1e-12 * (1 + float(ref.abs().max())))
        # fp32: the same module rebuilds its bases for the new dtype
        y32 = safe.float()(x.float())
        assert float((y32.double() - ref).abs().max()) <= 1e-5 * (1 + float(ref.abs().max()))


def test_safe_fourier_unit_rebuilds_per_size():
    fu = sc.FourierUnit(4)
    safe = sc.SafeFourierUnit(fu)
    with torch.no_grad():
        for size in [(8, 9), (5, 3), (8, 9)]:
            x = torch.randn(1, 4, *size)
            torch.testing.assert_close(safe(x), fu(x), rtol=0, atol=1e-5)
            assert (safe.rfft.height, safe.rfft.width) == size
    assert not any("rfft" in k for k in safe.state_dict())  # bases are non-persistent


def _dyn_conv(k: int, dim: int = 8, kernels: int = 4, seed: int = 0) -> sc.DynamicKernelAggregation:
    torch.manual_seed(seed)
    m = sc.DynamicKernelAggregation(dim, kernel_size=k, groups=dim, num_kernels=kernels)
    with torch.no_grad():
        m.aggregation.bias.normal_(0, 0.1)
    return m.double().eval()


@HYP
@given(h=st.integers(1, 20), w=st.integers(1, 20), b=st.integers(1, 3), k=st.sampled_from([5, 7]))
def test_dynamic_conv_forms_match_train_form(h, w, b, k):
    m = _dyn_conv(k, seed=h + w)
    x = torch.randn(b, 8, h, w, dtype=torch.float64)
    with torch.no_grad():
        ref = m(x)
        tol = 1e-12 * (1 + float(ref.abs().max()))
        for form, block in (("runtime", safe_ops.RuntimeDepthwiseConv), ("constant", safe_ops.DepthwiseConvBank)):
            with safe_ops.dynamic_conv_form(form):
                safe = make_export_safe(m, "tflite")
            assert isinstance(safe, sc.SafeDynamicConv) and isinstance(safe.conv, block)
            torch.testing.assert_close(safe(x), ref, rtol=0, atol=tol)


def test_constant_bank_layout():
    m = _dyn_conv(5, dim=3, kernels=2)
    bank = safe_ops.DepthwiseConvBank(m.aggregation.weight, m.aggregation.bias, 2)
    w, bias = m.aggregation.weight, m.aggregation.bias
    for c in range(3):
        for k in range(2):  # output channel c*K + k holds kernel k of channel c
            assert torch.equal(bank.weight[c * 2 + k, 0], w[k, c, 0])
            assert bank.bias[c * 2 + k] == bias[k, c]
    assert bank.weight.is_contiguous() and bank.bias.is_contiguous()


def test_dynamic_conv_form_selection():
    assert safe_ops.dynamic_conv_form_for("onnx") == "runtime"
    assert safe_ops.dynamic_conv_form_for("tflite") == "runtime"
    with safe_ops.dynamic_conv_form("constant"):
        assert safe_ops.dynamic_conv_form_for("tflite") == "constant"
        assert safe_ops.dynamic_conv_form_for("onnx") == "constant"
    assert safe_ops.dynamic_conv_form_for("tflite") == "runtime"
    with pytest.raises(ValueError, match="unknown dynamic conv form"):
        with safe_ops.dynamic_conv_form("bogus"):
            pass


def test_kernel_attention_rewrite_has_no_adaptive_pool():
    m = _dyn_conv(5).attention
    safe = make_export_safe(m, "onnx")
    assert isinstance(safe, sc.SafeKernelAttention)
    assert not any(isinstance(s, nn.AdaptiveAvgPool2d) for s in safe.modules())
    x = torch.randn(3, 8, 5, 6, dtype=torch.float64)
    torch.testing.assert_close(safe(x), m(x), rtol=0, atol=1e-14)


def test_folds_drop_mean_shift_and_interleave():
    m = _small(scale=3, blocks=2).double()
    folded = apply_folds(m)
    assert not any(isinstance(s, (sc.MeanShift, sc.MixFFN)) for s in folded.modules())
    assert sum(isinstance(s, sc.MixFFNCat) for s in folded.modules()) == 2
    assert not any("mean" in k for k in folded.state_dict())
    drop = sum(p.numel() for p in m.parameters()) - sum(p.numel() for p in folded.parameters())
    assert drop == 24
    x = torch.rand(2, 3, 9, 7, dtype=torch.float64) * 255
    with torch.no_grad():
        ref = m(x)
        torch.testing.assert_close(folded(x), ref, rtol=0, atol=1e-12 * float(ref.abs().max()))
    assert hasattr(m, "sub_mean")  # the input model is untouched


# ---------------------------------------------------------------------------- full deploy form


@pytest.mark.parametrize("form", ["runtime", "constant"])
def test_deploy_matches_train_fp32(models, form):
    """Full x4 model, noise and a real photograph in [0, 255]: max-abs <= 1e-5 of the range."""
    m = models[4]
    if form == "runtime":
        dep = edgesr.deploy(m, "tflite")  # the public path (fold report probe included)
    else:
        dep = _deploy_quick(m, "tflite", "constant")
    assert sum(isinstance(s, sc.SafeFourierUnit) for s in dep.modules()) == 8
    with torch.no_grad():
        for x in (noise_image(16, 21, seed=3) * 255, real_image(19, 14) * 255):
            ref = m(x)
            err = float((dep(x) - ref).abs().max())
            assert err <= 1e-5 * 255, err


@pytest.mark.parametrize("size", [(1, 1), (1, 3), (2, 2), (9, 10)])
def test_deploy_matches_train_fp64(size):
    m = _small(scale=3, blocks=2).double()
    dep = _deploy_quick(m, "onnx").double()
    x = torch.rand(2, 3, *size, dtype=torch.float64) * 255
    with torch.no_grad():
        ref = m(x)
        torch.testing.assert_close(dep(x), ref, rtol=0, atol=1e-12 * float(ref.abs().max()))


# ---------------------------------------------------------------------------- torch.export


_BAD = ("fft", "complex", "view_as", "adaptive", "index_put", "autograd", "cos", "sin", "arange")


def _graph(model: nn.Module, x: torch.Tensor):
    ep = torch.export.export(model, (x,), strict=True)
    kinds = {s.arg.name: s.kind.name for s in ep.graph_signature.input_specs}
    calls = [n for n in ep.graph.nodes if n.op == "call_function"]
    return ep, kinds, calls


def _check_ops(calls) -> set[str]:
    ops = {str(n.target) for n in calls}
    for op in ops:
        base = op.split(".")[1] if op.startswith("aten.") else op
        assert not any(b in base for b in _BAD), op
        assert not base.endswith("_"), f"in-place op {op}"
    assert "aten.matmul.default" in ops  # the DFT
    return ops


def _conv_weight_kinds(kinds, calls) -> list[str]:
    out = []
    for n in calls:
        if str(n.target) == "aten.conv2d.default":
            w = n.args[1]
            out.append(kinds.get(w.name, "COMPUTED") if w.op == "placeholder" else "COMPUTED")
    return out


def test_export_runtime_form_cold_bases():
    """No eager call before export: DFT bases are built outside the graph -> constants."""
    m = _small(scale=2, blocks=1)
    dep = _deploy_quick(m, "onnx", "runtime")
    x = noise_image(12, 15) * 255
    ep, kinds, calls = _graph(dep, x)
    _check_ops(calls)
    assert "CONSTANT_TENSOR" in kinds.values()
    w_kinds = _conv_weight_kinds(kinds, calls)
    assert w_kinds.count("COMPUTED") == 2  # the two dynamic depthwise convs of the block
    assert all(k == "PARAMETER" for k in w_kinds if k != "COMPUTED")
    with torch.no_grad():
        ref = m(x)
        assert float((ep.module()(x) - ref).abs().max()) <= 1e-5 * 255


def test_export_constant_form_every_filter_is_constant():
    m = _small(scale=2, blocks=1)
    dep = _deploy_quick(m, "tflite", "constant")
    x = real_image(12, 15) * 255
    with torch.no_grad():
        ref = m(x)
        dep(x)  # eager call at the export size: the bases become ordinary buffers
    ep, kinds, calls = _graph(dep, x)
    ops = _check_ops(calls)
    assert "CONSTANT_TENSOR" not in kinds.values() and "BUFFER" in kinds.values()
    w_kinds = _conv_weight_kinds(kinds, calls)
    assert len(w_kinds) == 11 and set(w_kinds) == {"PARAMETER"}, w_kinds
    for n in calls:  # linear layers (kernel attention) have constant weights too
        if str(n.target) == "aten.linear.default":
            assert kinds.get(n.args[1].name) == "PARAMETER"
    assert "aten.sum.dim_IntList" in ops
    with torch.no_grad():
        assert float((ep.module()(x) - ref).abs().max()) <= 1e-5 * 255
