"""Driving the real sync server in tests: the server process, its admin token and settings,
and the requests every server test makes (publish a bundle, open a round, wait for it to
settle, register a device, read a published version back).

    with ServerProcess(tmp_path / "server", **SETTINGS, **db_settings) as server:
        assert publish(server, zip_bundle(bundle_dir)).status == 201   # version 1
        opened = open_round(server, upload_scheme=SEALED_SCHEME)       # asserts 201
        client = sync_client(server, tmp_path, "d0")                    # registered
        view = settled(server, opened["id"])                            # published / failed

A file whose rounds share defaults binds them once (keyword arguments given at a call
override them): ``open_round = partial(support.open_round, **FAST)``."""

from __future__ import annotations

import base64
import io
import json
import time
import zipfile
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import DateTime, bindparam, create_engine, text

from device_sdk.device_client import DeviceClient
from device_sdk.device_identity import DeviceIdentity
from device_sdk.model_update import ModelUpdate
from device_sdk.sync_client import SyncClient
from trainer.simulation.server import ServerProcess

__all__ = [
    "ADMIN", "GATED_PUBLISHER", "REPUBLISH", "REPUBLISH_SETTINGS", "SECAGG_ORDER", "SETTINGS",
    "ServerProcess", "answer_of", "bundle_member", "drive", "error_of", "make_device",
    "masked_frames_left", "open_round", "pass_deadline", "publish", "random_update", "settled",
    "shop", "signing_key_of", "sync_client", "try_open_round", "weights_of",
]

ADMIN = "admin-secret"
# The weights-only publisher (no re-export): rounds publish in milliseconds.
REPUBLISH = "sync_server.registry:republish_weights"
# The weights-only publisher held at a gate file (tests/support/gated_publisher.py); the
# server subprocess imports it by this name (the checkout is first on its path).
GATED_PUBLISHER = "tests.support.gated_publisher:publish"
SETTINGS: Mapping[str, Any] = {"ADMIN_TOKEN": ADMIN, "RATE_LIMIT": 1000}
REPUBLISH_SETTINGS: Mapping[str, Any] = {**SETTINGS, "PUBLISHER": REPUBLISH}
# The SecAgg+ requests a device answers, in order (``drive``).
SECAGG_ORDER = ("advertise", "share_keys", "masked_input", "unmask")


def answer_of(response: Any) -> tuple[int, Any]:
    """A response's status and JSON body."""
    return response.status, json.loads(response.data)


def error_of(response: Any, *, check_shape: bool = False) -> tuple[int, str]:
    """A refusal's status and stable error code. ``check_shape`` also asserts the error
    document itself: a JSON content type, ``{"error": {...}}`` only, a message."""
    if check_shape:
        assert response.headers["Content-Type"].startswith("application/json")
    body = json.loads(response.data)
    if check_shape:
        assert set(body) == {"error"} and body["error"]["message"]
    return response.status, body["error"]["code"]


def publish(server: ServerProcess, zip_bytes: bytes, rollout_percent: Any = None) -> Any:
    """POST a bundle zip to /v1/admin/models (optionally a staged rollout); the response."""
    query = "" if rollout_percent is None else f"?rollout_percent={rollout_percent}"
    return server.admin("POST", "/v1/admin/models" + query, body=zip_bytes,
                        headers={"Content-Type": "application/zip"})


def signing_key_of(server: ServerProcess) -> bytes:
    """The server's raw Ed25519 signing key, the one devices pin."""
    keys = json.loads(server.request("GET", "/v1/server-keys").data)
    return base64.b64decode(keys["signing_key"])


def try_open_round(server: ServerProcess, *, timeout: float | None = None,
                   **config: Any) -> tuple[int, Any]:
    """POST a round config; the status and body, whatever they are (tests of refusals).
    ``timeout``: the request's, when a DP round's accountant may be slow to open it."""
    options = {} if timeout is None else {"timeout": timeout}
    return answer_of(server.admin("POST", "/v1/admin/rounds", json=config, **options))


def open_round(server: ServerProcess, **config: Any) -> dict[str, Any]:
    """Open a round (asserts 201); the round's view."""
    response = server.admin("POST", "/v1/admin/rounds", json=config)
    assert response.status == 201, response.data
    return json.loads(response.data)


def settled(server: ServerProcess, round_id: str, timeout: float = 90.0) -> dict[str, Any]:
    """The round's view once it published or failed, or at ``timeout`` (a guard) whatever it
    is. Each admin GET advances the round: it is the request that closes an overdue stage or
    takes over an expired claim, and the request that completed a round was answered before
    its aggregation claimed it."""
    deadline = time.monotonic() + timeout
    while True:
        view = server.round(round_id, settled=False)
        if view["state"] in ("published", "failed") or time.monotonic() > deadline:
            return view
        time.sleep(0.1)


