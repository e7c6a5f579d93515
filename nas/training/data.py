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

One piece (about 430 lines): the sources, the split and the loaders all serve one data module.
"""

from __future__ import annotations

import ast
import functools
import glob
import hashlib
import os
import sysconfig
from collections.abc import Callable, Iterator
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from nas.config import DataConfig, RunConfig
from nas.corpus_files import PREPARED_SPLITS, SHARD_HEADER_INTS, SHARD_MAGIC, is_shard_glob
from nas.errors import ConfigError


def cache_dir() -> Path:
    return Path(os.environ.get("RESFORMER_NAS_CACHE", Path.home() / ".cache" / "resformer-nas"))


@functools.cache
def builtin_files() -> list[Path]:
    """The stdlib's .py files outside its test suites, in a fixed order (listed once per
    process: a study's worker opens the corpus for every trial)."""
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


def read_shard(path: Path, key: str = "data.source") -> np.ndarray:
    """The tokens of one .bin shard; a file that disagrees with its header in any way is a
    ConfigError naming it (and `key`, the config key that named it)."""
    if not path.is_file():
        raise ConfigError(f"{path}: {key}: not a file; a .bin glob must match shard files")
    size, header_bytes = path.stat().st_size, SHARD_HEADER_INTS * 4
    if size < header_bytes:
        raise ConfigError(f"{path}: {key}: a short header ({size} bytes); a nanoGPT .bin shard "
                          f"starts with a {header_bytes}-byte header")
    header = np.fromfile(path, dtype=np.int32, count=SHARD_HEADER_INTS)
    if header[0] != SHARD_MAGIC:
        raise ConfigError(f"{path}: {key}: not a nanoGPT .bin shard (header magic "
                          f"{header[0]}, must be {SHARD_MAGIC})")
    n, held = int(header[2]), (size - header_bytes) // 2
    if not 1 <= n <= held:
        raise ConfigError(f"{path}: {key}: the header's token count must be between 1 and the "
                          f"{held} tokens the file holds, got {n}")
    return np.memmap(path, dtype=np.uint16, mode="r", offset=header_bytes, shape=(n,))


@functools.lru_cache(maxsize=4096)
def _largest_id(path: str, size: int, mtime_ns: int, key: str) -> int:
    """A shard's largest token id, read once per worker (each trial opens the corpus again);
    size and mtime in the cache key: a rewritten shard is read again."""
    return int(read_shard(Path(path), key).max())


def check_vocab(source: str, implied: int | None, vocab_size: int, key: str) -> None:
    """Refuse a vocab_size below the ids of `source`: bytes need 256; every shard (not only the
    first: any may hold the largest id) its largest id + 1."""
    if implied is not None:
        if vocab_size < implied:
            raise ConfigError(f"model.vocab_size: {vocab_size} is smaller than the {implied} "
                              f"byte values of {key} {source!r}")
        return
    for path in source_files(source):
        stat = path.stat()
        top = _largest_id(str(path), stat.st_size, stat.st_mtime_ns, key)
        if top >= vocab_size:
            raise ConfigError(f"{path}: model.vocab_size: {vocab_size} but this shard of {key} "
                              f"holds token id {top}; set vocab_size > {top}")


BUILTIN = {"builtin": builtin_corpus, "builtin-prose": builtin_prose}


def source_files(source: str) -> list[Path]:
    """The files a data source reads (resolved), to tell whether two sources overlap."""
    if source in BUILTIN:
        return [BUILTIN[source]().resolve()]
    if is_shard_glob(source):
        return [Path(p).resolve() for p in sorted(glob.glob(source))]
    if Path(source).is_dir():  # a `nas prepare` folder
        return sorted(p.resolve() for p in Path(source).glob("*.bin"))
    return [Path(source).resolve()]


def open_corpus(source: str, key: str = "data.source") -> tuple[list[np.ndarray], int | None]:
    """The token arrays of a data source, and the vocab they imply (None: from the model);
    `key` is the config key that names it, for the messages."""
    if source in BUILTIN:
        return [np.memmap(BUILTIN[source](), dtype=np.uint8, mode="r")], 256
    if is_shard_glob(source):
        paths = sorted(glob.glob(source))
        if not paths:
            raise ConfigError(f"{key}: no files match {source!r}")
        return [read_shard(Path(p), key) for p in paths], None
    path = Path(source)
    if path.is_dir():
        raise ConfigError(f"{source}: {key}: a folder; give a text file, or a glob of the "
                          f"shards in it ({os.path.join(source, '*.bin')})")
    if not path.is_file():
        raise ConfigError(f"{key}: {source!r} is not 'builtin', 'builtin-prose', a file "
                          "or a .bin glob (file not found)")
    if path.stat().st_size == 0:
        raise ConfigError(f"{source}: {key}: file is empty")
    return [np.memmap(path, dtype=np.uint8, mode="r")], 256


