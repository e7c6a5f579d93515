"""Bad input through the CLI's `main` (in-process: refusing input needs no real process): exit
status 2, one stderr line naming the file or option, the key and what is allowed, no traceback,
and the existing study's file unchanged byte for byte. A storage file the command may not read
or write is refused by a real process (as root, one running as `nobody`: root may read and
write any file)."""

import contextlib
import math
import os
import pwd
import resource
import shutil
import signal
import sqlite3
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from nas.cli import main
from nas.config import dump_config
from nas.errors import ConfigError
from nas.model.decoder import build_model
from nas.parsing import first_non_finite
from nas.search.spec import load_spec
from nas.search.worker import run_search
from nas.training.data import SHARD_HEADER_INTS, SHARD_MAGIC, write_shard
from nas.training.trained_run import load_run
from tests.helpers import TINY_BASE, env_for_cli, free_port, nas_cmd, tiny

SPACE = {"model": {"n_layer": [2, 3]},
         "value_residual": {"mode": ["vanilla", "resformer"], "lambda1": {"low": 0.2,
                                                                          "high": 2.0}}}


# a named-variant sweep: variants, a sqrt(2)-spaced learning-rate grid and seeds
SWEEP_SPACE = {**SPACE, "variants": {"vanilla": {"mode": "vanilla"}},
               "train": {"lr": [0.001, 0.0014, 0.002], "seed": [0, 1]}}


def spec_dict(tmp_path, **overrides):
    spec = {"name": "held", "space": SPACE, "objectives": ["val_loss", "n_params"],
            "n_trials": 1, "storage": f"sqlite:///{tmp_path}/held.db", "base": TINY_BASE}
    return {**spec, **overrides}


@pytest.fixture(scope="module")
def held(tmp_path_factory):
    """A stored study with one finished trial, which no bad input may change."""
    tmp_path = tmp_path_factory.mktemp("held")
    path = tmp_path / "held.yaml"
    path.write_text(yaml.safe_dump(spec_dict(tmp_path)))
    run_search(load_spec(path), progress=False, echo=lambda *_: None)
    # Everything into the database file: a reader's last close then has nothing to write there.
    with contextlib.closing(sqlite3.connect(tmp_path / "held.db")) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "corpus.txt").write_text("a corpus of some bytes to train on. " * 200)
    (tmp_path / "space.yaml").write_text(yaml.safe_dump({"model": {"d_modle": [32]}}))
    (tmp_path / "dup-space.yaml").write_text("model: {n_layer: [2]}\nmodel: {n_layer: [3]}\n")
    # run folders whose model.pt is no state dict: a pickle that would run code, and noise
    for name, write in (("pickled", lambda p: torch.save({"w": RunsCode()}, p)),
                        ("garbage", lambda p: p.write_bytes(np.random.default_rng(0).bytes(4096)))):
        (tmp_path / name).mkdir()
        dump_config(tiny(n_layer=2), tmp_path / name / "config.yaml")
        write(tmp_path / name / "model.pt")
    # Shard folders whose second shard only is bad: every shard is checked, not the first.
    for defect, fields in SHARD_DEFECTS.items():
        (tmp_path / defect).mkdir()
        write_shard(tmp_path / defect / "a.bin", TOKENS)
        bad_shard(tmp_path / defect / "b.bin", **fields)
    return tmp_path


class RunsCode:
    """Pickled, it would call a function when loaded: what weights_only must refuse."""

    def __reduce__(self):
        return (os.getpid, ())


TOKENS = np.arange(2000) % 200  # ids below the default vocab_size 256
SHARD_DEFECTS = {"magic": {"magic": 12345}, "short": {"header_ints": 25},
                 "negative": {"count": -5}, "overlong": {"count": 10**6},
                 "vocab": {"tokens": np.append(TOKENS, 300)}}


def bad_shard(path: Path, magic: int = SHARD_MAGIC, count: int | None = None,
              header_ints: int = SHARD_HEADER_INTS, tokens: np.ndarray = TOKENS) -> None:
    """A nanoGPT .bin shard with one field wrong (`write_shard` writes right ones)."""
    header = np.zeros(SHARD_HEADER_INTS, dtype=np.int32)
    header[:3] = magic, 1, len(tokens) if count is None else count
    body = tokens.astype(np.uint16).tobytes() if header_ints == SHARD_HEADER_INTS else b""
    path.write_bytes(header[:header_ints].tobytes() + body)


def snapshot(folder: Path) -> dict[str, bytes]:
    """The stored study byte for byte: the database and a write-ahead log not yet in it (the
    -shm file is SQLite's index of that log, no data)."""
    return {p.name: p.read_bytes() for p in sorted(folder.glob("held.db*"))
            if not p.name.endswith("-shm") and p.stat().st_size}


# A billion values from ten lines: each list repeats the one before ten times.
BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{b}: &{b} [{', '.join([f'*{a}'] * 10)}]\n"
    for a, b in zip("abcdefgh", "bcdefghi", strict=True))
SET_BOMB = "[&a [1,1,1,1,1,1,1,1,1,1], " + ", ".join(
    f"&{b} [{','.join([f'*{a}'] * 10)}]" for a, b in zip("abcde", "bcdef", strict=True)) + "]"


def raw(text):
    return ("raw", text)


def at(path):
    """The command's first argument is this path (a run folder), no spec written."""
    return ("at", path)


def spec(**overrides):
    return ("spec", overrides)


