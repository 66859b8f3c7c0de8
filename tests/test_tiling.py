"""Tiled upscaling (edgesr.runtime.tiling) against whole-image PyTorch, on released checkpoints.

The tiler runs a fixed 64x64 ONNX export of each checkpoint (onnxruntime); the reference
is the train-form PyTorch model on the whole image (padded to its size rule the same way).
PSNR is measured over the whole output and separately over the seam band: the output rows
and columns where neighbouring tiles overlap.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import SHARED
from edgesr.pipeline import export_model, obtain_model
from edgesr.runtime.runners import TorchRunner, open_runner
from edgesr.runtime.tiling import (
    blend_profiles,
    default_overlap,
    padded_size,
    plan_tiles,
    tile_starts,
    upscale_array,
)

CHECKPOINTS = SHARED / "checkpoints"
SET5_LR = SHARED / "datasets/Set5/LR_bicubic/X4"
TILE = (64, 64)


def psnr(ref: np.ndarray, out: np.ndarray) -> float:
    mse = float(np.mean((np.clip(ref, 0, 1) - np.clip(out, 0, 1)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def seam_mask(h: int, w: int, scale: int, overlap: int, multiple_of: int) -> np.ndarray:
    """Output pixels in the overlap of two neighbouring tiles (rows or columns)."""
    mask = np.zeros((scale * h, scale * w), dtype=bool)
    for axis, length, tile in ((0, h, TILE[0]), (1, w, TILE[1])):
        starts = tile_starts(max(padded_size(length, 1, multiple_of), tile), tile, overlap, multiple_of)
        for a, b in zip(starts, starts[1:]):
            band = slice(scale * b, scale * (a + tile))
            if axis == 0:
                mask[band, :] = True
            else:
                mask[:, band] = True
    return mask


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    # An odd-sized crop of a real low-resolution photograph: 101x117 needs 3x3 tiles of 64.
    img = np.asarray(Image.open(SET5_LR / "babyx4.png").convert("RGB"), dtype=np.float32) / 255.0
    return np.ascontiguousarray(img[:101, :117])


# PSNR >= 50 dB (tiled vs whole) for all three.  Measured on this image, 64x64 tiles:
# SPAN ch28 131.9 overall / 132.0 seams (exact: pure convs, the overlap covers its field);
# SAFMN++ 75.6 / 73.8 (its pooling grid is the size-rule multiple 8, which tile starts
# follow); PlainUSR 56.4 / 59.0 (LIA pools with stride 6 and resizes bilinearly by a
# non-integer factor, so a tile shifts its grid whatever the overlap).
CASES = {
    "team38_span_ch28_slim.pth": 50.0,
    "PlainUSR_Rep_x4.pth": 50.0,
    "team23_safmnpp.pth": 50.0,
}


@pytest.fixture(scope="module", params=list(CASES), ids=lambda c: c.split(".")[0])
def tiled_vs_whole(request, photo, tmp_path_factory):
    loaded = obtain_model(None, weights=CHECKPOINTS / request.param)
    out = tmp_path_factory.mktemp("tiling") / "model.onnx"
    export_model(loaded, "onnx", size=TILE, output=out, verify=False)
    runner = open_runner(out, threads=2)
    rule = loaded.spec.size_rule
    overlap = default_overlap(loaded.spec.receptive_field, TILE)
    whole = upscale_array(TorchRunner(loaded.model, threads=2).run, photo, loaded.scale, size_rule=rule)
    tiled = upscale_array(runner.run, photo, loaded.scale, tile=TILE, overlap=overlap, size_rule=rule)
    return request.param, loaded.scale, overlap, rule.multiple_of, whole, tiled


def test_tiled_matches_whole_image_overall_and_at_seams(tiled_vs_whole, photo):
    name, scale, overlap, multiple_of, whole, tiled = tiled_vs_whole
    h, w = photo.shape[:2]
    assert tiled.shape == whole.shape == (scale * h, scale * w, 3)
    mask = seam_mask(h, w, scale, overlap, multiple_of)
    assert mask.mean() > 0.1  # the band is a real part of the image
    overall, seams = psnr(whole, tiled), psnr(whole[mask], tiled[mask])
    print(f"{name}: overlap {overlap}, PSNR overall {overall:.2f} dB, seams {seams:.2f} dB")
    assert overall >= CASES[name] and seams >= CASES[name], (overall, seams)


# --------------------------------------------------------------------------- the algorithm itself


def box_upscale(x: np.ndarray) -> np.ndarray:
    """A real local operator (3x3 box blur, zero padded like a conv, then x2 nearest)."""
    p = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    blur = sum(p[:, :, i : i + x.shape[2], j : j + x.shape[3]] for i in range(3) for j in range(3)) / 9.0
    return blur.repeat(2, axis=2).repeat(2, axis=3)


@pytest.mark.parametrize("size", [(1, 1), (5, 9), (33, 31), (40, 97), (97, 40)])
def test_output_size_is_scale_times_input_for_any_size(size):
    img = np.random.default_rng(0).random((*size, 3), dtype=np.float32)
    for tile in (None, (16, 16), (12, 20)):
        out = upscale_array(box_upscale, img, 2, tile=tile, overlap=4, size_rule={"min_size": 1, "multiple_of": 1})
        assert out.shape == (2 * size[0], 2 * size[1], 3)


def test_tiles_equal_whole_image_for_a_local_operator():
    # A 1-px receptive field: an overlap of 4 with a 1-px cross-fade leaves 1.5 px clean margin.
    img = np.random.default_rng(1).random((45, 70, 3), dtype=np.float32)
    whole = upscale_array(box_upscale, img, 2, size_rule=None)
    tiled = upscale_array(box_upscale, img, 2, tile=(16, 16), overlap=4, size_rule=None)
    np.testing.assert_allclose(tiled, whole, atol=1e-6)


def test_blend_weights_partition_unity_and_stay_inside_tiles():
    for length, tile, overlap in ((200, 64, 16), (65, 64, 32), (1000, 48, 10)):
        starts = tile_starts(length, tile, overlap)
        assert starts[0] == 0 and starts[-1] == length - tile
        assert all(a + tile - b >= overlap for a, b in zip(starts, starts[1:]))
        total = np.zeros(3 * length)
        for start, w in zip(starts, blend_profiles(starts, tile, 3, overlap // 4)):
            total[3 * start : 3 * (start + tile)] += w
            assert w[0] == (1.0 if start == 0 else 0.0) and w[-1] == (1.0 if start == starts[-1] else 0.0)
        np.testing.assert_allclose(total, 1.0, atol=1e-6)


def test_smaller_than_tile_is_padded_by_reflection_not_zeros():
    # Each tile's content comes from the image: a constant image stays constant, which
    # zero padding around a 5x7 image inside a 16x16 tile would break.
    img = np.full((5, 7, 3), 0.5, dtype=np.float32)
    out = upscale_array(box_upscale, img, 2, tile=(16, 16), overlap=4, size_rule=None)
    inner = out[2:-2, 2:-2]  # box_upscale itself zero-pads at the (padded) tile border only
    np.testing.assert_allclose(inner, 0.5, atol=1e-6)


def test_plan_tiles_policy():
    rule = {"min_size": 8, "multiple_of": 8}
    assert plan_tiles(500, 500, size_rule=rule) == (None, 0)  # dynamic, under the budget: whole image
    tile, overlap = plan_tiles(3000, 4000, size_rule=rule, receptive_field=21)
    assert overlap == 42 and max(tile) <= 512 and tile[0] % 8 == 0 == tile[1] % 8
    for length, side in zip((3000, 4000), tile):  # as few tiles as 512 would need, less work
        starts = tile_starts(length, side, overlap, 8)
        assert len(starts) == len(tile_starts(length, 512, overlap, 8))
        assert starts[-1] + side == padded_size(length, 1, 8)
        # work: the image, one overlap per seam, and at most 8 px of rounding per tile
        assert len(starts) * side <= length + (len(starts) - 1) * overlap + 8 * len(starts)
    assert plan_tiles(10, 10, fixed_tile=(64, 64), receptive_field=None) == ((64, 64), 16)
    assert plan_tiles(10, 10, fixed_tile=(64, 64), receptive_field=100) == ((64, 64), 32)  # half a tile at most


def test_tile_breaking_the_size_rule_is_refused():
    img = np.zeros((20, 20, 3), dtype=np.float32)
    with pytest.raises(ValueError, match="size rule"):
        upscale_array(box_upscale, img, 2, tile=(12, 12), size_rule={"min_size": 1, "multiple_of": 8})
