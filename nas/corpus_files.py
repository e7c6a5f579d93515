"""A prepared corpus's files: the nanoGPT / modded-nanogpt `.bin` token shard format, the splits
of a `nas prepare` folder, and the tokenizer.json beside the shards (read as JSON for its
vocabulary, so training on shards needs no tokenizers package). No torch: `nas prepare` writes
shards, the config reads the vocabulary, the data module reads the tokens.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from nas.errors import ConfigError

SHARD_MAGIC = 20240520
SHARD_HEADER_INTS = 256  # int32 header: magic, version 1, token count, then zeros
# A folder `nas prepare` wrote holds <split>_NNNNNN.bin shards of these splits.
PREPARED_SPLITS = ("train", "val", "test")


TOKENIZER_FILE = "tokenizer.json"  # beside a corpus's .bin shards: the ids' vocabulary


def is_shard_glob(source: str) -> bool:
    """Whether a data source names nanoGPT .bin shards by a glob or a .bin path (a folder of
    them is the other way to name shards, `nas prepare`'s)."""
    return any(ch in source for ch in "*?[") or source.endswith(".bin")


def shard_tokenizer(source: str) -> Path | None:
    """The tokenizer.json of a shard source: in its folder, or in the folder its glob names
    (None for builtin text or a text file, which are bytes)."""
    if Path(source).is_dir():
        path = Path(source) / TOKENIZER_FILE
    elif is_shard_glob(source):
        path = Path(source).parent / TOKENIZER_FILE
    else:
        return None
    return path if path.is_file() else None


def tokenizer_vocab(path: Path) -> int:
    """The vocabulary a model needs for a tokenizer.json's ids: the largest id + 1, its added
    tokens included. Read as JSON, so training on shards needs no tokenizers package."""
    stat = path.stat()
    return _tokenizer_vocab(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=16)
def _tokenizer_vocab(path: str, mtime_ns: int, size: int) -> int:
    # keyed by the file's stat too: a study draws many configs from one tokenizer, and a
    # rewritten file is read again
    try:
        tokenizer = json.loads(Path(path).read_text(encoding="utf-8"))
        vocab, added = tokenizer["model"]["vocab"], tokenizer.get("added_tokens") or []
        ids = list(vocab.values()) if isinstance(vocab, dict) else list(range(len(vocab)))
        return max(ids + [t["id"] for t in added]) + 1
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path}: not a tokenizer file ({type(exc).__name__}: {exc})") from None
