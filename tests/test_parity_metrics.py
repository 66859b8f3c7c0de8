"""Parity metrics, thresholds and the report (pure numpy; no models, no runtimes)."""

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import real_image
from edgesr.errors import EdgeSRError, ParityError
from edgesr.runtime.parity import (
    THRESHOLDS,
    Metrics,
    ParityCase,
    ParityReport,
    compare,
    threshold_for,
)


def test_identical_outputs():
    x = real_image(24, 20).numpy()
    m = compare(x, x.copy())
    assert m.max_abs == 0.0 and m.mean_abs == 0.0
    assert m.psnr_db == math.inf
    assert m.finite and m.ref_finite and m.out_finite
    assert m.shape == (1, 3, 24, 20)


def test_known_values():
    ref = np.zeros((1, 3, 4, 4), np.float32)
    out = ref.copy()
    out[0, 0, 0, 0] = 0.1  # one pixel off by 0.1 out of 48 values
    m = compare(ref, out)
    assert m.max_abs == pytest.approx(0.1, rel=1e-6)
    assert m.mean_abs == pytest.approx(0.1 / 48, rel=1e-6)
    mse = 0.1**2 / 48
    assert m.psnr_db == pytest.approx(10 * math.log10(1.0 / mse), rel=1e-6)  # peak 1.0


def test_psnr_uses_peak_one_not_data_range():
    # a dark image: PSNR must not depend on the reference's own max
    ref = np.full((1, 3, 8, 8), 0.05, np.float32)
    out = ref + np.float32(1e-3)
    assert compare(ref, out).psnr_db == pytest.approx(60.0, abs=1e-3)


def test_accepts_torch_tensors():
    x = real_image(16, 16)
    m = compare(x, x + 1e-5)
    assert m.max_abs == pytest.approx(1e-5, rel=1e-2)


def test_shape_mismatch_is_a_parity_error():
    with pytest.raises(ParityError, match="shape"):
        compare(np.zeros((1, 3, 8, 8)), np.zeros((1, 3, 8, 9)))
    assert issubclass(ParityError, EdgeSRError)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_output_fails(bad):
    ref = real_image(8, 8).numpy()
    out = ref.copy()
    out[0, 1, 2, 3] = bad
    m = compare(ref, out)
    assert not m.finite and not m.out_finite and m.ref_finite
    assert m.max_abs == math.inf
    assert not threshold_for("fp32").passes(m)
    m2 = compare(out, ref)
    assert not m2.ref_finite and m2.out_finite and not m2.finite


@settings(deadline=None, max_examples=25)
@given(
    h=st.integers(1, 12),
    w=st.integers(1, 12),
    err=st.floats(0, 0.5, allow_nan=False),
    seed=st.integers(0, 10_000),
)
def test_metrics_properties(h, w, err, seed):
    rng = np.random.default_rng(seed)
    ref = rng.random((1, 3, h, w), dtype=np.float32)
    noise = (rng.random(ref.shape) * 2 - 1).astype(np.float32) * np.float32(err)
    out = ref + noise
    m = compare(ref, out)
    d = np.abs(ref.astype(np.float64) - out.astype(np.float64))
    assert m.max_abs == pytest.approx(d.max(), abs=1e-12)
    assert 0 <= m.mean_abs <= m.max_abs
    # PSNR >= the bound given by max-abs (mse <= max_abs^2)
    if m.max_abs > 0:
        assert m.psnr_db >= 10 * math.log10(1 / m.max_abs**2) - 1e-9
    assert compare(out, ref).max_abs == m.max_abs  # symmetric


def test_fp32_threshold_boundaries():
    t = threshold_for("fp32")
    assert t.in_use and t.max_abs == 1e-4
    ref = np.zeros((1, 3, 4, 4), np.float64)
    assert t.passes(compare(ref, ref + 0.9e-4))
    assert not t.passes(compare(ref, ref + 1.1e-4))


def test_reduced_precision_thresholds_are_in_use_and_looser_than_fp32():
    assert set(THRESHOLDS) == {"fp32", "fp16", "int8"}
    for p in ("fp16", "int8"):
        t = threshold_for(p)
        assert t.in_use and t.min_psnr_db is not None
        assert t.max_abs > THRESHOLDS["fp32"].max_abs
    # calibrated int8 is gated on real images only; noise is reported
    assert not threshold_for("int8").gates("random(seed=0) 64x64")
    assert threshold_for("int8").gates("photo:astronaut 64x64")
    assert threshold_for("fp16").gates("random(seed=0) 64x64")
    with pytest.raises(ValueError, match="unknown precision"):
        threshold_for("bf16")


def test_threshold_scales_with_the_reference_peak_beyond_one():
    t = threshold_for("fp32")
    ref = np.zeros((1, 3, 4, 4))
    ref[0, 0, 0, 0] = 40.0  # a random-weight model's output
    m = compare(ref, ref + 5e-4)
    assert m.ref_peak == 40.0 and t.bound(m) == pytest.approx(4e-3)
    assert t.passes(m)
    assert not t.passes(compare(ref, ref + 5e-3))
    small = np.full((1, 3, 4, 4), 0.5)  # peak <= 1: the plain absolute bound
    assert t.bound(compare(small, small)) == 1e-4
    assert not t.passes(compare(small, small + 2e-4))


