"""A bounded load test of the real sync server: N concurrent devices on loopback.

Each device is the real device SDK (``SyncClient`` with its own Ed25519 ``DeviceIdentity``
and its own keep-alive connection) in a thread; the devices are spread over ``processes``
client processes so the client is not one interpreter's GIL. Every device, all starting
together:

    register -> GET /v1/models/current (full) -> the same with If-None-Match (304)
    -> download the bundle -> ``iterations`` x (check in; when selected and not yet
    answered, upload a real sealed, clipped update: GET /v1/server-keys + POST update;
    GET /v1/models/current with If-None-Match, downloading a newer bundle when one appears)

The server must have a round open with ``target_clients`` = N (``open_round``), so the first
check-ins select every device and the last upload completes the round. When every device is
done, the coordinator waits for the round to settle and then every device fetches the
manifest once more (and the new bundle), which must now be the published version.

The SDK runs with ``retries=0``: every HTTP attempt is one sample (no hidden retries, no
backoff sleeps), recorded by the device's connection pool (``RecordingPool``) with its type,
status (or exception: connection errors and timeouts) and latency to the last body byte.
Nothing here asserts a time; ``summarize`` turns samples into counts, rates and percentiles.

    server = GunicornServer(...)
    round_id, base = publish_and_open_round(server, bundle_zip, devices=64)
    result = run_load(server, round_id, devices=64, iterations=5)
    print(format_table(result))
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import tempfile
import threading
import time
import traceback
import zipfile
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import urllib3

SEALED_SCHEME = "sealed-x25519-v1"
# Request types, in the order the table lists them.
TYPES = ("register", "manifest", "manifest-conditional", "bundle", "checkin", "server-keys",
         "upload")
_BUNDLE = re.compile(r"^/v1/models/\d+/bundle$")
_UPLOAD = re.compile(r"^/v1/rounds/[^/]+/update$")


def request_type(method: str, path: str, headers: dict[str, str] | None) -> str:
    path = path.split("?", 1)[0]
    if method == "POST" and path == "/v1/devices":
        return "register"
    if path == "/v1/models/current":
        conditional = any(k.lower() == "if-none-match" for k in (headers or {}))
        return "manifest-conditional" if conditional else "manifest"
    if _BUNDLE.match(path):
        return "bundle"
    if path == "/v1/rounds/checkin":
        return "checkin"
    if path == "/v1/server-keys":
        return "server-keys"
    if method == "POST" and _UPLOAD.match(path):
        return "upload"
    return f"{method} {path}"


class RecordingPool(urllib3.PoolManager):
    """A PoolManager that records every request: (type, status or 0, ms, error name).
    A streamed response (the bundle download) is timed until the SDK releases it, i.e.
    after its body was read."""

    def __init__(self, samples: list, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.samples = samples

    def request(self, method: str, url: str, *args: Any, **kwargs: Any
                ) -> urllib3.BaseHTTPResponse:
        kind = request_type(method, urllib3.util.parse_url(url).path or "/",
                            kwargs.get("headers"))
        started = time.perf_counter()
        try:
            response = super().request(method, url, *args, **kwargs)
        except Exception as exc:
            self._record(kind, 0, started, type(exc).__name__)
            raise
        if kwargs.get("preload_content", True):
            self._record(kind, response.status, started, "")
            return response
        release = response.release_conn
        done = []

        def release_and_record() -> None:
            if not done:
                done.append(True)
                self._record(kind, response.status, started, "")
            release()

        response.release_conn = release_and_record
        return response

    def _record(self, kind: str, status: int, started: float, error: str) -> None:
        self.samples.append((kind, status, (time.perf_counter() - started) * 1000.0, error))


# --- server side: the model and the round ---------------------------------------------


def publish_and_open_round(server: Any, bundle_zip: bytes, devices: int,
                           clip_norm: float = 1.0) -> tuple[str, int]:
    """Publish ``bundle_zip`` (unless a version is already published) and open a sealed
    FedAvg round for exactly ``devices`` clients; returns (round id, base version)."""
    response = server.admin("POST", "/v1/admin/models", body=bundle_zip,
                            headers={"Content-Type": "application/zip"})
    if response.status not in (201, 409):
        raise RuntimeError(f"publishing the model: {response.status} {response.data[:300]!r}")
    config = {"strategy": "fedavg", "upload_scheme": SEALED_SCHEME, "target_clients": devices,
              "population": devices, "clip_norm": clip_norm, "deadline_s": 3600,
              "local_epochs": 1, "learning_rate": 0.1, "batch_size": 8, "max_examples": 50}
    response = server.admin("POST", "/v1/admin/rounds", json=config)
    if response.status != 201:
        raise RuntimeError(f"opening the round: {response.status} {response.data[:300]!r}")
    opened = json.loads(response.data)
    return opened["round_id"], int(opened["model_version"])


# --- the devices ----------------------------------------------------------------------


@dataclass
class _Device:
    index: int
    client: Any  # SyncClient
    version: int | None = None
    etag: str | None = None
    shapes: dict[str, tuple[int, ...]] | None = None
    uploaded: str | None = None  # the round answered
    upload_result: dict | None = None


def bundle_shapes(bundle_zip: bytes, manifest_bytes: bytes) -> dict[str, tuple[int, ...]]:
    """The weight shapes of a downloaded bundle; its manifest must be the one served (signed,
    verified by the SDK), else ValueError."""
    with zipfile.ZipFile(io.BytesIO(bundle_zip)) as archive:
        if archive.read("manifest.json") != manifest_bytes:
            raise ValueError("the bundle's manifest is not the manifest served")
        with np.load(io.BytesIO(archive.read("weights.npz")), allow_pickle=False) as weights:
            return {name: weights[name].shape for name in weights.files}


def random_update(task: Any, shapes: dict[str, tuple[int, ...]], rng: np.random.Generator) -> Any:
    """A random delta over the task's trainable tensors, clipped to 0.9 x its clip norm."""
    from device_sdk.model_update import ModelUpdate

    names = task.trainable if task.trainable is not None else sorted(shapes)
    delta = {n: rng.normal(size=shapes[n]).astype(np.float32) for n in names}
    norm = float(np.sqrt(sum(np.sum(v.astype(np.float64) ** 2) for v in delta.values())))
    scale = 0.9 * task.clip_norm / norm
    delta = {n: (v * np.float32(scale)).astype(np.float32) for n, v in delta.items()}
    clipped = float(np.sqrt(sum(np.sum(v.astype(np.float64) ** 2) for v in delta.values())))
    return ModelUpdate(task.model_version, delta, num_examples=20, clip_norm=task.clip_norm,
                       norm=clipped, norm_before_clip=norm)


