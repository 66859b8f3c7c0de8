"""Runners: one protocol over PyTorch, onnxruntime and LiteRT (real runtimes, small artifacts)."""

import shutil
import sys

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from conftest import noise_image, real_image
from edgesr.errors import EdgeSRError, SizeRuleError
from edgesr.export.onnx import export_onnx
from edgesr.export.tflite import export_tflite
from edgesr.runtime import runners as runners_mod
from edgesr.runtime.runners import LiteRTRunner, OnnxRunner, Runner, TorchRunner, describe, open_runner

SIZE = (20, 24)
TOL = 1e-5


class Tiny(nn.Module):
    """A [0,255] model (like SRConvNet), x2: conv -> GELU -> conv -> PixelShuffle + nearest skip."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 12, 3, padding=1)
        self.ps = nn.PixelShuffle(2)

    def forward(self, x):  # x in [0, 255]
        y = self.ps(self.b(nn.functional.gelu(self.a(x / 255.0))))
        return 255.0 * y + nn.functional.interpolate(x, scale_factor=2, mode="nearest")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return Tiny().eval()


@pytest.fixture(scope="module")
def artifacts(tiny, tmp_path_factory):
    d = tmp_path_factory.mktemp("runners")
    onnx_r = export_onnx(tiny, d / "tiny.onnx", input_range=255.0, input_size=SIZE, dynamic=True, multiple_of=2)
    tfl_r = export_tflite(tiny, d / "tiny.tflite", input_range=255.0, input_size=SIZE)
    return {"onnx": onnx_r.path, "tflite": tfl_r.path, "dir": d}


def _expected(model, x):
    with torch.no_grad():
        return (model(torch.from_numpy(x) * 255.0) / 255.0).numpy()


def test_torch_runner_scales_to_the_model_range(tiny):
    x = real_image(*SIZE).numpy()
    r = TorchRunner(tiny, input_range=255.0)
    y = r.run(x)
    assert y.dtype == np.float32 and y.shape == (1, 3, 40, 48)
    assert np.array_equal(y, _expected(tiny, x))
    assert r.name == "torch" and r.version == torch.__version__ and r.threads >= 1
    # wrong range is visibly wrong (the skip branch dominates)
    assert np.abs(TorchRunner(tiny, input_range=1.0).run(x) - y).max() > 1e-2


def test_torch_runner_reads_the_range_from_the_spec(tiny):
    m = Tiny().eval()
    m.load_state_dict(tiny.state_dict())
    m.edgesr_info = {"model": "srconvnet", "variant": "base", "scale": 4}  # a [0,255] spec
    x = noise_image(*SIZE).numpy()
    assert TorchRunner(m).input_range == 255.0
    assert np.array_equal(TorchRunner(m).run(x), TorchRunner(tiny, input_range=255.0).run(x))
    assert TorchRunner(nn.Identity()).input_range == 1.0  # foreign module


def test_torch_runner_restores_thread_count(tiny):
    before = torch.get_num_threads()
    TorchRunner(tiny, input_range=255.0, threads=1).run(noise_image(*SIZE).numpy())
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("fmt", ["onnx", "tflite"])
def test_artifact_runners_match_torch(tiny, artifacts, fmt):
    r = open_runner(artifacts[fmt], threads=2)
    assert isinstance(r, OnnxRunner if fmt == "onnx" else LiteRTRunner)
    assert isinstance(r, Runner)
    assert r.threads == 2 and r.version and r.name in ("onnxruntime", "ai-edge-litert")
    assert r.layout == ("NCHW" if fmt == "onnx" else "NHWC")  # from the metadata
    for x in (noise_image(*SIZE, seed=3).numpy(), real_image(*SIZE).numpy()):
        y = r.run(x)
        assert y.shape == (1, 3, 40, 48) and y.dtype == np.float32 and y.flags.c_contiguous
        assert np.abs(y - _expected(tiny, x)).max() <= TOL


@pytest.mark.parametrize("fmt", ["onnx", "tflite"])
def test_batches_are_run_image_by_image_when_needed(tiny, artifacts, fmt):
    x = np.concatenate([noise_image(*SIZE, seed=s).numpy() for s in range(3)])
    y = open_runner(artifacts[fmt]).run(x)
    assert y.shape == (3, 3, 40, 48)
    assert np.abs(y - _expected(tiny, x)).max() <= TOL


def test_dynamic_onnx_runs_other_sizes(tiny, artifacts):
    r = OnnxRunner(artifacts["onnx"])
    x = real_image(16, 30).numpy()
    assert np.abs(r.run(x) - _expected(tiny, x)).max() <= TOL
    with pytest.raises(SizeRuleError, match="multiples of 2"):
        r.run(real_image(17, 30).numpy())


def test_onnx_optimization_levels_agree(artifacts):
    x = noise_image(*SIZE).numpy()
    outs = {lvl: OnnxRunner(artifacts["onnx"], optimization=lvl).run(x) for lvl in ("all", "basic", "none")}
    assert np.abs(outs["all"] - outs["none"]).max() <= 1e-6
    assert np.abs(outs["basic"] - outs["none"]).max() <= 1e-6
    with pytest.raises(EdgeSRError, match="optimization"):
        OnnxRunner(artifacts["onnx"], optimization="max")


def test_litert_without_xnnpack(artifacts):
    x = noise_image(*SIZE).numpy()
    plain = LiteRTRunner(artifacts["tflite"], xnnpack=False)
    assert plain.name == "ai-edge-litert-noxnnpack"
    assert np.abs(plain.run(x) - LiteRTRunner(artifacts["tflite"]).run(x)).max() <= 1e-5


def test_layout_mistakes_are_impossible_for_callers(artifacts):
    # both runners take/return NCHW although the TFLite file is NHWC
    x = noise_image(*SIZE).numpy()
    a, b = open_runner(artifacts["onnx"]).run(x), open_runner(artifacts["tflite"]).run(x)
    assert np.abs(a - b).max() <= 2 * TOL


def test_input_validation(artifacts):
    r = open_runner(artifacts["tflite"])
    with pytest.raises(SizeRuleError, match="fixed input size 20x24"):
        r.run(noise_image(24, 20).numpy())
    with pytest.raises(SizeRuleError, match="NCHW"):
        r.run(np.zeros((1, 20, 24, 3), np.float32))  # NHWC by mistake
    y = r.run(noise_image(*SIZE).numpy().astype(np.float64))  # converted, not rejected
    assert y.dtype == np.float32


def test_open_runner_by_magic_bytes_and_errors(artifacts, tmp_path):
    for fmt, cls in (("onnx", OnnxRunner), ("tflite", LiteRTRunner)):
        blob = tmp_path / f"model_{fmt}.bin"
        shutil.copy(artifacts[fmt], blob)
        assert isinstance(open_runner(blob), cls)
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not a model at all")
    with pytest.raises(EdgeSRError, match="neither an ONNX nor a TFLite"):
        open_runner(junk)
    with pytest.raises(EdgeSRError, match="not found"):
        open_runner(tmp_path / "missing.onnx")
    with pytest.raises(TypeError, match="xnnpack"):
        open_runner(artifacts["onnx"], xnnpack=False)
    assert isinstance(open_runner(artifacts["tflite"], threads=None, xnnpack=None), LiteRTRunner)


def test_onnx_without_metadata_defaults_to_nchw(tiny, artifacts, tmp_path):
    model = onnx.load(str(artifacts["onnx"]))
    del model.metadata_props[:]
    bare = tmp_path / "bare.onnx"
    onnx.save(model, str(bare))
    r = OnnxRunner(bare)
    assert r.layout == "NCHW" and r.meta == {}
    x = noise_image(*SIZE).numpy()
    assert np.abs(r.run(x) - _expected(tiny, x)).max() <= TOL


def test_describe(artifacts):
    d = describe(open_runner(artifacts["tflite"], threads=1))
    assert d["name"] == "ai-edge-litert" and d["threads"] == 1 and d["layout"] == "NHWC" and d["xnnpack"] is True


def test_litert_falls_back_to_tflite_runtime_or_says_what_is_missing(artifacts, monkeypatch):
    from ai_edge_litert import interpreter as real

    monkeypatch.setitem(sys.modules, "ai_edge_litert", None)  # import fails: package absent
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)
    fake = type(sys)("tflite_runtime")
    fake_interp = type(sys)("tflite_runtime.interpreter")
    fake_interp.Interpreter = real.Interpreter
    fake_interp.OpResolverType = real.OpResolverType
    fake.interpreter = fake_interp
    monkeypatch.setitem(sys.modules, "tflite_runtime", fake)
    monkeypatch.setitem(sys.modules, "tflite_runtime.interpreter", fake_interp)
    r = LiteRTRunner(artifacts["tflite"])
    assert r.name == "tflite-runtime"
    monkeypatch.setitem(sys.modules, "tflite_runtime.interpreter", None)
    monkeypatch.setitem(sys.modules, "tflite_runtime", None)
    with pytest.raises(EdgeSRError, match="no TFLite runtime"):
        runners_mod._interpreter_module()
