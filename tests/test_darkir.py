"""DarkIR: official keys/params, train-form fidelity, exact folds and rewrites, export capture."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from conftest import noise_image, real_image
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import edgesr
from edgesr.errors import CheckpointError, UnknownModelError
from edgesr.models import darkir as D
from edgesr.models import get_spec
from edgesr.models.checkpoint import save_state_dict
from edgesr.reparam.rules import apply_folds
from edgesr.reparam.safe_ops import ChannelLayerNorm, ChannelNormShift
from edgesr.stats import count_params

HYP = settings(deadline=None, max_examples=8)


def randomise_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Realistic gamma/beta and LayerNorm affines (official init g=1, b=0, beta=gamma=0 would
    make every block the identity and hide fold errors)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("gamma", "beta")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif ".norm" in name and name.endswith("weight"):
                sign = torch.where(torch.rand(p.shape, generator=g) < 0.2, -1.0, 1.0)
                p.copy_((torch.rand(p.shape, generator=g) * 1.2 + 0.3) * sign)
            elif ".norm" in name and name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def small_darkir(width: int = 8) -> D.DarkIR:
    """Same block types and wiring as DarkIR-m, fewer blocks: for the slow (export) tests."""
    return D.DarkIR(width=width, enc_blk_nums=[1, 1, 1], dec_blk_nums=[1, 1, 1],
                    middle_blk_num_enc=1, middle_blk_num_dec=1).eval()


def deploy64(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """fp64 train form and its deploy form with the folds computed in fp64."""
    m64 = model.double()
    return m64, edgesr.make_export_safe(apply_folds(m64)).eval()


@pytest.fixture(scope="module")
def model_m():
    torch.manual_seed(0)
    return randomise_(get_spec("darkir").build("m")).eval()


@pytest.fixture(scope="module")
def deployed_m(model_m):
    # == edgesr.deploy(model_m) without its probe report (two extra forwards + MAC count)
    return edgesr.make_export_safe(apply_folds(model_m)).eval()


# ----------------------------------------------------------------------------------
# Keys / params, written from the spec's key list (independent of the module code)
# ----------------------------------------------------------------------------------


def spec_keys(w: int) -> dict[str, tuple[int, ...]]:
    k: dict[str, tuple[int, ...]] = {
        "intro.weight": (w, 3, 3, 3), "intro.bias": (w,),
        "ending.weight": (3, w, 3, 3), "ending.bias": (3,),
        "side_out.weight": (3, 8 * w, 3, 3), "side_out.bias": (3,),
    }

    def common(p, c):
        k.update({p + "gamma": (1, c, 1, 1), p + "beta": (1, c, 1, 1),
                  p + "conv1.weight": (2 * c, c, 1, 1), p + "conv1.bias": (2 * c,),
                  p + "sca.1.weight": (c, c, 1, 1), p + "sca.1.bias": (c,),
                  p + "conv3.weight": (c, c, 1, 1), p + "conv3.bias": (c,)})
        for n in ("norm1", "norm2"):
            k.update({f"{p}{n}.weight": (c,), f"{p}{n}.bias": (c,)})

    def eblock(p, c):
        common(p, c)
        k.update({p + "extra_conv.weight": (c, 1, 3, 3), p + "extra_conv.bias": (c,),
                  p + "branches.0.branch.0.weight": (2 * c, 1, 3, 3), p + "branches.0.branch.0.bias": (2 * c,),
                  p + "freq.process1.0.weight": (2 * c, c, 1, 1), p + "freq.process1.0.bias": (2 * c,),
                  p + "freq.process1.2.weight": (c, 2 * c, 1, 1), p + "freq.process1.2.bias": (c,)})

    def dblock(p, c):
        common(p, c)
        k.update({p + "extra_conv.weight": (2 * c, 2, 3, 3), p + "extra_conv.bias": (2 * c,),
                  p + "conv4.weight": (2 * c, c, 1, 1), p + "conv4.bias": (2 * c,),
                  p + "conv5.weight": (c, c, 1, 1), p + "conv5.bias": (c,)})
        for b in range(3):
            k.update({f"{p}branches.{b}.branch.0.weight": (2 * c, 1, 3, 3), f"{p}branches.{b}.branch.0.bias": (2 * c,)})

    for i, n in enumerate((1, 2, 3)):
        c = w * 2**i
        for j in range(n):
            eblock(f"encoders.{i}.modules_list.{j}.", c)
        k.update({f"downs.{i}.weight": (2 * c, c, 2, 2), f"downs.{i}.bias": (2 * c,)})
    for j in range(2):
        eblock(f"middle_blks_enc.modules_list.{j}.", 8 * w)
        dblock(f"middle_blks_dec.modules_list.{j}.", 8 * w)
    for i, n in enumerate((3, 1, 1)):
        cin = 8 * w // 2**i
        k[f"ups.{i}.0.weight"] = (2 * cin, cin, 1, 1)
        for j in range(n):
            dblock(f"decoders.{i}.modules_list.{j}.", cin // 2)
    return k


@pytest.mark.parametrize("variant,width,params", [("m", 32, 3_321_638), ("l", 64, 12_957_254)])
def test_keys_shapes_params(variant, width, params):
    model = get_spec("darkir").build(variant)
    sd = model.state_dict()
    assert len(sd) == 343
    assert {k: tuple(v.shape) for k, v in sd.items()} == spec_keys(width)
    assert count_params(model) == params
    assert sum(v.numel() for k, v in sd.items() if not k.startswith("side_out")) == params - (3 * 8 * width * 9 + 3)
    assert D._detect(sd) == (variant, 1)
    if variant == "l":  # -l: keys/shapes, plus one tiny forward
        with torch.no_grad():
            assert model.eval()(torch.rand(1, 3, 9, 6)).shape == (1, 3, 9, 6)


def test_spec_contract():
    spec = get_spec("darkir")
    assert [v.name for v in spec.variants] == ["m", "l"] and spec.default_variant == "m"
    assert all(v.scales == (1,) for v in spec.variants)
    assert spec.input_range == 1.0 and spec.dynamic_shapes is False
    assert spec.size_rule.multiple_of == 1 and spec.size_rule.min_size == 1
    with pytest.raises(UnknownModelError):
        spec.build("m", 2)


def test_detect_rejects_foreign():
    sd = get_spec("darkir").build("m").state_dict()
    assert D._detect({"conv.weight": torch.zeros(3, 3, 3, 3)}) is None
    assert D._detect({k: v for k, v in sd.items() if not k.startswith("ups.")}) is None
    odd = dict(sd, **{"intro.weight": torch.zeros(48, 3, 3, 3)})
    assert D._detect(odd) is None  # width 48 is neither m nor l (and mismatched)


def test_load_roundtrip(model_m, tmp_path):
    sd = model_m.state_dict()
    x = noise_image(13, 21)
    with torch.no_grad():
        ref = model_m(x)
        m1 = edgesr.load_model(sd)
        assert m1.edgesr_info["variant"] == "m" and m1.edgesr_info["scale"] == 1
        assert torch.equal(m1(x), ref)
        path = tmp_path / "DarkIR_384.pt"
        torch.save({"params": sd}, path)  # the official wrapper
        m2, report = edgesr.load_model(path, return_report=True)
        assert report.wrapper == "params" and report.stripped_prefix is None
        assert torch.equal(m2(x), ref)
        st_path = tmp_path / "darkir.safetensors"
        save_state_dict(sd, st_path)
        assert torch.equal(edgesr.load_model(st_path, name="darkir", variant="m")(x), ref)
    with pytest.raises(CheckpointError, match="missing"):
        edgesr.load_model({k: v for k, v in sd.items() if not k.startswith("side_out")})


# ----------------------------------------------------------------------------------
# Train-form fidelity: an independent functional reference from the spec bullets
# ----------------------------------------------------------------------------------


def _ln(x, sd, p):
    u = x.mean(1, keepdim=True)
    v = ((x - u) ** 2).mean(1, keepdim=True)
    return sd[p + "weight"][:, None, None] * ((x - u) / torch.sqrt(v + 1e-6)) + sd[p + "bias"][:, None, None]


def _c(x, sd, p, **kw):
    return F.conv2d(x, sd[p + "weight"], sd.get(p + "bias"), **kw)


def _gate_sca(z, sd, p):
    a, b = z.chunk(2, 1)
    z = a * b
    return _c(z.mean((2, 3), keepdim=True), sd, p + "sca.1.") * z


def _fremlp(x, sd, p):
    h, w = x.shape[-2:]
    X = torch.fft.rfft2(x)
    mag = _c(F.leaky_relu(_c(X.abs(), sd, p + "process1.0."), 0.1), sd, p + "process1.2.")
    return torch.fft.irfft2(torch.polar(torch.ones_like(mag), X.angle()) * mag, s=(h, w))


def _eblock(x, sd, p):
    c = x.shape[1]
    t = _c(_c(_ln(x, sd, p + "norm1."), sd, p + "extra_conv.", padding=1, groups=c), sd, p + "conv1.")
    z = _c(t, sd, p + "branches.0.branch.0.", padding=1, groups=2 * c)
    y = x + sd[p + "beta"] * _c(_gate_sca(z, sd, p), sd, p + "conv3.")
    return y + sd[p + "gamma"] * (y * _fremlp(_ln(y, sd, p + "norm2."), sd, p + "freq."))


def _dblock(x, sd, p):
    c = x.shape[1]
    t = _c(_c(_ln(x, sd, p + "norm1."), sd, p + "conv1."), sd, p + "extra_conv.", padding=1, groups=c)
    z = sum(_c(t, sd, f"{p}branches.{i}.branch.0.", padding=d, dilation=d, groups=2 * c)
            for i, d in enumerate((1, 4, 9)))
    y = x + sd[p + "beta"] * _c(_gate_sca(z, sd, p), sd, p + "conv3.")
    a, b = _c(_ln(y, sd, p + "norm2."), sd, p + "conv4.").chunk(2, 1)
    return y + sd[p + "gamma"] * _c(a * b, sd, p + "conv5.")


def ref_darkir(sd, x):
    h, w = x.shape[-2:]
    x = F.pad(x, (0, -w % 8, 0, -h % 8))
    f = _c(x, sd, "intro.", padding=1)
    skips = []
    for i, n in enumerate((1, 2, 3)):
        for j in range(n):
            f = _eblock(f, sd, f"encoders.{i}.modules_list.{j}.")
        skips.append(f)
        f = _c(f, sd, f"downs.{i}.", stride=2)
    for j in range(2):
        f = _eblock(f, sd, f"middle_blks_enc.modules_list.{j}.")
    light = f
    for j in range(2):
        f = _dblock(f, sd, f"middle_blks_dec.modules_list.{j}.")
    f = f + light
    for i, n in enumerate((3, 1, 1)):
        f = F.pixel_shuffle(_c(f, sd, f"ups.{i}.0."), 2) + skips[2 - i]
        for j in range(n):
            f = _dblock(f, sd, f"decoders.{i}.modules_list.{j}.")
    return (_c(f, sd, "ending.", padding=1) + x)[:, :, :h, :w]


@pytest.mark.parametrize("size", [(17, 23), (41, 37)])
def test_train_form_matches_reference(model_m, size):
    x = real_image(*size) if size[0] % 2 else noise_image(*size)
    sd = {k: v.detach() for k, v in model_m.state_dict().items()}
    with torch.no_grad():
        y = model_m(x)
        ref = ref_darkir(sd, x)
    assert y.shape == x.shape
    assert torch.isfinite(y).all()
    assert (y - x).abs().max() > 0.05  # the random blocks really do something
    assert (y - ref).abs().max() <= 1e-5 * max(1.0, float(ref.abs().max()))


def test_pad_and_crop_are_the_models(model_m):
    """Non-multiple-of-8 input == the zero-padded input's output, cropped (bit-exact)."""
    x = real_image(19, 13, "chelsea")
    with torch.no_grad():
        y = model_m(x)
        yp = model_m(F.pad(x, (0, 3, 0, 5)))[:, :, :19, :13]
    assert torch.equal(y, yp)


