"""A private, real PostgreSQL server for tests: the Debian package's binaries, a fresh data
directory, a free loopback port. The test session starts one (the ``postgres`` fixture) and every
test gets a fresh database on it; fault tests start their own so they can stop and restart it.

    pg = PostgresServer(tmp_dir)      # initdb + start
    url = pg.create_database()        # postgresql+psycopg://pocketrec@127.0.0.1:<port>/t_<hex>
    pg.stop(); pg.start()             # a real outage: clients see refused connections
    pg.close()

PostgreSQL refuses to run as root; as root the server runs as the ``postgres`` system user
(created by the Debian package), with its files in a directory that user owns."""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

USER = "pocketrec"
# CI (.ci/run) sets it: a missing PostgreSQL fails the tests that need it instead of skipping.
REQUIRE_POSTGRES = os.environ.get("POCKETREC_REQUIRE_POSTGRES") == "1"


def find_bindir() -> Path | None:
    """Where initdb / pg_ctl live: PATH, else the newest Debian /usr/lib/postgresql/*/bin."""
    on_path = shutil.which("pg_ctl")
    if on_path:
        return Path(on_path).resolve().parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"),
                        key=lambda p: int(Path(p).parts[-3]))
    return Path(candidates[-1]).parent if candidates else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    def __init__(self, root: str | Path | None = None) -> None:
        bindir = find_bindir()
        if bindir is None:
            raise RuntimeError("no PostgreSQL server binaries (apt-get install postgresql)")
        self.bindir = bindir
        # As root the files must belong to the server's user, and a pytest tmp_path under
        # /tmp/pytest-of-root is not traversable by it: use a directory of its own.
        self._owned_root = root is None
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="pg-"))
        self.root.mkdir(parents=True, exist_ok=True)
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"
        self.port = _free_port()
        self._as = []
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]
        self._run("initdb", "-D", str(self.data), "-U", USER, "-A", "trust", "-E", "UTF8",
                  "--no-sync", "--no-instructions")
        # Tests, not production: no fsync. Killing PostgreSQL is not a fault we inject; it
        # is stopped cleanly (pg_ctl stop) when a test takes it away.
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(f"\nport = {self.port}\nlisten_addresses = '127.0.0.1'\n"
                       f"unix_socket_directories = '{self.root}'\nfsync = off\n"
                       "synchronous_commit = off\nfull_page_writes = off\n"
                       "max_connections = 200\n")
        self.start()

    def _run(self, tool: str, *args: str) -> None:
        result = subprocess.run([*self._as, str(self.bindir / tool), *args],
                                capture_output=True, text=True)
        if result.returncode != 0:
            log = self.log.read_text() if self.log.exists() else ""
            raise RuntimeError(f"{tool} failed: {result.stderr}{result.stdout}\n{log}")

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60",
                  "start")

    def stop(self) -> None:
        """Stop now (fast shutdown: open connections are cut, as in a database outage)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://{USER}@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A fresh, empty database; its SQLAlchemy URL."""
        import psycopg

        name = "t_" + secrets.token_hex(6)
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user={USER} dbname=postgres",
                             autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def close(self) -> None:
        if (self.data / "postmaster.pid").exists():
            with contextlib.suppress(RuntimeError):
                self.stop()
        if self._owned_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
