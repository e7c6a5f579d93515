"""Token corpora and the LightningDataModule that serves them.

Four sources, all memory-mapped so a corpus larger than RAM works:
- `builtin`: the Python standard library's own source files, read as bytes (vocab 256). Every
  Python installation carries them, so the tool runs with no download. They are concatenated
  once into a cache file (`~/.cache/resformer-nas`, or $RESFORMER_NAS_CACHE).
- `builtin-prose`: English prose from the same installation: the language reference's topics
  (`pydoc_data`) and every docstring of the standard library, as UTF-8 bytes. Prose about
  Python, not general-domain text; it needs no download either.
- a path to a text file: its UTF-8 bytes (vocab 256).
- a glob of nanoGPT / modded-nanogpt `.bin` shards: a 256 x int32 header (magic 20240520,
  version 1, token count) and uint16 tokens.

Each shard (or file) is split at fixed points: the first (1 - val_fraction - test_fraction)
trains, the next val_fraction validates, the tail tests (or `test_source` is the test set, and
must not share a file with the training data). Training windows are drawn at random, seeded by
(seed, step), so a run's batches do not depend on workers or restarts; validation and test
windows are fixed and evenly spaced, so every run with the same data and model.seq_len is
scored on the same tokens.
"""

from __future__ import annotations

import ast
import glob
import hashlib
import os
import sysconfig
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .config import ConfigError, DataConfig, RunConfig

SHARD_MAGIC = 20240520
SHARD_HEADER_INTS = 256


def cache_dir() -> Path:
    return Path(os.environ.get("RESFORMER_NAS_CACHE", Path.home() / ".cache" / "resformer-nas"))


