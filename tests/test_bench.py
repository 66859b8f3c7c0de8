"""`edgesr bench` / `edgesr bundle` on real runtimes, tiny sizes, few runs.

The bundle's script is run in a fresh virtual environment that holds only its
requirements (numpy + onnxruntime), to prove it needs neither torch nor edgesr.
"""

import contextlib
import io
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from edgesr.bench import SCHEMA, load_result, validate, write_bundle
from edgesr.bench import device_bench as db
from edgesr.bench.peak import Gemm, torch_gemm_module, write_onnx_gemm, write_tflite_gemm
from edgesr.errors import EdgeSRError

SIZE = 32
PY = sys.executable


def cli(*args):
    """The real CLI entry point, in-process (saves a PyTorch import per call): (rc, stdout, stderr)."""
    from edgesr.cli import main

    o, e = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(o), contextlib.redirect_stderr(e):
        rc = main([str(a) for a in args])
    return rc, o.getvalue(), e.getvalue()


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """SPAN x4 exported at 32x32 to both formats (random weights; latency does not care)."""
    from edgesr.pipeline import export_model, obtain_model

    d = tmp_path_factory.mktemp("art")
    loaded = obtain_model("span", None, None, None)
    onnx_path = export_model(loaded, "onnx", size=(SIZE, SIZE), output=d / "span.onnx", verify=False).artifact
    tfl_path = export_model(loaded, "tflite", size=(SIZE, SIZE), output=d / "span.tflite", verify=False).artifact
    return onnx_path, tfl_path


def is_png(path: Path) -> bool:
    data = path.read_bytes()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        return False
    # walk the chunks and check every CRC up to IEND
    pos = 8
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        (crc,) = struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])
        if zlib.crc32(kind + body) != crc:
            return False
        if kind == b"IEND":
            return True
        pos += 12 + n
    return False


def check_result_doc(doc, runtimes, threads):
    validate(doc)
    assert doc["schema"] == SCHEMA
    assert doc["host"]["cpu_count"] >= 1
    got = {(r["runtime"], r["threads"]) for r in doc["results"]}
    assert got == {(rt, t) for rt in runtimes for t in threads}
    for r in doc["results"]:
        assert r["error"] is None, r["error"]
        lat = r["latency_ms"]
        assert len(r["samples_ms"]) == r["runs"]
        assert 0 < lat["min"] <= lat["median"] <= lat["p90"] <= lat["max"]
        assert lat["min"] == pytest.approx(min(r["samples_ms"]), rel=1e-3)
        assert r["input_hw"] == [SIZE, SIZE] and r["output_hw"] == [4 * SIZE, 4 * SIZE]
        assert r["macs"] > 0
        # throughput and GFLOP/s follow from the median
        assert r["throughput_mpix_s"] == pytest.approx(r["output_mpix"] / (lat["median"] / 1e3), rel=1e-9)
        assert r["gflops"] == pytest.approx(2 * r["macs"] / (lat["median"] / 1e3) / 1e9, rel=1e-9)
        # < 100 + a margin: the cell and its sgemm probe are timed at different moments on a shared machine
        assert 0 < r["pct_of_peak"] < 120, (r["runtime"], r["threads"], r["gflops"], r["peak_gflops"])
        assert 0 < r["pct_of_machine_peak"] <= r["pct_of_peak"]
        mem = r["memory"]
        assert mem["rss_before_load_mb"] > 5 and mem["peak_rss_mb"] >= mem["rss_before_load_mb"]
        assert mem["model_mb"] >= 0
    for p in doc["peaks"]:
        assert p["error"] is None, p["error"]
        assert p["gflops"] > 0.5 and p["gemm"]["macs"] == Gemm().macs
        assert p["probes"] == 2  # before and after the cells
        assert p["gflops"] == pytest.approx(2 * p["gemm"]["macs"] / (p["latency_ms"]["min"] / 1e3) / 1e9, rel=1e-9)


# --------------------------------------------------------------------------- pure parts


def test_summary_statistics_and_derived_figures():
    samples = [0.010, 0.012, 0.011, 0.030, 0.009]
    s = db.summarize(samples)
    assert s["min"] == pytest.approx(9.0) and s["median"] == pytest.approx(11.0) and s["max"] == pytest.approx(30.0)
    assert s["median"] <= s["p90"] <= s["max"]
    rec = db.cell_record(runtime="litert", family="litert", threads=2, input_hw=[64, 64], runs=5, warmup=1,
                         samples_s=samples, output_hw=[256, 256], macs=10**9, peak_gflops=400.0)
    assert rec["gflops"] == pytest.approx(2e9 / 0.011 / 1e9)
    assert rec["pct_of_peak"] == pytest.approx(100 * rec["gflops"] / 400.0)
    assert rec["throughput_mpix_s"] == pytest.approx(256 * 256 / 1e6 / 0.011)
    failed = db.cell_record(runtime="litert", family="litert", threads=1, input_hw=[8, 8], runs=5, warmup=1,
                            error="boom")
    assert failed["latency_ms"] is None and failed["error"] == "boom"


