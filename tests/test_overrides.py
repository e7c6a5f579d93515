"""`--set KEY=VALUE` on `nas train` and `nas search`: the overrides reach the stored config,
and a bad one is refused in the file's own one line, naming `--set`, with exit status 2."""

import optuna
import pytest
import yaml

from nas.cli import main
from nas.config import load_config
from tests.helpers import write_spec

CONFIG = {"model": {"n_layer": 2, "d_model": 32, "n_head": 2, "seq_len": 16},
          "value_residual": {"mode": "vanilla"},
          # compile: false, as every tiny run: compiling would only cost seconds here
          "train": {"steps": 4, "batch_size": 4, "eval_batches": 1, "lr": 3.0e-3,
                    "compile": False}}


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    return path


def test_nas_train_stores_the_config_with_its_overrides(tmp_path, config, capsys):
    out = tmp_path / "out"
    code = main(["train", str(config), "--out", str(out), "--set", "train.lr=1e-3",
                 "--set", "model.n_layer=3", "--set", "value_residual.mode=resformer",
                 "--set", "value_residual.layers=[2]", "--set", "train.lr=2e-3"])
    assert code == 0, capsys.readouterr().err
    stored = load_config(out / "config.yaml")
    assert stored.train.lr == 2e-3  # the later of two overrides of one key wins
    assert stored.model.n_layer == 3 and stored.value_residual.mode == "resformer"
    assert stored.value_residual.layers == [2]
    assert stored.model.d_model == 32 and stored.train.steps == 4  # the file's other keys


def test_an_exponent_without_a_dot_is_a_float_in_a_file_too(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train: {lr: 1e-3, weight_decay: 5E-2}\n")
    assert load_config(path).train.lr == 0.001 and load_config(path).train.weight_decay == 0.05


@pytest.mark.parametrize("override, file_section, expected", [
    ("train.lrr=1", {"train": {"lrr": 1}}, "train.lrr: unknown key; allowed: steps, tokens"),
    ("trian.lr=1", {"trian": {"lr": 1}}, "trian: unknown section; allowed: model"),
    ("train.lr=abc", {"train": {"lr": "abc"}}, "train.lr: expected float, got 'abc'"),
    ("train.lr=-1", {"train": {"lr": -1}}, "train.lr: must be > 0, got -1.0"),
    ("model.n_head=3", {"model": {"n_head": 3}}, "model.n_head: 3 does not divide d_model=32"),
])
def test_a_bad_override_gets_the_files_own_line_naming_set(tmp_path, config, capsys, override,
                                                           file_section, expected):
    code = main(["train", str(config), "--out", str(tmp_path / "out"), "--set", override])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"nas train: error: --set: {expected}"), err
    # the same key and value in the file: the same line, naming the file instead
    bad = tmp_path / "bad.yaml"
    section = next(iter(file_section))
    bad.write_text(yaml.safe_dump({**CONFIG, section: {**CONFIG.get(section, {}),
                                                       **file_section[section]}}))
    assert main(["train", str(bad), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == err.replace("--set:", f"{bad}:")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("override, fragment", [
    ("train.lr", "--set train.lr: expected KEY=VALUE with a dotted key, e.g. train.lr=1e-3"),
    ("train..lr=1", "--set train..lr=1: expected KEY=VALUE with a dotted key"),
    ("model.n_layer=[1,", "--set model.n_layer=[1,: malformed value"),
    ("train.lr.x=1", "--set: train.lr: is 0.003, not a mapping, so it has no key x"),
])
def test_a_malformed_override_is_one_line(tmp_path, config, capsys, override, fragment):
    assert main(["train", str(config), "--out", str(tmp_path / "out"), "--set", override]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"nas train: error: {fragment}") and err.count("\n") == 1, err


def test_nas_search_overrides_the_space_and_a_resume_must_repeat_them(tmp_path, capsys):
    spec = write_spec(tmp_path)  # searches model.n_layer in [2, 3]
    sets = ["--set", "model.n_layer=2", "--set", "train.steps=8", "--set", "train.compile=false"]
    assert main(["search", str(spec), "--n-trials", "2", "--no-progress", *sets]) == 0
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path}/tiny.db")
    assert study.user_attrs["space"]["model"]["n_layer"] == 2
    configs = [t.user_attrs["config"] for t in study.trials if "config" in t.user_attrs]
    assert configs and all(c["model"]["n_layer"] == 2 and c["train"]["steps"] == 8
                           for c in configs)
    capsys.readouterr()
    # resumed with other overrides, the study's space would change: refused before a trial
    # (tests/test_stored_overrides.py: what a resume without them does)
    assert main(["search", str(spec), "--n-trials", "1", "--no-progress",
                 "--set", "model.n_layer=3"]) == 2
    assert ("--set model.n_layer: study 'tiny' was searched with model.n_layer=2, here "
            "model.n_layer=3") in capsys.readouterr().err
    assert len(optuna.load_study(study_name="tiny",
                                 storage=f"sqlite:///{tmp_path}/tiny.db").trials) == len(
        study.trials)


def test_nas_search_refuses_a_bad_override_before_opening_the_storage(tmp_path, capsys):
    spec = write_spec(tmp_path)
    assert main(["search", str(spec), "--set", "train.lrr=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nas search: error: --set: train.lrr: unknown key; allowed: ")
    assert not (tmp_path / "tiny.db").exists()
