"""Latency benchmarking: ``edgesr bench`` (here) and ``edgesr bundle`` (on devices).

- :func:`bench_model` / :func:`bench_artifacts` return an ``edgesr.bench/1`` document
  (schema documented in :mod:`edgesr.bench.device_bench`, the single-file device script
  that writes the very same format).
- :func:`write_bundle` writes the device folder; :func:`load_result` reads any result.
"""

from .bundle import write_bundle
from .core import BenchSettings, Progress, bench_artifacts, bench_model
from .device_bench import SCHEMA
from .peak import DEFAULT_GEMM, Gemm
from .report import load_result, markdown, plot, validate

__all__ = [
    "BenchSettings", "DEFAULT_GEMM", "Gemm", "Progress", "SCHEMA", "bench_artifacts", "bench_model", "load_result",
    "markdown", "plot", "validate", "write_bundle",
]
