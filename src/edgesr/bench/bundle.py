"""`edgesr bundle`: a folder to copy to an ARM board or an Android phone and benchmark there.

Contents: the artifact (plus its ONNX external-data file, if any), ``edgesr_bench.py``
(this package's ``device_bench.py`` with the artifact's facts filled in; needs only
numpy plus onnxruntime or ai-edge-litert), the sgemm probe model for "% of peak",
``requirements.txt`` and ``README.md``.  The script writes the ``edgesr.bench/1`` JSON
that ``edgesr bench --import`` reads.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

from ..errors import EdgeSRError
from ..io import umask
from . import device_bench
from .core import FORMAT_RUNTIME, _deploy_macs_fn, _label, _model_info, artifact_sizes
from .peak import DEFAULT_GEMM, Gemm, write_gemm_model

SCRIPT_NAME = "edgesr_bench.py"
_MARK = 'BUNDLE = json.loads(r"""{}""")  # EDGESR-BUNDLE'
_MODULES_MARK = "EMBEDDED_MODULES: dict = {}  # EDGESR-MODULES"
_RUNTIME_PACKAGE = {"onnxruntime": "onnxruntime", "litert": "ai-edge-litert"}


def bundle_script(info: dict) -> str:
    """The device script with ``info`` embedded."""
    src = Path(device_bench.__file__).read_text()
    if src.count(_MARK) != 1:
        raise RuntimeError("device_bench.py lost its EDGESR-BUNDLE marker line")
    payload = json.dumps(info, indent=1, sort_keys=True)
    if '"""' in payload:
        raise EdgeSRError("artifact metadata contains a triple quote; cannot embed it")
    if src.count(_MODULES_MARK) != 1:
        raise RuntimeError("device_bench.py lost its EDGESR-MODULES marker line")
    src = src.replace(_MARK, f'BUNDLE = json.loads(r"""{payload}""")  # EDGESR-BUNDLE', 1)
    return src.replace(_MODULES_MARK, f"EMBEDDED_MODULES: dict = {embedded_sources()!r}  # EDGESR-MODULES", 1)


def embedded_sources() -> dict[str, str]:
    """The device upscale's modules, verbatim: one algorithm, tested here, run there."""
    from .. import imageio
    from ..runtime import tiling

    return {"tiling": Path(tiling.__file__).read_text(), "imageio": Path(imageio.__file__).read_text()}


def _external_data_files(path: Path) -> list[Path]:
    """Side files an ONNX model's initializers point to (dynamo export writes ``x.onnx.data``)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    names: set[str] = set()
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            for e in t.external_data:
                if e.key == "location":
                    names.add(e.value)
    files = []
    for n in sorted(names):
        f = path.parent / n
        if not f.is_file():
            raise EdgeSRError(f"{path.name} refers to external data {n} that is not beside it")
        if Path(n).is_absolute() or ".." in Path(n).parts:
            raise EdgeSRError(f"{path.name} refers to external data outside its folder: {n}")
        files.append(f)
    return files


def write_bundle(artifact: str | os.PathLike, output: str | os.PathLike, force: bool = False,
                 sizes: Sequence[tuple[int, int]] | None = None, gemm: Gemm = DEFAULT_GEMM) -> Path:
    from ..export.metadata import artifact_format, read_metadata

    art = Path(artifact)
    out = Path(output)
    if not art.is_file():
        raise EdgeSRError(f"artifact not found: {art}")
    if out.exists() and not out.is_dir():
        raise EdgeSRError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise EdgeSRError(f"{out} is not empty; pass --force to replace it")
    fmt = artifact_format(art)
    runtime = FORMAT_RUNTIME[fmt]
    meta = read_metadata(art)
    hws = artifact_sizes(meta, sizes, art)
    info_model = _model_info(meta)
    macs = {}
    if info_model:
        cache: dict = {}
        for hw in hws:
            n = _deploy_macs_fn(info_model, fmt, hw, cache)()
            if n:
                macs[f"{hw[0]}x{hw[1]}"] = n
    dynamic = meta.get("dynamic") == "true" or meta.get("input_size") == "dynamic"
    extra = _external_data_files(art) if fmt == "onnx" else []

    parent = out.parent if str(out.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=parent))
    os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes 0700; the bundle gets the user's umask like any folder
    old: Path | None = None
    try:
        shutil.copy2(art, tmp / art.name)
        for f in extra:
            shutil.copy2(f, tmp / f.name)
        peak = write_gemm_model(runtime, tmp, gemm)
        info = {
            "artifact": {
                "file": art.name, "format": fmt, "runtime": runtime,
                "layout": meta.get("layout") or ("NHWC" if fmt == "tflite" else "NCHW"),
                "dynamic": dynamic, "input_hw": None if dynamic else list(hws[0]),
                "sizes": [list(hw) for hw in hws], "macs": macs, "label": _label(meta) or art.name,
                "model": meta.get("model"), "variant": meta.get("variant"),
                "scale": int(meta["scale"]) if str(meta.get("scale", "")).isdigit() else None,
                # what `upscale` needs to tile: the size rule and the receptive field
                "min_size": int(meta.get("min_size") or 1), "multiple_of": int(meta.get("multiple_of") or 1),
                "receptive_field": meta.get("receptive_field"),
            },
            "peak": {"file": peak.name, "gemm": gemm.as_dict()},
            "edgesr_version": _version("edgesr"),
        }
        script = tmp / SCRIPT_NAME
        script.write_text(bundle_script(info))
        script.chmod(0o755)
        (tmp / "requirements.txt").write_text(requirements(runtime))
        (tmp / "README.md").write_text(readme(info, extra))
        if out.exists():
            if force:
                old = parent / f".{out.name}.old-{os.getpid()}"
                os.replace(out, old)
            else:  # an empty directory: rename(2) replaces it
                out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return out


def _version(pkg: str) -> str | None:
    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return None


def requirements(runtime: str) -> str:
    """Exactly the versions this machine used (parity was established with them)."""
    pkg = _RUNTIME_PACKAGE[runtime]
    lines = ["# edgesr device benchmark and upscale: these and nothing else (no torch, no edgesr);",
             "# Pillow is for `upscale` only (pypng, if installed, keeps 16-bit RGB PNGs at 16 bits)"]
    for name in ("numpy", "Pillow", pkg):
        v = _version(name)
        lines.append(f"{name}=={v}" if v else name)
    return "\n".join(lines) + "\n"


def readme(info: dict, extra: Sequence[Path]) -> str:
    a = info["artifact"]
    runtime, pkg = a["runtime"], _RUNTIME_PACKAGE[a["runtime"]]
    size = "dynamic (pass --sizes HxW)" if a["dynamic"] else "x".join(map(str, a["input_hw"]))
    files = [f"- `{a['file']}`: the artifact ({a['format']}, {a['layout']}, input {size})"]
    files += [f"- `{f.name}`: its external weights (keep beside it)" for f in extra]
    files += [f"- `{SCRIPT_NAME}`: the benchmark (one file; numpy + {pkg})",
              f"- `{info['peak']['file']}`: a {info['peak']['gemm']['macs'] / 1e9:.2f} GMAC sgemm probe; "
              f"its speed on {runtime} is the device's fp32 peak for \"% of peak\"",
              "- `requirements.txt`: the exact packages (same versions as on the machine that built this bundle)"]
    return f"""# edgesr device benchmark: {a['label']}

