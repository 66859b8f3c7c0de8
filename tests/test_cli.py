"""The CLI front door: one-line errors with exit code 2, nothing left behind on failure."""

import json
import os
from pathlib import Path

import pytest
import torch

import edgesr
from conftest import assert_one_line_error, run_cli
from edgesr.cli import main


@pytest.mark.parametrize(
    "args, needle",
    [
        (["export", "--model", "esrgan", "--format", "onnx"], "unknown model"),
        (["export", "--model", "span", "--variant", "ch99", "--format", "onnx"], "unknown variant"),
        (["export", "--model", "span", "--scale", "8", "--format", "onnx"], "no x8"),
        (["export", "--model", "safmn", "--format", "onnx", "--input-size", "30x30"], "divisible by 8"),
        (["export", "--model", "span", "--format", "tflite", "--dynamic"], "only supported for ONNX"),
        (["export", "--model", "span", "--format", "onnx", "--input-size", "abc"], "bad size"),
        (["export", "--weights", "missing.pth", "--format", "onnx"], "not found"),
    ],
)
def test_bad_input_is_one_line_exit_2(args, needle, tmp_path):
    rc, out, err = run_cli(*args, "--output", tmp_path / "x.onnx" if "tflite" not in args else tmp_path / "x.tflite")
    assert_one_line_error(rc, err, 2, needle)
    assert list(tmp_path.iterdir()) == []


def test_unknown_format_is_usage_error(tmp_path):
    rc, out, err = run_cli("export", "--model", "span", "--format", "coreml")
    assert_one_line_error(rc, err, 2, "see `edgesr export --help`")


def test_checkpoint_errors_via_cli(tmp_path):
    missing = tmp_path / "[red]" / "[/]missing.pth"  # markup-like path: the error must quote it verbatim
    rc, _, err = run_cli("export", "--weights", missing, "--format", "onnx", "--output", tmp_path / "a.onnx")
    assert_one_line_error(rc, err, 2, "not found")
    assert "[red]" in err and "[/]missing.pth" in err
    sd = edgesr.create_model("span").state_dict()
    ck = tmp_path / "span.pth"
    torch.save({"params": sd}, ck)
    rc, _, err = run_cli("export", "--weights", ck, "--model", "safmn", "--format", "onnx",
                         "--output", tmp_path / "a.onnx")
    assert_one_line_error(rc, err, 2, "looks like span")
    assert not (tmp_path / "a.onnx").exists()


def test_unwritable_output(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):  # root ignores permission bits: use a path under a file instead
            target = tmp_path / "afile"
            target.write_text("x")
            out = target / "m.onnx"
        else:
            out = ro / "m.onnx"
        rc, _, err = run_cli("export", "--model", "span", "--format", "onnx", "--input-size", "16x16", "--output", out)
        assert_one_line_error(rc, err, 2)
    finally:
        ro.chmod(0o700)


def test_export_span_onnx_end_to_end(tmp_path):
    # a directory name that is also rich console markup must be printed verbatim, not parsed
    tmp_path = tmp_path / "[bold]" / "[/x]"
    out = tmp_path / "span.onnx"
    rc, stdout, err = run_cli("export", "--model", "span", "--format", "onnx", "--input-size", "24x20", "--output", out)
    assert rc == 0, err
    assert "seeded random weights" in err
    report = json.loads(Path(str(out) + ".json").read_text())
    assert report["passed"] is True
    assert report["parity"]["cases"] and all(c["passed"] for c in report["parity"]["cases"])
    assert any("photo" in c["input"] for c in report["parity"]["cases"])
    assert str(out) in stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["span.onnx", "span.onnx.json", "span.onnx.md"]


def test_reparam_command_writes_loadable_deploy_checkpoint(tmp_path):
    sd = edgesr.create_model("span", scale=2).state_dict()
    ck = tmp_path / "train.pth"
    torch.save({"params_ema": sd}, ck)
    out = tmp_path / "deploy.safetensors"
    rc, stdout, err = run_cli("reparam", "--weights", ck, "--output", out)
    assert rc == 0, err
    assert out.exists() and "max-abs deviation" in stdout


def test_models_lists_every_registered_variant(capsys):
    from edgesr.models.registry import all_specs

    assert main(["models"]) == 0
    listing = capsys.readouterr().out
    assert all(v.name in listing for spec in all_specs() for v in spec.variants)


def test_parity_failure_exits_1_and_marks_the_artifact(tmp_path, monkeypatch, capsys):
    """A missed threshold keeps the artifact (for inspection) but marks it failed everywhere."""
    from dataclasses import replace

    from edgesr.export.metadata import read_metadata
    from edgesr.runtime import parity

    strict = replace(parity.THRESHOLDS["fp32"], max_abs=0.0)  # nothing non-trivial passes a zero bound
    monkeypatch.setitem(parity.THRESHOLDS, "fp32", strict)
    out = tmp_path / "span.onnx"
    rc = main(["export", "--model", "span", "--scale", "2", "--format", "onnx", "--input-size", "16x12",
               "--output", str(out)])
    assert rc == 1
    assert "parity FAILED" in capsys.readouterr().err
    report = json.loads(Path(str(out) + ".json").read_text())
    assert report["passed"] is False
    assert read_metadata(out)["parity"].startswith("FAILED")


def test_parity_command_x86_with_images_json_markdown(tmp_path):
    from PIL import Image

    out = tmp_path / "m.tflite"
    assert main(["export", "--model", "safmnpp", "--variant", "light", "--format", "tflite",
                 "--input-size", "16x24", "--output", str(out)]) == 0
    images = tmp_path / "imgs"
    images.mkdir()
    Image.open(Path(edgesr.__file__).parent / "data" / "images" / "coffee.png").save(images / "c.png")
    j, md = tmp_path / "p.json", tmp_path / "p.md"
    rc = main(["parity", str(out), "--images", str(images), "--json", str(j), "--markdown", str(md)])
    assert rc == 0
    rep = json.loads(j.read_text())
    assert rep["passed"] and {c["input"].split()[0] for c in rep["cases"]} == {"random(seed=0)", "image[0]"}
    assert "PASSED" in md.read_text()
    # A static artifact cannot be checked at another size; a missing artifact is a clean error.
    assert main(["parity", str(out), "--sizes", "32x32"]) == 2
    assert main(["parity", str(tmp_path / "missing.onnx")]) == 2


@pytest.mark.parametrize("model, variant, loads_as", [("span", "ch48", "ch48-deploy"), ("plainusr", "base-train", "base"),
                                                      ("safmn", "base", None)])
def test_reparam_output_reloads_as_its_deploy_layout(tmp_path, model, variant, loads_as):
    """`edgesr reparam` writes a checkpoint `load_model` detects (and says so when a family has none)."""
    torch.manual_seed(0)
    train = edgesr.create_model(model, variant=variant)
    ck = tmp_path / "train.pth"
    torch.save({"params": train.state_dict()}, ck)
    out = tmp_path / "deploy.safetensors"
    rc, stdout, err = run_cli("reparam", "--weights", ck, "--output", out)
    assert rc == 0, err
    if loads_as is None:
        assert "no deploy checkpoint layout" in err
        return
    assert "warning" not in err
    deployed = edgesr.load_model(out)
    assert deployed.edgesr_info["variant"] == loads_as
    x = torch.rand(1, 3, 21, 19)
    with torch.no_grad():
        assert (deployed(x) - train(x)).abs().max() <= 1e-4