def _case(err: float, label: str = "random 8x8") -> ParityCase:
    ref = np.zeros((1, 3, 8, 8), np.float32)
    m = compare(ref, ref + np.float32(err))
    return ParityCase(label, (8, 8), "torch", "onnxruntime", m, threshold_for("fp32").passes(m))


def test_report_pass_fail_and_summary():
    good = ParityReport("m.onnx", "onnx", "fp32", [_case(1e-6), _case(3e-6, "photo 8x8")], {"onnxruntime": "1.31.1"})
    assert good.passed
    assert good.summary().startswith("passed") and "3.00e-06" in good.summary()
    bad = ParityReport("m.onnx", "onnx", "fp32", [_case(1e-6), _case(0.2)])
    assert not bad.passed and bad.summary().startswith("FAILED")
    assert bad.worst().metrics.max_abs == pytest.approx(0.2)
    assert not ParityReport("m.onnx", "onnx").passed  # no cases: nothing proven


def test_report_json_round_trip_is_strict_json():
    same = ParityCase("identical", (8, 8), "torch", "torch", compare(np.ones((1, 3, 8, 8)), np.ones((1, 3, 8, 8))), True)
    rep = ParityReport("m.tflite", "tflite", "fp32", [_case(2e-6), same], {"ai-edge-litert": "2.3.0"})
    text = rep.to_json()
    data = json.loads(text)  # allow_nan=False on dump: no Infinity tokens
    assert "Infinity" not in text and data["cases"][1]["metrics"]["psnr_db"] == "inf"
    assert data["threshold"]["max_abs"] == 1e-4 and data["passed"] is True
    back = ParityReport.from_json(text)
    assert back.cases[1].metrics.psnr_db == math.inf
    assert back.to_dict() == rep.to_dict()


def test_markdown_lists_every_case():
    rep = ParityReport("m.onnx", "onnx", "fp32", [_case(1e-6, "noise"), _case(0.5, "photo")], {"torch": "2.13.0"})
    md = rep.to_markdown()
    assert "Parity FAILED" in md
    assert md.count("| noise |") == 1 and md.count("| photo |") == 1
    assert "**NO**" in md and "torch 2.13.0" in md and "1.00e-06" in md


def test_metrics_dict_round_trip():
    m = compare(np.zeros((1, 3, 2, 2)), np.full((1, 3, 2, 2), 0.25))
    assert Metrics.from_dict(m.as_dict()) == m


def test_fp16_does_not_gate_a_reference_beyond_fp16_range_but_gates_an_overflow():
    """Trained SAFMN++ on noise: the fp32 output itself reaches 1e25, so an fp16 graph has no
    answer there (reported, not gated); an fp16 inf where fp32 is in range still fails."""
    t = threshold_for("fp16", "aarch64")
    huge = np.full((1, 3, 4, 4), 1e25)
    m = compare(huge, np.full_like(huge, np.inf))
    assert m.ref_peak == 1e25 and t.beyond_range(m) and t.passes(m)
    small = np.full((1, 3, 4, 4), 0.5)
    overflow = compare(small, np.full_like(small, np.inf))
    assert not t.beyond_range(overflow) and not t.passes(overflow)
    assert not threshold_for("fp32").beyond_range(m)  # fp32 gates everything
    case = ParityCase("random(seed=0) 4x4", (4, 4), "torch", "onnxruntime-aarch64", m, t.passes(m))
    assert "not gated" in ParityReport("m.onnx", "onnx", "fp16", [case], arch="aarch64").to_markdown()


def test_fp16_on_aarch64_holds_real_images_to_a_tighter_psnr_floor_than_noise():
    """Noise through fp16 ARM kernels measured 45.3 dB, photographs 55-67 dB: a photograph
    at 46 dB passes the noise floor (42) but is a defect for a deployed model."""
    t = threshold_for("fp16", "aarch64")
    ref = np.full((1, 3, 8, 8), 0.5)
    out = ref.copy()
    out[..., 0, 0] += 0.04  # one pixel: PSNR 10*log10(192 / 0.04^2 / 3) ~ 46.0 dB
    m = compare(ref, out)
    assert 42 < m.psnr_db < 50
    assert t.judge("random(seed=0) 8x8", m)
    assert not t.judge("photo:astronaut 8x8", m)
    assert not t.judge("image[0] 8x8", m)  # the user's own images count as real
    assert t.judge("photo:astronaut 8x8", compare(ref, ref + 1e-3))  # 60 dB
    assert threshold_for("fp16").min_real_psnr_db is None  # x86: one floor (60 dB) for all
    report = ParityReport("a.onnx", "onnx", "fp16", [ParityCase("photo:astronaut 8x8", (8, 8), "torch", "ort", m,
                                                                 t.judge("photo:astronaut 8x8", m))], arch="aarch64")
    assert not report.passed and "real images >= 50 dB" in report.summary()
