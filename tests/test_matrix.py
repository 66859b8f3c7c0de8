"""CI parity matrix: every family x {ONNX, TFLite} x fp32, and fp16/int8 cells from trained
checkpoints.

Each cell is exported through the CLI (`edgesr export`, which verifies on the real x86
runtime: onnxruntime / ai-edge-litert vs the train-form fp32 PyTorch model), then checked on
aarch64 builds of the same runtimes under qemu-user (`edgesr parity --arch aarch64`).
fp32: aarch64 vs PyTorch within the fp32 threshold and aarch64 vs x86 <= 1e-5 max-abs.
fp16/int8: PSNR vs fp32 PyTorch within the precision's threshold on both architectures
(`parity.threshold_for`), and for int8 the aarch64-vs-x86 difference in output LSBs.
A missing qemu or a failed rootfs build fails the test (no skip).
"""

import json

import pytest

from edgesr.cli import main
from edgesr.export.metadata import read_metadata
from edgesr.runtime.check import CROSS_ARCH_MAX_ABS
from edgesr.runtime.matrix import (CELLS, DYNAMIC_CELLS, PRECISION_CELLS, cross_arch, export_cell,
                                   gated_cases, jobs, parity_args, worst)
from edgesr.runtime.parity import threshold_for

# int8 on aarch64 vs x86 (same artifact, ARM vs x86 integer kernels and requantisation),
# photographs at 32x32: PlainUSR-U 0-6.8 LSB max, 64-137 dB apart, PSNR vs fp32 PyTorch
# -0.0..+1.4 dB apart; SPAN-28 0.6-1.6 LSB, +0.1 dB.  A few LSBs at edges are the rounding of
# another kernel; a wrong scale or zero point on one arch moves whole regions by tens of LSBs.
INT8_CROSS_ARCH_MAX_LSB = 12.0
INT8_CROSS_ARCH_MAX_PSNR_DIFF_DB = 2.0


@pytest.fixture(scope="session")
def matrix_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("matrix")


def _parity(cell, report, matrix_dir, fmt, arch="aarch64", photos=False):
    """`edgesr parity` of the cell's artifact (vs fp32 PyTorch) on ``arch``; its JSON report."""
    out = matrix_dir / f"{cell.id}.{fmt}.{arch}.json"
    rc = main(parity_args(cell, report["artifact_path"], arch, out, photos=photos))
    rep = json.loads(out.read_text())
    assert rc == 0, rep["summary"]
    return rep


def _check_trained_cell(cell, report):
    """A checkpoint cell exports the architecture the matrix names (detected, not assumed)."""
    if cell.weights is not None:
        assert (report["model"], report["variant"], report["scale"]) == (cell.model, cell.variant, cell.scale), report


@pytest.mark.parametrize("cell,fmt", jobs(CELLS), ids=lambda v: getattr(v, "id", v))
def test_export_and_parity(cell, fmt, matrix_dir):
    report = export_cell(cell, fmt, matrix_dir)
    assert report["exit_code"] == 0, report
    assert report["passed"] is True
    _check_trained_cell(cell, report)
    cases = report["parity"]["cases"]
    assert len(cases) >= 2 and any("photo" in c["input"] for c in cases)
    for c in cases:
        m = c["metrics"]
        assert m["finite"] and m["max_abs"] <= 1e-4 * max(1.0, m["ref_peak"]), c

    # The same artifact on aarch64 onnxruntime / LiteRT (qemu-user, neoverse-n1).
    arm = _parity(cell, report, matrix_dir, fmt)
    vs_x86 = [c for c in arm["cases"] if "aarch64" in c["candidate"] and "torch" not in c["reference"]]
    vs_torch = [c for c in arm["cases"] if "torch" in c["reference"]]
    assert vs_x86 and vs_torch
    assert all(c["metrics"]["max_abs"] <= CROSS_ARCH_MAX_ABS * max(1.0, c["metrics"]["ref_peak"]) for c in vs_x86), vs_x86
    assert all(c["passed"] for c in vs_x86)
    assert all(c["passed"] for c in vs_torch)


_RESULTS: dict = {}  # (cell id, format) -> (export report, x86 parity, aarch64 parity), shared below


