"""``edgesr eval``: reports, model forms, dataset layouts and bad input (one line, exit 2, no report)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from edgesr.cli import main
from edgesr.quality.dataset import modcrop, read_rgb8
from edgesr.quality.engine import evaluate, exported_form, load_samples, prepare, torch_form

SHARED = Path(__file__).resolve().parents[2] / "shared"
SET5 = SHARED / "datasets" / "Set5"
PLAINUSR_U = SHARED / "checkpoints" / "PlainUSRU_Rep_x4.pth"  # the smallest checkpoint (x4)
PLAINUSR_U_SET5 = (30.7688, 0.8698)  # pinned in tests/test_quality.py


def run(capsys, *args):
    rc = main([str(a) for a in args])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def assert_one_line_error(rc, err, needle):
    assert rc == 2, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def onnx_artifact(tmp_path_factory):
    """PlainUSR-U x4 exported once as a dynamic ONNX through the CLI."""
    out = tmp_path_factory.mktemp("eval_cli") / "plainusr_u.onnx"
    assert main(["export", "--weights", str(PLAINUSR_U), "--format", "onnx", "--dynamic", "--output", str(out)]) == 0
    return out


def test_eval_weights_writes_json_and_markdown(tmp_path):
    # The real console entry point, as a user runs it.
    js, md = tmp_path / "r.json", tmp_path / "r.md"
    proc = subprocess.run([sys.executable, "-m", "edgesr.cli", "eval", "--weights", str(PLAINUSR_U), "--dataset",
                           str(SET5), "--json", str(js), "--markdown", str(md)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(js.read_text())
    assert {k: doc[k] for k in ("model", "variant", "scale", "form", "dataset")} == {
        "model": "plainusr", "variant": "u", "scale": 4, "form": "torch", "dataset": "Set5"}
    assert doc["runtime"].startswith("torch")
    assert [im["name"] for im in doc["images"]] == ["baby", "bird", "butterfly", "head", "woman"]
    assert set(doc["images"][0]) == {"name", "psnr_y", "ssim_y"}
    assert doc["mean"]["psnr_y"] == pytest.approx(PLAINUSR_U_SET5[0], abs=0.01)
    assert doc["mean"]["ssim_y"] == pytest.approx(PLAINUSR_U_SET5[1], abs=1e-4)
    assert doc["mean"]["psnr_y"] == pytest.approx(np.mean([im["psnr_y"] for im in doc["images"]]))
    text = md.read_text()
    assert "| butterfly |" in text and f"**{doc['mean']['psnr_y']:.4f}**" in text
    assert "30.7" in proc.stdout  # the table is printed too


def test_eval_onnx_artifact_saves_images(capsys, tmp_path, onnx_artifact):
    js, images = tmp_path / "onnx.json", tmp_path / "sr"
    rc, out, err = run(capsys, "eval", onnx_artifact, "--dataset", SET5, "--images", "butterfly,woman",
                       "--runtime", "onnxruntime", "--json", js, "--save-images", images)
    assert rc == 0, err
    doc = json.loads(js.read_text())
    assert (doc["form"], doc["model"], doc["scale"], doc["mode"]) == ("onnx", "plainusr", 4, "whole image")
    assert [im["name"] for im in doc["images"]] == ["butterfly", "woman"]
    saved = sorted(images.glob("*.png"))
    assert [p.name for p in saved] == ["butterfly_plainusr_u_x4.png", "woman_plainusr_u_x4.png"]
    woman_hr = modcrop(read_rgb8(SET5 / "HR" / "woman.png"), 4)
    assert read_rgb8(saved[1]).shape == woman_hr.shape  # 228x344 HR: odd LR 57x86, no crop lost
    reference = torch_form(PLAINUSR_U)
    ref = evaluate(reference, SET5, images=["butterfly", "woman"])
    for a, b in zip(doc["images"], ref.images):
        assert abs(a["psnr_y"] - b["psnr_y"]) < 0.01


def _eval_temp_dirs() -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob("edgesr-eval-*"))


@pytest.fixture(scope="module")
def torch_butterfly_woman():
    return evaluate(torch_form(PLAINUSR_U), SET5, images=["butterfly", "woman"])


def test_eval_weights_as_tflite_exports_per_size_and_runs_whole(capsys, tmp_path, torch_butterfly_woman):
    # --weights --runtime litert: the deployed TFLite model's exact score, one export per LR size.
    before = _eval_temp_dirs()
    js, md = tmp_path / "t.json", tmp_path / "t.md"
    rc, out, err = run(capsys, "eval", "--weights", PLAINUSR_U, "--dataset", SET5, "--runtime", "litert",
                       "--images", "butterfly,woman", "--json", js, "--markdown", md)
    assert rc == 0, err
    doc = json.loads(js.read_text())
    assert (doc["form"], doc["model"], doc["variant"], doc["scale"]) == ("tflite", "plainusr", "u", 4)
    assert doc["mode"] == "whole image, per-size TFLite exports" and doc["tiling"] == ""
    assert doc["runtime"].startswith("ai-edge-litert")
    # butterfly LR 64x64, woman 86x57 (HxW): one export each, both parity-checked
    assert [(e["input_size"], e["parity"]) for e in doc["exports"]] == [("64x64", "pass"), ("86x57", "pass")]
    assert "per-size TFLite exports" in md.read_text() and "86x57 (pass)" in md.read_text()
    assert err.count("exporting tflite") == 2
    for a, b in zip(doc["images"], torch_butterfly_woman.images):
        assert a["name"] == b["name"] and abs(a["psnr_y"] - b["psnr_y"]) <= 0.01
    assert _eval_temp_dirs() == before  # the run's exports are gone


def test_eval_weights_as_onnx_is_one_dynamic_export(capsys, tmp_path, torch_butterfly_woman):
    js = tmp_path / "o.json"
    rc, out, err = run(capsys, "eval", "--weights", PLAINUSR_U, "--dataset", SET5, "--runtime", "onnxruntime",
                       "--images", "butterfly,woman", "--json", js)
    assert rc == 0, err
    doc = json.loads(js.read_text())
    assert (doc["form"], doc["mode"]) == ("onnx", "whole image, one dynamic ONNX export")
    assert [(e["input_size"], e["parity"]) for e in doc["exports"]] == [("dynamic", "pass")]
    for a, b in zip(doc["images"], torch_butterfly_woman.images):
        assert abs(a["psnr_y"] - b["psnr_y"]) <= 0.01


def test_exports_are_removed_when_the_run_fails_after_exporting():
    with pytest.raises(RuntimeError, match="stop"):
        with exported_form(PLAINUSR_U, "litert") as form:
            workdir = form.exporter.workdir
            _, samples = load_samples(SET5, form, limit=["butterfly"])
            prepare(form, samples)
            assert len(list(workdir.glob("*.tflite"))) == 1
            raise RuntimeError("stop")
    assert not workdir.exists()


@pytest.mark.arm64
def test_eval_weights_as_tflite_on_aarch64(capsys, tmp_path, torch_butterfly_woman):
    js = tmp_path / "arm.json"
    rc, out, err = run(capsys, "eval", "--weights", PLAINUSR_U, "--dataset", SET5, "--runtime", "litert",
                       "--arch", "aarch64", "--images", "butterfly", "--json", js)
    assert rc == 0, err
    doc = json.loads(js.read_text())
    assert "aarch64" in doc["runtime"] and doc["mode"] == "whole image, per-size TFLite exports"
    assert abs(doc["images"][0]["psnr_y"] - torch_butterfly_woman.images[0]["psnr_y"]) <= 0.01


def test_missing_lr_is_generated_and_any_image_mode_is_read(capsys, tmp_path):
    # HR only, in four encodings of the same pixels: 8-bit RGB, 16-bit RGB, RGBA, palette-free grey.
    root = tmp_path / "mixed"
    (root / "HR").mkdir(parents=True)
    rgb = modcrop(read_rgb8(SET5 / "HR" / "butterfly.png"), 4)
    Image.fromarray(rgb).save(root / "HR" / "a_rgb8.png")
    _save_png16(root / "HR" / "b_rgb16.png", rgb.astype(np.uint16) * 257)
    Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 128, np.uint8)])).save(root / "HR" / "c_rgba.png")
    grey = np.asarray(Image.fromarray(rgb).convert("L"))
    Image.fromarray(grey).save(root / "HR" / "d_grey.png")
    js = tmp_path / "gen.json"
    rc, out, err = run(capsys, "eval", "--weights", PLAINUSR_U, "--dataset", root, "--json", js)
    assert rc == 0, err
    doc = json.loads(js.read_text())
    assert doc["lr"].startswith("resize-right")
    scores = {im["name"]: im["psnr_y"] for im in doc["images"]}
    assert scores["a_rgb8"] == pytest.approx(scores["b_rgb16"], abs=1e-9)
    assert scores["a_rgb8"] == pytest.approx(scores["c_rgba"], abs=1e-9)
    # The same image from Matlab's LR file scores within 0.1 dB of our generated LR.
    matlab = evaluate(torch_form(PLAINUSR_U), SET5, images=["butterfly"]).images[0]["psnr_y"]
    assert abs(scores["a_rgb8"] - matlab) < 0.1
    assert 20 < scores["d_grey"] < 60


def _save_png16(path: Path, rgb16: np.ndarray) -> None:
    import png

    h, w, _ = rgb16.shape
    with open(path, "wb") as f:
        png.Writer(w, h, greyscale=False, bitdepth=16).write(f, rgb16.reshape(h, w * 3).tolist())


def test_paired_restoration_folder_scores_rgb(capsys, tmp_path):
    # DarkIR (x1) on low/ + high/ pairs: RGB metrics. Seeded random weights saved as a checkpoint.
    from edgesr.pipeline import obtain_model

    ckpt = tmp_path / "darkir.pth"
    torch.save(obtain_model("darkir", variant="m").model.state_dict(), ckpt)
    root = tmp_path / "lol"
    for sub in ("low", "high"):
        (root / sub).mkdir(parents=True)
    for name in ("bird", "head"):
        high = read_rgb8(SET5 / "HR" / f"{name}.png")[:48, :64]
        Image.fromarray(high).save(root / "high" / f"{name}.png")
        Image.fromarray((high // 4).astype(np.uint8)).save(root / "low" / f"{name}.png")
    js = tmp_path / "lol.json"
    rc, out, err = run(capsys, "eval", "--weights", ckpt, "--dataset", root, "--json", js)
    assert rc == 0, err
    doc = json.loads(js.read_text())
    assert (doc["model"], doc["scale"]) == ("darkir", 1)
    assert set(doc["images"][0]) == {"name", "psnr_rgb", "ssim_rgb"}
    assert all(np.isfinite(im["psnr_rgb"]) for im in doc["images"])
    # An SR folder is not a restoration dataset.
    rc, out, err = run(capsys, "eval", "--weights", ckpt, "--dataset", SET5)
    assert_one_line_error(rc, err, "low/ and high/")


# --------------------------------------------------------------------------- bad input


def _sr_folder(tmp_path: Path, lr_size: tuple[int, int] | None = (16, 16)) -> Path:
    root = tmp_path / "ds"
    (root / "HR").mkdir(parents=True)
    Image.fromarray(read_rgb8(SET5 / "HR" / "head.png")[:64, :64]).save(root / "HR" / "head.png")
    if lr_size:
        (root / "LR_bicubic" / "X4").mkdir(parents=True)
        lr = read_rgb8(SET5 / "LR_bicubic" / "X4" / "headx4.png")[: lr_size[0], : lr_size[1]]
        Image.fromarray(np.ascontiguousarray(lr)).save(root / "LR_bicubic" / "X4" / "headx4.png")
    return root


def _bad_dataset(kind: str, tmp_path: Path) -> Path:
    if kind == "empty":
        (tmp_path / "empty" / "HR").mkdir(parents=True)
        return tmp_path / "empty"
    if kind == "no_layout":
        (tmp_path / "flat").mkdir()
        shutil.copy(SET5 / "HR" / "bird.png", tmp_path / "flat" / "bird.png")
        return tmp_path / "flat"
    if kind == "mismatched":
        return _sr_folder(tmp_path, lr_size=(15, 16))
    if kind == "unreadable":
        root = _sr_folder(tmp_path, lr_size=None)
        (root / "HR" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
        return root
    if kind == "missing_lr":
        root = _sr_folder(tmp_path)
        Image.fromarray(read_rgb8(SET5 / "HR" / "bird.png")).save(root / "HR" / "bird.png")
        return root
    raise AssertionError(kind)


@pytest.mark.parametrize("kind, needle", [
    ("empty", "no images in"),
    ("no_layout", "neither HR/"),
    ("mismatched", "does not match HR"),
    ("unreadable", "broken.png"),
    ("missing_lr", "bird.png has no LR image"),
])
def test_bad_dataset_is_one_line_exit_2_and_no_report(capsys, tmp_path, kind, needle):
    root = _bad_dataset(kind, tmp_path)
    js, md = tmp_path / "r.json", tmp_path / "r.md"
    rc, out, err = run(capsys, "eval", "--weights", PLAINUSR_U, "--dataset", root, "--json", js, "--markdown", md)
    assert_one_line_error(rc, err, needle)
    assert not js.exists() and not md.exists()


def test_scale_contradicting_the_model(capsys, tmp_path):
    js = tmp_path / "r.json"
    rc, out, err = run(capsys, "eval", "--weights", PLAINUSR_U, "--dataset", SET5, "--scale", "2", "--json", js)
    assert_one_line_error(rc, err, "--scale 2 contradicts the model")
    assert not js.exists()


def test_artifact_without_edgesr_metadata(capsys, tmp_path, onnx_artifact):
    import onnx

    model = onnx.load(str(onnx_artifact))
    del model.metadata_props[:]
    foreign = tmp_path / "foreign.onnx"
    onnx.save(model, str(foreign))
    js = tmp_path / "r.json"
    rc, out, err = run(capsys, "eval", foreign, "--dataset", SET5, "--json", js)
    assert_one_line_error(rc, err, "no edgesr metadata")
    assert not js.exists()


@pytest.mark.parametrize("args, needle", [
    ([], "one of them"),
    (["--weights", PLAINUSR_U, "--arch", "aarch64"], "add --runtime onnxruntime or litert"),
    (["--weights", PLAINUSR_U, "--runtime", "tensorrt"], "unknown --runtime 'tensorrt'"),
    (["--weights", PLAINUSR_U, "--runtime", "litert", "--arch", "riscv"], "unknown --arch 'riscv'"),
    (["--weights", PLAINUSR_U, "--images", "nobody"], "no image named nobody"),
    (["--weights", PLAINUSR_U, "--runtime", "litert", "--images", "nobody"], "no image named nobody"),
    (["--weights", PLAINUSR_U, "--runtime", "litert", "--scale", "2"], "--scale 2 contradicts the model"),
])
def test_bad_flags(capsys, tmp_path, args, needle):
    # Refused before any export: one line, exit 2, no report, no temp folder left behind.
    before = _eval_temp_dirs()
    js = tmp_path / "r.json"
    rc, out, err = run(capsys, "eval", "--dataset", SET5, "--json", js, *args)
    assert_one_line_error(rc, err, needle)
    assert "exporting" not in err and not js.exists() and _eval_temp_dirs() == before


def test_aarch64_without_its_tools_fails_before_exporting(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGESR_ARM64_TOOLS", str(tmp_path / "no-tools"))
    js = tmp_path / "r.json"
    rc, out, err = run(capsys, "eval", "--weights", PLAINUSR_U, "--dataset", SET5, "--runtime", "litert",
                       "--arch", "aarch64", "--json", js)
    assert_one_line_error(rc, err, "aarch64 tools not found")
    assert "exporting" not in err and not js.exists()


def test_artifact_on_the_wrong_runtime(capsys, onnx_artifact):
    rc, out, err = run(capsys, "eval", onnx_artifact, "--dataset", SET5, "--runtime", "litert")
    assert_one_line_error(rc, err, "runs on --runtime onnxruntime")


def test_unwritable_report_fails_before_any_run(capsys, tmp_path):
    rc, out, err = run(capsys, "eval", "--weights", PLAINUSR_U, "--dataset", SET5, "--json", tmp_path)
    assert_one_line_error(rc, err, "is a directory")
    assert "butterfly" not in out  # nothing was scored
