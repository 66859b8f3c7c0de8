"""Calibrated int8 TFLite: ai-edge-quantizer static int8 of the verified fp32 TFLite export.

The recipe is ai-edge-quantizer's ``static_wi8_ai8`` (int8 per-channel symmetric weights,
int8 per-tensor asymmetric activations, integer compute: XNNPACK's qs8 kernels) over every
op the quantizer supports, except the graph's own input and output, which stay float32 (the
artifact contract: a QUANTIZE op after ``input`` and a DEQUANTIZE before ``output`` sit inside
the graph).  Activation ranges come from one pass of the quantizer's profiler-based
calibrator over real photographs (``precision.calibration_inputs``), per tensor and per
input, combined by the rule of ``RANGE_SCHEMES`` that loses least on the probe with
everything int8.

Ops the quantizer has no int8 implementation for (PlainUSR's LEAKY_RELU, for one) run in
float between a DEQUANTIZE and a QUANTIZE; the report names them.

Accuracy-driven mixed precision: the drop is Y-PSNR vs ground truth on the calibration
images (``precision.quality_pairs``), measured on ai-edge-litert with XNNPACK, i.e. on the
kernels the artifact will run on.  If the all-int8 drop exceeds ``PROBE_MARGIN x
max_psnr_drop``, the int8 set is grown from the float graph, cheapest op first, on half of
the probe pairs, then checked on the other half (``_grow_int8_set``, ``_check_held_out``);
every op left float is reported with the reason.

Why ai-edge-quantizer and not litert-torch's PT2E flow: it works on the TFLite file the
pipeline already exported and verified (no second torch export per trial), its recipe can
exclude one op by name, which the sensitivity search needs, and a trial (quantize without
recalibrating) takes a fraction of a second.  Measured (``benchmarks/pt2e_int8.py``,
PlainUSR-U x4, 64x64): PT2E converts and makes all 33 ops int8 (LeakyReLU too), but its
input/output become int8 (the edge QDQ pairs fold into the I/O tensors) and Set5 drops
0.78 dB with no per-op fallback short of a new torch export per trial; 9 s on the idle
2-core machine (3 s of it calibrating the same 144 inputs), 242 s under load ~7.

SPAN-28 (2-4 of 79 ops int8): the cost sits in ``conv_cat``'s input, the concatenation of
``conv_1``'s output (per-channel |x| up to ~18: SPAN's x255 folded into conv_1) with three
branches of |x| <~ 1, one int8 scale for all: quantized alone, the CONCATENATION costs
0.28-0.57 dB and conv_cat 0.36-1.07 on the probe (target 0.045).  Sigmoid attention ops cost
<= 0.03 dB each.  Percentile (99.99) or per-tensor MSE-chosen clipping lowers the all-int8
probe drop (1.21 -> 0.93 dB) but not the concatenation's cost (0.42); a search with it kept
4 ops int8 (Set5 drop 0.048 dB vs 0.026 with 2).  Per-channel activation scales are not in
the int8 kernels; splitting that conv into one conv per concatenated branch (a sum) would
be the fix.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..errors import ExportError
from .precision import (DEFAULT_MAX_PSNR_DROP, PROBE_MARGIN, CalibrationSet, Int8Report, calibration_inputs,
                        quality_pairs, to_uint8, y_psnr)

RECIPE = "static_wi8_ai8"
# Activation range rules of the calibrator, over the calibration samples: "minmax" the
# extremes of all samples, "moving-average" ai-edge-quantizer's default (0.95 x the running
# range + 0.05 x each new sample's, so the first samples dominate).  The one with the smaller
# all-int8 probe drop is used.  "percentile<P>" (e.g. "percentile99.99", the [100-P, P]
# percentiles of each tensor's values, :func:`percentile_ranges`) is supported but not a
# default: on SPAN-28 it lowered the all-int8 drop, not the cost of the ops that stay float.
RANGE_SCHEMES = ("minmax", "moving-average")
SIGNATURE = "serving_default"
# The conversions themselves; every other op is a sensitivity candidate, layout ops too:
# an int8 SLICE/CONCATENATION requantizes to one scale per tensor (PlainUSR concatenates the
# image channels with the features: 0.11 dB of PlainUSR-U's probe drop is there).
CONVERSION_OPS = frozenset({"QUANTIZE", "DEQUANTIZE"})


@dataclass
class Int8TfliteReport(Int8Report):
    runtime: str = "ai-edge-litert (XNNPACK)"
    recipe: str = ""
    int8_ops: int = 0  # ops of the artifact computing on int8 tensors (excl. QUANTIZE/DEQUANTIZE)
    float_ops: dict[str, int] = field(default_factory=dict)  # op type -> count still float
    float_op_indices: list[int] = field(default_factory=list)  # ops kept float by the search (graph order)


@dataclass(frozen=True)
class GraphOp:
    index: int
    op_type: str
    scope: str  # ai-edge-quantizer's name of the op: its output tensor names joined by ';'

    @property
    def label(self) -> str:
        """A readable name: the op type and the module path without package prefixes."""
        first = self.scope.split(";")[0]
        parts = [p.rsplit(".", 1)[-1] for p in first.split("/")]
        if parts and parts[0] == "IOWrapper":
            parts = parts[1:]
        return f"{self.op_type} {'/'.join(parts)}"


def graph_ops(model: bytes) -> list[GraphOp]:
    """The main subgraph's operators in execution order, with their quantizer scopes."""
    from ai_edge_litert.tools import flatbuffer_utils as fu
    from ai_edge_quantizer.utils import tfl_flatbuffer_utils as qfu

    m = fu.read_model_from_bytearray(model)
    sg = m.subgraphs[0]
    return [GraphOp(i, fu.opcode_to_name(m, op.opcodeIndex) or "?", qfu.get_op_scope(op, sg.tensors))
            for i, op in enumerate(sg.operators)]