def base(section, key, value):
    return spec(base={**TINY_BASE, section: {**TINY_BASE.get(section, {}), key: value}})


def space(**sections):
    return spec(space={**SPACE, **sections})


# (case id, command, spec file content, extra arguments, fragments the one line must hold)
CASES = [
    ("malformed-yaml", "search", raw("name: x\nspace: {model: [2, 3\n"), [],
     ["study.yaml", "malformed YAML", "line"]),
    ("spec-unknown-key", "search", spec(n_trails=5), [],
     ["study.yaml", "n_trails", "unknown key", "allowed:", "n_trials"]),
    ("space-unknown-key", "search", space(model={"d_modle": [32, 64]}), [],
     ["study.yaml", "model.d_modle", "unknown key", "allowed:"]),
    ("space-file-unknown-key", "search", spec(space="space.yaml"), [],
     ["space.yaml", "model.d_modle", "unknown key"]),
    ("config-unknown-key", "search", base("train", "stepz", 5), [],
     ["study.yaml", "train.stepz", "unknown key", "allowed:"]),
    ("config-wrong-type", "search", base("train", "steps", "many"), [],
     ["study.yaml", "train.steps", "expected int"]),
    ("spec-wrong-type", "search", spec(n_trials="ten"), [],
     ["study.yaml", "n_trials", "positive integer"]),
    ("replicates-zero", "search", spec(replicates=0), [],
     ["study.yaml: replicates: must be an integer in 1..16", "got 0"]),
    ("replicates-with-an-lr-sweep", "search",
     spec(replicates=2, sampler={"type": "bruteforce"}, space=SWEEP_SPACE), [],
     ["study.yaml: replicates: an lr sweep trains each seed of train.seed"]),
    ("replicates-changed-on-resume", "search", spec(replicates=2), [],
     ["study.yaml: replicates: the stored study 'held' has 1, the spec 2"]),
    ("spec-empty-name", "search", spec(name=""), [],
     ["study.yaml: name: must be a non-empty string"]),
    ("spec-artifacts-wrong-type", "search", spec(artifacts=5), [],
     ["study.yaml: artifacts: expected str | None, got 5"]),
    ("heartbeat-zero-interval", "search", spec(heartbeat={"interval": 0}), [],
     ["study.yaml: heartbeat.interval: must be an integer in 1..1000000", "got 0"]),
    ("multi-objective-median", "search", spec(pruner={"type": "median"}), [],
     ["study.yaml: pruner.type: Optuna cannot prune multi-objective studies"]),
    ("unknown-preset", "train", raw(yaml.safe_dump({"model": {"preset": "huge"}})), [],
     ["study.yaml: model.preset: unknown preset 'huge'; allowed: pico, nano"]),
    ("heartbeat-unknown-key", "search", spec(heartbeat={"intervall": 1}), [],
     ["study.yaml", "heartbeat.intervall", "allowed: interval, grace_period, max_retry"]),
    ("unknown-sampler", "search", spec(sampler={"type": "cmaes"}), [],
     ["study.yaml", "sampler.type", "tpe"]),
    ("impossible-shape", "search", space(model={"n_layer": [2], "n_head": [3]}), [],
     ["study.yaml", "model.n_head", "does not divide d_model=32"]),
    ("layer-out-of-range", "search",
     space(model={"n_layer": [2]}, value_residual={"mode": ["resformer"], "layers": [5]}), [],
     ["study.yaml", "value_residual.layers", "out of range", "allowed 1..1"]),
    ("layer-zero", "search",
     space(model={"n_layer": [2]}, value_residual={"mode": ["resformer"], "layers": [0, 1]}),
     [], ["study.yaml", "value_residual.layers", "layer 0 is the source"]),
    ("value-embeddings-over-half", "train",
     raw("model: {n_layer: 4}\nvalue_residual: {mode: ve_unet, value_embeddings: 3}\n"), [],
     ["study.yaml: value_residual.value_embeddings: must be at most half of model.n_layer "
      "(4 // 2 = 2)", "got 3"]),
    ("value-embeddings-over-half-in-a-space", "search",
     space(model={"n_layer": [2, 3]},
           value_residual={"mode": ["ve_unet_gated"], "value_embeddings": [1, 2]}), [],
     ["study.yaml (a draw from the space)", "value_residual.value_embeddings", "at most half"]),
    ("no-value-embeddings", "train", raw("value_residual: {mode: ve_unet, value_embeddings: 0}\n"),
     [], ["study.yaml: value_residual.value_embeddings: must be > 0, got 0"]),
    ("devices-in-a-study", "search", base("train", "devices", 2), [],
     ["study.yaml", "train.devices", "one `nas search` worker per GPU"]),
    ("missing-spec-file", "search", None, [], ["nope.yaml", "file not found"]),
    ("missing-space-file", "search", spec(space="nope-space.yaml"), [],
     ["nope-space.yaml", "file not found"]),
    ("missing-data-file", "search", spec(), ["--data", "/no/such/corpus.txt"],
     ["data.source", "/no/such/corpus.txt",
      "not 'builtin', 'builtin-prose', a file or a .bin glob"]),
    ("empty-data-file", "search", spec(), ["--data", "{tmp}/empty.txt"],
     ["empty.txt", "data.source", "empty"]),
    ("unknown-storage-scheme", "search", spec(), ["--storage", "redis://127.0.0.1/0"],
     ["--storage", "unknown storage scheme 'redis:'", "allowed: sqlite:///PATH"]),
    ("spec-unknown-storage-scheme", "search", spec(storage="mongodb://x/y"), [],
     ["study.yaml: storage", "unknown storage scheme 'mongodb:'"]),
    ("unreachable-postgres", "search", spec(),
     ["--storage", "postgresql+psycopg://nas:secret@127.0.0.1:{port}/nas"],
     ["--storage", "cannot open", "127.0.0.1:{port}", "***"]),
    ("negative-n-trials", "search", spec(), ["--n-trials", "-3"], ["--n-trials", ">= 1", "-3"]),
    ("zero-timeout", "search", spec(), ["--timeout", "0"], ["--timeout", "> 0"]),
    ("negative-worker-id", "search", spec(), ["--worker-id", "-1"], ["--worker-id", ">= 0"]),
    ("objectives-mismatch", "search", spec(objectives=["val_loss"]), [],
     ["study.yaml", "objectives", "'held'", "['val_loss', 'n_params']"]),
    ("space-changed", "search", space(model={"n_layer": [2, 4]}), [],
     ["study.yaml", "model.n_layer", "differs from the stored study 'held'"]),
    ("train-unknown-key", "train", raw(yaml.safe_dump({"model": {"d_modle": 32}})), [],
     ["study.yaml", "model.d_modle", "unknown key"]),
    ("train-missing-data", "train", raw(yaml.safe_dump({"model": {"n_layer": 2}})),
     ["--data", "/no/such/corpus.txt"], ["data.source", "/no/such/corpus.txt"]),
    # budgets, test splits and learning-rate grids (sound maps)
    ("budget-two-keys", "train",
     raw(yaml.safe_dump({"train": {"steps": 10, "tokens_per_param": 20}})), [],
     ["study.yaml", "train.tokens_per_param", "give one of steps, tokens, tokens_per_param"]),
    ("budget-zero-ratio", "train", raw(yaml.safe_dump({"train": {"tokens_per_param": 0}})),
     [], ["study.yaml", "train.tokens_per_param", "must be > 0 and finite"]),
    ("budget-nan-ratio", "train", raw("train: {tokens_per_param: .nan}\n"), [],
     ["study.yaml", "train.tokens_per_param", "must be > 0 and finite, got nan"]),
    ("budget-infinite-ratio", "train", raw("train: {tokens_per_param: .inf}\n"), [],
     ["study.yaml", "train.tokens_per_param", "must be > 0 and finite, got inf"]),
    ("budget-negative-tokens", "search",
     spec(base={**TINY_BASE, "train": {**{k: v for k, v in TINY_BASE["train"].items()
                                          if k != "steps"}, "tokens": -5}}), [],
     ["study.yaml", "train.tokens", "must be > 0 and finite"]),
    ("test-fraction-leaves-no-training", "train",
     raw(yaml.safe_dump({"data": {"val_fraction": 0.5, "test_fraction": 0.5}})), [],
     ["study.yaml", "data.test_fraction", "leaves no training data"]),
    ("test-fraction-negative", "train", raw(yaml.safe_dump({"data": {"test_fraction": -0.1}})),
     [], ["study.yaml", "data.test_fraction", "must be in [0, 1)"]),
    ("test-fraction-with-test-source", "train",
     raw(yaml.safe_dump({"data": {"test_fraction": 0.1, "test_source": "x.txt"}})), [],
     ["study.yaml", "data.test_fraction", "must be 0 (or unset) with a data.test_source"]),
    ("test-source-overlaps-training", "train",
     raw("model: {n_layer: 2}\n"
         "data: {source: '{tmp}/corpus.txt', test_source: '{tmp}/corpus.txt'}\n"),
     [], ["data.test_source", "corpus.txt", "also a training file"]),
    ("lr-grid-of-one", "search",
     space(variants={"vanilla": {"mode": "vanilla"}}, train={"lr": [0.003]}), [],
     ["study.yaml", "train.lr", "at least 2 values"]),
    ("lr-sweep-unknown", "search", spec(lr_sweep="every_seed"), [],
     ["study.yaml", "lr_sweep.protocol", "all_seeds, crossfit, first_seed"]),
    ("lr-sweep-without-seeds", "search",
     spec(lr_sweep="first_seed", sampler={"type": "bruteforce"},
          space={**SPACE, "variants": {"vanilla": {"mode": "vanilla"}},
                 "train": {"lr": [0.001, 0.003]}}), [],
     ["study.yaml", "train.seed", "first_seed needs a list of at least 2 seeds"]),
    ("lr-sweep-needs-bruteforce", "search",
     spec(lr_sweep="first_seed",
          space={**SPACE, "variants": {"vanilla": {"mode": "vanilla"}},
                 "train": {"lr": [0.001, 0.003], "seed": [0, 1]}}), [],
     ["study.yaml", "sampler.type", "first_seed needs bruteforce"]),
    # the learning-rate protocols of a sweep (nas.search.lr_sweep)
    *((f"lr-sweep-{name}", "search", spec(**{"sampler": {"type": "bruteforce"},
                                              "space": SWEEP_SPACE, **kw}), [], expected)
      for name, kw, expected in (
          ("extend-negative", {"lr_sweep": {"extend": -1}},
           ["study.yaml", "lr_sweep.extend", "an integer in 0..8", "got -1"]),
          ("extend-too-far", {"lr_sweep": {"protocol": "crossfit", "extend": 9}},
           ["study.yaml", "lr_sweep.extend", "an integer in 0..8", "got 9"]),
          ("unknown-key", {"lr_sweep": {"protocol": "crossfit", "halving": 0.5}},
           ["study.yaml", "lr_sweep.halving", "unknown key", "protocol, extend"]),
          ("not-a-mapping", {"lr_sweep": 5},
           ["study.yaml", "lr_sweep", "all_seeds, crossfit, first_seed or a mapping"]),
          ("crossfit-one-seed", {"lr_sweep": "crossfit",
                                 "space": {**SWEEP_SPACE, "train": {**SWEEP_SPACE["train"],
                                                                    "seed": [0]}}},
           ["study.yaml", "train.seed", "crossfit needs a list of at least 2 seeds"]),
          ("crossfit-needs-bruteforce", {"lr_sweep": "crossfit", "sampler": {"type": "tpe"}},
           ["study.yaml", "sampler.type", "crossfit needs bruteforce"]),
          ("coarse-grid", {"space": {**SWEEP_SPACE, "train": {**SWEEP_SPACE["train"],
                                                             "lr": [0.001, 0.002, 0.004]}}},
           ["study.yaml", "train.lr", "at most sqrt(2) apart", "2x"]),
          ("extend-uneven-grid", {"lr_sweep": {"protocol": "first_seed", "extend": 1},
                                  "space": {**SWEEP_SPACE, "train": {
                                      **SWEEP_SPACE["train"], "lr": [0.001, 0.0014, 0.0028]}}},
           ["study.yaml", "train.lr", "lr_sweep.extend needs a geometric grid"]),
      )),
    ("curve-batches-zero", "train", raw(yaml.safe_dump({"train": {"curve_batches": 0}})), [],
     ["study.yaml", "train.curve_batches", "must be > 0"]),
    ("export-unknown-study", "export", spec(name="other"), ["--pareto", "--out", "{tmp}/x"],
     ["study.yaml: name", "no study 'other'", "held"]),
    ("report-unknown-study", "report", spec(name="other"), ["--out", "{tmp}/r.html"],
     ["study.yaml: name", "no study 'other'"]),
    ("dashboard-unknown-study", "dashboard", spec(name="other"), ["--port", "0"],
     ["study.yaml: name", "no study 'other'"]),
    # nan and inf, anywhere
    ("nan-in-a-config", "train", raw("value_residual: {mode: resformer, lambda1: .nan}\n"), [],
     ["study.yaml", "value_residual.lambda1", "must be a finite number, got nan"]),
    ("inf-in-the-base", "search", base("model", "rope_theta", float("inf")), [],
     ["study.yaml: base: model.rope_theta: must be finite, got inf"]),
    ("nan-grad-clip", "train", raw("train: {grad_clip: .nan}\n"), [],
     ["study.yaml", "train.grad_clip", "finite, got nan"]),
    ("nan-among-choices", "search", space(train={"lr": [0.003, float("nan")]}), [],
     ["study.yaml: space: train.lr: must be finite, got nan"]),
    ("inf-range-end", "search",
     space(value_residual={"mode": ["resformer"], "lambda1": {"low": 0.2, "high": float("inf")}}),
     [], ["study.yaml: space: value_residual.lambda1: must be finite, got inf"]),
    ("nan-pruner-option", "search", spec(pruner={"type": "pareto", "margin": float("nan")}), [],
     ["study.yaml: pruner.margin: must be finite, got nan"]),
    ("inf-sampler-option", "search",
     spec(sampler={"type": "tpe", "n_startup_trials": float("inf")}), [],
     ["study.yaml: sampler.n_startup_trials: must be finite, got inf"]),
    # every numeric key in its range
    ("negative-grad-clip", "train", raw("train: {grad_clip: -1.0}\n"), [],
     ["study.yaml: train.grad_clip: must be >= 0, got -1.0"]),
    ("zero-norm-eps", "train", raw("model: {norm_eps: 0.0}\n"), [],
     ["study.yaml: model.norm_eps: must be in (0, 1), got 0.0"]),
    ("norm-eps-one", "search", base("model", "norm_eps", 1.0), [],
     ["study.yaml", "model.norm_eps", "must be in (0, 1), got 1.0"]),
    ("negative-rope-theta", "train", raw("model: {rope_theta: -1.0}\n"), [],
     ["study.yaml: model.rope_theta: must be > 0"]),
    ("negative-train-seed", "search", base("train", "seed", -1), [],
     ["study.yaml", "train.seed", "must be in [0, 4294967296), got -1"]),
    ("negative-spec-seed", "search", spec(seed=-1), [],
     ["study.yaml: seed: must be an integer in 0..2147483647, got -1"]),
    ("unknown-precision", "train", raw("train: {precision: fp8}\n"), [],
     ["study.yaml", "train.precision", "unknown"]),
    # a model too big for the memory it would train in
    ("model-over-memory", "train", raw("model: {n_layer: 64, d_model: 65536, n_head: 64}\n"),
     [], ["study.yaml: model: training it needs about", "GiB", "--force"]),
    ("space-over-memory", "search", base("model", "d_model", 65536), [],
     ["study.yaml (a draw from the space): model:", "GiB", "--force"]),
    ("force-skips-the-memory-check", "train",
     raw("model: {n_layer: 64, d_model: 65536, n_head: 64}\n"),
     ["--force", "--data", "/no/such/corpus.txt", "--out", "{tmp}/forced"],
     ["data.source", "/no/such/corpus.txt"]),  # the next check refuses it
    # data paths and shards
    ("data-path-a-folder", "search", spec(), ["--data", "{tmp}/magic"],
     ["magic: data.source: a folder", "magic/*.bin"]),
    ("train-data-path-a-folder", "train", raw("model: {n_layer: 2}\n"), ["--data", "{tmp}"],
     ["data.source: a folder"]),
    ("shard-wrong-magic", "search", spec(), ["--data", "{tmp}/magic/*.bin"],
     ["magic/b.bin: data.source: not a nanoGPT .bin shard", "12345", "20240520"]),
    ("shard-short-header", "search", spec(), ["--data", "{tmp}/short/*.bin"],
     ["short/b.bin: data.source: a short header (100 bytes)", "1024-byte header"]),
    ("shard-negative-count", "search", spec(), ["--data", "{tmp}/negative/*.bin"],
     ["negative/b.bin: data.source", "between 1 and the 2000 tokens", "got -5"]),
    ("shard-count-beyond-the-file", "search", spec(), ["--data", "{tmp}/overlong/*.bin"],
     ["overlong/b.bin: data.source", "2000 tokens the file holds, got 1000000"]),
    ("shard-ids-beyond-the-vocab", "search", spec(), ["--data", "{tmp}/vocab/*.bin"],
     ["vocab/b.bin: model.vocab_size: 256", "token id 300"]),
    ("train-shard-ids-beyond-the-vocab", "train", raw("model: {n_layer: 2}\n"),
     ["--data", "{tmp}/vocab/*.bin"], ["vocab/b.bin: model.vocab_size: 256", "token id 300"]),
    # study names that would make paths or URLs
    ("name-with-a-slash", "search", spec(name="runs/held"), [],
     ["study.yaml: name: must be letters, digits", "got 'runs/held'"]),
    ("name-with-dot-dot", "search", spec(name="a..b"), [], ["study.yaml: name:", "no '..'"]),
    ("name-dot-dot-only", "export", spec(name=".."), ["--pareto", "--out", "{tmp}/x"],
     ["study.yaml: name:", "got '..'"]),
    ("name-with-a-question-mark", "search", spec(name="held?mode=rw"), [],
     ["study.yaml: name:", "URLs"]),
    ("name-with-a-hash", "report", spec(name="held#1"), ["--out", "{tmp}/r.html"],
     ["study.yaml: name:", "got 'held#1'"]),
    ("name-with-a-space", "dashboard", spec(name="my study"), ["--port", "0"],
     ["study.yaml: name:", "got 'my study'"]),
    # empty files
    ("empty-spec-file", "search", raw(""), [],
     ["study.yaml: the file is empty; a study spec needs at least name and space"]),
    ("empty-space-file", "search", spec(space="empty.txt"), [],
     ["empty.txt: a search space must be a mapping"]),
    # a resume that would mix measurements (the study's fingerprint)
    ("data-changed", "search", spec(), ["--data", "{tmp}/corpus.txt"],
     ["study.yaml: data.source", "corpus.txt", "differ from those the stored study 'held'"]),
    ("base-changed", "search", base("train", "steps", 13), [],
     ["study.yaml: train.steps: differs from the stored study 'held'"]),
    ("max-params-changed", "search", spec(max_params=10**6), [],
     ["study.yaml: max_params: the stored study 'held' has None, the spec 1000000"]),
    # parsing within bounds: alias bombs, nesting, duplicate keys, integers beyond 64 bits, size
    ("alias-bomb-in-a-config", "train", raw(BOMB), [], ["study.yaml: line 5", "alias bomb"]),
    ("alias-bomb-in-a-space", "search",
     raw(f"name: held\n{BOMB}space: {{model: {{n_layer: *i}}}}\n"), [], ["alias bomb"]),
    ("alias-bomb-in-a-set", "train", raw("model: {n_layer: 2}\n"),
     ["--set", f"train.lr={SET_BOMB}"], ["--set train.lr=", "alias bomb"]),
    ("recursive-alias", "search", raw("name: held\nspace: &s {model: *s}\n"), [],
     ["study.yaml: line 2", "recursive alias"]),
    ("deep-nesting-in-a-config", "train", raw("model: " + "[" * 3000 + "]" * 3000 + "\n"), [],
     ["study.yaml: line 1", "nested more than 32"]),
    ("deep-nesting-in-a-set", "train", raw("model: {n_layer: 2}\n"),
     ["--set", "train.lr=" + "[" * 3000 + "]" * 3000], ["--set train.lr=", "nested more than 32"]),
    ("duplicate-key-in-a-spec", "search", raw("name: held\nspace: {model: {n_layer: [2]}}\n"
                                               "name: other\n"), [],
     ["study.yaml: line 3, column 1: duplicate key 'name' (first at line 1)"]),
    ("duplicate-key-in-a-section", "train", raw("train: {lr: 0.1, steps: 5, lr: 0.2}\n"), [],
     ["study.yaml: line 1", "duplicate key 'lr'"]),
    ("duplicate-key-in-a-space-file", "search", spec(space="dup-space.yaml"), [],
     ["dup-space.yaml: line 2", "duplicate key 'model'"]),
    ("integer-beyond-64-bits-in-a-set", "train", raw("model: {n_layer: 2}\n"),
     ["--set", "model.n_layer=12345678901234567890123"],
     ["--set model.n_layer=12345678901234567890123", "out of range", "64 bits"]),
    ("integer-beyond-64-bits-in-a-spec", "search",
     raw("name: held\nn_trials: 99999999999999999999\nspace: {model: {n_layer: [2]}}\n"), [],
     ["study.yaml: line 2", "out of range"]),
    ("integer-of-5000-digits", "train", raw("train: {steps: " + "9" * 5000 + "}\n"), [],
     ["study.yaml: line 1", "(5,000 characters) is out of range"]),
    ("n-layer-beyond-its-field", "train", raw("model: {n_layer: 2}\n"),
     ["--set", "model.n_layer=1000000000000000"], ["--set: model.n_layer: must be in (0, 1024]"]),
    ("heartbeat-beyond-its-field", "search", spec(heartbeat={"interval": 10**12}), [],
     ["study.yaml: heartbeat.interval: must be an integer in 1..1000000"]),
    ("max-time-beyond-its-field", "train", raw("train: {max_time: 1.0e+300}\n"), [],
     ["study.yaml: train.max_time: must be in (0, 1000000000.0]"]),
    ("a-30000-element-value-is-quoted-short", "search", spec(n_trials=list(range(30000))), [],
     ["study.yaml: n_trials: must be a positive integer, got [0, 1, 2", "characters)"]),
    ("a-long-string-is-quoted-short", "train", raw("train: {precision: " + "x" * 30000 + "}\n"),
     [], ["study.yaml: train.precision", "characters)"]),
    ("a-file-over-the-size-limit", "search", raw("# " + "x" * (1 << 20) + "\nname: held\n"), [],
     ["study.yaml:", "more than the 1,048,576"]),
    # output paths, checked before any work
    ("train-out-is-a-file", "train", raw("model: {n_layer: 2}\n"), ["--out", "{tmp}/empty.txt"],
     ["--out: {tmp}/empty.txt is a file, not a folder"]),
    ("train-out-under-a-file", "train", raw("model: {n_layer: 2}\n"),
     ["--out", "{tmp}/empty.txt/run"], ["--out", "empty.txt is a file, so nothing can be created"]),
    ("train-out-name-too-long", "train", raw("model: {n_layer: 2}\n"),
     ["--out", "{tmp}/" + "r" * 250], ["--out", "bytes, longer than the 255"]),
    ("train-out-empty", "train", raw("model: {n_layer: 2}\n"), ["--out", ""],
     ["argument --out: must be non-empty"]),
    ("report-out-is-a-folder", "report", spec(), ["--out", "{tmp}"],
     ["--out: {tmp} is a folder; name the file to write"]),
    ("report-out-under-a-file", "report", spec(), ["--out", "{tmp}/empty.txt/r.html"],
     ["--out", "is a file, so nothing can be created under it"]),
    ("export-out-is-a-file", "export", spec(), ["--pareto", "--out", "{tmp}/empty.txt"],
     ["--out: {tmp}/empty.txt is a file, not a folder"]),
    ("export-out-under-a-file", "export", spec(), ["--best", "1", "--out", "{tmp}/empty.txt/x"],
     ["--out", "is a file, so nothing can be created under it"]),
    ("export-hf-out-is-a-file", "export", at("{tmp}/pickled"),
     ["--hf", "--out", "{tmp}/empty.txt"], ["--out: {tmp}/empty.txt is a file, not a folder"]),
    ("prepare-out-is-a-file", "prepare", raw("some text\n" * 50),
     ["--vocab-size", "300", "--out", "{tmp}/empty.txt"], ["--out", "is a file, not a folder"]),
    ("prepare-out-under-a-file", "prepare", raw("some text\n" * 50),
     ["--vocab-size", "300", "--out", "{tmp}/empty.txt/c"], ["--out", "nothing can be created"]),
    ("study-name-too-long-for-its-storage-file", "search", spec(name="n" * 250, storage=None), [],
     ["study.yaml: storage", "runs/nnnn", "longer than the 255"]),
    ("artifacts-under-a-file", "search", spec(name="fresh", artifacts="{tmp}/empty.txt/a",
                                              storage="sqlite:///{tmp}/fresh.db"), [],
     ["study.yaml: artifacts", "is a file, so nothing can be created under it"]),
    ("storage-under-a-file", "search", spec(name="fresh"),
     ["--storage", "sqlite:///{tmp}/empty.txt/x.db"], ["--storage", "is a file, so nothing"]),
    ("journal-is-a-folder", "search", spec(name="fresh"), ["--storage", "journal:{tmp}"],
     ["--storage: {tmp} is a folder; name the file to write"]),
    ("storage-empty", "search", spec(), ["--storage", ""],
     ["argument --storage: must be non-empty"]),
    ("data-empty", "train", raw("model: {n_layer: 2}\n"), ["--data", ""],
     ["argument --data: must be non-empty"]),
    # every numeric flag in its range: nan and inf nowhere, seeds and ids within numpy's reach
    ("timeout-nan", "search", spec(), ["--timeout", "nan"],
     ["argument --timeout: must be > 0 and finite, got nan"]),
    ("timeout-inf", "search", spec(), ["--timeout", "inf"], ["--timeout", "finite, got inf"]),
    ("worker-id-beyond-2-to-the-31", "search", spec(), ["--worker-id", str(2**32)],
     ["argument --worker-id: must be <= 2147483647, got 4294967296"]),
    ("n-trials-beyond-64-bits", "search", spec(), ["--n-trials", "1" + "0" * 30],
     ["argument --n-trials: must be <= 9223372036854775807"]),
    ("n-trials-not-a-number", "search", spec(), ["--n-trials", "ten"],
     ["argument --n-trials: expected a whole number, got 'ten'"]),
    ("threads-zero", "search", spec(), ["--threads", "0"], ["argument --threads: must be >= 1"]),
    ("max-new-tokens-beyond-its-cap", "generate", at("{tmp}/pickled"),
     ["--prompt", "x", "--max-new-tokens", "1000000000000"],
     ["argument --max-new-tokens: must be <= 100000"]),
    ("generate-seed-negative", "generate", at("{tmp}/pickled"), ["--prompt", "x", "--seed", "-5"],
     ["argument --seed: must be >= 0, got -5"]),
    ("generate-temperature-inf", "generate", at("{tmp}/pickled"),
     ["--prompt", "x", "--temperature", "inf"], ["--temperature: must be >= 0 and finite"]),
    ("dashboard-refresh-nan", "dashboard", spec(), ["--refresh", "nan"],
     ["argument --refresh: must be in [0, 1e+06] and finite, got nan"]),
    ("dashboard-port-beyond-65535", "dashboard", spec(), ["--port", "70000"],
     ["argument --port: must be <= 65535"]),
    ("prepare-val-fraction-nan", "prepare", raw("some text\n" * 50),
     ["--vocab-size", "300", "--val-fraction", "nan", "--out", "{tmp}/c"],
     ["argument --val-fraction", "finite, got nan"]),
    ("prepare-shard-tokens-beyond-int32", "prepare", raw("some text\n" * 50),
     ["--vocab-size", "300", "--shard-tokens", str(2**31), "--out", "{tmp}/c"],
     ["--shard-tokens: must be in 1..2147483647"]),
    ("export-best-zero", "export", spec(), ["--best", "0", "--out", "{tmp}/x"],
     ["argument --best: must be >= 1, got 0"]),
    # argparse's own refusals: one line
    ("unknown-flag", "search", spec(), ["--n-trails", "3"],
     ["nas: error: unrecognized arguments: --n-trails 3; see nas --help"]),
    ("missing-required-flag", "report", spec(), [],
     ["the following arguments are required: --out; see nas report --help"]),
    # storages that would keep nothing, and a refused warm start that must leave no file
    ("in-memory-storage", "search", spec(name="fresh"), ["--storage", "sqlite:///:memory:"],
     ["--storage: 'sqlite:///:memory:' is an in-memory database"]),
    ("in-memory-sqlite-url", "search", spec(name="fresh"), ["--storage", "sqlite://"],
     ["--storage: 'sqlite://' is an in-memory database"]),
    ("in-memory-spec-storage", "search", spec(name="fresh", storage="sqlite:///file::memory:"),
     [], ["study.yaml: storage", "in-memory database"]),
    ("warm-start-refused-leaves-no-storage", "search", spec(name="fresh"),
     ["--storage", "sqlite:///{tmp}/new/fresh.db", "--warm-start", "nosuch"],
     ["warm start from 'nosuch'"]),
    ("warm-start-refused-leaves-no-journal", "search", spec(name="fresh"),
     ["--storage", "journal:{tmp}/new/fresh.log", "--warm-start", "nosuch"],
     ["warm start from 'nosuch'"]),
    # a pickle posing as model.pt: refused unloaded, in one line
    ("pickle-model-generate", "generate", at("{tmp}/pickled"), ["--prompt", "x"],
     ["pickled/model.pt: not a state dict of tensors", "UnpicklingError"]),
    ("pickle-model-analyze", "analyze", at("{tmp}/pickled"), [],
     ["pickled/model.pt: not a state dict of tensors"]),
    ("pickle-model-export-hf", "export", at("{tmp}/pickled"), ["--hf", "--out", "{tmp}/hf"],
     ["pickled/model.pt: not a state dict of tensors"]),
    ("garbage-model-generate", "generate", at("{tmp}/garbage"), ["--prompt", "x"],
     ["garbage/model.pt: not a state dict of tensors"]),
    # a password in a query parameter or beside a masked one, in every error line
    ("query-password-search", "search", spec(),
     ["--storage", "postgresql+psycopg://nas@127.0.0.1:{port}/nas?password=secret"],
     ["--storage", "cannot open", "password=***"]),
    ("query-and-userinfo-password-export", "export", spec(),
     ["--pareto", "--out", "{tmp}/x", "--storage",
      "postgresql://nas:secret@127.0.0.1:{port}/nas?sslpassword=secret2&password=secret"],
     ["--storage", "nas:***@", "password=***"]),
    ("query-password-dashboard", "dashboard", spec(),
     ["--port", "0", "--storage", "postgresql://nas@127.0.0.1:{port}/nas?password=secret"],
     ["--storage", "password=***"]),
    ("warm-start-flag-password", "search", spec(),
     ["--warm-start", "bad name@postgresql://nas:secret@127.0.0.1/nas"],
     ["--warm-start", "nas:***@"]),
]