def _sync_manifest(device: _Device) -> None:
    """A conditional manifest fetch; a new version is downloaded."""
    fresh = device.client.fetch_manifest(device.etag)
    if fresh is None:
        return
    bundle = device.client.download_bundle(fresh.version)
    device.shapes = bundle_shapes(bundle, fresh.manifest_bytes)
    device.version, device.etag = fresh.version, fresh.etag


def _device_run(device: _Device, iterations: int, errors: list) -> None:
    """One device's script (module docstring). A failed step is recorded in ``errors`` and
    the device goes on; steps that need the model are skipped (and recorded) without it."""
    rng = np.random.default_rng(device.index)

    def first_manifest() -> None:
        manifest = device.client.fetch_manifest()
        device.version, device.etag = manifest.version, manifest.etag
        if device.client.fetch_manifest(device.etag) is not None:  # must be a 304
            raise RuntimeError("the same manifest was not answered 304")
        bundle = device.client.download_bundle(manifest.version)
        device.shapes = bundle_shapes(bundle, manifest.manifest_bytes)

    def checkin() -> None:
        task = device.client.checkin(device.version, num_examples=20)
        if task is None or task.round_id == device.uploaded:  # a device answers a round once
            return
        if task.upload_scheme != SEALED_SCHEME:
            raise RuntimeError(f"task has upload scheme {task.upload_scheme}")
        result = device.client.upload(task, random_update(task, device.shapes, rng))
        device.uploaded, device.upload_result = task.round_id, result
        if not result.get("accepted"):
            raise RuntimeError(f"upload not accepted: {result}")

    steps = [("register", device.client.register, False),
             ("first manifest", first_manifest, False)]
    for _ in range(iterations):
        steps += [("checkin", checkin, True), ("manifest", lambda: _sync_manifest(device), True)]
    for name, step, needs_model in steps:
        if needs_model and device.shapes is None:
            errors.append(f"device {device.index}: {name} skipped (no model)")
            continue
        try:
            step()
        except Exception as exc:
            errors.append(f"device {device.index}: {name}: {type(exc).__name__}: {exc}")


