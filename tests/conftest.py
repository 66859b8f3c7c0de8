import numpy as np
import pytest
import torch

from edgesr.data import image_names, random_input, sample_input


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)


def real_image(h: int, w: int, name: str | None = None, dtype=torch.float32) -> torch.Tensor:
    """A (1, 3, h, w) crop of a shipped photograph in [0, 1]."""
    return torch.from_numpy(sample_input(h, w, name)).to(dtype)


def noise_image(h: int, w: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    return torch.from_numpy(random_input(h, w, seed)).to(dtype)


def rel_err(a, ref) -> float:
    """max |a - ref| / max |ref|, computed in float64."""
    a, ref = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(ref, dtype=torch.float64)
    return float((a - ref).abs().max() / ref.abs().max().clamp_min(1e-300))


def psnr(ref: torch.Tensor, out: torch.Tensor, peak: float = 1.0) -> float:
    mse = float(((ref.double() - out.double()) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(peak**2 / mse)


ALL_IMAGES = image_names()