@pytest.mark.parametrize("command,content,extra,fragments", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_line_and_leaves_the_study(held, tmp_path, capsys, monkeypatch,
                                                              command, content, extra, fragments):
    monkeypatch.chdir(tmp_path)  # where a default runs/<name>.db would go
    path = tmp_path / "study.yaml"
    port = str(free_port())
    subs = {"{tmp}": str(held), "{port}": port}
    if content is None:
        path = tmp_path / "nope.yaml"
    elif content[0] == "at":
        path = Path(_sub(content[1], subs))
    elif content[0] == "raw":
        path.write_text(_sub(content[1], subs))
    else:
        # relative space files resolve next to the spec: keep the spec beside them
        path = held / "study.yaml"
        path.write_text(_sub(yaml.safe_dump(spec_dict(held, **content[1])), subs))
    extra = [_sub(a, subs) for a in extra]
    fragments = [_sub(f, subs) for f in fragments]
    before, files = snapshot(held), listing(held, tmp_path)
    assert before  # the study is there to compare
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    with bounded_time(120):  # in-process through the CLI's main: refusing needs no process
        code = main([command, str(path), *extra])
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert code == 2, out.err + out.out
    assert len(lines) == 1, out.err
    assert len(lines[0]) <= 1200, lines[0][:200]  # excerpts, never a whole value
    assert grown < 512 * 1024, f"peak memory grew by {grown // 1024} MiB"
    assert listing(held, tmp_path) == files  # no file left behind
    assert lines[0].startswith(f"nas {command}: error: ") or lines[0].startswith("nas: error: ")
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert "secret" not in out.err + out.out  # passwords never printed
    assert snapshot(held) == before


def listing(*folders: Path) -> set[str]:
    """Every file and folder under `folders`, less the stored study's own SQLite files (which
    reading opens; `snapshot` compares their content)."""
    return {str(p) for folder in folders for p in folder.rglob("*")
            if not p.name.startswith("held.db")}


@contextlib.contextmanager
def bounded_time(seconds: int):
    """A hang (an alias bomb walked, a billion tokens sampled) fails the case instead."""
    def expire(*_):
        raise TimeoutError(f"still running after {seconds} s")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _sub(text, subs):
    for key, value in subs.items():
        text = text.replace(key, value)
    return text


@pytest.mark.parametrize("command,mode,fragments", [
    ("search", 0o444, ["cannot write", "copy.db"]),
    ("search", 0o000, ["cannot read", "copy.db"]),
    ("report", 0o000, ["cannot read", "copy.db"]),
], ids=["read-only-storage", "unreadable-storage", "unreadable-storage-report"])
def test_a_storage_file_it_may_not_read_or_write_is_refused(held, command, mode, fragments):
    # Under /tmp itself, open to all: `nobody` must reach it (pytest's folders are private).
    folder = Path(tempfile.mkdtemp(prefix="nas-access-"))
    try:
        folder.chmod(0o755)
        copy = folder / "copy.db"
        shutil.copy(held / "held.db", copy)
        shutil.copy(held / "corpus.txt", folder / "corpus.txt")
        path = folder / "study.yaml"
        path.write_text(yaml.safe_dump(spec_dict(folder)))
        copy.chmod(mode)
        before, held_before = copy.read_bytes(), snapshot(held)
        writable = folder / "out"  # where `nobody` may write a report: the --out checked first
        writable.mkdir(mode=0o777)
        writable.chmod(0o777)
        extra = (["--data", str(folder / "corpus.txt"), "--no-progress"] if command == "search"
                 else ["--out", str(writable / "r.html")])
        argv = nas_cmd(command, str(path), "--storage", f"sqlite:///{copy}", *extra)
        if os.geteuid() == 0:
            nobody = pwd.getpwnam("nobody")
            argv = ["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}",
                    "--clear-groups", *argv]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=300,
                              env={**env_for_cli(), "HOME": str(folder),
                                   "RESFORMER_NAS_CACHE": str(folder / "cache")})
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2, proc.stderr + proc.stdout
        assert len(lines) == 1 and lines[0].startswith(f"nas {command}: error: --storage: ")
        for fragment in fragments:
            assert fragment in lines[0], (fragment, lines[0])
        assert copy.read_bytes() == before and snapshot(held) == held_before
    finally:
        shutil.rmtree(folder)