def builtin_files() -> list[Path]:
    """The stdlib's .py files outside its test suites, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
    return sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts))


def builtin_corpus() -> Path:
    """Concatenate the builtin corpus into a cache file once; return its path."""
    files = builtin_files()
    key = hashlib.sha256("\n".join(f"{p}:{p.stat().st_size}" for p in files).encode())
    path = cache_dir() / f"builtin-{key.hexdigest()[:16]}.txt"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        with tmp.open("wb") as out:
            for p in files:
                out.write(p.read_bytes())
        tmp.replace(path)  # atomic, so parallel workers never read a half-written file
    return path


def builtin_prose() -> Path:
    """Concatenate the prose corpus (see the module docstring) into a cache file once."""
    files = builtin_files()
    key = hashlib.sha256(("prose\n" + "\n".join(f"{p}:{p.stat().st_size}" for p in files))
                         .encode())
    path = cache_dir() / f"builtin-prose-{key.hexdigest()[:16]}.txt"
    if not path.exists():
        from pydoc_data.topics import topics

        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        with tmp.open("w", encoding="utf-8") as out:
            for name in sorted(topics):
                out.write(topics[name] + "\n\n")
            for p in files:
                for doc in _docstrings(p):
                    out.write(doc + "\n\n")
        tmp.replace(path)
    return path


def _docstrings(path: Path) -> list[str]:
    try:
        tree = ast.parse(path.read_bytes())
    except (SyntaxError, ValueError):
        return []
    nodes = [tree, *(n for n in ast.walk(tree) if isinstance(
        n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)))]
    return [doc for n in nodes if (doc := ast.get_docstring(n)) and len(doc) >= 80]


def read_shard(path: Path) -> np.ndarray:
    header = np.fromfile(path, dtype=np.int32, count=SHARD_HEADER_INTS)
    if header.size < 3 or header[0] != SHARD_MAGIC:
        raise ConfigError(f"{path}: data.source: not a nanoGPT .bin shard "
                          f"(header magic must be {SHARD_MAGIC})")
    n = int(header[2])
    tokens = np.memmap(path, dtype=np.uint16, mode="r", offset=SHARD_HEADER_INTS * 4)
    if tokens.size < n:
        raise ConfigError(f"{path}: data.source: header says {n} tokens, file holds {tokens.size}")
    return tokens[:n]


BUILTIN = {"builtin": builtin_corpus, "builtin-prose": builtin_prose}


def source_files(source: str) -> list[Path]:
    """The files a data source reads (resolved), to tell whether two sources overlap."""
    if source in BUILTIN:
        return [BUILTIN[source]().resolve()]
    if any(ch in source for ch in "*?[") or source.endswith(".bin"):
        return [Path(p).resolve() for p in sorted(glob.glob(source))]
    return [Path(source).resolve()]


def open_corpus(source: str) -> tuple[list[np.ndarray], int | None]:
    """The token arrays of a data source, and the vocab they imply (None: from the model)."""
    if source in BUILTIN:
        return [np.memmap(BUILTIN[source](), dtype=np.uint8, mode="r")], 256
    if any(ch in source for ch in "*?[") or source.endswith(".bin"):
        paths = sorted(glob.glob(source))
        if not paths:
            raise ConfigError(f"data.source: no files match {source!r}")
        return [read_shard(Path(p)) for p in paths], None
    path = Path(source)
    if not path.is_file():
        raise ConfigError(f"data.source: {source!r} is not 'builtin', 'builtin-prose', a file "
                          "or a .bin glob (file not found)")
    if path.stat().st_size == 0:
        raise ConfigError(f"{source}: data.source: file is empty")
    return [np.memmap(path, dtype=np.uint8, mode="r")], 256


class RandomWindows(Dataset):
    """Item i is batch `first + i`: `batch_size` random windows of seq_len + 1 tokens."""

    def __init__(self, arrays: list[np.ndarray], seq_len: int, batch_size: int, first: int,
                 count: int, seed: int):
        self.arrays, self.seq_len, self.batch_size = arrays, seq_len, batch_size
        self.first, self.count, self.seed = first, count, seed
        spans = np.clip([len(a) - seq_len - 1 for a in arrays], 0, None).astype(np.float64)
        self.weights = spans / spans.sum()

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng((self.seed, self.first + i))
        which = rng.choice(len(self.arrays), size=self.batch_size, p=self.weights)
        rows = []
        for a in which:
            arr = self.arrays[a]
            start = int(rng.integers(0, len(arr) - self.seq_len - 1))
            rows.append(np.asarray(arr[start:start + self.seq_len + 1], dtype=np.int64))
        batch = torch.from_numpy(np.stack(rows))
        return batch[:, :-1], batch[:, 1:]


class FixedWindows(Dataset):
    """Evenly spaced validation windows, the same for every run of a corpus and seq_len."""

    def __init__(self, arrays: list[np.ndarray], seq_len: int, batch_size: int, n_batches: int):
        self.seq_len, self.batch_size = seq_len, batch_size
        total = sum(len(a) for a in arrays)
        n_windows = batch_size * n_batches
        self.windows: list[tuple[np.ndarray, int]] = []
        for a in arrays:
            k = max(1, round(n_windows * len(a) / total))
            last = len(a) - seq_len - 1
            self.windows += [(a, int(s)) for s in np.linspace(0, last, k).astype(np.int64)]
        self.windows = self.windows[:n_windows]

    def __len__(self) -> int:
        return (len(self.windows) + self.batch_size - 1) // self.batch_size

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        chunk = self.windows[i * self.batch_size:(i + 1) * self.batch_size]
        batch = torch.from_numpy(np.stack([
            np.asarray(a[s:s + self.seq_len + 1], dtype=np.int64) for a, s in chunk
        ]))
        return batch[:, :-1], batch[:, 1:]


class TokenDataModule(pl.LightningDataModule):
    """Each epoch is one evaluation interval of training batches, so that validation (and the
    pruners that report per validation) runs at every epoch end."""

    def __init__(self, data: DataConfig, seq_len: int, vocab_size: int, batch_size: int,
                 steps: int, seed: int, eval_batches: int, eval_interval: int):
        super().__init__()
        arrays, implied_vocab = open_corpus(data.source)
        if implied_vocab is not None and vocab_size < implied_vocab:
            raise ConfigError(f"model.vocab_size: {vocab_size} is smaller than the {implied_vocab} "
                              f"byte values of data.source {data.source!r}")
        test_share = data.test_share
        self.train_arrays, self.val_arrays, self.test_arrays = [], [], []
        for a in arrays:
            c1 = int(len(a) * (1 - data.val_fraction - test_share))
            c2 = int(len(a) * (1 - test_share))
            for part, chunk in ((self.train_arrays, a[:c1]), (self.val_arrays, a[c1:c2]),
                                (self.test_arrays, a[c2:])):
                if len(chunk) > seq_len + 1:
                    part.append(chunk)
        if data.test_source:
            overlap = set(source_files(data.test_source)) & set(source_files(data.source))
            if overlap:
                raise ConfigError(f"data.test_source: {sorted(overlap)[0]} is also a training "
                                  "file of data.source; the test set must be held out")
            test, _ = open_corpus(data.test_source)
            self.test_arrays = [a for a in test if len(a) > seq_len + 1]
        if not self.train_arrays or not self.val_arrays or (
                not self.test_arrays and (test_share > 0 or data.test_source)):
            longest = max(len(a) for a in arrays)
            raise ConfigError(
                f"data.source: {data.source!r} is too short ({longest} tokens) for seq_len "
                f"{seq_len} with val_fraction {data.val_fraction} and test_fraction "
                f"{test_share}")
        if implied_vocab is None:
            top = max(int(a.max()) for a in arrays[:1])
            if top >= vocab_size:
                raise ConfigError(f"model.vocab_size: {vocab_size} but data.source holds token "
                                  f"id {top}; set vocab_size > {top}")
        self.seq_len, self.batch_size, self.steps, self.seed = seq_len, batch_size, steps, seed
        self.eval_batches, self.eval_interval = eval_batches, eval_interval

    @classmethod
    def for_run(cls, cfg: RunConfig) -> TokenDataModule:
        """The data module a run config trains and validates on."""
        t, m = cfg.train, cfg.model
        return cls(cfg.data, m.seq_len, m.vocab_size, t.batch_size, t.steps, t.seed,
                   t.eval_batches, t.eval_interval)

    def train_dataloader(self) -> DataLoader:
        # Rebuilt every epoch (reload_dataloaders_every_n_epochs=1) at the epoch's first step.
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        first = epoch * self.eval_interval
        count = max(0, min(self.eval_interval, self.steps - first))
        ds = RandomWindows(self.train_arrays, self.seq_len, self.batch_size, first, count,
                           self.seed)
        return DataLoader(ds, batch_size=None, shuffle=False, num_workers=0)

    def val_dataloader(self) -> DataLoader:
        ds = FixedWindows(self.val_arrays, self.seq_len, self.batch_size, self.eval_batches)
        return DataLoader(ds, batch_size=None, shuffle=False, num_workers=0)

    def test_dataloader(self) -> DataLoader | None:
        """The test windows, or None for a run without a test set."""
        if not self.test_arrays:
            return None
        ds = FixedWindows(self.test_arrays, self.seq_len, self.batch_size, self.eval_batches)
        return DataLoader(ds, batch_size=None, shuffle=False, num_workers=0)


def write_shard(path: str | Path, tokens: np.ndarray) -> None:
    """Write tokens in the nanoGPT .bin format (used by tests and data-prep scripts)."""
    header = np.zeros(SHARD_HEADER_INTS, dtype=np.int32)
    header[0], header[1], header[2] = SHARD_MAGIC, 1, len(tokens)
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, dtype=np.uint16).tobytes())
