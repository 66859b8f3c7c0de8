"""Export-safe real 2-D DFT: ``rfft2`` / ``irfft2`` as real matmuls, factorized.

Neither TFLite nor several delegates have a 2-D FFT, so the FFT blocks of DarkIR
(FreMLP) and SRConvNet (FourierUnit) are rewritten with these modules.  They use
only reshape / permute / matmul / pad / stack / mul / add / where / sqrt on real
tensors: no complex dtype, no ``torch.fft``, no ``atan2``.  Every DFT basis is a
constant, contiguous buffer (litert-torch silently merges *non-contiguous*
constants) registered with ``persistent=False`` so state_dicts stay clean.
Shapes are static: one module per (H, W).

Math (spec ``srconvnet_darkir.md`` §3)
--------------------------------------
Each axis of length N is split Cooley-Tukey style, N = N1*N2 with N1 ~ sqrt(N):
input index n = N2*n1 + n2, output index k = k1 + N1*k2, and

    X[k1 + N1*k2] = sum_n2 exp(-2pi i n2 (k1 + N1 k2) / N) * sum_n1 x[N2 n1 + n2] exp(-2pi i n1 k1 / N1)

i.e. a length-N1 DFT matmul, then a length-N2 DFT matmul whose basis depends on
k1 (the twiddle factors are folded into that batched basis, so there is no
separate twiddle multiply).  Cost per line is ~N*(N1+N2) MACs instead of N^2.
A prime N, and any N <= ``DIRECT_MAX`` (64), uses a single direct DFT matmul:
up to that size the extra matmul and permutes of a split cost more time than
the MACs they save (measured with onnxruntime and eager torch at 16..256).
Only one split level is used: at N <= 1024 both factors are <= 32 and each
stage is a small-K matmul that is already close to memory-bound, so a further
split would trade MACs for more full passes over the tensor (one more matmul
and one more permute per level).

Complex values are carried as a size-2 "ri" axis adjacent to the axis being
contracted, so a complex matmul is one real matmul with a (2*Nin, 2*Nout) basis.
Between matmuls, each permute moves a single axis and keeps the innermost axis
(w2 or ri) in place: onnxruntime has block-copy fast paths for exactly that, and
its generic Transpose was measured 5-10x slower here.  A round trip costs
4 + 4 matmuls, ~5 + 5 such permutes and a slice/stack for re/im.
The W axis exploits the real input (the first W stage maps real -> complex) and
computes only the k2 needed for the W//2+1 kept bins; the inverse mirrors this
(the last W stage produces only the real part).  Normalisation and the C2R
weights d_k are folded into the bases.  All cos/sin values are computed in
float64 from the exactly reduced integer phase (n*k mod N) and cast once.
"""
from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["RealRFFT2", "RealIRFFT2", "unit_phase", "split_factor", "DIRECT_MAX"]

_NORMS = ("backward", "ortho", "forward")
DIRECT_MAX = 64  # axes up to this length use one direct DFT matmul by default


def split_factor(n: int) -> int:
    """Return the major factor N1 of the Cooley-Tukey split n = N1*N2 used here.

    N1 is the largest divisor <= sqrt(n), which minimises the cost ~ N1 + N2.
    Returns n itself (no split, direct DFT) when n is 1 or prime.
    """
    best = n
    for d in range(2, math.isqrt(n) + 1):
        if n % d == 0:
            best = d  # increasing d <= sqrt(n): the last one is closest to sqrt(n)
    return best


