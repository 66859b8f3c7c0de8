"""Shape-driven detection: every hyperparameter is read off keys and shapes, for all families.

Checkpoints are synthesised from our own models built with configs no known variant has,
then loaded through ``edgesr.load_model``: the detected config must be the source's, the
load strict, and the output identical.  The released checkpoints load with their stated
configs, the NTIRE 2023 SAFMN entry reproduces its official quality on Set5, and what no
family can express is refused with one line naming the closest family.
"""

from __future__ import annotations

import glob
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import edgesr
from edgesr.cli import main as cli_main
from edgesr.errors import CheckpointError
from edgesr.models import darkir as D
from edgesr.models import plainusr as P
from edgesr.models import safmn as S
from edgesr.models import span as SP
from edgesr.models import srconvnet as SC
from edgesr.models.checkpoint import load_model
from edgesr.models.registry import canonical_config, get_spec

from conftest import SHARED, real_image

CHECKPOINTS = SHARED / "checkpoints"
SET5 = SHARED / "datasets/Set5"


@torch.no_grad()
def _perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Seeded noise on every parameter, so no tensor is a constant a wrong layout could match."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def _pruned_span_widths(deploy_only: bool) -> dict[str, list[int]]:
    """A SPAN-48 whose blocks were pruned to different inner widths (and conv_2 / conv_cat too)."""
    c = 48
    mids = [(40, 36), (44, 48), (32, 28), (48, 40), (36, 36), (24, 20)]
    table = {"conv_1": [3, c]}
    for i, (a, b) in enumerate(mids, 1):
        table[f"block_{i}.c1_r"], table[f"block_{i}.c2_r"], table[f"block_{i}.c3_r"] = [c, a], [a, b], [b, c]
    table["conv_2"] = [c, 40]
    if not deploy_only:  # inner widths pruned independently of the official 2x gain
        for k, (ci, co) in list(table.items()):
            table[k] = [ci, co, 2 * ci - (3 if k.endswith("c2_r") else 0), 2 * co]
    table["conv_cat"] = [c + 40 + c + mids[-1][0], 44]
    return table