def test_side_out_only_with_side_loss(model_m):
    x = noise_image(16, 8)
    with torch.no_grad():
        side, out = model_m(x, side_loss=True)
        assert side.shape == (1, 3, 2, 1)
        assert torch.equal(out, model_m(x))


def test_block_op_order():
    """EBlock: depthwise extra_conv then conv1; DBlock: conv1 then the grouped extra_conv."""
    for block in (D.EBlock(4), D.DBlock(4)):
        order = []
        block.extra_conv.register_forward_hook(lambda *a: order.append("extra"))
        block.conv1.register_forward_hook(lambda *a: order.append("conv1"))
        block(torch.rand(1, 4, 6, 5))
        assert order == (["extra", "conv1"] if isinstance(block, D.EBlock) else ["conv1", "extra"])
    assert D.DBlock(4).extra_conv.weight.shape == (8, 2, 3, 3)


def test_layernorm_function_forward_and_backward():
    ln = D.LayerNorm2d(5)
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    ln = ln.double()
    x = torch.randn(2, 5, 4, 3, dtype=torch.float64, requires_grad=True)
    ref = F.layer_norm(x.permute(0, 2, 3, 1), (5,), ln.weight, ln.bias, 1e-6).permute(0, 3, 1, 2)
    assert torch.allclose(ln(x), ref, atol=1e-12)
    w = ln.weight.detach().requires_grad_()
    b = ln.bias.detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w, b: D.LayerNormFunction.apply(x, w, b, 1e-6), (x, w, b))


