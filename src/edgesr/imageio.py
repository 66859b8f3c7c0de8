"""Reading and writing the photos ``edgesr upscale`` works on -- numpy + Pillow (+ pypng).

Self-contained like :mod:`edgesr.runtime.tiling` (no other edgesr import is required):
the device bundle embeds this source so ``run.py upscale`` reads and writes images the
same way on a board that has only numpy, Pillow and a runtime.  ``pypng`` (pure Python)
is optional there; without it 16-bit PNGs are read at 8 bits.

What is kept from the input:

- **Modes.** RGB and RGBA as they are; greyscale (1, L, LA, 16-bit I;16/I) is upscaled as
  RGB with equal channels and written back as greyscale (ITU-R 601 luma of the result);
  palette images (P, PA) are expanded to RGB, or RGBA when they carry transparency, and
  written as such (re-quantising to a palette would undo the upscale); CMYK/YCbCr/LAB are
  converted to RGB (their ICC profile, which describes the old space, is dropped).
- **Alpha** is upscaled separately with bicubic resampling (chaiNNer's approach: the
  networks are trained on RGB only), clipped to [0, 1].
- **16-bit PNGs** (grey or RGB, with or without alpha) are read at full precision through
  pypng (Pillow has no 16-bit RGB mode) and written as 16-bit PNGs by :func:`write_png`
  (a streaming writer: no copy of a huge output); ``jpg``/``webp``
  outputs are 8-bit by definition.
- **EXIF orientation** is applied to the pixels (so the output needs no orientation tag);
  the **ICC profile** is copied into the output.
"""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

try:  # inside edgesr: a user error (one line, exit 2); embedded in the device script: plain
    from .errors import EdgeSRError as _ErrorBase
except ImportError:
    _ErrorBase = Exception

try:
    import png as _pypng
except ImportError:  # the device bundle may run without it: 16-bit PNGs then read at 8 bits
    _pypng = None

FORMATS = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm", ".pgm", ".pnm", ".tga")
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601, what Pillow's convert("L") uses
_EXIF_ORIENTATION = 0x0112


class ImageReadError(_ErrorBase):
    """A file that is not a readable image (one line: the path and the reason)."""


@dataclass
class Picture:
    """A decoded image: ``rgb`` (H, W, 3) float32 in [0, 1] plus what to write back."""

    rgb: np.ndarray
    alpha: np.ndarray | None  # (H, W) float32 in [0, 1], or None
    grey: bool  # write the result as greyscale
    bits: int  # 8 or 16 (per channel)
    icc: bytes | None
    mode: str  # the file's own mode, for messages

    @property
    def size(self) -> tuple[int, int]:
        return self.rgb.shape[0], self.rgb.shape[1]


# --------------------------------------------------------------------------- reading


