"""TFLite export: real litert-torch conversion + ai-edge-litert interpreter; no mocks of either.

Includes the regression test for litert-torch 0.10's weight-merging defect: parameters
that are non-contiguous views (as a fold that ends in ``permute`` produces) can be
lowered into one shared constant buffer -- silently wrong outputs.
"""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from ai_edge_litert import schema_py_generated as schema
from ai_edge_litert.interpreter import Interpreter
from torch import nn

from conftest import noise_image, real_image
from edgesr.errors import ExportError, OutputError, SizeRuleError
from edgesr.export import read_metadata, write_metadata
from edgesr.export.tflite import check_tflite, export_tflite, inspect_tflite, tflite_with_metadata, torch_weight_signatures
from edgesr.export.wrap import IOWrapper
from edgesr.runtime.runners import LiteRTRunner, TorchRunner

TOL = 1e-5


class FoldedToy(nn.Module):
    """Zoo op patterns, with conv weights stored the way a fold leaves them: permuted views.

    Six same-shape 3x3 convs (like SPAN's folded Conv3XC) make address reuse -- and so the
    merge -- likely; plus depthwise conv, GELU, max-pool + bilinear resize, sigmoid gate,
    a constant matmul and PixelShuffle.
    """

    def __init__(self, c: int = 16, n: int = 6, scale: int = 2):
        super().__init__()
        self.head = nn.Conv2d(3, c, 3, padding=1)
        self.body = nn.ModuleList(nn.Conv2d(c, c, 3, padding=1) for _ in range(n))
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.tail = nn.Conv2d(c, 3 * scale * scale, 3, padding=1)
        self.ps = nn.PixelShuffle(scale)
        self.register_buffer("mix", torch.linalg.qr(torch.randn(c, c))[0])
        self.scale = scale
        for m in self.body:
            m.weight.data = m.weight.data.permute(2, 3, 1, 0).contiguous().permute(3, 2, 0, 1)

    def forward(self, x):
        y = F.gelu(self.head(x))
        for m in self.body:
            y = y + 0.5 * torch.relu(m(y))
        p = F.interpolate(F.max_pool2d(y, 2, 2), scale_factor=2, mode="bilinear", align_corners=False)
        y = self.dw(y) * torch.sigmoid(p)
        y = torch.einsum("bchw,cd->bdhw", y, self.mix)
        return self.ps(self.tail(y)) + F.interpolate(x, scale_factor=self.scale, mode="nearest")


SIZE = (24, 32)


@pytest.fixture(scope="module")
def toy():
    torch.manual_seed(0)
    m = FoldedToy().eval()
    assert not any(b.weight.is_contiguous() for b in m.body)  # the defect's precondition
    return m


@pytest.fixture(scope="module")
def exported(toy, tmp_path_factory):
    path = tmp_path_factory.mktemp("tflite") / "toy.tflite"
    return export_tflite(toy, path, input_size=SIZE, metadata={"model": "toy", "scale": 2})


def _worst(model, path, sizes=(SIZE,), input_range=1.0, **kw):
    ref, art = TorchRunner(model, input_range=input_range), LiteRTRunner(path, threads=2, **kw)
    worst = 0.0
    for h, w in sizes:
        for x in (noise_image(h, w, seed=2).numpy(), real_image(h, w).numpy()):
            worst = max(worst, float(np.abs(ref.run(x) - art.run(x)).max()))
    return worst


def test_export_with_workaround_has_every_weight_and_parity(toy, exported):
    r = exported
    assert r.format == "tflite" and r.layout == "NHWC"
    assert r.input_shape == (1, *SIZE, 3) and r.output_shape == (1, 2 * SIZE[0], 2 * SIZE[1], 3)
    c = r.checks
    n_weights = 1 + 6 + 1 + 1 + 1  # head, body x6, dw, tail, mix
    assert c["builtin_only"] is True
    assert c["distinct_weights_torch"] == n_weights
    assert c["weight_buffers"] == c["distinct_weights_tflite"] == n_weights
    assert c["runtime_weights"] == 0
    for op in ("CONV_2D", "DEPTHWISE_CONV_2D", "GELU", "MAX_POOL_2D", "RESIZE_BILINEAR", "LOGISTIC"):
        assert r.ops.get(op, 0) >= 1, r.ops
    # the user's model is left as it was (a contiguous copy was converted)
    assert not any(b.weight.is_contiguous() for b in toy.body)
    assert _worst(toy, r.path) <= TOL
    assert _worst(toy, r.path, xnnpack=False) <= TOL


