"""Bad input through the CLI's `main` (in-process: refusing input needs no real process): exit
status 2, one stderr line naming the file or option, the key and what is allowed, no traceback,
and the existing study untouched."""

import optuna
import pytest
import yaml

from nas.cli import main
from nas.search import run_search
from nas.spec import load_spec
from nas.storage import make_storage
from tests.helpers import TINY_BASE, free_port

SPACE = {"model": {"n_layer": [2, 3]},
         "value_residual": {"mode": ["vanilla", "resformer"], "lambda1": {"low": 0.2,
                                                                          "high": 2.0}}}


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
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "corpus.txt").write_text("a corpus of some bytes to train on. " * 200)
    (tmp_path / "space.yaml").write_text(yaml.safe_dump({"model": {"d_modle": [32]}}))
    return tmp_path


def snapshot(tmp_path):
    storage = make_storage(f"sqlite:///{tmp_path}/held.db")
    return [(name, [(t.number, t.state, t.values, t.params)
                    for t in optuna.load_study(study_name=name, storage=storage).trials])
            for name in optuna.get_all_study_names(storage)]


def raw(text):
    return ("raw", text)


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
    ("negative-n-trials", "search", spec(), ["--n-trials", "-3"], ["--n-trials", "> 0", "-3"]),
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
     ["study.yaml", "lr_sweep", "all_seeds, first_seed"]),
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
    ("export-unknown-study", "export", spec(name="other"), ["--pareto", "--out", "{tmp}/x"],
     ["study.yaml: name", "no study 'other'", "held"]),
    ("report-unknown-study", "report", spec(name="other"), ["--out", "{tmp}/r.html"],
     ["study.yaml: name", "no study 'other'"]),
    ("dashboard-unknown-study", "dashboard", spec(name="other"), ["--port", "0"],
     ["study.yaml: name", "no study 'other'"]),
]


@pytest.mark.parametrize("command,content,extra,fragments", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_line_and_leaves_the_study(held, tmp_path, capsys, command,
                                                              content, extra, fragments):
    path = tmp_path / "study.yaml"
    port = str(free_port())
    subs = {"{tmp}": str(held), "{port}": port}
    if content is None:
        path = tmp_path / "nope.yaml"
    elif content[0] == "raw":
        path.write_text(_sub(content[1], subs))
    else:
        # relative space files resolve next to the spec: keep the spec beside them
        path = held / "study.yaml"
        path.write_text(yaml.safe_dump(spec_dict(held, **content[1])))
    extra = [_sub(a, subs) for a in extra]
    fragments = [_sub(f, subs) for f in fragments]
    before = snapshot(held)
    try:  # in-process through the CLI's main: no real process is needed to refuse input
        code = main([command, str(path), *extra])
    except SystemExit as exc:  # argparse's own refusals
        code = exc.code
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert code == 2, out.err + out.out
    assert len(lines) == 1, out.err
    assert lines[0].startswith(f"nas {command}: error: ")
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert "secret" not in out.err + out.out  # passwords never printed
    assert snapshot(held) == before


def _sub(text, subs):
    for key, value in subs.items():
        text = text.replace(key, value)
    return text
