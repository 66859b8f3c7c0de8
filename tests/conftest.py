import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from edgesr.data import image_names, random_input, sample_input


def _shared_dir() -> Path:
    """The team's shared data (checkpoints, datasets): ``shared/`` beside the clone, as CI
    lays it out, else the team's copy."""
    beside = Path(__file__).resolve().parents[2] / "shared"
    return beside if beside.is_dir() else Path("/work/shared")


SHARED = _shared_dir()


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


def run_cli(*args, cwd=None, timeout=600):
    """Run the real console entry point in a subprocess (as a user would): (rc, stdout, stderr)."""
    proc = subprocess.run([sys.executable, "-m", "edgesr.cli", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr


def assert_one_line_error(rc, err, code=2, needle=None):
    """Exactly one error line, and it is the last thing printed (progress lines may precede it)."""
    assert rc == code, err
    lines = [l for l in err.strip().splitlines() if l.strip()]
    errors = [l for l in lines if l.startswith(("error:", "internal error:", "Error:", "Usage:", "interrupted"))]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    assert "Traceback" not in err
    if needle:
        assert needle in errors[0], errors[0]
