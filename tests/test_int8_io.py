"""Integer I/O for int8 artifacts (issue 16, ``export --precision int8 --int8-io``): a released
checkpoint exported to ONNX (onnxruntime) and TFLite (ai-edge-litert, XNNPACK) with uint8
input/output tensors (scale 1/255, zero point 0, recorded in metadata); on real 8-bit images
they compute what the float-I/O int8 artifact computes, up to the output's 8-bit rounding.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

from conftest import SHARED
from edgesr.cli import main
from edgesr.data import read_image
from edgesr.errors import EdgeSRError
from edgesr.export.int8_io import IMAGE_QUANT, IO_SCALE, apply_int8_io
from edgesr.export.metadata import read_metadata, set_onnx_metadata
from edgesr.pipeline import VerifySettings, export_model, obtain_model, verify_artifact
from edgesr.quality.engine import artifact_form, evaluate
from edgesr.runtime.runners import LiteRTRunner, OnnxRunner, open_runner

WEIGHTS = SHARED / "checkpoints/PlainUSRU_Rep_x4.pth"
SET5 = SHARED / "datasets/Set5"
LR = SET5 / "LR_bicubic" / "X4" / "babyx4.png"  # a real 8-bit image, 128x128
# calibration on the 4 shipped photographs (fast); the figures in the README use the default 16
PHOTOS = Path(__file__).resolve().parent.parent / "src" / "edgesr" / "data" / "images"
SIZE = 32


def assert_same_image(yq: np.ndarray, yf: np.ndarray) -> None:
    """uint8-I/O output ``yq`` vs float-I/O output ``yf`` (clamped) on an 8-bit image.

    The input level k is the same real value, but DequantizeLinear computes k x float32(1/255),
    1 ulp from float32(k/255) for 126 of the 256 levels; inside the int8 graph that flips an
    activation's rounding now and then.  So: the output is on the 8-bit grid, almost every value
    within its 0.5-LSB rounding, none more than 3 LSB off (measured on "baby" 128x128 through
    dynamic ONNX: 517 of 786k values above 0.5 LSB, max 1.94 LSB; TFLite 32x32: max 0.497 LSB).
    """
    d = np.abs(yq - np.clip(yf, 0, 1)) * 255
    assert np.allclose(yq * 255, np.round(yq * 255), atol=1e-3)  # the 8-bit grid
    assert d.max() <= 3.0, d.max()
    assert (d > 0.5 + 1e-3).mean() <= 0.005, (d > 0.5 + 1e-3).mean()


@pytest.fixture(scope="module")
def model():
    return obtain_model(None, weights=WEIGHTS)


@pytest.fixture(scope="module")
def onnx_cli(tmp_path_factory) -> Path:
    """The CLI path: dynamic ONNX, int8, uint8 I/O, verified against PyTorch at two sizes."""
    out = tmp_path_factory.mktemp("int8io") / "pu_u8.onnx"
    rc = main(["export", "--weights", str(WEIGHTS), "--format", "onnx", "--dynamic", "--input-size", str(SIZE),
               "--precision", "int8", "--int8-io", "--calibration", str(PHOTOS), "-o", str(out)])
    assert rc == 0
    return out


def float_io_twin(u8: Path, dst: Path) -> Path:
    """The float-I/O int8 ONNX the CLI's artifact was made from: its graph without the
    input DequantizeLinear and output QuantizeLinear that --int8-io adds (each checked to be
    exactly that), float32 input/output, no int8_io metadata."""
    m = onnx.load(str(u8))
    g = m.graph
    inp, out = g.input[0], g.output[0]
    dq = [n for n in g.node if inp.name in n.input]
    q = [n for n in g.node if out.name in n.output]
    assert [n.op_type for n in dq] == ["DequantizeLinear"] and [n.op_type for n in q] == ["QuantizeLinear"]
    f_in, f_out = dq[0].output[0], q[0].input[0]
    nodes = [n for n in g.node if n is not dq[0] and n is not q[0]]
    for n in nodes:
        n.input[:] = [inp.name if i == f_in else out.name if i == f_out else i for i in n.input]
        n.output[:] = [out.name if o == f_out else o for o in n.output]
    del g.node[:]
    g.node.extend(nodes)
    inp.type.tensor_type.elem_type = out.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    set_onnx_metadata(m, {p.key: p.value for p in m.metadata_props if not p.key.startswith(("input_", "output_d",
                      "output_s", "output_z", "int8_io"))}, replace=True)
    onnx.save(m, str(dst))
    return dst


@pytest.fixture(scope="module")
def tflite_pair(model, tmp_path_factory) -> tuple[Path, Path]:
    """(float-I/O int8 TFLite, the same file after the --int8-io rewrite)."""
    d = tmp_path_factory.mktemp("int8io")
    src = d / "pu_f.tflite"
    export_model(model, "tflite", size=(SIZE, SIZE), output=src, verify=False, precision="int8", calibration=PHOTOS)
    u8 = d / "pu_u8.tflite"
    shutil.copy(src, u8)
    apply_int8_io(u8)
    return src, u8


def lr_image(size: int | None = None) -> np.ndarray:
    """The real 8-bit LR image as NCHW float32 (a central crop of ``size`` px)."""
    img = read_image(LR)
    if size:
        t, l = (img.shape[0] - size) // 2, (img.shape[1] - size) // 2
        img = img[t : t + size, l : l + size]
    return np.ascontiguousarray(img.transpose(2, 0, 1)[None])


def test_image_quantization_is_exact_on_the_8bit_grid():
    k = np.arange(256, dtype=np.float32)
    q = IMAGE_QUANT.quantize(k / 255.0)
    assert q.dtype == np.uint8 and (q == k).all()
    assert (IMAGE_QUANT.dequantize(q) * 255.0).round().astype(int).tolist() == list(range(256))
    assert IMAGE_QUANT.quantize(np.array([-0.2, 1.3], dtype=np.float32)).tolist() == [0, 255]  # saturates


def test_onnx_cli_export_has_uint8_graph_io_metadata_and_report(onnx_cli):
    g = onnx.load(str(onnx_cli)).graph
    assert [i.type.tensor_type.elem_type for i in g.input] == [onnx.TensorProto.UINT8]
    assert [o.type.tensor_type.elem_type for o in g.output] == [onnx.TensorProto.UINT8]
    assert [i.name for i in g.input] == ["input"] and [o.name for o in g.output] == ["output"]
    dims = [d.dim_param or d.dim_value for d in g.input[0].type.tensor_type.shape.dim]
    assert isinstance(dims[2], str) and isinstance(dims[3], str), dims  # dynamic H/W kept
    meta = read_metadata(onnx_cli)
    assert meta["precision"] == "int8" and meta["int8_io"] == "true"
    for side in ("input", "output"):
        assert meta[f"{side}_dtype"] == "uint8" and meta[f"{side}_zero_point"] == "0"
        assert float(meta[f"{side}_scale"]) == pytest.approx(1 / 255, rel=1e-6)
    assert meta["parity"].startswith("passed")
    report = json.loads(onnx_cli.with_suffix(".onnx.json").read_text())
    assert report["passed"] is True and report["parity"]["precision"] == "int8"
    assert report["int8_io"]["input"] == {"dtype": "uint8", "scale": IO_SCALE, "zero_point": 0}
    assert report["int8_io"]["output"] == {"dtype": "uint8", "scale": IO_SCALE, "zero_point": 0}
    assert "uint8 RGB (scale 0.00392157, zero point 0)" in onnx_cli.with_suffix(".onnx.md").read_text()
    runner = open_runner(onnx_cli, threads=2)
    assert runner.session.get_inputs()[0].type == "tensor(uint8)" and runner.io_dtype == "uint8"


def test_onnx_uint8_io_equals_float_io_on_a_real_image(onnx_cli, tmp_path):
    fl = float_io_twin(onnx_cli, tmp_path / "float_io.onnx")
    again = tmp_path / "again.onnx"  # and the rewrite of that float-I/O graph gives the CLI's graph back
    shutil.copy(fl, again)
    apply_int8_io(again)
    ops = lambda p: [n.op_type for n in onnx.load(str(p)).graph.node]  # noqa: E731
    assert ops(again) == ops(onnx_cli)
    x = lr_image()  # the whole 128x128 image through the dynamic graph
    f, q = OnnxRunner(fl, threads=2), OnnxRunner(onnx_cli, threads=2)
    assert f.io_dtype == "float32" and q.io_dtype == "uint8"
    yf, yq = f.run(x), q.run(x)
    assert yq.shape == (1, 3, 512, 512) and yq.dtype == np.float32
    assert_same_image(yq, yf)
    # `edgesr eval` path: Y-PSNR of uint8 I/O equals float I/O (Set5 "baby", whole image;
    # measured on all of Set5 with default calibration: -0.00004 dB)
    pf = evaluate(artifact_form(fl, threads=2), SET5, images=["baby"]).mean["psnr_y"]
    pq = evaluate(artifact_form(onnx_cli, threads=2), SET5, images=["baby"]).mean["psnr_y"]
    assert abs(pf - pq) <= 0.002, (pf, pq)


def test_tflite_uint8_io_runs_on_xnnpack_and_equals_float_io(tflite_pair, model):
    src, u8 = tflite_pair
    q = LiteRTRunner(u8, threads=2)  # XNNPACK delegate (the default)
    assert q.xnnpack
    for d in (q._in, q._out):
        assert d["dtype"] == np.uint8 and d["quantization"] == (pytest.approx(1 / 255), 0)
    assert tuple(q._in["shape"]) == (1, SIZE, SIZE, 3) and tuple(q._out["shape"]) == (1, 4 * SIZE, 4 * SIZE, 3)
    meta = read_metadata(u8)
    assert meta["input_dtype"] == meta["output_dtype"] == "uint8" and meta["model"] == "plainusr"
    x = lr_image(SIZE)
    assert_same_image(q.run(x), LiteRTRunner(src, threads=2).run(x))
    # parity against the train-form PyTorch model under the int8 gate (real photographs gated)
    report = verify_artifact(u8, model.model, model.spec.input_range, VerifySettings(sizes=[(SIZE, SIZE)],
                             threads=2), "tflite", "int8")
    assert report.passed, report.summary()


def test_int8_io_without_int8_is_refused_and_writes_nothing(tmp_path, capsys):
    for precision in (["--precision", "fp16"], []):
        out = tmp_path / "x.onnx"
        rc = main(["export", "--weights", str(WEIGHTS), "--format", "onnx", *precision, "--int8-io", "-o", str(out)])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and "--int8-io needs --precision int8" in err and len(err.splitlines()) == 1
        assert list(tmp_path.iterdir()) == []


def test_uint8_artifact_without_its_scale_in_metadata_is_one_clear_error(onnx_cli, tmp_path):
    bad = tmp_path / "bad.onnx"
    m = onnx.load(str(onnx_cli))
    kept = {p.key: p.value for p in m.metadata_props if not p.key.startswith("input_")}
    set_onnx_metadata(m, kept, replace=True)
    onnx.save(m, str(bad))
    with pytest.raises(EdgeSRError, match="uint8 input but its metadata gives no input_scale"):
        OnnxRunner(bad)


def test_upscale_cli_on_the_uint8_artifact(onnx_cli, tmp_path):
    out = tmp_path / "up"
    assert main(["upscale", str(onnx_cli), str(LR), "-o", str(out), "--threads", "2"]) == 0
    files = list(out.iterdir())
    assert len(files) == 1
    with Image.open(files[0]) as im:
        assert im.size == (512, 512) and im.mode == "RGB"
        sr = np.asarray(im, dtype=np.float64)
    hr = np.asarray(Image.open(SET5 / "HR" / "baby.png").convert("RGB"), dtype=np.float64)
    assert sr.shape == hr.shape
    psnr = 10 * np.log10(255.0**2 / np.mean((sr[4:-4, 4:-4] - hr[4:-4, 4:-4]) ** 2))  # RGB, shave 4
    assert psnr > 30.0, psnr  # a real x4 upscale of "baby", not noise or a shifted image


@pytest.mark.parametrize("which", ["onnx", "tflite"])
def test_uint8_artifact_on_aarch64_matches_x86(which, onnx_cli, tflite_pair, tmp_path):
    """Under qemu (ARM int8 kernels) the uint8-I/O artifact keeps the float contract for the
    caller (the aarch64 runner quantizes the input and dequantizes the output from the
    artifact's metadata) and stays within the int8 gate and a few output LSBs of x86."""
    from edgesr.runtime.arm import Aarch64Runner
    from edgesr.runtime.check import check_artifact

    art = onnx_cli if which == "onnx" else tflite_pair[1]
    arm = Aarch64Runner(art)
    assert arm.input_quant == IMAGE_QUANT and arm.output_quant == IMAGE_QUANT
    report = check_artifact(art, weights=WEIGHTS, arch="aarch64")
    assert report.precision == "int8" and report.passed, report.to_markdown()
    cross = [c for c in report.cases if "aarch64" in c.candidate and "torch" not in c.reference
             and c.input.startswith("photo")]
    assert cross and max(c.metrics.max_abs for c in cross) * 255 <= 8  # output LSBs


def test_device_bench_runners_feed_uint8_artifacts(onnx_cli, tflite_pair):
    """`edgesr bench` (and its on-device script, which has no edgesr) times uint8-I/O artifacts:
    its runners quantize the float input to the artifact's uint8 contract."""
    from edgesr.bench.device_bench import DeviceLiteRTRunner, DeviceOnnxRunner

    x = lr_image(SIZE)
    for runner in (DeviceOnnxRunner(onnx_cli, 1), DeviceLiteRTRunner(tflite_pair[1], 1)):
        y = runner.run(x)
        assert y.dtype == np.uint8 and y.shape == (1, 3, 4 * SIZE, 4 * SIZE), (runner.name, y.dtype, y.shape)
        assert 0 < y.mean() < 255


def test_int8_io_rewrite_refuses_an_artifact_that_already_has_it(onnx_cli, tflite_pair, tmp_path):
    for src in (onnx_cli, tflite_pair[1]):
        again = tmp_path / src.name
        shutil.copy(src, again)
        before = again.read_bytes()
        with pytest.raises(EdgeSRError):
            apply_int8_io(again)
        assert again.read_bytes() == before  # nothing half-rewritten
