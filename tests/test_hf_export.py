"""`nas export RUN_DIR --hf`: a Hugging Face folder that AutoModelForCausalLM loads offline
through its generated code, with the tool's logits for every mode and source and the tool's
greedy generation; bad input is one line, exit 2."""

import ast
import shutil
import sys

import pytest
import torch

from nas import build_model, hf_export
from nas.cli import main
from nas.config import dump_config
from tests.helpers import ALL, randomize_coefficients, tiny


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
        prompt = idx[:1, :5]
        want = model.generate(prompt, 6, top_k=1)  # top_k 1: the greedy token
        for use_cache in (True, False):  # through transformers' cache, and without one
            got = hf.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=use_cache,
                              output_logits=True, return_dict_in_generate=True)
            assert torch.equal(got.sequences, want), (use_cache, got.sequences, want)
            # each step's logits, not only their argmax (near-uniform in an untrained model)
            torch.testing.assert_close(torch.stack(got.logits, dim=1), model(want)[:, 4:-1],
                                       atol=1e-5, rtol=1e-5)


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
        with pytest.raises(ValueError, match="padded batches are not supported"):
            hf(idx, attention_mask=torch.ones_like(idx).index_fill(1, torch.tensor([0]), 0))
        # beam search reorders transformers' cache between steps: as without a cache
        cached, uncached = (hf.generate(idx[:, :6], num_beams=3, max_new_tokens=5,
                                        do_sample=False, use_cache=use_cache,
                                        output_scores=True, return_dict_in_generate=True)
                            for use_cache in (True, False))
        assert torch.equal(cached.sequences, uncached.sequences)
        torch.testing.assert_close(cached.sequences_scores, uncached.sequences_scores)
        # the context ends where the rotary tables do (seq_len 16): generate's default length
        # stops there (max_position_embeddings), a longer one asked for is refused
        assert hf.generate(idx[:, :10], do_sample=False).shape == (1, 16)
        with pytest.raises(ValueError, match="exceed the model's context of 16"):
            hf.generate(idx[:, :10], max_new_tokens=10, do_sample=False)


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
    from nas import modes, residual

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


@pytest.mark.parametrize("args,fragment", [
    (["{no_weights}", "--hf"], "no model.pt"),
    (["{unknown_mode}", "--hf"], "unknown mode 'nope'"),
    (["{run}", "--hf", "--out", "{full}"], "exists and is not an empty folder"),
    (["{run}", "--hf", "--best", "2"], "--best choose(s) trials of a study"),
    (["{run}"], "a folder; to export a `nas train` run as a Hugging Face model pass --hf"),
])
def test_bad_input_is_one_line(auto_model, tmp_path, capsys, args, fragment):
    folders = {"{run}": run_folder(tmp_path)[0],
               "{no_weights}": run_folder(tmp_path, name="no_weights")[0],
               "{unknown_mode}": run_folder(tmp_path, name="unknown_mode")[0],
               "{full}": tmp_path / "full"}
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
    monkeypatch.setattr(hf_export, "BUNDLED", ("residual",))  # residual imports .modes
    with pytest.raises(RuntimeError, match=r"nas/residual.py imports .modes, which"):
        hf_export.modeling_source()
    monkeypatch.setattr(hf_export, "BUNDLED", ("modes", "modes"))
    with pytest.raises(RuntimeError, match="both define"):
        hf_export.modeling_source()
