"""PlainUSR: released Rep layout, train-time form, exact folds, stable SoftPool, export-safe deploy form."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import edgesr
from conftest import noise_image, real_image
from edgesr.models.checkpoint import load_model
from edgesr.models.plainusr import ASR, PConv, PlainBlock, RepMBConv, SoftPool2d, _block
from edgesr.models.registry import get_spec
from edgesr.reparam.rules import apply_folds
from edgesr.reparam.safe_ops import WindowSoftPool2d
from edgesr.stats import count_params

NAMES = ("u", "t", "s", "m", "base", "l")
ULTRA = ("u", "t")
FORBIDDEN = ("copy_", "index_put", "slice_scatter", "select_scatter", "adaptive", "fft", "as_strided")

# spec §3.1 (read from the released *_Rep_* files): deploy params x2 / x4
REP_PARAMS = {"u": (13_628, 19_820), "t": (48_724, 60_100), "s": (57_236, 68_612),
              "m": (148_932, 165_492), "base": (311_364, 333_108), "l": (707_076, 734_004)}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Generic train-time weights: the official init makes ASR ~1 and PConv a plain mean."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, ASR):
                m.tensor.copy_(torch.randn(m.tensor.shape, generator=g))
                for lin in (m.se[1], m.se[3]):
                    lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) / lin.weight.shape[1] ** 0.5)
            elif isinstance(m, PConv):
                n = m.conv.weight.shape[1]
                m.conv.weight.copy_(torch.randn(m.conv.weight.shape, generator=g) / n**0.5)
                m.conv.bias.copy_(0.1 * torch.randn(1, generator=g))
            elif isinstance(m, RepMBConv):
                for c in (m.expand_conv, m.fea_conv, m.reduce_conv):
                    c.bias.add_(0.1 * torch.randn(c.bias.shape, generator=g))
    return model


# --- an independent functional reference of the official Rep forward --------------------------

def _official_lia(sd, p, x):
    y = F.conv2d(x, sd[f"{p}.body.0.weight"], sd[f"{p}.body.0.bias"])
    e = torch.exp(y)
    y = F.avg_pool2d(e * y, 7, 3, 0, count_include_pad=False) / F.avg_pool2d(e, 7, 3, 0, count_include_pad=False)
    y = F.conv2d(y, sd[f"{p}.body.2.weight"], sd[f"{p}.body.2.bias"], stride=2, padding=1)
    y = torch.sigmoid(F.conv2d(y, sd[f"{p}.body.3.weight"], sd[f"{p}.body.3.bias"], padding=1))
    w = F.interpolate(y, (x.shape[2], x.shape[3]), mode="bilinear", align_corners=False)
    return x * w * torch.sigmoid(x[:, :1])


def official_rep(sd, x, im_feat, kind):
    """PlainUSR_*_inference.fast_forward from a state dict (in-place prefix writes)."""
    def block(name, t):
        n_conv = 3 if kind == "large" else 2
        for i in range(n_conv):
            if i:
                t = F.leaky_relu(t, 0.05)
            t = F.conv2d(t, sd[f"{name}.body.{2 * i}.weight"], sd[f"{name}.body.{2 * i}.bias"], padding=1)
        k = 2 * n_conv - 1
        if kind == "ultra" and name != "blockm":
            return t
        if kind == "ultra":
            w = torch.sigmoid(F.conv2d(t, sd[f"{name}.body.{k}.body.0.weight"], sd[f"{name}.body.{k}.body.0.bias"],
                                       padding=1))
            return t * torch.sigmoid(t[:, :1]) * w
        return _official_lia(sd, f"{name}.body.{k}", t)

    x = F.conv2d(x, sd["head.weight"], sd["head.bias"], padding=1)
    if kind == "ultra":
        order = [("block1", im_feat[0]), ("blockm", im_feat[1]), ("block2", im_feat[0])]
    else:
        order = [("block1", im_feat[0]), ("block2", im_feat[1]), ("blockm", im_feat[2]),
                 ("block3", im_feat[1]), ("block4", im_feat[0])]
    for name, c in order:
        x[:, :c] = block(name, x[:, :c])
    y = F.conv2d(x, sd["tail.0.weight"], sd["tail.0.bias"], padding=1)
    return F.pixel_shuffle(y, int(round((sd["tail.0.weight"].shape[0] // 3) ** 0.5)))


# --- structure ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_every_variant_form_and_scale(name):
    spec = get_spec("plainusr")
    sizes = [(1, 1), (3, 5), (7, 7), (12, 9)] if name in ULTRA else [(7, 7), (14, 11)]
    for scale in (2, 4):
        rep = spec.build(name, scale).eval()
        train = randomize_(spec.build(f"{name}-train", scale).eval(), seed=scale)
        # parameter counts: released Rep files, and the fold of the train form
        assert count_params(rep) == REP_PARAMS[name][scale // 4]
        folded = apply_folds(train)
        assert count_params(folded) == REP_PARAMS[name][scale // 4]
        # detection, through the raw-dict layout of the released files and BasicSR params_ema
        assert spec.detect(rep.state_dict()) == (name, scale)
        assert spec.detect(train.state_dict()) == (f"{name}-train", scale)
        assert load_model(rep.state_dict()).edgesr_info["variant"] == name
        assert load_model({"params_ema": train.state_dict()}).edgesr_info["variant"] == f"{name}-train"
        # the folded train model's state dict *is* a Rep checkpoint of the same variant
        rep.load_state_dict(folded.state_dict(), strict=True)
        assert spec.detect(folded.state_dict()) == (name, scale)
        for h, w in sizes:
            x = real_image(h, w)
            with torch.no_grad():
                y_train, y_rep = train(x), rep(x)
            assert y_train.shape == y_rep.shape == (1, 3, h * scale, w * scale)
            assert rel(y_rep, y_train) <= 1e-5, (name, scale, h, w)


def test_rep_base_x4_layout_matches_released_file():
    sd = get_spec("plainusr").build("base", 4).state_dict()
    assert len(sd) == 54 and count_params(get_spec("plainusr").build("base", 4)) == 333_108
    blocks = [k.split(".")[0] for k in sd if k.startswith("block")]
    assert list(dict.fromkeys(blocks)) == ["block1", "block2", "blockm", "block3", "block4"]
    assert list(sd)[:2] == ["head.weight", "head.bias"] and list(sd)[-2:] == ["tail.0.weight", "tail.0.bias"]
    expect = {"head.weight": (67, 3, 3, 3), "block1.body.0.weight": (64, 64, 3, 3), "block1.body.2.weight": (64, 64, 3, 3),
              "block1.body.3.body.0.weight": (16, 64, 1, 1), "block1.body.3.body.2.weight": (16, 16, 3, 3),
              "block1.body.3.body.3.weight": (64, 16, 3, 3), "tail.0.weight": (48, 67, 3, 3),
              "block2.body.3.body.0.weight": (16, 48, 1, 1), "block3.body.3.body.3.weight": (48, 16, 3, 3),
              "blockm.body.0.weight": (32, 32, 3, 3), "block4.body.3.body.3.weight": (64, 16, 3, 3)}
    for k, shape in expect.items():
        assert tuple(sd[k].shape) == shape, k
    for k, v in sd.items():
        if k.endswith(".weight"):
            assert tuple(sd[k[:-6] + "bias"].shape) == (v.shape[0],)


def test_rep_ultra_and_large_layouts():
    spec = get_spec("plainusr")
    t = spec.build("t", 4).state_dict()
    assert len(t) == 18 and "block3.body.0.weight" not in t
    assert list(dict.fromkeys(k.split(".")[0] for k in t)) == ["head", "block1", "blockm", "block2", "tail"]
    assert tuple(t["blockm.body.3.body.0.weight"].shape) == (16, 16, 3, 3)
    large = spec.build("l", 2).state_dict()
    assert len(large) == 64
    assert tuple(large["block1.body.4.weight"].shape) == (80, 80, 3, 3)
    assert tuple(large["block1.body.5.body.0.weight"].shape) == (16, 80, 1, 1)
    assert tuple(large["tail.0.weight"].shape) == (12, 83, 3, 3)


def test_train_base_x4_layout():
    m = get_spec("plainusr").build("base-train", 4)
    sd = m.state_dict()
    assert len(sd) == 134 and count_params(m) == 1_248_825  # official PlainUSR_general, measured
    p = "block1.body.0"
    expect = {f"{p}.expand_conv.weight": (128, 64, 1, 1), f"{p}.expand_conv.bias": (128,),
              f"{p}.fea_conv.weight": (128, 128, 3, 3), f"{p}.reduce_conv.weight": (64, 128, 1, 1),
              f"{p}.se.tensor": (1, 128, 1, 1), f"{p}.se.se.1.weight": (32, 128), f"{p}.se.se.3.weight": (128, 32),
              "block1.body.2.reduce_conv.bias": (64,), "block1.body.3.conv.weight": (1, 64, 1, 1),
              "block1.body.3.conv.bias": (1,), "block1.body.4.body.0.weight": (16, 64, 1, 1),
              "block1.body.4.body.3.weight": (64, 16, 3, 3), "blockm.body.0.se.se.1.weight": (16, 64)}
    for k, shape in expect.items():
        assert tuple(sd[k].shape) == shape, k
    assert list(sd)[2:11] == [f"{p}.{n}" for n in ("expand_conv.weight", "expand_conv.bias", "fea_conv.weight",
                                                     "fea_conv.bias", "reduce_conv.weight", "reduce_conv.bias",
                                                     "se.tensor", "se.se.1.weight", "se.se.3.weight")]
    large = get_spec("plainusr").build("l-train", 4).state_dict()
    assert "block1.body.4.fea_conv.weight" in large and "block1.body.5.conv.weight" in large
    assert "block1.body.6.body.2.weight" in large
    ultra = get_spec("plainusr").build("u-train", 2).state_dict()
    assert "blockm.body.3.conv.weight" in ultra and "blockm.body.4.body.0.weight" in ultra
    assert "block1.body.3.conv.weight" not in ultra  # Blockv1: no PConv, no attention


def test_detect_rejects_foreign_dicts():
    detect = get_spec("plainusr").detect
    sd = get_spec("plainusr").build("base", 4).state_dict()
    assert detect(edgesr.create_model("span", 4, "ch28").state_dict()) is None
    assert detect({k: v for k, v in sd.items() if k != "tail.0.weight"}) is None
    assert detect(dict(sd, **{"head.weight": torch.zeros(70, 3, 3, 3)})) is None  # no such width
    # x3 was never released, but the official class expresses it: read off shapes (issue 15)
    assert detect(dict(sd, **{"tail.0.weight": torch.zeros(27, 67, 3, 3)})) == ("custom-general-n64-im64-48-32-f16", 3)
    assert detect({"head.weight": torch.zeros(3)}) is None


# --- fidelity to the official forward ------------------------------------------------------------

@pytest.mark.parametrize("name,scale,size", [("base", 4, (19, 23)), ("t", 2, (9, 11)), ("l", 2, (13, 10))])
def test_rep_matches_official_inplace_forward(name, scale, size):
    torch.manual_seed(7)
    m = get_spec("plainusr").build(name, scale).eval()
    cfg = get_spec("plainusr").variant(name).config
    x = real_image(*size, "chelsea")
    with torch.no_grad():
        ref = official_rep(m.state_dict(), x, cfg["im_feat"], cfg["kind"])
        assert torch.equal(m(x), ref)
        m.slice_write = "cat"
        assert torch.equal(m(x), ref)  # cat is the same computation, bit for bit


def test_inplace_form_still_trains():
    m = randomize_(get_spec("plainusr").build("s-train", 2)).train()
    x = noise_image(10, 9)
    m(x).square().mean().backward()  # an in-place prefix write would break this backward
    grads = [p.grad for p in m.parameters()]
    assert all(g is not None for g in grads)
    assert m.block1.body[0].se.tensor.grad.abs().sum() > 0 and m.blockm.body[3].conv.weight.grad.abs().sum() > 0


# --- fold exactness -------------------------------------------------------------------------------

def _random_mbconv(n, dtype, seed):
    torch.manual_seed(seed)
    m = randomize_(RepMBConv(n), seed).to(dtype)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 8), h=st.integers(1, 10), w=st.integers(1, 10), seed=st.integers(0, 10_000))
def test_repmbconv_fold_exact_fp64_including_borders(n, h, w, seed):
    m = _random_mbconv(n, torch.float64, seed)
    conv = apply_folds(m)
    assert type(conv) is nn.Conv2d and conv.padding == (1, 1)
    x = torch.randn(2, n, h, w, dtype=torch.float64)
    with torch.no_grad():
        ref = m(x)
        assert float((conv(x) - ref).abs().max()) <= 1e-12 * (1 + float(ref.abs().max()))


@settings(max_examples=15, deadline=None)
@given(n=st.integers(2, 12), h=st.integers(1, 9), w=st.integers(1, 9), seed=st.integers(0, 10_000))
def test_repmbconv_fold_fp32(n, h, w, seed):
    m = _random_mbconv(n, torch.float32, seed)
    x = torch.randn(1, n, h, w)
    with torch.no_grad():
        assert rel(apply_folds(m)(x), m(x)) <= 1e-5


@settings(max_examples=10, deadline=None)
@given(kind=st.sampled_from(["v2", "v3", "v4"]), n=st.integers(2, 10), h=st.integers(7, 16),
       w=st.integers(7, 16), seed=st.integers(0, 1000))
def test_block_fold_with_pconv_fp64(kind, n, h, w, seed):
    block = randomize_(_block(kind, n, 3, train=True), seed).double()
    folded = apply_folds(block)
    assert isinstance(folded, PlainBlock) and not any(isinstance(m, (PConv, RepMBConv)) for m in folded.modules())
    rep = _block(kind, n, 3, train=False).double()
    rep.load_state_dict(folded.state_dict(), strict=True)  # same keys as the Rep block
    x = torch.randn(1, n, h, w, dtype=torch.float64)
    with torch.no_grad():
        ref = block(x)
        assert rel(rep(x), ref) <= 1e-12


def test_whole_model_fold_fp64():
    train = randomize_(get_spec("plainusr").build("base-train", 4), 3).double().eval()
    rep = get_spec("plainusr").build("base", 4).double().eval()
    rep.load_state_dict(apply_folds(train).state_dict(), strict=True)
    x = real_image(17, 21, "coffee", dtype=torch.float64)
    with torch.no_grad():
        assert rel(rep(x), train(x)) <= 1e-12


# --- SoftPool ----------------------------------------------------------------------------------

def softpool_reference(x: torch.Tensor, k: int = 7, s: int = 3) -> torch.Tensor:
    """Window softmax via unfold in float64 (independent of both implementations)."""
    n, c, h, w = x.shape
    cols = F.unfold(x.double(), k, stride=s).view(n, c, k * k, -1)
    y = (torch.softmax(cols, 2) * cols).sum(2)
    return y.view(n, c, (h - k) // s + 1, (w - k) // s + 1)


@settings(max_examples=20, deadline=None)
@given(c=st.integers(1, 6), h=st.integers(7, 30), w=st.integers(7, 30), amp=st.sampled_from([0.1, 1.0, 8.0, 40.0]),
       seed=st.integers(0, 10_000))
def test_window_softpool_equals_original_fp64(c, h, w, amp, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, c, h, w, generator=g, dtype=torch.float64) * amp
    ref = SoftPool2d(7, 3, c)(x)
    out = WindowSoftPool2d(c, 7, 3).double()(x)
    assert out.shape == ref.shape
    assert float((out - ref).abs().max()) <= 1e-13 * (1 + float(x.abs().max()))


def test_window_softpool_is_finite_where_the_original_overflows():
    x = (torch.rand(1, 4, 23, 26) * 2 - 1) * 1e4
    x[:, :, :7, :7] = 1e4  # a whole window at the top of the range
    ref = softpool_reference(x)
    for dtype, tol in ((torch.float16, 2e-3), (torch.float32, 1e-6)):
        xs = x.to(dtype)
        out = WindowSoftPool2d(4, 7, 3).to(dtype)(xs)
        assert torch.isfinite(out).all(), dtype
        assert float((out.double() - ref).abs().max()) <= tol * 1e4, dtype
        assert not torch.isfinite(SoftPool2d(7, 3, 4)(xs)).all()  # the official form is inf/nan here
    small = torch.randn(1, 3, 15, 12) * 3
    assert float((WindowSoftPool2d(3, 7, 3).half()(small.half()).double() - softpool_reference(small)).abs().max()) < 1e-2


@settings(max_examples=20, deadline=None)
@given(c=st.integers(1, 5), h=st.integers(7, 40), w=st.integers(7, 40), amp=st.sampled_from([0.5, 4.0, 60.0]),
       seed=st.integers(0, 10_000))
def test_window_softpool_fp32_relative(c, h, w, amp, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, c, h, w, generator=g) * amp + float(torch.randn(1, generator=g)) * amp
    ref = softpool_reference(x)
    out = WindowSoftPool2d(c, 7, 3)(x)
    assert out.shape == ref.shape == (1, c, (h - 7) // 3 + 1, (w - 7) // 3 + 1)
    assert float((out.double() - ref).abs().max()) <= 1e-5 * float(x.abs().max())


def test_window_softpool_minimum_size_constants_and_real_image():
    # 7 px is one window; 8, 9 still one; 10 two (stride 3)
    for h, w, out_hw in ((7, 7, (1, 1)), (7, 9, (1, 1)), (10, 7, (2, 1)), (9, 16, (1, 4))):
        x = torch.randn(2, 3, h, w, dtype=torch.float64) * 5
        y = WindowSoftPool2d(3, 7, 3).double()(x)
        assert y.shape[2:] == out_hw and float((y - softpool_reference(x)).abs().max()) <= 1e-12
    # constant windows: softmax-weighted mean of equal values is the value itself, in every dtype
    for v in (0.0, -3.5, 1e4, -1e4):
        for dtype in (torch.float16, torch.float32, torch.float64):
            x = torch.full((1, 2, 13, 11), v, dtype=dtype)
            y = WindowSoftPool2d(2, 7, 3).to(dtype)(x)
            assert torch.equal(y, torch.full_like(y, v)), (v, dtype)
    img = real_image(31, 26, "coffee", dtype=torch.float64) * 12 - 6
    assert float((WindowSoftPool2d(3, 7, 3).double()(img) - SoftPool2d(7, 3, 3)(img)).abs().max()) <= 1e-12


def test_window_softpool_is_separable_and_cheap():
    """Two 7-tap passes: ~49 MACs per input pixel and channel, not the 49-tap window's ~267."""
    from edgesr.stats import count_macs

    c, h, w = 4, 64, 64
    macs = count_macs(WindowSoftPool2d(c, 7, 3), torch.randn(1, c, h, w))
    assert macs <= 60 * c * h * w, macs / (c * h * w)
    sp = WindowSoftPool2d(c, 7, 3)
    assert {tuple(b.shape) for b in sp.buffers()} == {(c * 7, 1, 1, 7), (c * 7, 1, 7, 1), (c * 7, 1, 1, 1), (c, 7, 1, 1)}


