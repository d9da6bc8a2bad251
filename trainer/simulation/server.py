"""The real sync server in a subprocess on loopback: for the simulator and for tests.

    with ServerProcess(tmp_path / "server", ADMIN_TOKEN="secret") as server:
        server.url          http://127.0.0.1:<port>
        server.data_dir     its DATA_DIR
        server.log_path     its stderr (request log, tracebacks), beside DATA_DIR
        server.admin(method, path, **kw)   an urllib3 request with the admin token

Settings are passed as POCKETREC_* environment variables, the way an operator would. The
server picks a free port (``--port 0``) and prints it; the helper waits for /healthz. A
``port`` binds that port instead: a server restarted after a crash comes back where its
devices (and their in-flight SecAgg+ sessions) expect it."""

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


class ServerProcess:
    def __init__(self, data_dir: str | Path, *, port: int = 0, **settings: Any) -> None:
        self.data_dir = Path(data_dir)
        self.settings = {k: str(v) for k, v in settings.items()}
        env = {k: v for k, v in os.environ.items() if not k.startswith("POCKETREC_")}
        env.update({f"POCKETREC_{k}": v for k, v in self.settings.items()})
        # This checkout's packages first on the path, whatever else is installed.
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        self.log_path = self.data_dir.with_name(self.data_dir.name + ".log")
        # A file, not a pipe: nobody reads stderr while tests run, and a full pipe would
        # block the server.
        self._log = open(self.log_path, "w")  # noqa: SIM115
        self.process = subprocess.Popen(
            [sys.executable, "-m", "sync_server", "--host", "127.0.0.1", "--port", str(int(port)),
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
        # Reads wait long: the first DP round imports the accountant (torch): slow when busy.
        self.http = urllib3.PoolManager(retries=False,
                                        timeout=urllib3.Timeout(connect=10.0, read=300.0))
        health = self.http.request("GET", self.url + "/healthz")
        if health.status != 200:
            self.close()
            raise RuntimeError(f"/healthz answered {health.status}: {health.data!r}")

    def request(self, method: str, path: str, **kwargs: Any) -> urllib3.BaseHTTPResponse:
        return self.http.request(method, self.url + path, **kwargs)

    def admin(self, method: str, path: str, headers: dict[str, str] | None = None,
              **kwargs: Any) -> urllib3.BaseHTTPResponse:
        auth = {"Authorization": f"Bearer {self.settings['ADMIN_TOKEN']}"}
        return self.request(method, path, headers={**auth, **(headers or {})}, **kwargs)

    def round(self, round_id: str, *, settled: bool = True, timeout: float = 120.0
              ) -> dict[str, Any]:
        """The admin view of a round. With ``settled``, waits while it is aggregating (or full
        and about to): the server aggregates after the response that completed the round
        has been sent."""
        deadline = time.monotonic() + timeout
        while True:
            response = self.admin("GET", f"/v1/admin/rounds/{round_id}")
            if response.status != 200:
                raise RuntimeError(f"GET round {round_id}: {response.status} "
                                   f"{response.data[:200]!r}")
            view = json.loads(response.data)
            # A full round still shows collecting until the aggregation that the completing
            # request queued (it runs after that response was sent) has claimed it.
            full = view["state"] == "collecting" and view["received"] >= view["target_clients"]
            busy = view["state"] == "aggregating" or (full and view["secagg"] is None)
            if not settled or not busy or time.monotonic() > deadline:
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
