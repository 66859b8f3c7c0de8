"""One benchmark cell in its own process: ``python <path>/edgesr/bench/worker.py '<job json>'``.

A fresh process per cell gives honest memory figures (see ``device_bench`` for what
they mean) and a clean thread setting.  Runners come from ``edgesr.runtime.runners``;
the only thing this file knows about a runtime is its name.

Job fields: ``kind`` (artifact|torch|peak), ``runtime``, ``threads``, ``input_shape``,
``runs``, ``warmup``; artifacts: ``path``; torch forms: ``model`` {name, variant,
scale, weights, seed} (form from the runtime name); peaks: ``gemm`` {k,h,w,layers,channels}
and ``path`` (probe model; none for torch).

Run by path (not ``-m``) so that onnxruntime / LiteRT cells can import
``edgesr.runtime.runners`` *without* ``edgesr/__init__`` (which imports torch): their
process then holds what a device's would -- numpy, the runtime and the artifact -- and the
memory figures are not inflated by an idle PyTorch.  If that light import ever fails the
worker falls back to the ordinary import.
"""

from __future__ import annotations

if __name__ == "__main__" and not __package__:
    import json as _json
    import os as _os
    import sys as _sys
    import types as _types

    _here = _os.path.dirname(_os.path.abspath(__file__))
    _root = _os.path.dirname(_os.path.dirname(_here))
    if _sys.path and _os.path.abspath(_sys.path[0] or ".") == _here:
        _sys.path[0] = _root  # never import sibling files as top-level modules
    else:
        _sys.path.insert(0, _root)
    _job = _json.loads(_sys.argv[1])
    _light = _job.get("kind") == "artifact" or (_job.get("kind") == "peak" and _job.get("runtime") != "torch")
    if _light:
        # Bare package objects: sub-modules import normally, package __init__s do not run.
        for _name in ("edgesr", "edgesr.export", "edgesr.runtime"):
            _mod = _types.ModuleType(_name)
            _mod.__path__ = [_os.path.join(_root, *_name.split("."))]
            _sys.modules[_name] = _mod
        try:
            from edgesr.bench import worker as _worker  # noqa: F401
            from edgesr.runtime import runners as _runners  # noqa: F401
        except ImportError:
            for _name in [n for n in _sys.modules if n == "edgesr" or n.startswith("edgesr.")]:
                del _sys.modules[_name]
    from edgesr.bench.worker import main as _main

    _sys.exit(_main(_sys.argv[1:]))

import json
import sys

import numpy as np

from .device_bench import measure
from .peak import Gemm

TORCH_FORMS = {"torch-train": "train", "torch-trainmode": "trainmode", "torch-folded": "folded",
               "torch-deploy": "deploy"}
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
                          seed=spec.get("seed", 0), state_key=spec.get("state_key"))
    model = loaded.model.eval()
    if form == "trainmode":
        return _TrainMode(model), loaded.spec.input_range
    if form == "folded":
        model = fold(model)[0]
    elif form == "deploy":
        model = deploy(model, spec.get("target", "onnx"))
    return model.eval(), loaded.spec.input_range


def _TrainMode(model):
    """The train form with ``training=True`` (multi-branch forward; runners still use no_grad).

    ``TorchRunner`` calls ``.eval()``; this wrapper keeps the wrapped model in training
    mode regardless, so the timed graph is the one used during training.
    """
    from torch import nn

    class TrainMode(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner.train()

        def train(self, mode: bool = True):
            self.training = mode
            self.inner.train(True)
            return self

        def forward(self, x):
            return self.inner(x)

    return TrainMode(model)


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
    result["torch_imported"] = "torch" in sys.modules
    sys.stdout.write("\n" + json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0