Measures latency (median, p90, min), throughput, achieved GFLOP/s, % of the device's
measured sgemm peak and memory of `{a['file']}` on {runtime}, and writes a JSON file that
`edgesr bench --import` tabulates and plots beside results from other machines.

{chr(10).join(files)}

## Linux on an ARM board (Raspberry Pi OS 64-bit, Debian/Ubuntu arm64, Jetson, ...)

Needs a 64-bit (aarch64) Python >= 3.11 (numpy 2.4 requires it); {pkg} publishes
manylinux aarch64 wheels.  The pins are the build machine's versions; on an older Python,
loosen them (the JSON records the versions that actually ran).

```sh
python3 -m venv venv
venv/bin/pip install -r requirements.txt
venv/bin/python {SCRIPT_NAME} --label my-board
```

## Android (Termux)

The {pkg} wheels on PyPI are manylinux (glibc) builds; Termux's Python uses Android's
bionic libc and cannot load them.  Run the Linux steps inside a glibc userland:

```sh
pkg install proot-distro
proot-distro install debian
proot-distro login debian -- bash -c "apt update && apt install -y python3-venv"
proot-distro login debian --bind "$PWD:/bench"   # then: cd /bench, and the Linux commands above
```

## Options

```
python {SCRIPT_NAME} [--threads 1,4] [--runs 10] [--warmup 2] [--label NAME] [--json OUT.json] [--no-peak]
```

- `--threads`: comma list (default: 1 and all cores). On big.LITTLE phones compare 1, the
  number of big cores, and all cores.
- Each measurement runs in its own process, so memory figures are per model and per
  thread count; keep the device otherwise idle (and plugged in: thermal throttling shows
  up as a large p90/median gap).
- MACs for "% of peak" were counted on the build machine for the bundled sizes
  ({', '.join(a['macs']) or 'unknown: no edgesr model metadata'}); other sizes report no GFLOP/s.

## Upscaling photos on the device

```sh
venv/bin/python {SCRIPT_NAME} upscale photo.jpg [more.png folder/ ...] [--output upscaled] [--format png|jpg|webp] [--overwrite]
```

The same tiling (tiles of the artifact's input size, overlapping and cross-faded; images of
any size, padded by reflection where needed) and image handling (greyscale, alpha, palette,
16-bit PNG, EXIF orientation, ICC profile) as `edgesr upscale`: the script embeds edgesr's
own modules.  Outputs are `<name>_{'-'.join(str(a[k]) for k in ('model', 'variant') if a.get(k)) or 'model'}_x{a.get('scale')}.<format>`;
unreadable inputs are listed and the exit code is 2.

## Back on the build machine

```sh
edgesr bench --import bench_my-board.json --markdown device.md --plot device.png
edgesr bench {a['file']} --import bench_my-board.json --plot compare.png   # beside local figures
```
"""