def _precision_cell(cell, fmt, matrix_dir):
    """Export (verified on x86), then `edgesr parity` on x86 and on aarch64 over the shipped photographs."""
    key = (cell.id, fmt)
    if key not in _RESULTS:
        report = export_cell(cell, fmt, matrix_dir)
        assert report["exit_code"] == 0, report.get("parity", {}).get("summary", report)
        _RESULTS[key] = (report, _parity(cell, report, matrix_dir, fmt, "x86_64", photos=True),
                         _parity(cell, report, matrix_dir, fmt, "aarch64", photos=True))
    return _RESULTS[key]


def test_precision_cells_cover_fp16_on_both_formats_and_int8_onnx():
    """The subset CI runs (int8 TFLite joins by itself once `check_request` accepts it)."""
    run = {(c.precision, f) for c, f in jobs(PRECISION_CELLS)}
    assert {("fp16", "onnx"), ("fp16", "tflite"), ("int8", "onnx")} <= run
    assert all(c.weights is not None for c in PRECISION_CELLS)  # trained checkpoints only


@pytest.mark.parametrize("cell,fmt", jobs(PRECISION_CELLS), ids=lambda v: getattr(v, "id", v))
def test_reduced_precision_vs_fp32_torch_on_x86_and_aarch64(cell, fmt, matrix_dir):
    report, x86, arm = _precision_cell(cell, fmt, matrix_dir)
    _check_trained_cell(cell, report)
    assert read_metadata(report["artifact_path"])["precision"] == cell.precision
    assert report["precision"]["precision"] == cell.precision

    checks = (("export", report["parity"], "x86_64"), ("x86", x86, "x86_64"), ("aarch64", arm, "aarch64"))
    for where, rep, arch in checks:
        gate = threshold_for(cell.precision, arch)
        # the report names the gate it was judged by, and it is the precision's own
        assert rep["precision"] == cell.precision and rep["threshold"] == gate.as_dict(), (where, rep["threshold"])
        assert f"PSNR >= {gate.min_psnr_db:g} dB" in rep["summary"], rep["summary"]
        assert rep["passed"] is True, rep["summary"]
        vs_torch = gated_cases(rep["cases"], True, cell.precision, arch)
        assert any(not c["input"].startswith("random") for c in vs_torch)  # a real photograph is gated
        max_abs, psnr = worst(vs_torch)
        print(f"{cell.id} {fmt} {where} vs fp32 torch: max-abs {max_abs:.2e}, PSNR {psnr:.1f} dB "
              f"(gate >= {gate.min_psnr_db:g})")
        assert psnr >= gate.min_psnr_db and max_abs <= gate.max_abs * max(
            c["metrics"]["ref_peak"] for c in vs_torch)
        real = [c for c in vs_torch if not c["input"].startswith("random")]
        assert worst(real)[1] >= (gate.min_real_psnr_db or gate.min_psnr_db), (where, worst(real))


@pytest.mark.parametrize("cell,fmt", [(c, f) for c, f in jobs(PRECISION_CELLS) if c.precision == "int8"],
                         ids=lambda v: getattr(v, "id", v))
def test_int8_aarch64_vs_x86_in_output_lsbs(cell, fmt, matrix_dir):
    _, x86, arm = _precision_cell(cell, fmt, matrix_dir)
    assert sum(not c["input"].startswith("random") for c in x86["cases"]) >= 4  # every shipped photograph
    x = cross_arch(x86["cases"], arm["cases"])
    print(x.line(f"{cell.id} {fmt}"))
    assert x.max_abs_lsb <= INT8_CROSS_ARCH_MAX_LSB, x
    assert abs(x.psnr_difference) <= INT8_CROSS_ARCH_MAX_PSNR_DIFF_DB, x


@pytest.mark.parametrize("cell", DYNAMIC_CELLS, ids=lambda c: c.id)
def test_dynamic_onnx_two_sizes(cell, matrix_dir):
    report = export_cell(cell, "onnx", matrix_dir, dynamic=True)
    assert report["exit_code"] == 0, report
    assert report["input_size"] == "dynamic"
    sizes = {tuple(c["size"]) for c in report["parity"]["cases"]}
    assert len(sizes) >= 2, sizes
    assert all(c["passed"] for c in report["parity"]["cases"])
