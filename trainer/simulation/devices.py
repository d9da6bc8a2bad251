"""Virtual devices: the real device SDK (DeviceClient: SQLite EventLog, ModelStore, LiteRT
Recommender, LocalTrainer, SyncClient with SecAgg+) in a directory per device.

A ``DeviceWorker`` owns a shard of the population for the whole simulation (so its devices'
directories and their in-flight SecAgg+ sessions stay where they are) and runs one device
at a time. It is plain Python with JSON-able inputs and outputs, so the same object runs in
a local worker process (``trainer.simulation.backends.LocalBackend``) or as a Ray actor.

Between operations no DeviceClient stays open: each opens its device's directory, works and
closes it, so a worker's memory does not grow with its shard. What stays in memory between
the SecAgg+ stages of a round is the device's session (its keys, the shares it holds: a few
tens of KB); the update vector itself is spilled to the device's directory until the
masked-input stage reads it back.

This module imports the device SDK and numpy only (no pandas, no torch): a worker process
is as light as the devices it runs."""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import urllib3

from device_sdk import secagg
from device_sdk.device_client import DeviceClient
from device_sdk.files import load_or_create_private_bytes
from device_sdk.recommender import HistoryPolicy
from device_sdk.sync_client import SyncError
from device_sdk.uploads import SecAggSession

K = 10
# Where a device may fail in a SecAgg+ round (it stops answering from then on): the round
# states of the stages.
STAGES = tuple(stage.state for stage in secagg.STAGES)


@dataclass
class DeviceStream:
    """One device's replayable events, oldest first (held-out events already removed)."""

    user: str
    items: list[str]
    kinds: list[str]
    times: np.ndarray  # int64 Unix seconds

    def __len__(self) -> int:
        return len(self.items)

    def to_json(self) -> dict:
        return {"user": self.user, "items": self.items, "kinds": self.kinds,
                "times": self.times.tolist()}

    @classmethod
    def from_json(cls, obj: dict) -> DeviceStream:
        return cls(obj["user"], list(obj["items"]), list(obj["kinds"]),
                   np.asarray(obj["times"], dtype=np.int64))


def device_dir_name(user: str) -> str:
    """A file-system-safe, stable directory name for a user key of any shape."""
    return hashlib.sha256(user.encode()).hexdigest()[:20]


def peak_rss_mb(pid: int | str = "self") -> float | None:
    """Peak resident memory of a process (Linux VmHWM), MiB. Not getrusage's ru_maxrss: a
    child started by fork + exec inherits its parent's peak there."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


class CountingPool(urllib3.PoolManager):
    """An urllib3 pool that counts body bytes sent and received (headers excluded)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.sent = 0
        self.received = 0

    def urlopen(self, method: str, url: str, redirect: bool = True, **kw: Any
                ) -> urllib3.BaseHTTPResponse:
        body = kw.get("body")
        self.sent += len(body) if isinstance(body, (bytes, bytearray)) else 0
        response = super().urlopen(method, url, redirect=redirect, **kw)
        self.received += int(response.headers.get("Content-Length") or 0)
        return response


def device_key(seed: int, user: str) -> bytes:
    """The simulated device's raw Ed25519 private key: decided by the seed and the user."""
    return hashlib.sha256(f"{seed}/{user}/device-key".encode()).digest()


def device_id(seed: int, user: str) -> str:
    """The id the server knows that device by (what its selection coin is keyed on)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from device_sdk.device_identity import DeviceIdentity

    return DeviceIdentity(Ed25519PrivateKey.from_private_bytes(device_key(seed, user))).device_id


class ShardWorker:
    """A worker process's (or Ray actor's) fixed shard of device streams, driven by named
    operations, JSON in and JSON out; ``OPERATIONS`` lists a subclass's."""

    OPERATIONS: tuple[str, ...] = ("add",)
    streams: dict[str, DeviceStream]

    def handle(self, op: str, args: dict[str, Any]) -> Any:
        if op not in self.OPERATIONS:
            raise ValueError(f"unknown operation {op!r}")
        return getattr(self, op)(**args)

    def add(self, streams: list[dict[str, Any]]) -> int:
        for obj in streams:
            stream = DeviceStream.from_json(obj)
            self.streams[stream.user] = stream
        return len(self.streams)


