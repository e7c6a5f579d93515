"""`nas prepare`: text files -> a byte-level BPE tokenizer and nanoGPT `.bin` shards.

Writes into one folder: `tokenizer.json`, and `train_000000.bin ...`, `val_000000.bin ...`,
`test_000000.bin ...` in the format `nas.training.data` reads (a 256 x int32 header, uint16
tokens). A run config whose `data.source` is that folder trains on `train_*`, validates on `val_*`,
tests on `test_*` and takes `model.vocab_size` from `tokenizer.json`.

The inputs are one stream, in the order given: its first (1 - val - test) bytes train, the next
val validate, the last test; a line that crosses a cut stays whole in the earlier split, so with
several files the last ones are the held-out text. Each file starts with `<|endoftext|>` (the
document separator of GPT-2 and modded-nanogpt's shards). The tokenizer learns from the training
split only: held-out text must not shape the vocabulary it is scored with.

Memory stays bounded on inputs larger than RAM: the files are read in pieces of about a MiB
(twice: to train the tokenizer, then to encode) and every shard is written as its tokens come.
Needs the `tokenizers` package (`pip install 'resformer-nas[tokenizers]'`); nothing downloads.
"""

from __future__ import annotations

import codecs
import itertools
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, BinaryIO, NamedTuple

import numpy as np
from tqdm import tqdm

from nas.corpus_files import PREPARED_SPLITS, SHARD_HEADER_INTS, SHARD_MAGIC, TOKENIZER_FILE
from nas.errors import ConfigError, first_line
from nas.paths import PID_ROOM, check_output

if TYPE_CHECKING:
    from tokenizers import Tokenizer

EOT = "<|endoftext|>"
MIN_VOCAB = 256  # every byte is a token of a byte-level BPE
MAX_VOCAB = 65535  # token ids are stored as uint16
PIECE_BYTES = 1 << 20
ENCODE_BATCH = 16  # pieces encoded together, in parallel threads of the tokenizers library
SHARD_TOKENS = 100_000_000  # modded-nanogpt's shard size
MAX_SHARD_TOKENS = 2**31 - 1


class Prepared(NamedTuple):
    """What `prepare` wrote: the folder, the vocabulary size, the tokens and the shards of
    each split."""

    out: Path
    vocab_size: int
    tokens: dict[str, int]
    shards: dict[str, int]


def check_inputs(files: Sequence[str | Path]) -> list[Path]:
    """The input files, refused when missing, empty or binary (a NUL byte or no UTF-8 near
    the start; text that turns invalid later is refused when the reading reaches it)."""
    paths = []
    for name in files:
        path = Path(name)
        if not path.is_file():
            raise ConfigError(f"{path}: file not found")
        if path.stat().st_size == 0:
            raise ConfigError(f"{path}: file is empty")
        with path.open("rb") as f:
            _decode(_utf8(), path, f.read(8192), 0, final=False)
        paths.append(path)
    return paths


def _utf8() -> codecs.IncrementalDecoder:
    return codecs.getincrementaldecoder("utf-8")()


def _decode(decoder: codecs.IncrementalDecoder, path: Path, data: bytes, offset: int,
            final: bool) -> str:
    """`data` (from byte `offset` of `path`) as text, or one line saying where it is not."""
    nul = data.find(b"\0")
    if nul >= 0:
        raise ConfigError(f"{path}: a binary file (a NUL byte at offset {offset + nul}); "
                          "nas prepare reads UTF-8 text")
    try:
        return decoder.decode(data, final=final)
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (near byte {offset + exc.start})") from None


def _file_pieces(f: BinaryIO) -> Iterator[bytes]:
    """A file in pieces of about PIECE_BYTES that end after a newline where the piece has
    one, so that a read never splits a line."""
    carry = b""
    while True:
        data = f.read(PIECE_BYTES)
        buf = carry + data
        if not buf:
            return
        cut = buf.rfind(b"\n") + 1 if data else len(buf)
        if cut == 0:  # no newline in the piece: a very long line, cut where the read ended
            cut = len(buf)
        yield buf[:cut]
        carry = buf[cut:]


Ends = tuple[int, int, int]  # where each split (train, val, test) of the stream ends, in bytes


def split_ends(total: int, val_fraction: float, test_fraction: float) -> Ends:
    return (round(total * (1 - val_fraction - test_fraction)), round(total * (1 - test_fraction)),
            total)