def _threads(target: Any, devices: list[_Device], *args: Any) -> None:
    start = threading.Barrier(len(devices))

    def run(device: _Device) -> None:
        start.wait()
        target(device, *args)

    threads = [threading.Thread(target=run, args=(d,), daemon=True) for d in devices]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _final(device: _Device, errors: list) -> None:
    try:
        _sync_manifest(device)
    except Exception as exc:
        errors.append(f"device {device.index}: final manifest: {type(exc).__name__}: {exc}")


def _cpu_self() -> float:
    times = os.times()
    return times.user + times.system


class _Pipe:
    """JSON lines over a pair of binary streams."""

    def __init__(self, reader: Any, writer: Any) -> None:
        self.reader, self.writer = reader, writer

    def send(self, obj: Any) -> None:
        self.writer.write(json.dumps(obj).encode() + b"\n")
        self.writer.flush()

    def receive(self) -> Any:
        line = self.reader.readline()
        if not line:
            raise EOFError("the other side closed the pipe")
        return json.loads(line)


def _client_main(pipe: _Pipe) -> None:
    """One client process (``python -m trainer.simulation.load``): reads its devices from
    the first line, builds them, answers "ready", then obeys "run" / "final" / "stop" from
    the coordinator, answering each with one JSON line (nothing is pickled)."""
    import base64

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from device_sdk.device_identity import DeviceIdentity
    from device_sdk.sync_client import SyncClient

    outbox = tempfile.mkdtemp(prefix="load-outbox-")  # uploads the SDK queues; removed
    try:
        setup = pipe.receive()
        signing_key = base64.b64decode(setup["signing_key"])
        samples: list = []  # list.append is atomic: one list for every thread
        devices = []
        for i in setup["indices"]:
            pool = RecordingPool(samples, maxsize=1, block=False)
            client = SyncClient(setup["url"], DeviceIdentity(Ed25519PrivateKey.generate()),
                                server_signing_key=signing_key,
                                outbox_dir=os.path.join(outbox, str(i)), retries=0,
                                timeout=setup["timeout"], pool=pool)
            devices.append(_Device(i, client))
        pipe.send("ready")
        while True:
            command = pipe.receive()
            if command == "stop":
                return
            samples.clear()
            errors: list = []
            cpu, started = _cpu_self(), time.perf_counter()
            if command == "run":
                _threads(_device_run, devices, setup["iterations"], errors)
            else:
                _threads(_final, devices, errors)
            pipe.send({
                "samples": samples, "errors": errors, "cpu_s": _cpu_self() - cpu,
                "wall_s": time.perf_counter() - started,
                "devices": [{"index": d.index, "version": d.version, "uploaded": d.uploaded,
                             "upload": d.upload_result} for d in devices],
            })
    except EOFError:
        return
    except Exception:
        pipe.send({"crash": traceback.format_exc()})
    finally:
        shutil.rmtree(outbox, ignore_errors=True)


