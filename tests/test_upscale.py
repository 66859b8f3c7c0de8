"""`edgesr upscale` end to end: real checkpoint (shipped PlainUSR-S x4), real ONNX artifact, real photos.

One fixed 48x48 ONNX export serves every test (tiles of 48 with overlap); the bundle's
device script is checked on aarch64 under qemu against the x86 CLI output.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from edgesr import imageio
from edgesr.cli import main
from edgesr.pipeline import export_model, obtain_model
from edgesr.runtime.runners import TorchRunner
from edgesr.runtime.tiling import upscale_array
from edgesr.upscale import SAMPLE_WEIGHTS, Job, Summary, open_upscaler, upscale_files

PHOTOS = Path(__file__).resolve().parents[1] / "src" / "edgesr" / "data" / "images"
TILE = 48
LABEL = "plainusr-s_x4"


def photo(h: int, w: int, name: str = "chelsea") -> np.ndarray:
    """A uint8 RGB crop of a shipped photograph."""
    return np.asarray(Image.open(PHOTOS / f"{name}.png").convert("RGB"))[20 : 20 + h, 30 : 30 + w]


def out_path(folder: Path, stem: str, fmt: str = "png") -> Path:
    return folder / f"{stem}_{LABEL}.{fmt}"


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    loaded = obtain_model(None, weights=SAMPLE_WEIGHTS)
    path = tmp_path_factory.mktemp("upscale") / "plainusr_s_48.onnx"
    export_model(loaded, "onnx", size=(TILE, TILE), output=path, verify=False)
    return path


@pytest.fixture(scope="module")
def torch_run():
    return TorchRunner(obtain_model(None, weights=SAMPLE_WEIGHTS).model, threads=2).run


def upscale(artifact: Path, *args) -> int:
    return main(["upscale", str(artifact), *map(str, args), "--threads", "2"])


def test_shipped_checkpoint_is_the_attributed_file():
    import hashlib

    assert hashlib.sha256(SAMPLE_WEIGHTS.read_bytes()).hexdigest() == \
        "874b274f27c0174df744fd22eec9dea907f484014100479f822e609dda86f919"
    assert "MIT" in (SAMPLE_WEIGHTS.parent / "ATTRIBUTION.md").read_text()


def test_odd_sizes_smaller_and_larger_than_the_tile(artifact, torch_run, tmp_path):
    ins = tmp_path / "in"
    ins.mkdir()
    sizes = {"tiny": (7, 9), "odd": (45, 31), "wide": (37, 101)}  # below, around and above 48
    for stem, (h, w) in sizes.items():
        Image.fromarray(photo(h, w)).save(ins / f"{stem}.png")
    assert upscale(artifact, ins, "--output", tmp_path / "out") == 0
    for stem, (h, w) in sizes.items():
        got = np.asarray(Image.open(out_path(tmp_path / "out", stem)), dtype=np.float32)
        assert got.shape == (4 * h, 4 * w, 3)
        # whole-image PyTorch of the same checkpoint, quantised the same way; sides shorter
        # than a tile are reflect-padded to it in both (the artifact cannot take less)
        ref = upscale_array(torch_run, photo(h, w).astype(np.float32) / 255, 4, size_rule={"min_size": TILE})
        ref = np.rint(np.clip(ref, 0, 1) * 255)
        mse = np.mean((got - ref) ** 2) / 255**2
        assert 10 * np.log10(1 / max(mse, 1e-12)) >= 50, stem


def test_rgba_alpha_is_upscaled_separately(artifact, tmp_path):
    rgb = photo(30, 40)
    alpha = np.tile(np.linspace(0, 255, 40, dtype=np.float32), (30, 1)).astype(np.uint8)
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(tmp_path / "a.png")
    Image.fromarray(rgb).save(tmp_path / "b.png")
    assert upscale(artifact, tmp_path / "a.png", tmp_path / "b.png", "--output", tmp_path / "out") == 0
    with_alpha = np.asarray(Image.open(out_path(tmp_path / "out", "a")))
    without = np.asarray(Image.open(out_path(tmp_path / "out", "b")))
    assert with_alpha.shape == (120, 160, 4)
    np.testing.assert_array_equal(with_alpha[..., :3], without)  # colour unaffected by alpha
    bicubic = Image.fromarray(alpha.astype(np.float32) / 255, "F").resize((160, 120), Image.BICUBIC)
    expected = np.rint(np.clip(np.asarray(bicubic), 0, 1) * 255)
    assert np.abs(with_alpha[..., 3].astype(int) - expected).max() <= 1


def test_greyscale_palette_and_16_bit_modes(artifact, tmp_path):
    rgb = photo(20, 24)
    Image.fromarray(rgb).convert("L").save(tmp_path / "grey.png")
    pal = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
    pal.save(tmp_path / "pal.png", transparency=0)
    deep = (rgb.astype(np.uint16) * 257 + np.arange(24, dtype=np.uint16)[None, :, None])  # uses the low byte
    imageio.write_picture(tmp_path / "deep.png", deep, "png")
    assert upscale(artifact, tmp_path / "grey.png", tmp_path / "pal.png", tmp_path / "deep.png",
                   "--output", tmp_path / "out") == 0
    out = tmp_path / "out"
    assert Image.open(out_path(out, "grey")).mode == "L"
    assert Image.open(out_path(out, "pal")).mode == "RGBA"  # palette + transparency -> RGBA
    pic = imageio.read_picture(out_path(out, "deep"))
    assert pic.bits == 16 and not pic.grey and pic.size == (80, 96)
    levels = np.unique(np.rint(pic.rgb * 65535).astype(np.int64) % 257)
    assert len(levels) > 10  # genuinely 16-bit values, not 8-bit ones scaled by 257


def test_exif_orientation_and_icc_profile(artifact, tmp_path):
    from PIL import ImageCms

    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.fromarray(photo(20, 30)).save(tmp_path / "rot.jpg", exif=exif.tobytes(), icc_profile=icc, quality=95)
    upright = np.asarray(ImageOps.exif_transpose(Image.open(tmp_path / "rot.jpg")))
    Image.fromarray(upright).save(tmp_path / "upright.png")
    assert upscale(artifact, tmp_path / "rot.jpg", tmp_path / "upright.png", "--output", tmp_path / "out") == 0
    rotated = Image.open(out_path(tmp_path / "out", "rot"))
    assert rotated.size == (80, 120)  # displayed orientation: 20 wide, 30 high -> x4
    assert rotated.info.get("icc_profile") == icc
    np.testing.assert_array_equal(np.asarray(rotated), np.asarray(Image.open(out_path(tmp_path / "out", "upright"))))


def test_mixed_good_and_bad_inputs(artifact, tmp_path, capsys):
    good = tmp_path / "good.png"
    Image.fromarray(photo(16, 16)).save(good)
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.png").write_text("not an image")
    (tmp_path / "cut.png").write_bytes((PHOTOS / "coffee.png").read_bytes()[:2000])
    bad = ["empty.png", "notes.png", "cut.png", "missing.png"]
    rc = upscale(artifact, good, *(tmp_path / b for b in bad), "--output", tmp_path / "out")
    err = capsys.readouterr().err
    assert rc == 2
    assert out_path(tmp_path / "out", "good").is_file()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [out_path(tmp_path, "good").name]
    failed = [line for line in err.splitlines() if line.startswith("failed:")]
    assert len(failed) == 4 and all(any(b in line for line in failed) for b in bad)
    assert "Traceback" not in err and "4 of 5 input(s) failed" in err


def test_user_errors_are_one_line(artifact, tmp_path, capsys):
    img = tmp_path / "x.png"
    Image.fromarray(photo(16, 16)).save(img)
    blocker = tmp_path / "file"
    blocker.write_text("")
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        ([str(artifact), str(img), "--output", str(blocker / "sub")], "not a directory"),
        ([str(artifact), str(img), "--output", str(tmp_path / "o"), "--tile", "32x32"], "fixed input size 48x48"),
        (["--weights", str(SAMPLE_WEIGHTS), str(img), "--output", str(tmp_path / "o"), "--tile", "4x4"], "size rule"),
        ([str(artifact), str(img), "--output", str(tmp_path / "o"), "--runtime", "litert"], "runs on onnxruntime"),
        ([str(artifact), str(img), "--output", str(tmp_path / "o"), "--format", "gif"], "unknown --format"),
        ([str(artifact), str(empty), "--output", str(tmp_path / "o")], "no images found"),
    ]
    for argv, message in cases:
        assert main(["upscale", *argv]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "o").exists()


def test_existing_outputs_are_kept_unless_overwrite(artifact, tmp_path, capsys):
    img = tmp_path / "x.png"
    Image.fromarray(photo(16, 16)).save(img)
    target = out_path(tmp_path / "out", "x")
    target.parent.mkdir()
    target.write_bytes(b"mine")
    assert upscale(artifact, img, "--output", tmp_path / "out") == 0
    assert target.read_bytes() == b"mine" and "exists (use --overwrite)" in capsys.readouterr().err
    assert upscale(artifact, img, "--output", tmp_path / "out", "--overwrite") == 0
    assert Image.open(target).size == (64, 64)
    assert upscale(artifact, img, "--output", tmp_path / "out") == 0  # a re-run never reads its outputs
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [target.name]


def test_interrupt_leaves_no_partial_file(artifact, tmp_path):
    img = tmp_path / "x.png"
    Image.fromarray(photo(100, 100)).save(img)
    up = open_upscaler(artifact, threads=2)
    real, calls = up.run, [0]

    def interrupted_after_two_tiles(x):  # Ctrl-C arriving in the middle of an image
        calls[0] += 1
        if calls[0] > 2:
            raise KeyboardInterrupt
        return real(x)

    up.run = interrupted_after_two_tiles
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        upscale_files(up, [Job(img, out_path(out, "x"))], "png", False, Summary())
    assert not out.exists() or list(out.iterdir()) == []


# --------------------------------------------------------------------------- on the device


def _aarch64_pillow(root: Path) -> Path:
    """Pillow's aarch64 wheel (same version as here) unpacked beside the cached rootfs."""
    from PIL import __version__ as version

    target = root.parent / f"pillow-{version}-aarch64"
    if not (target / "PIL").is_dir():
        tmp = target.with_name(target.name + ".part")
        shutil.rmtree(tmp, ignore_errors=True)
        platforms = ["--platform", "manylinux2014_aarch64"]
        for m in range(17, 40):
            platforms += ["--platform", f"manylinux_2_{m}_aarch64"]
        subprocess.run([sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-compile",
                        "--only-binary=:all:", *platforms, "--python-version", "3.11", "--implementation", "cp",
                        "--abi", "cp311", "--target", str(tmp), f"pillow=={version}"],
                       check=True, capture_output=True, text=True)
        os.replace(tmp, target)
    return target