class Piece(NamedTuple):
    split: int  # index into PREPARED_SPLITS
    starts_file: bool
    size: int  # bytes
    text: str


def split_text(paths: Sequence[Path], ends: Ends) -> Iterator[Piece]:
    """The inputs as pieces of text, each within one split, cut as the module docstring says."""
    pos, index = 0, 0
    for path in paths:
        decoder, file_pos, starts = _utf8(), 0, True
        with path.open("rb") as f:
            for piece in _file_pieces(f):
                while piece:
                    while index < 2 and pos >= ends[index]:
                        index += 1
                    cut = len(piece)
                    if index < 2 and ends[index] - pos < len(piece):
                        # after the line that holds the split's last byte
                        newline = piece.find(b"\n", ends[index] - pos - 1)
                        cut = newline + 1 if newline >= 0 else len(piece)
                    text = _decode(decoder, path, piece[:cut], file_pos, final=False)
                    yield Piece(index, starts, cut, text)
                    starts, piece = False, piece[cut:]
                    pos, file_pos = pos + cut, file_pos + cut
        _decode(decoder, path, b"", file_pos, final=True)  # a character cut off at the end


class ShardWriter:
    """One split's tokens as `<split>_NNNNNN.bin` shards of at most `limit` tokens. A shard's
    header (with its token count) is written when the shard is full or the writer closes."""

    def __init__(self, folder: Path, split: str, limit: int):
        self.folder, self.split, self.limit = folder, split, limit
        self.count = self.total = 0
        self.paths: list[Path] = []
        self.file: BinaryIO | None = None

    def write(self, ids: np.ndarray) -> None:
        while len(ids):
            if self.file is None:
                path = self.folder / f"{self.split}_{len(self.paths):06d}.bin"
                self.paths.append(path)
                self.file = path.open("wb")
                self.file.write(bytes(SHARD_HEADER_INTS * 4))  # the header, once counted
            room = self.limit - self.count
            self.file.write(ids[:room].astype(np.uint16).tobytes())
            self.count += min(room, len(ids))
            ids = ids[room:]
            if self.count == self.limit:
                self._finish()

    def _finish(self) -> None:
        assert self.file is not None
        header = np.zeros(SHARD_HEADER_INTS, dtype=np.int32)
        header[0], header[1], header[2] = SHARD_MAGIC, 1, self.count
        self.file.seek(0)
        self.file.write(header.tobytes())
        self.file.close()
        self.total += self.count
        self.file, self.count = None, 0

    def close(self) -> None:
        if self.file is not None:
            self._finish()


def _tokenizers() -> ModuleType:
    """The tokenizers package, imported only by the commands that need it (an extra)."""
    try:
        import tokenizers
    except ImportError:
        raise ConfigError("nas prepare needs the tokenizers package: pip install "
                          "'resformer-nas[tokenizers]'") from None
    return tokenizers