# --- deploy form ------------------------------------------------------------------------------

@pytest.mark.parametrize("name,scale,dyn_min", [("s-train", 4, 13), ("u-train", 2, 1)])
def test_deploy_exports_strict_without_forbidden_ops(name, scale, dyn_min):
    m = randomize_(get_spec("plainusr").build(name, scale).eval(), 1)
    deployed = edgesr.deploy(m)
    assert deployed.slice_write == "cat"
    assert not any(isinstance(x, (SoftPool2d, RepMBConv, PConv)) for x in deployed.modules())
    assert all(p.is_contiguous() for p in deployed.parameters())
    x = real_image(23, 29)
    # torch.export specialises sizes that can be 1: LIA's pooled maps are >= 2 px from 13 px on
    dims = {"x": {2: torch.export.Dim("h", min=dyn_min, max=1024), 3: torch.export.Dim("w", min=dyn_min, max=1024)}}
    ep = torch.export.export(deployed, (x,), strict=True, dynamic_shapes=dims)
    ops = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert not [o for o in ops if any(f in o for f in FORBIDDEN)], ops
    x2 = real_image(17, 14, "rocket")
    with torch.no_grad():
        assert torch.equal(ep.module()(x2), deployed(x2))


@pytest.mark.parametrize("name,scale", [("m-train", 4), ("l-train", 2)])
def test_deploy_matches_train_form_on_real_images(name, scale):
    m = randomize_(get_spec("plainusr").build(name, scale).eval(), 2)
    deployed = edgesr.deploy(m)
    for img, size in (("astronaut", (29, 33)), ("coffee", (7, 12))):
        x = real_image(*size, img)
        with torch.no_grad():
            ref, out = m(x), deployed(x)
        assert out.shape == ref.shape
        assert float((out - ref).abs().max()) <= 1e-5 * max(1.0, float(ref.abs().max()))