@pytest.mark.arm64
def test_bundle_upscale_on_aarch64_matches_x86(artifact, tmp_path):
    from edgesr.bench.bundle import SCRIPT_NAME, write_bundle
    from edgesr.runtime.arm import ensure_rootfs

    img = tmp_path / "photo.png"
    Image.fromarray(photo(37, 53)).save(img)  # odd, larger than one 48 tile: blending runs
    assert upscale(artifact, img, "--output", tmp_path / "x86") == 0
    bundle = write_bundle(artifact, tmp_path / "bundle")

    prefix = ensure_rootfs("neoverse-n1")
    root = Path(os.path.realpath(prefix / "usr")).parent  # the tree behind the per-core prefix
    pillow = _aarch64_pillow(root)
    script = bundle / SCRIPT_NAME
    code = ("import sys, runpy; sys.path.insert(0, sys.argv[1]); sys.argv = sys.argv[2:]; "
            "runpy.run_path(sys.argv[0], run_name='__main__')")
    proc = subprocess.run(
        [shutil.which("qemu-aarch64-static"), "-L", str(prefix), str(prefix / "usr/bin/python3.11"), "-I", "-c",
         code, str(pillow), str(script), "upscale", str(img), "--output", str(tmp_path / "arm"), "--threads", "1"],
        env={"QEMU_CPU": "neoverse-n1", "LC_ALL": "C.UTF-8", "PATH": "/usr/bin:/bin"},
        cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    arm = np.asarray(Image.open(out_path(tmp_path / "arm", "photo")), dtype=np.int64)
    x86 = np.asarray(Image.open(out_path(tmp_path / "x86", "photo")), dtype=np.int64)
    assert arm.shape == x86.shape == (148, 212, 3)
    # parity bound: the runtimes agree to ~1e-5, i.e. at most one 8-bit rounding step
    assert np.abs(arm - x86).max() <= 1
