"""Reduced-precision artifacts: fp16 and calibrated int8 ONNX, derived from the fp32 export.

The pipeline exports and checks fp32 first; this module rewrites that file:

- **fp16** (``to_fp16_onnx``): weights and compute in float16, the artifact's float32
  ``input``/``output`` kept (the contract does not change; casts sit inside the graph).
  Before converting, an *overflow audit* runs the fp32 graph on real photographs and on
  extreme inputs (all white, all black, noise) with every intermediate tensor exposed and
  keeps in fp32 each node whose output peak leaves fp16's safe range (65504 / headroom):
  SPAN's x255 normalisation, SoftPool exponentials, DFT DC bins, LayerNorm variances and
  attention logits are found by measurement, not by name.  The converted graph must be
  finite on the same extreme inputs.
- **int8** (``to_int8_onnx``): onnxruntime static QDQ quantization (per-channel int8
  weights, uint8 activations) calibrated on real images (default: the 16 images edgesr
  ships for it, :func:`default_calibration_dirs`).  Activation ranges: every calibrated
  tensor gets a min/max, a percentile and an entropy range from one pass over the
  calibration inputs (:func:`collect_activations`, :func:`candidate_ranges`), plus a
  per-tensor pick of the range that quantizes that tensor's own values with the least error;
  the graph is quantized under each scheme (onnxruntime calibration caches) and the scheme
  that loses least on the quality probe is kept.  Then *accuracy-driven mixed precision*:
  the quality probe is the calibration images (each downscaled bicubically by the model's
  scale, the original as ground truth), and a graph is judged by the Y-PSNR drop its int8
  output *noise* predicts (:class:`NoiseProbe`: 10 log10(1 + noise / fp32 error) per image),
  not by the measured PSNR difference, which lucky noise can make small or negative on the
  probe.  If every layer int8 exceeds ``NOISE_MARGIN x max_psnr_drop``, each layer is made
  int8 *alone* (the noise it adds) and the quietest k layers are int8, k the largest that
  meets the target (binary search).  The report lists every float-kept node with its
  predicted cost and each tensor's range method.  Deterministic: same graph and calibration,
  same file.

TFLite: fp16 weights via ai-edge-quantizer (``to_fp16_tflite``); calibrated int8 TFLite
(ai-edge-quantizer ``static_wi8_ai8``, the same calibration set) lives in ``int8_tflite.py``.
"""

from __future__ import annotations

import collections
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from ..errors import EdgeSRError, ExportError

PRECISIONS = ("fp32", "fp16", "int8")
FP16_MAX = 65504.0
# A node whose fp32 output peak exceeds FP16_MAX / FP16_HEADROOM on any audit input stays
# fp32: fp16 rounding moves intermediate values, and other images may peak higher.
FP16_HEADROOM = 8.0
DEFAULT_MAX_PSNR_DROP = 0.15
# The probe under-estimates the drop on held-out benchmark images: those are easier (higher
# fp32 PSNR), so the same int8 noise costs more dB there.  With the 4-photograph probe the
# ratio was 2-5x; with the 16-image default set Set5 / probe measured 1.2-5.7x (SAFMN++ 1.2,
# PlainUSR x4 2.7, SPAN-28 5.7), and 20x on PlainUSR-S (gate missed).  Part of that was
# the measure: a PSNR difference on the probe includes lucky int8 noise that cancels fp32
# error there; int8 ONNX now targets the drop predicted from the output noise instead
# (NoiseProbe, NOISE_MARGIN below).  PROBE_MARGIN: the int8 TFLite search (int8_tflite.py)
# aims at PROBE_MARGIN x the budget on its probe PSNR difference.
PROBE_MARGIN = 0.3
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
# Largest low-resolution side fed to a dynamic graph during calibration/quality probes
# (x4: the 256-px images give 64; x2: capped at 96, the probe's cost grows with the area).
MAX_CALIBRATION_SIDE = 96
# Tiles per calibration image fed to the calibrator (evenly spread over the image): 16 images
# x 8 tiles + the probe's 16 LR images (all 364 tiles took 136 s to calibrate PlainUSR x4's
# 124 activations on the loaded 2-core machine).
MAX_TILES_PER_IMAGE = 8


class CalibrationError(EdgeSRError):
    """``--calibration`` does not give usable images."""


# --------------------------------------------------------------------------- requests


def check_request(fmt: str, precision: str, calibration: str | os.PathLike | None, max_psnr_drop: float | None) -> None:
    """Refuse impossible combinations before any work (one line, exit 2, no artifact)."""
    if precision not in PRECISIONS:
        raise ExportError(f"unknown precision {precision!r} (known: {', '.join(PRECISIONS)})")
    if precision != "int8" and calibration is not None:
        raise ExportError("--calibration only applies to --precision int8")
    if max_psnr_drop is not None and (precision != "int8" or not max_psnr_drop > 0):
        raise ExportError("--max-psnr-drop applies to --precision int8 and must be a positive number of dB")
    if precision == "int8" and calibration is not None:
        load_calibration(calibration)  # fail early on an unusable folder


# --------------------------------------------------------------------------- calibration images


@dataclass
class CalibrationSet:
    images: list[np.ndarray]  # (H, W, 3) uint8 RGB, the ground truth of the quality probe
    source: str

    def summary(self) -> dict:
        shapes = [f"{im.shape[0]}x{im.shape[1]}" for im in self.images]
        return {"source": self.source, "count": len(self.images), "sizes": shapes}


