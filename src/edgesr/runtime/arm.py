"""Run exported artifacts on the aarch64 builds of onnxruntime / ai-edge-litert, emulated.

`Aarch64Runner` runs ``tools/arm64/arm_exec.py`` with an aarch64 Python under
``qemu-aarch64-static -L <root>``. The root filesystem is built and cached by
``tools/arm64/build_rootfs.sh`` (see ``tools/arm64/README.md``): aarch64 wheels of the
same numpy / onnxruntime / ai-edge-litert versions as this Python has, and a fake
``/proc/cpuinfo`` of the chosen core so the runtimes pick that core's kernels.

Emulation checks ARM code paths and numerics, not ARM speed: about 7 s per GMAC.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections import deque
from pathlib import Path

import numpy as np

CPUS = ("neoverse-n1", "cortex-a76", "cortex-a72", "cortex-a57", "cortex-a53")
_RUNTIMES = {".onnx": ("onnxruntime", "nchw"), ".tflite": ("ai-edge-litert", "nhwc")}


class Aarch64Error(RuntimeError):
    """The aarch64 emulation could not be set up, or a run inside it failed."""


def _one_line(lines) -> str:
    return " | ".join(s.strip() for s in lines if s.strip())


def tools_dir() -> Path:
    """``tools/arm64`` of the source checkout (or ``$EDGESR_ARM64_TOOLS``)."""
    env = os.environ.get("EDGESR_ARM64_TOOLS")
    d = Path(env) if env else Path(__file__).resolve().parents[3] / "tools" / "arm64"  # src/edgesr/runtime/arm.py
    if not ((d / "build_rootfs.sh").is_file() and (d / "arm_exec.py").is_file()):
        raise Aarch64Error(
            f"aarch64 tools not found at {d}: the ARM runner needs the edgesr source checkout "
            "(install it with `pip install -e <repo>`) or EDGESR_ARM64_TOOLS=<repo>/tools/arm64")
    return d


def ensure_rootfs(cpu: str = "neoverse-n1", timeout: float = 1800.0) -> Path:
    """Build (first time, ~1 min) or find the cached aarch64 root; return the ``-L`` prefix.

    Pins the aarch64 wheels to this interpreter's numpy/onnxruntime/ai-edge-litert versions.
    Build progress goes to stderr.
    """
    if cpu not in CPUS:
        raise Aarch64Error(f"unsupported cpu {cpu!r}; choose one of {', '.join(CPUS)}")
    cmd = ["bash", str(tools_dir() / "build_rootfs.sh"), "--cpu", cpu, "--python", sys.executable]
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
    except OSError as e:
        raise Aarch64Error(f"cannot run {cmd[1]}: {e}") from e
    # a hung download must not hang the caller: kill the script and its apt/pip children
    timed_out = threading.Event()

    def kill() -> None:
        timed_out.set()
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    watchdog = threading.Timer(timeout, kill)
    watchdog.start()
    tail: deque[str] = deque(maxlen=6)
    assert proc.stderr is not None and proc.stdout is not None
    try:
        for line in proc.stderr:  # the build's progress, shown as it happens
            sys.stderr.write(line)
            tail.append(line)
        out = proc.stdout.read().strip().splitlines()
        proc.wait()
    finally:
        watchdog.cancel()
    if timed_out.is_set():
        raise Aarch64Error(f"building the aarch64 rootfs timed out after {timeout:g} s: {_one_line(tail)}")
    if proc.returncode != 0 or not out:
        raise Aarch64Error(f"building the aarch64 rootfs failed (exit {proc.returncode}): {_one_line(tail)}")
    root = Path(out[-1])
    if not (root / "usr/bin/python3.11").exists():
        raise Aarch64Error(f"build_rootfs.sh returned {root}, which has no usr/bin/python3.11")
    return root


class Aarch64Runner:
    """Runner for one artifact on aarch64 onnxruntime (.onnx) or ai-edge-litert (.tflite).

    ``run(x)``: NCHW float32 in [0, 1] -> NCHW float32. ``run_many(xs)`` runs all inputs in
    one emulated process (start-up is ~3 s; each run costs ~7 s per GMAC). After each call,
    ``last_report`` holds arm_exec.py's JSON: machine, runtime versions, load and run times.
    """

    def __init__(self, artifact_path: str | os.PathLike, threads: int = 1, cpu: str = "neoverse-n1",
                 *, layout: str | None = None, timeout: float = 900.0) -> None:
        self.artifact = Path(artifact_path).resolve()
        if not self.artifact.is_file():
            raise Aarch64Error(f"artifact not found: {self.artifact}")
        suffix = self.artifact.suffix.lower()
        if suffix not in _RUNTIMES:
            raise Aarch64Error(f"unsupported artifact {self.artifact.name}: expected .onnx or .tflite")
        runtime, default_layout = _RUNTIMES[suffix]
        self.layout = layout or default_layout
        if self.layout not in ("nchw", "nhwc"):
            raise Aarch64Error(f"layout must be 'nchw' or 'nhwc', not {self.layout!r}")
        if threads < 1:
            raise Aarch64Error(f"threads must be >= 1, not {threads}")
        self.threads = threads
        self.cpu = cpu
        self.timeout = timeout
        self.root = ensure_rootfs(cpu)
        self._arm_exec = tools_dir() / "arm_exec.py"
        self.qemu = shutil.which("qemu-aarch64-static")
        if self.qemu is None:
            raise Aarch64Error("qemu-aarch64-static not found on PATH (apt-get install qemu-user-static)")
        manifest = json.loads((self.root / "edgesr-manifest.json").read_text())
        self.version: str = manifest["packages"][runtime]
        self.name: str = f"{runtime}-aarch64-{cpu}"
        self.last_report: dict | None = None
        # `--int8-io` artifacts take and give uint8 images: quantize here, dequantize the
        # guest's outputs, so callers keep the float [0, 1] contract on both machines.
        from ..errors import EdgeSRError
        from ..export.int8_io import quant_from_metadata
        from ..export.metadata import read_metadata

        try:
            meta = read_metadata(self.artifact)
        except EdgeSRError:  # unreadable here: the guest's runtime gives its own one-line error
            meta = {}
        self.input_quant = quant_from_metadata(meta, "input")
        self.output_quant = quant_from_metadata(meta, "output")
        if meta.get("int8_io") == "true" and (self.input_quant is None or self.output_quant is None):
            raise Aarch64Error(f"{self.artifact.name} says int8_io but its metadata gives no usable "
                               "input/output scale and zero point; re-export it with --int8-io")

    def run(self, x: np.ndarray) -> np.ndarray:
        return self.run_many([x])[0]

    def run_many(self, xs: list[np.ndarray]) -> list[np.ndarray]:
        xs = [np.ascontiguousarray(x, dtype=np.float32) for x in xs]
        if self.input_quant is not None:
            xs = [self.input_quant.quantize(x) for x in xs]
        for x in xs:
            if x.ndim != 4:
                raise Aarch64Error(f"expected NCHW input, got shape {x.shape}")
        if not xs:
            return []
        with tempfile.TemporaryDirectory(prefix="edgesr-arm64-") as tmp:
            tmp = Path(tmp)
            inputs = []
            for i, x in enumerate(xs):
                inputs.append(tmp / f"in_{i:04d}.npy")
                np.save(inputs[-1], x)
            report_path = tmp / "report.json"
            cmd = [self.qemu, "-L", str(self.root), str(self.root / "usr/bin/python3.11"), "-I",
                   str(self._arm_exec), str(self.artifact), *map(str, inputs),
                   "--layout", self.layout, "--threads", str(self.threads),
                   "--out-dir", str(tmp / "out"), "--report", str(report_path)]
            # a clean environment: host LD_*/PYTHON*/OMP_* settings must not reach the guest
            env = {"QEMU_CPU": self.cpu, "LC_ALL": "C.UTF-8", "PATH": "/usr/bin:/bin"}
            try:
                # cwd=tmp: a crashing qemu may write a core file there, deleted with tmp
                proc = subprocess.run(cmd, env=env, cwd=tmp, capture_output=True, text=True,
                                      timeout=self.timeout)
            except subprocess.TimeoutExpired as e:
                raise Aarch64Error(f"aarch64 run of {self.artifact.name} timed out after {self.timeout:g} s") from e
            except OSError as e:
                raise Aarch64Error(f"cannot start {self.qemu}: {e}") from e
            if proc.returncode != 0:
                rc = proc.returncode
                how = f"killed by signal {-rc}" if rc < 0 else f"exit {rc}"
                lines = proc.stderr.splitlines()
                # arm_exec.py ends a Python failure with one "arm_exec: ..." line; a crash
                # (e.g. "qemu: uncaught target signal 11") leaves only the raw tail
                summary = [s for s in lines if s.startswith("arm_exec: ")][-1:]
                tail = _one_line(summary or lines[-5:]) or "(no stderr)"
                raise Aarch64Error(f"aarch64 run of {self.artifact.name} on {self.cpu} failed ({how}): {tail}")
            try:
                report = json.loads(report_path.read_text())
                ys = [np.load(p) for p in report["outputs"]]
            except (OSError, ValueError, KeyError) as e:
                raise Aarch64Error(f"aarch64 run of {self.artifact.name} left no usable outputs: {e}") from e
        if report.get("machine") != "aarch64" or len(ys) != len(xs):
            raise Aarch64Error(f"aarch64 run of {self.artifact.name} reported machine "
                               f"{report.get('machine')!r} and {len(ys)} outputs for {len(xs)} inputs")
        self.last_report = report
        if self.output_quant is not None:
            ys = [self.output_quant.dequantize(y) for y in ys]
        return ys
