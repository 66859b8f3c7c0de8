"""Real aarch64 runs under qemu-user: onnxruntime and ai-edge-litert, ARM builds vs x86.

No mocks and no skips: if qemu or the aarch64 rootfs cannot be set up, these tests fail.
The first run builds the rootfs (~1 min, cached afterwards; see tools/arm64/README.md).
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from edgesr.runtime.arm import Aarch64Error, Aarch64Runner, ensure_rootfs

ARM_VS_X86 = 1e-5
ARM_VS_TORCH = 1e-4


class TinySR(torch.nn.Module):
    """conv 3->8, ReLU, conv 8->12, PixelShuffle(2): x2 upscaler, ~1.1 MMAC at 32x32."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = torch.nn.Conv2d(8, 12, 3, padding=1)
        self.shuffle = torch.nn.PixelShuffle(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shuffle(self.c2(torch.relu(self.c1(x))))


class Nhwc(torch.nn.Module):
    """The TFLite I/O contract: NHWC in and out."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    import litert_torch
    import onnxruntime as ort
    from ai_edge_litert.interpreter import Interpreter

    d = tmp_path_factory.mktemp("arm64")
    torch.manual_seed(0)
    model = TinySR().eval()
    for p in model.parameters():  # litert-torch merges non-contiguous constants
        p.data = p.data.contiguous()
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(1, 1, 32, 32)
    xs = [rng.random((1, 3, 32, 32), dtype=np.float32), np.concatenate([ramp, ramp.mT, 1 - ramp], 1)]
    example = torch.from_numpy(xs[0])

    onnx_path = d / "tiny.onnx"
    torch.onnx.export(model, (example,), str(onnx_path), dynamo=True, opset_version=18,
                      input_names=["input"], output_names=["output"])
    tflite_path = d / "tiny.tflite"
    litert_torch.convert(Nhwc(model).eval(), (example.permute(0, 2, 3, 1).contiguous(),)).export(str(tflite_path))

    with torch.no_grad():
        ref_torch = [model(torch.from_numpy(x)).numpy() for x in xs]
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    ref_onnx = [sess.run(["output"], {"input": x})[0] for x in xs]
    interp = Interpreter(model_path=str(tflite_path), num_threads=1)
    interp.allocate_tensors()
    ref_tflite = []
    for x in xs:
        interp.set_tensor(interp.get_input_details()[0]["index"], np.ascontiguousarray(x.transpose(0, 2, 3, 1)))
        interp.invoke()
        ref_tflite.append(interp.get_tensor(interp.get_output_details()[0]["index"]).transpose(0, 3, 1, 2))
    return {
        "xs": xs,
        "torch": ref_torch,
        "onnx": (onnx_path, ref_onnx, ort.__version__),
        "tflite": (tflite_path, ref_tflite, _litert_version()),
    }


def _litert_version() -> str:
    from importlib.metadata import version

    return version("ai-edge-litert")


@pytest.mark.parametrize("cpu,threads", [("neoverse-n1", 1), ("cortex-a72", 2)])
@pytest.mark.parametrize("kind", ["onnx", "tflite"])
def test_aarch64_matches_x86_and_torch(case, kind, cpu, threads):
    path, ref_x86, x86_version = case[kind]
    runner = Aarch64Runner(path, threads=threads, cpu=cpu)
    assert runner.version == x86_version  # same release on both architectures
    assert runner.threads == threads and "aarch64" in runner.name

    ys = runner.run_many(case["xs"])  # one emulated process for both inputs

    report = runner.last_report
    assert report["machine"] == "aarch64"
    assert report["runtime_version"] == x86_version
    assert report["qemu_cpu"] == cpu
    assert report["cpuinfo_core"] == {"neoverse-n1": "0x41:0xd0c", "cortex-a72": "0x41:0xd08"}[cpu]
    assert report["threads"] == threads and len(report["run_s"]) == 2
    for y, y86, yt in zip(ys, ref_x86, case["torch"]):
        assert y.shape == yt.shape == (1, 3, 64, 64) and y.dtype == np.float32
        arm_x86 = float(np.abs(y - y86).max())
        arm_torch = float(np.abs(y - yt).max())
        print(f"{kind} {cpu} t={threads}: aarch64 vs x86 {arm_x86:.3g}, vs torch {arm_torch:.3g}")
        assert arm_x86 <= ARM_VS_X86
        assert arm_torch <= ARM_VS_TORCH


def test_run_single_input(case):
    path, ref_x86, _ = case["onnx"]
    y = Aarch64Runner(path).run(case["xs"][1])
    assert float(np.abs(y - ref_x86[1]).max()) <= ARM_VS_X86


def test_failure_inside_emulation_is_one_clear_line(tmp_path):
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"this is not an onnx model")
    runner = Aarch64Runner(bad)
    with pytest.raises(Aarch64Error) as err:
        runner.run(np.zeros((1, 3, 8, 8), np.float32))
    msg = str(err.value)
    assert "\n" not in msg
    assert "broken.onnx" in msg and "failed" in msg and "INVALID_PROTOBUF" in msg


def test_bad_arguments_raise_before_emulation(tmp_path):
    with pytest.raises(Aarch64Error, match="artifact not found"):
        Aarch64Runner(tmp_path / "missing.onnx")
    (tmp_path / "m.pt").write_bytes(b"")
    with pytest.raises(Aarch64Error, match="expected .onnx or .tflite"):
        Aarch64Runner(tmp_path / "m.pt")
    with pytest.raises(Aarch64Error, match="unsupported cpu"):
        ensure_rootfs("cortex-x9000")


def test_rootfs_is_cached():
    first = ensure_rootfs("neoverse-n1")
    t = time.perf_counter()
    again = ensure_rootfs("neoverse-n1")
    assert again == first
    assert time.perf_counter() - t < 5.0  # the cached path does no build and no extraction
