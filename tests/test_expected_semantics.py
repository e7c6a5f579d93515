"""What a user of Hugging Face, Lightning and Optuna tools expects: `--temperature 0` is greedy,
`--set model.preset=NAME` gives the preset's size whatever the file names, and `--warm-start
NAME` finds a study in its default storage, a failed one leaving no file behind."""

import optuna
import pytest
import torch
import yaml
from optuna.distributions import CategoricalDistribution
from optuna.trial import create_trial

from nas.cli import main
from nas.config import MODEL_PRESETS, dump_config, load_config
from nas.model.decoder import build_model, sample
from nas.overrides import load_config as load_with_overrides
from nas.search.spec import draw_configs, load_spec
from tests.helpers import TINY_BASE, tiny, write_spec

pytestmark = pytest.mark.slow  # trains, serves or kills: make test-fast leaves it out

# --temperature 0


def test_temperature_zero_samples_the_most_likely_token():
    logits = torch.randn(4, 50)
    assert torch.equal(sample(logits, 0.0), logits.argmax(-1, keepdim=True))


def test_nas_generate_at_temperature_zero_is_the_text_of_top_k_one(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    cfg = tiny("learnable")
    dump_config(cfg, run / "config.yaml")
    torch.manual_seed(0)
    torch.save(build_model(cfg).state_dict(), run / "model.pt")  # untrained: any weights do

    def generate(*flags: str) -> str:
        assert main(["generate", str(run), "--prompt", "def ", "--max-new-tokens", "40",
                     *flags]) == 0
        return capsys.readouterr().out

    greedy = generate("--temperature", "0", "--seed", "1")
    assert greedy == generate("--temperature", "0", "--seed", "2")  # no sampling: no seed
    assert greedy == generate("--top-k", "1", "--seed", "3")
    assert greedy != generate("--seed", "1")  # sampled at temperature 1: another text


# --set model.preset=NAME replaces the size keys the file gives

PICO = MODEL_PRESETS["pico"]


@pytest.fixture
def sized(tmp_path):
    """A run config naming every size key a preset sets, ffn_hidden included."""
    path = tmp_path / "sized.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"n_layer": 3, "d_model": 64, "n_head": 4, "seq_len": 16, "ffn_hidden": 96},
        "train": {"steps": 2, "batch_size": 2, "eval_batches": 1, "compile": False}}))
    return path


def size(cfg) -> dict:
    return {key: getattr(cfg.model, key) for key in PICO}


def test_a_preset_override_replaces_the_size_the_file_names(sized):
    cfg = load_with_overrides(sized, ["model.preset=pico"])
    assert size(cfg) == PICO and cfg.model.ffn_hidden is None  # the preset's own FFN width
    assert cfg.train.steps == 2  # the file's other keys stay
    # a later --set of a size key applies on top of the preset; an earlier one it replaces
    assert load_with_overrides(sized, ["model.preset=pico", "model.n_layer=3"]).model.n_layer == 3
    assert load_with_overrides(sized, ["model.n_layer=3", "model.preset=pico"]).model.n_layer == 2
    # in the file, a preset with explicit keys is still the preset with those on top
    raw = yaml.safe_load(sized.read_text())
    sized.write_text(yaml.safe_dump({**raw, "model": {"preset": "nano", "n_layer": 3}}))
    assert size(load_config(sized)) == {**MODEL_PRESETS["nano"], "n_layer": 3}


def test_nas_train_with_a_preset_override_trains_the_presets_size(sized, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["train", str(sized), "--out", str(out), "--no-progress",
                 "--set", "model.preset=pico"]) == 0, capsys.readouterr().err
    assert size(load_config(out / "config.yaml")) == PICO


def test_a_preset_override_replaces_the_size_a_studys_base_and_space_name(tmp_path):
    # the base names d_model, n_head and seq_len; the space searches n_layer
    spec = load_spec(write_spec(tmp_path), sets=["model.preset=pico"])
    assert all(size(cfg) == PICO for cfg in draw_configs(spec, "test"))


# --warm-start NAME


def earlier_study(url: str) -> None:
    """A finished study 'cpu' with one completed trial inside write_spec's space."""
    study = optuna.create_study(study_name="cpu", storage=url, directions=["minimize"] * 2)
    params = {"model.n_layer": 2, "value_residual.mode": "vanilla"}
    study.add_trial(create_trial(
        params=params, values=[3.0, 50_000], user_attrs={"val_loss": 3.0, "n_params": 50_000},
        distributions={"model.n_layer": CategoricalDistribution([2, 3]),
                       "value_residual.mode": CategoricalDistribution(["vanilla"])}))


def test_a_warm_start_by_name_finds_the_study_in_its_default_storage(tmp_path, monkeypatch,
                                                                     capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    earlier_study("sqlite:///runs/cpu.db")  # where `nas search` puts a study named cpu
    spec = write_spec(tmp_path, name="warm", n_trials=1, baselines=False,
                      base={**TINY_BASE, "train": {**TINY_BASE["train"], "compile": False}})
    assert main(["search", str(spec), "--no-progress", "--warm-start", "cpu"]) == 0
    assert ("warm start: seeded 1 trial(s) from study 'cpu' in sqlite:///runs/cpu.db"
            in capsys.readouterr().out.splitlines())


def test_a_failed_warm_start_leaves_no_file(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    spec = write_spec(tmp_path, storage=None)  # its storage: runs/tiny.db, still to be made
    assert main(["search", str(spec), "--no-progress", "--warm-start", "nope"]) == 2
    err = capsys.readouterr().err
    assert err == ("nas search: error: warm start from 'nope': storage sqlite:///runs/tiny.db "
                   "does not exist; storage sqlite:///runs/nope.db does not exist\n")
    assert list(tmp_path.iterdir()) == [spec]
