"""Output paths, checked before any work starts: a command that would fail to write its result
at the end (a folder where a file goes, a file where a folder goes, a path under a file, a
folder it may not write in, a name longer than the file system takes) is refused at once with
one line naming the path; and a refused command removes what it created on the way (an empty
database file, its folder). Knows nothing of torch.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from nas.errors import ConfigError, shorten

PID_ROOM = "4194304"  # the longest pid Linux gives (pid_max): for `<name>.incomplete-<pid>`


def first_process() -> bool:
    """Whether this process is its run's global rank 0, or its only process. Read from the
    variables the launchers set (Lightning's DDP launcher for the processes it starts again
    with this command, torchrun), since it is needed before a Trainer exists, or torch is
    imported: only rank 0 writes the run folder, handles its checkpoint folder and prints."""
    if "RANK" in os.environ:
        return os.environ["RANK"] == "0"
    return all(os.environ.get(key, "0") == "0" for key in ("LOCAL_RANK", "NODE_RANK"))


def _limit(folder: Path, name: str, default: int) -> int:
    try:
        return os.pathconf(folder, name)
    except (OSError, ValueError):
        return default


def nearest_existing(path: Path) -> Path:
    """The nearest of `path` and its parents that exists (`path` absolute)."""
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def check_output(path: str | Path, where: str, *, folder: bool, suffixes: Sequence[str] = (),
                 inside: Sequence[str] = ()) -> Path:
    """Refuse an output path that the work could not write: `folder` says whether it is a
    folder (else a file); `suffixes` are what is written beside it under its name plus the
    suffix (`.incomplete-<pid>`, SQLite's `-wal`), `inside` the longest names written in a
    folder. Returns the path."""
    if not str(path).strip():
        raise ConfigError(f"{where}: must not be empty")
    path = Path(path)
    shown = shorten(str(path), 120)
    if path.is_dir() and not folder:
        raise ConfigError(f"{where}: {shown} is a folder; name the file to write")
    if path.exists() and not path.is_dir() and folder:
        raise ConfigError(f"{where}: {shown} is a file, not a folder")
    absolute = Path(os.path.abspath(path))
    # the folder written in: an existing output folder itself, else the nearest existing parent
    existing = absolute if folder and path.is_dir() else nearest_existing(absolute.parent)
    if not existing.is_dir():
        raise ConfigError(f"{where}: {shown}: {shorten(str(existing), 120)} is a file, so "
                          "nothing can be created under it")
    effective = os.access in os.supports_effective_ids
    if not os.access(existing, os.W_OK | os.X_OK, effective_ids=effective):
        raise ConfigError(f"{where}: {shown}: cannot write in {shorten(str(existing), 120)} "
                          "(permission denied or a read-only file system)")
    name_max = _limit(existing, "PC_NAME_MAX", 255)
    created = absolute.relative_to(existing).parts
    names = [*created, *(absolute.name + s for s in suffixes), *inside]
    for name in names:
        if len(os.fsencode(name)) > name_max:
            raise ConfigError(f"{where}: {shown}: the name {shorten(name)} is "
                              f"{len(os.fsencode(name))} bytes, longer than the {name_max} "
                              "this file system takes")
    longest = len(os.fsencode(absolute)) + max((len(s) for s in [*suffixes, *inside]), default=0)
    path_max = _limit(existing, "PC_PATH_MAX", 4096)
    if longest >= path_max:
        raise ConfigError(f"{where}: {shown}: a path of {longest} bytes, longer than the "
                          f"{path_max} this file system takes")
    return path


@contextlib.contextmanager
def removed_if_refused(path: Path | None, suffixes: Sequence[str] = ()) -> Iterator[None]:
    """What the block creates at `path` (a file and the files beside it named by `suffixes`;
    a folder, which the block removes itself) and the folders made for it are removed if the
    block raises a ConfigError: a refused command leaves nothing behind. What existed before
    is never touched."""
    if path is None or os.path.lexists(path):
        yield
        return
    absolute = Path(os.path.abspath(path))
    top = nearest_existing(absolute)
    new = [absolute.with_name(absolute.name + s) for s in ("", *suffixes)]
    new = [p for p in new if not os.path.lexists(p)]
    try:
        yield
    except ConfigError:
        for p in new:
            with contextlib.suppress(OSError):
                p.unlink()
        folder = absolute.parent
        while folder != top:  # the folders made for it, if nothing else went there
            with contextlib.suppress(OSError):
                folder.rmdir()
            folder = folder.parent
        raise