class _ClientProcesses:
    """``processes`` client processes (``python -m trainer.simulation.load``) holding
    ``devices`` devices between them."""

    def __init__(self, url: str, signing_key: bytes, devices: int, iterations: int,
                 processes: int, timeout: float) -> None:
        import base64
        import subprocess
        import sys

        from trainer.simulation.server import REPO

        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
        self.children = []
        try:
            for p in range(processes):
                indices = list(range(p, devices, processes))
                if not indices:
                    continue
                process = subprocess.Popen(
                    [sys.executable, "-m", "trainer.simulation.load"], env=env, cwd=REPO,
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True)
                pipe = _Pipe(process.stdout, process.stdin)
                self.children.append((process, pipe))
                pipe.send({"url": url, "signing_key": base64.b64encode(signing_key).decode(),
                           "indices": indices, "iterations": iterations, "timeout": timeout})
            self._answers()  # "ready"
        except BaseException:
            self.close()
            raise

    def _answers(self) -> list[Any]:
        answers = []
        for process, pipe in self.children:
            try:
                answer = pipe.receive()
            except EOFError:
                raise RuntimeError(f"client process {process.pid} died") from None
            if isinstance(answer, dict) and "crash" in answer:
                raise RuntimeError(f"client process {process.pid} failed:\n{answer['crash']}")
            answers.append(answer)
        return answers

    def command(self, name: str) -> list[dict]:
        for _, pipe in self.children:
            pipe.send(name)
        return self._answers()

    def close(self) -> None:
        for process, pipe in self.children:
            try:
                pipe.send("stop")
                process.stdin.close()
            except OSError:
                pass
            try:
                process.wait(timeout=30)
            except Exception:
                process.kill()
                process.wait()
            process.stdout.close()


# --- CPU of the server side (Linux /proc) -----------------------------------------------


