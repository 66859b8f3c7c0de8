"""Export-safe real 2-D DFT: ``rfft2`` / ``irfft2`` as real matmuls, factorized.

Neither TFLite nor several delegates have a 2-D FFT, so the FFT blocks of DarkIR
(FreMLP) and SRConvNet (FourierUnit) are rewritten with these modules.  They use
only reshape / permute / matmul / pad / stack / mul / add / where / sqrt on real
tensors: no complex dtype, no ``torch.fft``, no ``atan2``.  Every DFT basis is a
constant, contiguous buffer (litert-torch silently merges *non-contiguous*
constants) registered with ``persistent=False`` so state_dicts stay clean.
Shapes are static: one module per (H, W).

These modules return the spectrum in natural order (``torch.fft.rfft2`` semantics).  The
models' FFT blocks only do per-bin work, so their deploy forms take their pair from
:func:`edgesr.reparam.dft_spectral.per_bin_dft`, which for ONNX exports of split sizes
uses a digit-reversed pair with far fewer transposes (:mod:`edgesr.reparam.dft_spectral`).

Math (spec ``srconvnet_darkir.md`` §3)
--------------------------------------
Each axis of length N is split Cooley-Tukey style, N = N1*N2 with N1 ~ sqrt(N):
input index n = N2*n1 + n2, output index k = k1 + N1*k2, and

    X[k1 + N1*k2] = sum_n2 exp(-2pi i n2 k2 / N2) exp(-2pi i n2 k1 / N)
                          * sum_n1 x[N2 n1 + n2] exp(-2pi i n1 k1 / N1)

i.e. two DFT matmuls of lengths N1 and N2; the twiddle factor exp(-2pi i n2 k1 / N)
is folded into one of them, which then becomes a *batched* basis (batched over k1 or
over n2, depending on the layout), so there is no separate twiddle multiply.  Cost
per line is ~N*(N1+N2) MACs instead of N^2.  A prime N, and any N <= ``DIRECT_MAX``
(64), uses a single direct DFT matmul: up to that size the extra matmul and permutes
of a split cost more time than the MACs they save (measured with onnxruntime and
eager torch at 16..256).  Only one split level is used: at N <= 1024 both factors
are <= 32 and each stage is a small-K matmul that is already close to memory-bound,
so a further split would trade MACs for more full passes over the tensor.

The W axis exploits the real input (the first W stage maps real -> complex) and
computes only the k2 needed for the W//2+1 kept bins; the inverse mirrors this (the
last W stage produces only the real part).  Normalisation and the C2R weights d_k
are folded into the bases.  All cos/sin values are computed in float64 from the
exactly reduced integer phase (n*k mod N) and cast once.  Complex values are carried
as a size-2 "ri" axis, so a complex matmul is one real matmul with a (2*Nin, 2*Nout)
basis.  Both layouts below compute the same sums from the same cos/sin tables
(fp64 agreement ~1e-15 relative); they differ only in how axes are ordered around
the matmuls, which is what decides the speed -- and the two runtimes disagree.

Layouts (``layout=`` of :class:`RealRFFT2` / :class:`RealIRFFT2`)
-----------------------------------------------------------------
``"onnx"`` (default): mostly right-multiplies (data @ basis); "ri" sits next to the axis
    being contracted; between matmuls each permute moves a *single* axis and keeps
    the innermost axis (w2 or ri) in place.  The twiddled stages are batched over k1
    while the data has extra leading rows, so those bases are broadcast over the
    batch; re/im come out as an innermost axis (a slice/stack per direction).  Per
    direction 4 matmuls and ~5 permutes.
``"tflite"``: every stage is a left-multiply (basis @ data) whose contracted axes
    are the *outermost* axes of the data (the rows m*H or m*W ride along as matmul
    columns); the batch axis of a twiddled stage (k1 or n2) is the outermost data axis
    too, so batches match and no basis is broadcast (no BROADCAST_TO in TFLite); re/im
    is the outermost axis (outputs are plain selects, no slicing of an inner axis).
    Per direction 4 matmuls and 3 transposes, two of them general multi-axis permutes.

Why each runtime gets its own: round trip rfft2 -> irfft2 on (1, 32, 256, 256) fp32,
one thread (eager torch.fft 16-19 ms):

    layout     onnxruntime   LiteRT (XNNPACK)
    "onnx"        68.5 ms       187.7 ms
    "tflite"       243 ms        81.8 ms

In LiteRT every TRANSPOSE costs ~4-5 ms at this size whatever its pattern, and so
does a FULLY_CONNECTED (~5 ms); but a broadcast basis costs BROADCAST_TO + BATCH_MATMUL
= 14.6 ms against 4.7 ms with matched batches, so fewer ops and no broadcast win.  In
onnxruntime moving one axis outward over a large contiguous block is cheap (0.2-0.7 ms)
while a multi-axis permute hits a per-element path (a generic 6-D Transpose costs
105-123 ms), so the single-axis moves of the "onnx" layout win there.  The callers
(DarkIR FreMLP, SRConvNet FourierUnit rewrites) pass the export target as the layout.
Whole models at 256x256, LiteRT, 1 thread, interleaved A/B of the two layouts (min /
median ms): DarkIR-m 1484/1580 -> 1256/1332, SRConvNet x4 6040/6642 -> 5746/6186
(one FConvMod block alone: 454/502 -> 338/356).
"""
from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["RealRFFT2", "RealIRFFT2", "unit_phase", "with_magnitude", "split_factor", "DIRECT_MAX", "LAYOUTS"]