def test_validate_rejects_foreign_documents(tmp_path):
    with pytest.raises(EdgeSRError, match="not an edgesr bench result"):
        validate({"results": []})
    with pytest.raises(EdgeSRError, match="schema"):
        validate({"schema": "edgesr.bench/2", "host": {}, "results": [], "peaks": []})
    with pytest.raises(EdgeSRError, match="missing"):
        validate({"schema": SCHEMA, "host": {}, "results": [{"runtime": "x"}], "peaks": []})
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(EdgeSRError, match="cannot read"):
        load_result(bad)


def test_peak_probes_compute_the_gemm_they_claim(tmp_path):
    """The sgemm probes are real matrix products (so their GFLOP/s is a real peak)."""
    import onnxruntime as ort
    import torch
    from ai_edge_litert.interpreter import Interpreter

    g = Gemm(k=64, h=4, w=6, layers=3)
    x = g.input()
    ref = g.reference(x)
    y_onnx = ort.InferenceSession(str(write_onnx_gemm(tmp_path / "g.onnx", g))).run(None, {"x": x})[0]
    it = Interpreter(model_path=str(write_tflite_gemm(tmp_path / "g.tflite", g)), num_threads=1)
    it.allocate_tensors()
    it.set_tensor(it.get_input_details()[0]["index"], np.ascontiguousarray(x.transpose(0, 2, 3, 1)))
    it.invoke()
    y_tfl = it.get_tensor(it.get_output_details()[0]["index"]).transpose(0, 3, 1, 2)
    y_torch = torch_gemm_module(g)(torch.from_numpy(x)).detach().numpy()
    for y in (y_onnx, y_tfl, y_torch):
        assert y.shape == g.input_shape
        np.testing.assert_allclose(y, ref, rtol=0, atol=1e-4 * np.abs(ref).max())
    assert g.macs == g.h * g.w * (g.layers * g.k * g.k + 2 * 3 * g.k)


# --------------------------------------------------------------------------- bench on real runtimes


@pytest.fixture(scope="module")
def local_run(artifacts, tmp_path_factory):
    """`edgesr bench` on both artifacts, 1 thread: JSON, Markdown and plot."""
    d = tmp_path_factory.mktemp("local")
    onnx_path, tfl_path = artifacts
    paths = {"json": d / "r.json", "markdown": d / "r.md", "plot": d / "r.png"}
    rc, out, err = cli("bench", onnx_path, tfl_path, "--threads", "1", "--runs", "3", "--warmup", "1",
                       "--json", paths["json"], "--markdown", paths["markdown"], "--plot", paths["plot"],
                       "--label", "ci")
    assert rc == 0, err
    return paths, out, d


def test_bench_artifacts_json_markdown_plot(local_run):
    paths, out, d = local_run
    doc = load_result(paths["json"])
    check_result_doc(doc, ["onnxruntime", "litert"], [1])
    assert doc["host"]["label"] == "ci"
    assert {r["artifact"] for r in doc["results"]} == {"span.onnx", "span.tflite"}
    assert {(p["family"], p["threads"]) for p in doc["peaks"]} == {("onnxruntime", 1), ("litert", 1)}
    # both runtimes run the same deploy-form graph: same MAC count
    assert len({r["macs"] for r in doc["results"]}) == 1
    # artifact cells run in processes that never load PyTorch (as on a device)
    assert all(r["memory"]["torch_imported"] is False for r in doc["results"])
    assert is_png(paths["plot"])
    md = paths["markdown"].read_text()
    assert "| ci | span" in md and "onnxruntime" in md and "litert" in md
    assert "median ms" in out  # the rich table
    assert sorted(p.name for p in d.iterdir()) == ["r.json", "r.md", "r.png"]  # atomic writes left nothing behind


def test_bench_model_torch_forms_and_export(tmp_path):
    """--model: train and deploy form in eager PyTorch, plus a per-size ONNX export, at 2 threads."""
    out_json = tmp_path / "m.json"
    rc, out, err = cli("bench", "--model", "span", "--sizes", f"{SIZE}x{SIZE}", "--runtimes",
                       "torch-train,torch-deploy,onnxruntime", "--threads", "2", "--runs", "2", "--warmup", "1",
                       "--json", out_json)
    assert rc == 0, err
    doc = load_result(out_json)
    check_result_doc(doc, ["torch-train", "torch-deploy", "onnxruntime"], [2])
    forms = {r["runtime"]: r["form"] for r in doc["results"]}
    assert forms == {"torch-train": "train", "torch-deploy": "deploy", "onnxruntime": "artifact"}
    exported = [r for r in doc["results"] if r["runtime"] == "onnxruntime"][0]
    assert exported["artifact"] == f"span_ch48_x4_{SIZE}x{SIZE}.onnx"
    assert {(p["family"], p["threads"]) for p in doc["peaks"]} == {("torch", 2), ("onnxruntime", 2)}
    torch_cells = [r for r in doc["results"] if r["family"] == "torch"]
    assert all(r["memory"]["torch_imported"] for r in torch_cells)