def test_dynamic_onnx_export_covers_sizes_below_the_trace_minimum(tmp_path):
    """SizeRule.dynamic_min_size: traced with Dim(min=13), the graph is generic down to 7 px."""
    import json

    import onnxruntime as ort

    from edgesr.errors import SizeRuleError
    from edgesr.export.onnx import export_onnx

    spec = get_spec("plainusr")
    assert spec.size_rule.min_size == 7 and spec.size_rule.dynamic_min_size == 13
    meta = {"size_rule": json.dumps(spec.size_rule.as_dict())}
    torch.manual_seed(3)
    deployed = edgesr.deploy(spec.build("s", 2).eval(), "onnx")
    path = tmp_path / "s.onnx"
    with pytest.raises(SizeRuleError, match=">= 13"):  # the trace must reach the symbolic minimum
        export_onnx(deployed, path, input_size=(10, 16), dynamic=True, min_size=7,
                    dynamic_min_size=spec.size_rule.dynamic_min_size, metadata=meta)
    with pytest.raises(SizeRuleError):  # a static size below the rule
        export_onnx(deployed, path, input_size=(6, 16), min_size=7, metadata=meta)
    r = export_onnx(deployed, path, input_size=(16, 17), dynamic=True, min_size=7,
                    dynamic_min_size=spec.size_rule.dynamic_min_size, metadata=meta)
    assert r.input_shape == (1, 3, "H", "W") and r.metadata["min_size"] == "7"
    sess = ort.InferenceSession(str(r.path), providers=["CPUExecutionProvider"])
    for h, w in ((7, 7), (9, 12), (12, 8), (13, 13), (25, 19)):
        x = real_image(h, w, "rocket")
        with torch.no_grad():
            ref = deployed(x).numpy()
        out = sess.run(None, {"input": x.numpy()})[0]
        assert out.shape == ref.shape and float(abs(out - ref).max()) <= 1e-5 * max(1.0, float(abs(ref).max()))