# (id, model factory, family, expected label, scale, config items that must be read back)
CASES = [
    ("span-ch32-x4", lambda: SP.SPAN(32, 4), "span", "custom-ch32", 4, {"feature_channels": 32}),
    ("span-ch40-x3", lambda: SP.SPAN(40, 3), "span", "custom-ch40", 3, {"feature_channels": 40}),
    ("span-nonorm-x2", lambda: SP.SPAN(48, 2, norm=False), "span", "custom-ch48-nonorm", 2, {"norm": False}),
    ("span-ch26-deploy", lambda: SP.SPAN(26, 4, deploy_only=True), "span", "custom-ch26-deploy", 4,
     {"feature_channels": 26, "deploy_only": True}),
    ("span-pruned", lambda: SP.SPAN(48, 4, widths=_pruned_span_widths(False)), "span", "custom-ch48-pruned", 4,
     {"widths": _pruned_span_widths(False)}),
    ("span-pruned-deploy", lambda: SP.SPAN(48, 2, deploy_only=True, widths=_pruned_span_widths(True)), "span",
     "custom-ch48-pruned-deploy", 2, {"widths": _pruned_span_widths(True)}),
    ("safmn-dim24-b3-x3", lambda: S.SAFMN(24, 3, 1.5, 3), "safmn", "custom-dim24-b3-ffn1.5", 3,
     {"dim": 24, "n_blocks": 3, "ffn_scale": 1.5}),
    ("safmn23-dim16-b2-x2", lambda: S.SAFMN23(16, 2, 2.0, 2), "safmn_ntire23", "custom-dim16-b2-ffn2", 2,
     {"dim": 16, "n_blocks": 2}),
    ("safmnpp-dim24-b2-x2", lambda: S.SAFMNPP(24, 2, 2.0, 2), "safmnpp", "custom-ntire24-dim24-b2-ffn2", 2,
     {"arch": "ntire24", "dim": 24, "n_blocks": 2, "ffn_scale": 2.0}),
    ("safmnpp-light-dim16-x3", lambda: S.LightSAFMNPP(16, 3, 1.5, 3), "safmnpp", "custom-ais24-dim16-b3-ffn1.5", 3,
     {"arch": "ais24", "dim": 16, "n_blocks": 3}),
    ("plainusr-rep-n40-x3", lambda: P.PlainUSR("general", 40, (40, 24, 12), 8, 3), "plainusr",
     "custom-general-n40-im40-24-12-f8", 3, {"n_feat": 40, "im_feat": [40, 24, 12], "attn_feat": 8}),
    ("plainusr-train-large-n24-x2", lambda: P.PlainUSR("large", 24, (24, 16, 8), 4, 2, train_form=True), "plainusr",
     "custom-large-n24-im24-16-8-f4-train", 2, {"kind": "large", "train_form": True}),
    ("plainusr-ultra-n24", lambda: P.PlainUSR("ultra", 24, (24, 12), None, 4), "plainusr",
     "custom-ultra-n24-im24-12", 4, {"kind": "ultra", "im_feat": [24, 12]}),
    ("srconvnet-dim32-x3", lambda: SC.SRConvNet(3, dim=32, num_blocks=2, num_heads=4, num_kernels=4), "srconvnet",
     "custom-dim32-b2-h4-k4", 3, {"dim": 32, "num_blocks": 2, "num_heads": 4, "num_kernels": 4}),
    ("darkir-w8", lambda: D.DarkIR(width=8, middle_blk_num_enc=1, middle_blk_num_dec=1, enc_blk_nums=(1, 1, 2),
                                  dec_blk_nums=(2, 1, 1)), "darkir", "custom-w8-enc1-1-2-mid1-1-dec2-1-1", 1,
     {"width": 8, "enc_blk_nums": [1, 1, 2], "dec_blk_nums": [2, 1, 1], "middle_blk_num_enc": 1}),
]


