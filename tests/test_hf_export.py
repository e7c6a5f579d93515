"""`nas export RUN_DIR --hf`: a Hugging Face folder that AutoModelForCausalLM loads offline
through its generated code, with the tool's logits for every mode and source, left-padded
batches included, and the tool's greedy generation at any length; with its tokenizer
(byte-level, or the run's BPE) `pipeline("text-generation")` continues text as `nas generate`
does; bad input is one line, exit 2."""

import ast
import json
import shutil
import sys

import pytest
import torch

from nas import build_model
from nas.cli import main
from nas.config import dump_config, from_dict
from nas.hf import export as hf_export
from tests.helpers import ALL, randomize_coefficients, tiny

pytestmark = pytest.mark.slow  # trains, serves or kills: make test-fast leaves it out


@pytest.fixture(scope="module")
def auto_model(tmp_path_factory):
    """transformers' AutoModelForCausalLM, imported once for the module (the import is slow),
    offline and with its copies of remote code in a temporary folder rather than ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_HOME", str(tmp_path_factory.mktemp("hf_home")))
        from transformers import AutoModelForCausalLM

        yield AutoModelForCausalLM


def run_folder(tmp_path, mode="svformer", source="first_layer", name="run"):
    """A `nas train --out`-shaped folder of a 4-layer model with its coefficients moved off
    their init (a gate left at zero would hide a gate the export dropped); and the model."""
    torch.manual_seed(0)
    cfg = tiny(mode, source=source, n_layer=4)
    model = build_model(cfg).eval()
    randomize_coefficients(model)
    folder = tmp_path / name
    folder.mkdir()
    dump_config(cfg, folder / "config.yaml")
    torch.save(model.state_dict(), folder / "model.pt")
    return folder, model


def export(capsys, *args):
    code = main(["export", *map(str, args)])
    return code, capsys.readouterr()


@pytest.mark.parametrize("mode,source", ALL)
def test_the_export_loads_with_auto_model_and_gives_the_tools_logits_and_tokens(
        auto_model, tmp_path, capsys, mode, source):
    run, model = run_folder(tmp_path, mode, source)
    out = tmp_path / f"hf-{mode}-{source}"
    code, printed = export(capsys, run, "--hf", "--out", out)
    assert code == 0, printed.err
    assert printed.out.startswith(f"wrote {out}: ") and printed.err == ""
    hf = auto_model.from_pretrained(out, trust_remote_code=True).eval()
    assert type(hf).__module__.endswith(".modeling_resformer")  # the exported code's class
    idx = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx), atol=1e-5, rtol=1e-5)
        assert_padded_rows_are_the_rows_alone(hf, idx)
        prompt = idx[:1, :5]
        want = model.generate(prompt, 6, top_k=1)  # top_k 1: the greedy token
        for use_cache in (True, False):  # through transformers' cache, and without one
            got = hf.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=use_cache,
                              output_logits=True, return_dict_in_generate=True)
            assert torch.equal(got.sequences, want), (use_cache, got.sequences, want)
            # each step's logits, not only their argmax (near-uniform in an untrained model)
            torch.testing.assert_close(torch.stack(got.logits, dim=1), model(want)[:, 4:-1],
                                       atol=1e-5, rtol=1e-5)


def assert_padded_rows_are_the_rows_alone(hf, idx):
    """Rows of 12, 7 and 3 tokens, left-padded to one batch with an attention mask: each row's
    logits at its tokens are those of the row alone, and so are its next tokens through the
    cache (greedy, 4 steps: the 16-token context is not exceeded)."""
    lengths = (12, 7, 3)
    rows = [idx[0, :n] for n in lengths]
    batch = torch.zeros(len(rows), max(lengths), dtype=torch.long)  # pad: id 0, masked
    mask = torch.zeros_like(batch)
    for i, row in enumerate(rows):
        batch[i, -len(row):], mask[i, -len(row):] = row, 1
    logits = hf(batch, attention_mask=mask).logits
    steps = hf.generate(batch, attention_mask=mask, max_new_tokens=4, do_sample=False,
                        output_logits=True, return_dict_in_generate=True)
    for i, row in enumerate(rows):
        alone = hf(row[None]).logits[0]
        torch.testing.assert_close(logits[i, -len(row):], alone, atol=1e-5, rtol=1e-5)
        want = hf.generate(row[None], max_new_tokens=4, do_sample=False, output_logits=True,
                           return_dict_in_generate=True)
        assert torch.equal(steps.sequences[i, -len(row) - 4:], want.sequences[0])
        torch.testing.assert_close(torch.stack(steps.logits, 1)[i],
                                   torch.stack(want.logits, 1)[0], atol=1e-5, rtol=1e-5)


def test_generation_past_the_context_shifts_it_as_nas_generate_does(auto_model, tmp_path,
                                                                   capsys):
    """seq_len 16: generate() continues past it through its cache with the tool's context
    shift, greedy token for token, from a short prompt and from one longer than the context;
    without a cache a forward past the context is refused, naming the way through."""
    run, model = run_folder(tmp_path, "ve_unet_gated")
    assert export(capsys, run, "--hf", "--out", tmp_path / "hf")[0] == 0
    hf = auto_model.from_pretrained(tmp_path / "hf", trust_remote_code=True).eval()
    idx = torch.randint(0, 256, (1, 40))
    with torch.no_grad():
        for prompt in (idx[:, :5], idx):  # 5 tokens, then 40 (read from its last 16)
            want = model.generate(prompt, 30, top_k=1)
            got = hf.generate(prompt, max_new_tokens=30, do_sample=False)
            assert torch.equal(got, want)
        beams = hf.generate(idx[:, :5], num_beams=2, max_new_tokens=30, do_sample=False)
        assert beams.shape == (1, 35)
        with pytest.raises(ValueError, match="17 tokens exceed the model's context of 16 "
                                             r"\(max_position_embeddings\); generate\(\) "
                                             "continues past it through its cache"):
            hf.generate(idx[:, :10], max_new_tokens=10, do_sample=False, use_cache=False)


def test_the_export_is_a_causal_lm_as_transformers_expects(auto_model, tmp_path, capsys):
    run, model = run_folder(tmp_path, "svformer", "value_embedding")
    out = tmp_path / "hf"
    assert export(capsys, run, "--hf", "--out", out)[0] == 0
    hf = auto_model.from_pretrained(out, trust_remote_code=True).eval()
    idx = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        # labels as transformers passes them (the inputs): the next-token loss the tool trains
        loss = hf(idx, labels=idx).loss
        want = torch.nn.functional.cross_entropy(model(idx)[0, :-1], idx[0, 1:])
        torch.testing.assert_close(loss, want)
        # beam search reorders transformers' cache between steps: as without a cache
        cached, uncached = (hf.generate(idx[:, :6], num_beams=3, max_new_tokens=5,
                                        do_sample=False, use_cache=use_cache,
                                        output_scores=True, return_dict_in_generate=True)
                            for use_cache in (True, False))
        assert torch.equal(cached.sequences, uncached.sequences)
        torch.testing.assert_close(cached.sequences_scores, uncached.sequences_scores)
        # one forward's context ends where the rotary tables do (seq_len 16): generate's
        # default length stops there (max_position_embeddings)
        assert hf.generate(idx[:, :10], do_sample=False).shape == (1, 16)


def test_the_exported_code_runs_without_nas(auto_model, tmp_path, capsys, monkeypatch):
    run, model = run_folder(tmp_path, "ve_unet_gated")
    assert export(capsys, run, "--hf", "--out", tmp_path / "hf")[0] == 0
    source = (tmp_path / "hf" / "modeling_resformer.py").read_text()
    imported = [alias.name for node in ast.walk(ast.parse(source))
                if isinstance(node, ast.Import) for alias in node.names]
    imported += [node.module or "" for node in ast.walk(ast.parse(source))
                 if isinstance(node, ast.ImportFrom)]
    assert not [name for name in imported if name.split(".")[0] == "nas"], imported
    # a copy under another name: transformers imports its code afresh, with nas unimportable
    shutil.copytree(tmp_path / "hf", tmp_path / "elsewhere")
    for name in [m for m in sys.modules if m == "nas" or m.startswith("nas.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "nas", None)
    hf = auto_model.from_pretrained(tmp_path / "elsewhere", trust_remote_code=True).eval()
    idx = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx), atol=1e-5, rtol=1e-5)


def test_a_mode_outside_nas_modes_is_refused_and_leaves_no_folder(auto_model, tmp_path,
                                                                   capsys, monkeypatch):
    """A mode registered at run time (as tests/test_model.py does) is not in the source the
    export bundles: its own check loads the folder, fails, and removes it."""
    from nas import modes
    from nas.model import residual

    class HalfMix(residual.ValueMix):
        def before(self, v, sources, x, shared=None):
            return 0.5 * (sources[0] + v)

    monkeypatch.setitem(modes.MODES, "half", modes.Mode(
        "half", modes.SOURCE_KEYS, False, "HalfMix", lambda d, h, r, s: 0, "(V_src + V_n) / 2"))
    run, _ = run_folder(tmp_path, "half")
    empty = tmp_path / "empty"
    empty.mkdir()
    for out in (tmp_path / "hf", empty):
        code, printed = export(capsys, run, "--hf", "--out", out)
        lines = printed.err.strip().splitlines()
        assert code == 2 and len(lines) == 1, printed.err
        assert "the exported model does not load: KeyError: 'half'" in lines[0]
    assert not (tmp_path / "hf").exists() and list(empty.iterdir()) == []  # as they were


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory):
    """A run trained (4 steps) on text that `nas prepare` tokenized with a 300-token BPE, as a
    user makes one: its folder holds the prepared tokenizer.json."""
    from nas.training.prepare import prepare
    from nas.training.train import train

    tmp = tmp_path_factory.mktemp("bpe")
    text = tmp / "text.txt"
    text.write_text("".join(f"The value residual of layer {i % 7} mixes the first layer's "
                            f"values into attention head {i % 5}.\n" for i in range(300)),
                    encoding="utf-8")
    prepare([text], tmp / "prepared", vocab_size=300, progress=False)
    train(from_dict({
        "model": {"n_layer": 2, "d_model": 32, "n_head": 2, "seq_len": 16},
        "value_residual": {"mode": "svformer", "source": "value_embedding"},
        "train": {"steps": 4, "batch_size": 4, "eval_every": 4, "eval_batches": 1,
                  "compile": False},
        "data": {"source": str(tmp / "prepared")}}), tmp / "run", progress=False)
    return tmp / "run"


def nas_generate(capsys, run, prompt, tokens):
    """`nas generate`'s greedy continuation of `prompt` (--top-k 1)."""
    capsys.readouterr()
    assert main(["generate", str(run), "--prompt", prompt, "--max-new-tokens", str(tokens),
                 "--top-k", "1", "--seed", "0"]) == 0
    return capsys.readouterr().out.removesuffix("\n")