def test_io_names_and_layout(exported):
    it = Interpreter(model_path=str(exported.path))
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    assert inp["name"] == "input" and out["name"] == "output"
    assert list(inp["shape"]) == [1, *SIZE, 3]
    sig = it.get_signature_list()["serving_default"]
    assert sig == {"inputs": ["input"], "outputs": ["output"]}


def test_without_workaround_the_check_never_passes_a_wrong_model(toy, monkeypatch):
    """Convert the non-contiguous model directly (no make_contiguous_).

    litert-torch may or may not merge buffers in a given run (it depends on allocator
    address reuse).  The invariant: if the structural check passes, parity holds; when
    buffers were merged, the check raises.
    """
    import litert_torch

    wrapper = IOWrapper(toy, 1.0, "NHWC").eval()
    x = wrapper.example_input(*SIZE)
    expected = torch_weight_signatures(wrapper, x)
    monkeypatch.setenv("LITERT_TORCH_SHOW_PROGRESS", "n")
    data = litert_torch.convert(wrapper, (x,)).model_content()
    info = inspect_tflite(data)
    it = Interpreter(model_content=data)
    it.allocate_tensors()
    it.set_tensor(it.get_input_details()[0]["index"], x.numpy())
    it.invoke()
    with torch.no_grad():
        err = float(np.abs(it.get_tensor(it.get_output_details()[0]["index"]) - wrapper(x).numpy()).max())
    merged = len({u.buffer for u in info.weights}) < len(expected)
    print(f"without workaround: {len({u.buffer for u in info.weights})} buffers for {len(expected)} weights, "
          f"max-abs {err:.2e}")
    if merged:
        with pytest.raises(ExportError, match="merged weight constants"):
            check_tflite(info, expected)
        assert err > 1e-3  # and it really is wrong
    else:
        check_tflite(info, expected)
        assert err <= TOL


def test_pinning_makes_constant_fingerprints_unique():
    """The second layer: while pinned, litert's fingerprints of successive temporaries differ."""
    from litert_torch.backend.inline_consts import _ConstantFingerprint

    from edgesr.export.tflite import pin_constant_temporaries

    w = torch.randn(16, 16, 3, 3).permute(1, 0, 2, 3)  # non-contiguous, like a folded conv

    def fingerprints():
        out = []
        for k in range(8):
            tmp = (w + k).contiguous()  # what litert lowers: a fresh temporary per constant
            out.append(_ConstantFingerprint.from_tensor(tmp))
            del tmp
        return out

    with pin_constant_temporaries() as kept:
        pinned = fingerprints()
        assert len(kept) == 8
    assert len(set(pinned)) == 8
    assert _ConstantFingerprint.from_tensor.__func__.__qualname__.endswith("_ConstantFingerprint.from_tensor")


def _point_two_convs_at_one_buffer(data: bytes) -> bytes:
    """Simulate the defect: the 2nd body conv's weight tensor uses the 1st one's buffer."""
    model = schema.ModelT.InitFromPackedBuf(bytearray(data), 0)
    sg = model.subgraphs[0]
    conv = [i for i, oc in enumerate(model.operatorCodes)
            if max(oc.builtinCode, oc.deprecatedBuiltinCode) == schema.BuiltinOperator.CONV_2D]
    ops = [op for op in sg.operators if op.opcodeIndex in conv]
    shapes = {}
    for op in ops:
        t = sg.tensors[op.inputs[1]]
        shapes.setdefault(tuple(t.shape), []).append(t)
    same = next(ts for ts in shapes.values() if len(ts) >= 2)
    same[1].buffer = same[0].buffer
    return tflite_with_metadata_raw(model)


def tflite_with_metadata_raw(model) -> bytes:
    import flatbuffers

    b = flatbuffers.Builder(1 << 20)
    b.Finish(model.Pack(b), file_identifier=b"TFL3")
    return bytes(b.Output())


