"""Tiled super-resolution of images of any size -- pure numpy, self-contained.

This module imports nothing but numpy (and the standard library) on purpose: the device
bundle's one-file script (:mod:`edgesr.bench.bundle`) embeds its source verbatim, so the
board runs exactly the algorithm tested here without edgesr installed.

Contract: ``run(x)`` maps an NCHW float32 batch ``(1, 3, h, w)`` in [0, 1] to
``(1, 3, s*h, s*w)``; ``image`` is ``(H, W, 3)`` float32 in [0, 1].

Padding.  Inputs are padded (right/bottom) when they break the size rule or are
smaller than a fixed tile, and the output is cropped back.  The pad *reflects* the image
(``np.pad(mode="reflect")``, mirror without repeating the edge pixel -- what
``F.pad(mode="reflect")`` does in BasicSR-style test code) because a mirrored
continuation keeps the image statistics the network saw in training near the border;
zeros would put an artificial black edge inside the receptive field of real pixels.
A pad longer than the side reflects back and forth (numpy's reflect); a 1-px side has
nothing to mirror and is padded by *replicating* the edge.

Tiling.  Tiles of ``tile`` input pixels start at evenly spaced positions (the last one
flush with the border) so that neighbours overlap by at least ``overlap`` px.  Each tile
is a crop of the (padded) image, never of zeros, so a tile edge only differs from the
whole-image run within the model's receptive field of that edge.  Neighbours are
stitched at the centre of their overlap with a linear cross-fade ``blend`` px wide
(output weights of the two tiles sum to 1, and the 2-D weights are a product of 1-D
profiles, so they form a partition of unity without normalisation).  The part of each
tile that is used therefore stays ``(overlap - blend) / 2`` px away from its cut edges;
``blend`` defaults to ``overlap // 4`` (a cross-fade hides the residual difference of
models that are not translation-exact, e.g. pooled ones, while keeping most of the
overlap as clean margin).

Output is produced in final blocks (:func:`iter_upscaled_blocks`) so a caller can convert a
huge image to uint8/uint16 piece by piece: the float32 result never exists at once, and
the tiler itself holds one tile plus the overlap strips.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator

import numpy as np

Run = Callable[[np.ndarray], np.ndarray]
Progress = Callable[[int, int], None]

#: Overlap used when the model's receptive field is unbounded/unknown (input px).
FALLBACK_OVERLAP = 16
#: Runners that take any size (torch, dynamic ONNX) get the whole image up to this many
#: input pixels: about 1 GB of live feature maps at ~1 KB per input pixel (tens of
#: 64-channel fp32 maps), the estimate edgesr.pipeline uses for its size limit.
WHOLE_IMAGE_MAX_PIXELS = 1 << 20
#: Tile side for such runners above that budget (rounded up to the size rule).
DYNAMIC_TILE = 512


def rule_values(size_rule) -> tuple[int, int]:
    """``(min_size, multiple_of)`` of a ``SizeRule``, a metadata mapping or ``None``."""
    if size_rule is None:
        return 1, 1
    if isinstance(size_rule, dict):
        get = size_rule.get
    else:
        def get(key, default=None):
            return getattr(size_rule, key, default)
    return max(1, int(get("min_size", 1) or 1)), max(1, int(get("multiple_of", 1) or 1))


def default_overlap(receptive_field: int | None, tile: tuple[int, int] | None = None) -> int:
    """Overlap (input px) from the model's receptive-field radius (``None``: unbounded).

    Twice the radius leaves a clean margin of about one radius on each side of the
    cross-fade; capped at half the smaller tile side so tiles still advance.
    """
    overlap = FALLBACK_OVERLAP if receptive_field is None else 2 * int(receptive_field)
    if tile is not None:
        overlap = min(overlap, min(tile) // 2)
    return max(0, overlap)


def plan_tiles(height: int, width: int, *, fixed_tile=None, tile=None, overlap: int | None = None,
               receptive_field: int | None = None, size_rule=None) -> tuple[tuple[int, int] | None, int]:
    """``(tile or None = whole image, overlap)`` for an input of ``height x width``.

    A fixed-size artifact tiles at its own size; a runner that takes any size uses
    ``tile`` if given, else the whole image up to :data:`WHOLE_IMAGE_MAX_PIXELS`, else
    :data:`DYNAMIC_TILE` tiles.  ``overlap=None`` derives it from ``receptive_field``.
    """
    chosen = fixed_tile or tile
    if chosen is None and height * width > WHOLE_IMAGE_MAX_PIXELS:
        min_size, multiple_of = rule_values(size_rule)
        side = padded_size(DYNAMIC_TILE, min_size, multiple_of)
        ov = default_overlap(receptive_field, (side, side)) if overlap is None else int(overlap)
        chosen = (fit_tile(height, side, ov, min_size, multiple_of), fit_tile(width, side, ov, min_size, multiple_of))
    if chosen is None:
        return None, 0
    chosen = (int(chosen[0]), int(chosen[1]))
    ov = default_overlap(receptive_field, chosen) if overlap is None else int(overlap)
    return chosen, max(0, min(ov, min(chosen) // 2))


def fit_tile(length: int, max_tile: int, overlap: int, min_size: int = 1, multiple_of: int = 1) -> int:
    """The smallest tile side <= ``max_tile`` that covers ``length`` with as few tiles as ``max_tile``.

    Fixed 512-px tiles cover 4000 px with 9 tiles (4608 px of work for 4000, +15%); 459-px
    tiles cover it with 9 as well but only 4131 px of work (+3%).  Runners that take any
    size get such fitted tiles.
    """
    overlap = min(overlap, max_tile // 2)
    if length <= max_tile:
        return padded_size(length, min_size, multiple_of)
    count = math.ceil((length - overlap) / (max_tile - overlap))
    side = math.ceil((length - overlap) / count) + overlap
    return min(padded_size(side, min_size, multiple_of), padded_size(max_tile, min_size, multiple_of))


def padded_size(size: int, min_size: int, multiple_of: int) -> int:
    """The smallest size >= ``size`` (and >= ``min_size``) divisible by ``multiple_of``."""
    size = max(size, min_size)
    return -(-size // multiple_of) * multiple_of


def pad_image(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Pad ``(H, W, C)`` on the bottom/right to ``height x width`` (reflect; replicate a 1-px side)."""
    h, w = image.shape[:2]
    ph, pw = height - h, width - w
    if ph <= 0 and pw <= 0:
        return image
    ph, pw = max(ph, 0), max(pw, 0)
    out = image
    if ph:
        out = np.pad(out, ((0, ph), (0, 0), (0, 0)), mode="reflect" if h > 1 else "edge")
    if pw:
        out = np.pad(out, ((0, 0), (0, pw), (0, 0)), mode="reflect" if w > 1 else "edge")
    return out