class RandomWindows(Dataset):
    """Item i is the batch of training step i: `batch_size` random windows of seq_len + 1
    tokens, drawn from an RNG seeded by (seed, i) alone. `batch_size` is the global batch:
    under DDP each of `world` processes trains on its own slice of rows (`rank`'s), of the
    batch one process would draw, so that the run trains on the same tokens on any number of
    devices."""

    def __init__(self, arrays: list[np.ndarray], seq_len: int, batch_size: int, count: int,
                 seed: int, rank: int = 0, world: int = 1):
        self.arrays, self.seq_len, self.batch_size = arrays, seq_len, batch_size
        self.count, self.seed = count, seed
        per = batch_size // world  # divisible: TokenDataModule.check_world refuses the rest
        self.rows = slice(rank * per, (rank + 1) * per)
        spans = np.clip([len(a) - seq_len - 1 for a in arrays], 0, None).astype(np.float64)
        self.weights = spans / spans.sum()

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng((self.seed, i))
        which = rng.choice(len(self.arrays), size=self.batch_size, p=self.weights)
        # Every row's start is drawn, in order, whatever rows this process reads: the RNG's
        # stream, hence every batch, stays that of one process.
        starts = [int(rng.integers(0, len(self.arrays[a]) - self.seq_len - 1)) for a in which]
        rows = [np.asarray(self.arrays[a][s:s + self.seq_len + 1], dtype=np.int64)
                for a, s in zip(which[self.rows], starts[self.rows], strict=True)]
        batch = torch.from_numpy(np.stack(rows))
        return batch[:, :-1], batch[:, 1:]


class FromStep(Sampler[int]):
    """The training steps from `start` on (0 unless a resumed run set it). Its length stays
    the run's steps: Lightning counts the batches already trained as part of the epoch."""

    def __init__(self, steps: int):
        self.steps, self.start = steps, 0

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.steps))


class StepLoader(DataLoader):
    """The training loader, resumable: Lightning stores `state_dict()` (the steps trained so
    far) in a checkpoint and hands it to `load_state_dict` on resume, so the resumed run draws
    the batches the interrupted one had still to train on, not the first ones again."""

    def __init__(self, windows: RandomWindows, steps_done: Callable[[], int]):
        super().__init__(windows, batch_size=None, sampler=FromStep(len(windows)),
                         num_workers=0)
        self.steps_done = steps_done

    def state_dict(self) -> dict[str, int]:
        return {"step": self.steps_done()}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.start = int(state["step"])


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


class Shard(Dataset):
    """Under DDP, one process's share of the validation or test batches: items rank,
    rank + world, rank + 2 world... of `dataset` (`interleave` puts the processes' results back
    in the order of `dataset`)."""

    def __init__(self, dataset: Dataset, rank: int, world: int):
        self.dataset, self.rank, self.world = dataset, rank, world

    def __len__(self) -> int:
        return len(range(self.rank, len(self.dataset), self.world))

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.dataset[self.rank + i * self.world]


def interleave(shares: list[list[float]]) -> list[float]:
    """The results of each rank's `Shard`, in the order of the whole dataset."""
    longest = max((len(share) for share in shares), default=0)
    return [share[i] for i in range(longest) for share in shares if i < len(share)]


def open_prepared(data: DataConfig, seq_len: int, vocab_size: int
                  ) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """The train, val and test shards (longer than a window) of a folder `nas prepare` wrote,
    named by data.source. The folder is split already, so the config's split keys stay unset;
    a folder without test shards makes a run without a test set."""
    folder = Path(data.source)
    splits = tuple([a for p in sorted(folder.glob(f"{name}_*.bin"))
                    if len(a := read_shard(p)) > seq_len + 1] for name in PREPARED_SPLITS)
    if not splits[0] or not splits[1]:
        raise ConfigError(f"{folder}: data.source: a folder without train_*.bin and val_*.bin "
                          f"shards longer than seq_len {seq_len} + 1 tokens; give a folder "
                          "`nas prepare` wrote, a text file, or a glob of the shards in it "
                          f"({os.path.join(data.source, '*.bin')})")
    given = [k for k, unset in (("val_fraction", DataConfig().val_fraction),
                                ("test_fraction", None), ("test_source", None))
             if getattr(data, k) != unset]
    if given:
        raise ConfigError(f"{folder}: data.{given[0]}: the folder is split already (by `nas "
                          f"prepare --val-fraction --test-fraction`); leave data.{given[0]} unset")
    check_vocab(data.source, None, vocab_size, "data.source")
    return splits


