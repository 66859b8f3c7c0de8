"""Evaluation datasets: SR folders (``HR/`` + ``LR_bicubic/X{s}/``) and paired restoration folders.

SR layout (the shared Set5's, as in the papers' benchmark archives)::

    DIR/HR/<name>.png
    DIR/LR_bicubic/X{s}/<name>x{s}.png     (optional)

HR images are modcropped to a multiple of the scale.  When ``LR_bicubic/X{s}`` is absent
the LR images are made from the modcropped HR with a Matlab-compatible bicubic
``imresize`` (resize-right, cubic kernel with antialiasing, symmetric border handling as
Matlab's index mirroring); on the shared Set5 its 8-bit output is within 1-2 grey levels
of the Matlab-made LR images (PSNR 56.3-58.3 dB, ~10-15% of values off by one;
tests/test_quality.py pins this).

Paired restoration layout (DarkIR, x1): ``DIR/low/<name>`` and ``DIR/high/<name>``
(same file names; the ``input/``+``target/`` spelling is accepted too).

Images of any mode are read as 8-bit RGB (through :mod:`edgesr.imageio`): greyscale is
replicated to three channels, alpha is dropped, 16-bit data is rounded to 8 bits (the
protocol scores 8-bit images).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import EdgeSRError

IMAGE_SUFFIXES = (".png", ".bmp", ".jpg", ".jpeg", ".tif", ".tiff", ".webp")
PAIRED_DIRS = (("low", "high"), ("input", "target"))
LR_SOURCE_FILES = "files"
LR_SOURCE_GENERATED = "resize-right bicubic (Matlab imresize compatible)"


class DatasetError(EdgeSRError):
    """A dataset folder that cannot be evaluated (missing, empty, unreadable, mismatched)."""


@dataclass(frozen=True)
class Sample:
    name: str
    lr: np.ndarray  # (h, w, 3) uint8, the network input
    hr: np.ndarray  # (s*h, s*w, 3) uint8, the reference (modcropped)


@dataclass(frozen=True)
class Dataset:
    """A list of image pairs to score; loading is lazy so a bad pair fails before any run."""

    root: Path
    name: str
    scale: int
    kind: str  # "sr" (Y-channel metrics) or "paired" (RGB metrics, restoration)
    pairs: tuple[tuple[str, Path, Path | None], ...]  # (name, reference path, input path or None)
    lr_source: str

    def __len__(self) -> int:
        return len(self.pairs)

    def samples(self) -> Iterator[Sample]:
        for name, ref_path, in_path in self.pairs:
            yield load_sample(name, ref_path, in_path, self.scale, self.kind)


def read_rgb8(path: Path) -> np.ndarray:
    """Any image file as (H, W, 3) uint8 RGB (decoded by :func:`edgesr.imageio.read_picture`)."""
    from ..imageio import read_picture

    rgb = read_picture(path).rgb  # float32 [0, 1]: grey replicated, alpha split off, 16 bit scaled
    return np.clip(np.round(rgb * 255.0), 0, 255).astype(np.uint8)


def modcrop(image: np.ndarray, scale: int) -> np.ndarray:
    h, w = image.shape[0] - image.shape[0] % scale, image.shape[1] - image.shape[1] % scale
    return image[:h, :w]


def bicubic_downscale(hr: np.ndarray, scale: int) -> np.ndarray:
    """Matlab ``imresize(hr, 1/scale, 'bicubic')`` of a modcropped uint8 image, as uint8."""
    from resize_right import interp_methods, resize

    lr = resize(hr.astype(np.float64), scale_factors=[1 / scale, 1 / scale, 1], interp_method=interp_methods.cubic,
                antialiasing=True, pad_mode="symmetric")
    return np.clip(np.round(lr), 0, 255).astype(np.uint8)


def load_sample(name: str, ref_path: Path, in_path: Path | None, scale: int, kind: str) -> Sample:
    ref = read_rgb8(ref_path)
    if kind == "paired":
        low = read_rgb8(in_path)
        if low.shape != ref.shape:
            raise DatasetError(f"{name}: input {_size(low)} and reference {_size(ref)} differ in size")
        return Sample(name, low, ref)
    hr = modcrop(ref, scale)
    if min(hr.shape[:2]) < scale:
        raise DatasetError(f"{name}: HR image {_size(ref)} is smaller than the scale x{scale}")
    if in_path is None:
        return Sample(name, bicubic_downscale(hr, scale), hr)
    lr = read_rgb8(in_path)
    if lr.shape[0] * scale != hr.shape[0] or lr.shape[1] * scale != hr.shape[1]:
        raise DatasetError(f"{name}: LR image {_size(lr)} does not match HR {_size(ref)} at x{scale} "
                           f"(expected {hr.shape[1] // scale}x{hr.shape[0] // scale})")
    return Sample(name, lr, hr)


def _size(a: np.ndarray) -> str:
    return f"{a.shape[1]}x{a.shape[0]}"


def _images(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def open_dataset(root: str | Path, scale: int, restoration: bool = False) -> Dataset:
    """The dataset at ``root`` for a model of ``scale`` (``restoration``: x1 paired layout wanted)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder not found: {root}")
    paired = next(((root / a, root / b) for a, b in PAIRED_DIRS if (root / a).is_dir() and (root / b).is_dir()), None)
    if paired is not None:
        return _paired_dataset(root, *paired, scale)
    if (root / "HR").is_dir():
        if restoration:
            raise DatasetError(f"{root} is an SR dataset (HR/); a restoration model needs paired low/ and high/ folders")
        return _sr_dataset(root, scale)
    raise DatasetError(f"{root} has neither HR/ (super-resolution) nor low/ + high/ (paired restoration) folders")


def _sr_dataset(root: Path, scale: int) -> Dataset:
    hr_images = _images(root / "HR")
    if not hr_images:
        raise DatasetError(f"no images in {root / 'HR'}")
    lr_dir = root / "LR_bicubic" / f"X{scale}"
    pairs = []
    if lr_dir.is_dir():
        for hr in hr_images:
            lr = next((p for p in (lr_dir / f"{hr.stem}x{scale}{hr.suffix}", lr_dir / hr.name) if p.is_file()), None)
            if lr is None:
                raise DatasetError(f"{hr.name} has no LR image in {lr_dir} (expected {hr.stem}x{scale}{hr.suffix})")
            pairs.append((hr.stem, hr, lr))
        source = LR_SOURCE_FILES
    else:
        pairs = [(hr.stem, hr, None) for hr in hr_images]
        source = LR_SOURCE_GENERATED
    return Dataset(root, root.name, scale, "sr", tuple(pairs), source)


def _paired_dataset(root: Path, low_dir: Path, high_dir: Path, scale: int) -> Dataset:
    if scale != 1:
        raise DatasetError(f"{root} is a paired restoration dataset ({low_dir.name}/ + {high_dir.name}/): "
                           f"it scores x1 models, not x{scale}")
    high = _images(high_dir)
    if not high:
        raise DatasetError(f"no images in {high_dir}")
    pairs = []
    for ref in high:
        low = low_dir / ref.name
        if not low.is_file():
            raise DatasetError(f"{ref.name} of {high_dir} has no input image {low}")
        pairs.append((ref.stem, ref, low))
    return Dataset(root, root.name, 1, "paired", tuple(pairs), LR_SOURCE_FILES)
