"""Run-config loading: round trips, presets, and bad input refused with one clear line."""

import dataclasses

import pytest
import yaml

from nas.cli import main
from nas.config import MODEL_PRESETS, ModelConfig, from_dict, load_config
from nas.errors import ConfigError
from tests.helpers import ROOT

GOOD = {
    "model": {"vocab_size": 256, "n_layer": 2, "d_model": 32, "n_head": 2, "seq_len": 16},
    "value_residual": {"mode": "learnable", "layers": "all", "lambda1": 0.5, "lambda2": 0.5},
    "train": {"steps": 4, "batch_size": 2, "lr": 3.0e-3, "seed": 0, "eval_batches": 1},
    "data": {"source": "builtin"},
}


def test_example_config_loads():
    cfg = load_config(ROOT / "configs" / "example.yaml")
    assert cfg.value_residual.mode == "learnable"
    assert from_dict(cfg.to_dict()) == cfg


def test_preset_expands_and_overrides():
    cfg = from_dict({"model": {"preset": "paper-82m", "seq_len": 256}})
    assert (cfg.model.n_layer, cfg.model.d_model, cfg.model.ffn) == (8, 512, 1792)
    assert cfg.model.seq_len == 256


def test_a_preset_is_one_classmethod_and_overrides_win():
    assert ModelConfig.from_preset("nano", n_layer=6) == from_dict(
        {"model": {"preset": "nano", "n_layer": 6}}).model
    assert ModelConfig.from_preset("nano").n_layer == MODEL_PRESETS["nano"]["n_layer"]


def test_replacing_a_section_keeps_a_token_budget():
    """What `nas train --data` does: the resolved steps beside tokens_per_param are no second
    budget."""
    cfg = from_dict({"train": {"tokens_per_param": 2.0}})
    moved = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, source="other.txt"))
    assert moved.train.steps == cfg.train.steps and moved.data.source == "other.txt"
    assert moved.to_dict()["train"] == cfg.to_dict()["train"]


def _with(section, key, value):
    raw = {k: dict(v) for k, v in GOOD.items()}
    raw[section][key] = value
    return raw


BAD = [
    (_with("model", "n_head", 3), "model.n_head", "does not divide"),
    (_with("model", "d_modle", 3), "model.d_modle", "unknown key"),
    (_with("model", "n_layer", "four"), "model.n_layer", "expected int"),
    (_with("model", "n_layer", 0), "model.n_layer", "must be in (0, 1024]"),
    (_with("model", "preset", "huge"), "model.preset", "unknown preset"),
    (_with("value_residual", "mode", "magic"), "value_residual.mode", "allowed: vanilla"),
    (_with("value_residual", "layers", [0, 1]), "value_residual.layers", "layer 0 is the source"),
    (_with("value_residual", "layers", [5]), "value_residual.layers", "out of range"),
    (_with("value_residual", "layers", "some"), "value_residual.layers", "'all' or a list"),
    (_with("value_residual", "source", "v2"), "value_residual.source", "allowed"),
    (_with("value_residual", "lambda1", True), "value_residual.lambda1", "expected float"),
    (_with("train", "steps", -5), "train.steps", "must be > 0"),
    (_with("train", "lr", 0), "train.lr", "must be > 0"),
    (_with("data", "val_fraction", 1.5), "data.val_fraction", "(0, 1)"),
    ({**GOOD, "optim": {}}, "optim", "unknown section"),
    ({**GOOD, "model": 3}, "model", "must be a mapping, got int"),
    (_with("model", "n_layer", None), "model.n_layer", "must be set (expected int)"),
    (_with("model", "preset", ["nano"]), "model.preset", "unknown preset ['nano']; allowed: pico"),
    (_with("value_residual", "source", 3), "value_residual.source", "expected str, got 3"),
    (_with("train", "beta1", 1), "train.beta1", "must be in [0, 1), got 1.0"),
    (_with("train", "lr", float("nan")), "train.lr", "must be > 0 and finite, got nan"),
    (_with("train", "tokens", 64), "train.tokens", "give one of steps, tokens, tokens_per_param, "
     "not steps and tokens"),
]


@pytest.mark.parametrize("raw,key,fragment", BAD)
def test_bad_values_are_refused(raw, key, fragment):
    with pytest.raises(ConfigError) as info:
        from_dict(raw, where="cfg.yaml")
    msg = str(info.value)
    assert msg.startswith("cfg.yaml: ") and key in msg and fragment in msg
    assert "\n" not in msg


def _train(tmp_path, capsys, text, *extra) -> tuple[int, str]:
    """`nas train` in-process on a config of `text`: its exit status and its stderr."""
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    code = main(["train", str(path), "--out", str(tmp_path / "out"), *extra])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("text,fragment", [
    ("model: {n_layer: 2\n", "malformed YAML"),
    (yaml.safe_dump(_with("model", "n_head", 3)), "model.n_head"),
    (yaml.safe_dump(_with("value_residual", "layers", [0])), "value_residual.layers"),
    (yaml.safe_dump(_with("data", "source", "/no/such/file.txt")), "data.source"),
])
def test_cli_bad_config_exits_2_with_one_line(tmp_path, capsys, text, fragment):
    code, err = _train(tmp_path, capsys, text)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], err
    assert "Traceback" not in err
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_cli_missing_file(tmp_path, capsys):
    assert main(["train", str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err
    assert "file not found" in err and "nope.yaml" in err


def test_empty_and_short_data_are_refused(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    short = tmp_path / "short.txt"
    short.write_text("tiny")
    for path, fragment in ((empty, "empty"), (short, "too short")):
        code, err = _train(tmp_path, capsys, yaml.safe_dump(GOOD), "--data", str(path))
        assert code == 2, err
        assert fragment in err and len(err.strip().splitlines()) == 1