class DeviceWorker(ShardWorker):
    """``config``: root (directory for device directories), server_url, server_key (hex of
    the pinned Ed25519 key), exclude_kinds (the shop's recommendation filter), seed (the
    simulation's; each device's local training is drawn from it and its user)."""

    OPERATIONS = ("add", "begin", "finish_late", "step", "drop", "stats")

    def __init__(self, config: dict[str, Any]) -> None:
        self.root = Path(config["root"])
        self.root.mkdir(parents=True, exist_ok=True)
        self.server_url = config["server_url"]
        self.server_key = bytes.fromhex(config["server_key"])
        self.seed = int(config.get("seed", 0))  # local training is drawn from it + the user
        self.policy = HistoryPolicy(exclude_kinds=tuple(config.get("exclude_kinds",
                                                                   ("dismiss",))))
        self.streams: dict[str, DeviceStream] = {}
        self.logged: dict[str, int] = {}  # events replayed into each device's log so far
        self.sessions: dict[str, SecAggSession] = {}
        self.pool = CountingPool(maxsize=4)

    # -- operations (JSON in, JSON out) ---------------------------------------------------
    def stats(self) -> dict[str, Any]:
        return {"devices": len(self.streams), "sessions": len(self.sessions),
                "max_rss_mb": peak_rss_mb()}

    def _traffic(self) -> Callable[[], dict[str, int]]:
        """Body bytes this worker sends and receives from now until the returned call."""
        sent, received = self.pool.sent, self.pool.received
        return lambda: {"bytes_up": self.pool.sent - sent,
                        "bytes_down": self.pool.received - received}

    def _device(self, user: str) -> DeviceClient:
        directory = self.root / device_dir_name(user)
        directory.mkdir(parents=True, exist_ok=True)
        # The device key (so its id, so the server's seeded selection coins) comes from the
        # seed and the user: a rerun with the same seed selects the same devices.
        load_or_create_private_bytes(directory / "device_key",
                                     lambda: device_key(self.seed, user), "device key")
        return DeviceClient(directory, server_key=self.server_key,
                            server_url=self.server_url, policy=self.policy,
                            http_pool=self.pool, training_seed=f"{self.seed}/{user}")

    def begin(self, users: list[str], now: int, drop: dict[str, str] | None = None,
              late: dict[str, bool] | None = None) -> list[dict[str, Any]]:
        """Round start for each of ``users``: replay its events up to ``now``, sync (install
        the newest model, check in: the server's coin selects it or not), recommend (online
        hit: is its next real event in the top K?), and when selected train and advertise
        (SecAgg+ stage 1). ``selected`` in each result is the server's answer.
        ``drop[user] == "collecting"``: the device dies after checking in. ``late``: it checks
        in but trains and answers only in ``finish_late`` (a straggler the round will not
        wait for)."""
        drop, late = drop or {}, late or {}
        return [self._begin_one(u, now, drop.get(u) == "collecting", bool(late.get(u)))
                for u in users]

    def _begin_one(self, user: str, now: int, dies: bool, late: bool) -> dict[str, Any]:
        started = time.perf_counter()
        traffic = self._traffic()
        stream = self.streams[user]
        out: dict[str, Any] = {"user": user, "status": "advertised"}
        try:
            with self._device(user) as device:
                done = self.logged.get(user, 0)
                upto = int(np.searchsorted(stream.times, now, side="left"))
                if upto > done:
                    device.log_many([(stream.items[i], stream.kinds[i],
                                      float(stream.times[i])) for i in range(done, upto)])
                    self.logged[user] = upto
                out["events"] = upto
                first = device.sync(train=False)
                out["installed"] = first.installed
                out["model_version"] = device.model_version
                if first.install_error:
                    out["install_error"] = first.install_error
                if upto < len(stream) and device.model_version is not None:
                    # asked when the user's next event comes (session models read the gap)
                    keys = [r.item for r in device.recommend(
                        K, now=float(stream.times[upto]))]
                    nxt = stream.items[upto]
                    rank = keys.index(nxt) if nxt in keys else None
                    out["hit"] = rank is not None
                    out["ndcg"] = 0.0 if rank is None else 1.0 / math.log2(rank + 2)
                if dies or late:  # the check-in is idempotent: the stored coin again
                    task = device.sync_client.checkin(device.model_version,
                                                      device.events.count())
                    out["selected"] = task is not None
                    out["status"] = "skipped" if task is None else (
                        "dropped" if dies else "late")
                else:
                    self._train_and_advertise(user, device, out)
        except (SyncError, OSError, ValueError, RuntimeError) as exc:
            out["status"], out["error"] = "error", f"{type(exc).__name__}: {exc}"
        out.update(traffic())
        out["seconds"] = time.perf_counter() - started
        return out

    def _train_and_advertise(self, user: str, device: DeviceClient, out: dict[str, Any]
                             ) -> None:
        report = device.sync(wait=False)
        out["selected"] = report.round_id is not None
        out["examples"] = report.num_examples
        out["update_norm"] = report.update_norm_before_clip
        if report.pending is None:
            out["status"] = "skipped"
            out["error"] = report.skipped or "no task offered"
            return
        report.pending.spill(device.data_dir / "pending-update.npy")
        self.sessions[user] = report.pending

    def finish_late(self, users: list[str]) -> list[dict[str, Any]]:
        """The stragglers of ``begin``: train and try to advertise now."""
        results = []
        for user in users:
            traffic = self._traffic()
            out: dict[str, Any] = {"user": user, "status": "advertised"}
            try:
                with self._device(user) as device:
                    self._train_and_advertise(user, device, out)
            except (SyncError, OSError, ValueError, RuntimeError) as exc:
                out["status"], out["error"] = "error", f"{type(exc).__name__}: {exc}"
            out.update(traffic())
            results.append(out)
        return results

    def step(self, users: list[str]) -> list[dict[str, Any]]:
        """One poll (and the answer the server asks for) per device's session."""
        results = []
        for user in users:
            traffic = self._traffic()
            out: dict[str, Any] = {"user": user}
            session = self.sessions.get(user)
            if session is None:
                out["status"] = "no_session"
            else:
                try:
                    done = session.step()
                    out["status"] = "done" if done else "answered" if (
                        session.answered) else "waiting"
                    out["answered"] = session.answered
                    if done:
                        del self.sessions[user]
                except SyncError as exc:
                    del self.sessions[user]
                    out["status"] = "dropped" if exc.code in (
                        "secagg_dropped", "stage_closed") else "error"
                    out["error"] = f"{exc.code}: {exc.message}"
            out.update(traffic())
            results.append(out)
        return results

    def drop(self, users: list[str]) -> list[dict[str, Any]]:
        """These devices stop answering (fault injection): their sessions are discarded."""
        results = []
        for user in users:
            session = self.sessions.pop(user, None)
            if session is not None:
                session.discard()
            results.append({"user": user, "status": "dropped"})
        return results