def test_structural_check_flags_merged_buffers(toy, exported):
    wrapper = IOWrapper(toy, 1.0, "NHWC").eval()
    expected = torch_weight_signatures(wrapper, wrapper.example_input(*SIZE))
    data = exported.path.read_bytes()
    check_tflite(inspect_tflite(data), expected)  # the good file passes
    broken = _point_two_convs_at_one_buffer(data)
    with pytest.raises(ExportError, match="merged weight constants"):
        check_tflite(inspect_tflite(broken), expected)
    # and the broken file is numerically wrong, which is why the check matters
    a = Interpreter(model_content=data)
    b = Interpreter(model_content=broken)
    x = real_image(*SIZE).permute(0, 2, 3, 1).contiguous().numpy()
    outs = []
    for it in (a, b):
        it.allocate_tensors()
        it.set_tensor(it.get_input_details()[0]["index"], x)
        it.invoke()
        outs.append(it.get_tensor(it.get_output_details()[0]["index"]))
    assert np.abs(outs[0] - outs[1]).max() > 1e-3


def test_builtin_only_check_names_flex_ops(exported):
    model = schema.ModelT.InitFromPackedBuf(bytearray(exported.path.read_bytes()), 0)
    gelu = next(oc for oc in model.operatorCodes
                if max(oc.builtinCode, oc.deprecatedBuiltinCode) == schema.BuiltinOperator.GELU)
    gelu.builtinCode = gelu.deprecatedBuiltinCode = schema.BuiltinOperator.CUSTOM
    gelu.customCode = "FlexErf"
    info = inspect_tflite(tflite_with_metadata_raw(model))
    assert info.custom_ops == ["FlexErf"]
    with pytest.raises(ExportError, match="Flex .*FlexErf"):
        check_tflite(info)


def test_metadata_round_trip_and_update(exported, tmp_path):
    meta = read_metadata(exported.path)
    assert meta == exported.metadata
    assert meta["layout"] == "NHWC" and meta["format"] == "tflite" and meta["model"] == "toy"
    assert meta["input_shape"] == "[1, 24, 32, 3]" and meta["scale"] == "2"
    copy = tmp_path / "copy.tflite"
    copy.write_bytes(exported.path.read_bytes())
    new = write_metadata(copy, {"parity": "passed"})
    assert new["parity"] == "passed" and new["layout"] == "NHWC"
    assert read_metadata(copy) == new
    assert inspect_tflite(copy.read_bytes()).metadata_names.count("edgesr") == 1
    assert "min_runtime_version" in inspect_tflite(copy.read_bytes()).metadata_names  # converter's kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy.tflite"]


def test_repacking_is_lossless_and_aligned(exported):
    data = exported.path.read_bytes()
    again = tflite_with_metadata(data, {"k": "v"})
    x = noise_image(*SIZE).permute(0, 2, 3, 1).contiguous().numpy()
    outs = []
    for blob in (data, again):
        it = Interpreter(model_content=blob)
        it.allocate_tensors()
        it.set_tensor(it.get_input_details()[0]["index"], x)
        it.invoke()
        outs.append(it.get_tensor(it.get_output_details()[0]["index"]))
    assert np.array_equal(outs[0], outs[1])
    model = schema.Model.GetRootAs(again, 0)
    for i in range(model.BuffersLength()):
        buf = model.Buffers(i)
        if buf.DataLength():
            start = buf._tab.Vector(buf._tab.Offset(4))
            assert start % 16 == 0


def test_static_size_is_enforced(exported):
    with pytest.raises(SizeRuleError, match="fixed input size 24x32"):
        LiteRTRunner(exported.path).run(noise_image(32, 32).numpy())


def test_failure_mid_export_leaves_nothing(tmp_path, monkeypatch, exported):
    """Force a failure while the file is being written; reuse the converted bytes to stay fast."""
    import litert_torch

    class Converted:
        def model_content(self):
            return exported.path.read_bytes()

    monkeypatch.setattr(litert_torch, "convert", lambda *a, **k: Converted())
    real_write = Path.write_bytes

    def broken_write(self, data):
        real_write(self, data[:100])
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_bytes", broken_write)
    path = tmp_path / "m.tflite"
    with pytest.raises(OutputError, match="m.tflite: disk full"):
        export_tflite(FoldedToy().eval(), path, input_size=SIZE)
    assert os.listdir(tmp_path) == []


