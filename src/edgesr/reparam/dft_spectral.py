"""A paired real 2-D DFT for *per-bin* spectral blocks: spectrum in digit-reversed order.

DarkIR's FreMLP and SRConvNet's FourierUnit do only per-bin work between ``rfft2`` and
``irfft2`` (1x1 convs across channels, elementwise magnitude/phase).  The order of the
bins in memory therefore does not matter to them, as long as the inverse reads the
order the forward wrote.  :class:`SpectralRFFT2` / :class:`SpectralIRFFT2` use that
freedom: the forward leaves each axis's frequencies in the order its Cooley-Tukey
stages produce them (decimation in frequency) and the inverse consumes them in that
order (decimation in time), so no stage has to restore the natural order.  Every
matmul is then a left-multiply ``basis @ data`` whose contracted axes sit right after
the plane axis ``m`` (and, in a twiddled stage, after its batch axis) with a contiguous
tail, and the only data movements are
four per-plane 2-D transposes.  The natural-order :class:`~edgesr.reparam.dft.RealRFFT2`
needs about five multi-axis permutes per direction instead, which is most of its
time in onnxruntime (``benchmarks/ort_profile.py --dft 256``).  :func:`per_bin_dft` picks
this pair for ONNX exports whenever an axis is split; with direct (short or prime) axes
only, the natural-order form has fewer transposes and is faster.

Math
----
One axis of length N = No*Ni, input index n = o*Ni + i (o outer in memory).  Frequency
k = ko + No*ki is stored as (ko, ki), ko outer.  Forward (sign -):

    A[ko, i]  = sum_o  x[o, i] exp(-2pi i o ko / No)                  (plain No-point DFT)
    X[ko, ki] = sum_i  A[ko, i] exp(-2pi i i (ko + No ki) / N)       (twiddle folded; batched over ko)

Inverse (sign +), the same phases in reverse order:

    B[ko, i]  = sum_ki X[ko, ki] exp(+2pi i i (ko + No ki) / N)      (batched over ko)
    y[o, i]   = sum_ko B[ko, i]  exp(+2pi i o ko / No)

The W axis (real input) keeps only the frequencies the half spectrum needs:
ko < No and ki < ceil((W//2+1)/No) -- ``kwp`` stored columns, of which the ones with
frequency >= W//2+1 are genuine DFT bins (conjugate mirrors) that the inverse weights
by zero.  The inverse along W is the C2R transform, y = beta * sum_k d_k Re(X_k e^{+...}),
d_0 = 1, d_{W/2} = 1 (even W), d_k = 2 otherwise, 0 for the extra columns; taking the real
part drops the imaginary parts of the DC and Nyquist columns exactly, as torch (CPU) and
numpy do.  The H axis is a full complex inverse, so non-Hermitian input (SRConvNet) gets
the same canonical semantics as :class:`~edgesr.reparam.dft.RealIRFFT2`.  Axes up to
``DIRECT_MAX`` and prime axes use one direct stage (Ni = 1).

Layout of one direction (m = all leading axes flattened; [a b] = one matmul axis):

    x (m, H, W) -T0-> (m, W, H) -S1-> (m, [kwo ri], wi, H) -S2-> (m, [kwo kwi], [ri H])
      -T1-> (m, [ri ho], [hi kwp]) -S3-> (m, kho, [ri hi], kwp) -S4-> (m, kho, ri, [khi kwp])

and the inverse mirrors it.  The spectrum is returned as ``(re, im)`` of shape
(..., H, kwp); :meth:`SpectralRFFT2.bin_frequencies` says which frequency sits where.
"""
from __future__ import annotations

import torch
from torch import nn

from .dft import DIRECT_MAX, LAYOUTS, RealIRFFT2, RealRFFT2, _axis_plan, _c2r_weight, _cis, _scale

__all__ = ["SpectralRFFT2", "SpectralIRFFT2", "per_bin_dft"]


def _digits(n_lo: int, stride: int, n_hi: int) -> torch.Tensor:
    """(n_lo, n_hi) grid of ``lo + stride*hi``: the frequency stored at (ko, ki), ko outer."""
    return torch.arange(n_lo)[:, None] + stride * torch.arange(n_hi)[None, :]


