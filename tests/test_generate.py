"""Generation through the KV cache, the cache's size as an objective, and `nas generate`."""

import json
import sys

import optuna
import pytest
import torch
from optuna.trial import TrialState

from nas import build_model
from nas.cli import main
from nas.config import dump_config, from_dict, load_config
from nas.model.decoder import KVCache, count_params, kv_bytes_per_token, precision_dtype
from nas.search.trials import front
from tests.helpers import ALL, FAMILY, randomize_coefficients, tiny, write_spec


def model_for(mode, source="first_layer", layers="all", **kw):
    """A 4-layer model with its coefficients moved off their init; `layers` [1, 3] leaves a
    layer between two receiving ones."""
    torch.manual_seed(0)
    cfg = tiny(mode, source=source, layers=layers, n_layer=4, **kw)
    model = build_model(cfg).eval()
    randomize_coefficients(model)
    return cfg, model


def feed(model, cache, idx, chunks):
    """idx through the cache in pieces of the given lengths; the logits of every position."""
    with torch.no_grad():
        outs, at = [], 0
        for n in chunks:
            outs.append(model(idx[:, at:at + n], cache=cache))
            at += n
    return torch.cat(outs, dim=1)


# Every mode and source at two receiving sets: all layers, and [1, 3] (a layer between two
# receiving ones); the value-embedding family reads no `layers` but its number of tables: two
# (every one of the 4 layers reads one) and one (layers 0 and 3; 1 and 2 are vanilla).
PLANS = [(mode, source, {"layers": layers}) for mode, source in ALL if mode not in FAMILY
         for layers in ("all", [1, 3])]
PLANS += [(mode, "first_layer", {"value_embeddings": k}) for mode in FAMILY for k in (2, 1)]


@pytest.mark.parametrize("mode,source,plan", PLANS)
def test_cached_decoding_gives_the_logits_of_the_full_forward(mode, source, plan):
    cfg, model = model_for(mode, source, **plan)
    idx = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        full = model(idx)
    # a prompt, a chunk of three (the mask for queries after cached keys), then one at a time
    cached = feed(model, KVCache(model, 2, 16), idx, [4, 3] + [1] * 9)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("precision", ["32-true", "bf16-true", "bf16-mixed"])
@pytest.mark.parametrize("mode,source", ALL)
def test_the_cache_holds_kv_bytes_per_token_for_every_token(mode, source, precision):
    cfg, model = model_for(mode, source, layers=[1, 3], precision=precision)
    mixed = precision.endswith("-mixed")  # float32 weights, bf16 activations under autocast
    if not mixed:
        model.to(precision_dtype(precision))
    prompt, new = 5, 7
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mixed):
        cache = KVCache(model, 3, prompt + new)
        feed(model, cache, torch.randint(0, 256, (3, prompt + new)), [prompt] + [1] * new)
    assert cache.length == prompt + new
    assert cache.nbytes == 3 * (prompt + new) * kv_bytes_per_token(cfg)


@pytest.mark.parametrize("source", ["first_layer", "value_embedding"])
def test_svformer_caches_no_values_for_its_receiving_layers(source):
    cfg, model = model_for("svformer", source, layers=[1, 3])
    _, vanilla = model_for("vanilla")
    caches = {name: KVCache(m, 2, 10) for name, m in (("svformer", model), ("vanilla", vanilla))}
    for name, m in (("svformer", model), ("vanilla", vanilla)):
        feed(m, caches[name], torch.randint(0, 256, (2, 10)), [4] + [1] * 6)
    sv = caches["svformer"]
    assert [v is None for v in sv.values] == [False, True, False, True]
    assert all(k is not None for k in sv.keys)
    one_layer_of_values = 2 * 10 * 32 * 4  # batch x positions x d_model x float32
    token_ids = 2 * 10 * 8 if source == "value_embedding" else 0
    assert sv.nbytes == caches["vanilla"].nbytes - 2 * one_layer_of_values + token_ids


def test_kv_bytes_per_token_by_hand():
    # 3 layers, d_model 32: K and V of every layer, 4 bytes a number in float32
    assert kv_bytes_per_token(tiny("vanilla")) == 2 * 3 * 32 * 4 == 768
    for mode in ("resformer", "learnable", "learnable_plus", "dense", "neutreno", "gated"):
        for source in ("first_layer", "value_embedding"):
            assert kv_bytes_per_token(tiny(mode, source=source)) == 768, (mode, source)
    # the value-embedding family caches its mixed values as every layer; its tables nothing
    for mode in FAMILY:
        assert kv_bytes_per_token(tiny(mode)) == 768, mode
    # svformer: layers 1 and 2 keep keys only; with a value embedding, the token ids (int64)
    assert kv_bytes_per_token(tiny("svformer")) == 4 * 32 * 4
    assert kv_bytes_per_token(tiny("svformer", source="value_embedding")) == 4 * 32 * 4 + 8
    assert kv_bytes_per_token(tiny("svformer", layers=[2])) == 5 * 32 * 4
    for precision in ("bf16-mixed", "16-mixed", "bf16-true"):
        assert kv_bytes_per_token(tiny("vanilla", precision=precision)) == 384
    with pytest.raises(ValueError, match="precision"):
        kv_bytes_per_token(tiny("vanilla", precision="8-true"))


