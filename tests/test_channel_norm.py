"""Channels-first LayerNorms per export target (edgesr.reparam.safe_ops, MATMUL_MEAN_TARGETS).

For onnxruntime the two channel means of every channels-first LayerNorm (SAFMN,
SRConvNet, DarkIR and the folds' ChannelNormShift / bare ChannelLayerNorm) become
ones-row matmuls, because ReduceMean over the channel axis is single-threaded and ~20x
slower there;
for LiteRT the official op order is kept.  Checked: equality with the official module
(bit-exact where the op order is unchanged, rounding level otherwise, fp32 and fp64, on
random and real-image inputs), the exported ONNX graph (no ReduceMean left, constant
filters, onnxruntime parity) and dtype casts after construction.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import edgesr
from edgesr.models import darkir, safmn, srconvnet
from edgesr.reparam.safe_ops import MATMUL_MEAN_TARGETS, ChannelLayerNorm, ChannelNormShift
from conftest import rel_err as _rel


def _randomised(m: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5 + 1.0)
    return m.eval()


def _official_norms(c: int) -> dict[str, nn.Module]:
    return {
        "safmn": _randomised(safmn.LayerNorm(c), 1),
        "srconvnet": _randomised(srconvnet.LayerNorm(c, eps=1e-6, data_format="channels_first"), 2),
        "darkir": _randomised(darkir.LayerNorm2d(c), 3),
    }


def _inputs(c: int, dtype=torch.float32):
    from conftest import real_image

    img = real_image(37, 29).to(dtype)  # odd size, 3 channels -> tile to c
    x_real = img.repeat(1, -(-c // 3), 1, 1)[:, :c] * 3.0 - 1.0
    x_rand = torch.randn(2, c, 13, 8, generator=torch.Generator().manual_seed(4), dtype=dtype) * 10 + 5
    return [x_real, x_rand]


def test_targets():
    assert MATMUL_MEAN_TARGETS == {"onnx"}


@pytest.mark.parametrize("name", ["safmn", "srconvnet", "darkir"])
def test_official_norms_per_target(name):
    c = 24
    m = _official_norms(c)[name]
    onnx_form = edgesr.make_export_safe(m, "onnx")
    tflite_form = edgesr.make_export_safe(m, "tflite")
    assert isinstance(onnx_form, ChannelLayerNorm) and onnx_form.mean_as_matmul
    assert onnx_form.state_dict().keys() == m.state_dict().keys()
    assert not getattr(tflite_form, "mean_as_matmul", False)  # official op order kept
    m64 = copy.deepcopy(m).double()
    for x in _inputs(c):
        with torch.no_grad():
            ref, truth = m(x), m64(x.double())
            assert torch.equal(tflite_form(x), ref)
            # fp32: within the project's 1e-5, and no further from the fp64 truth than the
            # official fp32 computation (the real-image input, with its tiled channels, is
            # ill-conditioned: both are ~5e-6 from the truth there, ~1e-7 on noise)
            err_matmul, err_official = _rel(onnx_form(x).double(), truth), _rel(ref.double(), truth)
            assert err_matmul <= 1e-5 and err_matmul <= 2 * err_official + 1e-7, (err_matmul, err_official)
    m64, f64 = m.double(), onnx_form.double()
    for x in _inputs(c, torch.float64):
        with torch.no_grad():
            assert _rel(f64(x), m64(x)) <= 1e-13


def test_fold_products_convert_and_survive_casts():
    """ChannelNormShift and the bare ChannelLayerNorm come from folds (target independent);
    make_export_safe converts them for onnx.  Built in fp32 and cast to fp64 afterwards they
    stay exact (the row holds ones, not a float32-rounded 1/C)."""
    c = 12
    shift = torch.randn(c)
    for plain in (ChannelNormShift(shift, 1e-6), ChannelLayerNorm(None, None, 1e-6, channels=c)):
        fast = edgesr.make_export_safe(plain, "onnx")
        assert type(fast) is type(plain) and fast.mean_as_matmul and not plain.mean_as_matmul
        assert edgesr.make_export_safe(plain, "tflite").mean_as_matmul is False
        for x in _inputs(c):
            assert _rel(fast(x), plain(x)) <= 1e-5
        p64, c64 = plain.double(), fast.double()
        for x in _inputs(c, torch.float64):
            assert _rel(c64(x), p64(x)) <= 1e-13
    with pytest.raises(ValueError, match="channels="):
        ChannelLayerNorm(None, None, 1e-6)


def test_onnx_graph_has_no_reduce_mean_and_runs(tmp_path):
    import onnx
    import onnxruntime as ort

    c = 16

    class Block(nn.Module):  # two norms around a conv, like the models' blocks
        def __init__(self):
            super().__init__()
            self.n1 = _official_norms(c)["srconvnet"]
            self.conv = nn.Conv2d(c, c, 3, padding=1)
            self.n2 = _official_norms(c)["safmn"]

        def forward(self, x):
            return self.n2(self.conv(self.n1(x)))

    m = Block().eval()
    x = _inputs(c)[0]
    for target, expect_reduce in (("onnx", False), ("tflite", True)):
        dep = edgesr.make_export_safe(m, target)
        path = str(tmp_path / f"{target}.onnx")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(dep, (x,), path, dynamo=True, opset_version=18, external_data=False,
                              input_names=["x"], verbose=False)
        model = onnx.load(path)
        ops = [n.op_type for n in model.graph.node]
        assert ("ReduceMean" in ops) == expect_reduce, ops
        if target == "onnx":  # the ones rows are constants (initializers), not computed
            inits = {t.name for t in model.graph.initializer}
            mm = [n for n in model.graph.node if n.op_type == "MatMul"]
            assert len(mm) == 4 and all(n.input[0] in inits for n in mm)
        out = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
        with torch.no_grad():
            assert _rel(torch.from_numpy(out), m(x)) <= 1e-5