def op_dtypes(model: bytes) -> list[tuple[str, str]]:
    """(op type, dtype of its first non-constant input) per op of the main subgraph."""
    from ai_edge_litert.tools import flatbuffer_utils as fu

    m = fu.read_model_from_bytearray(model)
    sg = m.subgraphs[0]
    out = []
    for op in sg.operators:
        dtype = "?"
        for i in op.inputs:
            if i < 0:
                continue
            buf = m.buffers[sg.tensors[i].buffer]
            if buf.data is None or len(buf.data) == 0:
                dtype = fu.type_to_name(sg.tensors[i].type).lower()
                break
        out.append((fu.opcode_to_name(m, op.opcodeIndex) or "?", dtype))
    return out


def precision_census(model: bytes) -> tuple[int, dict[str, int]]:
    """(number of ops computing on int8, {op type: count} of the ops computing on float32),
    QUANTIZE/DEQUANTIZE (the conversions themselves) left out of both."""
    int8, floats = 0, {}
    for op, dtype in op_dtypes(model):
        if op in ("QUANTIZE", "DEQUANTIZE"):
            continue
        if dtype == "int8":
            int8 += 1
        elif dtype == "float32":
            floats[op] = floats.get(op, 0) + 1
    return int8, floats


class TfliteInt8Quantizer:
    """Calibrations of the fp32 model (one per range scheme), then any number of
    quantizations of it that keep a chosen set of ops float."""

    def __init__(self, src: Path, calib_x: Sequence[np.ndarray], schemes: Sequence[str] = RANGE_SCHEMES):
        from ai_edge_quantizer import quantizer, recipe

        self.src = Path(src)
        self.float_model = self.src.read_bytes()
        self._quantizer_mod, self._recipe_mod = quantizer, recipe
        self.calibration_inputs = list(calib_x)
        per_sample = sample_ranges(self.float_model, self.calibration_inputs)
        self.ranges: dict[str, dict] = {}
        for k in schemes:
            if k.startswith("percentile"):
                self.ranges[k] = percentile_ranges(self.float_model, self.calibration_inputs,
                                                   float(k[len("percentile"):]), combine_ranges(per_sample, "minmax"))
            else:
                self.ranges[k] = combine_ranges(per_sample, k)
        self.scheme = schemes[0]
        self._quantizer = None

    def _fresh(self, keep_float: Sequence[GraphOp]):
        from ai_edge_quantizer import qtyping
        from ai_edge_quantizer.algorithm_manager import AlgorithmName

        # One Quantizer per float model: parsing the flatbuffer into its object API took 0.5 s
        # of each ~1.5 s trial on SAFMN (209 ops); quantize() copies the model, the recipe is
        # reloaded per trial.
        if self._quantizer is None:
            self._quantizer = self._quantizer_mod.Quantizer(self.float_model)
        q = self._quantizer
        q.load_quantization_recipe(getattr(self._recipe_mod, RECIPE)())
        # float32 input/output: the artifact contract (quantize/dequantize inside the graph)
        for io in (qtyping.TFLOperationName.INPUT, qtyping.TFLOperationName.OUTPUT):
            q.update_quantization_recipe(regex=".*", operation_name=io, algorithm_key=AlgorithmName.NO_QUANTIZE)
        if keep_float:  # a later entry wins over the ".*" default
            # One alternation, not one entry per op: with ~200 entries every op was matched
            # against every pattern, overflowing re's compile cache (66k compiles per 3 trials).
            q.update_quantization_recipe(regex="^(?:" + "|".join(re.escape(op.scope) for op in keep_float) + ")$",
                                         operation_name=qtyping.TFLOperationName.ALL_SUPPORTED,
                                         algorithm_key=AlgorithmName.NO_QUANTIZE)
        return q

    def quantize(self, keep_float: Sequence[GraphOp], scheme: str | None = None) -> bytes:
        q = self._fresh(keep_float)
        ranges = self.ranges[scheme or self.scheme]
        return bytes(q.quantize(ranges, enable_progress_bar=False, enable_progress_report=False).quantized_model)


