"""A private, throwaway PostgreSQL server for tests and benchmarks.

`PgCluster` runs Debian's server binaries (`/usr/lib/postgresql/*/bin`, or $NAS_PG_BIN): initdb
into a fresh temporary folder, a server on a free loopback port with its unix socket in that
folder, one database, trust authentication for loopback clients. `stop()` shuts it down and
removes the folder. As root (initdb refuses to run as root) the server runs as the `postgres`
system user that the Debian package creates. Install the binaries with
`apt-get install postgresql` (`scripts/ensure-system-deps.sh` does it for `make test`).
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

SERVER_USER = "postgres"  # the Debian package's system user, used when running as root


class PgUnavailable(RuntimeError):
    """The PostgreSQL server binaries are missing or the server did not start."""


def find_bin() -> Path:
    """The folder holding initdb and pg_ctl: $NAS_PG_BIN, Debian's newest, or the PATH's."""
    candidates = [os.environ.get("NAS_PG_BIN", "")]
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                         key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit()
                         else 0, reverse=True)
    on_path = shutil.which("initdb")
    candidates += [str(Path(on_path).parent)] if on_path else []
    for folder in filter(None, candidates):
        if all((Path(folder) / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres")):
            return Path(folder)
    raise PgUnavailable(
        "PostgreSQL server binaries (initdb, pg_ctl) not found in /usr/lib/postgresql/*/bin, "
        "$NAS_PG_BIN or PATH; install them with `apt-get install -y postgresql` "
        "(scripts/ensure-system-deps.sh does it)")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PgCluster:
    """Start with `PgCluster().start()` (or as a context manager); `url` is the SQLAlchemy URL."""

    def __init__(self, database: str = "nas", user: str = "nas"):
        self.bin = find_bin()
        self.database, self.user = database, user
        self.root: Path | None = None
        self.port = 0

    @property
    def url(self) -> str:
        """The SQLAlchemy URL of the cluster's database."""
        return self.database_url(self.database)

    def database_url(self, name: str) -> str:
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/{name}"

    def create_database(self, name: str) -> str:
        """Create one more database (e.g. one per test); returns its URL."""
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user, name)
        return self.database_url(name)

    def _run(self, *cmd: str, as_server: bool = False) -> None:
        argv = [str(self.bin / cmd[0]), *cmd[1:]]
        if as_server and os.geteuid() == 0:
            argv = ["runuser", "-u", SERVER_USER, "--", *argv]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=120,
                              cwd=self.root or "/")
        if proc.returncode != 0:
            log = self.root / "server.log" if self.root else None
            tail = log.read_text(errors="replace")[-1500:] if log and log.exists() else ""
            raise PgUnavailable(f"{' '.join(cmd[:2])} failed ({proc.returncode}): "
                                f"{proc.stderr.strip()[-1500:]} {tail}".strip())

    def start(self, attempts: int = 3) -> PgCluster:
        # Directly under /tmp: the server user must be able to reach it (pytest's own temporary
        # folders are private to the user running the tests).
        self.root = Path(tempfile.mkdtemp(prefix="nas-pg-"))
        data = self.root / "data"
        if os.geteuid() == 0:
            shutil.chown(self.root, SERVER_USER)
        self._run("initdb", "-D", str(data), "-U", self.user, "--auth=trust", "-E", "UTF8",
                  "--no-instructions", as_server=True)
        for attempt in range(attempts):
            self.port = free_port()
            options = (f"-c listen_addresses=127.0.0.1 -p {self.port} "
                       f"-c unix_socket_directories={self.root} -c max_connections=200 "
                       "-c fsync=off -c synchronous_commit=off -c full_page_writes=off")
            try:
                self._run("pg_ctl", "-D", str(data), "-l", str(self.root / "server.log"),
                          "-o", options, "-w", "-t", "60", "start", as_server=True)
                break
            except PgUnavailable:
                if attempt == attempts - 1:  # the port may have been taken in between
                    self.stop()
                    raise
        self.create_database(self.database)
        return self

    def stop(self) -> None:
        if self.root is None:
            return
        data = self.root / "data"
        if (data / "postmaster.pid").exists():
            try:
                self._run("pg_ctl", "-D", str(data), "-m", "immediate", "-w", "stop",
                          as_server=True)
            except PgUnavailable:
                pass
        shutil.rmtree(self.root, ignore_errors=True)
        self.root = None

    def __enter__(self) -> PgCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

