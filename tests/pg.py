"""A private, throwaway PostgreSQL server for tests and benchmarks.

`PgCluster` runs Debian's server binaries (`/usr/lib/postgresql/*/bin`, or $NAS_PG_BIN): initdb
into a fresh temporary folder, a server that listens only on a Unix socket in that folder (no
TCP port: nobody else on the machine can reach it, the folder being private to its owner), one
database, and a random password (scram-sha-256) for its one user besides. `stop()` shuts it
down and removes the folder. As root (initdb refuses to run as root) the server runs as the
`postgres` system user that the Debian package creates. Install the binaries with
`apt-get install postgresql` (`scripts/ensure-system-deps.sh` does it for `make test`).
"""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path

SERVER_USER = "postgres"  # the Debian package's system user, used when running as root
# The socket is .s.PGSQL.<port> in the cluster's own folder: the default port collides with
# nothing there.
PORT = 5432


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


class PgCluster:
    """Start with `PgCluster().start()` (or as a context manager); `url` is the SQLAlchemy URL."""

    def __init__(self, database: str = "nas", user: str = "nas"):
        self.bin = find_bin()
        self.database, self.user = database, user
        self.password = secrets.token_hex(16)
        self.root: Path | None = None
        self.port = PORT

    @property
    def url(self) -> str:
        """The SQLAlchemy URL of the cluster's database."""
        return self.database_url(self.database)

    def database_url(self, name: str) -> str:
        """A database's SQLAlchemy URL: through the socket in the cluster's folder (`host`)."""
        return (f"postgresql+psycopg://{self.user}:{self.password}@/{name}"
                f"?host={self.root}&port={self.port}")

    def create_database(self, name: str) -> str:
        """Create one more database (e.g. one per test); returns its URL."""
        self._run("createdb", "-h", str(self.root), "-p", str(self.port), "-U", self.user, name)
        return self.database_url(name)

    def _run(self, *cmd: str, as_server: bool = False) -> None:
        argv = [str(self.bin / cmd[0]), *cmd[1:]]
        if as_server and os.geteuid() == 0:
            argv = ["runuser", "-u", SERVER_USER, "--", *argv]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=120,
                              cwd=self.root or "/", env={**os.environ, "PGPASSWORD": self.password})
        if proc.returncode != 0:
            log = self.root / "server.log" if self.root else None
            tail = log.read_text(errors="replace")[-1500:] if log and log.exists() else ""
            raise PgUnavailable(f"{' '.join(cmd[:2])} failed ({proc.returncode}): "
                                f"{proc.stderr.strip()[-1500:]} {tail}".strip())

    def start(self) -> PgCluster:
        # Directly under /tmp: the server user must be able to reach it (pytest's own temporary
        # folders are private to the user running the tests). mkdtemp makes it private (0700):
        # its owner (the server user, as root) and root alone reach the socket in it.
        self.root = Path(tempfile.mkdtemp(prefix="nas-pg-"))
        data, pwfile = self.root / "data", self.root / "password"
        pwfile.write_text(self.password)
        if os.geteuid() == 0:
            shutil.chown(self.root, SERVER_USER)
            shutil.chown(pwfile, SERVER_USER)
        # listen_addresses '': no TCP at all, the socket in the private folder only.
        options = (f"-c listen_addresses='' -p {self.port} "
                   f"-c unix_socket_directories={self.root} -c max_connections=200 "
                   "-c fsync=off -c synchronous_commit=off -c full_page_writes=off")
        try:
            try:
                self._run("initdb", "-D", str(data), "-U", self.user, "--pwfile", str(pwfile),
                          "--auth-local=scram-sha-256", "--auth-host=reject", "-E", "UTF8",
                          "--no-instructions", as_server=True)
            finally:
                pwfile.unlink()
            self._run("pg_ctl", "-D", str(data), "-l", str(self.root / "server.log"),
                      "-o", options, "-w", "-t", "60", "start", as_server=True)
            self.create_database(self.database)
        except PgUnavailable:
            self.stop()  # removes the folder, and the server if it started
            raise
        return self

    def restart(self) -> None:
        """Restart the server as an operator would (`pg_ctl restart`, fast mode: every open
        connection is ended), with the options and the log it started with."""
        self._run("pg_ctl", "-D", str(self.root / "data"), "-l", str(self.root / "server.log"),
                  "-m", "fast", "-w", "-t", "60", "restart", as_server=True)

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

