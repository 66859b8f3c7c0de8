"""Checkpoint loading is untrusted input: every bad case is a one-line CheckpointError."""

import pickle
import zipfile

import pytest
import torch

import edgesr
from edgesr.errors import CheckpointError, UnknownModelError
from edgesr.models.checkpoint import load_model, read_checkpoint_file, unwrap_state_dict
from edgesr.models.registry import all_specs, get_spec


def _one_line(e: Exception) -> str:
    msg = str(e)
    assert "\n" not in msg, msg
    return msg


@pytest.fixture(scope="module")
def span_sd():
    torch.manual_seed(0)
    return edgesr.create_model("span", scale=4).state_dict()


def test_every_spec_round_trips_its_own_state_dict():
    # Detection must recover (architecture, variant, scale) from keys and shapes alone.
    for spec in all_specs():
        for v in spec.variants:
            for s in sorted({v.scales[0], v.default_scale}):
                sd = spec.build(v.name, s).state_dict()
                model = load_model(sd)
                assert model.edgesr_info["model"] == spec.name
                assert (model.edgesr_info["variant"], model.edgesr_info["scale"]) == (v.name, s), (spec.name, v.name, s)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "nope.pth")


def test_empty_and_truncated_files(tmp_path, span_sd):
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_model(empty)
    good = tmp_path / "good.pth"
    torch.save(span_sd, good)
    bad = tmp_path / "truncated.pth"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError) as e:
        load_model(bad)
    assert "corrupt" in _one_line(e.value)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(CheckpointError):
        load_model(junk)


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickle_with_code_is_refused(tmp_path, capsys):
    p = tmp_path / "evil.pth"
    torch.save({"params": {"x": torch.zeros(1)}, "payload": _Evil()}, p)
    with pytest.raises(CheckpointError) as e:
        load_model(p)
    assert "refusing" in _one_line(e.value)
    assert "pwned" not in capsys.readouterr().out
    # A raw pickle (not a torch zip) with a code payload is refused too.
    raw = tmp_path / "raw.pkl"
    raw.write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(CheckpointError):
        read_checkpoint_file(raw)
    assert "pwned" not in capsys.readouterr().out


def test_wrappers_prefixes_and_ema_preference(span_sd):
    other = {k: v + 1 for k, v in span_sd.items()}
    sd, rep = unwrap_state_dict({"params": other, "params_ema": span_sd})
    assert rep.wrapper == "params_ema" and "params_ema" in rep.summary()
    assert all(torch.equal(sd[k], span_sd[k]) for k in span_sd)
    sd, rep = unwrap_state_dict({"epoch": 3, "model_state_dict": {f"module.{k}": v for k, v in span_sd.items()}})
    assert rep.wrapper == "model_state_dict" and rep.stripped_prefix == "module."
    assert set(sd) == set(span_sd)
    sd, rep = unwrap_state_dict({"state_dict": span_sd})
    assert rep.wrapper == "state_dict"


def test_safetensors_round_trip(tmp_path, span_sd):
    from safetensors.torch import save_file

    p = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in span_sd.items()}, str(p))
    m = load_model(p)
    assert m.edgesr_info["model"] == "span"
    corrupt = tmp_path / "c.safetensors"
    corrupt.write_bytes(p.read_bytes()[:100])
    with pytest.raises(CheckpointError):
        load_model(corrupt)


def test_wrong_architecture_says_what_it_looks_like(span_sd):
    with pytest.raises(CheckpointError) as e:
        load_model(span_sd, name="safmn")
    assert "looks like span" in _one_line(e.value)


def test_wrong_scale_and_variant(span_sd):
    with pytest.raises(CheckpointError, match="x4 span model, not x2"):
        load_model(span_sd, name="span", scale=2)
    with pytest.raises(CheckpointError, match="not ch52"):
        load_model(span_sd, name="span", variant="ch52")


def test_mismatched_and_missing_keys_are_listed(span_sd):
    sd = dict(span_sd)
    sd.pop("conv_cat.bias")
    with pytest.raises(CheckpointError) as e:
        load_model(sd, name="span")
    assert "missing" in _one_line(e.value) and "conv_cat.bias" in str(e.value)


def test_nan_weights_rejected(span_sd):
    sd = dict(span_sd)
    sd["conv_cat.weight"] = sd["conv_cat.weight"].clone()
    sd["conv_cat.weight"][0, 0, 0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="NaN or inf"):
        load_model(sd)


def test_unrecognised_dict():
    with pytest.raises(CheckpointError, match="unrecognised architecture"):
        load_model({"foo.weight": torch.zeros(3)})


def test_unknown_model_and_variant():
    with pytest.raises(UnknownModelError, match="unknown model"):
        get_spec("esrgan")
    with pytest.raises(UnknownModelError, match="unknown variant"):
        edgesr.create_model("span", variant="ch99")
    with pytest.raises(UnknownModelError, match="no x8"):
        edgesr.create_model("span", scale=8)


@pytest.mark.parametrize("model, variant, official", [("safmnpp", "light", "params"), ("safmnpp", "base", "params_ema"),
                                                      ("safmn", "base", "params"), ("span", "ch48", "params_ema")])
def test_both_wrappers_load_what_the_official_script_reads(model, variant, official):
    """Files with params and params_ema: the variant's official inference choice wins."""
    torch.manual_seed(0)
    a = edgesr.create_model(model, variant=variant).state_dict()
    b = {k: v + 0.01 if v.is_floating_point() else v for k, v in a.items()}
    m, rep = edgesr.load_model({"params": a, "params_ema": b}, return_report=True)
    assert m.edgesr_info["variant"] == variant
    want = a if official == "params" else b
    got = m.state_dict()
    assert rep.wrapper == official and all(torch.equal(got[k], want[k]) for k in want if "eval_conv" not in k)
    assert f"chose '{official}'" in rep.summary()