def pass_deadline(database_url: str, round_id: str, column: str = "deadline") -> None:
    """Move a round's ``deadline`` (or ``stage_deadline``) a second into the past in the
    server's database, as if the clock had run on: the server meets it at its next request
    by its own clock comparison. Tests use this instead of a short deadline that their own
    steps would have to beat, so the outcome does not depend on how fast the machine is."""
    assert column in ("deadline", "stage_deadline"), column
    past = datetime.now(UTC) - timedelta(seconds=1)
    engine = create_engine(database_url)
    try:
        with engine.begin() as connection:
            changed = connection.execute(
                text(f"UPDATE rounds SET {column} = :past WHERE id = :round_id").bindparams(
                    bindparam("past", type_=DateTime(timezone=True))),
                {"past": past, "round_id": round_id}).rowcount
    finally:
        engine.dispose()
    assert changed == 1, f"no round {round_id}"


def sync_client(server: ServerProcess, directory: Path, name: str = "device", *,
                register: bool = True, **kwargs: Any) -> SyncClient:
    """A SyncClient whose key and outbox live in ``directory`` under ``name`` (the same name
    is the same device), registered unless ``register`` is False. No retries and a 30 s
    timeout unless ``kwargs`` say otherwise."""
    identity = DeviceIdentity.load_or_create(directory / f"{name}.key")
    kwargs.setdefault("retries", 0)
    kwargs.setdefault("timeout", 30.0)
    client = SyncClient(server.url, identity, server_signing_key=signing_key_of(server),
                        outbox_dir=directory / f"{name}.outbox", **kwargs)
    if register:
        client.register()
    return client


def make_device(server: ServerProcess, directory: Path, tiny_checkpoint: Any,
                user: int) -> DeviceClient:
    """A DeviceClient with a shopping history (test user ``user`` of the tiny data set)."""
    device = DeviceClient(directory, server_key=signing_key_of(server), server_url=server.url)
    shop(device, tiny_checkpoint, user)
    return device


def shop(device: DeviceClient, tiny_checkpoint: Any, user: int = 0) -> list[str]:
    """Log test user ``user``'s history (tiny data set) on ``device``: a view, a click and an
    add-to-cart per item, at fixed times. The item keys, oldest first."""
    _, prepared = tiny_checkpoint
    keys = [prepared.vocab.keys[i] for i in prepared.split.test.history[user] if i]
    device.log_many([(key, kind, 1000.0 + 3 * n + j) for n, key in enumerate(keys)
                     for j, kind in enumerate(("view", "click", "add_to_cart"))])
    return keys


def random_update(shapes: Mapping[str, tuple[int, ...]], rng: np.random.Generator,
                  clip: float = 1.0, version: int = 1) -> ModelUpdate:
    """A random update of norm 0.9 ``clip`` over ``shapes``, based on ``version``."""
    delta = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    norm = float(np.sqrt(sum(np.square(v, dtype=np.float64).sum() for v in delta.values())))
    delta = {k: (v * (0.9 * clip / norm)).astype(np.float32) for k, v in delta.items()}
    return ModelUpdate(version, delta, 10, clip, 0.9 * clip, norm)


def bundle_member(client: SyncClient, version: int, name: str) -> bytes:
    """One file of a published version's bundle zip, as a device downloads it."""
    with zipfile.ZipFile(io.BytesIO(client.download_bundle(version))) as zf:
        return zf.read(name)


def weights_of(client: SyncClient, version: int) -> dict[str, np.ndarray]:
    """The weights of a published version, as a device downloads them."""
    with np.load(io.BytesIO(bundle_member(client, version, "weights.npz"))) as npz:
        return {k: npz[k] for k in npz.files}


def masked_frames_left(server: ServerProcess, wait_s: float = 10.0) -> list[Path]:
    """Update frames still in the blob store: deleted right after a publish commits (the
    aggregation runs after the response that completed the round), so wait a little."""
    deadline = time.monotonic() + wait_s
    while True:
        frames = [p for p in (server.data_dir / "blobs").rglob("*")
                  if p.is_file() and _head(p) == b"PRT1"]
        if not frames or time.monotonic() > deadline:
            return frames
        time.sleep(0.1)


def _head(path: Path) -> bytes:
    """A blob's first 4 bytes, or b"" when the server deleted it meanwhile."""
    try:
        with open(path, "rb") as f:
            return f.read(4)
    except FileNotFoundError:
        return b""


def drive(sessions: Sequence[Any], stage: str) -> None:
    """Step each SecAgg+ session until it has answered ``stage`` (SECAGG_ORDER)."""
    target = SECAGG_ORDER.index(stage)
    deadline = time.monotonic() + 60
    while True:
        behind = [s for s in sessions if SECAGG_ORDER.index(s.answered) < target]
        if not behind:
            return
        assert time.monotonic() < deadline, [s.answered for s in sessions]
        for session in behind:
            session.step()
        time.sleep(0.05)