# The default calibration set: the 4 parity photographs (192x192) and 12 calibration crops
# (256x256) of scikit-image's public-domain / CC0 sample images, colour photographs and
# grey scenes and textures, coins, deep sky (licences in each folder's README).  Calibration ranges
# and the quality probe both come from these; never from a benchmark set.
CALIBRATION_DIR = Path(__file__).resolve().parent.parent / "data" / "calibration"


def default_calibration_dirs() -> list[Path]:
    from ..data import IMAGE_DIR

    return [IMAGE_DIR, CALIBRATION_DIR]


def load_calibration(directory: str | os.PathLike | None) -> CalibrationSet:
    """Every readable image of ``directory`` (default: the images edgesr ships for it,
    :func:`default_calibration_dirs`)."""
    from PIL import Image, UnidentifiedImageError

    dirs = [Path(directory)] if directory is not None else default_calibration_dirs()
    files = []
    for d in dirs:
        if not d.is_dir():
            raise CalibrationError(f"calibration folder not found: {d}")
        files += sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise CalibrationError(f"no calibration images ({'/'.join(IMAGE_SUFFIXES)}) in {dirs[0]}")
    images, bad = [], []
    for p in files:
        try:
            with Image.open(p) as im:
                images.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
        except (OSError, UnidentifiedImageError, ValueError):
            bad.append(p.name)
    if not images:
        raise CalibrationError(f"none of the {len(files)} calibration images in {dirs[0]} can be read (e.g. {bad[0]})")
    source = ("edgesr shipped images (data/images + data/calibration)" if directory is None else str(dirs[0]))
    if bad:
        source += f" ({len(bad)} unreadable skipped)"
    return CalibrationSet(images, source)


def _bicubic_down(hr: np.ndarray, scale: int) -> np.ndarray:
    from PIL import Image

    h, w = hr.shape[0] // scale, hr.shape[1] // scale
    return np.asarray(Image.fromarray(hr).resize((w, h), Image.BICUBIC), dtype=np.uint8)


# HR zoom levels of the quality probe (each calibration image may also be shrunk, bicubic,
# before it serves as ground truth).  With 4 photographs the probe used (1, 0.75, 0.5); the 16
# default images at one zoom give larger, more varied probe images for less time.
PROBE_ZOOMS = (1.0,)


