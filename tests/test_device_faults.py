"""Device kill -9 faults, with real processes, real SQLite files and the real sync server:

- event writes: a writer process (tests/support/event_log_writer.py) SIGKILLed after a random
  number of reported commits,
  25 times on one database file; after EVERY kill the file passes integrity_check, every
  event reported committed is there exactly once and no batch is half stored;
- model download: a DeviceClient process syncing from the real server, SIGKILLed while the
  bundle body is in flight (a loopback proxy holds the body back halfway) -> the old model
  serves, and the next sync completes and installs the new version;
- model install: the same process SIGKILLed inside ``DeviceClient.sync``'s install, right
  after each of its steps in turn (the runner pauses there until killed, so the kill lands
  where the test chose whatever the machine's speed) -> the device opens on the old version,
  or on the new one once state.json was replaced, never anything in between, and serves it;
  leftovers of the killed install are swept; the next sync completes.

The proxy is test infrastructure (it only forwards bytes and holds some back), not a
stand-in for any of our components."""

from __future__ import annotations

import json
import random
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from device_sdk.bundle import load_bundle
from device_sdk.device_client import DeviceClient
from device_sdk.event_log import EventLog
from device_sdk.model_store import INSTALL_STEPS
from sync_server.registry import republish_weights
from tests.support.bundles import copy_bundle, zip_bundle
from tests.support.paths import SUPPORT
from tests.support.server import ADMIN, ServerProcess, signing_key_of

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="needs SIGKILL")

WRITER = SUPPORT / "event_log_writer.py"
RUNNER = SUPPORT / "device_sync_runner.py"
GUARD_S = 60  # a guard against a hung child, not a measurement


# ---------------------------------------------------------------------------- event writes


