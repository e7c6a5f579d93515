"""`nas export RUN_DIR --hf --out DIR`: a trained run as a Hugging Face model folder.

The folder holds `config.json` (`nas.hf.configuration`: the run's model section and plan, as nas
resolved them), `model.safetensors` (the run's weights), `generation_config.json`, and the code
`AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` imports through config.json's
`auto_map`: `configuration_resformer.py` and `modeling_resformer.py`, which import torch and
transformers, never nas.

One source of truth: `modeling_resformer.py` is not a second copy of the model kept by hand; it
is generated at each export from the sources of the modules that define it (`BUNDLED`:
nas.modes, nas.model.residual, nas.model.decoder, then the thin `PreTrainedModel` of
nas.hf.modeling), read with `inspect.getsource` and concatenated into one module. Their imports of
each other are dropped (the names are defined above them in the one module), and nas.config, whose
pydantic objects the model code reads but never builds, is stood in for by what config.json holds
(`nas.hf.modeling.ExportedPlan`). So every mode of `nas.modes.MODES` exports as it trains, and
an edit to the model reaches the next export unchanged. The price is that the file carries the
whole of those modules (the cache-size formula and the decode benchmark too), and that they may
import only each other, nas.config (in annotations), and installed packages: a new import is
refused here, at export, by name.

Every export checks itself before it is left in place: it loads the folder as a user would,
through `AutoModelForCausalLM` with the generated code, and compares its logits on a fixed
prompt with the tool's model; a mismatch, a weight left out, or a mode the file cannot build is
one line (exit 2), and the folder is removed.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import importlib
import inspect
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from nas.config import ModelConfig, RunConfig
from nas.errors import ConfigError, first_line

if TYPE_CHECKING:
    from nas.model.decoder import Decoder

# The nas modules whose sources make up modeling_resformer.py, each after those it imports.
BUNDLED = ("nas.modes", "nas.model.residual", "nas.model.decoder", "nas.hf.modeling")
# Modules the bundled ones import for nas.config's pydantic classes, which they name in
# annotations (and in Decoder's default plan, which the export always passes): the import is
# dropped, and nas.hf.modeling stands in for the objects.
STOOD_IN = ("nas.config",)
CONFIGURATION = ("nas.hf.configuration", "configuration_resformer")  # nas module, exported file
MODELING = "modeling_resformer"
MODEL_CLASS = "ResFormerForCausalLM"
CONFIG_CLASS = "ResFormerConfig"

# The self-check: logits of a fixed prompt of at most PROBE_TOKENS tokens, within TOLERANCE
# (absolute and relative) of the tool's: the same code on the same weights, so equal in practice.
PROBE_TOKENS = 16
TOLERANCE = 1e-5

HEADER = '''"""A value-residual decoder exported by resformer-nas (`nas export RUN_DIR --hf`).

Generated at export from the sources of
    {modules}
concatenated in that order (see nas/hf/export.py): do not edit, export again. Imports torch and
transformers only.
"""

from __future__ import annotations
'''


def _path(module: str) -> str:
    """nas.model.decoder -> nas/model/decoder.py"""
    return module.replace(".", "/") + ".py"


def _module_source(name: str) -> str:
    """One bundled module's source, ready to follow the others in one module: its docstring
    as a comment, `from __future__` and its imports of nas modules dropped (or, for the
    configuration, pointed at the exported file)."""
    source = inspect.getsource(importlib.import_module(name))
    tree = ast.parse(source)
    lines = source.splitlines()
    # first line of a statement -> (its last line, what replaces the lines; None: nothing)
    edits: dict[int, tuple[int, str | None]] = {}
    first = tree.body[0] if tree.body else None
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
        docstring = ast.get_docstring(tree) or ""
        edits[first.lineno] = (first.end_lineno or first.lineno, "\n".join(
            f"# {line}".rstrip() for line in docstring.splitlines()))
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom):
            continue
        target, text = node.module or "", None  # `from __future__`: the header has it first
        ours = target == "nas" or target.startswith("nas.")
        if not ours and target != "__future__":
            continue
        if ours and target not in (*BUNDLED, *STOOD_IN, CONFIGURATION[0]):
            raise RuntimeError(
                f"{_path(name)} imports {target}, which the Hugging Face export does not "
                "bundle: add it to nas.hf.export.BUNDLED (or import it lazily outside the "
                "model code)")
        if target == CONFIGURATION[0]:
            indent = lines[node.lineno - 1][:node.col_offset]
            names = ", ".join(alias.name for alias in node.names)
            text = f"{indent}from .{CONFIGURATION[1]} import {names}"
        edits[node.lineno] = (node.end_lineno or node.lineno, text)
    out, skip_to = [f"# ---- {_path(name)} ".ljust(79, "-")], 0
    for number, line in enumerate(lines, start=1):
        if number in edits:
            skip_to, text = edits[number]
            if text is not None:
                out.append(text)
        elif number > skip_to:
            out.append(line)
    return "\n".join(out).strip() + "\n"


def _top_level_names(source: str) -> set[str]:
    """The functions, classes and variables a module's source defines at its top level."""
    names: set[str] = set()
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
    return names