# ----------------------------------------------------------------------------------
# Export-safe rewrites, each against the original
# ----------------------------------------------------------------------------------


def _fremlp_pair(c: int, seed: int = 0) -> tuple[D.FreMLP, D.SafeFreMLP]:
    torch.manual_seed(seed)
    m = D.FreMLP(c).double().eval()
    return m, edgesr.make_export_safe(m)


@pytest.mark.parametrize("size", [(5, 3), (3, 5), (1, 1), (2, 2), (1, 6), (7, 9), (16, 12), (10, 15)])
def test_safe_fremlp_fp64(size):
    m, s = _fremlp_pair(4)
    assert isinstance(s, D.SafeFreMLP)
    x = torch.randn(2, 4, *size, dtype=torch.float64)
    with torch.no_grad():
        ref, out = m(x), s(x)
    assert (ref - out).abs().max() <= 1e-12 * max(1.0, float(ref.abs().max()))


@HYP
@given(c=st.integers(1, 6), h=st.integers(1, 20), w=st.integers(1, 20), seed=st.integers(0, 99))
def test_safe_fremlp_hypothesis(c, h, w, seed):
    m, s = _fremlp_pair(c, seed)
    x = torch.randn(1, c, h, w, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref, out = m(x), s(x)
    assert (ref - out).abs().max() <= 1e-11 * max(1.0, float(ref.abs().max()))


def test_safe_fremlp_fp32_and_shared_bases():
    torch.manual_seed(1)
    m = D.FreMLP(8).eval()
    s = edgesr.make_export_safe(m)
    assert not list(s.buffers())  # no size-dependent state in the module
    for size in ((11, 7), (24, 16)):
        x = torch.randn(1, 8, *size)
        with torch.no_grad():
            ref, out = m(x), s(x)
        assert (ref - out).abs().max() <= 1e-5 * max(1.0, float(ref.abs().max()))
    cpu = torch.device("cpu")
    f32 = D.dft_bases(11, 7, torch.float32, cpu)
    assert f32 is D.dft_bases(11, 7, torch.float32, cpu)  # shared by every FreMLP of a level
    f64 = D.dft_bases(11, 7, torch.float64, cpu)  # fp64 bases are built in fp64, not cast
    assert all(b.dtype == torch.float64 for b in f64.buffers())
    assert all(b.dtype == torch.float32 for b in f32.buffers())


@pytest.mark.parametrize("target", ["onnx", "tflite"])
def test_safe_fremlp_zero_bins_take_phase_zero(target):
    """Exactly-zero bins (zero input: every bin) get phase 0 like torch's angle(+0+0i), so
    the MLP's bias output comes back as a real spectrum; the result is finite and equals
    the torch.fft original, for both targets' DFT pairs.  (Bins that are zero in one FFT
    and rounding noise in the other have no defined phase, so only all-zero input is
    compared.)"""
    torch.manual_seed(3)
    m = D.FreMLP(4).eval()
    with torch.no_grad():
        m.process1[2].bias.uniform_(0.5, 1.0)  # nonzero output magnitude at zero bins
    s = edgesr.make_export_safe(m, target)
    x = torch.zeros(1, 4, 70, 66)
    with torch.no_grad():
        ref, out = m(x), s(x)
    assert torch.isfinite(out).all()
    assert (ref - out).abs().max() <= 1e-5 * max(1.0, float(ref.abs().max()))
    assert float(ref.abs().max()) > 1e-3  # the zero-bin rule matters here


def test_safe_fremlp_nonstrict_export_constants():
    """Non-strict capture (the ONNX / litert-torch path) at sizes never run eagerly, two
    levels in one graph, then the decomposition the ONNX exporter runs."""
    torch.manual_seed(2)

    class TwoLevels(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = edgesr.make_export_safe(D.FreMLP(3))
            self.b = edgesr.make_export_safe(D.FreMLP(3))

        def forward(self, x):
            return self.b(self.a(x)[:, :, ::2, ::2])

    m = TwoLevels().eval()
    x = torch.randn(1, 3, 26, 14)  # 26x14 and 13x7: sizes no other test uses (cold cache)
    ep = torch.export.export(m, (x,), strict=False)
    ops = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    banned = ("cos", "sin", "arange", "remainder", "fft", "complex", "grad")
    assert not [o for o in ops if any(b in o for b in banned)], ops
    cpu = torch.device("cpu")
    n_bases = sum(len(list(D.dft_bases(h, w, torch.float32, cpu).buffers())) for h, w in ((26, 14), (13, 7)))
    assert len(ep.constants) == n_bases  # the bases of both sizes, lifted as constants
    ep = ep.run_decompositions()
    with torch.no_grad():
        ref = m(x)
        assert (ep.module()(x) - ref).abs().max() <= 1e-5 * max(1.0, float(ref.abs().max()))


def test_layernorm_rewrite_bit_exact_for_tflite_rounding_level_for_onnx():
    """The plain-ops LayerNorm is bit-identical to the autograd Function (TFLite target);
    for onnxruntime its channel means are 1x1 convs (MATMUL_MEAN_TARGETS), equal to
    rounding level, with the same state_dict."""
    ln = D.LayerNorm2d(6)
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    x = torch.randn(2, 6, 7, 5)
    for target in ("tflite", "onnx"):
        safe = edgesr.make_export_safe(ln, target)
        assert isinstance(safe, ChannelLayerNorm)
        assert safe.state_dict().keys() == ln.state_dict().keys()
        with torch.no_grad():
            ref, out = ln(x), safe(x)
        if target == "tflite":
            assert not safe.mean_as_matmul and torch.equal(ref, out)
        else:
            assert safe.mean_as_matmul and (ref - out).abs().max() <= 1e-5 * float(ref.abs().max())


def test_rewrite_without_fold_removes_adaptive_pool():
    torch.manual_seed(0)
    b = randomise_(D.DBlock(4)).double().eval()
    safe = edgesr.make_export_safe(b)
    assert not any(isinstance(m, nn.AdaptiveAvgPool2d) for m in safe.modules())
    x = torch.randn(1, 4, 9, 7, dtype=torch.float64)
    with torch.no_grad():
        assert (b(x) - safe(x)).abs().max() <= 1e-12


# ----------------------------------------------------------------------------------
# Folds, exact in fp64
# ----------------------------------------------------------------------------------


@HYP
@given(c=st.integers(1, 6), h=st.integers(1, 23), w=st.integers(1, 23), seed=st.integers(0, 99))
def test_dblock_fold_fp64(c, h, w, seed):
    torch.manual_seed(seed)
    blk = randomise_(D.DBlock(c), seed).double().eval()
    folded = apply_folds(blk).eval()
    assert isinstance(folded, D.DBlockDeploy)
    # the grouped conv is gone: every conv is dense or depthwise
    for m in folded.modules():
        if isinstance(m, nn.Conv2d):
            assert m.groups == 1 or m.groups == m.in_channels  # dense or depthwise (multiplier 1 or 2)
    x = torch.randn(1, c, h, w, dtype=torch.float64)
    with torch.no_grad():
        ref, out = blk(x), folded(x)
    assert (ref - out).abs().max() <= 1e-12 * max(1.0, float(ref.abs().max()))


@HYP
@given(c=st.integers(1, 6), h=st.integers(1, 17), w=st.integers(1, 17), seed=st.integers(0, 99))
def test_eblock_fold_fp64(c, h, w, seed):
    torch.manual_seed(seed)
    blk = randomise_(D.EBlock(c), seed).double().eval()
    folded = apply_folds(blk).eval()
    assert isinstance(folded, D.EBlockDeploy)
    assert isinstance(folded.norm1, ChannelNormShift)  # gamma folded into extra_conv
    deploy = edgesr.make_export_safe(folded)
    x = torch.randn(1, c, h, w, dtype=torch.float64)
    with torch.no_grad():
        ref = blk(x)
        for out in (folded(x), deploy(x)):
            assert (ref - out).abs().max() <= 1e-12 * max(1.0, float(ref.abs().max()))


@pytest.mark.parametrize("scale", [0.0, 1e-5])
def test_eblock_fold_with_tiny_norm_scale_keeps_affine(scale):
    torch.manual_seed(3)
    blk = randomise_(D.EBlock(5), 3).double().eval()
    with torch.no_grad():
        blk.norm1.weight[2] = scale
        blk.norm1.bias[2] = 0.5
    folded = apply_folds(blk).eval()
    assert isinstance(folded.norm1, D.LayerNorm2d)  # b/g shift impossible or huge: not folded
    x = torch.randn(1, 5, 9, 10, dtype=torch.float64)
    with torch.no_grad():
        assert (blk(x) - folded(x)).abs().max() <= 1e-12


def test_rejected_fold_is_really_inexact():
    """Why EBlock norm1's beta stays an add: folding it into the padded dw conv's bias is wrong."""
    torch.manual_seed(0)
    c = 3
    conv = nn.Conv2d(c, c, 3, padding=1, groups=c).double()
    g, b = torch.rand(c, dtype=torch.float64) + 0.5, torch.randn(c, dtype=torch.float64)
    n = torch.randn(1, c, 6, 7, dtype=torch.float64)
    ref = conv(g[:, None, None] * n + b[:, None, None])
    w2 = conv.weight * g[:, None, None, None]
    naive = F.conv2d(n, w2, conv.bias + conv.weight.sum((1, 2, 3)) * b, padding=1, groups=c)
    shift = F.conv2d(n + (b / g)[:, None, None], w2, conv.bias, padding=1, groups=c)
    assert (ref - naive).abs().max() > 1e-2  # the border sees the padded zeros
    assert (ref - shift).abs().max() <= 1e-12


@pytest.mark.parametrize("size", [(5, 3), (24, 17)])
def test_full_fold_fp64_and_cleanup(size):
    # fp64 depthwise/grouped convs run one slow kernel per channel, so the fp64 check uses
    # the narrow model (same block types and wiring); DarkIR-m is checked in fp32 below.
    m64, d64 = deploy64(randomise_(small_darkir(width=6), seed=5))
    sd = d64.state_dict()
    assert not any(k.startswith("side_out") for k in sd)
    kinds = {type(m) for m in d64.modules()}
    assert not kinds & {D.EBlock, D.DBlock, D.FreMLP, D.LayerNorm2d, nn.AdaptiveAvgPool2d}
    x = noise_image(*size, seed=size[0], dtype=torch.float64)
    with torch.no_grad():
        ref, out = m64(x), d64(x)
    assert (ref - out).abs().max() <= 1e-12


# ----------------------------------------------------------------------------------
# Deploy form: parity in fp32, export capture
# ----------------------------------------------------------------------------------


@pytest.mark.parametrize("size,image",
                         [((17, 23), None), ((41, 37), "astronaut"), ((32, 40), "coffee"), ((8, 8), None)])
def test_deploy_parity_fp32(model_m, deployed_m, size, image):
    x = noise_image(*size, seed=1) if image is None else real_image(*size, image)
    with torch.no_grad():
        ref, out = model_m(x), deployed_m(x)
    assert (ref - out).abs().max() <= 1e-5


def test_export_strict_clean_graph():
    torch.manual_seed(0)
    model = randomise_(small_darkir())
    deployed = edgesr.deploy(model)
    x = real_image(20, 13, "rocket")  # a size never run eagerly: bases built outside the trace
    ep = torch.export.export(deployed, (x,), strict=True)
    ops = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    banned = ("fft", "complex", "atan2", "angle", "abs", "cos", "sin", "arange", "adaptive", "polar", "real", "imag")
    assert not [o for o in ops if any(b in o for b in banned)], ops
    assert not [n for n in ep.graph.nodes if n.op == "call_function" and "higher_order" in str(n.target)]
    assert "aten.matmul.default" in ops  # the DFT
    first = next(n for n in ep.graph.nodes if n.op == "call_function")
    assert str(first.target) == "aten.pad.default"  # 20x13 -> 24x16, right/bottom
    assert list(first.args[1]) == [0, 3, 0, 4]
    with torch.no_grad():
        assert (ep.module()(x) - model(x)).abs().max() <= 1e-5


def test_no_pad_op_at_multiples_of_8(monkeypatch):
    calls = []
    pad = F.pad

    def counting_pad(x, p, *a, **k):
        calls.append(tuple(p))
        return pad(x, p, *a, **k)

    monkeypatch.setattr(torch.nn.functional, "pad", counting_pad)
    model = small_darkir()
    with torch.no_grad():
        model(noise_image(16, 24))
        assert calls == []
        model(noise_image(17, 24))
        assert calls == [(0, 0, 0, 7)]


def test_deploy_rejects_side_loss(deployed_m):
    with pytest.raises(ValueError, match="side_out"):
        deployed_m(noise_image(8, 8), side_loss=True)
