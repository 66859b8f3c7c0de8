"""Parity metrics between a reference output and a candidate output, and their report.

All figures are on the artifact contract's [0, 1] scale: max/mean absolute error and
PSNR with peak 1.0.  Nothing here knows models or runtimes; callers pass arrays and
runner names.

Thresholds are max-abs on the [0, 1] scale.  Outputs that leave [0, 1] (random-weight
models: SPAN-48 x4 with seeded random weights outputs values up to ~40) have fp32
rounding errors proportional to their magnitude, so the bound is scaled by the reference
peak when it exceeds 1: ``max_abs <= tol * max(1, max|ref|)``.  For real images through a
trained model (peak ~1) this *is* ``max_abs <= tol``.

fp16 and int8 artifacts are also gated by PSNR *relative to the output peak*
(``psnr_db + 20 log10 max(1, ref_peak)``), which for [0, 1] outputs is the plain PSNR.

=========  =========  ========  ===========================================================
precision  max_abs    min PSNR  measured (artifact vs fp32 PyTorch), why this bound
=========  =========  ========  ===========================================================
fp32       1e-4       -         1e-7 .. 1e-5 (rounding level); 1e-4 only fails on real
                                defects (a merged weight gave 0.3-1.5; a wrong op >= 1e-2).
fp16       2e-2       60 dB     ONNX fp16 (fp32 I/O): trained PlainUSR-U photo 1.1e-3 / 73 dB;
                                random-weight SPAN-48 6e-4 x peak 48; PlainUSR-U on noise
                                (output peak 29) 8e-3 x peak, 77 dB relative.  A wrong cast
                                or an overflowed op gives inf/NaN or < 40 dB.
int8       0.5        38 dB     real photographs only: calibrated int8 is only defined on
                                the image distribution it was calibrated on (uniform noise
                                drives activations far outside the calibrated ranges: 2 dB
                                on PlainUSR-U, reported but not gated).  Measured on trained
                                checkpoints within the 0.15 dB Y-PSNR budget: 46-55 dB.
=========  =========  ========  ===========================================================
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np

from ..errors import ParityError

PEAK = 1.0


@dataclass(frozen=True)
class Metrics:
    max_abs: float
    mean_abs: float
    psnr_db: float  # peak 1.0; inf when identical, -inf when not finite
    ref_finite: bool
    out_finite: bool
    finite: bool  # both finite
    shape: tuple[int, ...]
    ref_peak: float = 1.0  # max |ref| (scales the threshold when outputs leave [0, 1])

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Metrics":
        return cls(
            max_abs=_num(d["max_abs"]),
            mean_abs=_num(d["mean_abs"]),
            psnr_db=_num(d["psnr_db"]),
            ref_finite=bool(d["ref_finite"]),
            out_finite=bool(d["out_finite"]),
            finite=bool(d["finite"]),
            shape=tuple(d["shape"]),
            ref_peak=_num(d.get("ref_peak", 1.0)),
        )


def _as_array(a) -> np.ndarray:
    if hasattr(a, "detach"):  # torch tensor, without importing torch
        a = a.detach().cpu().numpy()
    return np.asarray(a)


def compare(ref, out) -> Metrics:
    """Metrics of ``out`` against ``ref`` (arrays or tensors of the same shape, [0, 1] scale)."""
    r, o = _as_array(ref), _as_array(out)
    if r.shape != o.shape:
        raise ParityError(f"output shape {o.shape} differs from the reference shape {r.shape}")
    r64, o64 = r.astype(np.float64), o.astype(np.float64)
    ref_finite, out_finite = bool(np.isfinite(r64).all()), bool(np.isfinite(o64).all())
    finite = ref_finite and out_finite
    if r.size == 0:
        return Metrics(0.0, 0.0, math.inf, ref_finite, out_finite, finite, tuple(r.shape))
    if not finite:
        return Metrics(math.inf, math.inf, -math.inf, ref_finite, out_finite, False, tuple(r.shape), math.inf)
    diff = np.abs(r64 - o64)
    mse = float(np.mean(diff * diff))
    psnr = math.inf if mse == 0 else 10.0 * math.log10(PEAK**2 / mse)
    peak = float(np.abs(r64).max())
    return Metrics(float(diff.max()), float(diff.mean()), psnr, True, True, True, tuple(r.shape), peak)


@dataclass(frozen=True)
class Threshold:
    precision: str
    max_abs: float
    min_psnr_db: float | None  # relative to max(1, output peak)
    in_use: bool
    note: str
    gates_noise: bool = True  # False: seeded-noise inputs are reported, not gated (int8)

    def bound(self, m: Metrics) -> float:
        """The max-abs allowed for these metrics: ``max_abs * max(1, ref_peak)``."""
        return self.max_abs * max(1.0, m.ref_peak)

    def passes(self, m: Metrics) -> bool:
        if not m.finite or not m.max_abs <= self.bound(m):
            return False
        return self.min_psnr_db is None or relative_psnr(m) >= self.min_psnr_db

    def gates(self, input_label: str) -> bool:
        """Whether a parity case fed ``input_label`` (e.g. "random(seed=0) 64x64") is gated."""
        return self.gates_noise or not input_label.startswith("random")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def relative_psnr(m: Metrics) -> float:
    """PSNR with the peak ``max(1, max|ref|)``: outputs of random-weight models leave [0, 1]."""
    return m.psnr_db + 20.0 * math.log10(max(1.0, m.ref_peak)) if m.finite else -math.inf


THRESHOLDS: dict[str, Threshold] = {
    "fp32": Threshold("fp32", 1e-4, None, True, "fp32 artifact vs fp32 PyTorch; measured 1e-7..1e-5"),
    "fp16": Threshold("fp16", 2e-2, 60.0, True, "fp16 ONNX vs fp32 PyTorch; measured 6e-4..8e-3 x peak, >= 72 dB"),
    "int8": Threshold("int8", 0.5, 38.0, True, "calibrated int8 ONNX vs fp32 PyTorch on real photographs "
                      "(noise reported, not gated); measured 46-55 dB", gates_noise=False),
}


# ONNX Runtime's aarch64 kernels compute fp16 graphs in fp16 arithmetic (x86 widens to fp32),
# so an fp16 artifact on ARM is further from fp32 PyTorch: trained SPAN-28 x4 at 64x64 under
# qemu (neoverse-n1) 55.2 dB / 1.7e-2 on a photograph, 51 dB (relative) on noise of output
# peak 7; x86: 70+ dB.  Still far from a defect (a wrong cast or overflow: inf/NaN, < 30 dB).
AARCH64_FP16 = Threshold("fp16", 1e-1, 45.0, True, "fp16 artifact on aarch64 (fp16 arithmetic) vs fp32 PyTorch; "
                         "measured 51-55 dB")


def threshold_for(precision: str, arch: str = "x86_64") -> Threshold:
    """The gate of ``precision``; fp16 on aarch64 has its own (native fp16 arithmetic)."""
    if precision == "fp16" and arch == "aarch64":
        return AARCH64_FP16
    try:
        return THRESHOLDS[precision]
    except KeyError:
        raise ValueError(f"unknown precision {precision!r} (known: {', '.join(THRESHOLDS)})") from None


@dataclass
class ParityCase:
    input: str  # what was fed, e.g. "random(seed=0) 64x64" or "photo:butterfly 64x64"
    size: tuple[int, int]
    reference: str  # runner names
    candidate: str
    metrics: Metrics
    passed: bool

    def as_dict(self) -> dict[str, Any]:
        return {
            "input": self.input,
            "size": list(self.size),
            "reference": self.reference,
            "candidate": self.candidate,
            "metrics": self.metrics.as_dict(),
            "passed": bool(self.passed),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ParityCase":
        return cls(d["input"], tuple(d["size"]), d["reference"], d["candidate"],
                   Metrics.from_dict(d["metrics"]), bool(d["passed"]))


@dataclass
class ParityReport:
    artifact: str
    format: str
    precision: str = "fp32"
    cases: list[ParityCase] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)
    arch: str = "x86_64"  # where the candidate ran (fp16 on aarch64 has its own threshold)

    @property
    def threshold(self) -> Threshold:
        return threshold_for(self.precision, self.arch)

    @property
    def passed(self) -> bool:
        """True only if there is at least one case and every case passed."""
        return bool(self.cases) and all(c.passed for c in self.cases)

    def worst(self) -> ParityCase | None:
        t = self.threshold
        return max(self.cases, key=lambda c: (t.gates(c.input), not c.metrics.finite, c.metrics.max_abs), default=None)

    def summary(self) -> str:
        """One line, e.g. for artifact metadata."""
        w = self.worst()
        if w is None:
            return "no parity cases"
        verdict = "passed" if self.passed else "FAILED"
        bound = f"threshold {self.threshold.max_abs:g}"
        if w.metrics.ref_peak > 1.0:
            bound += f" x output peak {w.metrics.ref_peak:.3g}"
        return (
            f"{verdict}: {self.precision} worst max-abs {w.metrics.max_abs:.2e} "
            f"({bound}) over {len(self.cases)} inputs, {w.candidate} vs {w.reference}"
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain dict; non-finite metrics stay Python floats (``inf``) -- use :meth:`to_json` for files."""
        return {
            "artifact": self.artifact,
            "format": self.format,
            "precision": self.precision,
            "arch": self.arch,
            "threshold": self.threshold.as_dict(),
            "passed": self.passed,
            "summary": self.summary(),
            "cases": [c.as_dict() for c in self.cases],
            "versions": dict(self.versions),
        }

    def to_json(self, indent: int = 2) -> str:
        """Strict JSON: ``inf``/``nan`` become the strings ``"inf"``, ``"-inf"``, ``"nan"``."""
        return json.dumps(_json_safe(self.to_dict()), indent=indent, allow_nan=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ParityReport":
        return cls(d["artifact"], d["format"], d.get("precision", "fp32"),
                   [ParityCase.from_dict(c) for c in d.get("cases", [])], dict(d.get("versions", {})),
                   d.get("arch", "x86_64"))

    @classmethod
    def from_json(cls, text: str) -> "ParityReport":
        return cls.from_dict(json.loads(text))

    def to_markdown(self) -> str:
        t = self.threshold
        verdict = "PASSED" if self.passed else "FAILED"
        lines = [
            f"## Parity {verdict}: {self.artifact} ({self.format}, {self.precision})",
            "",
            f"Threshold: max-abs <= {t.max_abs:g} on [0, 1] (x max|ref| when the reference leaves [0, 1])"
            + (f", PSNR >= {t.min_psnr_db:g} dB (peak max(1, max|ref|))" if t.min_psnr_db is not None else "")
            + ("" if t.gates_noise else "; noise inputs reported, not gated")
            + ". PSNR uses peak 1.0.",
            "",
            "| input | size | reference | candidate | max-abs | mean-abs | PSNR (dB) | ok |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for c in self.cases:
            m = c.metrics
            lines.append(
                f"| {c.input} | {c.size[0]}x{c.size[1]} | {c.reference} | {c.candidate} | "
                f"{m.max_abs:.2e} | {m.mean_abs:.2e} | {m.psnr_db:.1f} | {_verdict(c, t)} |"
            )
        if not self.cases:
            lines.append("| (no cases) | | | | | | | **NO** |")
        if self.versions:
            lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in sorted(self.versions.items()))]
        return "\n".join(lines) + "\n"


def _verdict(case: ParityCase, t: Threshold) -> str:
    if not t.gates(case.input):
        return "not gated"
    return "yes" if case.passed else "**NO**"


def _num(v) -> float:
    return float(v)  # float("inf"), float("-inf"), float("nan") parse the strings to_json writes


def _json_safe(o):
    if isinstance(o, float) and not math.isfinite(o):
        return "nan" if math.isnan(o) else ("inf" if o > 0 else "-inf")
    if isinstance(o, dict):
        return {k: _json_safe(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_json_safe(v) for v in o]
    return o


def worst_max_abs(reports: Sequence[ParityReport]) -> float:
    """Largest max-abs over several reports (inf if any case was not finite)."""
    vals = [c.metrics.max_abs for r in reports for c in r.cases]
    return max(vals, default=0.0)