def test_bench_bad_inputs_are_one_line_errors(artifacts, tmp_path):
    onnx_path, _ = artifacts
    for args, needle in [
        (["bench", onnx_path, "--sizes", "64x64"], "static"),
        (["bench", "--model", "span", "--runtimes", "tensorrt"], "unknown runtime"),
        (["bench", "--import", tmp_path / "missing.json"], "not found"),
        (["bench"], "--model"),
    ]:
        rc, _, err = cli(*args)
        lines = [l for l in err.strip().splitlines() if l.strip()]
        assert rc == 2 and len(lines) == 1 and needle in lines[0], (args, err)


# --------------------------------------------------------------------------- bundle


def test_bundle_refuses_non_empty_output_without_force(artifacts, tmp_path):
    onnx_path, _ = artifacts
    out = tmp_path / "b"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(EdgeSRError, match="not empty"):
        write_bundle(onnx_path, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    write_bundle(onnx_path, out, force=True)
    assert not (out / "keep.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # no temp or backup dirs left


def test_bundle_runs_in_a_fresh_venv_and_imports(artifacts, local_run, tmp_path):
    onnx_path, _ = artifacts
    out = tmp_path / "bundle"
    rc, stdout, err = cli("bundle", onnx_path, "--output", out)
    assert rc == 0, err
    names = sorted(p.name for p in out.iterdir())
    assert "span.onnx" in names and "edgesr_bench.py" in names and "requirements.txt" in names
    assert "README.md" in names and any(n.startswith("peak_gemm") and n.endswith(".onnx") for n in names)
    reqs = [l for l in (out / "requirements.txt").read_text().splitlines() if l and not l.startswith("#")]
    # Pillow: the device script's `upscale` reads and writes images (no torch, no edgesr)
    assert sorted(r.split("==")[0] for r in reqs) == ["Pillow", "numpy", "onnxruntime"]
    assert "edgesr_bench.py" in (out / "README.md").read_text()

    # A genuinely fresh venv with only the bundle's requirements (pip from the local mirror).
    venv = tmp_path / "venv"
    subprocess.run([getattr(sys, "_base_executable", PY), "-m", "venv", "--without-pip", venv], check=True)
    vpy = venv / "bin" / "python"
    pip = subprocess.run([PY, "-m", "pip", "--python", vpy, "install", "-q", "-r", out / "requirements.txt"],
                         capture_output=True, text=True, timeout=240)
    assert pip.returncode == 0, pip.stderr[-2000:]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    for module in ("torch", "edgesr"):  # really absent
        check = subprocess.run([vpy, "-c", f"import {module}"], capture_output=True, cwd=tmp_path, env=env)
        assert check.returncode != 0, module

    dev_json = tmp_path / "device.json"
    proc = subprocess.run([vpy, out / "edgesr_bench.py", "--threads", "1,2", "--runs", "3", "--warmup", "1",
                           "--label", "fake-board", "--json", dev_json], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:] + proc.stdout[-2000:]
    assert "GFLOP/s" in proc.stdout
    doc = load_result(dev_json)
    check_result_doc(doc, ["onnxruntime"], [1, 2])
    assert doc["host"]["label"] == "fake-board"
    assert doc["versions"]["onnxruntime"] and "torch" not in doc["versions"]

    # The device upscale with only the bundle's requirements: an odd-sized photo, tiled at 32x32.
    from edgesr.data import load_image
    from PIL import Image

    photo = tmp_path / "photo.png"
    Image.fromarray((load_image("chelsea")[:37, :45] * 255).round().astype(np.uint8)).save(photo)
    up = subprocess.run([vpy, out / "edgesr_bench.py", "upscale", photo, "--output", tmp_path / "up"],
                        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert up.returncode == 0, up.stderr[-2000:] + up.stdout[-2000:]
    (written,) = (tmp_path / "up").iterdir()
    assert Image.open(written).size == (45 * 4, 37 * 4)

    # Back on the build machine: the device's results beside the local ones.
    png, md = tmp_path / "both.png", tmp_path / "both.md"
    rc, stdout, err = cli("bench", "--import", local_run[0]["json"], "--import", dev_json, "--plot", png,
                          "--markdown", md)
    assert rc == 0, err
    text = md.read_text()
    assert "| fake-board | span" in text and "| ci | span" in text
    assert is_png(png) and "fake-board" in stdout