def greedy_without_cache(model, idx, n, window):
    """What generate(top_k=1) must return, by full forwards: the context starts at the prompt's
    last window tokens and, once it would outgrow the window, at the last half window."""
    start = max(0, idx.shape[1] - window)
    with torch.no_grad():
        for _ in range(n):
            if idx.shape[1] - start > window:
                start = idx.shape[1] - window // 2
            logits = model(idx[:, start:])[:, -1]
            idx = torch.cat((idx, logits.argmax(-1, keepdim=True)), dim=1)
    return idx


@pytest.mark.parametrize("mode,source", [("dense", "first_layer"),
                                         ("svformer", "value_embedding"),
                                         ("neutreno", "first_layer"),
                                         ("ve_unet_gated", "first_layer")])
def test_generate_is_greedy_decoding_across_the_context_window(mode, source):
    cfg, model = model_for(mode, source)
    prompt = torch.randint(0, 256, (2, 5))
    # 40 new tokens through a 16-token window: the cache is rebuilt twice
    out = model.generate(prompt, 40, top_k=1)
    assert out.shape == (2, 45) and torch.equal(out[:, :5], prompt)
    assert torch.equal(out, greedy_without_cache(model, prompt, 40, cfg.model.seq_len))
    # a prompt longer than the window is cut to its end
    long = torch.randint(0, 256, (1, 20))
    assert torch.equal(model.generate(long, 3, top_k=1),
                       greedy_without_cache(model, long, 3, cfg.model.seq_len))


def test_generate_samples_within_top_k_and_repeats_with_a_seed():
    _, model = model_for("gated")
    prompt = torch.randint(0, 256, (4, 3))
    torch.manual_seed(7)
    out = model.generate(prompt, 10, temperature=2.0, top_k=5)
    torch.manual_seed(7)
    assert torch.equal(model.generate(prompt, 10, temperature=2.0, top_k=5), out)
    with torch.no_grad():
        logits = model(out[:, :-1])[:, 2:]  # the logits each new token was drawn from
    allowed = logits.topk(5, dim=-1).indices
    assert (allowed == out[:, 3:, None]).any(-1).all()
    assert not torch.equal(out, model.generate(prompt, 10, top_k=1))  # it did sample