def _wait_lines(out_path: Path, proc: subprocess.Popen, lines: int) -> None:
    """Until the writer has printed ``lines`` complete lines ("ready" and then one a commit)."""
    deadline = time.monotonic() + GUARD_S
    while out_path.read_text().count("\n") < lines:
        if proc.poll() is not None:
            pytest.fail(f"writer exited early: {proc.stderr.read().decode()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"writer never printed {lines} lines")
        time.sleep(0.005)


def _check_log_file(db: Path, reported: set[int]) -> int:
    """integrity_check ok, every reported event present exactly once, every batch whole.
    Returns the number of stored events."""
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        rows = conn.execute(
            "SELECT CAST(substr(item, 2) AS INTEGER), json_extract(context, '$.batch'), "
            "json_extract(context, '$.size') FROM events").fetchall()
    finally:
        conn.close()
    stored = [seq for seq, _, _ in rows]
    assert len(stored) == len(set(stored)), "an event is stored twice"
    missing = reported - set(stored)
    assert not missing, f"{len(missing)} reported commits lost, e.g. {sorted(missing)[:5]}"
    # Atomicity: a batch (one log_many call) is entirely present, including one killed
    # after its commit but before its report; a single log() is a batch of one.
    present: dict[int, int] = {}
    sizes: dict[int, int] = {}
    for seq, batch, size in rows:
        assert batch <= seq < batch + size
        present[batch] = present.get(batch, 0) + 1
        sizes[batch] = size
    partial = {b: n for b, n in present.items() if n != sizes[b]}
    assert not partial, f"half-stored batches (first seq: events present): {partial}"
    return len(stored)


def test_kill_9_during_event_writes_loses_no_committed_event(tmp_path):
    """25 writer processes in turn on ONE database file, each SIGKILLed while logging
    (single events and log_many batches) once it has reported a random number of commits,
    i.e. at a random point of its work, not of the clock; checked after every kill."""
    db = tmp_path / "kill.db"
    rng = random.Random(20240611)
    reported: set[int] = set()
    runs = 25
    counts = []
    for run in range(runs):
        out_path = tmp_path / f"writer-{run}.out"
        durability = "full" if run % 4 == 3 else "normal"
        with open(out_path, "w") as out:
            proc = subprocess.Popen(
                [sys.executable, str(WRITER), str(db), str(run * 1_000_000), durability],
                stdout=out, stderr=subprocess.PIPE,
            )
        try:
            _wait_lines(out_path, proc, 1 + rng.randint(1, 60))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            proc.stderr.close()
        assert proc.returncode == -signal.SIGKILL  # it was still logging when killed
        text = out_path.read_text()
        complete = text[: text.rfind("\n") + 1].splitlines()[1:]  # skip "ready", partial tail
        before = len(reported)
        for line in complete:
            tag, a, b = line.split()
            reported.update([int(a)] if tag == "L" else range(int(a), int(b) + 1))
        assert len(reported) > before  # this run really committed events before dying
        counts.append(_check_log_file(db, reported))
    assert counts == sorted(counts)  # nothing committed ever disappears later
    with EventLog(db) as ev_log:  # and the SDK reopens it normally
        assert ev_log.count() == counts[-1]


# ---------------------------------------------------------------------------- the proxy


_HEADER_END = b"\r\n\r\n"
_LENGTH = re.compile(rb"\r\ncontent-length:\s*(\d+)", re.IGNORECASE)


class BundleStallProxy:
    """A loopback TCP proxy to ``target_url``. Everything is forwarded both ways, except in
    a response whose Content-Type is application/zip (a bundle download): there only the
    headers and the first ``fraction`` of the body go through, then that connection stops
    forwarding (what the server sends is read and held back) and ``cut`` is set."""

    def __init__(self, target_url: str, fraction: float) -> None:
        host, port = target_url.removeprefix("http://").split(":")
        self.target = (host, int(port))
        self.fraction = fraction
        self.cut = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._sockets: list[socket.socket] = []
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self._sockets += [client, upstream]
            threading.Thread(target=self._pump_request, args=(client, upstream),
                             daemon=True).start()
            threading.Thread(target=self._pump_response, args=(upstream, client),
                             daemon=True).start()

    @staticmethod
    def _pump_request(client: socket.socket, upstream: socket.socket) -> None:
        try:
            while chunk := client.recv(65536):
                upstream.sendall(chunk)
        except OSError:
            pass
        finally:
            for s in (client, upstream):
                s.close()

    def _cut_at(self, seen: bytearray) -> int | None:
        at = seen.find(b"application/zip")
        end = seen.find(_HEADER_END, at) if at >= 0 else -1
        if end < 0:
            return None
        start = seen.rfind(b"HTTP/1.", 0, at)
        length = _LENGTH.search(bytes(seen[start:end + 2]))
        assert length, "the bundle response has no Content-Length"
        return end + len(_HEADER_END) + int(int(length.group(1)) * self.fraction)

    def _pump_response(self, upstream: socket.socket, client: socket.socket) -> None:
        seen, sent, cut = bytearray(), 0, None
        try:
            while chunk := upstream.recv(65536):
                seen += chunk
                if cut is None:
                    cut = self._cut_at(seen)
                end = len(seen) if cut is None else min(len(seen), cut)
                if end > sent:
                    client.sendall(seen[sent:end])
                    sent = end
                if cut is not None and sent >= cut:
                    self.cut.set()
        except OSError:
            pass
        finally:
            for s in (client, upstream):
                s.close()

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        for s in self._sockets:
            s.close()


# ---------------------------------------------------------------------------- the server


def _publish(server: ServerProcess, zip_bytes: bytes) -> int:
    response = server.admin("POST", "/v1/admin/models", body=zip_bytes,
                            headers={"Content-Type": "application/zip"})
    assert response.status == 201, response.data
    return json.loads(response.data)["model_version"]


def _version_zip(bundle_dir: Path, scratch: Path, version: int) -> bytes:
    """The tiny export as version ``version`` with its weights shifted (so every version's
    files differ); unsigned: the server signs what it publishes."""
    base = copy_bundle(bundle_dir, scratch / f"base{version}")
    weights = {k: v + np.float32(0.001 * version) for k, v in load_bundle(base).weights().items()}
    return zip_bundle(republish_weights(weights, base, version, {"note": f"v{version}"}))


def _start_runner(data_dir: Path, key: bytes, url: str, pause_step: str = ""
                  ) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, str(RUNNER), str(data_dir), key.hex(), url,
                             pause_step], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if line != "ready\n":
        proc.kill()
        pytest.fail(f"sync runner did not start: {line!r} {proc.communicate()[1]}")
    return proc


def _kill(proc: subprocess.Popen) -> str:
    """SIGKILL; returns what the runner printed after "ready"."""
    proc.send_signal(signal.SIGKILL)
    out, _ = proc.communicate()
    return out


def _state(data_dir: Path) -> dict:
    return json.loads((data_dir / "models" / "state.json").read_text())


