"""int8 TFLite (issue 16): a released checkpoint exported through the CLI with
``--precision int8``, run on ai-edge-litert (XNNPACK), gated on Set5 Y-PSNR against the fp32
TFLite artifact; the file really computes in int8 and keeps float32 input/output."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from ai_edge_litert.tools import flatbuffer_utils as fu

from conftest import SHARED
from edgesr.cli import main
from edgesr.export.metadata import read_metadata
from edgesr.export.precision import extreme_inputs, load_calibration
from edgesr.pipeline import export_model, obtain_model
from edgesr.quality.engine import artifact_form, evaluate
from edgesr.runtime.runners import LiteRTRunner

CKPT = SHARED / "checkpoints"
SET5 = SHARED / "datasets/Set5"
WEIGHTS = CKPT / "PlainUSRU_Rep_x4.pth"
INT8_MAX_DROP_DB = 0.15  # issue 16 gate, Y-PSNR vs the fp32 artifact on Set5


@pytest.fixture(scope="module")
def int8_artifact(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("int8") / "pu_int8.tflite"
    rc = main(["export", "--weights", str(WEIGHTS), "--format", "tflite", "--input-size", "64",
               "--precision", "int8", "-o", str(out)])
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def fp32_artifact(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("fp32") / "pu_fp32.tflite"
    export_model(obtain_model(None, weights=WEIGHTS), "tflite", size=(64, 64), output=src, verify=False)
    return src


def set5_y(path: Path) -> tuple[float, float]:
    m = evaluate(artifact_form(path, threads=2), SET5).mean
    return m["psnr_y"], m["ssim_y"]


def op_input_types(path: Path) -> list[tuple[str, list[str]]]:
    """(op name, dtypes of all its inputs) per operator, read from the flatbuffer."""
    m = fu.read_model_from_bytearray(path.read_bytes())
    sg = m.subgraphs[0]
    return [(fu.opcode_to_name(m, op.opcodeIndex), [fu.type_to_name(sg.tensors[i].type) for i in op.inputs if i >= 0])
            for op in sg.operators]


def test_int8_tflite_within_budget_of_fp32_on_set5(int8_artifact, fp32_artifact):
    p32, s32 = set5_y(fp32_artifact)
    p8, s8 = set5_y(int8_artifact)
    # measured: 30.7684 -> 30.6538 (-0.115 dB), SSIM 0.8698 -> 0.8663
    assert p32 - p8 <= INT8_MAX_DROP_DB, (p32, p8)
    assert s32 - s8 <= 0.005, (s32, s8)
    assert p32 - p8 > 0.0  # int8 is not free: something is quantized


def test_int8_tflite_computes_in_int8_with_float_io(int8_artifact):
    ops = op_input_types(int8_artifact)
    convs = [types for name, types in ops if name == "CONV_2D"]
    int8_convs = [t for t in convs if t[:2] == ["INT8", "INT8"]]  # int8 activations and int8 weights
    assert int8_convs, ops
    assert all(t[2] == "INT32" for t in int8_convs)  # int32 bias: full-integer kernels
    assert any(name == "QUANTIZE" for name, _ in ops) and any(name == "DEQUANTIZE" for name, _ in ops)
    runner = LiteRTRunner(int8_artifact, threads=2)
    assert runner._in["dtype"] == np.float32 and runner._out["dtype"] == np.float32  # the artifact contract
    for name, x in extreme_inputs(64, 64).items():
        y = runner.run(x)
        assert y.shape == (1, 3, 256, 256) and np.isfinite(y).all(), name


def test_int8_tflite_metadata_and_report_name_what_stayed_float(int8_artifact):
    meta = read_metadata(int8_artifact)
    assert meta["precision"] == "int8" and meta["model"] == "plainusr"  # edgesr metadata carried over
    calibration = json.loads(meta["int8_calibration"])
    assert calibration["count"] == len(load_calibration(None).images) and calibration["probe_pairs"] >= 2
    quality = json.loads(meta["int8_quality"])
    assert quality["within_budget"] and quality["psnr_drop"] <= INT8_MAX_DROP_DB
    kept = json.loads(meta["int8_kept_float"])
    # PlainUSR's LeakyReLU has no int8 form in ai-edge-quantizer; the head conv costs 0.57 dB alone
    assert any(k.startswith("LEAKY_RELU") and "no int8" in v for k, v in kept.items()), kept
    assert any("Conv2d_head" in k and "alone costs" in v for k, v in kept.items()), kept
    report = json.loads(int8_artifact.with_suffix(".tflite.json").read_text())
    assert report["passed"] and report["parity"]["precision"] == "int8"
    assert report["precision"]["int8_ops"] >= 10 and report["precision"]["float_ops"]["LEAKY_RELU"] == 3
    md = int8_artifact.with_suffix(".tflite.md").read_text()
    assert "## Precision: int8" in md and "Conv2d_head" in md


def test_int8_tflite_with_unreadable_calibration_is_one_line_exit_2(tmp_path, capsys):
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "a.png").write_bytes(b"not a png")
    out = tmp_path / "out" / "m.tflite"
    rc = main(["export", "--weights", str(WEIGHTS), "--format", "tflite", "--input-size", "64",
               "--precision", "int8", "--calibration", str(garbage), "-o", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and "can be read" in err[0], err
    assert not out.exists() and not (tmp_path / "out").exists()


def test_calibration_ranges_are_the_float_tensors_extremes(fp32_artifact):
    """The one-pass profiler calibration gives, per activation tensor, the extremes the float
    interpreter really produces (minmax) and a moving average that differs from them."""
    from ai_edge_litert.interpreter import Interpreter

    from edgesr.export.int8_tflite import combine_ranges, percentile_ranges, sample_ranges

    data = fp32_artifact.read_bytes()
    xs = [np.random.default_rng(i).random((1, 3, 64, 64), dtype=np.float32) * (i + 1) / 3 for i in range(3)]
    per_sample = sample_ranges(data, xs)
    minmax, moving = combine_ranges(per_sample, "minmax"), combine_ranges(per_sample, "moving-average")
    it = Interpreter(model_content=data, experimental_preserve_all_tensors=True)
    it.allocate_tensors()
    index = {d["name"]: d["index"] for d in it.get_tensor_details()}
    lo, hi = {}, {}
    for x in xs:
        it.set_tensor(it.get_input_details()[0]["index"], np.ascontiguousarray(x.transpose(0, 2, 3, 1)))
        it.invoke()
        for name in minmax:
            a = it.get_tensor(index[name])
            lo[name], hi[name] = min(lo.get(name, np.inf), a.min()), max(hi.get(name, -np.inf), a.max())
    convs = [n for n in minmax if "Conv2d" in n]
    assert len(convs) >= 5, list(minmax)
    for name in minmax:
        assert np.isclose(float(np.ravel(minmax[name]["min"])[0]), lo[name], rtol=1e-4, atol=1e-5), name
        assert np.isclose(float(np.ravel(minmax[name]["max"])[0]), hi[name], rtol=1e-4, atol=1e-5), name
    assert any(float(np.ravel(moving[n]["max"])[0]) < hi[n] - 1e-3 for n in convs)  # 0.95 x the first sample's
    p100 = percentile_ranges(data, xs, 100.0, minmax, values_per_tensor=10**9)  # every value: the extremes, 0 included
    p99 = percentile_ranges(data, xs, 99.0, minmax)
    for name in convs:
        assert np.isclose(float(p100[name]["max"][0]), max(hi[name], 0.0), rtol=1e-4, atol=1e-5), name
        assert np.isclose(float(p100[name]["min"][0]), min(lo[name], 0.0), rtol=1e-4, atol=1e-5), name
        assert p99[name]["max"][0] <= p100[name]["max"][0] and p99[name]["min"][0] >= p100[name]["min"][0]
    assert any(p99[n]["max"][0] < 0.99 * p100[n]["max"][0] for n in convs)  # clipping happens


def test_block_search_keeps_the_one_at_a_time_int8_set_in_fewer_trials():
    """The int8-set growth in doubling blocks (no model: additive op costs, so the answer is
    known): ops join cheapest first while the summed cost stays within the target; an op
    too costly alone or on top of the cheaper ones stays float, with the reason named."""
    from edgesr.export.int8_tflite import GraphOp, _grow_int8_set

    costs = [0.001] * 40 + [0.002] * 20 + [0.05, 0.3]  # 60 cheap ops, one that tips the sum, one too costly
    ops = [GraphOp(i, "CONV_2D", f"m/conv{i}") for i in range(len(costs))]
    cost = {op: c for op, c in zip(ops, costs)}
    target = 0.1

    def drop_with(kept_float):
        return sum(cost[o] for o in ops if o not in kept_float)

    kept, why, tried, order = _grow_int8_set(ops, drop_with, target, log=lambda s: None)
    # one at a time, cheapest first: all 60 cheap ops (0.08 dB) join, 0.05 would make 0.13
    assert {o.index for o in order} == set(range(60))
    assert {o.index for o in kept} == {60, 61}
    assert drop_with(kept) <= target
    assert "0.300 dB > target" in why["#61 CONV_2D m/conv61"] and "60 int8 ops before it" in why["#60 CONV_2D m/conv60"]
    assert tried < len(ops) + 20  # one cost trial per op, then ~log2 blocks, not one more per op