@pytest.mark.parametrize("kind", ["byte-level", "bpe"])
def test_a_pipeline_continues_text_as_nas_generate_does(auto_model, bpe_run, tmp_path, capsys,
                                                         kind):
    """The export carries its tokenizer: `pipeline("text-generation")` on the folder alone
    (offline) gives `nas generate`'s greedy text, past the 16-token context too, one prompt or
    a left-padded batch of them; eos, bos and pad are set in the tokenizer, config.json and
    generation_config.json."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast, pipeline

    run = run_folder(tmp_path)[0] if kind == "byte-level" else bpe_run
    out = tmp_path / "hf"
    code, printed = export(capsys, run, "--hf", "--out", out)
    assert code == 0, printed.err
    what = "a byte-level tokenizer" if kind == "byte-level" else "the run's tokenizer.json"
    assert printed.out.startswith(f"wrote {out}: with {what}; use it with pipeline(")
    tokenizer = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    eos = {"byte-level": ("\x00", 0), "bpe": ("<|endoftext|>", 0)}[kind]
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == eos
    assert tokenizer.pad_token_id == tokenizer.bos_token_id == eos[1]
    assert tokenizer.padding_side == "left"
    # without trust_remote_code: the tokenizer's own class reads the folder (AutoTokenizer
    # first builds the model's config, the folder's own code; see docs/inspecting.md)
    plain = PreTrainedTokenizerFast.from_pretrained(out)
    assert plain("The value residual").input_ids == tokenizer("The value residual").input_ids
    assert plain.eos_token_id == tokenizer.eos_token_id
    for name in ("config.json", "generation_config.json"):
        saved = json.loads((out / name).read_text())
        assert {k: saved[k] for k in ("eos_token_id", "bos_token_id", "pad_token_id")} == {
            "eos_token_id": eos[1], "bos_token_id": eos[1], "pad_token_id": eos[1]}, name
    generator = pipeline("text-generation", model=str(out), trust_remote_code=True)
    prompts = ["The value residual", "def f(x):\n    return"]
    want = [nas_generate(capsys, run, prompt, 24) for prompt in prompts]
    one = [generator(prompt, max_new_tokens=24, do_sample=False)[0]["generated_text"]
           for prompt in prompts]
    assert one == want
    batched = generator(prompts, max_new_tokens=4, do_sample=False, batch_size=2)
    assert [r[0]["generated_text"] for r in batched] == [
        nas_generate(capsys, run, prompt, 4) for prompt in prompts]


def test_a_tokenizer_without_an_end_of_text_token_leaves_eos_unset(auto_model, tmp_path,
                                                                   capsys):
    """`nas prepare --vocab-size 256` learns the bytes alone, with no <|endoftext|>: the
    export carries that tokenizer and says that eos, bos and pad are unset."""
    from transformers import AutoTokenizer

    from nas.training.prepare import train_tokenizer

    run, _ = run_folder(tmp_path)
    train_tokenizer(iter(["value residual " * 50]), 256).save(str(run / "tokenizer.json"))
    out = tmp_path / "hf"
    code, printed = export(capsys, run, "--hf", "--out", out)
    assert code == 0, printed.err
    assert printed.out.startswith(f"wrote {out}: with the run's tokenizer.json (no "
                                  "<|endoftext|>: eos, bos and pad unset); use it with ")
    tokenizer = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    assert tokenizer.eos_token_id is None and tokenizer.pad_token_id is None
    assert json.loads((out / "config.json").read_text()).get("eos_token_id") is None


def test_the_byte_level_tokenizer_is_the_utf8_bytes():
    """Every character round-trips through its UTF-8 bytes as ids, the NUL byte is the special
    end-of-text token (dropped by skip_special_tokens), and the vocabulary is the 256 bytes."""
    from nas.hf.tokenizer import byte_tokenizer

    tokenizer = byte_tokenizer()
    text = "naïve façade 東京 ✓ Āā\t\r\n{}~\x7f"
    assert tokenizer(text).input_ids == list(text.encode("utf-8"))
    assert tokenizer.decode(list(text.encode("utf-8"))) == text
    assert tokenizer("a\x00b").input_ids == [97, 0, 98]
    assert tokenizer.decode([97, 0, 98], skip_special_tokens=True) == "ab"
    assert len(tokenizer) == 256 and tokenizer.eos_token_id == 0


@pytest.mark.parametrize("args,fragment", [
    (["{no_weights}", "--hf"], "no model.pt"),
    (["{unknown_mode}", "--hf"], "unknown mode 'nope'"),
    (["{run}", "--hf", "--out", "{full}"], "exists and is not an empty folder"),
    (["{run}", "--hf", "--best", "2"], "--best choose(s) trials of a study"),
    (["{run}"], "a folder; to export a `nas train` run as a Hugging Face model pass --hf"),
    (["{bad_tokenizer}", "--hf"], "tokenizer.json: not a tokenizer file: "),
])
def test_bad_input_is_one_line(auto_model, tmp_path, capsys, args, fragment):
    folders = {"{run}": run_folder(tmp_path)[0],
               "{no_weights}": run_folder(tmp_path, name="no_weights")[0],
               "{unknown_mode}": run_folder(tmp_path, name="unknown_mode")[0],
               "{full}": tmp_path / "full",
               "{bad_tokenizer}": run_folder(tmp_path, name="bad_tokenizer")[0]}
    (folders["{bad_tokenizer}"] / "tokenizer.json").write_text("{}")
    (folders["{no_weights}"] / "model.pt").unlink()
    config = folders["{unknown_mode}"] / "config.yaml"
    config.write_text(config.read_text().replace("mode: svformer", "mode: nope"))
    folders["{full}"].mkdir()
    (folders["{full}"] / "README.md").write_text("kept")
    argv = [str(folders.get(a, a)) for a in args]
    code, printed = export(capsys, *argv, *([] if "--out" in argv else
                                            ["--out", tmp_path / "hf"]))
    lines = printed.err.strip().splitlines()
    assert code == 2 and len(lines) == 1, printed.err
    assert lines[0].startswith("nas export: error: ") and fragment in lines[0], lines[0]
    assert not (tmp_path / "hf").exists()
    assert (folders["{full}"] / "README.md").read_text() == "kept"


def test_without_transformers_the_export_says_what_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed
    code, printed = export(capsys, run_folder(tmp_path)[0], "--hf", "--out", tmp_path / "hf")
    assert code == 2
    assert printed.err.strip() == ("nas export: error: --hf needs transformers and safetensors "
                                   "(transformers is missing): pip install 'resformer-nas[hf]'")


def test_the_generated_module_refuses_an_import_it_does_not_bundle(monkeypatch):
    # residual imports nas.modes, left out here
    monkeypatch.setattr(hf_export, "BUNDLED", ("nas.model.residual",))
    with pytest.raises(RuntimeError, match=r"nas/model/residual.py imports nas.modes, which"):
        hf_export.modeling_source()
    monkeypatch.setattr(hf_export, "BUNDLED", ("nas.modes", "nas.modes"))
    with pytest.raises(RuntimeError, match="both define"):
        hf_export.modeling_source()
