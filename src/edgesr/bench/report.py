"""Reading, tabulating and plotting bench documents (local runs and imported device runs)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

from ..errors import EdgeSRError
from .device_bench import SCHEMA, SCHEMA_MAJOR, fmt_ms

_RESULT_KEYS = ("runtime", "family", "threads", "input_hw", "latency_ms", "error")
_PEAK_KEYS = ("family", "threads", "gflops")


def validate(doc: object, source: str = "document") -> dict:
    """Check a bench document's schema; raise EdgeSRError with one line when it is not one."""
    if not isinstance(doc, dict) or "schema" not in doc:
        raise EdgeSRError(f"{source} is not an edgesr bench result (no 'schema' field)")
    name, _, version = str(doc["schema"]).rpartition("/")
    if name != SCHEMA.rpartition("/")[0] or version.split(".")[0] != SCHEMA_MAJOR:
        raise EdgeSRError(f"{source} has schema {doc['schema']!r}; this edgesr reads {SCHEMA!r}")
    for key in ("host", "results", "peaks"):
        if key not in doc:
            raise EdgeSRError(f"{source} is missing {key!r}")
    for i, r in enumerate(doc["results"]):
        missing = [k for k in _RESULT_KEYS if k not in r]
        if missing:
            raise EdgeSRError(f"{source}: result {i} is missing {', '.join(missing)}")
    for i, p in enumerate(doc["peaks"]):
        missing = [k for k in _PEAK_KEYS if k not in p]
        if missing:
            raise EdgeSRError(f"{source}: peak {i} is missing {', '.join(missing)}")
    return doc