def test_the_nan_walk_visits_a_shared_value_once():
    # 2**60 paths through 60 lists that each hold the one below twice: walked path by path it
    # would never end (a YAML alias bomb the loader did not bound would be such a value)
    shared = [1.0]
    for _ in range(60):
        shared = [shared, shared]
    assert first_non_finite({"train": {"lr": shared}}) is None
    shared.append(float("nan"))
    assert math.isnan(first_non_finite({"train": {"lr": shared}}))


def test_any_noise_or_truncation_in_model_pt_is_refused_in_one_line(tmp_path):
    # the unpickler fails on noise in whichever of its types the bytes lead it to (IndexError,
    # KeyError, UnicodeDecodeError...): every one must come out as the one refusal
    cfg = tiny(n_layer=2)
    dump_config(cfg, tmp_path / "config.yaml")
    torch.save(build_model(cfg).state_dict(), tmp_path / "whole.pt")
    whole = (tmp_path / "whole.pt").read_bytes()
    rng = np.random.default_rng(20261207)
    defects = [rng.bytes(int(rng.integers(1, 8192))) for _ in range(300)]
    defects += [whole[:n] for n in rng.integers(1, len(whole), 50)]
    for defect in defects:
        (tmp_path / "model.pt").write_bytes(defect)
        with pytest.raises(ConfigError, match="model.pt: ") as info:
            load_run(tmp_path)
        assert "\n" not in str(info.value)
    (tmp_path / "model.pt").write_bytes(whole)
    assert load_run(tmp_path)[0] == cfg  # the folder itself was sound