def test_conflicting_metadata_is_refused_before_converting(tmp_path, toy):
    with pytest.raises(ValueError, match="layout"):
        export_tflite(toy, tmp_path / "x.tflite", input_size=SIZE, metadata={"layout": "NCHW"})
    assert list(tmp_path.iterdir()) == []


def test_real_span_fold_keeps_every_weight(tmp_path):
    """SPAN's deploy form: folded Conv3XC weights -- the model that exposed the defect."""
    import edgesr
    from edgesr.models import get_spec

    spec = get_spec("span")
    torch.manual_seed(0)
    model = spec.build("ch28", 4).eval()
    deployed = edgesr.deploy(model, "tflite")
    r = export_tflite(deployed, tmp_path / "span.tflite", input_range=spec.input_range, input_size=(20, 18),
                      metadata={"model": "span"})
    n_convs = sum(isinstance(m, nn.Conv2d) for m in deployed.modules())
    assert r.checks["weight_buffers"] == r.checks["distinct_weights_torch"] == n_convs
    ref, art = TorchRunner(model), LiteRTRunner(r.path, threads=2)
    for x in (noise_image(20, 18).numpy(), real_image(20, 18).numpy()):
        a = ref.run(x)
        assert np.abs(a - art.run(x)).max() <= TOL * max(1.0, float(np.abs(a).max()))


class SpectralToy(nn.Module):
    """rfft2 -> per-bin gain -> irfft2 through the export-safe DFT, large enough to be factorized.

    Factorized DFT stages multiply by 3-D bases broadcast over the batch; PyTorch sees those
    bases materialized (expand + copy -> bmm) and the converter broadcasts them at run time
    (BROADCAST_TO -> BATCH_MATMUL).  The weight check must see through both, not call it a merge.
    """

    def __init__(self, h: int, w: int, c: int = 8):
        super().__init__()
        from edgesr.reparam.dft import RealIRFFT2, RealRFFT2

        self.head = nn.Conv2d(3, c, 1)
        self.fwd, self.inv = RealRFFT2(h, w, "backward"), RealIRFFT2(h, w, "backward")
        self.gain = nn.Parameter(torch.rand(c, h, w // 2 + 1) + 0.5)
        self.tail = nn.Conv2d(c, 3, 1)

    def forward(self, x):
        re, im = self.fwd(self.head(x))
        return self.tail(self.inv(re * self.gain, im * self.gain))


def test_factorized_dft_passes_the_weight_check_with_parity(tmp_path):
    """The 256x256 DarkIR/SRConvNet false alarm ("139 distinct constant weights for 145"), in small."""
    h, w = 130, 72  # H > DIRECT_MAX: factorized with broadcast 3-D bases; W direct
    torch.manual_seed(0)
    model = SpectralToy(h, w).eval()
    r = export_tflite(model, tmp_path / "fft.tflite", input_size=(h, w))
    c = r.checks
    assert r.ops.get("BATCH_MATMUL", 0) >= 2, r.ops
    assert c["distinct_weights_tflite"] >= c["distinct_weights_torch"] >= 4, c
    ref, art = TorchRunner(model), LiteRTRunner(r.path, threads=2)
    for x in (noise_image(h, w, seed=3).numpy(), real_image(h, w).numpy()):
        a = ref.run(x)
        assert np.abs(a - art.run(x)).max() <= 1e-4 * max(1.0, float(np.abs(a).max()))


def test_torch_signature_of_a_broadcast_basis_is_the_basis():
    """A (p, n, m) basis broadcast over a batch is one weight (the p-periodic bmm operand)."""

    class Broadcast(nn.Module):
        def __init__(self):
            super().__init__()
            self.basis = nn.Parameter(torch.randn(4, 5, 6))

        def forward(self, x):  # (6, 4, 1, 5) @ (4, 5, 6): bmm over 24 with the basis copied 6x
            return x.reshape(6, 4, 1, 5) @ self.basis

    m = Broadcast()
    sig = torch_weight_signatures(m, torch.randn(1, 3, 8, 5))
    from edgesr.export.tflite import content_signature

    assert dict(sig) == {content_signature(m.basis.detach().numpy()): 1}
