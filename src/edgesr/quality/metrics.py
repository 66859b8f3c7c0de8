"""PSNR/SSIM as the super-resolution papers' tables compute them.

The protocol (Matlab's, reproduced by BasicSR's ``calculate_psnr``/``calculate_ssim``
with ``test_y_channel=True``): 8-bit images, Y channel of BT.601 as Matlab's
``rgb2ycbcr`` (Y = 16 + (65.481 R + 128.553 G + 24.966 B) / 255 on [0, 1] RGB, i.e. a
[16, 235] luma kept in float, not rounded), ``shave`` pixels cut from every border
(shave = scale), PSNR with peak 255, SSIM with an 11x11 Gaussian window of sigma 1.5
and Matlab's constants (K1 = 0.01, K2 = 0.03, L = 255).

Colour conversion and SSIM come from scikit-image: ``skimage.color.rgb2ycbcr`` is the
Matlab formula exactly (its Y lies in [16, 235]), and ``structural_similarity`` with
``gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255``
reproduces ``calculate_ssim``.  The one difference: BasicSR evaluates only the 'valid'
part of the filtered maps (the 5-pixel margin the 11x11 window overhangs is dropped),
while scikit-image crops (win_size - 1) // 2 = 5 pixels after a reflect-padded filter,
which is the same region; the remaining difference is float rounding (measured against
BasicSR's formula on a Set5 pair: ~5e-15, tests/test_quality.py).  Y is float64 here
and float32 in BasicSR: PSNR differs by float32 rounding only.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import EdgeSRError


def _check_pair(sr: np.ndarray, hr: np.ndarray, shave: int) -> None:
    if sr.shape != hr.shape:
        raise EdgeSRError(f"output {sr.shape[1]}x{sr.shape[0]} does not match the reference "
                          f"{hr.shape[1]}x{hr.shape[0]}")
    if sr.dtype != np.uint8 or hr.dtype != np.uint8:
        raise TypeError(f"metrics take 8-bit images (got {sr.dtype}, {hr.dtype}): clamp and round first")
    if min(sr.shape[:2]) - 2 * shave < 11:
        raise EdgeSRError(f"image {sr.shape[1]}x{sr.shape[0]} is too small to score with a border shave of {shave}")


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Float [0, 1] HxWxC to 8 bit as the papers' test code does: clamp, scale, round."""
    return np.clip(np.round(np.clip(image, 0.0, 1.0) * 255.0), 0, 255).astype(np.uint8)


def y_channel(rgb: np.ndarray) -> np.ndarray:
    """BT.601 luma of an 8-bit RGB image, Matlab ``rgb2ycbcr`` scale ([16, 235], float64)."""
    from skimage.color import rgb2ycbcr

    return rgb2ycbcr(rgb)[..., 0]


def shave_border(image: np.ndarray, shave: int) -> np.ndarray:
    return image[shave:-shave, shave:-shave] if shave > 0 else image


def psnr(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(data_range ** 2 / mse)


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> float:
    """SSIM of two single-channel float images with Matlab's (Wang et al.) settings."""
    from skimage.metrics import structural_similarity

    return float(structural_similarity(a.astype(np.float64), b.astype(np.float64), data_range=data_range,
                                       gaussian_weights=True, sigma=1.5, use_sample_covariance=False))


def psnr_ssim_y(sr: np.ndarray, hr: np.ndarray, shave: int) -> tuple[float, float]:
    """Y-channel PSNR (dB) and SSIM of two uint8 HxWx3 RGB images, ``shave`` px cut per border."""
    _check_pair(sr, hr, shave)
    y_sr, y_hr = (shave_border(y_channel(x), shave) for x in (sr, hr))
    return psnr(y_sr, y_hr), ssim(y_sr, y_hr)


def psnr_ssim_rgb(out: np.ndarray, ref: np.ndarray, shave: int = 0) -> tuple[float, float]:
    """RGB PSNR and channel-mean SSIM of uint8 HxWx3 images (restoration, e.g. low-light)."""
    _check_pair(out, ref, shave)
    a, b = (shave_border(x, shave).astype(np.float64) for x in (out, ref))
    return psnr(a, b), float(np.mean([ssim(a[..., c], b[..., c]) for c in range(a.shape[-1])]))