def test_the_cache_refuses_more_than_its_capacity():
    _, model = model_for("vanilla")
    cache = KVCache(model, 1, 4)
    with torch.no_grad():
        model(torch.zeros(1, 4, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="capacity 4"):
            model(torch.zeros(1, 1, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="seq_len"):
        KVCache(model, 1, 17)


# The objective.

def test_a_three_objective_study_stores_kv_bytes_and_fronts_on_it(tmp_path, capsys):
    objectives = ["val_loss", "n_params", "kv_bytes_per_token"]
    path = write_spec(tmp_path, n_trials=3, objectives=objectives, baselines=False,
                      sampler={"type": "bruteforce"},
                      space={"model": {"n_layer": 2},
                             "value_residual": {"mode": ["vanilla", "svformer", "resformer"]}})
    assert main(["search", str(path), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path}/tiny.db")
    assert study.metric_names == objectives
    trials = study.get_trials(states=(TrialState.COMPLETE,))
    by_mode = {t.user_attrs["mode"]: t for t in trials}
    assert set(by_mode) == {"vanilla", "svformer", "resformer"}
    for t in trials:
        cfg = from_dict(t.user_attrs["config"])
        assert t.values[1] == count_params(cfg)["n_params"]
        assert t.values[2] == t.user_attrs["kv_bytes_per_token"] == kv_bytes_per_token(cfg)
    # 2 layers, d_model 32, float32: svformer's layer 1 caches no values
    assert by_mode["vanilla"].values[2] == by_mode["resformer"].values[2] == 2 * 2 * 32 * 4
    assert by_mode["svformer"].values[2] == 3 * 32 * 4
    # the front the project reads back is Optuna's own non-dominated set of the three
    assert {r.number for r in front(study)} == {t.number for t in study.best_trials}
    assert by_mode["svformer"].number in {t.number for t in study.best_trials}
    assert "Pareto front" in printed


# `nas generate`.

def run_folder(tmp_path, name="run", vocab_size=256):
    """A `nas train --out`-shaped folder holding an untrained model: enough to refuse input."""
    folder = tmp_path / name
    folder.mkdir()
    raw = tiny("svformer").to_dict()
    cfg = from_dict({**raw, "model": {**raw["model"], "vocab_size": vocab_size}})
    dump_config(cfg, folder / "config.yaml")
    torch.save(build_model(cfg).state_dict(), folder / "model.pt")
    return folder


def generate(capsys, *args):
    code = main(["generate", *map(str, args)])
    return code, capsys.readouterr()


def test_nas_generate_continues_a_prompt_from_a_trained_run(tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    dump_config(tiny("svformer", source="value_embedding", steps=12), config)
    run = tmp_path / "run"
    assert main(["train", str(config), "--out", str(run)]) == 0
    assert json.loads((run / "metrics.json").read_text())["kv_bytes_per_token"] == 4 * 32 * 4 + 8
    capsys.readouterr()
    prompt = "def main():\n    "
    code, first = generate(capsys, run, "--prompt", prompt, "--max-new-tokens", 30, "--seed", 3,
                           "--temperature", 0.8, "--top-k", 20)
    assert code == 0, first.err
    text = first.out.removesuffix("\n")
    assert text.startswith(prompt) and len(text) > len(prompt)
    _, again = generate(capsys, run, "--prompt", prompt, "--max-new-tokens", 30, "--seed", 3,
                        "--temperature", 0.8, "--top-k", 20)
    assert again.out == first.out
    # the text is the model's own generate, decoded from bytes
    model = build_model(load_config(run / "config.yaml"))
    model.load_state_dict(torch.load(run / "model.pt", weights_only=True))
    torch.manual_seed(3)
    ids = model.eval().generate(torch.tensor([list(prompt.encode())]), 30, 0.8, 20)
    assert text == bytes(ids[0].tolist()).decode("utf-8", errors="replace")


@pytest.mark.parametrize("args,fragment", [
    (["{missing}", "--prompt", "x"], "no such folder"),
    (["{no_weights}", "--prompt", "x"], "no model.pt"),
    (["{run}", "--prompt", ""], "--prompt: must be non-empty"),
    (["{run}", "--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens: must be >= 1"),
    (["{run}", "--prompt", "x", "--temperature", "-1"], "--temperature: must be >= 0"),
    (["{run}", "--prompt", "x", "--temperature", "nan"], "--temperature: must be >= 0"),
    (["{run}", "--prompt", "x", "--top-k", "0"], "--top-k: must be >= 1"),
    (["{wide}", "--prompt", "x"], "not byte-level (vocab_size 300"),
])
def test_nas_generate_refuses_bad_input_in_one_line(tmp_path, capsys, args, fragment):
    folders = {"{run}": run_folder(tmp_path), "{missing}": tmp_path / "nope",
               "{wide}": run_folder(tmp_path, "wide", vocab_size=300),
               "{no_weights}": run_folder(tmp_path, "no_weights")}
    (folders["{no_weights}"] / "model.pt").unlink()
    code, out = generate(capsys, *[str(folders.get(a, a)) for a in args])
    lines = out.err.strip().splitlines()
    assert code == 2 and len(lines) == 1, out.err
    assert lines[0].startswith("nas generate: error: ") and fragment in lines[0], lines[0]


def test_nas_generate_needs_the_tokenizers_package_for_a_tokenizer_json(tmp_path, capsys,
                                                                        monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # as if not installed: import fails
    run = run_folder(tmp_path)
    (run / "tokenizer.json").write_text("{}")
    code, out = generate(capsys, run, "--prompt", "x")
    assert code == 2 and "needs the tokenizers package" in out.err
    assert len(out.err.strip().splitlines()) == 1


# `tokenizers` comes with the test extra: without it this test fails, it never skips.
def test_nas_generate_reads_a_runs_tokenizer(tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers

    run = run_folder(tmp_path)
    words = {f"w{i}": i for i in range(256)}
    tokenizer = Tokenizer(models.WordLevel(words, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(run / "tokenizer.json"))
    code, out = generate(capsys, run, "--prompt", "w17 w42", "--max-new-tokens", 5, "--seed", 0)
    assert code == 0, out.err
    text = out.out.split()
    assert text[:2] == ["w17", "w42"] and len(text) == 7 and all(w in words for w in text)
    (run / "tokenizer.json").write_text("not json")
    code, out = generate(capsys, run, "--prompt", "w1")
    assert code == 2 and "not a tokenizer file" in out.err
