"""ONNX export: real torch.onnx (dynamo, opset 18) + onnxruntime; no mocks of either."""

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import noise_image, real_image
from edgesr.errors import ExportError, OutputError, SizeRuleError
from edgesr.export import read_metadata, write_metadata
from edgesr.export import onnx as onnx_export
from edgesr.export.onnx import export_onnx
from edgesr.runtime.runners import OnnxRunner, TorchRunner

TOL = 1e-5  # fp32 toy models, outputs O(1)


class Toy(nn.Module):
    """The op patterns of the zoo: conv, depthwise, GELU, max-pool + resize by scale factor,
    sigmoid gating, matmul with a constant buffer, PixelShuffle, a nearest skip."""

    def __init__(self, c: int = 8, scale: int = 2):
        super().__init__()
        self.head = nn.Conv2d(3, c, 3, padding=1)
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.gate = nn.Conv2d(c, c, 1)
        self.tail = nn.Conv2d(c, 3 * scale * scale, 3, padding=1)
        self.ps = nn.PixelShuffle(scale)
        self.register_buffer("mix", torch.linalg.qr(torch.randn(c, c))[0])
        self.scale = scale

    def forward(self, x):
        y = F.gelu(self.head(x))
        y = self.dw(y)
        p = F.interpolate(F.max_pool2d(y, 2, 2), scale_factor=2, mode="bilinear", align_corners=False)
        y = y * torch.sigmoid(self.gate(p))
        y = torch.einsum("bchw,cd->bdhw", y, self.mix)
        return self.ps(self.tail(y)) + F.interpolate(x, scale_factor=self.scale, mode="nearest")