_NORMS = ("backward", "ortho", "forward")
LAYOUTS = ("onnx", "tflite")  # see the module docstring; the export targets' names
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


def _block(num: torch.Tensor, n: int, weight: torch.Tensor | float = 1.0) -> torch.Tensor:
    """``_real_block`` of exp(2*pi*i*num/n) * weight (num: integer phases, last two axes in, out)."""
    c, s = _cis(num, n)
    return _real_block(c * weight, s * weight)


def _mat(blk: torch.Tensor, src: str, rows: str, cols: str) -> torch.Tensor:
    """Arrange a basis block with named axes ``src`` as a (batch..., rows, cols) matrix.

    Axes named in neither ``rows`` nor ``cols`` stay in front as batch axes (in order).
    """
    s, r, c = src.split(), rows.split(), cols.split()
    b = [a for a in s if a not in r and a not in c]
    t = blk.permute([s.index(a) for a in b + r + c])
    nb = t.shape[: len(b)]
    nr = math.prod(t.shape[len(b): len(b) + len(r)])
    return t.reshape(*nb, nr, -1)


def _axis_plan(n: int, factorize: bool, direct_max: int) -> tuple[int, int]:
    n1 = split_factor(n) if factorize and n > direct_max else n
    return n1, n // n1


def _c2r_weight(k: torch.Tensor, width: int) -> torch.Tensor:
    """C2R weights d_k of the inverse along W for frequencies ``k`` (float64): 1 at DC and,
    for even W, at Nyquist, 2 for the other kept bins, 0 beyond the half spectrum (the
    zero padding / extra bins a factorized layout carries)."""
    d = torch.full(k.shape, 2.0, dtype=torch.float64)
    d[k == 0] = 1.0
    if width % 2 == 0:
        d[k == width // 2] = 1.0
    d[k >= width // 2 + 1] = 0.0
    return d


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
                 direct_max: int, layout: str):
        super().__init__()
        if height < 1 or width < 1:
            raise ValueError(f"height and width must be >= 1, got {height}x{width}")
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        self.height, self.width, self.norm, self.layout = height, width, norm, layout
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

    def _w_phases(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Integer phases of the two W stages (sign +): plain (kw1, w1) = k1*n1 and
        twiddled (kw1, kw2, w2) = (k1 + W1*k2)*n2 (mod W1 and W respectively)."""
        ar = torch.arange
        k = ar(self.kw1)[:, None] + self.w1 * ar(self.kw2)[None, :]  # (kw1, kw2)
        return ar(self.kw1)[:, None] * ar(self.w1)[None, :], k[:, :, None] * ar(self.w2)

    def _h_phases(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Integer phases of the H stages (sign +), each (in, out)-symmetric:
        plain h1 (h1, h1), plain h2 (h2, h2), and the twiddled (h1, h2, h2) =
        (k1 + H1*k2)*n2 (mod H) / (h2, h1, h1) = k1*(H2*n1 + n2) (mod H)."""
        ar, h1, h2 = torch.arange, self.h1, self.h2
        k = ar(h1)[:, None] + h1 * ar(h2)[None, :]                        # (k1, k2)
        by_k1 = k[:, :, None] * ar(h2)                                    # (k1, k2, n2)
        by_n2 = ar(h1)[None, :, None] * (h2 * ar(h1)[None, None, :] + ar(h2)[:, None, None])
        return ar(h1)[:, None] * ar(h1), ar(h2)[:, None] * ar(h2), by_k1, by_n2  # by_n2: (n2, k1, n1)

    def _buf(self, name: str, t: torch.Tensor) -> None:
        # contiguous + own storage: litert-torch merges non-contiguous constants.
        self.register_buffer(name, t.to(self._dtype).contiguous().clone(), persistent=False)

    def extra_repr(self) -> str:
        return (f"height={self.height}, width={self.width}, norm={self.norm!r}, "
                f"split=({self.h1}x{self.h2}, {self.w1}x{self.w2}), layout={self.layout!r}")


class RealRFFT2(_DFT2Base):
    """``torch.fft.rfft2(x, norm=norm)`` for real x of shape (..., H, W), as real matmuls.

    ``forward(x) -> (re, im)``, each of shape (..., H, W//2+1).  Build with
    ``dtype=torch.float64`` for float64 inputs (the bases are cast once at init).
    An axis longer than ``direct_max`` is split (Cooley-Tukey) unless it is prime;
    ``factorize=False`` gives the unfactorized direct-matmul form (O(N^3) MACs),
    kept for benchmarks and cross-checks.  ``layout`` ("onnx" | "tflite") picks the
    op arrangement that runs fastest on that runtime (module docstring); same outputs.
    """

    def __init__(self, height: int, width: int, norm: str = "backward",
                 dtype: torch.dtype = torch.float32, factorize: bool = True,
                 direct_max: int = DIRECT_MAX, layout: str = "onnx"):
        super().__init__(height, width, norm, dtype, factorize, direct_max, layout)
        alpha = _scale(norm, height, width, inverse=False)
        w_plain, w_twid = self._w_phases()
        h1_plain, h2_plain, h_by_k1, h_by_n2 = self._h_phases()
        h1, h2, W, H = self.h1, self.h2, width, height
        # W stage 1 (real -> complex, alpha folded) "n k ro": (w1, kw1, ri), the x_re rows.
        wa = _block(-w_plain.T, self.w1)[0] * alpha
        # W stage 2 (twiddles folded) "b ri n k ro": batch kw1, contracts w2 -> kw2.
        wb = _block(-w_twid.transpose(1, 2), W) if self.w2 > 1 else None
        if layout == "onnx":
            # Left-multiply (rows (ri, kw1)) when split, else right-multiply (cols (kw1, ri)).
            self._buf("wa", _mat(wa, "n k ro", "ro k", "n") if self.w2 > 1
                      else _mat(wa, "n k ro", "n", "k ro"))
            if wb is not None:  # right-multiply batched over kw1: rows (ri, w2), cols (kw2, ri)
                self._buf("wb", _mat(wb, "b ri n k ro", "ri n", "k ro"))
            # H stage A: plain h1 DFT, right-multiply: rows (h1, ri), cols (kh1, ri).
            self._buf("ha", _mat(_block(-h1_plain, h1), "ri n k ro", "n ri", "k ro"))
            if h2 > 1:  # H stage B, batched over kh1 (twiddles folded): contracts h2 -> kh2.
                blk = _block(-h_by_k1.transpose(1, 2), H)              # (kh1, ri, h2, kh2, ro)
                self._buf("hb", _mat(blk, "b ri n k ro", "n ri", "k ro"))
        else:
            # Left-multiplies only: rows = output axes, cols = contracted axes.
            self._buf("wa", _mat(wa, "n k ro", "k ro", "n"))           # rows (kw1, ri), cols w1
            if wb is not None:                                          # rows (kw2, ri), cols (ri, w2)
                self._buf("wb", _mat(wb, "b ri n k ro", "k ro", "ri n"))
            # H stage 1, batched over h2 (twiddles folded): contracts h1 -> kh1;
            # rows (ri, kh1), cols (ri, h1).  Without a split: the whole H DFT, 2-D.
            ha = _mat(_block(-h_by_n2.transpose(1, 2), H), "b ri n k ro", "ro k", "ri n")
            self._buf("ha", ha if h2 > 1 else ha[0])
            if h2 > 1:  # H stage 2: plain h2 DFT, rows (ri, kh2), cols (h2, ri).
                self._buf("hb", _mat(_block(-h2_plain, h2), "ri n k ro", "ro k", "n ri"))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lead = x.shape[:-2]
        if tuple(x.shape[-2:]) != (self.height, self.width):
            raise ValueError(f"expected (..., {self.height}, {self.width}), got {tuple(x.shape)}")
        t = self._forward_onnx(x) if self.layout == "onnx" else self._forward_tflite(x)
        shape = (*lead, self.height, self.wf)
        return t[0].reshape(shape), t[1].reshape(shape)

    def _forward_onnx(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        H, sz = self.height, self.sizes
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
        return t[..., 0], t[..., 1]

    def _forward_tflite(self, x: torch.Tensor) -> torch.Tensor:
        H, W, sz = self.height, self.width, self.sizes
        # Every matmul is a left-multiply (basis @ data) whose contracted axes are the
        # outermost ones of the data, so the rows m*H of the input ride along as columns.
        t = x.reshape(-1, W).permute(1, 0)                             # w1 w2 [m h]
        t = torch.matmul(self.wa, t.reshape(self.w1, -1))              # kw1 ri w2 [m h]
        if self.w2 > 1:
            t = torch.matmul(self.wb, t.reshape(self.kw1, 2 * self.w2, -1))  # kw1 kw2 ri [m h]
        t = _rearrange(t, "kw1 kw2 ri m h1 h2", "h2 ri h1 m kw2 kw1", sz)
        if self.h2 > 1:
            t = torch.matmul(self.ha, t.reshape(self.h2, 2 * self.h1, -1))  # h2 ri kh1 [m kw]
            t = torch.matmul(self.hb, t.reshape(2 * self.h2, -1))      # ri kh2 kh1 [m kw]
        else:
            t = torch.matmul(self.ha, t.reshape(2 * H, -1))            # ri kh [m kw]
        t = _rearrange(t, "ri h m kw", "ri m h kw", sz)
        if self.kwp != self.wf:
            t = t[..., : self.wf]
        return t


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

    ``dtype``, ``factorize``, ``direct_max`` and ``layout`` as for :class:`RealRFFT2`.
    """

    def __init__(self, height: int, width: int, norm: str = "backward",
                 dtype: torch.dtype = torch.float32, factorize: bool = True,
                 direct_max: int = DIRECT_MAX, layout: str = "onnx"):
        super().__init__(height, width, norm, dtype, factorize, direct_max, layout)
        beta = _scale(norm, height, width, inverse=True)
        w_plain, w_twid = self._w_phases()
        h1_plain, h2_plain, h_by_k1, h_by_n2 = self._h_phases()
        h1, h2, W, H = self.h1, self.h2, width, height

        ar = torch.arange
        if self.w2 > 1:
            # W stage 1 "b ri k n ro" (twiddles and d_k folded): batch kw1, contracts kw2 -> w2.
            d = _c2r_weight(ar(self.kw1)[:, None] + self.w1 * ar(self.kw2)[None, :], W)[:, :, None]
            wa = _block(w_twid, W, d)
            # W stage 2 (real output, beta folded) "ri k n": contracts (kw1, ri) -> w1.
            wb = _block(w_plain, self.w1)[..., 0] * beta
        else:  # direct: this stage sees the full k, so d_k goes here
            wa = None
            wb = _block(w_plain, self.w1, _c2r_weight(ar(self.kw1), W)[:, None])[..., 0] * beta
        if layout == "onnx":
            if h2 > 1:  # H stage 1, batched over kh1 (twiddles folded): contracts kh2 -> h2
                self._buf("h1b", _mat(_block(h_by_k1, H), "b ri k n ro", "k ri", "n ro"))
            # H stage 2: plain h1 DFT, right-multiply: rows (kh1, ri), cols (h1, ri).
            self._buf("h2b", _mat(_block(h1_plain, h1), "ri k n ro", "k ri", "n ro"))
            if wa is not None:  # right-multiply batched over kw1: rows (kw2, ri), cols (ri, w2)
                self._buf("w1b", _mat(wa, "b ri k n ro", "k ri", "ro n"))
                self._buf("w2b", _mat(wb, "ri k n", "n", "k ri"))     # left: rows w1
            else:                                                      # right: cols w
                self._buf("w2b", _mat(wb, "ri k n", "k ri", "n"))
        else:
            # Left-multiplies only: rows = output axes, cols = contracted axes.
            if h2 > 1:  # H stage 1: plain h2 DFT, rows (h2, ri), cols (ri, kh2).
                self._buf("ha", _mat(_block(h2_plain, h2), "ri k n ro", "n ro", "ri k"))
            # H stage 2, batched over h2 (twiddles folded): rows (ri, h1), cols (ri, kh1).
            # Without a split: the whole H DFT, one 2-D matrix.
            hb = _mat(_block(h_by_n2, H), "b ri k n ro", "ro n", "ri k")
            self._buf("hb", hb if h2 > 1 else hb[0])
            if wa is not None:  # rows (ri, w2), cols (ri, kw2), batched over kw1
                self._buf("wa", _mat(wa, "b ri k n ro", "ro n", "ri k"))
            self._buf("wb", _mat(wb, "ri k n", "n", "k ri"))          # rows w1, cols (kw1, ri)

    def forward(self, re: torch.Tensor, im: torch.Tensor) -> torch.Tensor:
        lead = re.shape[:-2]
        H, W = self.height, self.width
        if tuple(re.shape[-2:]) != (H, self.wf) or re.shape != im.shape:
            raise ValueError(f"expected re, im of shape (..., {H}, {self.wf}), "
                             f"got {tuple(re.shape)} and {tuple(im.shape)}")
        fwd = self._forward_onnx if self.layout == "onnx" else self._forward_tflite
        return fwd(re.reshape(-1, H, self.wf), im.reshape(-1, H, self.wf)).reshape(*lead, H, W)

    def _forward_onnx(self, re: torch.Tensor, im: torch.Tensor) -> torch.Tensor:
        H, sz = self.height, self.sizes
        # The mirror image of RealRFFT2._forward_onnx (the same moves in reverse) up to
        # the last W stage.
        t = torch.stack((re, im), dim=-1)
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
        return t

    def _forward_tflite(self, re: torch.Tensor, im: torch.Tensor) -> torch.Tensor:
        H, W, sz = self.height, self.width, self.sizes
        # The mirror image of RealRFFT2._forward_tflite: every matmul a left-multiply
        # whose contracted axes are the outermost ones of the data.
        t = torch.stack((re, im))                                      # ri m h kw
        if self.kwp != self.wf:
            t = nn.functional.pad(t, (0, self.kwp - self.wf))
        t = _rearrange(t, "ri m h kw", "ri h m kw", sz)                # ri kh2 kh1 [m kw]
        if self.h2 > 1:
            t = torch.matmul(self.ha, t.reshape(2 * self.h2, -1))      # h2 ri kh1 [m kw]
            t = torch.matmul(self.hb, t.reshape(self.h2, 2 * self.h1, -1))  # h2 ri h1 [m kw]
        else:
            t = torch.matmul(self.hb, t.reshape(2 * H, -1))            # ri h [m kw]
        t = _rearrange(t, "h2 ri h1 m kw2 kw1", "kw1 ri kw2 m h1 h2", sz)
        if self.w2 > 1:
            t = torch.matmul(self.wa, t.reshape(self.kw1, 2 * self.kw2, -1))  # kw1 ri w2 [m h]
        t = torch.matmul(self.wb, t.reshape(2 * self.kw1, -1))         # w1 w2 [m h]
        return t.reshape(W, -1).permute(1, 0)


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


def with_magnitude(re: torch.Tensor, im: torch.Tensor, mag: torch.Tensor,
                   new_mag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``new_mag * unit_phase(re, im)`` for ``mag = sqrt(re^2 + im^2)``, as ``(re, im) * new_mag/|z|``.

    One division and two selects per bin instead of :func:`unit_phase`'s two divisions and
    three selects plus the products (a Where costs onnxruntime ~3x a Mul), with the same
    rule at a zero bin (phase 0: ``(new_mag, 0)``): there re is replaced by 1 and |z| by 1,
    giving ``(new_mag, im * new_mag)`` with ``im == 0`` -- or, if re^2 + im^2 underflowed,
    ``|im| < 1e-22``: rounding level either way.
    """
    nonzero = mag > 0
    ratio = new_mag / torch.where(nonzero, mag, 1.0)
    return torch.where(nonzero, re, 1.0) * ratio, im * ratio