def train_tokenizer(texts: Iterator[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE tokenizer (GPT-2's pre-tokenizer and decoder) of `vocab_size` tokens
    at most, learned from `texts`. The library's own progress bars stay off: the caller's bar
    over the bytes read is the one shown."""
    tk = _tokenizers()
    tokenizer = tk.Tokenizer(tk.models.BPE())
    tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tk.decoders.ByteLevel()
    # 256 leaves no room for a separator beside the bytes: such a vocabulary is the bytes alone
    trainer = tk.trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOT] if vocab_size > MIN_VOCAB else [],
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A `tokenizer.json`, refused when unreadable or when its ids do not fit uint16 shards."""
    tk = _tokenizers()
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--tokenizer: {path}: file not found")
    try:
        tokenizer = tk.Tokenizer.from_file(str(path))
    except Exception as exc:  # the library raises a bare Exception for a bad file
        first = first_line(exc)
        raise ConfigError(f"--tokenizer: {path}: not a tokenizer file: {first}") from None
    if tokenizer.get_vocab_size() > MAX_VOCAB + 1:
        raise ConfigError(f"--tokenizer: {path}: {tokenizer.get_vocab_size()} tokens; uint16 "
                          f"shards hold ids up to {MAX_VOCAB}")
    return tokenizer


def check_options(vocab_size: int | None, tokenizer: str | None, val_fraction: float,
                  test_fraction: float, shard_tokens: int) -> None:
    if (vocab_size is None) == (tokenizer is None):
        raise ConfigError("--vocab-size: give it (to train a tokenizer) or --tokenizer FILE, "
                          "not both and not neither")
    if vocab_size is not None and not MIN_VOCAB <= vocab_size <= MAX_VOCAB:
        raise ConfigError(f"--vocab-size: must be in {MIN_VOCAB}..{MAX_VOCAB} (the 256 bytes at "
                          f"least; uint16 shards), got {vocab_size}")
    if not 0 < val_fraction < 1:
        raise ConfigError(f"--val-fraction: must be in (0, 1), got {val_fraction}")
    if not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise ConfigError(f"--test-fraction: must be in [0, 1) with --val-fraction "
                          f"{val_fraction} summing below 1, got {test_fraction}")
    if not 1 <= shard_tokens <= MAX_SHARD_TOKENS:
        raise ConfigError(f"--shard-tokens: must be in 1..{MAX_SHARD_TOKENS} (a shard header "
                          f"counts its tokens in an int32), got {shard_tokens}")


def prepare(files: Sequence[str | Path], out: str | Path, *, vocab_size: int | None = None,
            tokenizer: str | None = None, val_fraction: float = 0.1,
            test_fraction: float = 0.05, shard_tokens: int | None = None,
            progress: bool = True) -> Prepared:
    """Tokenize `files` into shards in `out` (see the module docstring). Everything is written
    into `<out>.incomplete-<pid>` and renamed to `out` at the end, so a failed run (bad text
    found late, Ctrl+C) leaves no half-written corpus. `shard_tokens` None: SHARD_TOKENS."""
    shard_tokens = SHARD_TOKENS if shard_tokens is None else shard_tokens
    check_options(vocab_size, tokenizer, val_fraction, test_fraction, shard_tokens)
    _tokenizers()  # a missing extra is one line, before any progress bar
    paths = check_inputs(files)
    out = check_output(out, "--out", folder=True, suffixes=(f".incomplete-{PID_ROOM}",))
    out = out.resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out: {out} exists and is not an empty folder; choose another")
    ends = split_ends(sum(p.stat().st_size for p in paths), val_fraction, test_fraction)
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer)
    else:
        assert vocab_size is not None
        with _bar(ends[0], "Reading for the tokenizer", progress) as bar:
            tok = train_tokenizer(_training_text(paths, ends, bar), vocab_size)

    staging = out.with_name(f"{out.name}.incomplete-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        tokens, shards = _encode(tok, paths, ends, staging, shard_tokens, progress)
        wanted = {"train": True, "val": True, "test": test_fraction > 0}
        empty = [name for name in PREPARED_SPLITS if wanted[name] and not tokens[name]]
        if empty:
            raise ConfigError(f"the {empty[0]} split came out empty: the input has too few "
                              "lines to cut at these fractions (a line is never split)")
        tok.save(str(staging / TOKENIZER_FILE))
        if out.exists():
            out.rmdir()  # empty, checked above
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Prepared(out, tok.get_vocab_size(), tokens, shards)


def _bar(total: int, what: str, progress: bool) -> tqdm:
    return tqdm(total=total, desc=what, unit="B", unit_scale=True, disable=not progress)


def _training_text(paths: Sequence[Path], ends: Ends, bar: tqdm) -> Iterator[str]:
    for piece in split_text(paths, ends):
        if piece.split > 0:
            return  # the held-out text follows the training text
        bar.update(piece.size)
        yield piece.text


def _encode(tok: Tokenizer, paths: Sequence[Path], ends: Ends, folder: Path,
            shard_tokens: int, progress: bool) -> tuple[dict[str, int], dict[str, int]]:
    """Write the shards; the tokens and the shards of each split."""
    writers = [ShardWriter(folder, name, shard_tokens) for name in PREPARED_SPLITS]
    eot = tok.token_to_id(EOT)
    pieces = split_text(paths, ends)
    with _bar(ends[-1], "Encoding", progress) as bar:
        while batch := list(itertools.islice(pieces, ENCODE_BATCH)):
            encoded = tok.encode_batch([piece.text for piece in batch])
            for piece, enc in zip(batch, encoded, strict=True):
                ids = np.asarray(enc.ids, dtype=np.int64)
                if piece.starts_file and eot is not None:
                    ids = np.concatenate([[eot], ids])
                writers[piece.split].write(ids)
                bar.update(piece.size)
    for w in writers:
        w.close()
    return ({name: w.total for name, w in zip(PREPARED_SPLITS, writers, strict=True)},
            {name: len(w.paths) for name, w in zip(PREPARED_SPLITS, writers, strict=True)})