def sample_ranges(model: bytes, calib_x: Sequence[np.ndarray]) -> list[dict[str, dict]]:
    """Per calibration input, {tensor name: {"min", "max"}} of every activation tensor.

    One pass of ai-edge-quantizer's profiler-based calibrator (min/max tracked in C++ while
    the float model runs), one input at a time so every range scheme is derived from the
    same pass.  Same ranges as its default preserve-all-tensors calibrator, which walks every
    op of every sample in Python, once per range scheme: for 144 inputs on the idle 2-core
    machine PlainUSR-U 0.4 s instead of 4.1 s per scheme, SPAN-28 1.8 s instead of 11.5 s
    (under load ~7: ~3 s instead of ~80 s)."""
    from ai_edge_quantizer import calibrator, recipe, recipe_manager

    rules = recipe_manager.RecipeManager()  # unused by the profiler-based mode, required by the API
    rules.load_quantization_recipe(getattr(recipe, RECIPE)())
    cal = calibrator.Calibrator(model, num_threads=os.cpu_count() or 1,
                                mode=calibrator.CalibrationMode.CALIBRATION_PROFILER_BASED)
    out = []
    for x in calib_x:
        cal.reset_model_qsvs()
        cal.calibrate({SIGNATURE: [{"input": np.ascontiguousarray(x.transpose(0, 2, 3, 1))}]}, rules)  # NHWC
        qsvs = cal.get_model_qsvs()
        out.append({k: {"min": np.asarray(v["min"]), "max": np.asarray(v["max"])} for k, v in qsvs.items()})
    return out


def combine_ranges(per_sample: Sequence[dict[str, dict]], scheme: str) -> dict[str, dict]:
    """One range per tensor from the per-sample ranges, by ``scheme`` (see ``RANGE_SCHEMES``)."""
    from ai_edge_quantizer.utils import qsv_utils

    update = {"minmax": qsv_utils.min_max_update, "moving-average": qsv_utils.moving_average_update}[scheme]
    ranges: dict[str, dict] = {}
    for sample in per_sample:
        for name, qsv in sample.items():
            ranges[name] = update(ranges[name], qsv) if name in ranges else qsv
    return ranges