def load_result(path: str | os.PathLike) -> dict:
    p = Path(path)
    try:
        doc = json.loads(p.read_text())
    except FileNotFoundError:
        raise EdgeSRError(f"result file not found: {p}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EdgeSRError(f"cannot read bench result {p}: {e}") from None
    return validate(doc, str(p))


def _host(doc: dict) -> str:
    return str(doc.get("host", {}).get("label") or doc.get("host", {}).get("hostname") or "?")


def _f(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def rows(docs: Sequence[dict]) -> list[list[str]]:
    """One row per result, all documents, in a fixed column order (see HEADERS)."""
    out = []
    for doc in docs:
        host = _host(doc)
        for r in doc["results"]:
            what = r.get("label") or r.get("artifact") or "?"
            size = "x".join(map(str, r["input_hw"]))
            if r.get("error"):
                out.append([host, what, r["runtime"], str(r["threads"]), size, "error: " + r["error"]]
                           + [""] * (len(HEADERS) - 6))
                continue
            lat, mem = r["latency_ms"], r.get("memory") or {}
            out.append([host, what, r["runtime"], str(r["threads"]), size, fmt_ms(lat["median"]),
                        fmt_ms(lat["p90"]), fmt_ms(lat["min"]), _f(r.get("throughput_mpix_s"), ".2f"),
                        _f(r["macs"] / 1e9 if r.get("macs") else None, ".2f"), _f(r.get("gflops"), ".1f"),
                        _f(r.get("pct_of_peak"), ".0f"), _f(r.get("pct_of_machine_peak"), ".0f"),
                        _f(mem.get("model_mb"), ".0f"),
                        _f(mem.get("peak_rss_mb"), ".0f")])
    return out


HEADERS = ["host", "model", "runtime", "thr", "input", "median ms", "p90 ms", "min ms", "out MP/s", "GMAC",
           "GFLOP/s", "% own peak", "% best peak", "model MB", "proc MB"]
PEAK_HEADERS = ["host", "runtime family", "thr", "sgemm GFLOP/s (best run)", "min ms", "median ms",
                "GEMM M x K x N, layers"]


def peak_rows(docs: Sequence[dict]) -> list[list[str]]:
    out = []
    for doc in docs:
        for p in doc["peaks"]:
            g = p.get("gemm") or {}
            shape = f"{g.get('m')}x{g.get('k')}x{g.get('n')}, {g.get('layers')}" if g else "-"
            if p.get("error"):
                out.append([_host(doc), p["family"], str(p["threads"]), "error: " + p["error"], "", "", shape])
            else:
                lat = p.get("latency_ms") or {}
                out.append([_host(doc), p["family"], str(p["threads"]), _f(p["gflops"], ".1f"),
                            fmt_ms(lat.get("min")), fmt_ms(lat.get("median")), shape])
    return out


def rich_tables(docs: Sequence[dict]):
    from rich.markup import escape
    from rich.table import Table

    t = Table(title="edgesr bench (latency: wall time per run; % peak: vs the measured sgemm peak)")
    for h in HEADERS:
        t.add_column(h, justify="right" if h not in ("host", "model", "runtime", "input") else "left",
                     no_wrap=True)
    for r in rows(docs):
        t.add_row(*map(escape, r))
    p = Table(title="measured fp32 peak (large sgemm through each runtime)")
    for h in PEAK_HEADERS:
        p.add_column(h)
    for r in peak_rows(docs):
        p.add_row(*map(escape, r))
    return t, p


def markdown(docs: Sequence[dict]) -> str:
    def table(headers, body):
        lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        lines += ["| " + " | ".join(c.replace("|", "/") for c in r) + " |" for r in body]
        return "\n".join(lines)

    parts = ["# edgesr bench", ""]
    for doc in docs:
        h = doc["host"]
        parts.append(f"- **{_host(doc)}**: {h.get('cpu', '?')} ({h.get('machine', '?')}, {h.get('cpu_count', '?')} "
                     f"cores), {doc.get('created', '?')}, runs {doc.get('settings', {}).get('runs', '?')}, "
                     f"warm-up {doc.get('settings', {}).get('warmup', '?')}, load average "
                     f"{h.get('load_before', '?')} -> {h.get('load_after', '?')}")
    parts += ["", table(HEADERS, rows(docs)), "", "## Measured peak", "", table(PEAK_HEADERS, peak_rows(docs)), "",
              "Latency is the wall time of one `run(x)` on a NCHW float32 array (layout conversion included). "
              "GFLOP/s = 2 x deploy-form MACs / median. *% own peak* is against the same runtime family's sgemm at "
              "the same thread count, *% best peak* against the fastest sgemm of any runtime in the same document "
              "at that thread count (a runtime's convolutions can beat its own GEMM). Memory: each cell runs in its own process; *model MB* is the resident-set "
              "high-water mark during the timed runs minus the resident set before the model was loaded; "
              "*proc MB* is the process's lifetime high-water mark (VmHWM).", ""]
    return "\n".join(parts)


def plot(docs: Sequence[dict], path: str | os.PathLike, local_count: int | None = None) -> Path:
    """Median latency vs output megapixels, one line per (host, model, runtime, threads)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..io import atomic_path

    series: dict[tuple, list[tuple[float, float]]] = {}
    for i, doc in enumerate(docs):
        imported = local_count is not None and i >= local_count
        for r in doc["results"]:
            if r.get("error") or not r.get("output_mpix") or not r.get("latency_ms"):
                continue
            key = (_host(doc), r.get("label") or r.get("artifact") or "?", r["runtime"], r["threads"], imported)
            series.setdefault(key, []).append((r["output_mpix"], r["latency_ms"]["median"]))
    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=110)
    # colour: runtime; marker: thread count; dashed line and open marker: imported (device) results
    runtimes = sorted({k[2] for k in series})
    colours = {rt: plt.get_cmap("tab10")(i % 10) for i, rt in enumerate(runtimes)}
    thread_counts = sorted({k[3] for k in series})
    markers = {t: "osD^vP*Xh"[i % 9] for i, t in enumerate(thread_counts)}
    for key, pts in sorted(series.items(), key=lambda kv: tuple(map(str, kv[0]))):
        host, label, runtime, threads, imported = key
        pts.sort()
        xs, ys = zip(*pts)
        ax.plot(xs, ys, color=colours[runtime], marker=markers[threads], linestyle="--" if imported else "-",
                markerfacecolor="none" if imported else colours[runtime],
                label=f"{host}: {label} · {runtime} · {threads} thr")
    ax.set_xlabel("output megapixels")
    ax.set_ylabel("median latency (ms)")
    any_imported = any(k[4] for k in series)
    ax.set_title("edgesr bench: latency vs output size" + (" (dashed: imported results)" if any_imported else ""))
    ax.grid(True, which="both", alpha=0.3)
    if series:
        all_x = [x for pts in series.values() for x, _ in pts]
        all_y = [y for pts in series.values() for _, y in pts]
        if max(all_x) / min(all_x) > 8:
            ax.set_xscale("log")
        if max(all_y) / min(all_y) > 8:
            ax.set_yscale("log")
        ax.legend(fontsize=7, loc="upper left")
    else:
        ax.text(0.5, 0.5, "no successful results", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    out = Path(path)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return out
