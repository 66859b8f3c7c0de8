#!/usr/bin/env python
"""A 12-megapixel photo upscaled x4 by PlainUSR (base) through onnxruntime: memory and speed.

    python benchmarks/upscale_12mp.py [--max-tile 512] [--threads 2] [--runs 5] [--keep DIR]

1. Exports ``PlainUSR_Rep_x4.pth`` (the released checkpoint) to a static ONNX whose size
   is fitted to the photo (``fit_tile``: 443x459 for 3000x4000 under 512; ``edgesr export``,
   verified).
2. Synthesises a 4000x3000 photograph by tiling the shipped 192x192 photos (mirrored
   every other copy so the seams between copies are smooth).
3. ``edgesr upscale`` in a fresh process: its peak RSS (``os.wait4``), from its ``--json``
   the seconds in the tiler (model runs + blending: the figure comparable to ``bench``) and
   with quantisation and PNG encoding (streamed in the same loop), and the wall time.
4. ``edgesr bench`` of the same artifact at its own size and thread count: the runtime's
   output megapixels/s on one tile, i.e. the ceiling tiling can reach.

Prints a Markdown table; tiling overhead = 1 - upscale MP/s / bench MP/s.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from edgesr.runtime.tiling import FALLBACK_OVERLAP, fit_tile  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EDGESR = [sys.executable, "-m", "edgesr.cli"]
CHECKPOINT = ROOT.parent / "shared" / "checkpoints" / "PlainUSR_Rep_x4.pth"  # ../shared beside the clone


def synthetic_photo(height: int, width: int) -> np.ndarray:
    """Shipped photos tiled in a mirrored grid and cropped: real content, no hard seams."""
    photos = [np.asarray(Image.open(p).convert("RGB")) for p in sorted((ROOT / "src/edgesr/data/images").glob("*.png"))]
    side = photos[0].shape[0]
    rows = []
    for i in range(-(-height // side)):
        row = []
        for j in range(-(-width // side)):
            p = photos[(i + j) % len(photos)]
            p = p[::-1] if i % 2 else p
            row.append(p[:, ::-1] if j % 2 else p)
        rows.append(np.concatenate(row, axis=1))
    return np.ascontiguousarray(np.concatenate(rows, axis=0)[:height, :width])


def run_measured(cmd: list[str]) -> tuple[int, str, float, float]:
    """(exit code, stdout, wall seconds, peak RSS in GB) of one child process."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        out.seek(0)
        text = out.read()
    return proc.returncode, text, wall, usage.ru_maxrss / 2**20  # ru_maxrss: KiB


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--max-tile", type=int, default=512,
                    help="largest tile side; the artifact's size is fitted to the photo below it (fit_tile)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5, help="edgesr bench timed runs")
    ap.add_argument("--size", default="4000x3000", help="WxH of the synthetic photo")
    ap.add_argument("--keep", type=Path, default=None, help="keep the files in this folder")
    args = ap.parse_args()
    w, h = (int(v) for v in args.size.split("x"))
    # A static artifact sized for the photo: as few tiles as max-tile needs, least extra work
    # (PlainUSR's receptive field is unbounded: the fallback overlap of 16 px).
    th, tw = (fit_tile(n, args.max_tile, FALLBACK_OVERLAP) for n in (h, w))

    work = args.keep or Path(tempfile.mkdtemp(prefix="edgesr-12mp-"))
    work.mkdir(parents=True, exist_ok=True)
    artifact = work / f"plainusr_x4_{th}x{tw}.onnx"
    if not artifact.exists():
        subprocess.run([*EDGESR, "export", "--weights", str(CHECKPOINT), "--format", "onnx",
                        "--input-size", f"{th}x{tw}", "--output", str(artifact)], check=True, cwd=ROOT)
    photo = work / "photo_12mp.png"
    Image.fromarray(synthetic_photo(h, w)).save(photo, compress_level=1)

    result = work / "upscale.json"
    rc, text, wall, rss = run_measured([*EDGESR, "upscale", str(artifact), str(photo), "--output", str(work / "out"),
                                        "--threads", str(args.threads), "--overwrite", "--json", str(result)])
    if rc:
        print(text)
        raise SystemExit(f"edgesr upscale failed (exit {rc})")
    image = json.loads(result.read_text())["images"][0]
    tiles, seconds, mpix_s = image["tiles"], image["seconds"], image["output_mpix_s"]
    tiling_s, tiling_mpix_s = image["tiling_seconds"], image["tiling_mpix_s"]

    bench_json = work / "bench.json"
    subprocess.run([*EDGESR, "bench", str(artifact), "--threads", str(args.threads), "--runs", str(args.runs),
                    "--no-peak", "--json", str(bench_json)], check=True, cwd=ROOT, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    cell = json.loads(bench_json.read_text())["results"][0]
    bench_mpix_s = cell["throughput_mpix_s"]
    out_file = next((work / "out").iterdir())

    cpu = re.sub(r"\s+", " ", subprocess.run(["lscpu"], capture_output=True, text=True).stdout)
    cpu = re.search(r"Model name: (.*?) (?:BIOS|Stepping|CPU family|Thread)", cpu)
    print(f"CPU: {cpu.group(1) if cpu else 'unknown'}, {args.threads} threads; load average "
          f"{os.getloadavg()[0]:.2f}")
    print()
    print("| input | output | tile / overlap | tiles | tiler s (out MP/s) | bench MP/s (one tile) | "
          "tiling overhead | + quantise, PNG s (out MP/s) | wall s | peak RSS |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {w}x{h} ({w * h / 1e6:.0f} MP) | {4 * w}x{4 * h} PNG, {out_file.stat().st_size / 2**20:.0f} MB | "
          f"{th}x{tw} / {FALLBACK_OVERLAP} | {tiles} | {tiling_s:.1f} ({tiling_mpix_s:.2f}) | {bench_mpix_s:.2f} | "
          f"{100 * (1 - tiling_mpix_s / bench_mpix_s):.1f}% | {seconds:.1f} ({mpix_s:.2f}) | {wall:.1f} | "
          f"{rss:.2f} GB |")
    if args.keep is None:
        for p in sorted(work.rglob("*"), reverse=True):
            p.rmdir() if p.is_dir() else p.unlink()
        work.rmdir()
    return 0


if __name__ == "__main__":
    sys.exit(main())
