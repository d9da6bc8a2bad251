"""The real sync server in a subprocess on loopback: for the simulator and for tests.

    with ServerProcess(tmp_path / "server", ADMIN_TOKEN="secret") as server:
        server.url          http://127.0.0.1:<port>
        server.data_dir     its DATA_DIR
        server.log_path     its stderr (request log, tracebacks), beside DATA_DIR
        server.admin(method, path, **kw)   an urllib3 request with the admin token

Settings are passed as POCKETREC_* environment variables, the way an operator would. The
server picks a free port (``--port 0``) and prints it; the helper waits for /healthz. A
``port`` binds that port instead: a server restarted after a crash comes back where its
devices (and their in-flight SecAgg+ sessions) expect it. The per-address rate limits are
off unless given (all its devices share 127.0.0.1)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import urllib3

# The directory holding the sync_server package that this trainer runs with (the checkout
# in development, site-packages when installed): first on the child's path.
REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 60
# What sync_server.create_app logs when an app (one per gunicorn worker) is ready.
READY_MESSAGE = "sync server ready"


class ServerProcess:
    def __init__(self, data_dir: str | Path, *, port: int = 0,
                 python: str | Path = sys.executable, **settings: Any) -> None:
        """``python``: the interpreter to run the server with (default this one; a test runs
        it from a venv with the ``server`` extra only)."""
        self.data_dir = Path(data_dir)
        self.settings = {k: str(v) for k, v in settings.items()}
        env = self._prepare()
        self.process = subprocess.Popen(
            [str(python), "-m", "sync_server", "--host", "127.0.0.1", "--port", str(int(port)),
             "--data-dir", str(self.data_dir)],
            cwd=self.data_dir.parent, env=env, stdout=subprocess.PIPE, stderr=self._log,
            text=True,
            # Its own session: a Ctrl-C in the terminal reaches the simulator, which then
            # stops the server in order, rather than killing it mid-request.
            start_new_session=True,
        )
        line = self.process.stdout.readline()  # EOF (empty) if the server died
        if not line.startswith("listening on "):
            self.close()
            raise RuntimeError(f"server did not start: {line!r}\n{self.log_path.read_text()}")
        self.url = line.split()[-1]
        # Reads wait long: a DP round's accountant (PLD) and the export are slow when busy.
        self.http = urllib3.PoolManager(retries=False,
                                        timeout=urllib3.Timeout(connect=10.0, read=300.0))
        health = self.http.request("GET", self.url + "/healthz")
        if health.status != 200:
            self.close()
            raise RuntimeError(f"/healthz answered {health.status}: {health.data!r}")

    def _prepare(self) -> dict[str, str]:
        """The child's environment (settings as POCKETREC_* variables, this checkout first on
        the path) and its log file beside DATA_DIR."""
        # Every virtual device here shares one loopback address, so the per-address limits
        # would throttle a whole simulated fleet as one client: off unless a caller sets them.
        for key in ("REGISTER_LIMIT_PER_ADDRESS", "CHECKIN_LIMIT_PER_ADDRESS"):
            self.settings.setdefault(key, "off")
        env = {k: v for k, v in os.environ.items() if not k.startswith("POCKETREC_")}
        env.update({f"POCKETREC_{k}": v for k, v in self.settings.items()})
        # This checkout's packages first on the path, whatever else is installed.
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        self.log_path = self.data_dir.with_name(self.data_dir.name + ".log")
        # A file, not a pipe: nobody reads stderr while tests run, and a full pipe would
        # block the server.
        self._log = open(self.log_path, "w")  # noqa: SIM115
        return env

    @property
    def database_url(self) -> str:
        """The server's SQLAlchemy URL (its SQLite file unless DATABASE_URL was given)."""
        return self.settings.get("DATABASE_URL",
                                 f"sqlite:///{self.data_dir / 'pocketrec.db'}")

    def request(self, method: str, path: str, **kwargs: Any) -> urllib3.BaseHTTPResponse:
        return self.http.request(method, self.url + path, **kwargs)

    def admin(self, method: str, path: str, headers: dict[str, str] | None = None,
              **kwargs: Any) -> urllib3.BaseHTTPResponse:
        auth = {"Authorization": f"Bearer {self.settings['ADMIN_TOKEN']}"}
        return self.request(method, path, headers={**auth, **(headers or {})}, **kwargs)

    def round(self, round_id: str, *, settled: bool = True, timeout: float = 120.0
              ) -> dict[str, Any]:
        """The admin view of a round. With ``settled``, waits while it is aggregating: the
        server aggregates after the response that completed the round has been sent (the
        round is claimed, ``aggregating``, before that response)."""
        deadline = time.monotonic() + timeout
        while True:
            response = self.admin("GET", f"/v1/admin/rounds/{round_id}")
            if response.status != 200:
                raise RuntimeError(f"GET round {round_id}: {response.status} "
                                   f"{response.data[:200]!r}")
            view = json.loads(response.data)
            if not settled or view["state"] != "aggregating" or time.monotonic() > deadline:
                return view
            time.sleep(0.05)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=START_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()
        self._log.close()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class GunicornServer(ServerProcess):
    """The real sync server the production way: ``gunicorn 'sync_server:create_app()'`` with
    several worker processes, on a free loopback port. Same interface as ``ServerProcess``
    (``url``, ``request``, ``admin``, ``round``, ``close``; settings as POCKETREC_*).

        with GunicornServer(tmp / "server", workers=4, ADMIN_TOKEN="s",
                            DATABASE_URL=pg_url) as server: ...

    Worker class ``gthread`` by default (``threads`` each): a sync worker serves one
    connection at a time, closes it after every response (no keep-alive, so every device
    request pays a new TCP connection) and is blocked by a slow client for as long as its
    body takes to arrive; its heartbeat also stops while a request (or the aggregation that
    runs after a response) computes, so one longer than ``--timeout`` gets the worker killed.
    gthread workers keep connections alive, overlap database and disk waits in threads (the
    app is thread-safe: the development server is threaded too) and keep their heartbeat
    from the main thread. Keep ``threads`` at or below SQLAlchemy's pool (5 + 10 overflow
    per process) and workers x 15 below PostgreSQL's ``max_connections``.

    The listening socket is bound here and handed to gunicorn (``--bind fd://N``): the port
    is known before the server starts, with no window for another process to take it.
    Rate limits are counted in the database: they hold across the workers."""

    def __init__(self, data_dir: str | Path, *, workers: int = 4, worker_class: str = "gthread",
                 threads: int = 8, options: tuple[str, ...] = (), **settings: Any) -> None:
        import socket

        self.data_dir = Path(data_dir)
        self.settings = {k: str(v) for k, v in settings.items()}
        self.settings.setdefault("DATA_DIR", str(self.data_dir))
        self.workers = workers
        env = self._prepare()
        listener = socket.create_server(("127.0.0.1", 0), backlog=2048)
        port = listener.getsockname()[1]
        command = [sys.executable, "-m", "gunicorn", "sync_server:create_app()",
                   "--bind", f"fd://{listener.fileno()}", "--workers", str(workers),
                   "--worker-class", worker_class]
        if worker_class == "gthread":
            command += ["--threads", str(threads)]
        if "control_socket_disable" in gunicorn_settings():
            # Recent gunicorn opens a control socket at ~/.gunicorn/gunicorn.ctl by default:
            # one path for every instance on the host, so parallel servers would share it.
            command.append("--no-control-socket")
        command += list(options)  # more gunicorn flags, e.g. ("--timeout", "5")
        try:
            self.process = subprocess.Popen(
                command, cwd=self.data_dir.parent, env=env, stdin=subprocess.DEVNULL,
                stdout=self._log, stderr=self._log, pass_fds=(listener.fileno(),),
                start_new_session=True,
            )
        finally:
            listener.close()  # gunicorn holds its own copy
        self.url = f"http://127.0.0.1:{port}"
        self.http = urllib3.PoolManager(retries=False,
                                        timeout=urllib3.Timeout(connect=10.0, read=300.0))
        # Connections queue on the bound socket until a worker is up: one /healthz answer
        # (which pings the database) means a worker has created the app.
        try:
            health = self.http.request("GET", self.url + "/healthz",
                                       timeout=urllib3.Timeout(connect=10.0,
                                                               read=START_TIMEOUT_S))
        except urllib3.exceptions.HTTPError as exc:
            self.close()
            raise RuntimeError(f"gunicorn did not answer: {exc}\n{self.log_path.read_text()}"
                               ) from None
        if health.status != 200:
            self.close()
            raise RuntimeError(f"/healthz answered {health.status}: {health.data!r}\n"
                               f"{self.log_path.read_text()}")
        # Workers create the app one after another (migrations under a file lock): wait
        # until every one has said so, so a load starts on a fully booted server.
        deadline = time.monotonic() + START_TIMEOUT_S
        while self.log_path.read_text().count(READY_MESSAGE) < workers:
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"not all {workers} gunicorn workers started:\n"
                                   f"{self.log_path.read_text()}")
            time.sleep(0.05)

    def worker_pids(self) -> list[int]:
        """The pids of gunicorn's current worker processes (children of the arbiter)."""
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        return [int(p) for p in children.read_text().split()] if children.exists() else []


def gunicorn_settings() -> set[str]:
    """The names of the settings the installed gunicorn knows."""
    from gunicorn.config import KNOWN_SETTINGS

    return {setting.name for setting in KNOWN_SETTINGS}
