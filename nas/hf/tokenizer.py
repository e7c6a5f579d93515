"""The tokenizer that `nas export RUN_DIR --hf` saves beside the model, so that the folder is
an ordinary Hugging Face model: `AutoTokenizer.from_pretrained(DIR)` and
`pipeline("text-generation", model=DIR, trust_remote_code=True)` read it. It is a
`PreTrainedTokenizerFast` (tokenizer.json, tokenizer_config.json), padding on the left as a
decoder-only model generates, and encodes text to the ids `nas generate` feeds the run:

- a byte-level run (vocab_size 256, no tokenizer.json): the UTF-8 bytes. The tokenizer is a
  byte-level BPE without merges whose vocabulary maps GPT-2's character for each byte to the
  byte's value. Its end-of-text token (eos, and bos and pad) is the NUL byte, id 0: the 256
  bytes leave no id for another token, and NUL occurs in no text. It is a special token,
  matched in the text before the bytes are mapped, so `decode(..., skip_special_tokens=True)`
  drops it and every other character round-trips.
- a run with a tokenizer.json (`nas prepare`'s, copied into the run by `nas train`): that
  file, with `<|endoftext|>` (the separator `nas prepare` writes before each file, GPT-2's) as
  eos, bos and pad where it holds one; without one they stay unset.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from nas.corpus_files import TOKENIZER_FILE
from nas.errors import ConfigError, first_line
from nas.training.prepare import EOT

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

BYTES = 256
NUL = "\x00"  # the byte-level end-of-text token, id 0


def byte_characters() -> dict[int, str]:
    """GPT-2's table of a printable character per byte (the `tokenizers` ByteLevel
    pre-tokenizer's): the printable Latin-1 bytes are themselves, the others 256, 257, ..."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(BYTES) if b not in printable]
    return {**{b: chr(b) for b in printable},
            **{b: chr(BYTES + i) for i, b in enumerate(others)}}


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """The byte-level tokenizer (see the module docstring)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    characters = byte_characters()
    vocab = {char: b for b, char in characters.items()}
    vocab[NUL] = vocab.pop(characters[0])  # NUL is matched before the bytes are mapped
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(NUL, special=True, normalized=False)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=NUL, bos_token=NUL,
                                   pad_token=NUL, padding_side="left")


def file_tokenizer(path: Path, vocab_size: int) -> PreTrainedTokenizerFast:
    """A run's tokenizer.json (see the module docstring); refused where unreadable or where its
    ids do not fit the model's vocabulary."""
    from transformers import PreTrainedTokenizerFast

    try:
        tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(path), padding_side="left")
    except Exception as exc:  # the tokenizers library raises a bare Exception for a bad file
        raise ConfigError(f"{path}: not a tokenizer file: {first_line(exc)}") from None
    if len(tokenizer) > vocab_size:
        raise ConfigError(f"{path}: {len(tokenizer)} tokens, more than the model's "
                          f"vocab_size {vocab_size}")
    if EOT in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"eos_token": EOT, "bos_token": EOT,
                                      "pad_token": EOT})
    return tokenizer


def run_tokenizer(folder: Path, vocab_size: int, seq_len: int
                  ) -> tuple[PreTrainedTokenizerFast | None, str]:
    """The tokenizer of a `nas train` run folder, and what it is in a few words (None: the run
    has none to give, no tokenizer.json and not byte-level)."""
    path = folder / TOKENIZER_FILE
    if path.is_file():
        tokenizer, what = file_tokenizer(path, vocab_size), "the run's tokenizer.json"
    elif vocab_size == BYTES:
        tokenizer, what = byte_tokenizer(), "a byte-level tokenizer"
    else:
        return None, (f"no tokenizer: the run has no tokenizer.json and is not byte-level "
                      f"(vocab_size {vocab_size})")
    tokenizer.model_max_length = seq_len  # the longest input one forward takes
    if tokenizer.eos_token_id is None:
        what += f" (no {EOT}: eos, bos and pad unset)"
    return tokenizer, what