def read_picture(path: str | os.PathLike) -> Picture:
    """Decode ``path`` fully (truncated files fail here, not half-way through an upscale)."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise ImageReadError(f"cannot read {path}: empty file")
        with Image.open(path) as im:
            im.load()
            orientation = _orientation(im)
            icc = im.info.get("icc_profile") or None
            if _is_16bit_png(im) and _pypng is not None:
                pic = _read_png16(path, icc)
            else:
                pic = _from_pil(im, icc)
    except ImageReadError:
        raise
    except UnidentifiedImageError:
        raise ImageReadError(f"cannot read {path}: not an image file Pillow can decode") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        reason = getattr(e, "strerror", None) or (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ImageReadError(f"cannot read {path}: {reason}") from None
    except Image.DecompressionBombError as e:
        raise ImageReadError(f"cannot read {path}: {e}") from None
    return _oriented(pic, orientation)


def _orientation(im: Image.Image) -> int:
    try:
        return int(im.getexif().get(_EXIF_ORIENTATION, 1) or 1)
    except Exception:  # a broken EXIF block must not make the pixels unreadable
        return 1


def _is_16bit_png(im: Image.Image) -> bool:
    # Pillow decodes 16-bit RGB(A) PNGs to 8 bits and says so nowhere but in the mode of
    # greyscale ones; the IHDR bit depth is the reliable source.
    if im.format != "PNG":
        return False
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        return True
    fp = getattr(im, "filename", None)
    if not fp:
        return False
    with open(fp, "rb") as f:
        head = f.read(26)
    return len(head) >= 25 and head[12:16] == b"IHDR" and head[24] == 16


def _read_png16(path: Path, icc: bytes | None) -> Picture:
    width, height, rows, info = _pypng.Reader(filename=str(path)).asDirect()
    planes = int(info["planes"])
    data = np.vstack([np.asarray(r, dtype=np.uint16) for r in rows]).reshape(height, width, planes)
    maxval = float(2 ** int(info["bitdepth"]) - 1)
    values = data.astype(np.float32) / maxval
    grey = planes in (1, 2)
    colour = np.repeat(values[..., :1], 3, axis=2) if grey else values[..., :3]
    alpha = values[..., -1] if planes in (2, 4) else None
    return Picture(np.ascontiguousarray(colour), alpha, grey, 16, icc, f"PNG {int(info['bitdepth'])}-bit")


def _from_pil(im: Image.Image, icc: bytes | None) -> Picture:
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        grey16 = np.clip(np.asarray(im).astype(np.float32) / 65535.0, 0.0, 1.0)
        return Picture(np.repeat(grey16[..., None], 3, axis=2), None, True, 16, icc, mode)
    if mode == "F":
        raise ImageReadError(f"cannot read {getattr(im, 'filename', 'image')}: 32-bit float images are not supported")
    if mode in ("P", "PA"):
        im = im.convert("RGBA" if mode == "PA" or "transparency" in im.info else "RGB")
    elif mode == "1":
        im = im.convert("L")
    elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        im, icc = im.convert("RGB"), None
    elif mode not in ("L", "LA", "RGB", "RGBA"):
        im = im.convert("RGBA" if "A" in mode else "RGB")
    arr = np.asarray(im, dtype=np.float32)
    arr *= 1.0 / 255.0  # in place: a 12-MP photo is 144 MB in float32
    if im.mode in ("L", "LA"):
        arr = arr[..., None] if arr.ndim == 2 else arr
        rgb = np.repeat(arr[..., :1], 3, axis=2)
        alpha = arr[..., 1] if im.mode == "LA" else None
        return Picture(rgb, alpha, True, 8, icc, mode)
    alpha = arr[..., 3] if im.mode == "RGBA" else None
    return Picture(np.ascontiguousarray(arr[..., :3]), alpha, False, 8, icc, mode)


def _oriented(pic: Picture, orientation: int) -> Picture:
    """Apply an EXIF orientation (1-8) to the pixels, as ``ImageOps.exif_transpose`` does."""
    def fix(a):
        if a is None or orientation in (0, 1) or orientation > 8:
            return a
        if orientation == 2:
            a = a[:, ::-1]
        elif orientation == 3:
            a = a[::-1, ::-1]
        elif orientation == 4:
            a = a[::-1]
        elif orientation == 5:
            a = a.swapaxes(0, 1)
        elif orientation == 6:
            a = np.rot90(a, -1)
        elif orientation == 7:
            a = a[::-1, ::-1].swapaxes(0, 1)
        elif orientation == 8:
            a = np.rot90(a, 1)
        return np.ascontiguousarray(a)

    pic.rgb, pic.alpha = fix(pic.rgb), fix(pic.alpha)
    return pic


# --------------------------------------------------------------------------- converting


def output_bits(pic: Picture, fmt: str) -> int:
    """16 only where the file format can hold it (PNG) and the input had it."""
    return 16 if pic.bits == 16 and fmt == "png" else 8


def new_output(height: int, width: int, pic: Picture, bits: int) -> np.ndarray:
    """The integer buffer the upscaled colour is assembled into, block by block."""
    channels = (1 if pic.grey else 3) + (1 if pic.alpha is not None else 0)
    return np.empty((height, width, channels), dtype=np.uint16 if bits == 16 else np.uint8)


def store_block(out: np.ndarray, top: int, left: int, block: np.ndarray, grey: bool) -> None:
    """Quantise a float block (unclamped) into ``out``'s colour channels at ``(top, left)``.

    Works in place on ``block`` (the tiler's blocks are scratch once handed out): a 512-px
    x4 tile is 50 MB of float32, and copies of it add up at 12 MP.
    """
    maxval = 65535.0 if out.dtype == np.uint16 else 255.0
    if grey:
        block = (block @ _LUMA)[..., None]
    np.clip(block, 0.0, 1.0, out=block)
    block *= maxval
    np.rint(block, out=block)
    out[top : top + block.shape[0], left : left + block.shape[1], : block.shape[2]] = block


def upscaled_bands(pic: Picture, blocks, scale: int, fmt: str):
    """Yield ``(top, band)``: final integer rows of the output (colour quantised, alpha added).

    ``blocks`` are the tiler's ``(top, left, block)`` floats; the blocks of one tile row
    share their rows, so a band is one tile row of the output.  Only that band exists in
    integer form at a time: a 12-MP x4 output (0.6 GB in uint8, 2.3 GB in float32) is never
    held whole when it is streamed to PNG.
    """
    h, w = pic.size
    template = new_output(0, scale * w, pic, output_bits(pic, fmt))
    alpha = None if pic.alpha is None else Image.fromarray(np.ascontiguousarray(pic.alpha, dtype=np.float32), "F")
    band, band_top = None, 0
    for top, left, block in blocks:
        if band is None or top != band_top:
            if band is not None:
                yield band_top, _add_alpha(band, band_top, alpha, scale)
            band, band_top = np.empty((block.shape[0], *template.shape[1:]), dtype=template.dtype), top
        store_block(band, 0, left, block, pic.grey)
    if band is not None:
        yield band_top, _add_alpha(band, band_top, alpha, scale)


def _add_alpha(band: np.ndarray, top: int, alpha: Image.Image | None, scale: int) -> np.ndarray:
    """Alpha rows ``[top, top + rows)`` of the bicubic upscale, into the band's last channel.

    Pillow's ``box`` resamples just those rows, reading source pixels beyond the box for
    the filter support, so the bands join up to the whole-image bicubic resize.
    """
    if alpha is None:
        return band
    rows, width = band.shape[:2]
    src_w = alpha.size[0]
    part = alpha.resize((width, rows), Image.BICUBIC, box=(0, top / scale, src_w, (top + rows) / scale))
    maxval = 65535.0 if band.dtype == np.uint16 else 255.0
    band[..., -1] = np.rint(np.clip(np.asarray(part), 0.0, 1.0) * maxval).astype(band.dtype)
    return band


def assemble(pic: Picture, blocks, scale: int, fmt: str) -> np.ndarray:
    """The whole integer output of ``pic`` (for formats that cannot be streamed)."""
    h, w = pic.size
    out = new_output(scale * h, scale * w, pic, output_bits(pic, fmt))
    for top, band in upscaled_bands(pic, blocks, scale, fmt):
        out[top : top + band.shape[0]] = band
    return out


def write_upscaled(path: str | os.PathLike, pic: Picture, blocks, scale: int, fmt: str) -> None:
    """Run the tiler's ``blocks`` into an image file: PNG streamed band by band, others whole."""
    if fmt == "png":
        h, w = pic.size
        template = new_output(0, scale * w, pic, output_bits(pic, fmt))
        bands = (band for _, band in upscaled_bands(pic, blocks, scale, fmt))
        write_png_bands(path, (scale * h, scale * w, template.shape[2]), template.dtype, bands, pic.icc)
    else:
        write_picture(path, assemble(pic, blocks, scale, fmt), fmt, pic.icc)


def output_name(source: str | os.PathLike, label: str, scale: int, fmt: str) -> str:
    """``<stem>_<model label>_x<scale>.<fmt>``: the input's stem, what made it, and how much."""
    return f"{Path(source).stem}_{label}_x{scale}.{fmt}"


# --------------------------------------------------------------------------- writing


def write_picture(path: str | os.PathLike, pixels: np.ndarray, fmt: str, icc: bytes | None = None) -> None:
    """Write ``pixels`` (H, W, C) uint8/uint16, C = 1 grey, 2 grey+alpha, 3 RGB, 4 RGBA.

    ``path`` may be a temp name (the format comes from ``fmt``, not the suffix).  PNG is
    written by :func:`write_png` (any depth, streaming); JPEG/WebP through Pillow, 8-bit.
    JPEG has no alpha channel: it is dropped there.
    """
    if fmt == "png":
        write_png(path, pixels, icc)
        return
    if pixels.dtype != np.uint8:
        raise ValueError(f"{fmt} output is 8-bit only")
    channels = pixels.shape[2]
    if fmt == "jpg" and channels in (2, 4):
        pixels = pixels[..., : channels - 1]
        channels -= 1
    mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[channels]
    im = Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode=mode)
    if fmt == "webp" and mode in ("L", "LA"):
        im = im.convert("RGBA" if mode == "LA" else "RGB")  # WebP has no greyscale mode
    options: dict = {"icc_profile": icc} if icc else {}
    if fmt == "jpg":
        options.update(quality=95, subsampling=0)
    else:
        options.update(quality=95, method=4)
    im.save(path, format=FORMATS[fmt], **options)