def process_tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) used by ``pid``, its children that exited (and were
    waited for) and its live children: a gunicorn arbiter with its workers, or a
    postmaster with its backends."""
    tick = os.sysconf("SC_CLK_TCK")

    def fields(p: int) -> list[str] | None:
        try:
            stat = open(f"/proc/{p}/stat").read()  # noqa: SIM115
        except OSError:
            return None
        return stat[stat.rindex(")") + 2:].split()

    own = fields(pid)
    if own is None:
        return 0.0
    total = sum(int(v) for v in own[11:15])  # utime stime cutime cstime
    try:
        children = open(f"/proc/{pid}/task/{pid}/children").read().split()  # noqa: SIM115
    except OSError:
        children = []
    for child in children:
        f = fields(int(child))
        if f is not None:
            total += int(f[11]) + int(f[12])
    return total / tick


# --- the run ----------------------------------------------------------------------------


def run_load(server: Any, round_id: str, *, devices: int, iterations: int = 5,
             processes: int = 2, timeout: float = 60.0,
             cpu_pids: dict[str, int] | None = None) -> dict[str, Any]:
    """Drive ``devices`` devices against ``server`` (a ServerProcess / GunicornServer with
    a round ``round_id`` open for exactly that many clients); returns the raw outcome:
    samples per phase, device errors, the round view, versions seen, CPU seconds."""
    import base64

    keys = json.loads(server.request("GET", "/v1/server-keys").data)
    signing_key = base64.b64decode(keys["signing_key"])
    cpu_pids = dict(cpu_pids or {})
    clients = _ClientProcesses(server.url, signing_key, devices, iterations,
                               max(1, min(processes, devices)), timeout)
    try:
        cpu_before = {name: process_tree_cpu(pid) for name, pid in cpu_pids.items()}
        started = time.perf_counter()
        run = clients.command("run")
        wall = time.perf_counter() - started
        cpu = {name: process_tree_cpu(pid) - cpu_before[name]
               for name, pid in cpu_pids.items()}
        cpu["client"] = sum(a["cpu_s"] for a in run)
        view = server.round(round_id)  # waits while the round is aggregating
        final = clients.command("final")
    finally:
        clients.close()
    return {
        "devices": devices, "iterations": iterations, "processes": len(run),
        "wall_s": wall, "cpu_s": cpu,
        "samples": [s for a in run for s in a["samples"]],
        "final_samples": [s for a in final for s in a["samples"]],
        "errors": [e for a in run + final for e in a["errors"]],
        "uploaded": sum(1 for a in run for d in a["devices"] if d["uploaded"] == round_id),
        "round": view,
        "final_versions": sorted(Counter(d["version"] for a in final
                                         for d in a["devices"]).items(),
                                 key=lambda kv: (kv[0] is None, kv[0] or 0)),
    }


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """Per request type and overall (the load phase): count, req/s over the phase's wall
    time, median and p99 latency (ms, from the samples), 2xx/3xx, 4xx, 5xx and connection
    errors (no response: refused, reset, timed out)."""
    wall = result["wall_s"]

    def row(samples: list) -> dict[str, Any]:
        ms = np.array([s[2] for s in samples], dtype=np.float64)
        statuses = [s[1] for s in samples]
        return {
            "count": len(samples),
            "rate": len(samples) / wall if wall > 0 else 0.0,
            "median_ms": float(np.median(ms)) if len(ms) else None,
            "p99_ms": float(np.percentile(ms, 99)) if len(ms) else None,
            "max_ms": float(ms.max()) if len(ms) else None,
            "ok": sum(1 for s in statuses if 200 <= s < 400),
            "4xx": sum(1 for s in statuses if 400 <= s < 500),
            "5xx": sum(1 for s in statuses if s >= 500),
            "conn_errors": sum(1 for s in samples if s[1] == 0),
            "statuses": dict(sorted(Counter(str(s) for s in statuses).items())),
        }

    samples = result["samples"]
    kinds = [t for t in TYPES if any(s[0] == t for s in samples)]
    kinds += sorted({s[0] for s in samples} - set(TYPES))
    rows = {kind: row([s for s in samples if s[0] == kind]) for kind in kinds}
    rows["all"] = row(samples)
    view = result["round"]
    cpu = result["cpu_s"]
    return {
        "devices": result["devices"], "iterations": result["iterations"],
        "client_processes": result["processes"], "wall_s": wall,
        "cpu_s": cpu, "cpu_cores": {k: v / wall for k, v in cpu.items()} if wall else {},
        # Robust on a shared machine, unlike rates: CPU milliseconds per request served.
        "cpu_ms_per_request": {k: 1000 * v / len(samples) for k, v in cpu.items()}
        if samples else {},
        "rows": rows,
        "final": row(result["final_samples"]),
        "errors": result["errors"],
        "round": {"state": view["state"], "selected": view["selected"],
                  "received": view["received"], "target": view["target_clients"],
                  "published_version": view.get("published_version"),
                  "reason": view.get("reason")},
        "uploaded": result["uploaded"],
        "final_versions": result["final_versions"],
    }


def format_table(summary: dict[str, Any]) -> str:
    """The summary as a Markdown table plus the round outcome."""
    def num(v: Any, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    lines = ["| request | count | req/s | median ms | p99 ms | max ms | 4xx | 5xx | conn err |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for kind, r in summary["rows"].items():
        label = f"**{kind}**" if kind == "all" else kind
        lines.append(f"| {label} | {r['count']} | {r['rate']:.1f} | {num(r['median_ms'], '.1f')}"
                     f" | {num(r['p99_ms'], '.1f')} | {num(r['max_ms'], '.1f')} | {r['4xx']}"
                     f" | {r['5xx']} | {r['conn_errors']} |")
    rnd, cores = summary["round"], summary["cpu_cores"]
    lines.append("")
    lines.append(f"{summary['devices']} devices x {summary['iterations']} iterations in "
                 f"{summary['client_processes']} client processes: {summary['wall_s']:.1f} s; "
                 "CPU cores busy: " + ", ".join(f"{k} {v:.2f}" for k, v in cores.items())
                 + "; CPU ms per request: " + ", ".join(
                     f"{k} {v:.1f}" for k, v in summary["cpu_ms_per_request"].items()))
    published = rnd["state"] == "published"
    lines.append(f"round: {rnd['state']}, selected {rnd['selected']}, received "
                 f"{rnd['received']} of target {rnd['target']} (received == selected: "
                 f"{rnd['received'] == rnd['selected']}); published version "
                 f"{rnd['published_version'] if published else '-'}; "
                 f"afterwards devices hold versions {summary['final_versions']} "
                 f"({summary['final']['count']} final requests, {summary['final']['5xx']} 5xx)")
    if summary["errors"]:
        lines.append(f"device errors ({len(summary['errors'])}): "
                     + "; ".join(summary["errors"][:5]))
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    _client_main(_Pipe(sys.stdin.buffer, sys.stdout.buffer))
