"""The README's error contract, class by class (issue 14).

- no data loss: no command writes over one of its inputs (same path, hard link, symlink,
  a folder holding it);
- bad input and a refusing environment (full disk, read-only file system, directory as
  output) exit 2 with one line, never 3;
- nothing left behind: failed or interrupted (SIGINT, SIGTERM) runs leave no folder or temp file;
- validation before work: outputs, sizes and thread counts are refused before a model loads.
"""

import contextlib
import json
import os
import pickle
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import edgesr
from conftest import SHARED, assert_one_line_error, run_cli
from edgesr.cli import main
from edgesr.errors import CheckpointError

CHECKPOINT = SHARED / "checkpoints/PlainUSRU_Rep_x4.pth"  # 86 KB, real, x4
SET5 = SHARED / "datasets/Set5"
FAST = 5.0  # seconds: a refusal before any work is far below this even on a loaded 2-core machine


def cli(capsys, *args):
    """In-process `edgesr ARGS`: (rc, stderr) with the one-line contract checked by callers."""
    rc = main([str(a) for a in args])
    return rc, capsys.readouterr().err


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A copy of a real checkpoint, its ONNX export and a bench result (built once)."""
    d = tmp_path_factory.mktemp("hardening")
    ck = d / "plainusr_u.pth"
    shutil.copy(CHECKPOINT, ck)
    art = d / "u.onnx"
    assert main(["export", "-w", str(ck), "-f", "onnx", "--input-size", "16x16", "-o", str(art)]) == 0
    bench = d / "bench.json"
    assert main(["bench", str(art), "--runs", "1", "--warmup", "0", "--threads", "1", "--no-peak",
                 "--json", str(bench)]) == 0
    return {"dir": d, "ck": ck, "art": art, "bench": bench}


def snapshot(*paths):
    return {p: Path(p).read_bytes() for p in paths}


# --------------------------------------------------------------------------- no data loss


def _same_path_cases(w, tmp):
    ck, art, bench = w["ck"], w["art"], w["bench"]
    hard, sym = tmp / "hard.pth", tmp / "sym.pth"
    os.link(ck, hard)
    os.symlink(ck, sym)
    bench_png = tmp / "bench.png"  # a bench document that happens to be named like the plot
    shutil.copy(bench, bench_png)
    art_dir = tmp / "bundle_src"
    art_dir.mkdir()
    shutil.copy(art, art_dir / art.name)
    return [
        (["reparam", "-w", ck, "-o", ck], ck),
        (["reparam", "-w", ck, "-o", hard], ck),
        (["reparam", "-w", sym, "-o", ck], ck),
        (["reparam", "-w", ck, "-o", Path(os.path.relpath(ck))], ck),
        (["export", "-w", ck, "-f", "onnx", "-o", ck], ck),
        (["export", "-w", tmp / "x.onnx.json", "-f", "onnx", "-o", tmp / "x.onnx"], None),  # report over input
        (["parity", art, "-w", ck, "--json", art], art),
        (["parity", art, "-w", ck, "--markdown", ck], ck),
        (["parity", art, "-w", ck, "--json", tmp / "p.txt", "--markdown", tmp / "p.txt"], None),
        (["bench", art, "--json", art], art),
        (["bench", art, "--markdown", art], art),
        (["bench", "--import", bench_png, "--plot", bench_png], bench_png),
        (["bundle", art_dir / art.name, "-o", art_dir, "--force"], art_dir / art.name),
        (["eval", "-w", ck, "-d", SET5, "--json", ck], ck),
        (["upscale", "-w", ck, art_dir, "-o", art_dir], art_dir / art.name),
    ]


def test_no_command_writes_over_its_inputs(work, tmp_path, capsys):
    (tmp_path / "x.onnx.json").write_text("{}")
    for args, guarded in _same_path_cases(work, tmp_path):
        before = snapshot(*[p for p in (work["ck"], work["art"], work["bench"], guarded) if p])
        t = time.perf_counter()
        rc, err = cli(capsys, *args)
        assert_one_line_error(rc, err, 2)
        assert "refusing to write" in err or "same file" in err, (args, err)
        assert time.perf_counter() - t < FAST, args  # refused before loading anything
        assert snapshot(*before) == before, args


def test_parity_outputs_may_not_coincide(work, tmp_path, capsys):
    out = tmp_path / "both"
    rc, err = cli(capsys, "parity", work["art"], "-w", work["ck"], "--json", out, "--markdown", out)
    assert_one_line_error(rc, err, 2, "same file")


# --------------------------------------------------------------------------- exit codes


def _bad_checkpoints(d: Path) -> dict[str, Path]:
    files = {
        "random bytes": os.urandom(4096),
        "text": b"this is a README, not weights\n" * 20,
        "raw pickle of a dict": pickle.dumps({"a": 1}, protocol=2),
        "raw pickle of code": pickle.dumps(os.system, protocol=2),
        "empty": b"",
        "truncated zip": CHECKPOINT.read_bytes()[:5000],
        "fake safetensors header": (30).to_bytes(8, "little") + b'{"a": {"dtype": "F32"}}' + b"\0" * 20,
    }
    out = {}
    for i, (what, data) in enumerate(files.items()):
        p = d / f"bad{i}.pth"
        p.write_bytes(data)
        out[what] = p
    (d / "folder.pth").mkdir()
    out["a folder"] = d / "folder.pth"
    return out


def test_unreadable_checkpoints_raise_checkpoint_error(tmp_path, capsys):
    for what, path in _bad_checkpoints(tmp_path).items():
        with pytest.raises(CheckpointError):
            edgesr.load_model(path)
        rc, err = cli(capsys, "export", "-w", path, "-f", "onnx", "-o", tmp_path / "o.onnx")
        assert_one_line_error(rc, err, 2)
        assert path.name in err, (what, err)
    assert not (tmp_path / "o.onnx").exists()


def test_raw_pickle_refusal_prints_no_library_warning(tmp_path):
    ck = tmp_path / "code.pth"
    ck.write_bytes(pickle.dumps(os.system, protocol=2))
    rc, _, err = run_cli("reparam", "-w", ck, "-o", tmp_path / "o.safetensors")
    assert_one_line_error(rc, err, 2, "refusing to load")
    assert len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("args, needle", [
    (["export", "-m", "span", "-f", "coreml"], "see `edgesr export --help`"),
    (["export", "-m", "span", "-f", "onnx", "--no-such-flag"], "No such option"),
    (["exprot", "-m", "span"], "see `edgesr --help`"),
    (["parity"], "Missing argument"),
    (["bench", "--runs", "many"], "see `edgesr bench --help`"),
])
def test_usage_errors_are_one_line(args, needle, capsys):
    rc, err = cli(capsys, *args)
    assert_one_line_error(rc, err, 2, needle)
    assert len(err.strip().splitlines()) == 1, err


def test_output_that_is_a_directory(work, tmp_path, capsys):
    d, w = tmp_path / "adir.onnx", tmp_path / "adir.safetensors"
    d.mkdir()
    w.mkdir()
    for args in (["parity", work["art"], "-w", work["ck"], "--json", d],
                 ["parity", work["art"], "-w", work["ck"], "--markdown", d],
                 ["bench", work["art"], "--json", d],
                 ["export", "-w", work["ck"], "-f", "onnx", "-o", d],
                 ["reparam", "-w", work["ck"], "-o", w]):
        t = time.perf_counter()
        rc, err = cli(capsys, *args)
        assert_one_line_error(rc, err, 2, "is a directory")
        assert time.perf_counter() - t < FAST, args


@contextlib.contextmanager
def small_filesystem(path: Path, read_only: bool = False):
    """A 64 KiB tmpfs at ``path`` (optionally read-only); yields why not when mount is refused."""
    path.mkdir(exist_ok=True)
    opts = "size=64k" + (",ro" if read_only else "")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        yield (proc.stderr or proc.stdout).strip() or f"mount exited {proc.returncode}"
        return
    try:
        yield None
    finally:
        subprocess.run(["umount", str(path)], check=True)


def _writing_commands(work, target: Path):
    return [
        ["reparam", "-w", work["ck"], "-o", target / "deploy.safetensors"],
        ["export", "-w", work["ck"], "-f", "onnx", "--input-size", "16x16", "--no-verify", "-o", target / "m.onnx"],
        ["parity", work["art"], "-w", work["ck"], "--json", target / "p.json"],
        ["bench", work["art"], "--runs", "1", "--warmup", "0", "--threads", "1", "--no-peak",
         "--json", target / "b.json", "--markdown", target / "b.md"],
        ["bundle", work["art"], "-o", target / "bundle"],
        ["eval", "-w", work["ck"], "-d", SET5, "--images", "bird", "--json", target / "e.json"],
        ["upscale", "-w", work["ck"], SET5 / "LR_bicubic" / "X4" / "birdx4.png", "-o", target / "up"],
    ]


def test_full_disk_is_exit_2_with_path_and_reason(work, tmp_path, capsys):
    disk = tmp_path / "disk"
    with small_filesystem(disk) as refused:
        if refused:
            # No mount permission here: a file standing where a folder must go is the closest
            # environment refusal that still exercises the same OSError -> exit 2 path.
            print(f"full-disk test fell back (mount refused: {refused})")
            disk = tmp_path / "not_a_dir"
            disk.write_text("x")
            reason = "not a directory"
        else:
            with contextlib.suppress(OSError), open(disk / "filler", "wb") as f:
                while True:  # fill the disk to the last block
                    f.write(b"\0" * 1024)
            reason = "No space left on device"
        for args in _writing_commands(work, disk):
            rc, err = cli(capsys, *args)
            assert_one_line_error(rc, err, 2)
            assert reason in err and str(disk) in err, (args, err)
            leftovers = sorted(p.name for p in disk.iterdir()) if disk.is_dir() else []
            assert leftovers in ([], ["filler"]), (args, leftovers)
        assert refused is None or disk.is_file()  # the fallback ran (and said why above)


def test_read_only_file_system_refused_before_work(work, tmp_path, capsys):
    ro = tmp_path / "ro"
    with small_filesystem(ro, read_only=True) as refused:
        if refused:
            print(f"read-only test fell back to a mode-0500 folder (mount refused: {refused})")
            ro.chmod(0o500)
            if os.access(ro, os.W_OK):  # root ignores mode bits: nothing read-only can be made here
                pytest.fail(f"cannot make a read-only place: mount refused ({refused}) and running as root")
        for args in _writing_commands(work, ro):
            t = time.perf_counter()
            rc, err = cli(capsys, *args)
            assert_one_line_error(rc, err, 2, "read-only file system" if refused is None else "permission denied")
            assert time.perf_counter() - t < FAST, args
        assert list(ro.iterdir()) == []


# --------------------------------------------------------------------------- nothing left behind


def test_failed_runs_create_no_output_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    ck = tmp_path / "u.pth"
    shutil.copy(CHECKPOINT, ck)
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(os.urandom(2048))
    for args in (["bundle", bad, "-o", "n1/n2/bundle"],
                 ["parity", bad, "--json", "n1/p.json"],
                 ["reparam", "-w", bad, "-o", "n1/d.safetensors"],
                 ["export", "-w", "missing.pth", "-f", "onnx"],
                 ["export", "-w", ck, "-m", "span", "-f", "onnx"],           # wrong architecture
                 ["export", "-w", ck, "--scale", "2", "-f", "onnx"],         # wrong scale
                 ["export", "-m", "span", "-f", "onnx", "--input-size", "100000x100000"],
                 ["export", "-m", "safmn", "-f", "onnx", "--input-size", "30x30"]):
        rc, err = cli(capsys, *args)
        assert_one_line_error(rc, err, 2)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx", "u.pth"], args


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupted_export_leaves_nothing(tmp_path, sig, code):
    proc = subprocess.Popen([sys.executable, "-m", "edgesr.cli", "export", "-w", str(CHECKPOINT), "-f", "onnx",
                             "--input-size", "16x16"], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not list(tmp_path.glob("edgesr-out/.edgesr-*")):  # the export has begun writing
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert_one_line_error(proc.returncode, err, code, f"interrupted ({sig.name})")
    assert list(tmp_path.iterdir()) == [], list(tmp_path.rglob("*"))


def test_export_report_names_final_paths_and_io_contract(work):
    report = json.loads(Path(str(work["art"]) + ".json").read_text())
    assert report["export"]["path"] == str(work["art"])
    assert ".edgesr-" not in json.dumps(report)
    md = Path(str(work["art"]) + ".md").read_text()
    assert "## I/O contract" in md
    assert f"`{report['export']['metadata']['input_name']}`" in md and "NCHW" in md
    assert "[1, 3, 16, 16]" in md and "[1, 3, 64, 64]" in md  # x4


def test_bundle_folder_honours_umask(work, tmp_path, capsys):
    old = os.umask(0o022)
    try:
        assert main(["bundle", str(work["art"]), "-o", str(tmp_path / "b")]) == 0
    finally:
        os.umask(old)
    assert (tmp_path / "b").stat().st_mode & 0o777 == 0o755


# --------------------------------------------------------------------------- validation before work


@pytest.mark.parametrize("args, needle", [
    (["export", "-m", "span", "-f", "onnx", "--threads", "0"], "--threads must be >= 1"),
    (["export", "-m", "span", "-f", "onnx", "--threads", "-1"], "--threads must be >= 1"),
    (["parity", "{art}", "--threads", "0"], "--threads must be >= 1"),
    (["bench", "{art}", "--threads", "0"], "thread counts must be >= 1"),
    (["bench", "{art}", "--plot", "out.txt"], "should end in .png"),
    (["export", "-m", "span", "-f", "onnx", "--input-size", "100000x100000"], "too large"),
    (["bench", "-m", "span", "--sizes", "9000"], "too large"),
])
def test_refused_before_work(args, needle, work, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    t = time.perf_counter()
    rc, err = cli(capsys, *[str(a).format(art=work["art"]) for a in args])
    assert_one_line_error(rc, err, 2, needle)
    assert time.perf_counter() - t < FAST
    assert list(tmp_path.iterdir()) == []


def test_memory_bound_on_input_size():
    from edgesr.errors import SizeRuleError
    from edgesr.pipeline import MAX_INPUT_SIDE, max_input_pixels, parse_size

    assert parse_size("256") == (256, 256)  # documented shorthand
    with pytest.raises(SizeRuleError, match="per side"):
        parse_size(f"16x{MAX_INPUT_SIDE + 1}")
    budget = max_input_pixels()
    side = int(budget**0.5) + 1
    if side <= MAX_INPUT_SIDE:  # machines under 64 GB: the memory bound is the binding one
        with pytest.raises(SizeRuleError, match="memory"):
            parse_size(f"{side}x{side}")


# --------------------------------------------------------------------------- friction


def _cpu_seconds(*argv) -> float:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def test_models_listing_builds_nothing():
    # CPU time, not wall time: a loaded CI machine slows both alike.  Building and counting every
    # variant costs ~100 CPU-seconds; the listing must cost about what importing the registry costs.
    baseline = _cpu_seconds("-c", "import edgesr.cli, edgesr.models")
    extra = _cpu_seconds("-m", "edgesr.cli", "models") - baseline
    assert extra < 3.0, extra


def test_stored_model_figures_are_current():
    from edgesr.catalog import figure_key, measure, stored_figures
    from edgesr.models.registry import all_specs, get_spec

    stored = stored_figures()
    assert {figure_key(s.name, v.name) for s in all_specs() for v in s.variants} <= set(stored)
    assert measure(get_spec("span"), "ch28") == stored["span/ch28"]  # the cheapest variant, re-measured
