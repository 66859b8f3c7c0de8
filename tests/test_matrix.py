"""CI parity matrix: every family x {ONNX, TFLite} x fp32, exported via the CLI and verified
on the real runtimes (onnxruntime, ai-edge-litert) against the train-form PyTorch model."""

import pytest

from edgesr.runtime.matrix import CELLS, DYNAMIC_CELLS, FORMATS, export_cell


@pytest.fixture(scope="session")
def matrix_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("matrix")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("cell", CELLS, ids=lambda c: c.id)
def test_export_and_parity(cell, fmt, matrix_dir):
    report = export_cell(cell, fmt, matrix_dir)
    assert report["exit_code"] == 0, report
    assert report["passed"] is True
    cases = report["parity"]["cases"]
    assert len(cases) >= 2 and any("photo" in c["input"] for c in cases)
    for c in cases:
        m = c["metrics"]
        assert m["finite"] and m["max_abs"] <= 1e-4, c


@pytest.mark.parametrize("cell", DYNAMIC_CELLS, ids=lambda c: c.id)
def test_dynamic_onnx_two_sizes(cell, matrix_dir):
    report = export_cell(cell, "onnx", matrix_dir, dynamic=True)
    assert report["exit_code"] == 0, report
    assert report["input_size"] == "dynamic"
    sizes = {tuple(c["size"]) for c in report["parity"]["cases"]}
    assert len(sizes) >= 2, sizes
    assert all(c["passed"] for c in report["parity"]["cases"])