def _serves(data_dir: Path, key: bytes, url: str) -> int:
    """Open a new DeviceClient on ``data_dir``: it must serve; returns its model version."""
    with DeviceClient(data_dir, server_key=key, server_url=url) as device:
        recs = device.recommend(5)
        assert len(recs) == 5 and {r.source for r in recs} == {"model"}
        assert not any((data_dir / "models" / "staging").iterdir())  # leftovers swept
        return device.model_version


def _shopper(data_dir: Path, key: bytes, url: str) -> int:
    """A device with some history that has installed the newest version; returns it."""
    with DeviceClient(data_dir, server_key=key, server_url=url) as device:
        report = device.sync(train=False)
        assert report.install_error is None
        items = device.models.bundle(report.model_version).items().keys[1:6]
        device.log_many([(item, "view") for item in items])
        return report.model_version


@pytest.fixture
def server(tmp_path, db_settings):
    with ServerProcess(tmp_path / "server", ADMIN_TOKEN=ADMIN, RATE_LIMIT=10_000,
                       **db_settings) as srv:
        yield srv


# ---------------------------------------------------------------------------- download


def test_kill_9_during_bundle_download_keeps_the_old_model(server, tiny_export, tmp_path):
    key = signing_key_of(server)
    _publish(server, _version_zip(tiny_export.bundle_dir, tmp_path, 1))
    device_dir = tmp_path / "device"
    assert _shopper(device_dir, key, server.url) == 1
    _publish(server, _version_zip(tiny_export.bundle_dir, tmp_path, 2))
    proxy = BundleStallProxy(server.url, fraction=0.5)
    try:
        for _ in range(3):  # killed mid-download three times in a row
            proxy.cut.clear()
            proc = _start_runner(device_dir, key, proxy.url)
            assert proxy.cut.wait(GUARD_S), "the bundle download never started"
            assert _kill(proc) == ""  # sync() had not returned
            assert _state(device_dir)["current"] == 1
            assert _serves(device_dir, key, server.url) == 1
    finally:
        proxy.close()
    with DeviceClient(device_dir, server_key=key, server_url=server.url) as device:
        report = device.sync(train=False)
        assert (report.installed, report.model_version, report.install_error) == (2, 2, None)
        assert device.recommend(5)[0].source == "model"


# ---------------------------------------------------------------------------- install


def test_kill_9_during_install_inside_sync_keeps_a_serving_model(server, tiny_export,
                                                                 tmp_path):
    """Once the bundle has arrived, sync() verifies, golden-checks and installs it; the
    runner is SIGKILLed right after each install step in turn (it pauses there until
    killed), twice round. Each kill leaves the old version current, or the new one once
    state.json was replaced; the install's traces are on disk where the step says; a new
    DeviceClient sweeps them and serves exactly what state.json names."""
    key = signing_key_of(server)
    _publish(server, _version_zip(tiny_export.bundle_dir, tmp_path, 1))
    device_dir = tmp_path / "device"
    assert _shopper(device_dir, key, server.url) == 1
    models = device_dir / "models"
    latest = 1
    for kill in range(2 * len(INSTALL_STEPS)):
        step = INSTALL_STEPS[kill % len(INSTALL_STEPS)]
        old = _state(device_dir)["current"]
        if old == latest:  # the last kill came after the swap: offer a newer version
            latest = _publish(server, _version_zip(tiny_export.bundle_dir, tmp_path,
                                                   latest + 1))
        proc = _start_runner(device_dir, key, server.url, step)
        line = proc.stdout.readline()
        assert line == f"paused {step}\n", (line, proc.communicate())
        assert _kill(proc) == ""  # sync() never returned
        state = _state(device_dir)
        assert state["current"] == (latest if step == "state_swapped" else old), step
        staged = list((models / "staging").iterdir())
        kept = {p.name for p in (models / "versions").iterdir()}
        # the killed install's traces: staged until the rename, then the new version's
        # directory (beside the old one until the next open prunes)
        assert bool(staged) == (INSTALL_STEPS.index(step) < INSTALL_STEPS.index("renamed"))
        assert (str(latest) in kept) == (not staged), (step, kept)
        # a new DeviceClient serves exactly what state.json names; leftovers are swept
        assert _serves(device_dir, key, server.url) == state["current"]
    with DeviceClient(device_dir, server_key=key, server_url=server.url) as device:
        report = device.sync(train=False)
        assert report.install_error is None and report.model_version == latest
        assert device.recommend(5)[0].source == "model"