_PNG_COLOUR_TYPE = {1: 0, 2: 4, 3: 2, 4: 6}  # channels -> grey, grey+alpha, RGB, RGBA
_PNG_ROWS_PER_CHUNK = 256


def write_png(path: str | os.PathLike, pixels: np.ndarray, icc: bytes | None = None, level: int = 1) -> None:
    """A PNG of (H, W, C) uint8/uint16 ``pixels`` (see :func:`write_png_bands`)."""
    write_png_bands(path, pixels.shape, pixels.dtype, [pixels], icc, level)


def write_png_bands(path: str | os.PathLike, shape, dtype, bands, icc: bytes | None = None, level: int = 1) -> None:
    """A PNG of ``shape`` (H, W, C) from row ``bands`` (n, W, C) given top to bottom.

    Pillow would first copy a large image into its own 4-bytes-per-pixel buffer (0.8 GB
    for a 192-MP RGB output) and has no 16-bit RGB mode; this writes rows as they come with
    the PNG "Sub" filter (one vectorised subtraction) and zlib ``level`` 1 (speed over
    the last few percent of size).
    """
    h, w, c = (int(v) for v in shape)
    depth = 16 if np.dtype(dtype) == np.uint16 else 8
    bpp = c * depth // 8  # bytes per pixel: the Sub filter's distance
    written = 0
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        _png_chunk(f, b"IHDR", struct.pack(">IIBBBBB", w, h, depth, _PNG_COLOUR_TYPE[c], 0, 0, 0))
        if icc:
            _png_chunk(f, b"iCCP", b"icc\x00\x00" + zlib.compress(icc))
        z = zlib.compressobj(level)
        for band in bands:
            for top in range(0, band.shape[0], _PNG_ROWS_PER_CHUNK):
                rows = band[top : top + _PNG_ROWS_PER_CHUNK]
                rows = rows.astype(">u2") if depth == 16 else np.ascontiguousarray(rows)
                rows = rows.view(np.uint8).reshape(-1, w * bpp)
                filtered = np.empty((rows.shape[0], rows.shape[1] + 1), dtype=np.uint8)
                filtered[:, 0] = 1  # filter type Sub: each byte minus the same byte of the pixel to its left
                filtered[:, 1 : 1 + bpp] = rows[:, :bpp]
                np.subtract(rows[:, bpp:], rows[:, :-bpp], out=filtered[:, 1 + bpp :])
                piece = z.compress(filtered.tobytes())
                if piece:
                    _png_chunk(f, b"IDAT", piece)
            written += band.shape[0]
        if written != h:
            raise ValueError(f"PNG bands gave {written} rows, expected {h}")
        _png_chunk(f, b"IDAT", z.flush())
        _png_chunk(f, b"IEND", b"")


def _png_chunk(f, kind: bytes, payload: bytes) -> None:
    f.write(struct.pack(">I", len(payload)) + kind + payload)
    f.write(struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF))


def find_images(paths) -> list[Path]:
    """Files as given, folders searched recursively for image suffixes; sorted per folder."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found.extend(sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES))
        else:
            found.append(p)
    return found