def percentile_ranges(model: bytes, calib_x: Sequence[np.ndarray], pct: float, fallback: dict[str, dict],
                      values_per_tensor: int = 20000) -> dict[str, dict]:
    """Per activation tensor, the [100 - pct, pct] percentiles of its values over the
    calibration inputs (every input subsampled to about ``values_per_tensor`` values), widened
    to include 0; tensors the float interpreter does not expose keep ``fallback``."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_content=model, experimental_preserve_all_tensors=True)
    it.allocate_tensors()
    index = {d["name"]: d["index"] for d in it.get_tensor_details()}
    names = [k for k in fallback if k in index]
    values: dict[str, list[np.ndarray]] = {k: [] for k in names}
    inp = it.get_input_details()[0]["index"]
    for x in calib_x:
        it.set_tensor(inp, np.ascontiguousarray(x.transpose(0, 2, 3, 1)))
        it.invoke()
        for k in names:
            a = it.get_tensor(index[k]).ravel()
            values[k].append(a[:: max(1, a.size // values_per_tensor)].copy())
    out = dict(fallback)
    for k in names:
        lo, hi = np.percentile(np.concatenate(values[k]), [100.0 - pct, pct])
        out[k] = {"min": np.array([min(float(lo), 0.0)], np.float32),
                  "max": np.array([max(float(hi), 0.0)], np.float32)}
    return out


def probe_y_psnr(model: bytes, pairs, scale: int, workdir: Path) -> float:
    """Mean Y-PSNR of ``model`` on the quality pairs, run on ai-edge-litert + XNNPACK."""
    from ..runtime.runners import LiteRTRunner

    path = workdir / "probe.tflite"
    path.write_bytes(model)
    runner = LiteRTRunner(path, threads=os.cpu_count() or 1)
    return float(np.mean([y_psnr(to_uint8(runner.run(lr)), hr, scale) for lr, hr in pairs]))


def _float_io(model: bytes) -> bool:
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_content=model)
    return all(d["dtype"] == np.float32 for d in it.get_input_details() + it.get_output_details())


def to_int8_tflite(
    src: Path,
    dst: Path,
    calib: CalibrationSet,
    scale: int,
    input_size: tuple[int, int],
    max_psnr_drop: float = DEFAULT_MAX_PSNR_DROP,
    multiple_of: int = 1,
    log: Callable[[str], None] = lambda s: None,
) -> Int8TfliteReport:
    """fp32 TFLite ``src`` -> int8 TFLite ``dst`` with the fewest float-kept ops that meet
    ``max_psnr_drop`` on the probe (aimed at ``PROBE_MARGIN`` x the budget, as for ONNX)."""
    from .metadata import read_tflite_metadata
    from .tflite import tflite_with_metadata

    t0 = time.perf_counter()
    pairs = quality_pairs(calib, scale, input_size, multiple_of)
    q = TfliteInt8Quantizer(src, calibration_inputs(calib, scale, input_size, multiple_of))
    ops = graph_ops(q.float_model)
    candidates = [op for op in ops if op.op_type not in CONVERSION_OPS]
    with tempfile.TemporaryDirectory(prefix="edgesr-int8-tflite-") as tmp:
        work = Path(tmp)
        base = probe_y_psnr(q.float_model, pairs, scale, work)

        # The search picks ops that look cheap on its pairs, so its own measure of the
        # result is optimistic (measured: SPAN-28 probe 0.04 dB, Set5 0.23): the result is
        # checked on the other half of the pairs, which the search never saw.
        search, check = (pairs[0::2], pairs[1::2]) if len(pairs) >= 2 else (pairs, pairs)

        def drop_on(subset) -> Callable[[Sequence[GraphOp]], float]:
            """The probe drop on ``subset`` of the graph that keeps the given ops float."""
            fp32 = probe_y_psnr(q.float_model, subset, scale, work)
            return lambda keep: fp32 - probe_y_psnr(q.quantize(keep), subset, scale, work)

        scheme_drops = {k: base - probe_y_psnr(q.quantize([], k), pairs, scale, work) for k in q.ranges}
        q.scheme = min(scheme_drops, key=scheme_drops.get)
        all_int8 = q.quantize([])
        all_drop = scheme_drops[q.scheme]
        unsupported = precision_census(all_int8)[1]  # float even when everything may be int8
        candidates = [op for op in candidates if op.op_type not in unsupported]
        log(f"all int8: probe drop {all_drop:.3f} dB ({q.scheme}; {scheme_drops})")
        target = max_psnr_drop * PROBE_MARGIN
        kept, why, tried = [], {}, 0
        if all_drop > target:
            kept, why, tried, order = _grow_int8_set(candidates, drop_on(search), target, log)
            kept, tried = _check_held_out(candidates, kept, order, drop_on(check), target, why, tried, log)
        if candidates and len(kept) == len(candidates):
            raise ExportError(f"int8 cannot meet --max-psnr-drop {max_psnr_drop:g} dB: quantizing all {len(candidates)} "
                              f"ops loses {all_drop:.2f} dB and no op can be int8 within the budget; export fp16, or "
                              "allow a larger --max-psnr-drop")
        data = q.quantize(kept)
        final = probe_y_psnr(data, pairs, scale, work)
    if not _float_io(data):
        raise ExportError("internal: the int8 TFLite graph lost its float32 input/output")
    int8_ops, float_ops = precision_census(data)
    for op_type, n in unsupported.items():
        why[f"{op_type} x{n}"] = (f"no int8 {op_type} in ai-edge-quantizer {_version('ai-edge-quantizer')}: "
                                  "runs float between DEQUANTIZE/QUANTIZE")
    data = tflite_with_metadata(data, read_tflite_metadata(q.float_model))
    dst.write_bytes(data)
    calib_x = q.calibration_inputs
    summary = {**calib.summary(), "inputs": len(calib_x),
               "input_sizes": sorted({f"{x.shape[2]}x{x.shape[3]}" for x in calib_x}), "probe_pairs": len(pairs)}
    return Int8TfliteReport(
        calibration=summary, calibration_method=q.scheme, max_psnr_drop=max_psnr_drop, fp32_y_psnr=round(base, 4),
        all_int8_y_psnr=round(base - all_drop, 4), final_y_psnr=round(final, 4), kept_float=why,
        quantized_nodes=int8_ops, candidates_tried=tried, within_budget=base - final <= target,
        seconds=round(time.perf_counter() - t0, 2), scheme_drops={k: round(v, 4) for k, v in scheme_drops.items()},
        range_methods={"every activation tensor": q.scheme},
        recipe=f"ai-edge-quantizer {_version('ai-edge-quantizer')} {RECIPE}, float32 input/output",
        int8_ops=int8_ops, float_ops=float_ops, float_op_indices=sorted(op.index for op in kept))


def _grow_int8_set(candidates: Sequence[GraphOp], drop_with: Callable[[Sequence[GraphOp]], float], target: float,
                   log: Callable[[str], None]) -> tuple[list[GraphOp], dict[str, str], int, list[GraphOp]]:
    """Which ops stay float: starting from the float graph, each op is quantized *alone*
    (its cost), then ops join the int8 set cheapest first while the probe stays within
    ``target``.  Returns (ops kept float, why per op, trials, int8 ops in the order they joined).

    Ops join in blocks: a block that keeps the probe within ``target`` joins whole and the
    next block is twice as long; a block that does not is halved until one op is left, which
    is then kept float.  Most ops of a graph are cheap (PlainUSR-S: 198 of 234 int8), so
    after the n cost trials the growth takes about log2(n) trials plus a few per float-kept
    op, where joining one op at a time took another n (PlainUSR-S: 695 s for the whole search
    on the loaded 2-core machine).

    Why not "fall back one op at a time from all-int8": the quantization noise sits in the
    tensors between ops, and a tensor is float only when its producer and consumers all are;
    measured on PlainUSR-U x4 (probe 0.91 dB all-int8), single-op fallbacks each recovered a
    little and the greedy path needed all 33 ops float.  Growing the int8 set keeps the
    budget by construction."""
    every = list(candidates)
    cost = {op: drop_with([o for o in every if o is not op]) for op in every}
    tried = len(every)
    int8: list[GraphOp] = []
    why: dict[str, str] = {}
    pending = []
    for op in sorted(every, key=lambda o: cost[o]):
        if cost[op] > target:
            why[f"#{op.index} {op.label}"] = f"int8 alone costs {cost[op]:.3f} dB > target {target:.3f}"
        else:
            pending.append(op)
    i, step = 0, 1
    while i < len(pending):
        block = pending[i:i + step]
        trial = drop_with([o for o in every if o not in int8 and o not in block])
        tried += 1
        if trial <= target:
            int8 += block
            i += len(block)
            step *= 2
            log(f"int8 +{len(block)} (to #{block[-1].index} {block[-1].label}): probe drop {trial:.3f} dB")
        elif len(block) > 1:
            step = len(block) // 2
        else:
            op = block[0]
            why[f"#{op.index} {op.label}"] = (f"int8 alone costs {cost[op]:.3f} dB; with the {len(int8)} int8 ops "
                                              f"before it {trial:.3f} dB > target {target:.3f}")
            i += 1
    kept = [o for o in every if o not in int8]
    return kept, why, tried, int8


def _check_held_out(candidates: Sequence[GraphOp], kept: list[GraphOp], order: list[GraphOp],
                    drop_held_out: Callable[[Sequence[GraphOp]], float], target: float, why: dict[str, str],
                    tried: int, log: Callable[[str], None]) -> tuple[list[GraphOp], int]:
    """If the search's result loses more than ``target`` on the held-out pairs, the int8 set
    shrinks to the longest prefix of ``order`` (cheapest first) that does not: a binary
    search, log2(n) trials.  Ops put back to float say so in ``why``."""
    d = drop_held_out(kept)
    tried += 1
    if d <= target:
        return kept, tried

    def keep_for(k: int) -> list[GraphOp]:
        return [o for o in candidates if o not in order[:k]]

    low, high = 0, len(order) - 1  # the largest k whose held-out drop is within target
    while low < high:
        mid = (low + high + 1) // 2
        dm = drop_held_out(keep_for(mid))
        tried += 1
        low, high = (mid, high) if dm <= target else (low, mid - 1)
    log(f"held-out pairs: {d:.3f} dB with {len(order)} int8 ops > {target:.3f}; {low} kept int8")
    for op in order[low:]:
        why[f"#{op.index} {op.label}"] = (f"within target on the search pairs, but the held-out pairs lose {d:.3f} dB "
                                          f"with all {len(order)} chosen ops int8; the cheapest {low} stay int8")
    return keep_for(low), tried


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "?"
