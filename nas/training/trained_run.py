"""A trained run read back from its folder (`nas train --out`): its config and weights, the
weights refused unloaded unless they are a state dict of tensors (`torch.load(weights_only=True)`),
and the encoder and decoder of its tokenizer, for `nas generate`, `nas analyze` and
`nas export --hf`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from nas.config import RunConfig, load_config
from nas.corpus_files import TOKENIZER_FILE
from nas.errors import ConfigError, first_line
from nas.model.decoder import Decoder, build_model
from nas.run_folder import CONFIG_FILE, MODEL_FILE


def load_run(folder: Path) -> tuple[RunConfig, Decoder]:
    """The run config and the trained model (on the CPU) of a `nas train --out` folder."""
    if not folder.is_dir():
        raise ConfigError(f"{folder}: no such folder; expected a `nas train --out` folder")
    for name in (CONFIG_FILE, MODEL_FILE):
        if not (folder / name).is_file():
            raise ConfigError(f"{folder}: no {name}; expected a `nas train --out` folder")
    cfg = load_config(folder / CONFIG_FILE)
    model = build_model(cfg)
    try:
        state = torch.load(folder / MODEL_FILE, weights_only=True, map_location="cpu")
    except Exception as exc:  # noise breaks the unpickler in any type: IndexError, KeyError...
        # weights_only refuses a pickle of anything but tensors and plain values unrun; its
        # message would suggest weights_only=False, which would run it
        raise ConfigError(f"{folder / MODEL_FILE}: not a state dict of tensors as `nas train` "
                          f"writes (refused unloaded: {type(exc).__name__})") from None
    if not isinstance(state, dict):
        raise ConfigError(f"{folder / MODEL_FILE}: holds a {type(state).__name__}, not a "
                          "state dict of tensors as `nas train` writes")
    try:
        model.load_state_dict(state)
    except (RuntimeError, OSError, ValueError) as exc:
        raise ConfigError(f"{folder / MODEL_FILE}: does not fit {CONFIG_FILE}: "
                          f"{first_line(exc)}") from None
    return cfg, model


def codec(folder: Path, vocab_size: int
           ) -> tuple[Callable[[str], list[int]], Callable[[list[int]], str]]:
    """Encode and decode for a run's model: with the folder's tokenizer.json (the `tokenizers`
    library), else as UTF-8 bytes for a byte-level model (vocab_size 256)."""
    path = folder / TOKENIZER_FILE
    if path.is_file():
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ConfigError(f"{path}: reading it needs the tokenizers package "
                              "(pip install tokenizers)") from None
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # the library raises a bare Exception for a bad file
            raise ConfigError(f"{path}: not a tokenizer file: {first_line(exc)}") from None
        if tokenizer.get_vocab_size() > vocab_size:
            raise ConfigError(f"{path}: {tokenizer.get_vocab_size()} tokens, more than the "
                              f"model's vocab_size {vocab_size}")
        return (lambda text: tokenizer.encode(text).ids), tokenizer.decode
    if vocab_size != 256:
        raise ConfigError(f"{folder}: no tokenizer.json, and the model is not byte-level "
                          f"(vocab_size {vocab_size}, not 256)")
    return (lambda text: list(text.encode("utf-8")),
            lambda ids: bytes(ids).decode("utf-8", errors="replace"))
