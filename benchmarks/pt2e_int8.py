#!/usr/bin/env python
"""litert-torch's PT2E int8 flow vs ai-edge-quantizer (issue 16: "measure and pick").

    .venv/bin/python benchmarks/pt2e_int8.py [--weights ../shared/checkpoints/PlainUSRU_Rep_x4.pth]

One checkpoint, 64x64 TFLite.  The model goes through the pipeline's own export path
(obtain_model -> fold -> make_export_safe -> contiguous copy in the NHWC IOWrapper, as
edgesr.export.tflite does), then PT2E: torch.export -> prepare_pt2e with litert-torch's
PT2EQuantizer (symmetric int8, per-channel weights, HistogramObserver activations) ->
calibration on the same images the ai-edge-quantizer route uses
(precision.calibration_inputs of the default set; never Set5) -> convert_pt2e ->
litert_torch.convert(quant_config=PT2E static).  Reports conversion time, ops computing in
int8 (same census as int8_tflite), parity of the fp32 file vs torch, and Set5 Y-PSNR
(tiled, edgesr eval's engine) of fp32 and PT2E int8.  A failure prints its one-line error:
that is the result.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from edgesr.export.int8_tflite import precision_census  # noqa: E402
from edgesr.export.metadata import read_tflite_metadata  # noqa: E402
from edgesr.export.precision import calibration_inputs, load_calibration  # noqa: E402
from edgesr.export.tflite import pin_constant_temporaries, tflite_with_metadata  # noqa: E402
from edgesr.export.wrap import IOWrapper  # noqa: E402
from edgesr.pipeline import _fold_probe, export_model, obtain_model  # noqa: E402
from edgesr.quality.engine import artifact_form, evaluate  # noqa: E402
from edgesr.reparam import fold, make_contiguous_, make_export_safe  # noqa: E402

SHARED = ROOT.parent / "shared"


def one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"


def int8_io_form(path: Path):
    """The artifact's eval form; if the converter made its input/output int8 (PT2E static
    does: the QDQ pair at the graph edge folds into the I/O tensors), the float <-> int8
    conversion with the tensors' own scale/zero point happens around the interpreter."""
    from edgesr.runtime.runners import LiteRTRunner

    form = artifact_form(path)
    r = LiteRTRunner(path)
    qi, qo = r._in["quantization"], r._out["quantization"]
    if r._in["dtype"] == np.float32 and r._out["dtype"] == np.float32:
        return form

    def run(x: np.ndarray) -> np.ndarray:
        outs = []
        for i in range(x.shape[0]):
            xi = x[i:i + 1].transpose(0, 2, 3, 1)
            if r._in["dtype"] != np.float32:
                xi = np.clip(np.round(xi / qi[0]) + qi[1], -128, 127).astype(r._in["dtype"])
            r.interpreter.set_tensor(r._in["index"], np.ascontiguousarray(xi))
            r.interpreter.invoke()
            y = r.interpreter.get_tensor(r._out["index"])
            if r._out["dtype"] != np.float32:
                y = (y.astype(np.float32) - qo[1]) * qo[0]
            outs.append(y.transpose(0, 3, 1, 2))
        return np.ascontiguousarray(np.concatenate(outs), dtype=np.float32)

    print(f"PT2E artifact I/O: input {np.dtype(r._in['dtype']).name} {qi}, output {np.dtype(r._out['dtype']).name} {qo}"
          " (not the float32 contract; converted around the interpreter for scoring)")
    form.run = run
    return form


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", type=Path, default=SHARED / "checkpoints" / "PlainUSRU_Rep_x4.pth")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--dataset", type=Path, default=SHARED / "datasets" / "Set5")
    ap.add_argument("--per-tensor", action="store_true", help="per-tensor weights (default per-channel)")
    args = ap.parse_args(argv)

    import litert_torch
    from litert_torch.quantize import pt2e_quantizer
    from litert_torch.quantize.quant_config import QuantConfig
    from torchao.quantization.pt2e import quantize_pt2e

    h = w = args.size
    loaded = obtain_model(None, weights=args.weights)
    spec = loaded.spec
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        fp32 = export_model(loaded, "tflite", size=(h, w), output=work / "fp32.tflite")
        print(f"fp32 export: parity {'pass' if fp32.passed else 'FAIL'}")
        folded, _ = fold(loaded.model, probe=_fold_probe(spec))
        safe = make_contiguous_(copy.deepcopy(make_export_safe(folded, "tflite")).eval())
        wrapper = IOWrapper(safe, spec.input_range, "NHWC").eval()
        x = wrapper.example_input(h, w)
        calib = load_calibration(None)
        xs = [torch.from_numpy(np.ascontiguousarray(c.transpose(0, 2, 3, 1)))
              for c in calibration_inputs(calib, loaded.scale, (h, w))]
        t0 = time.perf_counter()
        stage = "torch.export"
        try:
            m = torch.export.export(wrapper, (x,)).module()
            stage = "prepare_pt2e"
            quantizer = pt2e_quantizer.PT2EQuantizer().set_global(
                pt2e_quantizer.get_symmetric_quantization_config(is_per_channel=not args.per_tensor))
            m = quantize_pt2e.prepare_pt2e(m, quantizer)
            stage = "calibrate"
            t_cal = time.perf_counter()
            with torch.no_grad():
                for c in xs:
                    m(c)
            t_cal = time.perf_counter() - t_cal
            stage = "convert_pt2e"
            m = quantize_pt2e.convert_pt2e(m, fold_quantize=False)
            stage = "litert_torch.convert"
            with pin_constant_temporaries(), torch.no_grad():
                data = litert_torch.convert(m, (x,), quant_config=QuantConfig(pt2e_quantizer=quantizer)).model_content()
        except Exception as e:  # the evidence is the result
            print(f"PT2E failed at {stage} after {time.perf_counter() - t0:.1f} s: {one_line(e)}")
            return 1
        seconds = time.perf_counter() - t0
        int8_ops, float_ops = precision_census(data)
        path = work / "pt2e_int8.tflite"
        meta = dict(read_tflite_metadata(fp32.artifact.read_bytes()), precision="int8")
        path.write_bytes(tflite_with_metadata(data, meta))
        print(f"PT2E int8: {seconds:.1f} s (calibration {len(xs)} inputs {t_cal:.1f} s), "
              f"{int8_ops} int8 / {sum(float_ops.values())} float ops {float_ops}")
        p32 = evaluate(artifact_form(fp32.artifact), args.dataset).mean["psnr_y"]
        try:
            p8 = evaluate(int8_io_form(path), args.dataset).mean["psnr_y"]
        except Exception as e:
            print(f"PT2E int8 artifact does not run: {one_line(e)}")
            return 1
        print(f"Set5 Y-PSNR (tiled {h}x{w}): fp32 {p32:.3f}, PT2E int8 {p8:.3f}, drop {p32 - p8:+.3f} dB")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.exit(main())