def _cis(num: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of 2*pi*num/n in float64 for integer ``num``; exact at quarter turns."""
    num = torch.remainder(num.to(torch.int64), n)
    ang = num.to(torch.float64) * (2.0 * math.pi / n)
    c, s = torch.cos(ang), torch.sin(ang)
    # sin(pi) etc. are ~1e-16 in float64; make the multiples of pi/2 exact so that the
    # DC / Nyquist imaginary parts are dropped exactly, as pocketfft/numpy do.
    quarter = (4 * num) % n == 0
    q = torch.div(4 * num, n, rounding_mode="floor") % 4
    c = torch.where(quarter, torch.tensor([1.0, 0.0, -1.0, 0.0], dtype=torch.float64)[q], c)
    s = torch.where(quarter, torch.tensor([0.0, 1.0, 0.0, -1.0], dtype=torch.float64)[q], s)
    return c, s


def _real_block(er: torch.Tensor, ei: torch.Tensor) -> torch.Tensor:
    """Real form of the complex map y = x @ E with E = er + i*ei of shape (..., Nin, Nout).

    Returns shape (..., 2, Nin, Nout, 2) indexed [ri_in, n, k, ri_out]:
    y_re = x_re er - x_im ei, y_im = x_re ei + x_im er.
    """
    row_re = torch.stack((er, ei), dim=-1)  # x_re contributes (er, ei)
    row_im = torch.stack((-ei, er), dim=-1)  # x_im contributes (-ei, er)
    return torch.stack((row_re, row_im), dim=-4)


def _axis_plan(n: int, factorize: bool, direct_max: int) -> tuple[int, int]:
    n1 = split_factor(n) if factorize and n > direct_max else n
    return n1, n // n1


def _scale(norm: str, h: int, w: int, inverse: bool) -> float:
    if norm not in _NORMS:
        raise ValueError(f"norm must be one of {_NORMS}, got {norm!r}")
    if norm == "ortho":
        return 1.0 / math.sqrt(h * w)
    return 1.0 / (h * w) if (norm == "backward") == inverse else 1.0


def _rearrange(x: torch.Tensor, src: str, dst: str, sizes: dict[str, int]) -> torch.Tensor:
    """View ``x`` with the atomic axes ``src`` (names in ``sizes``) and permute to ``dst``."""
    s, d = src.split(), dst.split()
    x = x.reshape([sizes[a] for a in s])
    perm = [s.index(a) for a in d]
    return x.permute(perm) if perm != list(range(len(perm))) else x


class _DFT2Base(nn.Module):
    def __init__(self, height: int, width: int, norm: str, dtype: torch.dtype, factorize: bool,
                 direct_max: int):
        super().__init__()
        if height < 1 or width < 1:
            raise ValueError(f"height and width must be >= 1, got {height}x{width}")
        self.height, self.width, self.norm = height, width, norm
        self.wf = width // 2 + 1
        self._dtype = dtype
        self.h1, self.h2 = _axis_plan(height, factorize, direct_max)
        self.w1, self.w2 = _axis_plan(width, factorize, direct_max)
        # W-axis bookkeeping: k = k1 + W1*k2 covers the wf kept bins.  Without a split
        # the single stage produces exactly wf columns.
        if self.w2 > 1:
            self.kw1, self.kw2 = self.w1, -(-self.wf // self.w1)
        else:
            self.kw1, self.kw2 = self.wf, 1
        self.kwp = self.kw1 * self.kw2  # kept W bins, zero-padded up to kw1*kw2
        self.sizes = {  # axis sizes for _rearrange; k-axes share their n-axis name
            "m": -1, "ri": 2, "h": height, "w": width, "kw": self.kwp,
            "h1": self.h1, "h2": self.h2, "w1": self.w1, "w2": self.w2,
            "kw1": self.kw1, "kw2": self.kw2,
        }

    def _buf(self, name: str, t: torch.Tensor) -> None:
        # contiguous + own storage: litert-torch merges non-contiguous constants.
        self.register_buffer(name, t.to(self._dtype).contiguous().clone(), persistent=False)

    def extra_repr(self) -> str:
        return (f"height={self.height}, width={self.width}, norm={self.norm!r}, "
                f"split=({self.h1}x{self.h2}, {self.w1}x{self.w2})")


class RealRFFT2(_DFT2Base):
    """``torch.fft.rfft2(x, norm=norm)`` for real x of shape (..., H, W), as real matmuls.

    ``forward(x) -> (re, im)``, each of shape (..., H, W//2+1).  Build with
    ``dtype=torch.float64`` for float64 inputs (the bases are cast once at init).
    An axis longer than ``direct_max`` is split (Cooley-Tukey) unless it is prime;
    ``factorize=False`` gives the unfactorized direct-matmul form (O(N^3) MACs),
    kept for benchmarks and cross-checks.
    """

    def __init__(self, height: int, width: int, norm: str = "backward",
                 dtype: torch.dtype = torch.float32, factorize: bool = True,
                 direct_max: int = DIRECT_MAX):
        super().__init__(height, width, norm, dtype, factorize, direct_max)
        alpha = _scale(norm, height, width, inverse=False)
        H, W, h1, h2, w1, w2, kw1, kw2 = (height, width, self.h1, self.h2, self.w1, self.w2,
                                           self.kw1, self.kw2)
        ar = torch.arange
        # W stage A (real -> complex, alpha folded): contracts w1 -> kw1.
        c, s = _cis(-ar(w1)[:, None] * ar(kw1)[None, :], w1)
        blk = _real_block(c, s)[0] * alpha                     # (w1, kw1, ri)
        if w2 > 1:  # left-multiply: rows (ri, kw1), cols w1
            self._buf("wa", blk.permute(2, 1, 0).reshape(2 * kw1, w1))
            # W stage B (right-multiply, batched over kw1, twiddles folded): contracts
            # w2 -> kw2; rows (ri, w2), cols (kw2, ri); exponent -n2*(k1 + W1*k2)/W.
            k = ar(kw1)[:, None] + w1 * ar(kw2)[None, :]       # (kw1, kw2)
            c, s = _cis(-ar(w2)[None, :, None] * k[:, None, :], W)  # (kw1, w2, kw2)
            self._buf("wb", _real_block(c, s).reshape(kw1, 2 * w2, 2 * kw2))
        else:  # direct, right-multiply: rows w, cols (kw1, ri)
            self._buf("wa", blk.reshape(w1, 2 * kw1))
        # H stage A (right-multiply): contracts h1 -> kh1; rows (h1, ri), cols (kh1, ri).
        c, s = _cis(-ar(h1)[:, None] * ar(h1)[None, :], h1)
        self._buf("ha", _real_block(c, s).transpose(0, 1).reshape(2 * h1, 2 * h1))
        # H stage B (right-multiply, batched over kh1): contracts h2 -> kh2;
        # rows (h2, ri), cols (kh2, ri); exponent -n2*(k1 + H1*k2)/H.
        if h2 > 1:
            k = ar(h1)[:, None] + h1 * ar(h2)[None, :]         # (kh1, kh2)
            c, s = _cis(-ar(h2)[None, :, None] * k[:, None, :], H)  # (kh1, h2, kh2)
            blk = _real_block(c, s)                            # (kh1, ri, h2, kh2, ri')
            self._buf("hb", blk.transpose(1, 2).reshape(h1, 2 * h2, 2 * h2))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lead = x.shape[:-2]
        H, sz = self.height, self.sizes
        if tuple(x.shape[-2:]) != (H, self.width):
            raise ValueError(f"expected (..., {H}, {self.width}), got {tuple(x.shape)}")
        # Layout comments name axes major -> minor; [a b] is a merged matmul axis.
        if self.w2 > 1:
            t = _rearrange(x, "m h1 h2 w1 w2", "m w1 h2 h1 w2", sz)
            t = torch.matmul(self.wa, t.reshape(-1, self.w1, H * self.w2))  # m [ri kw1] h w2
            t = _rearrange(t, "m ri kw1 h w2", "m kw1 h ri w2", sz)
            t = torch.matmul(t.reshape(-1, self.kw1, H, 2 * self.w2), self.wb)  # m kw1 h [kw2 ri]
            t = _rearrange(t, "m kw1 h kw2 ri", "m kw2 kw1 h ri", sz)
        else:
            t = _rearrange(x, "m h1 h2 w", "m h2 h1 w", sz)
            t = torch.matmul(t.reshape(-1, self.width), self.wa)  # m h [kw1 ri]
            t = _rearrange(t, "m h kw1 ri", "m kw1 h ri", sz)
        # t: m kw h2 [h1 ri], W already in natural order kw = kw1 + W1*kw2.
        t = torch.matmul(t.reshape(-1, 2 * self.h1), self.ha)  # m kw h2 [kh1 ri]
        t = _rearrange(t, "m kw h2 h1 ri", "m h1 kw h2 ri", sz)
        if self.h2 > 1:
            t = torch.matmul(t.reshape(-1, self.h1, self.kwp, 2 * self.h2), self.hb)
            t = _rearrange(t, "m h1 kw h2 ri", "m h2 h1 kw ri", sz)  # m kh2 kh1 kw [ri]
        t = t.reshape(-1, H, self.kwp, 2)
        if self.kwp != self.wf:
            t = t[:, :, : self.wf]
        shape = (*lead, H, self.wf)
        return t[..., 0].reshape(shape), t[..., 1].reshape(shape)


class RealIRFFT2(_DFT2Base):
    """``torch.fft.irfft2(torch.complex(re, im), s=(H, W), norm=norm)`` as real matmuls.

    ``forward(re, im) -> y``: inputs of shape (..., H, W//2+1), output (..., H, W).

    Canonical semantics for non-Hermitian input (torch CPU / pocketfft / numpy):
    a full complex inverse DFT along H (no symmetry assumed), then a C2R inverse
    along W,  y[h, w] = beta * sum_k d_k (B_re[h,k] cos(2pi wk/W) - B_im[h,k] sin(2pi wk/W)),
    with d_0 = 1, d_{W/2} = 1 for even W, d_k = 2 otherwise.  The imaginary parts
    of the DC column (k = 0) and, for even W, the Nyquist column (k = W/2) are
    therefore ignored exactly.  This is what torch CPU and ``numpy.fft.irfft2``
    compute; CUDA irfft2 is known to differ on non-Hermitian input (pytorch#154496).

    ``dtype``, ``factorize`` and ``direct_max`` as for :class:`RealRFFT2`.
    """

    def __init__(self, height: int, width: int, norm: str = "backward",
                 dtype: torch.dtype = torch.float32, factorize: bool = True,
                 direct_max: int = DIRECT_MAX):
        super().__init__(height, width, norm, dtype, factorize, direct_max)
        beta = _scale(norm, height, width, inverse=True)
        H, W, h1, h2, w1, w2, kw1, kw2 = (height, width, self.h1, self.h2, self.w1, self.w2,
                                           self.kw1, self.kw2)
        ar = torch.arange

        def c2r_weight(k: torch.Tensor) -> torch.Tensor:  # d_k, and 0 on the zero padding
            d = torch.full(k.shape, 2.0, dtype=torch.float64)
            d[k == 0] = 1.0
            if W % 2 == 0:
                d[k == W // 2] = 1.0
            d[k >= self.wf] = 0.0
            return d

        # H stage 1 (right-multiply, batched over kh1, twiddles folded): contracts
        # kh2 -> h2; rows (kh2, ri), cols (h2, ri); exponent +h2*(k1 + H1*k2)/H.
        if h2 > 1:
            k = ar(h1)[:, None] + h1 * ar(h2)[None, :]         # (kh1, kh2)
            c, s = _cis(k[:, :, None] * ar(h2)[None, None, :], H)  # (kh1, kh2, h2)
            blk = _real_block(c, s)                            # (kh1, ri, kh2, h2, ri')
            self._buf("h1b", blk.transpose(1, 2).reshape(h1, 2 * h2, 2 * h2))
        # H stage 2 (right-multiply): contracts kh1 -> h1; rows (kh1, ri), cols (h1, ri).
        c, s = _cis(ar(h1)[:, None] * ar(h1)[None, :], h1)
        self._buf("h2b", _real_block(c, s).transpose(0, 1).reshape(2 * h1, 2 * h1))
        # W stage 2 (real output, beta folded): contracts (kw1, ri) -> w1.
        c, s = _cis(ar(kw1)[:, None] * ar(w1)[None, :], w1)   # (kw1, w1)
        if w2 > 1:
            # W stage 1 (right-multiply, batched over kw1, d_k folded): contracts
            # kw2 -> w2; rows (kw2, ri), cols (ri, w2); exponent +n2*(k1 + W1*k2)/W.
            k = ar(kw1)[:, None] + w1 * ar(kw2)[None, :]       # (kw1, kw2)
            c1, s1 = _cis(k[:, :, None] * ar(w2)[None, None, :], W)  # (kw1, kw2, w2)
            d = c2r_weight(k)[:, :, None]
            blk = _real_block(c1 * d, s1 * d)                  # (kw1, ri, kw2, w2, ri')
            self._buf("w1b", blk.permute(0, 2, 1, 4, 3).reshape(kw1, 2 * kw2, 2 * w2))
            blk = _real_block(c, s)[..., 0] * beta             # (ri, kw1, w1)
            self._buf("w2b", blk.permute(2, 1, 0).reshape(w1, 2 * kw1))  # left: rows w1
        else:  # direct: this stage sees the full k, so d_k goes here; right-multiply
            d = c2r_weight(ar(kw1))[:, None]
            blk = _real_block(c * d, s * d)[..., 0] * beta     # (ri, kw1, w)
            self._buf("w2b", blk.transpose(0, 1).reshape(2 * kw1, w1))

    def forward(self, re: torch.Tensor, im: torch.Tensor) -> torch.Tensor:
        lead = re.shape[:-2]
        H, W, sz = self.height, self.width, self.sizes
        if tuple(re.shape[-2:]) != (H, self.wf) or re.shape != im.shape:
            raise ValueError(f"expected re, im of shape (..., {H}, {self.wf}), "
                             f"got {tuple(re.shape)} and {tuple(im.shape)}")
        # The mirror image of RealRFFT2.forward (the same moves in reverse) up to the
        # last W stage.
        t = torch.stack((re.reshape(-1, H, self.wf), im.reshape(-1, H, self.wf)), dim=-1)
        if self.kwp != self.wf:
            t = nn.functional.pad(t, (0, 0, 0, self.kwp - self.wf))
        # t: m [kh2 kh1] kw ri, natural order k = k1 + N1*k2 on both axes.
        if self.h2 > 1:
            t = _rearrange(t, "m h2 h1 kw ri", "m h1 kw h2 ri", sz)
            t = torch.matmul(t.reshape(-1, self.h1, self.kwp, 2 * self.h2), self.h1b)
        t = _rearrange(t, "m h1 kw h2 ri", "m kw h2 h1 ri", sz)   # m kw h2 [kh1 ri]
        t = torch.matmul(t.reshape(-1, 2 * self.h1), self.h2b)  # m kw h2 [h1 ri]
        if self.w2 > 1:
            t = _rearrange(t, "m kw2 kw1 h ri", "m kw1 h kw2 ri", sz)
            t = torch.matmul(t.reshape(-1, self.kw1, H, 2 * self.kw2), self.w1b)  # m kw1 h [ri w2]
            # Not the mirror of the forward: that move (ri outwards over w2-float blocks)
            # hits a slow generic path in onnxruntime, while a batch of small matmuls
            # (rows w1, K = 2*kw1, cols w2) runs at full speed there.
            t = _rearrange(t, "m kw1 h ri w2", "m h kw1 ri w2", sz)
            t = torch.matmul(self.w2b, t.reshape(-1, 2 * self.kw1, self.w2))  # m h2 h1 w1 w2
            t = _rearrange(t, "m h2 h1 w", "m h1 h2 w", sz)
        else:
            t = _rearrange(t, "m kw h ri", "m h kw ri", sz)
            t = torch.matmul(t.reshape(-1, 2 * self.kw1), self.w2b)  # m h2 h1 w
            t = _rearrange(t, "m h2 h1 w", "m h1 h2 w", sz)
        return t.reshape(*lead, H, W)


def unit_phase(re: torch.Tensor, im: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) of ``angle(re + i*im)`` without atan2/cos/sin.

    cos = re/|z| and sin = im/|z| where |z| > 0; at an exactly zero bin (1, 0),
    i.e. angle 0, which is what torch gives for (+0, +0).  (For (-0, +-0) torch
    says angle +-pi; the sign of a zero is backend-dependent, so exactly-zero bins
    are treated as undefined in parity tests, see spec section 3.)
    |z| is sqrt(re^2 + im^2): in float32 a bin below ~1e-19 loses precision and one
    below ~1e-23 counts as zero (its square underflows), far below any meaningful
    spectrum value.
    """
    m2 = re * re + im * im
    # No eps in the denominator: an eps would perturb every bin (relative error eps/|z|,
    # large for the many tiny high-frequency bins) and give 0 instead of 1 at zero bins.
    # sqrt only ever sees positive values (1 where |z| == 0), so neither the unselected
    # branch nor the gradient of sqrt at 0 produces NaN.
    pos = m2 > 0
    one = torch.ones_like(m2)
    m = torch.sqrt(torch.where(pos, m2, one))
    return torch.where(pos, re / m, one), torch.where(pos, im / m, torch.zeros_like(m2))