def tile_starts(length: int, tile: int, overlap: int, align: int = 1) -> list[int]:
    """Evenly spaced tile starts covering ``length``, neighbours overlapping >= ``overlap``.

    With ``align > 1`` (``length`` and ``tile`` multiples of it) every start is a multiple
    of ``align``: models that pool on a grid of their size-rule multiple (SAFMN's 8 px)
    then see the same grid in every tile as in the whole image.
    """
    if align > 1:
        units = tile_starts(length // align, tile // align, -(-overlap // align))
        return [u * align for u in units]
    if length <= tile:
        return [0]
    step = max(1, tile - overlap)
    count = 1 + math.ceil((length - tile) / step)
    return [round(i * (length - tile) / (count - 1)) for i in range(count)]


def blend_profiles(starts: list[int], tile: int, scale: int, blend: int) -> list[np.ndarray]:
    """Per-tile 1-D output weights (length ``scale * tile``) that sum to 1 everywhere.

    Between neighbours a and b the seam sits at the centre of their overlap; a's weight
    falls linearly from 1 to 0 across ``blend`` px (output: ``scale * blend``) centred
    on it and b's rises by the same amount.
    """
    n_out = scale * tile
    centres = np.arange(n_out, dtype=np.float64) + 0.5
    profiles = []
    for i, start in enumerate(starts):
        w = np.ones(n_out, dtype=np.float64)
        pos = centres + scale * start  # output coordinates of this tile's pixels
        if i > 0:  # rising edge shared with the previous tile
            w = np.minimum(w, _ramp(pos, _seam(starts[i - 1], start, tile, blend), scale))
        if i + 1 < len(starts):  # falling edge shared with the next tile
            w = np.minimum(w, 1.0 - _ramp(pos, _seam(start, starts[i + 1], tile, blend), scale))
        profiles.append(w.astype(np.float32))
    return profiles


def _seam(a: int, b: int, tile: int, blend: int) -> tuple[float, float]:
    """Centre and width (input px) of the cross-fade between tiles starting at a < b."""
    overlap = a + tile - b
    return (b + a + tile) / 2.0, float(min(blend, overlap))


def _ramp(pos: np.ndarray, seam: tuple[float, float], scale: int) -> np.ndarray:
    """0 before the seam's band, 1 after it, linear inside (a step when the width is 0)."""
    centre, width = seam[0] * scale, seam[1] * scale
    if width <= 0:
        return (pos >= centre).astype(np.float64)
    return np.clip((pos - (centre - width / 2.0)) / width, 0.0, 1.0)


def _weigh(t: np.ndarray, profile: np.ndarray, axis: int) -> None:
    """Multiply ``t`` in place by a 1-D profile along ``axis`` -- only where it is not 1.

    The profile is 1 except in the overlaps at the tile's ends; skipping the rest saves two
    full passes over every tile (a 512-px x4 tile is 50 MB of float32).
    """
    ones = np.flatnonzero(profile == 1.0)
    lo, hi = (int(ones[0]), int(ones[-1]) + 1) if ones.size else (len(profile), len(profile))
    shape = [1, 1, 1]
    for part in (slice(0, lo), slice(hi, len(profile))):
        if part.stop > part.start:
            shape[axis] = part.stop - part.start
            index = (part, slice(None)) if axis == 0 else (slice(None), part)
            t[index] *= profile[part].reshape(shape)


def _run_tile(run: Run, tile: np.ndarray, scale: int) -> np.ndarray:
    x = np.ascontiguousarray(tile.transpose(2, 0, 1)[None], dtype=np.float32)
    y = np.asarray(run(x), dtype=np.float32)
    expected = (1, 3, scale * tile.shape[0], scale * tile.shape[1])
    if y.shape != expected:
        raise ValueError(f"model returned {tuple(y.shape)} for a {tile.shape[0]}x{tile.shape[1]} input; "
                         f"expected {expected} (scale {scale})")
    return y[0].transpose(1, 2, 0)


def _supports(starts: list[int], profiles: list[np.ndarray], tile: int, scale: int) -> list[int]:
    """Per tile, the output coordinate where its neighbour's weight begins (``ends[i]``).

    After tile ``i`` (and everything before it) is accumulated, coordinates below
    ``ends[i]`` receive nothing more; the last tile's end is the padded image's end.
    """
    ends = []
    for i in range(len(starts)):
        if i + 1 < len(starts):
            ends.append(scale * starts[i + 1] + int(np.argmax(profiles[i + 1] > 0)))
        else:
            ends.append(scale * (starts[i] + tile))
    return ends


def iter_upscaled_blocks(
    run: Run,
    image: np.ndarray,
    scale: int,
    *,
    tile: tuple[int, int] | None = None,
    overlap: int | None = None,
    size_rule=None,
    blend: int | None = None,
    progress: Progress | None = None,
) -> Iterator[tuple[int, int, np.ndarray]]:
    """Yield ``(top, left, block)``: final float32 (unclamped) pieces of the upscaled image.

    Blocks tile the ``(scale*H, scale*W)`` output exactly once, in tile order.  Only one
    tile's output, the overlap strip to its right and the overlap rows below the current
    tile row are held -- never a full-width band -- so the memory is independent of the
    image width.  A block is a scratch view: use it (or modify it in place) before asking for
    the next one.
    ``progress(done, total)`` is called after every model run.
    """
    image = _check_image(image)
    h, w = image.shape[:2]
    min_size, multiple_of = rule_values(size_rule)
    if tile is None:
        padded = pad_image(image, padded_size(h, min_size, multiple_of), padded_size(w, min_size, multiple_of))
        out = _run_tile(run, padded, scale)
        if progress:
            progress(1, 1)
        yield 0, 0, out[: scale * h, : scale * w]
        return

    th, tw = _check_tile(tile, min_size, multiple_of)
    overlap = default_overlap(None, (th, tw)) if overlap is None else int(overlap)
    overlap = max(0, min(overlap, min(th, tw) // 2))
    blend = overlap // 4 if blend is None else max(0, min(int(blend), overlap))
    # Sides shorter than the tile are padded up to it (a fixed artifact takes nothing else),
    # longer ones up to the size rule's multiple so every tile starts on that grid.
    padded = pad_image(image, max(padded_size(h, 1, multiple_of), th), max(padded_size(w, 1, multiple_of), tw))
    ph, pw = padded.shape[:2]
    ys, xs = tile_starts(ph, th, overlap, multiple_of), tile_starts(pw, tw, overlap, multiple_of)
    wy, wx = blend_profiles(ys, th, scale, blend), blend_profiles(xs, tw, scale, blend)
    row_ends, col_ends = _supports(ys, wy, th, scale), _supports(xs, wx, tw, scale)
    total, done = len(ys) * len(xs), 0
    out_h, out_w = scale * h, scale * w

    # below: rows [row_top, r1 of the previous tile row) x full width, still to be summed
    below, row_top = np.zeros((0, scale * pw, 3), dtype=np.float32), 0
    for i, y0 in enumerate(ys):
        r0, r1, row_end = scale * y0, scale * (y0 + th), row_ends[i]
        next_below = np.zeros((r1 - row_end, scale * pw, 3), dtype=np.float32)
        right, col_top = None, 0  # the previous tile's columns [col_top, its c1), all rows
        for j, x0 in enumerate(xs):
            c0, col_end = scale * x0, col_ends[j]
            t = _run_tile(run, padded[y0 : y0 + th, x0 : x0 + tw], scale)
            _weigh(t, wy[i], 0)
            _weigh(t, wx[j], 1)
            done += 1
            if progress:
                progress(done, total)
            if right is not None:
                t[:, col_top - c0 : col_top - c0 + right.shape[1]] += right
            block = t[:, col_top - c0 : col_end - c0]  # final left to right
            block[row_top - r0 : row_top - r0 + below.shape[0]] += below[:, col_top:col_end]
            next_below[:, col_top:col_end] = block[row_end - r0 :]
            top, bottom = row_top, min(row_end, out_h)
            left, stop = col_top, min(col_end, out_w)
            if bottom > top and stop > left:
                yield top, left, block[top - r0 : bottom - r0, : stop - left]
            right, col_top = t[:, col_end - c0 :].copy(), col_end
        below, row_top = next_below, row_end


def upscale_array(
    run: Run,
    image: np.ndarray,
    scale: int,
    *,
    tile: tuple[int, int] | None = None,
    overlap: int | None = None,
    size_rule=None,
    blend: int | None = None,
    progress: Progress | None = None,
) -> np.ndarray:
    """The ``(scale*H, scale*W, 3)`` float32 (unclamped) upscale of ``image``.

    ``tile=None`` runs the whole image at once (padded to ``size_rule`` and cropped);
    otherwise fixed ``(th, tw)`` tiles overlapping by ``overlap`` px (default
    :data:`FALLBACK_OVERLAP`, capped at half a tile) are stitched as described in the
    module docstring.
    """
    image = _check_image(image)
    h, w = image.shape[:2]
    out = np.empty((scale * h, scale * w, 3), dtype=np.float32)
    for top, left, block in iter_upscaled_blocks(run, image, scale, tile=tile, overlap=overlap,
                                                 size_rule=size_rule, blend=blend, progress=progress):
        out[top : top + block.shape[0], left : left + block.shape[1]] = block
    return out


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"expected an (H, W, 3) image, got shape {image.shape}")
    return image.astype(np.float32, copy=False)


def _check_tile(tile, min_size: int, multiple_of: int) -> tuple[int, int]:
    th, tw = (int(t) for t in tile)
    for side in (th, tw):
        if side < min_size or side % multiple_of:
            rule = f">= {min_size}" + (f" and a multiple of {multiple_of}" if multiple_of > 1 else "")
            raise ValueError(f"tile {th}x{tw} breaks the model's size rule (sides {rule})")
    return th, tw