def _complex_left(c: torch.Tensor, s: torch.Tensor, rows_ri_first: bool, cols_ri_first: bool) -> torch.Tensor:
    """Real (..., 2R, 2K) matrix of the complex map out[r] = sum_k (c + i s)[r, k] in[k].

    ``c``, ``s``: (..., R, K).  Rows are ordered (ri, r) if ``rows_ri_first`` else (r, ri);
    columns likewise.  out_re = c in_re - s in_im, out_im = s in_re + c in_im.
    """
    blk = torch.stack((torch.stack((c, -s), -1), torch.stack((s, c), -1)), -3)  # (..., R, ro, K, ri)
    nb = blk.dim() - 4
    r_ax, ro_ax, k_ax, ri_ax = nb, nb + 1, nb + 2, nb + 3
    perm = list(range(nb)) + ([ro_ax, r_ax] if rows_ri_first else [r_ax, ro_ax]) \
        + ([ri_ax, k_ax] if cols_ri_first else [k_ax, ri_ax])
    t = blk.permute(perm)
    return t.reshape(*t.shape[:nb], 2 * c.shape[-2], 2 * c.shape[-1])


class _SpectralBase(nn.Module):
    def __init__(self, height: int, width: int, norm: str, dtype: torch.dtype, direct_max: int):
        super().__init__()
        if height < 1 or width < 1:
            raise ValueError(f"height and width must be >= 1, got {height}x{width}")
        _scale(norm, height, width, inverse=False)  # validates norm
        self.height, self.width, self.norm = height, width, norm
        self.wf = width // 2 + 1
        self._dtype = dtype
        self.ho, self.hi = _axis_plan(height, True, direct_max)  # Ni = 1: one direct stage
        self.wo, self.wi = _axis_plan(width, True, direct_max)
        if self.wi > 1:
            self.kwo, self.kwi = self.wo, -(-self.wf // self.wo)
        else:  # direct W stage: it produces exactly the wf kept bins
            self.kwo, self.kwi = self.wf, 1
        self.kwp = self.kwo * self.kwi

    def bin_frequencies(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(kh, kw): the frequency of each stored row (H,) and column (kwp,).

        ``spectrum[..., p, q]`` is the DFT bin ``X[kh[p], kw[q]]`` of the full 2-D DFT;
        columns with ``kw >= W//2 + 1`` are extra (ignored by the inverse).
        """
        return self._h_freq().reshape(-1), self._w_freq().reshape(-1)

    def _h_freq(self) -> torch.Tensor:
        return _digits(self.ho, self.ho, self.hi)  # (kho, khi)

    def _w_freq(self) -> torch.Tensor:
        return _digits(self.kwo, self.wo, self.kwi)  # (kwo, kwi)

    def _buf(self, name: str, t: torch.Tensor) -> None:
        # contiguous + own storage (litert-torch merges non-contiguous constants), not in state_dict.
        self.register_buffer(name, t.to(self._dtype).contiguous().clone(), persistent=False)

    def _w_twiddle_phase(self) -> torch.Tensor:
        """(kwo, kwi, wi) integer phases wi*(kwo + Wo*kwi) of the twiddled W stage."""
        return self._w_freq()[:, :, None] * torch.arange(self.wi)

    def _h_twiddle_phase(self) -> torch.Tensor:
        """(kho, khi, hi) integer phases hi*(kho + Ho*khi) of the twiddled H stage."""
        return self._h_freq()[:, :, None] * torch.arange(self.hi)

    def extra_repr(self) -> str:
        return (f"height={self.height}, width={self.width}, norm={self.norm!r}, "
                f"split=({self.ho}x{self.hi}, {self.wo}x{self.wi}), stored=({self.height}, {self.kwp})")


class SpectralRFFT2(_SpectralBase):
    """``rfft2(x, norm=norm)`` in stored (digit-reversed) bin order, for per-bin blocks.

    ``forward(x) -> (re, im)``, each (..., H, kwp); see :meth:`bin_frequencies`.  Only
    :class:`SpectralIRFFT2` of the same (H, W) reads this order.  Real matmuls, reshapes
    and 2-D transposes only; constant contiguous bases (float64-exact phases, cast once).
    """

    def __init__(self, height: int, width: int, norm: str = "backward",
                 dtype: torch.dtype = torch.float32, direct_max: int = DIRECT_MAX):
        super().__init__(height, width, norm, dtype, direct_max)
        alpha = _scale(norm, height, width, inverse=False)
        ar = torch.arange
        # S1 (real in): rows (kwo, ri), cols wo.  Sign - : e^{-i t} = cos t - i sin t.
        c, s = _cis(ar(self.kwo)[:, None] * ar(self.wo)[None, :], self.wo)
        self._buf("s1", torch.stack((c, -s), 1).reshape(2 * self.kwo, self.wo) * alpha)
        if self.wi > 1:  # S2: batched over kwo, rows (kwi, ri), cols (ri, wi)
            c, s = _cis(self._w_twiddle_phase(), width)
            self._buf("s2", _complex_left(c, -s, rows_ri_first=False, cols_ri_first=True))
        # S3: rows (kho, ri), cols (ri, ho)
        c, s = _cis(ar(self.ho)[:, None] * ar(self.ho)[None, :], self.ho)
        self._buf("s3", _complex_left(c, -s, rows_ri_first=False, cols_ri_first=True))
        if self.hi > 1:  # S4: batched over kho, rows (ri, khi), cols (ri, hi)
            c, s = _cis(self._h_twiddle_phase(), height)
            self._buf("s4", _complex_left(c, -s, rows_ri_first=True, cols_ri_first=True))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        H, W = self.height, self.width
        if tuple(x.shape[-2:]) != (H, W):
            raise ValueError(f"expected (..., {H}, {W}), got {tuple(x.shape)}")
        lead = x.shape[:-2]
        t = x.reshape(-1, H, W).transpose(1, 2)                                # T0: m W H
        t = torch.matmul(self.s1, t.reshape(-1, self.wo, self.wi * H))          # m [kwo ri] [wi H]
        if self.wi > 1:
            t = torch.matmul(self.s2, t.reshape(-1, self.kwo, 2 * self.wi, H))  # m kwo [kwi ri] H
        t = t.reshape(-1, self.kwp, 2 * H).transpose(1, 2)                      # T1: m [ri ho hi] kwp
        t = torch.matmul(self.s3, t.reshape(-1, 2 * self.ho, self.hi * self.kwp))  # m [kho ri] [hi kwp]
        if self.hi > 1:
            t = torch.matmul(self.s4, t.reshape(-1, self.ho, 2 * self.hi, self.kwp))  # m kho [ri khi] kwp
        t = t.reshape(-1, self.ho, 2, self.hi * self.kwp)
        shape = (*lead, H, self.kwp)
        return t[:, :, 0].reshape(shape), t[:, :, 1].reshape(shape)


class SpectralIRFFT2(_SpectralBase):
    """``irfft2(complex(re, im), s=(H, W), norm=norm)`` reading the :class:`SpectralRFFT2` order.

    ``forward(re, im) -> y``: inputs (..., H, kwp) in stored order, output (..., H, W).
    Semantics for non-Hermitian input as torch CPU / numpy: full complex inverse along H,
    then C2R along W (imaginary parts of the DC and Nyquist columns ignored); the extra
    stored columns (frequency >= W//2 + 1) are ignored.
    """

    def __init__(self, height: int, width: int, norm: str = "backward",
                 dtype: torch.dtype = torch.float32, direct_max: int = DIRECT_MAX):
        super().__init__(height, width, norm, dtype, direct_max)
        beta = _scale(norm, height, width, inverse=True)
        ar, W = torch.arange, width
        if self.hi > 1:  # I1: batched over kho, rows (ri, hi), cols (ri, khi); phases of S4 transposed
            c, s = _cis(self._h_twiddle_phase().transpose(1, 2), height)
            self._buf("i1", _complex_left(c, s, rows_ri_first=True, cols_ri_first=True))
        # I2: rows (ri, ho), cols (kho, ri)
        c, s = _cis(ar(self.ho)[:, None] * ar(self.ho)[None, :], self.ho)
        self._buf("i2", _complex_left(c, s, rows_ri_first=True, cols_ri_first=False))
        d = _c2r_weight(self._w_freq(), W)  # per stored column (kwo, kwi); 0 on the extra ones
        if self.wi > 1:
            # I3: batched over kwo, rows (ri, wi), cols (kwi, ri), d_k folded per column.
            c, s = _cis(self._w_twiddle_phase().transpose(1, 2), W)          # (kwo, wi, kwi)
            dd = d[:, None, :]
            self._buf("i3", _complex_left(c * dd, s * dd, rows_ri_first=True, cols_ri_first=False))
            dk = torch.ones(self.kwo, dtype=torch.float64)
        else:
            dk = d[:, 0]
        # I4 (real out, beta and -- for a direct W stage -- d_k folded): rows wo, cols (kwo, ri):
        # y = sum_k Re((b_re + i b_im) e^{+i t}) = b_re cos t - b_im sin t.
        c, s = _cis(ar(self.wo)[:, None] * ar(self.kwo)[None, :], self.wo)     # (wo, kwo)
        self._buf("i4", torch.stack((c * dk, -s * dk), -1).reshape(self.wo, 2 * self.kwo) * beta)

    def forward(self, re: torch.Tensor, im: torch.Tensor) -> torch.Tensor:
        H, W = self.height, self.width
        if tuple(re.shape[-2:]) != (H, self.kwp) or re.shape != im.shape:
            raise ValueError(f"expected re, im of shape (..., {H}, {self.kwp}), "
                             f"got {tuple(re.shape)} and {tuple(im.shape)}")
        lead = re.shape[:-2]
        rows = (-1, self.ho, 1, self.hi * self.kwp)
        t = torch.cat((re.reshape(rows), im.reshape(rows)), 2)                 # m kho [ri khi] kwp
        if self.hi > 1:
            t = torch.matmul(self.i1, t.reshape(-1, self.ho, 2 * self.hi, self.kwp))  # m kho [ri hi] kwp
        t = torch.matmul(self.i2, t.reshape(-1, 2 * self.ho, self.hi * self.kwp))  # m [ri ho] [hi kwp]
        t = t.reshape(-1, 2 * H, self.kwp).transpose(1, 2)                     # T2: m [kwo kwi] [ri H]
        if self.wi > 1:
            t = torch.matmul(self.i3, t.reshape(-1, self.kwo, 2 * self.kwi, H))  # m kwo [ri wi] H
        t = torch.matmul(self.i4, t.reshape(-1, 2 * self.kwo, self.wi * H))     # m wo [wi H]
        return t.reshape(-1, W, H).transpose(1, 2).reshape(*lead, H, W)        # T3


def per_bin_dft(height: int, width: int, norm: str, dtype: torch.dtype,
                target: str) -> tuple[nn.Module, nn.Module]:
    """Forward and inverse real 2-D DFT for a block that only does per-bin work in between.

    ``fwd(x) -> (re, im)`` and ``inv(re, im) -> y`` with ``inv(*fwd(x)) == x`` and
    ``inv(f(*fwd(x)))`` equal to ``irfft2(f(rfft2(x)))`` for any per-bin (and per-channel
    mixing) ``f``; the bin order in between is the pair's own.  The arrangement is the
    fastest measured on the export target's runtime (round trips, 1 thread, CPU time,
    onnxruntime 1.31 / ai-edge-litert 2.3):

    - ``"onnx"`` with a split axis (longer than ``DIRECT_MAX`` and not prime):
      :class:`SpectralRFFT2` / :class:`SpectralIRFFT2`, digit-reversed bins -- (32, 256²)
      51 ms against 81 ms for the natural-order "onnx" layout, (64, 128²) 22 vs 34 ms,
      (64, 96²) 11 vs 17 ms;
    - ``"onnx"`` with direct axes only: the natural-order "onnx" layout, which has fewer
      transposes there -- (128, 64²) 7.8 vs 10.5 ms, (256, 32²) 3.5 vs 4.0 ms;
    - ``"tflite"``: the natural-order "tflite" layout (no run-time basis broadcast, which
      costs LiteRT a BROADCAST_TO per batched stage): (32, 256²) 100 vs 107 ms.
    """
    if target not in LAYOUTS:
        raise ValueError(f"target must be one of {LAYOUTS}, got {target!r}")
    split = _axis_plan(height, True, DIRECT_MAX)[1] > 1 or _axis_plan(width, True, DIRECT_MAX)[1] > 1
    if target == "onnx" and split:
        return (SpectralRFFT2(height, width, norm, dtype=dtype),
                SpectralIRFFT2(height, width, norm, dtype=dtype))
    return (RealRFFT2(height, width, norm, dtype=dtype, layout=target),
            RealIRFFT2(height, width, norm, dtype=dtype, layout=target))
