"""One benchmark cell in its own process: ``python -m edgesr.bench.worker '<job json>'``.

A fresh process per cell gives honest memory figures (see ``device_bench`` for what
they mean) and a clean thread setting.  Runners come from ``edgesr.runtime.runners``;
the only thing this file knows about a runtime is its name.

Job fields: ``kind`` (artifact|torch|peak), ``runtime``, ``threads``, ``input_shape``,
``runs``, ``warmup``; artifacts: ``path``; torch forms: ``model`` {name, variant,
scale, weights, seed} (form from the runtime name); peaks: ``gemm`` {k,h,w,layers,channels}
and ``path`` (probe model; none for torch).
"""

from __future__ import annotations

import json
import sys

import numpy as np

from .device_bench import measure
from .peak import Gemm

TORCH_FORMS = {"torch-train": "train", "torch-folded": "folded", "torch-deploy": "deploy"}
ARTIFACT_RUNTIMES = ("onnxruntime", "litert")


def artifact_runner(runtime: str, path: str, threads: int):
    from ..runtime import runners

    classes = {"onnxruntime": runners.OnnxRunner, "litert": runners.LiteRTRunner}
    return classes[runtime](path, threads=threads)


def torch_runner(module, input_range: float, threads: int):
    import torch

    from ..runtime.runners import TorchRunner

    torch.set_num_threads(threads)
    return TorchRunner(module, input_range=input_range, threads=threads)


def torch_model(spec: dict, form: str):
    """The train, folded or deploy form of a model (seeded random init unless weights are given)."""
    from ..pipeline import obtain_model
    from ..reparam import deploy, fold

    loaded = obtain_model(spec["name"], spec.get("variant"), spec.get("scale"), spec.get("weights"),
                          seed=spec.get("seed", 0))
    model = loaded.model.eval()
    if form == "folded":
        model = fold(model)[0]
    elif form == "deploy":
        model = deploy(model, spec.get("target", "onnx"))
    return model.eval(), loaded.spec.input_range


def make_runner(job: dict):
    kind, threads = job["kind"], int(job["threads"])
    if kind == "artifact":
        return artifact_runner(job["runtime"], job["path"], threads)
    if kind == "torch":
        model, rng = torch_model(job["model"], TORCH_FORMS[job["runtime"]])
        return torch_runner(model, rng, threads)
    if kind == "peak":
        if job["runtime"] == "torch":
            from .peak import torch_gemm_module

            g = job["gemm"]
            gemm = Gemm(g["k"], g["h"], g["w"], g["layers"], g.get("channels", 3))
            return torch_runner(torch_gemm_module(gemm), 1.0, threads)
        return artifact_runner(job["runtime"], job["path"], threads)
    raise ValueError(f"unknown job kind {kind!r}")


def run_job(job: dict) -> dict:
    if job["kind"] in ("torch",) or job.get("runtime") == "torch":
        import torch

        torch.set_num_threads(int(job["threads"]))  # before anything allocates a thread pool
    x = np.random.default_rng(0).random(job["input_shape"], dtype=np.float32)
    return measure(lambda: make_runner(job), x, int(job["runs"]), int(job["warmup"]))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    job = json.loads(argv[0])
    result = run_job(job)
    sys.stdout.write("\n" + json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