class In255(nn.Module):
    """A model that works in [0, 255] (like SRConvNet): the artifact must still take [0, 1]."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x / 255.0) * 255.0


class AdaptivePool(nn.Module):
    """Pools to a size computed from the input: a dynamic export must be refused."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        h, w = x.shape[-2:]
        p = F.adaptive_max_pool2d(self.conv(x), (h // 4, w // 4))
        return x + F.interpolate(p, scale_factor=4, mode="nearest")


def _inputs(h, w):
    return [noise_image(h, w, seed=1).numpy(), real_image(h, w).numpy()]


def _parity(model, path, sizes, input_range=1.0):
    ref, art = TorchRunner(model, input_range=input_range), OnnxRunner(path, threads=2)
    worst = 0.0
    for h, w in sizes:
        for x in _inputs(h, w):
            a, b = ref.run(x), art.run(x)
            assert a.shape == b.shape
            worst = max(worst, float(np.abs(a - b).max()))
    return worst


@pytest.fixture(scope="module")
def toy():
    torch.manual_seed(0)
    return Toy().eval()


@pytest.fixture(scope="module")
def static_export(toy, tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "toy.onnx"
    return export_onnx(toy, path, input_size=(32, 40), metadata={"model": "toy", "scale": 2}, simplify=True)


@pytest.fixture(scope="module")
def dynamic_export(toy, tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "toy_dyn.onnx"
    return export_onnx(toy, path, input_size=(32, 32), dynamic=True, multiple_of=4, metadata={"model": "toy"})


def test_static_export_parity_and_result(toy, static_export):
    r = static_export
    assert r.format == "onnx" and r.layout == "NCHW"
    assert r.input_shape == (1, 3, 32, 40) and r.output_shape == (1, 3, 64, 80)
    for op in ("Conv", "DepthToSpace", "Resize", "MaxPool", "Sigmoid"):
        assert r.ops.get(op, 0) >= 1, r.ops
    # one self-contained file, weights embedded
    assert r.file_size == r.path.stat().st_size
    assert not Path(str(r.path) + ".data").exists() and r.checks["external_data"] == []
    model = onnx.load(str(r.path))
    assert [i.name for i in model.graph.input] == ["input"] and [o.name for o in model.graph.output] == ["output"]
    assert model.opset_import[0].version == 18
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    # no exporter debug info (stack traces with local paths) in the shipped artifact
    assert not any(n.metadata_props for n in model.graph.node)
    assert "edgesr/" not in r.path.read_bytes().decode("latin-1")
    simp = r.checks["simplify"]  # tried; kept only if smaller *and* equivalent
    assert simp["tried"] and simp["kept"] == (simp["nodes_after"] < simp["nodes_before"])
    assert _parity(toy, r.path, [(32, 40)]) <= TOL


def test_static_artifact_rejects_other_sizes(static_export):
    with pytest.raises(SizeRuleError, match="fixed input size 32x40"):
        OnnxRunner(static_export.path).run(noise_image(32, 32).numpy())


def test_dynamic_export_has_symbolic_dims_and_runs_at_two_sizes(toy, dynamic_export):
    r = dynamic_export
    model = onnx.load(str(r.path))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in dims[2:]] == ["4*H", "4*W"] and all(d.dim_value == 0 for d in dims[2:])
    assert r.input_shape == (1, 3, "4*H", "4*W")
    assert all(isinstance(d, str) for d in r.output_shape[2:])
    assert _parity(toy, r.path, [(32, 32), (40, 56), (12, 20)]) <= TOL
    with pytest.raises(SizeRuleError, match="multiples of 4"):
        OnnxRunner(r.path).run(noise_image(30, 32).numpy())


def test_dynamic_export_refuses_a_model_that_specialises(tmp_path):
    path = tmp_path / "adaptive.onnx"
    with pytest.raises(ExportError, match="fixes the input size"):
        export_onnx(AdaptivePool().eval(), path, input_size=(32, 32), dynamic=True, multiple_of=4)
    assert list(tmp_path.iterdir()) == []


def test_dim_param_check_rejects_fixed_dims():
    # the guard behind the capture: a graph whose input lost its symbolic dims is refused
    with pytest.raises(ExportError, match="specialised"):
        onnx_export._check_symbolic((1, 3, 32, 32), (1, 3, 64, 64))
    with pytest.raises(ExportError, match="fixed output"):
        onnx_export._check_symbolic((1, 3, "H", "W"), (1, 3, 64, 64))
    onnx_export._check_symbolic((1, 3, "H", "W"), (1, 3, "2*H", "2*W"))


def test_metadata_round_trip(static_export):
    meta = read_metadata(static_export.path)
    assert meta == static_export.metadata
    assert meta["model"] == "toy" and meta["scale"] == "2"  # non-strings are JSON-encoded
    assert meta["layout"] == "NCHW" and meta["format"] == "onnx" and meta["input_range"] == "[0,1]"
    assert meta["input_name"] == "input" and meta["dynamic"] == "false"
    assert meta["input_shape"] == "[1, 3, 32, 40]"


def test_write_metadata_updates_in_place(tmp_path, static_export):
    path = tmp_path / "copy.onnx"
    path.write_bytes(static_export.path.read_bytes())
    new = write_metadata(path, {"parity": "passed: fp32 worst max-abs 1e-07"})
    assert new["parity"].startswith("passed") and new["model"] == "toy"
    assert read_metadata(path) == new
    with pytest.raises(ValueError, match="describe the graph"):
        write_metadata(path, {"layout": "NHWC"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy.onnx"]


def test_conflicting_metadata_is_refused_before_exporting(tmp_path, toy):
    with pytest.raises(ValueError, match="layout"):
        export_onnx(toy, tmp_path / "x.onnx", input_size=(16, 16), metadata={"layout": "NHWC"})
    assert list(tmp_path.iterdir()) == []


def test_size_rule_is_checked(tmp_path, toy):
    with pytest.raises(SizeRuleError, match="divisible by 4"):
        export_onnx(toy, tmp_path / "x.onnx", input_size=(30, 32), dynamic=True, multiple_of=4)
    assert list(tmp_path.iterdir()) == []


def test_input_range_is_inside_the_graph_and_external_data(tmp_path, monkeypatch):
    """A [0,255] model exported as a [0,1] artifact; also the >2 GB path (threshold forced to 0)."""
    torch.manual_seed(1)
    model = In255(nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), nn.PixelShuffle(2))).eval()
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 0)
    path = tmp_path / "r255.onnx"
    r = export_onnx(model, path, input_range=255.0, input_size=(24, 20), metadata={"model": "r255"})
    side = tmp_path / "r255.onnx.data"
    assert side.is_file() and r.checks["external_data"] == [str(side)]
    assert r.file_size == path.stat().st_size + side.stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r255.onnx", "r255.onnx.data"]
    assert read_metadata(path)["native_range"] == "[0,255]"
    # the artifact takes [0,1]: compare against the model run in its own range
    x = real_image(24, 20)
    with torch.no_grad():
        want = (model(x * 255.0) / 255.0).numpy()
    got = OnnxRunner(path).run(x.numpy())
    assert np.abs(got - want).max() <= TOL
    assert _parity(model, path, [(24, 20)], input_range=255.0) <= TOL


def test_failure_mid_write_leaves_nothing(tmp_path, monkeypatch):
    model = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1)).eval()
    path = tmp_path / "m.onnx"
    path.write_bytes(b"previous artifact")

    def broken_save(proto, f, *a, **k):
        Path(f).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(onnx, "save", broken_save)
    # the user's disk, not a bug: edgesr's one-line output error naming the path and the reason
    with pytest.raises(OutputError, match="m.onnx: disk full"):
        export_onnx(model, path, input_size=(16, 16))
    assert path.read_bytes() == b"previous artifact"  # untouched
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]  # no temporaries
    path.unlink()
    with pytest.raises(OutputError):
        export_onnx(model, path, input_size=(16, 16))
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("name,variant,scale,size", [("span", "ch28", 4, (20, 27))])
def test_real_model_dynamic(tmp_path, name, variant, scale, size):
    import edgesr
    from edgesr.models import get_spec

    spec = get_spec(name)
    torch.manual_seed(0)
    model = spec.build(variant, scale).eval()
    deployed = edgesr.deploy(model, "onnx")
    rule = spec.size_rule
    r = export_onnx(deployed, tmp_path / f"{name}.onnx", input_range=spec.input_range, input_size=size,
                    dynamic=True, multiple_of=rule.multiple_of, min_size=rule.min_size, metadata={"model": name})
    assert all(isinstance(d, str) for d in r.input_shape[2:])
    ref = TorchRunner(model, input_range=spec.input_range)  # the train form
    art = OnnxRunner(r.path, threads=2)
    m = rule.multiple_of
    h2 = -(-max(rule.min_size, 13) // m) * m
    for h, w in (size, (h2, h2 + (m if m > 1 else 3))):
        for x in _inputs(h, w):
            a, b = ref.run(x), art.run(x)
            scale_ = max(1.0, float(np.abs(a).max()))
            assert np.abs(a - b).max() <= TOL * scale_