class TokenDataModule(pl.LightningDataModule):
    """One training loader of all `steps` batches; the trainer validates every
    `train.eval_interval` steps within it."""

    def __init__(self, data: DataConfig, seq_len: int, vocab_size: int, batch_size: int,
                 steps: int, seed: int, eval_batches: int, curve_batches: int | None = None):
        super().__init__()
        self.seq_len, self.batch_size, self.steps, self.seed = seq_len, batch_size, steps, seed
        self.eval_batches = eval_batches
        self.curve_batches = curve_batches or eval_batches  # the validations within fit
        if Path(data.source).is_dir():
            self.train_arrays, self.val_arrays, self.test_arrays = open_prepared(
                data, seq_len, vocab_size)
            return
        arrays, implied_vocab = open_corpus(data.source)
        check_vocab(data.source, implied_vocab, vocab_size, "data.source")
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
            test, implied_test_vocab = open_corpus(data.test_source, "data.test_source")
            check_vocab(data.test_source, implied_test_vocab, vocab_size, "data.test_source")
            self.test_arrays = [a for a in test if len(a) > seq_len + 1]
        if not self.train_arrays or not self.val_arrays or (
                not self.test_arrays and (test_share > 0 or data.test_source)):
            longest = max(len(a) for a in arrays)
            raise ConfigError(
                f"data.source: {data.source!r} is too short ({longest} tokens) for seq_len "
                f"{seq_len} with val_fraction {data.val_fraction} and test_fraction "
                f"{test_share}")

    @classmethod
    def for_run(cls, cfg: RunConfig) -> TokenDataModule:
        """The data module a run config trains and validates on."""
        t, m = cfg.train, cfg.model
        return cls(cfg.data, m.seq_len, m.vocab_size, t.batch_size, t.steps, t.seed,
                   t.eval_batches, t.curve_batches)

    def eval_digest(self) -> str:
        """A digest of the validation and test tokens: their values and type, not the paths
        they were read from."""
        digest = hashlib.sha256()
        for name, arrays in (("val", self.val_arrays), ("test", self.test_arrays)):
            for a in arrays:
                digest.update(f"{name} {a.dtype.str} {len(a)}\n".encode())
                digest.update(memoryview(np.ascontiguousarray(a)))  # a memmap slice: no copy
        return digest.hexdigest()

    def _world(self) -> tuple[int, int]:
        """This process's rank and the number of processes (0 and 1 outside DDP)."""
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    def check_world(self, world: int) -> None:
        """Refuse, before DDP launches its processes, a run its `world` processes cannot
        split as one process would run it: the global batch into equal slices, and at least
        one validation and test batch for each (DDP's first forward after a training step
        is collective, so a process without a batch would leave the others waiting)."""
        if world == 1:
            return
        if self.batch_size % world:
            raise ConfigError(f"train.batch_size: {self.batch_size} does not split into "
                              f"{world} processes (train.devices x nodes); it is the global "
                              f"batch, so give a multiple of {world}")
        for key, n, arrays in (("eval_batches", self.eval_batches, self.val_arrays),
                               ("curve_batches", self.curve_batches, self.val_arrays),
                               ("eval_batches", self.eval_batches, self.test_arrays)):
            if not arrays:
                continue  # no test set
            batches = len(FixedWindows(arrays, self.seq_len, self.batch_size, n))
            if batches < world:
                raise ConfigError(f"train.{key}: {n} gives {batches} validation or test "
                                  f"batch(es) on this data, fewer than the {world} processes "
                                  f"(train.devices x nodes); give at least {world}")

    def _eval_loader(self, ds: FixedWindows) -> DataLoader:
        rank, world = self._world()
        return DataLoader(ds if world == 1 else Shard(ds, rank, world), batch_size=None,
                          shuffle=False, num_workers=0)

    def train_dataloader(self) -> DataLoader:
        ds = RandomWindows(self.train_arrays, self.seq_len, self.batch_size, self.steps,
                           self.seed, *self._world())
        # A checkpoint is saved between steps, when the trainer's step is the steps trained.
        return StepLoader(ds, lambda: self.trainer.global_step)

    def val_dataloader(self) -> DataLoader:
        """Within fit, the curve's windows (curve_batches, evenly spaced too); else all of
        eval_batches (the final validation)."""
        fitting = self.trainer is not None and self.trainer.state.fn == "fit"
        n = self.curve_batches if fitting else self.eval_batches
        return self._eval_loader(FixedWindows(self.val_arrays, self.seq_len, self.batch_size, n))

    def test_dataloader(self) -> DataLoader | None:
        """The test windows, or None for a run without a test set."""
        if not self.test_arrays:
            return None
        return self._eval_loader(FixedWindows(self.test_arrays, self.seq_len, self.batch_size,
                                              self.eval_batches))


def write_shard(path: str | Path, tokens: np.ndarray) -> None:
    """Write tokens in the nanoGPT .bin format (used by tests and data-prep scripts)."""
    header = np.zeros(SHARD_HEADER_INTS, dtype=np.int32)
    header[0], header[1], header[2] = SHARD_MAGIC, 1, len(tokens)
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, dtype=np.uint16).tobytes())