def modeling_source() -> str:
    """modeling_resformer.py: the bundled modules' sources in one module (see the docstring).
    Refuses two of them defining one name, which one module would silently merge."""
    parts = [HEADER.format(modules=", ".join(_path(name) for name in BUNDLED))]
    seen: dict[str, str] = {}
    for name in BUNDLED:
        source = _module_source(name)
        for defined in _top_level_names(source):
            if defined in seen:
                raise RuntimeError(f"{_path(name)} and {_path(seen[defined])} both define "
                                   f"{defined!r}: one exported module cannot hold both")
            seen[defined] = name
        parts.append(source)
    text = "\n\n".join(parts)
    ast.parse(text)  # a dropped import must not leave a block empty
    return text


def configuration_source() -> str:
    """configuration_resformer.py: nas.hf.configuration as it is (it imports no nas module)."""
    return inspect.getsource(importlib.import_module(CONFIGURATION[0]))


def model_section(m: ModelConfig) -> dict[str, Any]:
    """Every field of the run's ModelConfig and every size it derives (its properties)."""
    derived = [name for name, attr in vars(type(m)).items() if isinstance(attr, property)]
    return {**dataclasses.asdict(m), **{name: getattr(m, name) for name in derived}}


def plan_section(cfg: RunConfig) -> dict[str, Any]:
    """What the model asks of its ValueResidualConfig beyond the keys, for this depth
    (`nas.hf.modeling.ExportedPlan` answers from it)."""
    vr, n_layer = cfg.value_residual, cfg.model.n_layer
    # the value-embedding family's layout only: other modes never ask, and a reader of
    # config.json would take a layout for tables that are not there
    layout = vr.table_layout(n_layer) if vr.reads("value_embeddings") else {}
    return {"receiving": vr.receiving(n_layer), "tables": vr.tables(n_layer),
            "table_layout": sorted([layer, table] for layer, table in layout.items()),
            "reads": [f.name for f in dataclasses.fields(vr) if vr.reads(f.name)]}


def export_hf(cfg: RunConfig, model: Decoder, out: Path, run: Path) -> str:
    """Write the Hugging Face folder of a trained run (its config and model, and the tokenizer
    of its folder `run`, nas.hf.tokenizer) to `out`, which must not exist or be empty, and
    check that it loads as the run's model. Returns what the tokenizer is, in a few words."""
    try:
        import safetensors  # noqa: F401  (save_pretrained writes through it)
        import transformers  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"--hf needs transformers and safetensors ({exc.name} is missing): "
                          "pip install 'resformer-nas[hf]'") from None
    from transformers import GenerationConfig

    from nas.hf.configuration import ResFormerConfig
    from nas.hf.modeling import ResFormerForCausalLM
    from nas.hf.tokenizer import run_tokenizer

    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out: {out} exists and is not an empty folder")
    tokenizer, what = run_tokenizer(run, cfg.model.vocab_size, cfg.model.seq_len)
    special = {f"{name}_token_id": getattr(tokenizer, f"{name}_token_id", None)
               for name in ("bos", "eos", "pad")}
    code = {f"{MODELING}.py": modeling_source(),
            f"{CONFIGURATION[1]}.py": configuration_source()}
    config = ResFormerConfig(
        model=model_section(cfg.model), value_residual=dataclasses.asdict(cfg.value_residual),
        plan=plan_section(cfg), architectures=[MODEL_CLASS],
        auto_map={"AutoConfig": f"{CONFIGURATION[1]}.{CONFIG_CLASS}",
                  "AutoModelForCausalLM": f"{MODELING}.{MODEL_CLASS}"}, **special)
    hf = ResFormerForCausalLM(config)
    hf.model.load_state_dict(model.state_dict())
    hf.to(model.lm_head.weight.dtype)
    hf.generation_config = GenerationConfig(**special)
    created = not out.exists()
    try:
        with _quiet():
            hf.save_pretrained(out)
            if tokenizer is not None:
                tokenizer.save_pretrained(out)
            for name, text in code.items():
                (out / name).write_text(text, encoding="utf-8")
            _check(out, model)
    except BaseException:  # Ctrl+C too: no half-written folder for a loader to trip over
        shutil.rmtree(out, ignore_errors=True)
        if not created:
            out.mkdir()  # empty, as it was
        raise
    return what


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """transformers' progress bars and warnings off while the export saves and checks its
    folder (what `nas export` says is one line), as they were afterwards."""
    from transformers.utils import logging

    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def _check(out: Path, model: Decoder) -> None:
    """Load `out` as a user would and compare its logits on a fixed prompt with the model's."""
    from transformers import AutoModelForCausalLM

    try:
        loaded, info = AutoModelForCausalLM.from_pretrained(
            out, trust_remote_code=True, output_loading_info=True)
    except Exception as exc:  # whatever the generated code raises: the export is unusable
        raise ConfigError(f"{out}: the exported model does not load: {type(exc).__name__}: "
                          f"{first_line(exc)}") from exc
    left = {k: v for k, v in info.items() if k.endswith("_keys") and v}
    if left:
        raise ConfigError(f"{out}: the exported weights do not fit the exported model: {left}")
    cfg = model.cfg
    probe = (torch.arange(min(cfg.seq_len, PROBE_TOKENS)) % cfg.vocab_size).unsqueeze(0)
    loaded.to(model.lm_head.weight.dtype)
    was_training = model.training
    try:
        with torch.no_grad():
            want = model.eval()(probe.to(model.lm_head.weight.device)).cpu()
            got = loaded.eval()(probe).logits
    finally:
        model.train(was_training)
    if not torch.allclose(got, want, atol=TOLERANCE, rtol=TOLERANCE):
        raise ConfigError(f"{out}: the exported model's logits differ from the run's by up to "
                          f"{(got - want).abs().max().item():.3g}")

