"""CI parity matrix: every family x {ONNX, TFLite} x fp32.

Each cell is exported through the CLI (`edgesr export`, which verifies on the real x86
runtime: onnxruntime / ai-edge-litert vs the train-form PyTorch model), then checked on
aarch64 builds of the same runtimes under qemu-user (`edgesr parity --arch aarch64`):
aarch64 vs PyTorch within the fp32 threshold and aarch64 vs x86 <= 1e-5 max-abs.
A missing qemu or a failed rootfs build fails the test (no skip).
"""

import json

import pytest

from edgesr.cli import main
from edgesr.runtime.check import CROSS_ARCH_MAX_ABS
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
        assert m["finite"] and m["max_abs"] <= 1e-4 * max(1.0, m["ref_peak"]), c

    # The same artifact on aarch64 onnxruntime / LiteRT (qemu-user, neoverse-n1).
    arm_json = matrix_dir / f"{cell.id}.{fmt}.aarch64.json"
    rc = main(["parity", report["artifact_path"], "--arch", "aarch64", "--json", str(arm_json)])
    arm = json.loads(arm_json.read_text())
    assert rc == 0, arm["summary"]
    vs_x86 = [c for c in arm["cases"] if "aarch64" in c["candidate"] and "torch" not in c["reference"]]
    vs_torch = [c for c in arm["cases"] if "torch" in c["reference"]]
    assert vs_x86 and vs_torch
    assert all(c["metrics"]["max_abs"] <= CROSS_ARCH_MAX_ABS * max(1.0, c["metrics"]["ref_peak"]) for c in vs_x86), vs_x86
    assert all(c["passed"] for c in vs_x86)
    assert all(c["passed"] for c in vs_torch)


@pytest.mark.parametrize("cell", DYNAMIC_CELLS, ids=lambda c: c.id)
def test_dynamic_onnx_two_sizes(cell, matrix_dir):
    report = export_cell(cell, "onnx", matrix_dir, dynamic=True)
    assert report["exit_code"] == 0, report
    assert report["input_size"] == "dynamic"
    sizes = {tuple(c["size"]) for c in report["parity"]["cases"]}
    assert len(sizes) >= 2, sizes
    assert all(c["passed"] for c in report["parity"]["cases"])