def quality_pairs(calib: CalibrationSet, scale: int, input_size: tuple[int, int] | None,
                  multiple_of: int = 1) -> list[tuple[np.ndarray, np.ndarray]]:
    """(LR NCHW float32 [0,1], HR uint8 HWC) pairs: HR from a calibration image (at each of
    ``PROBE_ZOOMS``), LR its bicubic downscale.  ``input_size`` None (dynamic graph): at most
    ``MAX_CALIBRATION_SIDE`` LR pixels a side; otherwise exactly the artifact's size (images
    smaller than size x scale are upscaled first by :func:`fit_image`, so zooms repeat)."""
    from PIL import Image

    from ..data import fit_image

    pairs = []
    zooms = PROBE_ZOOMS if input_size is None else (1.0,)
    for img in calib.images:
        for zoom in zooms:
            src = img
            if zoom != 1.0:
                size = (max(scale, round(img.shape[1] * zoom)), max(scale, round(img.shape[0] * zoom)))
                src = np.asarray(Image.fromarray(img).resize(size, Image.BICUBIC), dtype=np.uint8)
            if input_size is None:  # the largest legal size (the model's multiple) within the image
                m = max(1, multiple_of)
                h = max(m, min(src.shape[0] // scale, MAX_CALIBRATION_SIDE) // m * m)
                w = max(m, min(src.shape[1] // scale, MAX_CALIBRATION_SIDE) // m * m)
            else:
                h, w = input_size
            hr = fit_image(src.astype(np.float32) / 255.0, h * scale, w * scale)
            hr = (hr * 255.0).round().astype(np.uint8)
            lr = _bicubic_down(hr, scale)
            pairs.append((np.ascontiguousarray(lr.transpose(2, 0, 1)[None], dtype=np.float32) / 255.0, hr))
    return pairs


def calibration_inputs(calib: CalibrationSet, scale: int, input_size: tuple[int, int] | None,
                       multiple_of: int = 1) -> list[np.ndarray]:
    """NCHW float32 inputs of one size for the calibrator (histogram methods need one shape):
    each calibration image itself taken as a low-resolution input (tiles of the artifact size,
    or for a dynamic graph of the probe's LR size) plus the probe's own LR images."""
    from ..data import fit_image

    probe = [lr for lr, _ in quality_pairs(calib, scale, input_size, multiple_of)]
    h, w = input_size or (min(x.shape[2] for x in probe), min(x.shape[3] for x in probe))
    out = []
    for img in calib.images:
        f = img.astype(np.float32) / 255.0
        if f.shape[0] < h or f.shape[1] < w:
            f = fit_image(f, h, w)
        corners = [(top, left) for top in range(0, f.shape[0] - h + 1, h) for left in range(0, f.shape[1] - w + 1, w)]
        for i in np.linspace(0, len(corners) - 1, min(len(corners), MAX_TILES_PER_IMAGE)).round().astype(int):
            top, left = corners[i]
            out.append(np.ascontiguousarray(f[top : top + h, left : left + w].transpose(2, 0, 1)[None]))
    for x in probe:
        t, l = (x.shape[2] - h) // 2, (x.shape[3] - w) // 2
        out.append(np.ascontiguousarray(x[:, :, t : t + h, l : l + w]))
    return out


# --------------------------------------------------------------------------- metrics


def luma(rgb: np.ndarray, shave: int) -> np.ndarray:
    """BT.601 Y (Matlab rgb2ycbcr scale, float64) of a uint8 HWC image, ``shave`` border pixels cut:
    the papers' protocol of ``edgesr eval`` (quality.metrics)."""
    from ..quality.metrics import shave_border, y_channel

    return shave_border(y_channel(rgb), shave)


def y_psnr(sr: np.ndarray, hr: np.ndarray, shave: int) -> float:
    """Y-channel PSNR of uint8 HWC images (no SSIM: the searches call this on every trial)."""
    from ..quality.metrics import psnr

    return psnr(luma(sr, shave), luma(hr, shave))


def to_uint8(nchw: np.ndarray) -> np.ndarray:
    return (np.clip(nchw[0].transpose(1, 2, 0), 0.0, 1.0) * 255.0).round().astype(np.uint8)


# --------------------------------------------------------------------------- onnxruntime helpers


def _session(model, threads: int = 1):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString() if hasattr(model, "SerializeToString") else str(model),
                                opts, providers=["CPUExecutionProvider"])


def mean_y_psnr(model, pairs: Sequence[tuple[np.ndarray, np.ndarray]], scale: int) -> float:
    sess = _session(model, threads=os.cpu_count() or 1)
    vals = [y_psnr(to_uint8(sess.run(None, {"input": lr})[0]), hr, scale) for lr, hr in pairs]
    return float(np.mean(vals))


def extreme_inputs(h: int, w: int, seed: int = 0) -> dict[str, np.ndarray]:
    """All white, all black and uniform noise: the inputs that find overflow real photos miss."""
    return {
        "white": np.ones((1, 3, h, w), np.float32),
        "black": np.zeros((1, 3, h, w), np.float32),
        "noise": np.random.default_rng(seed).random((1, 3, h, w), dtype=np.float32),
    }


def activation_peaks(proto, inputs: Iterable[np.ndarray], chunk: int = 24) -> dict[str, float]:
    """max |value| of every float node output over ``inputs`` (fp32 graph), in chunks of
    ``chunk`` exposed tensors per session so that a 256x256 audit stays within memory."""
    import onnx

    types = {vi.name: vi.type.tensor_type.elem_type
             for vi in onnx.shape_inference.infer_shapes(proto).graph.value_info}
    names = [o for n in proto.graph.node for o in n.output
             if o and types.get(o, onnx.TensorProto.FLOAT) == onnx.TensorProto.FLOAT]
    peaks = {n: 0.0 for n in names}
    inputs = list(inputs)
    for start in range(0, len(names), chunk):
        part = names[start : start + chunk]
        m = onnx.ModelProto()
        m.CopyFrom(proto)
        del m.graph.output[:]
        m.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in part)
        for vi in m.graph.output:  # float outputs only; other types are dropped below
            vi.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
        try:
            sess = _session(m)
        except Exception:  # a non-float tensor in the chunk: fall back to one tensor at a time
            for n in part:
                peaks.update(_single_peak(proto, n, inputs))
            continue
        for x in inputs:
            for n, v in zip(part, sess.run(None, {"input": x})):
                peaks[n] = max(peaks[n], _peak(v))
    return peaks


def _single_peak(proto, name: str, inputs) -> dict[str, float]:
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(proto)
    del m.graph.output[:]
    m.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    try:
        sess = _session(m)
    except Exception:
        return {}  # not a float tensor (shapes, indices): irrelevant to fp16 range
    return {name: max(_peak(sess.run(None, {"input": x})[0]) for x in inputs)}


def _peak(v: np.ndarray) -> float:
    if v.size == 0 or not np.issubdtype(v.dtype, np.floating):
        return 0.0
    a = np.abs(v.astype(np.float64))
    return float("inf") if not np.isfinite(a).all() else float(a.max())


# --------------------------------------------------------------------------- fp16


@dataclass
class Fp16Report:
    kept_fp32: dict[str, str]  # node name -> why
    audit_inputs: list[str]
    audit_size: list[int]
    max_audit_peak: float
    finite: dict[str, bool]  # fp16 output finite, per audit input
    fp32_diverges_on: list[str]  # inputs whose fp32 output leaves fp16 range (not audited)
    seconds: float

    def as_dict(self) -> dict:
        return asdict(self)


def to_fp16_onnx(src: Path, dst: Path, audit_size: tuple[int, int], photos: Sequence[np.ndarray]) -> Fp16Report:
    """fp32 ONNX ``src`` -> fp16 ONNX ``dst`` with fp32 I/O and overflow-prone nodes kept fp32."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    t = time.perf_counter()
    proto = onnx.load(str(src))
    h, w = audit_size
    cases = {**extreme_inputs(h, w), **{f"photo[{i}]": p for i, p in enumerate(photos)}}
    limit = FP16_MAX / FP16_HEADROOM
    out_name = proto.graph.output[0].name
    peaks_per_case = {k: activation_peaks(proto, [x]) for k, x in cases.items()}
    # An input on which the fp32 model's *output* itself leaves fp16 range (trained SAFMN++
    # reaches 1e31 on uniform noise: its multiplicative modulation compounds per block) has
    # no fp16 answer; blocking the whole cascade would not give one either.  Such inputs are
    # reported, not audited.
    diverging = sorted(k for k, pk in peaks_per_case.items() if not pk.get(out_name, 0.0) <= limit)
    audited = {k: pk for k, pk in peaks_per_case.items() if k not in diverging}
    peaks: dict[str, float] = {}
    for pk in audited.values():
        for name, v in pk.items():
            peaks[name] = max(peaks.get(name, 0.0), v)
    producer = {o: n for n in proto.graph.node for o in n.output}
    kept = {producer[name].name: f"fp32 output peak {peak:.3g} > {limit:.0f} (fp16 max {FP16_MAX:.0f} / {FP16_HEADROOM:g})"
            for name, peak in peaks.items() if peak > limit}
    converted = convert_float_to_float16(proto, keep_io_types=True, node_block_list=sorted(kept) or None)
    converted = repair_graph(converted)
    sess = _session(converted)
    finite = {k: bool(np.isfinite(sess.run(None, {"input": x})[0]).all()) for k, x in cases.items()}
    bad = [k for k in audited if not finite[k]]
    if bad:
        raise ExportError(f"the fp16 graph produces NaN/inf on {', '.join(bad)} although the overflow audit "
                          "kept every out-of-range node in fp32; export it as fp32")
    onnx.save(converted, str(dst))
    return Fp16Report(kept, list(audited), [h, w], max(peaks.values(), default=0.0), finite, diverging,
                      round(time.perf_counter() - t, 2))


def repair_graph(proto):
    """Make a converter's output a valid graph: drop duplicate Cast nodes (the float16
    converter inserts one per consumer, with the same output name, when a blocked op reads
    a tensor twice), make node names unique and restore topological order (the input
    casts are appended at the end)."""
    import onnx

    by_output: dict[tuple[str, ...], object] = {}
    nodes = []
    for n in proto.graph.node:
        key = tuple(n.output)
        if n.op_type == "Cast" and key in by_output:
            first = by_output[key]
            if list(first.input) != list(n.input) or list(first.attribute) != list(n.attribute):
                raise ExportError(f"internal: two different casts write {key[0]}")
            continue
        by_output[key] = n
        nodes.append(n)
    seen: collections.Counter[str] = collections.Counter()
    for n in nodes:
        seen[n.name] += 1
        if seen[n.name] > 1:
            n.name = f"{n.name}__{seen[n.name]}"
    available = {"", *(i.name for i in proto.graph.input), *(i.name for i in proto.graph.initializer)}
    ordered, pending = [], nodes
    while pending:
        rest = []
        for n in pending:
            if all(i in available for i in n.input):
                ordered.append(n)
                available.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            raise ExportError(f"internal: converted graph has a cycle or dangling input at {rest[0].name}")
        pending = rest
    del proto.graph.node[:]
    proto.graph.node.extend(ordered)
    onnx.checker.check_model(proto)
    return proto


def to_fp16_tflite(src: Path, dst: Path) -> Fp16Report:
    """fp32 TFLite ``src`` -> fp16 weights (ai-edge-quantizer FLOAT_CASTING) with fp32 I/O.

    The convolution / fully-connected weights are stored as float16 behind DEQUANTIZE ops;
    XNNPACK folds those and, where the CPU has fp16 arithmetic (ARMv8.2+), runs the graph in
    fp16; elsewhere it computes in fp32 from the fp16-rounded weights.  No activation is
    narrowed in the file, so there is nothing to overflow: the audit is the finiteness
    check on the extreme inputs.  The file's edgesr metadata is carried over.
    """
    from ai_edge_quantizer import qtyping, quantizer

    from .metadata import read_tflite_metadata
    from .tflite import tflite_with_metadata

    t = time.perf_counter()
    q = quantizer.Quantizer(str(src))
    config = qtyping.OpQuantizationConfig(
        weight_tensor_config=qtyping.TensorQuantizationConfig(num_bits=16, dtype=qtyping.TensorDataType.FLOAT),
        compute_precision=qtyping.ComputePrecision.FLOAT, explicit_dequantize=True)
    ops = qtyping.TFLOperationName
    for op in (ops.CONV_2D, ops.DEPTHWISE_CONV_2D, ops.FULLY_CONNECTED, ops.CONV_2D_TRANSPOSE):
        q.update_quantization_recipe(regex=".*", operation_name=op, op_config=config,
                                     algorithm_key=quantizer.AlgorithmName.FLOAT_CASTING)
    data = bytes(q.quantize().quantized_model)
    data = tflite_with_metadata(data, read_tflite_metadata(Path(src).read_bytes()))
    dst.write_bytes(data)
    finite = _tflite_finite(dst)
    if not all(finite.values()):
        raise ExportError(f"the fp16 TFLite graph produces NaN/inf on {[k for k, v in finite.items() if not v]}")
    return Fp16Report({}, list(finite), [], 0.0, finite, [], round(time.perf_counter() - t, 2))


def _tflite_finite(path: Path) -> dict[str, bool]:
    from ..runtime.runners import LiteRTRunner

    runner = LiteRTRunner(path)  # NCHW in, NCHW out (the runner transposes)
    h, w = runner.fixed_size
    return {k: bool(np.isfinite(runner.run(x)).all()) for k, x in extreme_inputs(int(h), int(w)).items()}


# --------------------------------------------------------------------------- int8


@dataclass
class Int8Report:
    calibration: dict
    calibration_method: str  # the range scheme exported: minmax | percentile | entropy | per-tensor
    max_psnr_drop: float
    fp32_y_psnr: float  # on the quality pairs (calibration images, bicubic LR)
    all_int8_y_psnr: float
    final_y_psnr: float
    kept_float: dict[str, str] = field(default_factory=dict)  # node -> why
    quantized_nodes: int = 0
    candidates_tried: int = 0
    within_budget: bool = False
    seconds: float = 0.0
    scheme_drops: dict[str, float] = field(default_factory=dict)  # probe drop, every layer int8, per range scheme
    range_methods: dict[str, str] = field(default_factory=dict)  # activation tensor -> method of its range
    # ONNX: the drop the exported graph's output noise predicts on the probe
    # (:class:`NoiseProbe`; what the search targets), and that target
    predicted_drop: float | None = None
    target_drop: float | None = None

    @property
    def drop(self) -> float:
        return self.fp32_y_psnr - self.final_y_psnr

    def as_dict(self) -> dict:
        d = asdict(self)
        d["psnr_drop"] = round(self.drop, 4)
        return d


QUANTIZED_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")
# Activation range methods, as onnxruntime names them.  Percentile cuts (100 - p) / 2 % off each
# tail (onnxruntime's asymmetric percentile); entropy is onnxruntime's KL threshold search
# (TensorRT's), run on a histogram of RANGE_BINS bins (its default 128 bins equal the 128
# quantized bins, which makes the search return the min/max range).
RANGE_METHODS = ("minmax", "percentile", "entropy")
PERCENTILE = 99.999
RANGE_BINS = 256
# Values kept per tensor for the percentile/entropy/error statistics: a strided subsample of
# every calibration input (min and max are exact).
RANGE_SAMPLES = 1 << 20


@dataclass
class ActivationStats:
    lo: float
    hi: float
    sample: np.ndarray  # float32, a subsample of every calibration input


def calibration_tensors(proto, op_types: Sequence[str]) -> list[str]:
    """The activations onnxruntime's calibrator calibrates: float, non-constant inputs and
    outputs of the ``op_types`` nodes."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(proto)
    g = inferred.graph
    types = {vi.name: vi.type.tensor_type.elem_type for vi in (*g.value_info, *g.input, *g.output)}
    constants = {i.name for i in proto.graph.initializer}
    names: list[str] = []
    for n in proto.graph.node:
        if n.op_type in op_types:
            for t in (*n.input, *n.output):
                if t and t not in constants and t not in names and types.get(t) == onnx.TensorProto.FLOAT:
                    names.append(t)
    return names


def collect_activations(proto, inputs: Sequence[np.ndarray], tensors: Sequence[str],
                        samples: int = RANGE_SAMPLES, seed: int = 0) -> dict[str, ActivationStats]:
    """Exact min/max and a strided subsample of each tensor over ``inputs`` (any sizes: nothing
    is batched, so calibration inputs need not share a shape)."""
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(proto)
    graph_inputs = {i.name for i in proto.graph.input}
    exposed = [t for t in tensors if t not in graph_inputs]
    del m.graph.output[:]
    m.graph.output.extend(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None) for t in exposed)
    sess = _session(m, threads=os.cpu_count() or 1)
    rng = np.random.default_rng(seed)
    per_input = max(1, samples // max(1, len(inputs)))
    lo = {t: np.inf for t in tensors}
    hi = {t: -np.inf for t in tensors}
    parts: dict[str, list[np.ndarray]] = {t: [] for t in tensors}
    for x in inputs:
        values = dict(zip(exposed, sess.run(None, {"input": x})))
        values.update({t: x for t in tensors if t in graph_inputs})
        for t in tensors:
            v = values[t].ravel()
            lo[t], hi[t] = min(lo[t], float(v.min())), max(hi[t], float(v.max()))
            step = max(1, v.size // per_input)
            parts[t].append(v[int(rng.integers(step)) :: step][:per_input].astype(np.float32))
    return {t: ActivationStats(lo[t], hi[t], np.concatenate(parts[t])) for t in tensors}


def candidate_ranges(stats: dict[str, ActivationStats]) -> dict[str, dict[str, tuple[float, float]]]:
    """method -> tensor -> (rmin, rmax), each clamped to the tensor's observed [min, max]."""
    import contextlib
    import io

    from onnxruntime.quantization.calibrate import HistogramCollector

    out: dict[str, dict[str, tuple[float, float]]] = {"minmax": {t: (s.lo, s.hi) for t, s in stats.items()}}
    tail = (100.0 - PERCENTILE) / 200.0
    out["percentile"] = {}
    for t, s in stats.items():
        a, b = np.quantile(s.sample, [tail, 1.0 - tail])
        out["percentile"][t] = (max(s.lo, float(a)), min(s.hi, float(b)))
    collector = HistogramCollector(method="entropy", symmetric=False, num_bins=RANGE_BINS, num_quantized_bins=128,
                                   percentile=PERCENTILE, scenario="same")
    with contextlib.redirect_stdout(io.StringIO()):  # onnxruntime prints progress
        collector.collect({t: s.sample for t, s in stats.items()})
        found = collector.compute_collection_result()
    out["entropy"] = {t: (max(s.lo, float(found[t][0])), min(s.hi, float(found[t][1]))) for t, s in stats.items()}
    return out


def uint8_error(x: np.ndarray, rmin: float, rmax: float) -> float:
    """Mean squared error of ``x`` through onnxruntime's uint8 activation quantization with
    range [rmin, rmax] (zero always representable)."""
    rmin, rmax = min(rmin, 0.0), max(rmax, 0.0)
    if rmax == rmin:
        return float(np.mean(x.astype(np.float64) ** 2))
    step = (rmax - rmin) / 255.0
    zero = round(-rmin / step)
    q = np.clip(np.round(x / step) + zero, 0, 255)
    return float(np.mean(((q - zero) * step - x).astype(np.float64) ** 2))


def per_tensor_methods(stats: dict[str, ActivationStats], ranges: dict[str, dict[str, tuple[float, float]]]) -> dict[str, str]:
    """For each tensor the method whose range quantizes its calibration values with the least
    squared error (ties: the first of RANGE_METHODS, i.e. the widest)."""
    choice = {}
    for t, s in stats.items():
        errors = {m: uint8_error(s.sample, *ranges[m][t]) for m in RANGE_METHODS}
        choice[t] = min(RANGE_METHODS, key=lambda m: (errors[m], RANGE_METHODS.index(m)))
    return choice


class NoiseProbe:
    """The quality probe of the int8 search: each candidate graph is judged by the Y-PSNR drop
    its *output noise* predicts, not by its measured Y-PSNR difference.

    Per probe image i: ``err_i`` = Y MSE(fp32 output, ground truth), ``noise_i`` = Y MSE(int8
    output, fp32 output); an error independent of the fp32 error adds to it, so the image loses
    ``10 log10(1 + noise_i / err_i)`` dB.  The measured difference is that plus a correlation
    term which on the probe can be large and *negative* (PlainUSR-S: int8 noise that "repairs"
    fp32 overshoot gained 0.82 dB on one probe image) and does not carry over to other images:
    the search then keeps noisy layers int8 because they are lucky on the probe (PlainUSR-S:
    probe 0.010 dB, Set5 0.199).  The predicted drop is never negative, and grows with every
    layer made int8, which the search below assumes.  Outputs are the 8-bit images the
    benchmarks score.
    """

    def __init__(self, fp32_model, pairs: Sequence[tuple[np.ndarray, np.ndarray]], scale: int):
        self.pairs, self.shave = list(pairs), scale
        outs = self._run(fp32_model)
        self.ref = [luma(o, scale) for o in outs]
        self.err = [max(float(np.mean((r - luma(hr, scale)) ** 2)), 1e-12) for r, (_, hr) in zip(self.ref, self.pairs)]
        self.fp32_y_psnr = float(np.mean([y_psnr(o, hr, scale) for o, (_, hr) in zip(outs, self.pairs)]))

    def _run(self, model) -> list[np.ndarray]:
        sess = _session(model, threads=os.cpu_count() or 1)
        return [to_uint8(sess.run(None, {"input": lr})[0]) for lr, _ in self.pairs]

    def measure(self, model) -> tuple[float, float]:
        """(predicted drop in dB, mean Y-PSNR) of ``model`` on the probe."""
        outs = self._run(model)
        drops = [10.0 * np.log10(1.0 + float(np.mean((luma(o, self.shave) - r) ** 2)) / e)
                 for o, r, e in zip(outs, self.ref, self.err)]
        psnr = float(np.mean([y_psnr(o, hr, self.shave) for o, (_, hr) in zip(outs, self.pairs)]))
        # rounded: a decision must not hinge on the last bits of a float sum
        return round(float(np.mean(drops)), 6), psnr


# The predicted probe drop (NoiseProbe) the ONNX search aims at, as a fraction of the budget.
# Held-out images lose more than the probe predicts: they are easier (smaller fp32 error) and,
# with saturated colours and hard edges, see more int8 noise.  Set5 / predicted probe drop of
# the exported artifacts (benchmarks/int8_quality.py, all 10 shared checkpoints within the
# 0.15 dB gate, worst Set5 drop 0.066): 0.45 (SAFMN++) to 1.65 (PlainUSR-T); PlainUSR-S 0.9.
NOISE_MARGIN = 0.3


def to_int8_onnx(
    src: Path,
    dst: Path,
    calib: CalibrationSet,
    scale: int,
    input_size: tuple[int, int] | None,
    max_psnr_drop: float = DEFAULT_MAX_PSNR_DROP,
    multiple_of: int = 1,
    op_types: Sequence[str] = QUANTIZED_OPS,
    log: Callable[[str], None] = lambda s: None,
) -> Int8Report:
    """Static QDQ int8 of ``src``: activation ranges chosen per tensor where it pays, then the
    most int8 layers whose predicted probe drop (:class:`NoiseProbe`) meets
    ``NOISE_MARGIN x max_psnr_drop``.

    Deterministic: the same fp32 graph and calibration images give the same float set and the
    same file (no random sampling beyond a fixed seed, layers ordered by rounded scores with
    graph order breaking ties, onnxruntime's per-row kernels give bit-identical outputs at
    any thread count)."""
    import onnx

    t0 = time.perf_counter()
    pairs = quality_pairs(calib, scale, input_size, multiple_of)
    calib_x = calibration_inputs(calib, scale, input_size, multiple_of)
    fp32 = onnx.load(str(src))
    probe = NoiseProbe(fp32, pairs, scale)
    base = probe.fp32_y_psnr
    candidates = [n.name for n in fp32.graph.node if n.op_type in op_types]
    stats = collect_activations(fp32, calib_x, calibration_tensors(fp32, op_types))
    ranges = candidate_ranges(stats)
    chosen = per_tensor_methods(stats, ranges)
    schemes: dict[str, dict[str, str]] = {m: {t: m for t in stats} for m in RANGE_METHODS}
    if chosen not in schemes.values():
        schemes["per-tensor"] = chosen
    log(f"calibrated {len(stats)} activations on {len(calib_x)} inputs ({time.perf_counter() - t0:.0f} s)")
    target = max_psnr_drop * NOISE_MARGIN
    with tempfile.TemporaryDirectory(prefix="edgesr-int8-") as tmp:
        tmpdir = Path(tmp)
        trial = tmpdir / "trial.onnx"
        caches = {}
        for name, methods in schemes.items():  # one onnxruntime calibration cache per scheme
            caches[name] = tmpdir / f"ranges-{name}.json"
            _save_ranges({t: ranges[m][t] for t, m in sorted(methods.items())}, caches[name])

        def measure(int8: Sequence[str], scheme: str) -> tuple[float, float]:
            keep = set(int8)
            _quantize_from_cache(src, trial, caches[scheme], [c for c in candidates if c not in keep], op_types)
            return probe.measure(trial)

        # Every layer int8 under each range scheme; the scheme with the least predicted drop is exported.
        everything = {name: measure(candidates, name) for name in schemes}
        drops = {name: d for name, (d, _) in everything.items()}
        scheme = min(drops, key=drops.get)
        all_drop, all_psnr = everything[scheme]
        log(f"all int8: predicted drop {all_drop:.3f} dB ({scheme}); all schemes {drops}")
        int8 = list(candidates)
        kept: dict[str, str] = {}
        tried = 0
        if all_drop > target:
            # The noise each layer adds when it alone is int8; the int8 set is the k quietest
            # layers, k the largest whose predicted drop meets the target (binary search:
            # log2(n) trials; int8 noise only grows with k).
            alone = {}
            for c in candidates:
                alone[c] = measure([c], scheme)[0]
                tried += 1
            order = sorted(candidates, key=lambda c: (alone[c], candidates.index(c)))
            low, high = 0, len(order) - 1
            while low < high:
                mid = (low + high + 1) // 2
                d = measure(order[:mid], scheme)[0]
                tried += 1
                log(f"{mid} layer(s) int8: predicted drop {d:.3f} dB")
                low, high = (mid, high) if d <= target else (low, mid - 1)
            if low == 0:
                raise ExportError(f"int8 cannot meet --max-psnr-drop {max_psnr_drop:g} dB: quantizing all "
                                  f"{len(candidates)} {'/'.join(op_types)} layers loses {all_drop:.2f} dB (predicted) "
                                  f"and even the quietest layer alone {alone[order[0]]:.3f} dB exceeds the "
                                  f"{target:.3f} dB aimed at; export fp16, or allow a larger --max-psnr-drop")
            int8 = order[:low]
            kept = {c: f"int8 alone adds a predicted {alone[c]:.3f} dB (the {low} quietest layers int8 fit "
                       f"{target:.3f} dB)" for c in order[low:]}
        _quantize_from_cache(src, dst, caches[scheme], list(kept), op_types)
    final_drop, final = probe.measure(dst)
    summary = {**calib.summary(), "inputs": len(calib_x),
               "input_sizes": sorted({f"{x.shape[2]}x{x.shape[3]}" for x in calib_x}), "probe_pairs": len(pairs)}
    return Int8Report(summary, scheme, max_psnr_drop, round(base, 4), round(all_psnr, 4), round(final, 4),
                      kept, len(int8), tried, final_drop <= target,
                      round(time.perf_counter() - t0, 2), {k: round(v, 4) for k, v in drops.items()},
                      schemes[scheme], round(final_drop, 4), round(target, 4))


def _save_ranges(ranges: dict[str, tuple[float, float]], path: Path) -> None:
    """An onnxruntime calibration cache (MinMax) holding the given per-tensor ranges."""
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import TensorData, TensorsData, save_tensors_data

    data = {t: TensorData(lowest=np.float32(lo), highest=np.float32(hi)) for t, (lo, hi) in ranges.items()}
    save_tensors_data(TensorsData(CalibrationMethod.MinMax, data), path)


def _quantize_from_cache(src: Path, dst: Path, cache: Path, exclude, op_types) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    quantize_static(str(src), str(dst), None, quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax, op_types_to_quantize=list(op_types),
                    nodes_to_exclude=list(exclude), calibration_cache_path=str(cache))


def _quantize(src: Path, dst: Path, inputs: Sequence[np.ndarray], exclude, op_types, method, cache: Path) -> None:
    """onnxruntime's own calibration with one ``method`` for every tensor (the benchmark's naive int8)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter([{"input": x} for x in inputs])

        def get_next(self):
            return next(self._it, None)

    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=method,
                    op_types_to_quantize=list(op_types), nodes_to_exclude=list(exclude),
                    calibration_cache_path=str(cache))


def metadata_entries(precision: str, report) -> dict[str, str]:
    """What the artifact's metadata records about its precision."""
    out = {"precision": precision}
    if report is None:
        return out
    d = report.as_dict()
    if precision == "fp16":
        out["fp16_kept_fp32"] = json.dumps(d["kept_fp32"])
    if precision == "int8":
        out["int8_calibration"] = json.dumps(d["calibration"])
        out["int8_kept_float"] = json.dumps(d["kept_float"])
        out["int8_range_methods"] = json.dumps(d["range_methods"])
        out["int8_quality"] = json.dumps({k: d[k] for k in ("calibration_method", "scheme_drops", "fp32_y_psnr",
                                                           "all_int8_y_psnr", "final_y_psnr", "psnr_drop",
                                                           "max_psnr_drop", "within_budget")}
                                         | {k: d[k] for k in ("predicted_drop", "target_drop") if d.get(k) is not None})
    return out


# --------------------------------------------------------------------------- pipeline entry


def audit_size(size: tuple[int, int], dynamic: bool, multiple_of: int) -> tuple[int, int]:
    """The fp16 audit runs at the artifact's size; a dynamic graph at most 64 px a side (the
    audit exposes every intermediate tensor, and peaks of these local operators do not grow
    with the image)."""
    if not dynamic:
        return size
    m = max(1, multiple_of)
    return tuple(max(-(-min(s, 64) // m) * m, m) for s in size)  # type: ignore[return-value]


def reduce_precision(
    artifact: Path,
    precision: str,
    *,
    scale: int,
    size: tuple[int, int],
    dynamic: bool,
    multiple_of: int = 1,
    calibration: str | os.PathLike | None = None,
    max_psnr_drop: float | None = None,
    log: Callable[[str], None] = lambda s: None,
) -> dict:
    """Rewrite the fp32 ONNX ``artifact`` in place at ``precision``; returns the precision
    report (also written into the artifact's metadata)."""
    from ..data import image_names, sample_input
    from .metadata import write_metadata

    if precision == "fp32":
        write_metadata(artifact, metadata_entries("fp32", None))
        return {"precision": "fp32"}
    tmp = artifact.with_name(artifact.stem + f".{precision}{artifact.suffix}")
    try:
        if precision == "fp16" and artifact.suffix == ".tflite":
            report = to_fp16_tflite(artifact, tmp)
        elif precision == "fp16":
            h, w = audit_size(size, dynamic, multiple_of)
            photos = [sample_input(h, w, n) for n in image_names()]
            report = to_fp16_onnx(artifact, tmp, (h, w), photos)
        elif artifact.suffix == ".tflite":
            from .int8_tflite import to_int8_tflite

            report = to_int8_tflite(artifact, tmp, load_calibration(calibration), scale, size,
                                    max_psnr_drop or DEFAULT_MAX_PSNR_DROP, multiple_of, log=log)
        else:
            calib = load_calibration(calibration)
            report = to_int8_onnx(artifact, tmp, calib, scale, None if dynamic else size,
                                  max_psnr_drop or DEFAULT_MAX_PSNR_DROP, multiple_of, log=log)
        os.replace(tmp, artifact)
    finally:
        tmp.unlink(missing_ok=True)
    write_metadata(artifact, metadata_entries(precision, report))
    return {"precision": precision, **report.as_dict()}


def precision_markdown(report: dict) -> list[str]:
    """The export report's precision section: what stayed float and why, the quality probe."""
    p = report.get("precision", "fp32")
    if p == "fp32":
        return []
    lines = [f"## Precision: {p}", ""]
    if p == "fp16":
        kept = report.get("kept_fp32", {})
        lines.append(f"- overflow audit on {', '.join(report.get('audit_inputs', []))}: "
                     f"{len(kept)} node(s) kept fp32" + (":" if kept else ""))
        lines += [f"  - `{n}`: {why}" for n, why in kept.items()]
        if report.get("fp32_diverges_on"):
            lines.append(f"- the fp32 model itself leaves fp16 range on: {', '.join(report['fp32_diverges_on'])} "
                         "(not audited; no fp16 graph can answer there)")
    else:
        c = report.get("calibration", {})
        methods = collections.Counter(report.get("range_methods", {}).values())
        lines += [
            f"- calibration: {c.get('count')} image(s) from {c.get('source')} ({c.get('inputs')} inputs of "
            f"{', '.join(c.get('input_sizes', []))}; probe {c.get('probe_pairs')} LR/HR pairs)",
            f"- activation ranges: {report.get('calibration_method')} "
            f"({', '.join(f'{n} {m}' for m, n in sorted(methods.items()))}); probe drop "
            f"{'' if report.get('predicted_drop') is None else '(predicted from output noise) '}with every layer "
            f"int8 per scheme: {', '.join(f'{k} {v}' for k, v in report.get('scheme_drops', {}).items())} dB",
            f"- probe Y-PSNR: fp32 {report.get('fp32_y_psnr')} dB, all int8 {report.get('all_int8_y_psnr')} dB, "
            f"exported {report.get('final_y_psnr')} dB (drop {report.get('psnr_drop')} dB; "
            f"budget {report.get('max_psnr_drop')} dB, aimed at {PROBE_MARGIN:g} x on the probe)"
            if report.get("predicted_drop") is None else
            f"- probe: fp32 {report.get('fp32_y_psnr')} dB Y-PSNR, all int8 {report.get('all_int8_y_psnr')} dB, "
            f"exported {report.get('final_y_psnr')} dB; predicted drop from the exported graph's output noise "
            f"{report.get('predicted_drop')} dB (budget {report.get('max_psnr_drop')} dB, aimed at "
            f"{report.get('target_drop')} dB = {NOISE_MARGIN:g} x on the probe)",
            f"- {report.get('quantized_nodes')} layer(s) int8, {len(report.get('kept_float', {}))} kept float:",
        ]
        lines += [f"  - `{n}`: {why}" for n, why in report.get("kept_float", {}).items()]
    return lines + [""]