@pytest.mark.parametrize("make,family,label,scale,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
@torch.no_grad()
def test_unusual_configs_are_read_off_shapes(make, family, label, scale, expected):
    torch.manual_seed(1)
    source = _perturbed(make(), seed=2)
    sd = source.state_dict()
    loaded, report = load_model({"params": sd}, return_report=True)  # strict: any unread shape would fail here
    info = loaded.edgesr_info
    assert (info["model"], info["variant"], info["scale"]) == (family, label, scale)
    for key, value in expected.items():
        assert info["config"][key] == canonical_config({key: value})[key], key
    assert set(loaded.state_dict()) == set(sd)
    size = 16 if family.startswith("safmn") else 12
    x = real_image(size, size + 4 if family != "safmn_ntire23" else size) * get_spec(family).input_range
    assert (loaded(x) - source(x)).abs().max().item() < 1e-6
    # the deploy form (folds + export-safe rewrites) of a custom config is as exact as a known one's
    spec = get_spec(family)
    side = max(16, spec.size_rule.multiple_of)
    x = real_image(side, side) * spec.input_range
    ref = loaded(x)
    assert ((edgesr.deploy(loaded, "onnx")(x) - ref).abs().max() / ref.abs().max().clamp_min(1)).item() < 1e-5
    # the label and config are enough to rebuild the same architecture (what artifact metadata carries)
    rebuilt = get_spec(family).build_config(info["config"], scale)
    assert rebuilt.edgesr_info["variant"] == label
    rebuilt.load_state_dict(sd, strict=True)


@torch.no_grad()
def test_no_norm_span_skips_the_input_normalisation():
    """spandrel's norm=False: forward(x) is the normalised model's forward on (x - mean) / 255 inverted."""
    plain = _perturbed(SP.SPAN(32, 2, norm=False), seed=3)
    normed = SP.SPAN(32, 2)
    normed.load_state_dict({k: v for k, v in plain.state_dict().items() if k != "no_norm"})
    normed.eval()
    x = real_image(12, 10)
    assert "no_norm" in plain.state_dict()
    torch.testing.assert_close(plain((x - normed.mean) * 255.0), normed(x), rtol=1e-5, atol=1e-4)
    assert (plain(x) - normed(x)).abs().max() > 1e-2  # the flag matters


def test_known_variants_keep_their_names():
    for name, variant, scale in (("span", "ch48", 2), ("span", "ch28", 4), ("plainusr", "t-train", 4),
                                 ("safmnpp", "light", 4), ("safmn", "l", 3)):
        sd = get_spec(name).build(variant, scale).state_dict()
        info = load_model(sd).edgesr_info
        assert (info["model"], info["variant"], info["scale"]) == (name, variant, scale)
    # a known config at a scale the variant does not list is still loadable, as a custom label
    sd = SP.SPAN(28, 2, deploy_only=True).state_dict()
    assert load_model(sd).edgesr_info["variant"] == "custom-ch28-deploy"


# file -> (family, label, scale, config items): what each released checkpoint is (README of the folder)
RELEASED = {
    "PlainUSR_Rep_x2.pth": ("plainusr", "base", 2, {"n_feat": 64, "im_feat": [64, 48, 32], "attn_feat": 16}),
    "PlainUSR_Rep_x4.pth": ("plainusr", "base", 4, {"n_feat": 64, "im_feat": [64, 48, 32], "attn_feat": 16}),
    "PlainUSRL_Rep_x4.pth": ("plainusr", "l", 4, {"kind": "large", "n_feat": 80, "im_feat": [80, 64, 48]}),
    "PlainUSRM_Rep_x4.pth": ("plainusr", "m", 4, {"n_feat": 48, "im_feat": [48, 32, 16], "attn_feat": 8}),
    "PlainUSRS_Rep_x4.pth": ("plainusr", "s", 4, {"n_feat": 32, "im_feat": [32, 16, 8], "attn_feat": 4}),
    "PlainUSRT_Rep_x4.pth": ("plainusr", "t", 4, {"kind": "ultra", "n_feat": 32, "im_feat": [32, 16]}),
    "PlainUSRU_Rep_x4.pth": ("plainusr", "u", 4, {"kind": "ultra", "n_feat": 16, "im_feat": [16, 8]}),
    "team15_SAFMN_ntire2023.pth": ("safmn_ntire23", "base", 4, {"dim": 36, "n_blocks": 8, "ffn_scale": 2.0}),
    "team23_safmnpp.pth": ("safmnpp", "base", 4, {"arch": "ntire24", "dim": 36, "n_blocks": 6, "ffn_scale": 1.5}),
    "team38_span_ch28_slim.pth": ("span", "ch28", 4, {"feature_channels": 28, "deploy_only": True, "norm": True}),
}


def test_every_released_checkpoint_loads_with_its_config():
    assert sorted(p.name for p in CHECKPOINTS.glob("*.pth")) == sorted(RELEASED)
    for name, (family, label, scale, expected) in RELEASED.items():
        info = load_model(CHECKPOINTS / name).edgesr_info
        assert (info["model"], info["variant"], info["scale"]) == (family, label, scale), name
        for key, value in expected.items():
            assert info["config"][key] == value, (name, key)


def _y(img: np.ndarray) -> np.ndarray:
    """BT.601 luma in [16, 235] of a uint8 RGB image (BasicSR's test_y_channel)."""
    f = img.astype(np.float64) / 255.0
    return 16.0 + 65.481 * f[..., 0] + 128.553 * f[..., 1] + 24.966 * f[..., 2]


@torch.no_grad()
def _set5_y_psnr(model: torch.nn.Module, scale: int, names: tuple[str, ...] = ()) -> float:
    """Mean Y-PSNR over Set5 (or the named images of it)."""
    values = []
    for hr_path in sorted((SET5 / "HR").glob("*.png")):
        if names and hr_path.stem not in names:
            continue
        hr = np.asarray(Image.open(hr_path).convert("RGB"))
        lr = np.asarray(Image.open(glob.glob(str(SET5 / "LR_bicubic" / f"X{scale}" / f"{hr_path.stem}*"))[0]).convert("RGB"))
        x = torch.from_numpy(lr.copy()).permute(2, 0, 1)[None].float() / 255.0
        sr = (model(x)[0].clamp(0, 1).permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)
        hr = hr[: sr.shape[0], : sr.shape[1]]
        a, b = _y(sr)[scale:-scale, scale:-scale], _y(hr)[scale:-scale, scale:-scale]
        values.append(10 * np.log10(255.0**2 / np.mean((a - b) ** 2)))
    return float(np.mean(values))


def test_ntire2023_safmn_runs_as_the_official_code():
    """Set5 x4 Y-PSNR (border = scale cropped, uint8 output) of the released NTIRE 2023 entry.

    Measured 32.16 dB (butterfly 28.68 dB); the SAFMN paper reports 32.18 dB for its x4
    model on Set5, so a layout mistake (e.g. the paper's pooling levels, below) shows up
    as a clear drop.
    """
    model = load_model(CHECKPOINTS / "team15_SAFMN_ntire2023.pth")
    assert isinstance(model, S.SAFMN23)
    psnr = _set5_y_psnr(model, 4)
    assert 32.0 <= psnr <= 32.4, psnr
    butterfly = _set5_y_psnr(model, 4, ("butterfly",))
    for block in model.feats:  # the same weights through the paper SAFM's pooling sizes
        block.safm.level_shift = 0
    assert _set5_y_psnr(model, 4, ("butterfly",)) < butterfly - 0.05


def _resnet_like() -> dict[str, torch.Tensor]:
    return {"conv1.weight": torch.zeros(64, 3, 7, 7), "bn1.weight": torch.ones(64), "bn1.bias": torch.zeros(64),
            "layer1.0.conv1.weight": torch.zeros(64, 64, 3, 3), "fc.weight": torch.zeros(1000, 512),
            "fc.bias": torch.zeros(1000)}


def _broken_span_chain() -> dict[str, torch.Tensor]:
    sd = dict(SP.SPAN(32, 4).state_dict())
    sd["block_3.c3_r.eval_conv.weight"] = torch.zeros(24, 32, 3, 3)  # breaks block 3's residual
    sd["block_3.c3_r.eval_conv.bias"] = torch.zeros(24)
    return sd


@pytest.mark.parametrize("make,closest,detail", [
    (_resnet_like, None, "first differences: missing"),
    (_broken_span_chain, "span", "block_3.c3_r"),
    (lambda: {**SP.SPAN(32, 4).state_dict(), "upsampler.0.weight": torch.zeros(40, 32, 3, 3)}, "span", "upsampler.0.weight"),
    (lambda: {k: v for k, v in S.SAFMN(36, 2, 2.0, 4).state_dict().items() if not k.startswith("feats.1.")}
     | {f"feats.2.{k[8:]}": v for k, v in S.SAFMN(36, 2, 2.0, 4).state_dict().items() if k.startswith("feats.1.")},
     "safmn", "feats.N"),
    (lambda: S.SAFMN(38, 2, 2.0, 4).state_dict(), "safmn", "multiple of 4"),
], ids=["resnet", "span-chain", "span-rgb-shuffle", "safmn-gap", "safmn-dim38"])
def test_what_does_not_fit_is_one_line_naming_the_closest_family(make, closest, detail):
    with pytest.raises(CheckpointError) as e:
        load_model(make())
    msg = str(e.value)
    assert "\n" not in msg and "looks closest to " in msg and detail in msg, msg
    if closest:
        assert f"looks closest to {closest}:" in msg, msg


def test_keys_of_no_family_say_so():
    with pytest.raises(CheckpointError, match=r"its key names match no family \(first keys: foo, bar\)$"):
        load_model({"foo": torch.zeros(1), "bar": torch.zeros(2)})


def test_cli_refusal_is_one_line_exit_2(tmp_path, capsys):
    path = tmp_path / "resnet.pth"
    torch.save(_resnet_like(), path)
    rc = cli_main(["reparam", "--weights", str(path), "--output", str(tmp_path / "o.safetensors")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "looks closest to" in err and "Traceback" not in err, err


def test_state_key_picks_the_wrapper_and_the_report_says_so(tmp_path):
    a, b = _perturbed(SP.SPAN(16, 2), 4), _perturbed(SP.SPAN(16, 2), 5)
    path = tmp_path / "both.pth"
    torch.save({"params": a.state_dict(), "params_ema": b.state_dict()}, path)
    x = real_image(10, 12)
    with torch.no_grad():
        default, rep0 = load_model(path, return_report=True)
        chosen, rep1 = load_model(path, return_report=True, state_key="params")
        assert torch.equal(default(x), b(x)) and torch.equal(chosen(x), a(x))
    assert rep0.wrapper == "params_ema" and rep1.wrapper == "params"
    assert "'params' chosen by --state-key" in rep1.summary()
    torch.save({"params": a.state_dict()}, path)
    with pytest.raises(CheckpointError, match=r"no 'params_ema' entry \(top-level keys: params\)"):
        load_model(path, state_key="params_ema")
    with pytest.raises(CheckpointError, match="unknown state key"):
        load_model(path, state_key="ema")


def test_custom_config_round_trips_through_export_and_parity(tmp_path, capsys):
    """A custom config exported from --weights is rebuilt by `edgesr parity` from the same checkpoint."""
    from edgesr.export.metadata import read_metadata

    a, b = _perturbed(SP.SPAN(16, 2, norm=False), 6), _perturbed(SP.SPAN(16, 2, norm=False), 7)
    ckpt = tmp_path / "span16.pth"
    torch.save({"params": a.state_dict(), "params_ema": b.state_dict()}, ckpt)
    art = tmp_path / "span16.onnx"
    assert cli_main(["export", "--weights", str(ckpt), "--state-key", "params", "--format", "onnx",
                     "--input-size", "16x16", "--output", str(art)]) == 0
    meta = read_metadata(art)
    assert meta["variant"] == "custom-ch16-nonorm"
    assert json_config(meta) == {"feature_channels": 16, "deploy_only": False, "norm": False, "widths": None}
    assert "'params' chosen by --state-key" in meta["weights"]
    capsys.readouterr()
    assert cli_main(["parity", str(art), "--weights", str(ckpt), "--state-key", "params"]) == 0
    # a checkpoint of another config under the same family cannot stand in for it
    other = tmp_path / "span20.pth"
    torch.save(SP.SPAN(20, 2, norm=False).state_dict(), other)
    capsys.readouterr()
    assert cli_main(["parity", str(art), "--weights", str(other)]) == 2
    err = capsys.readouterr().err.strip()
    assert "custom-ch20-nonorm, not custom-ch16-nonorm" in err and "\n" not in err, err
    # same label, different widths (two prunings of one network): the recorded config tells them apart
    from edgesr.errors import EdgeSRError
    from edgesr.runtime.check import _check_config

    pruned = load_model(SP.SPAN(48, 4, widths=_pruned_span_widths(False)).state_dict())
    recorded = dict(pruned.edgesr_info["config"], widths={**pruned.edgesr_info["config"]["widths"], "conv_2": [48, 44, 96, 88]})
    with pytest.raises(EdgeSRError, match="config differs from the artifact's: widths"):
        _check_config({"model": "span", "config": json.dumps(recorded)}, pruned)
    _check_config({"model": "span", "config": json.dumps(pruned.edgesr_info["config"])}, pruned)


def json_config(meta: dict) -> dict:
    return json.loads(meta["config"])
