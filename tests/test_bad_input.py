"""Bad input over every endpoint of the sync server's HTTP API, as one table (issue 7).

One real server per database (SQLite, PostgreSQL) serves the whole table: a subprocess on
loopback with real keys, real cryptography and the tiny real export as version 1. Each row
(``Case``) is one raw HTTP request (``http.client``: the path goes out byte for byte, so
``..``, ``%2e%2e%2f`` and ``%00`` reach the server as written, and device rows are signed
over exactly that path) and its expected 4xx and stable error code. For every row:

- the status, and a body that is exactly ``{"error": {"code": <expected>, "message": str}}``;
- no ERROR line or traceback in the server's log;
- NOTHING WAS STORED: every table of the database, read directly with SQLAlchemy on the
  server's own URL, and every file under DATA_DIR (blobs, keys, scratch) are the same after
  the request as before it (row count + content hash per table, and the rows themselves so a
  failure shows what changed). The one exception is documented where it is made.

The rows run while rounds are open, stage by stage (``PHASES``): a sealed round (round-1)
first, then a SecAgg+ round (round-2) through collecting, share_keys, masked_input and
unmasking. Between phases honest devices (the SDK's SyncClient, SealedUpload and
SecAggSession) take their turns; after the rows each round publishes from the honest
devices' updates: the round continues for honest devices.

Devices: H0-H2 honest; M ("mallory") is selected into both rounds and sends the bad
messages (in the SecAgg+ round it finally answers each stage properly, so the stage rows
see a real participant); O is registered but never selected; S is selected into the SecAgg+
round but never advertises (not a participant); X is a key that was never registered; R is
a fresh key used for registration rows only (never registered).

Last, duplicates sent at the same instant (each on its own server, both databases): eight
sealed updates from one device, eight masked inputs from one device, four bundles of one
version: exactly one is taken and exactly its blob is left in the store."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.client
import io
import json
import math
import os
import struct
import threading
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pytest
from sqlalchemy import MetaData, create_engine, select

from device_sdk import secagg
from device_sdk.bundle import load_bundle
from device_sdk.device_identity import DeviceIdentity
from device_sdk.model_update import ModelUpdate
from device_sdk.protocol import (
    HEADER_DEVICE,
    HEADER_NONCE,
    HEADER_SIGNATURE,
    HEADER_TIMESTAMP,
    SEALED_MAGIC,
    SEALED_SCHEME,
    _sealed_aad,
    _sealed_key,
    b64,
    encode_tensors,
    seal_update,
)
from device_sdk.sync_client import SyncClient
from device_sdk.uploads import SecAggUpload
from tests.support.bundles import resign_bundle, zip_bundle
from tests.support.server import ADMIN, REPUBLISH, ServerProcess, random_update

MAX_BODY = 256 * 1024
MAX_BUNDLE = 4 * 2**20
SETTINGS = {"ADMIN_TOKEN": ADMIN, "PUBLISHER": REPUBLISH,
            "RATE_LIMIT": 1_000_000, "MAX_BODY_BYTES": MAX_BODY, "MAX_BUNDLE_BYTES": MAX_BUNDLE}
SEALED, SECURE = "round-1", "round-2"
NONCE_TTL_S = 600  # sync_server.auth.NONCE_TTL_S: older nonces may be pruned at any time

PHASES = (
    "sealed",        # round-1 (sealed) collecting; M, H0, H1 selected, nobody uploaded
    "sealed_dup",    # H0 uploaded
    "idle",          # H1 uploaded, the operator closed the round: published as version 2
    "collecting",    # round-2 (SecAgg+) collecting; H0-H2, M, S selected, nobody advertised
    "advertised",    # H0-H2 and M advertised (S never does)
    "share_keys",    # the operator closed collecting: share_keys with U1 = {H0-H2, M}
    "shares_sent",   # M sent its shares
    "masked_input",  # H0-H2 sent theirs: masked_input
    "masked_sent",   # M sent its masked input
    "unmasking",     # H0-H2 sent theirs: unmasking
    "unmask_sent",   # M revealed its shares
    "done",          # H0-H2 revealed theirs: round-2 published as version 3
)


# --- the table's vocabulary ----------------------------------------------------------------


@dataclass(frozen=True)
class Signed:
    """A device request. ``how``: ``ok`` (a valid signature), ``unsigned``, ``stale`` /
    ``future`` (timestamp an hour off), ``replay`` (the identical request was sent once
    before the row), ``other_body`` / ``other_path`` / ``other_method`` (signed over
    something else), ``other_key`` (claims ``who``'s id, signed by another device's key),
    ``bad_nonce`` / ``bad_timestamp`` / ``bad_b64`` (a malformed header)."""

    who: str
    how: str = "ok"


@dataclass(frozen=True)
class Auth:
    """An Authorization header (None: none): admin and public requests."""

    header: str | None = f"Bearer {ADMIN}"


PUBLIC = Auth(None)
ADMIN_OK = Auth()
AUTO = "auto"  # the Content-Type the endpoint takes

Body = bytes | Callable[["World"], bytes]


@dataclass(frozen=True)
class Case:
    id: str
    phase: str
    method: str
    path: str
    status: int
    code: str
    auth: Signed | Auth = PUBLIC
    body: Body = b""
    ctype: str | None = AUTO


def J(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def nested(depth: int = 100_000) -> bytes:
    """Valid-looking JSON nested deeper than any parser's recursion limit."""
    return b"[" * depth + b"]" * depth


HUGE = b"x" * (MAX_BODY + 1)
MALFORMED = b'{"num_examples": 1,'


# --- the world: one server, its devices and rounds, moved through PHASES ----------------------


def seal_frame(frame: bytes, round_id: str, device_id: str, transport_pub: bytes) -> bytes:
    """Any PRT1 frame sealed exactly as ``device_sdk.protocol.seal_update`` seals an update
    (which refuses to seal a bad one): what a modified device could send."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import (
        X25519PrivateKey,
        X25519PublicKey,
    )
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    ephemeral = X25519PrivateKey.generate()
    ephemeral_pub = ephemeral.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(transport_pub))
    key = _sealed_key(shared, ephemeral_pub, transport_pub)
    nonce = os.urandom(12)
    return SEALED_MAGIC + ephemeral_pub + nonce + ChaCha20Poly1305(key).encrypt(
        nonce, frame, _sealed_aad(round_id, device_id))


@dataclass
class Snapshot:
    tables: dict[str, tuple[int, str]]          # name -> (row count, content hash)
    rows: dict[str, set[tuple]]
    columns: dict[str, list[str]]
    files: dict[str, str]                       # path under DATA_DIR -> sha256


class Store:
    """What the server has stored: its database, read directly, and its files."""

    def __init__(self, url: str, data_dir: Path) -> None:
        self.engine = create_engine(url)
        self.data_dir = data_dir
        self.meta = MetaData()
        self.meta.reflect(self.engine)
        assert {"devices", "nonces", "rounds", "updates", "secagg_members", "secagg_shares",
                "model_versions", "model_metrics", "privacy_ledger", "selections"} <= set(
            self.meta.tables)

    def snapshot(self) -> Snapshot:
        tables, rows, columns = {}, {}, {}
        with self.engine.connect() as connection:
            for name, table in sorted(self.meta.tables.items()):
                # A device's last_seen_at moves on every authenticated request: that is the
                # request being seen, not the request's input being stored.
                cols = [c for c in table.columns if (name, c.name) != ("devices",
                                                                          "last_seen_at")]
                result = connection.execute(select(*cols)).all()
                frozen = {tuple(json.dumps(v, sort_keys=True) if isinstance(v, dict | list)
                                else bytes(v) if isinstance(v, memoryview) else v
                                for v in r) for r in result}
                digest = hashlib.sha256(repr(sorted(frozen, key=repr)).encode()).hexdigest()
                tables[name], rows[name] = (len(result), digest), frozen
                columns[name] = [c.name for c in cols]
        files = {}
        for path in sorted(self.data_dir.rglob("*")):
            if path.is_file() and not path.name.startswith("pocketrec.db"):  # SQLite's own
                files[str(path.relative_to(self.data_dir))] = hashlib.sha256(
                    path.read_bytes()).hexdigest()
        return Snapshot(tables, rows, columns, files)

    def close(self) -> None:
        self.engine.dispose()


def assert_nothing_stored(before: Snapshot, after: Snapshot,
                          own_nonce: tuple[str, str] | None) -> None:
    assert after.files == before.files, "files changed under DATA_DIR: " + repr(
        sorted(set(after.files.items()) ^ set(before.files.items())))
    assert set(after.tables) == set(before.tables)
    for name in before.tables:
        added = after.rows[name] - before.rows[name]
        removed = before.rows[name] - after.rows[name]
        if name == "nonces":
            # The one exception: a validly signed request legitimately records its own nonce
            # (that is how its replay is refused), whatever the view then refuses. Nothing
            # else may appear, and only nonces older than the TTL may be pruned meanwhile.
            cols = after.columns[name]
            keys = {(r[cols.index("device_id")], r[cols.index("nonce")]) for r in added}
            assert keys <= ({own_nonce} if own_nonce else set()), f"nonces added: {keys}"
            cutoff = datetime.now(UTC) - timedelta(seconds=NONCE_TTL_S)
            for r in removed:
                seen = r[cols.index("seen_at")]
                seen = seen if seen.tzinfo else seen.replace(tzinfo=UTC)
                assert seen < cutoff, f"a fresh nonce was removed: {r}"
            continue
        if name == "rate_limits":
            assert_only_counted(before.rows[name], after.rows[name], after.columns[name],
                                own_nonce)
            continue
        assert after.tables[name] == before.tables[name], (
            f"table {name} changed: added {added}, removed {removed}")


def assert_only_counted(before: set, after: set, cols: list[str],
                        own_nonce: tuple[str, str] | None) -> None:
    """Rate-limit counters (``sync_server.rate_limit``) count every request, refused or not:
    the request may add one hit to its own device's and its address's counters (or start
    their window); other counters may only vanish once expired."""
    key, hits, ends = (cols.index(c) for c in ("key", "hits", "expires_at"))
    old = {r[key]: r for r in before}
    new = {r[key]: r for r in after}
    for k, row in new.items():
        if old.get(k) == row:
            continue
        ours = ("/127.0.0.1/" in k) or (
            own_nonce is not None and k.startswith(f"LIMITER/device/{own_nonce[0]}/"))
        assert ours, f"a counter this request does not own changed: {row}"
        assert row[hits] == 1 or (k in old and row[hits] == old[k][hits] + 1), (old.get(k), row)
    for k in set(old) - set(new):
        assert old[k][ends] < time.time(), f"a running counter was removed: {old[k]}"


class World:
    """One server with its devices, moved forward through PHASES on demand."""

    def __init__(self, root: Path, db: dict[str, str], tiny_export) -> None:
        self.root = root
        self.server = ServerProcess(root / "server", **SETTINGS, **db)
        try:
            self._setup(db, tiny_export)
        except BaseException:
            self.server.close()
            raise

    def _setup(self, db: dict[str, str], tiny_export) -> None:
        server = self.server
        self.host, self.port = urlsplit(server.url).hostname, urlsplit(server.url).port
        self.bundle_dir = tiny_export.bundle_dir
        self.v1_zip = zip_bundle(self.bundle_dir)
        response = server.admin("POST", "/v1/admin/models", body=self.v1_zip,
                                headers={"Content-Type": "application/zip"})
        assert response.status == 201, response.data
        keys = json.loads(server.request("GET", "/v1/server-keys").data)
        self.signing_key = base64.b64decode(keys["signing_key"])
        self.transport_key = base64.b64decode(keys["transport_key"])
        self.clients: dict[str, SyncClient] = {}
        for name in ("H0", "H1", "H2", "M", "O", "S", "X", "R"):
            identity = DeviceIdentity.load_or_create(self.root / f"{name}.key")
            self.clients[name] = SyncClient(
                server.url, identity, server_signing_key=self.signing_key,
                outbox_dir=self.root / f"{name}.outbox", retries=0, timeout=60.0)
            if name not in ("X", "R"):
                self.clients[name].register()
        self.url = db.get("DATABASE_URL") or f"sqlite:///{server.data_dir / 'pocketrec.db'}"
        self.store = Store(self.url, server.data_dir)
        self.rng = np.random.default_rng(7)
        self.log_offset = 0
        self.phase = -1
        self.tasks: dict[str, Any] = {}
        self.updates: dict[str, ModelUpdate] = {}
        self.sessions: dict[str, Any] = {}
        self.at("sealed")

    def close(self) -> None:
        self.store.close()
        self.server.close()

    def id(self, name: str) -> str:
        return self.clients[name].identity.device_id

    def admin_json(self, method: str, path: str, **kwargs) -> dict:
        response = self.server.admin(method, path, **kwargs)
        assert response.status in (200, 201), (path, response.status, response.data)
        return json.loads(response.data)

    # --- phases ----------------------------------------------------------------------------

    def at(self, phase: str) -> World:
        target = PHASES.index(phase)
        assert target >= self.phase, f"phase {phase} has passed (now {PHASES[self.phase]})"
        while self.phase < target:
            self.phase += 1
            getattr(self, "_enter_" + PHASES[self.phase])()
        return self

    def _enter_sealed(self) -> None:
        opened = self.admin_json("POST", "/v1/admin/rounds", json={
            "upload_scheme": SEALED_SCHEME, "target_clients": 3, "min_clients": 2,
            "deadline_s": 3600.0, "strategy": "fedavg", "server_lr": 1.0, "clip_norm": 1.0})
        assert opened["round_id"] == SEALED and opened["state"] == "collecting"
        self.base1 = load_bundle(self.bundle_dir).weights()
        for name in ("M", "H0", "H1"):
            task = self.clients[name].checkin(1, 10)
            assert task is not None and task.round_id == SEALED
            self.tasks[name] = task
        names = self.tasks["M"].trainable or sorted(self.base1)
        self.sealed_shapes = {k: self.base1[k].shape for k in names}
        for name in ("H0", "H1"):
            self.updates[name] = random_update(self.sealed_shapes, self.rng, 1.0, 1)

    def _enter_sealed_dup(self) -> None:
        accepted = self.clients["H0"].upload(self.tasks["H0"], self.updates["H0"])
        assert accepted["accepted"] is True

    def _enter_idle(self) -> None:
        assert self.clients["H1"].upload(self.tasks["H1"], self.updates["H1"])["accepted"]
        # M never sent a valid update: the operator stops waiting for it (as its deadline
        # would), and the round publishes from the honest devices' updates.
        self.admin_json("POST", f"/v1/admin/rounds/{SEALED}/close-stage")
        self.sealed_view = self.finished(SEALED)

    def _enter_collecting(self) -> None:
        opened = self.admin_json("POST", "/v1/admin/rounds", json={
            "target_clients": 5, "min_clients": 3, "deadline_s": 3600.0,
            "secagg_stage_timeout_s": 3600.0, "secagg_poll_s": 0.05, "strategy": "fedavg",
            "server_lr": 1.0, "clip_norm": 1.0})
        assert opened["round_id"] == SECURE and opened["config"]["upload_scheme"] == (
            secagg.SCHEME) and opened["model_version"] == 2
        with zipfile.ZipFile(io.BytesIO(self.clients["H0"].download_bundle(2))) as zf, \
                np.load(io.BytesIO(zf.read("weights.npz"))) as npz:
            self.base2 = {k: npz[k] for k in npz.files}
        for name in ("H0", "H1", "H2", "M", "S"):
            task = self.clients[name].checkin(2, 10)
            assert task is not None and task.round_id == SECURE
            self.tasks[name] = task
        names = self.tasks["M"].trainable or sorted(self.base2)
        self.secure_shapes = {k: self.base2[k].shape for k in names}
        self.length = self.tasks["M"].secagg["vector_length"]
        assert self.length == sum(math.prod(s) for s in self.secure_shapes.values())
        for name in ("H0", "H1", "H2", "M"):
            self.updates[name] = random_update(self.secure_shapes, self.rng, 1.0, 2)

    def _enter_advertised(self) -> None:
        for name in ("M", "H0", "H1", "H2"):
            self.sessions[name] = SecAggUpload().begin(self.clients[name], self.tasks[name],
                                                       self.updates[name])

    def _secure_state(self) -> str:
        return self.server.round(SECURE, settled=False)["state"]

    def _enter_share_keys(self) -> None:
        # S was selected but never advertised: the operator stops waiting for it.
        self.admin_json("POST", f"/v1/admin/rounds/{SECURE}/close-stage")
        assert self._secure_state() == "share_keys"
        view = json.loads(self.clients["M"].request("GET", f"/v1/rounds/{SECURE}/secagg").data)
        assert view["action"] == "share_keys"
        self.neighbours = sorted(set(view["payload"]["adverts"]) - {self.id("M")})
        assert len(self.neighbours) == 3  # four participants: a complete graph

    def _step(self, names: tuple[str, ...], answered: str) -> None:
        for name in names:
            self.sessions[name].step()
            assert self.sessions[name].answered == answered, name

    def _enter_shares_sent(self) -> None:
        self._step(("M",), "share_keys")

    def _enter_masked_input(self) -> None:
        self._step(("H0", "H1", "H2"), "share_keys")
        assert self._secure_state() == "masked_input"

    def _enter_masked_sent(self) -> None:
        self._step(("M",), "masked_input")

    def _enter_unmasking(self) -> None:
        self._step(("H0", "H1", "H2"), "masked_input")
        assert self._secure_state() == "unmasking"

    def _enter_unmask_sent(self) -> None:
        self._step(("M",), "unmask")

    def _enter_done(self) -> None:
        self._step(("H0", "H1", "H2"), "unmask")
        self.secure_view = self.finished(SECURE)

    def finished(self, round_id: str, wait_s: float = 120.0) -> dict:
        """The round's view once it ended. The request that completes a round answers
        before its aggregation starts (after the response), so the next read may still see
        it collecting: wait (bounded) for the end, asserting nothing about the time."""
        deadline = time.monotonic() + wait_s
        view = self.server.round(round_id)
        while view["state"] not in ("published", "failed") and time.monotonic() < deadline:
            time.sleep(0.05)
            view = self.server.round(round_id)
        # The round's update frames are deleted just after its outcome commits: the rows
        # after it must not see that happen under them.
        while self.frames_left() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not self.frames_left()
        return view

    def frames_left(self) -> list[Path]:
        return [p for p in (self.server.data_dir / "blobs").rglob("*")
                if p.is_file() and p.read_bytes()[:4] == b"PRT1"]

    # --- one row ---------------------------------------------------------------------------

    def prepare(self, case: Case) -> tuple[dict[str, str], bytes, tuple[str, str] | None]:
        """(headers, body, the nonce a valid signature may record) for ``case``."""
        body = case.body(self) if callable(case.body) else case.body
        headers: dict[str, str] = {}
        ctype = case.ctype
        if ctype == AUTO:
            ctype = None if case.method == "GET" else (
                "application/zip" if case.path.startswith("/v1/admin/models?")
                or case.path == "/v1/admin/models"
                else "application/octet-stream" if case.path.endswith(("/update", "/masked"))
                else "application/json")
        if ctype is not None:
            headers["Content-Type"] = ctype
        own_nonce = None
        if isinstance(case.auth, Auth):
            if case.auth.header is not None:
                headers["Authorization"] = case.auth.header
        else:
            headers.update(self.signature(case, body))
            if case.auth.how == "ok" and case.auth.who != "X":
                own_nonce = (self.id(case.auth.who), headers[HEADER_NONCE])
        return headers, body, own_nonce

    def signature(self, case: Case, body: bytes) -> dict[str, str]:
        who, how = case.auth.who, case.auth.how
        identity = self.clients[who].identity
        method, path = case.method, case.path
        if how == "unsigned":
            return {}
        if how in ("stale", "future"):
            return identity.headers(method, path, body,
                                    now=time.time() + (-3600 if how == "stale" else 3600))
        if how == "other_body":
            return identity.headers(method, path, body + b" ")
        if how == "other_path":
            other = "/v1/models/current" if path != "/v1/models/current" else "/v1/server-keys"
            return identity.headers(method, other, body)
        if how == "other_method":
            return identity.headers("GET" if method != "GET" else "POST", path, body)
        if how == "other_key":
            signer = self.clients["O" if who != "O" else "H2"].identity
            return {**signer.headers(method, path, body), HEADER_DEVICE: identity.device_id}
        # "replay": valid headers; check() sends the identical request (same nonce) once
        # before the row, so the row is its replay.
        headers = identity.headers(method, path, body)
        if how == "bad_nonce":
            headers[HEADER_NONCE] = "z" * 32
        elif how == "bad_timestamp":
            headers[HEADER_TIMESTAMP] = "12e3"
        elif how == "bad_b64":
            headers[HEADER_SIGNATURE] = "%%%not base64%%%"
        else:
            assert how in ("ok", "replay"), how
        return headers

    def send(self, method: str, path: str, headers: dict[str, str], body: bytes
             ) -> tuple[int, dict[str, str], bytes]:
        """One request with the path exactly as given (no normalisation, no re-encoding)."""
        connection = http.client.HTTPConnection(self.host, self.port, timeout=120)
        try:
            connection.putrequest(method, path, skip_host=False, skip_accept_encoding=True)
            for key, value in headers.items():
                connection.putheader(key, value)
            if body or method != "GET":
                connection.putheader("Content-Length", str(len(body)))
            connection.endheaders()
            # The server may answer (413) and close without reading it all.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                connection.send(body)
            response = connection.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            connection.close()

    def new_log(self) -> str:
        with open(self.server.log_path, "rb") as f:
            f.seek(self.log_offset)
            text = f.read().decode("utf-8", "replace")
        self.log_offset += len(text.encode("utf-8", "replace"))
        return text


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def world(request, tmp_path_factory, tiny_export):
    db = {} if request.param == "sqlite" else {
        "DATABASE_URL": request.getfixturevalue("postgres").create_database()}
    made = World(tmp_path_factory.mktemp(f"bad-input-{request.param}"), db, tiny_export)
    yield made
    made.close()


def check(world: World, case: Case) -> None:
    world.at(case.phase)
    headers, body, own_nonce = world.prepare(case)
    if isinstance(case.auth, Signed) and case.auth.how == "replay":
        world.send(case.method, case.path, headers, body)  # the original, before the row
    world.new_log()
    before = world.store.snapshot()
    status, response_headers, data = world.send(case.method, case.path, headers, body)
    after = world.store.snapshot()
    log = world.new_log()
    try:
        parsed = json.loads(data)
    except ValueError:
        parsed = None
    assert (status, parsed and parsed.get("error", {}).get("code")) == (
        case.status, case.code), data[:300]
    assert 400 <= case.status < 500
    assert response_headers.get("Content-Type", "").startswith("application/json")
    assert set(parsed) == {"error"} and set(parsed["error"]) == {"code", "message"}
    assert isinstance(parsed["error"]["message"], str) and parsed["error"]["message"]
    for line in log.splitlines():
        assert "Traceback" not in line and '"level": "ERROR"' not in line, line
    assert_nothing_stored(before, after, own_nonce)


# --- the rows --------------------------------------------------------------------------------

ROUND_NAMES = [  # not round ids: each must be refused before it reaches anything
    ("dotdot", ".."),
    ("dotdot-encoded", "%2e%2e"),
    ("traversal-encoded", "..%2f..%2fkeys%2fsigning.key"),
    ("absolute-encoded", "%2Fetc%2Fpasswd"),
    ("nul", "round-1%00"),
    ("nul-only", "%00"),
    ("too-long", "r" * 129),
    ("leading-dash", "-round-1"),
    ("space", "round%201"),
    ("backslash", "..%5c..%5ckeys"),
    ("not-utf8", "round-%ff%fe"),
]
VERSION_NAMES = [  # not versions
    ("dotdot", ".."),
    ("traversal-encoded", "..%2f..%2fkeys%2fsigning.key"),
    ("negative", "-1"),
    ("nul", "1%00"),
    ("beyond-int64", "99999999999999999999"),
    ("beyond-int32", str(2**31)),
    ("float", "1.0"),
]


def auth_rows(slug: str, phase: str, method: str, path: str, body: Body = b"",
              who: str = "O") -> list[Case]:
    """The signature refusals, for one signed endpoint."""
    def row(how: str, status: int, code: str, signer: str = who) -> Case:
        return Case(f"{slug}/sig-{how}", phase, method, path, status, code,
                    Signed(signer, how), body)

    return [
        row("unsigned", 401, "bad_signature"),
        row("ok", 401, "unknown_device", signer="X"),
        row("stale", 401, "stale_request"),
        row("future", 401, "stale_request"),
        row("replay", 401, "replayed_request"),
        row("other_body", 401, "bad_signature"),
        row("other_path", 401, "bad_signature"),
        row("other_method", 401, "bad_signature"),
        row("other_key", 401, "bad_signature"),
    ]


def admin_auth_rows(phase: str, method: str, path: str, body: Body = b"",
                    basic_allowed: bool = False) -> list[Case]:
    slug = "admin-auth" + path.replace("/", "-")
    wrong = base64.b64encode(b"operator:wrong").decode()
    right = base64.b64encode(f"operator:{ADMIN}".encode()).decode()
    rows = [
        Case(f"{slug}/{method}/none", phase, method, path, 401, "unauthorized", PUBLIC, body),
        Case(f"{slug}/{method}/wrong-bearer", phase, method, path, 401, "unauthorized",
             Auth("Bearer wrong"), body),
        Case(f"{slug}/{method}/bearer-prefix", phase, method, path, 401, "unauthorized",
             Auth(f"Bearer {ADMIN}x"), body),
        Case(f"{slug}/{method}/token-without-scheme", phase, method, path, 401,
             "unauthorized", Auth(ADMIN), body),
        Case(f"{slug}/{method}/basic-wrong", phase, method, path, 401, "unauthorized",
             Auth(f"Basic {wrong}"), body),
        Case(f"{slug}/{method}/basic-malformed", phase, method, path, 401, "unauthorized",
             Auth("Basic !!!"), body),
    ]
    if basic_allowed:
        not_utf8 = base64.b64encode(b"operator:\xff\xfe").decode()
        rows.append(Case(f"{slug}/{method}/basic-not-utf8", phase, method, path, 401,
                         "unauthorized", Auth(f"Basic {not_utf8}"), body))
    else:  # Basic is for the read-only dashboard only (no CSRF elsewhere)
        rows.append(Case(f"{slug}/{method}/basic-right-password", phase, method, path, 401,
                         "unauthorized", Auth(f"Basic {right}"), body))
    return rows


def json_rows(slug: str, phase: str, path: str, auth: Signed | Auth) -> list[Case]:
    """Bodies that are not a JSON object, on one JSON endpoint."""
    return [
        Case(f"{slug}/malformed-json", phase, "POST", path, 400, "bad_request", auth,
             MALFORMED),
        Case(f"{slug}/json-array", phase, "POST", path, 400, "bad_request", auth, b"[1, 2]"),
        Case(f"{slug}/json-string", phase, "POST", path, 400, "bad_request", auth, b'"x"'),
        Case(f"{slug}/empty-body", phase, "POST", path, 400, "bad_request", auth, b""),
        Case(f"{slug}/not-utf8", phase, "POST", path, 400, "bad_request", auth,
             b'{"a": "\xff\xfe"}'),
        Case(f"{slug}/deeply-nested", phase, "POST", path, 400, "bad_request", auth,
             nested()),
        Case(f"{slug}/huge", phase, "POST", path, 413, "body_too_large", auth, HUGE),
        Case(f"{slug}/content-type-text", phase, "POST", path, 415, "unsupported_media_type",
             auth, b"{}", "text/plain"),
        Case(f"{slug}/content-type-form", phase, "POST", path, 415, "unsupported_media_type",
             auth, b"{}", "application/x-www-form-urlencoded"),
        Case(f"{slug}/content-type-missing", phase, "POST", path, 415,
             "unsupported_media_type", auth, b"{}", None),
    ]


def name_rows(slug: str, phase: str, method: str, template: str, names, auth, body: Body = b""
              ) -> list[Case]:
    return [Case(f"{slug}/name-{label}", phase, method, template.format(name), 404,
                 "not_found", auth, body) for label, name in names]


# -- sealed update frames (M in round-1)


def sealed(tensors=None, meta=None, *, frame: bytes | None = None, round_id: str = SEALED,
           device: str = "M", aad_device: str | None = None) -> Callable[[World], bytes]:
    """A sealed update from ``device``; defaults: a valid clipped float32 delta."""
    def build(w: World) -> bytes:
        data = frame
        if data is None:
            good = random_update(w.sealed_shapes, np.random.default_rng(1), 1.0, 1)
            values = good.delta if tensors is None else tensors(w, good.delta)
            info = {"round_id": SEALED, "base_version": 1, "num_examples": 10,
                    "clip_norm": 1.0, "norm": 0.9}
            info = info if meta is None else {**info, **meta}
            info = {k: v for k, v in info.items() if v is not ...}
            data = encode_tensors(values, info)
        return seal_frame(data, round_id, w.id(aad_device or device), w.transport_key)
    return build


def first_name(w: World) -> str:
    return sorted(w.sealed_shapes)[0]


def with_value(value: float):
    def change(w, delta):
        name = first_name(w)
        bad = delta[name].copy()
        bad.flat[0] = value
        return {**delta, name: bad}
    return change


def scaled(factor: float):
    return lambda w, delta: {k: (v * factor).astype(np.float32) for k, v in delta.items()}


def retyped(dtype):
    return lambda w, delta: {k: v.astype(dtype) for k, v in delta.items()}


def reshaped(w, delta):
    name = first_name(w)
    return {**delta, name: delta[name].reshape(-1)[:-1].copy()}


def transposed(w, delta):
    name = next(k for k in sorted(delta) if delta[k].ndim == 2 and delta[k].shape[0] !=
                delta[k].shape[1])
    return {**delta, name: np.ascontiguousarray(delta[name].T)}


def extra_tensor(w, delta):
    return {**delta, "extra.weight": np.zeros(3, np.float32)}


def missing_tensor(w, delta):
    return {k: v for k, v in delta.items() if k != first_name(w)}


# -- SecAgg+ messages (M in round-2)


def advert(mutate=None, *, round_id: str = SECURE, signer: str = "M"):
    """M's advertisement, fresh keys each time; signed by ``signer`` for ``round_id``."""
    def build(w: World) -> bytes:
        device = secagg.SecAggDevice(round_id, w.id("M"), w.clients[signer].identity,
                                     secagg.TaskParams.from_json(w.tasks["M"].secagg))
        obj = device.advertise()
        return J(obj if mutate is None else mutate(obj))
    return build


def resigned_advert(**keys: bytes):
    """M's advertisement with ``keys`` (c_pk / e_pk) replaced, validly signed by M."""
    def build(w: World) -> bytes:
        obj = {k: base64.b64decode(v) for k, v in json.loads(advert()(w)).items()}
        obj.update(keys)
        obj["sig"] = w.clients["M"].identity.sign(secagg.advert_message(
            SECURE, w.id("M"), obj["c_pk"], obj["e_pk"], obj["b_commit"]))
        return J({k: b64(v) for k, v in obj.items()})
    return build


# X25519 public keys of small order: every shared secret with them is all-zero (or fixed).
LOW_ORDER = {"zero": bytes(32), "one": (1).to_bytes(32, "little")}


def shares(mutate=None):
    """M's shares: one well-formed ciphertext per neighbour, then ``mutate``."""
    def build(w: World) -> bytes:
        obj = {"shares": {v: b64(os.urandom(120)) for v in w.neighbours}}
        return J(obj if mutate is None else mutate(w, obj))
    return build


def masked(tensors=None, meta=None, *, frame: bytes | None = None):
    """M's masked input: one uint32 'masked' of the round's length, then changes."""
    def build(w: World) -> bytes:
        if frame is not None:
            return frame
        values = {"masked": np.zeros(w.length, np.uint32)}
        values = values if tensors is None else tensors(w)
        info = {"round_id": SECURE} if meta is None else meta
        return encode_tensors(values, info)
    return build


def reveal(mutate=None):
    """M's unmask answer: a b share (32 bytes) of each neighbour, all survivors."""
    def build(w: World) -> bytes:
        obj = {"b": {v: b64(os.urandom(secagg.SHARE_BYTES)) for v in w.neighbours}, "c": {}}
        return J(obj if mutate is None else mutate(w, obj))
    return build


def bad_frame_header(header: bytes) -> bytes:
    return b"PRT1" + struct.pack("<I", len(header)) + header


# -- bundles for the publish endpoint


def zip_of(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def bundle_members(w: World) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(w.v1_zip)) as zf:
        return {n: zf.read(n) for n in zf.namelist()}


def bundle_plus(name: str):
    return lambda w: zip_of({**bundle_members(w), name: b"unlisted"})


def bundle_nul_name(w: World) -> bytes:
    """A member named "items.json<NUL>../x" (zipfile cannot write a NUL: patched in)."""
    data = zip_of({**bundle_members(w), "items.jsonZ../x": b"{}"})
    assert data.count(b"items.jsonZ../x") == 2  # local header and central directory
    return data.replace(b"items.jsonZ../x", b"items.json\0../x")


def bundle_tampered(w: World) -> bytes:
    members = bundle_members(w)
    members["model.tflite"] = members["model.tflite"] + b"x"
    return zip_of(members)


def bundle_old_version(w: World) -> bytes:
    """A valid bundle of version 1 with other bytes than the published one: the same
    version while version 1 is the newest, an older one once version 2 is out."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    out = w.root / f"old-{time.monotonic_ns()}"
    resign_bundle(w.bundle_dir, out, Ed25519PrivateKey.generate(), model_version=1,
                  provenance={"note": "a replay of version 1"})
    return zip_bundle(out)


def zip_bomb(w: World) -> bytes:
    return zip_of({**bundle_members(w), "model.tflite": bytes(MAX_BUNDLE + 1)})


METRIC_BODIES = [  # (id, body): each refused as bad_metrics
    ("upper-case-name", J({"metrics": {"HR@10": 0.1}})),
    ("name-starts-with-at", J({"metrics": {"@10": 0.1}})),
    ("name-with-space", J({"metrics": {"hr 10": 0.1}})),
    ("name-too-long", J({"metrics": {"h" * 65: 0.1}})),
    ("one-bad-name-of-two", J({"metrics": {"hr@10": 0.1, "bad/name": 0.2}})),
    ("name-traversal", J({"metrics": {"../../etc/passwd": 0.1}})),
    ("nan", b'{"metrics": {"hr@10": NaN}}'),
    ("infinity", b'{"metrics": {"hr@10": Infinity}}'),
    ("minus-infinity", b'{"metrics": {"hr@10": -Infinity}}'),
    ("overflows-a-float", b'{"metrics": {"hr@10": 1' + b"0" * 400 + b"}}"),
    ("value-string", J({"metrics": {"hr@10": "0.1"}})),
    ("value-bool", J({"metrics": {"hr@10": True}})),
    ("value-null", J({"metrics": {"hr@10": None}})),
    ("too-many", J({"metrics": {f"m{i}": 0.5 for i in range(33)}})),
    ("empty", J({"metrics": {}})),
    ("metrics-list", J({"metrics": [0.1]})),
    ("missing-metrics", J({})),
    ("source-upper-case", J({"metrics": {"hr@10": 0.1}, "source": "Offline"})),
    ("source-starts-with-digit", J({"metrics": {"hr@10": 0.1}, "source": "1st"})),
    ("source-too-long", J({"metrics": {"hr@10": 0.1}, "source": "s" * 33})),
    ("source-number", J({"metrics": {"hr@10": 0.1}, "source": 7})),
    ("source-traversal", J({"metrics": {"hr@10": 0.1}, "source": "../x"})),
    ("unknown-key", J({"metrics": {"hr@10": 0.1}, "extra": 1})),
]

ROUND_CONFIGS = [  # (id, config, status, code) while no round is active
    ("unknown-key", {"typo_key": 1}, 400, "bad_round_config"),
    ("target-zero", {"target_clients": 0}, 400, "bad_round_config"),
    ("target-string", {"target_clients": "3"}, 400, "bad_round_config"),
    ("target-float", {"target_clients": 3.0}, 400, "bad_round_config"),
    ("target-bool", {"target_clients": True}, 400, "bad_round_config"),
    ("target-beyond-int32", {"target_clients": 2**31}, 400, "bad_round_config"),
    ("target-huge", {"target_clients": 10**30}, 400, "bad_round_config"),
    ("min-above-target", {"target_clients": 2, "min_clients": 3}, 400, "bad_round_config"),
    ("deadline-negative", {"deadline_s": -1}, 400, "bad_round_config"),
    ("deadline-huge", {"deadline_s": 1e300}, 400, "bad_round_config"),
    ("stage-timeout-huge", {"secagg_stage_timeout_s": 1e300}, 400, "bad_round_config"),
    ("poll-huge", {"secagg_poll_s": 1e300}, 400, "bad_round_config"),
    ("clip-zero", {"clip_norm": 0}, 400, "bad_round_config"),
    ("delta-one", {"delta": 1.0}, 400, "bad_round_config"),
    ("population-huge", {"population": 10**30}, 400, "bad_round_config"),
    ("model-version-huge", {"model_version": 10**30}, 400, "bad_round_config"),
    ("model-version-string", {"model_version": "1"}, 400, "bad_round_config"),
    ("strategy-unknown", {"strategy": "fedsgd"}, 400, "bad_round_config"),
    ("scheme-unknown", {"upload_scheme": "plaintext"}, 400, "bad_round_config"),
    ("dp-mode-unknown", {"dp_mode": "local"}, 400, "bad_round_config"),
    ("trainable-traversal", {"trainable": ["../../keys/signing.key"]}, 400,
     "bad_round_config"),
    ("trainable-unknown", {"trainable": ["no.such.weight"]}, 400, "bad_round_config"),
    ("trainable-empty", {"trainable": []}, 400, "bad_round_config"),
    ("trainable-string", {"trainable": "out.weight"}, 400, "bad_round_config"),
    ("secagg-two-clients", {"target_clients": 2, "min_clients": 2}, 400, "bad_round_config"),
    ("secagg-threshold-alone", {"secagg_threshold": 3}, 400, "bad_round_config"),
    ("distributed-without-noise", {"dp_mode": "distributed"}, 400, "bad_round_config"),
    ("model-version-unknown", {"model_version": 99}, 409, "no_model"),
    ("budget-without-noise", {"epsilon_budget": 1.0}, 409, "privacy_required"),
]
NAN_CONFIGS = [  # JSON's non-standard constants, which Python's parser accepts
    ("clip-nan", b'{"clip_norm": NaN}'),
    ("deadline-infinity", b'{"deadline_s": Infinity}'),
    ("delta-nan", b'{"delta": NaN}'),
    ("noise-nan", b'{"noise_multiplier": NaN}'),
    ("learning-rate-infinity", b'{"learning_rate": Infinity}'),
    ("unused-momentum-nan", b'{"strategy": "fedavg", "momentum": NaN}'),
    ("unused-beta1-nan", b'{"strategy": "fedavgm", "beta1": NaN}'),
    ("tau-nan", b'{"strategy": "fedadam", "tau": NaN}'),
    ("beta2-nan", b'{"strategy": "fedadam", "beta2": NaN}'),
]


def build_rows() -> list[Case]:
    rows: list[Case] = []
    add = rows.extend
    M, OUT, S, H0 = Signed("M"), Signed("O"), Signed("S"), Signed("H0")
    update, poll = f"/v1/rounds/{SEALED}/update", f"/v1/rounds/{SECURE}/secagg"
    adv, shr, msk, unm = (f"{poll}/{s}" for s in ("advertise", "shares", "masked", "unmask"))

    # -- anywhere: routing, methods, public endpoints -----------------------------------------
    p = "sealed"
    add([
        Case("route/unknown", p, "GET", "/v1/nothing-here", 404, "not_found"),
        Case("route/double-slash", p, "GET", "/v1//admin/models", 404, "not_found", ADMIN_OK),
        Case("route/trailing-slash", p, "GET", "/v1/admin/models/", 404, "not_found",
             ADMIN_OK),
        Case("route/traversal-to-keys", p, "GET", "/v1/../keys/signing.key", 404, "not_found"),
        Case("route/encoded-traversal", p, "GET", "/v1/%2e%2e/%2e%2e/etc/passwd", 404,
             "not_found"),
        Case("route/static-traversal", p, "GET", "/static/..%2f..%2fkeys%2fsigning.key", 404,
             "not_found"),
        Case("server-keys/post", p, "POST", "/v1/server-keys", 405, "method_not_allowed"),
        Case("server-keys/delete", p, "DELETE", "/v1/server-keys", 405, "method_not_allowed"),
        Case("devices/get", p, "GET", "/v1/devices", 405, "method_not_allowed"),
        Case("checkin/put", p, "PUT", "/v1/rounds/checkin", 405, "method_not_allowed"),
        Case("current/post", p, "POST", "/v1/models/current", 405, "method_not_allowed"),
        Case("healthz/post", p, "POST", "/healthz", 405, "method_not_allowed"),
        Case("metrics/post", p, "POST", "/metrics", 405, "method_not_allowed"),
        Case("openapi/put", p, "PUT", "/v1/openapi.json", 405, "method_not_allowed"),
        Case("dashboard/post", p, "POST", "/dashboard", 405, "method_not_allowed", ADMIN_OK),
        Case("admin-rounds/delete", p, "DELETE", "/v1/admin/rounds", 405,
             "method_not_allowed", ADMIN_OK),
    ])

    # -- registration (R, never registered, signs with its own key) ---------------------------
    R = Signed("R")

    def reg(extra=None, key: str = "R"):
        def build(w: World) -> bytes:
            obj = {"public_key": b64(w.clients[key].identity.public_key_raw),
                   "enrollment_token": None}
            return J(obj if extra is None else extra(obj))
        return build

    add(json_rows("register", p, "/v1/devices", R))
    add([
        Case("register/missing-public-key", p, "POST", "/v1/devices", 400, "bad_request", R,
             reg(lambda o: {"enrollment_token": None})),
        Case("register/public-key-number", p, "POST", "/v1/devices", 400, "bad_request", R,
             reg(lambda o: {**o, "public_key": 12345})),
        Case("register/public-key-null", p, "POST", "/v1/devices", 400, "bad_request", R,
             reg(lambda o: {**o, "public_key": None})),
        Case("register/public-key-not-base64", p, "POST", "/v1/devices", 400, "bad_request",
             R, reg(lambda o: {**o, "public_key": "%%%"})),
        Case("register/public-key-31-bytes", p, "POST", "/v1/devices", 400, "bad_request", R,
             reg(lambda o: {**o, "public_key": b64(bytes(31))})),
        Case("register/public-key-of-another-device", p, "POST", "/v1/devices", 401,
             "bad_signature", R, reg(key="O")),
        Case("register/sig-unsigned", p, "POST", "/v1/devices", 401, "bad_signature",
             Signed("R", "unsigned"), reg()),
        Case("register/sig-stale", p, "POST", "/v1/devices", 401, "stale_request",
             Signed("R", "stale"), reg()),
        Case("register/sig-other-body", p, "POST", "/v1/devices", 401, "bad_signature",
             Signed("R", "other_body"), reg()),
        Case("register/sig-other-path", p, "POST", "/v1/devices", 401, "bad_signature",
             Signed("R", "other_path"), reg()),
        Case("register/sig-other-key", p, "POST", "/v1/devices", 401, "bad_signature",
             Signed("R", "other_key"), reg()),
        # Replayed: OUT's (idempotent, already registered) registration sent a second time.
        Case("register/sig-replay", p, "POST", "/v1/devices", 401, "replayed_request",
             Signed("O", "replay"), reg(key="O")),
    ])

    # -- signature headers themselves (one endpoint: every signed view shares the check) ------
    add([Case(f"signature/{how}", p, "GET", "/v1/models/current", 401, "bad_signature",
              Signed("O", how)) for how in ("bad_nonce", "bad_timestamp", "bad_b64")])

    # -- models: current, bundle ---------------------------------------------------------------
    add(auth_rows("current", p, "GET", "/v1/models/current"))
    add(auth_rows("bundle", p, "GET", "/v1/models/1/bundle"))
    add(name_rows("bundle", p, "GET", "/v1/models/{}/bundle", VERSION_NAMES, OUT))
    add([Case("bundle/unknown-version", p, "GET", "/v1/models/99/bundle", 404, "no_model", OUT),
         Case("bundle/version-zero", p, "GET", "/v1/models/0/bundle", 404, "no_model", OUT)])

    # -- check-in (OUT: registered, not selected; the round's slots are full) --------------------
    add(auth_rows("checkin", p, "POST", "/v1/rounds/checkin", J({"num_examples": 1})))
    add(json_rows("checkin", p, "/v1/rounds/checkin", OUT))
    add([Case(f"checkin/{label}", p, "POST", "/v1/rounds/checkin", 400, "bad_request", OUT,
              J(body)) for label, body in [
        ("missing-num-examples", {"model_version": 1}),
        ("num-examples-string", {"model_version": 1, "num_examples": "10"}),
        ("num-examples-negative", {"model_version": 1, "num_examples": -1}),
        ("num-examples-float", {"model_version": 1, "num_examples": 1.5}),
        ("num-examples-bool", {"model_version": 1, "num_examples": True}),
        ("num-examples-null", {"model_version": 1, "num_examples": None}),
        ("model-version-string", {"model_version": "1", "num_examples": 1}),
        ("model-version-float", {"model_version": 1.0, "num_examples": 1}),
        ("model-version-list", {"model_version": [1], "num_examples": 1}),
    ]])

    # -- sealed updates: round-1 collecting, M selected ---------------------------------------
    add(auth_rows("update", p, "POST", update, sealed(device="O"), who="O"))
    add(name_rows("update", p, "POST", "/v1/rounds/{}/update", ROUND_NAMES, M, sealed()))
    add([
        Case("update/huge", p, "POST", update, 413, "body_too_large", M, HUGE),
        Case("update/content-type-json", p, "POST", update, 415, "unsupported_media_type", M,
             sealed(), "application/json"),
        Case("update/content-type-missing", p, "POST", update, 415, "unsupported_media_type",
             M, sealed(), None),
        Case("update/not-sealed", p, "POST", update, 400, "bad_update", M, b"not sealed"),
        Case("update/empty", p, "POST", update, 400, "bad_update", M, b""),
        Case("update/truncated", p, "POST", update, 400, "bad_update", M,
             lambda w: sealed()(w)[:60]),
        Case("update/flipped-byte", p, "POST", update, 400, "bad_update", M,
             lambda w: (lambda d: d[:-1] + bytes([d[-1] ^ 1]))(sealed()(w))),
        Case("update/ephemeral-key-low-order", p, "POST", update, 400, "bad_update", M,
             lambda w: SEALED_MAGIC + bytes(32) + sealed()(w)[36:]),
        Case("update/sealed-for-another-round", p, "POST", update, 400, "bad_update", M,
             sealed(round_id="round-99")),
        Case("update/sealed-for-another-device", p, "POST", update, 400, "bad_update", M,
             sealed(aad_device="H0")),
        Case("update/frame-not-prt1", p, "POST", update, 400, "bad_update", M,
             sealed(frame=b"PRT0" + bytes(8))),
        Case("update/frame-trailing-bytes", p, "POST", update, 400, "bad_update", M,
             lambda w: seal_frame(encode_tensors(
                 random_update(w.sealed_shapes, np.random.default_rng(1), 1.0, 1).delta,
                 {"round_id": SEALED, "base_version": 1, "num_examples": 1, "clip_norm": 1.0,
                  "norm": 0.9}) + b"\0", SEALED, w.id("M"), w.transport_key)),
        Case("update/frame-header-nan", p, "POST", update, 400, "bad_update", M,
             sealed(frame=bad_frame_header(b'{"tensors": [], "meta": {"norm": NaN}}'))),
        Case("update/frame-header-extra-key", p, "POST", update, 400, "bad_update", M,
             sealed(frame=bad_frame_header(b'{"tensors": [], "meta": {}, "x": 1}'))),
        Case("update/frame-tensor-name-traversal", p, "POST", update, 400, "bad_update", M,
             sealed(frame=bad_frame_header(json.dumps({"tensors": [
                 {"name": "../../x", "dtype": "float32", "shape": [0]}], "meta": {}}).encode()))),
        Case("update/meta-names-another-round", p, "POST", update, 400, "bad_update", M,
             sealed(meta={"round_id": "round-99"})),
        Case("update/meta-missing-num-examples", p, "POST", update, 400, "bad_update", M,
             sealed(meta={"num_examples": ...})),
        Case("update/meta-num-examples-string", p, "POST", update, 400, "bad_update", M,
             sealed(meta={"num_examples": "10"})),
        Case("update/meta-base-version-float", p, "POST", update, 400, "bad_update", M,
             sealed(meta={"base_version": 1.0})),
        Case("update/dtype-float64", p, "POST", update, 400, "bad_update", M,
             sealed(retyped(np.float64))),
        Case("update/dtype-int32", p, "POST", update, 400, "bad_update", M,
             sealed(retyped(np.int32))),
        Case("update/meta-num-examples-negative", p, "POST", update, 422, "update_rejected",
             M, sealed(meta={"num_examples": -5})),
        Case("update/meta-num-examples-beyond-int64", p, "POST", update, 422,
             "update_rejected", M, sealed(meta={"num_examples": 2**70})),
        Case("update/meta-num-examples-above-max-examples", p, "POST", update, 422,
             "update_rejected", M, sealed(meta={"num_examples": 1001})),
        Case("update/meta-num-examples-beyond-int32", p, "POST", update, 422,
             "update_rejected", M, sealed(meta={"num_examples": 2**40})),
        Case("update/base-version-old", p, "POST", update, 422, "update_rejected", M,
             sealed(meta={"base_version": 0})),
        Case("update/wrong-shape", p, "POST", update, 422, "update_rejected", M,
             sealed(reshaped)),
        Case("update/transposed", p, "POST", update, 422, "update_rejected", M,
             sealed(transposed)),
        Case("update/extra-tensor", p, "POST", update, 422, "update_rejected", M,
             sealed(extra_tensor)),
        Case("update/missing-tensor", p, "POST", update, 422, "update_rejected", M,
             sealed(missing_tensor)),
        Case("update/nan", p, "POST", update, 422, "update_rejected", M,
             sealed(with_value(float("nan")))),
        Case("update/inf", p, "POST", update, 422, "update_rejected", M,
             sealed(with_value(float("inf")))),
        Case("update/norm-above-clip", p, "POST", update, 422, "update_rejected", M,
             sealed(scaled(1.2))),
        Case("update/norm-far-above-clip-meta-lies", p, "POST", update, 422,
             "update_rejected", M, sealed(scaled(1e6), meta={"norm": 0.5})),
        Case("update/not-selected", p, "POST", update, 403, "not_selected", OUT,
             sealed(device="O")),
        Case("update/unknown-round", p, "POST", "/v1/rounds/round-99/update", 409,
             "round_closed", M, sealed(round_id="round-99")),
    ])
    # SecAgg+ endpoints of a sealed round (and of rounds that do not exist yet)
    add([
        Case("poll/sealed-round", p, "GET", f"/v1/rounds/{SEALED}/secagg", 409,
             "wrong_scheme", M),
        Case("advertise/sealed-round", p, "POST", f"/v1/rounds/{SEALED}/secagg/advertise",
             409, "wrong_scheme", M, J({})),
        Case("poll/unknown-round", p, "GET", poll, 404, "not_found", M),
        Case("masked/unknown-round", p, "POST", msk, 404, "not_found", M,
             lambda w: encode_tensors({"masked": np.zeros(3, np.uint32)},
                                      {"round_id": SECURE})),
    ])

    # -- admin: every endpoint's auth, then its bodies --------------------------------------------
    rollout_1, metrics_1 = "/v1/admin/models/1/rollout", "/v1/admin/models/1/metrics"
    for method, path, body, basic in [
        ("GET", "/v1/admin/server-keys", b"", False),
        ("GET", "/v1/admin/models", b"", False),
        ("POST", "/v1/admin/models", lambda w: w.v1_zip, False),
        ("POST", rollout_1, J({"percent": 0}), False),
        ("POST", "/v1/admin/models/1/pause", b"", False),
        ("POST", "/v1/admin/models/1/resume", b"", False),
        ("POST", "/v1/admin/models/1/rollback", b"", False),
        ("POST", metrics_1, J({"metrics": {"hr@10": 0.5}}), False),
        ("GET", "/v1/admin/rounds", b"", False),
        ("POST", "/v1/admin/rounds", J({"target_clients": 1}), False),
        ("GET", f"/v1/admin/rounds/{SEALED}", b"", False),
        ("POST", f"/v1/admin/rounds/{SEALED}/close-stage", b"", False),
        ("GET", "/v1/admin/dashboard", b"", True),
        ("GET", "/dashboard", b"", True),
    ]:
        add(admin_auth_rows(p, method, path, body, basic))

    add([
        Case("publish/not-a-zip", p, "POST", "/v1/admin/models", 400, "bad_bundle", ADMIN_OK,
             b"not a zip"),
        Case("publish/empty", p, "POST", "/v1/admin/models", 400, "bad_bundle", ADMIN_OK,
             b""),
        Case("publish/member-traversal", p, "POST", "/v1/admin/models", 400, "bad_bundle",
             ADMIN_OK, bundle_plus("../evil.txt")),
        Case("publish/member-absolute", p, "POST", "/v1/admin/models", 400, "bad_bundle",
             ADMIN_OK, bundle_plus("/tmp/evil.txt")),
        Case("publish/member-subdirectory", p, "POST", "/v1/admin/models", 400, "bad_bundle",
             ADMIN_OK, bundle_plus("sub/evil.txt")),
        Case("publish/member-backslash", p, "POST", "/v1/admin/models", 400, "bad_bundle",
             ADMIN_OK, bundle_plus("..\\evil.txt")),
        Case("publish/member-nul", p, "POST", "/v1/admin/models", 400, "bad_bundle",
             ADMIN_OK, bundle_nul_name),
        Case("publish/member-unlisted", p, "POST", "/v1/admin/models", 400, "bad_bundle",
             ADMIN_OK, bundle_plus("notes.txt")),
        Case("publish/member-tampered", p, "POST", "/v1/admin/models", 400, "bad_bundle",
             ADMIN_OK, bundle_tampered),
        Case("publish/unpacks-beyond-limit", p, "POST", "/v1/admin/models", 400,
             "bad_bundle", ADMIN_OK, zip_bomb),
        Case("publish/version-not-newer", p, "POST", "/v1/admin/models", 409,
             "version_not_newer", ADMIN_OK, bundle_old_version),
        Case("publish/huge", p, "POST", "/v1/admin/models", 413, "body_too_large", ADMIN_OK,
             b"x" * (MAX_BUNDLE + 1)),
        Case("publish/content-type-json", p, "POST", "/v1/admin/models", 415,
             "unsupported_media_type", ADMIN_OK, lambda w: w.v1_zip, "application/json"),
        Case("publish/content-type-missing", p, "POST", "/v1/admin/models", 415,
             "unsupported_media_type", ADMIN_OK, lambda w: w.v1_zip, None),
    ])
    for label, query in [("word", "abc"), ("above-100", "101"), ("negative", "-1"),
                         ("huge", "9" * 30), ("float", "50.5"), ("empty", "")]:
        add([Case(f"publish/rollout-{label}", p, "POST",
                  f"/v1/admin/models?rollout_percent={query}", 400, "bad_rollout", ADMIN_OK,
                  lambda w: w.v1_zip)])

    add(json_rows("rollout", p, rollout_1, ADMIN_OK))
    add([Case(f"rollout/{label}", p, "POST", rollout_1, 400, "bad_rollout", ADMIN_OK, J(body))
         for label, body in [("missing-percent", {}), ("percent-above-100", {"percent": 101}),
                             ("percent-negative", {"percent": -1}),
                             ("percent-float", {"percent": 50.5}),
                             ("percent-bool", {"percent": True}),
                             ("percent-word", {"percent": "half"}),
                             ("percent-list", {"percent": [50]}),
                             ("percent-huge", {"percent": 10**30})]])
    add([Case("rollout/unknown-version", p, "POST", "/v1/admin/models/99/rollout", 404,
              "not_found", ADMIN_OK, J({"percent": 50}))])
    for action in ("rollout", "pause", "resume", "rollback", "metrics"):
        body = J({"percent": 50}) if action == "rollout" else J(
            {"metrics": {"hr@10": 0.5}}) if action == "metrics" else b""
        add(name_rows(f"{action}-version", p, "POST", "/v1/admin/models/{}/" + action,
                      VERSION_NAMES, ADMIN_OK, body))
    add([
        Case("pause/unknown-version", p, "POST", "/v1/admin/models/99/pause", 404,
             "not_found", ADMIN_OK),
        Case("resume/unknown-version", p, "POST", "/v1/admin/models/99/resume", 404,
             "not_found", ADMIN_OK),
        Case("rollback/unknown-version", p, "POST", "/v1/admin/models/99/rollback", 404,
             "not_found", ADMIN_OK),
        Case("rollback/no-parent", p, "POST", "/v1/admin/models/1/rollback", 409,
             "no_parent", ADMIN_OK),
    ])

    add(json_rows("metrics", p, metrics_1, ADMIN_OK))
    add([Case(f"metrics/{label}", p, "POST", metrics_1, 400, "bad_metrics", ADMIN_OK, body)
         for label, body in METRIC_BODIES])
    add([Case("metrics/unknown-version", p, "POST", "/v1/admin/models/99/metrics", 404,
              "not_found", ADMIN_OK, J({"metrics": {"hr@10": 0.1}}))])

    add(json_rows("open-round", p, "/v1/admin/rounds", ADMIN_OK))
    add([Case("open-round/round-in-progress", p, "POST", "/v1/admin/rounds", 409,
              "round_in_progress", ADMIN_OK,
              J({"upload_scheme": SEALED_SCHEME, "target_clients": 1}))])
    add(name_rows("round", p, "GET", "/v1/admin/rounds/{}", ROUND_NAMES, ADMIN_OK))
    add(name_rows("close-stage", p, "POST", "/v1/admin/rounds/{}/close-stage", ROUND_NAMES,
                  ADMIN_OK))
    add([
        Case("round/unknown", p, "GET", "/v1/admin/rounds/round-99", 404, "not_found",
             ADMIN_OK),
        Case("close-stage/unknown", p, "POST", "/v1/admin/rounds/round-99/close-stage", 404,
             "not_found", ADMIN_OK),
    ])

    # -- after H0's upload: its second one -----------------------------------------------------
    add([Case("update/duplicate", "sealed_dup", "POST", update, 409, "duplicate_update", H0,
              sealed(device="H0"))])

    # -- idle: no round active; round-1 published ------------------------------------------------
    p = "idle"
    add([Case(f"open-round/{label}", p, "POST", "/v1/admin/rounds", status, code, ADMIN_OK,
              J(config)) for label, config, status, code in ROUND_CONFIGS])
    add([Case(f"open-round/{label}", p, "POST", "/v1/admin/rounds", 400, "bad_round_config",
              ADMIN_OK, body) for label, body in NAN_CONFIGS])
    add([
        Case("update/round-published", p, "POST", update, 409, "round_closed", H0,
             sealed(device="H0")),
        Case("publish/version-older", p, "POST", "/v1/admin/models", 409,
             "version_not_newer", ADMIN_OK, bundle_old_version),
        Case("close-stage/round-published", p, "POST",
             f"/v1/admin/rounds/{SEALED}/close-stage", 409, "round_closed", ADMIN_OK),
        Case("poll/round-published-sealed", p, "GET", f"/v1/rounds/{SEALED}/secagg", 409,
             "wrong_scheme", H0),
    ])

    # -- SecAgg+ collecting: nobody advertised yet ----------------------------------------------
    p = "collecting"
    add(auth_rows("poll", p, "GET", poll))
    add(auth_rows("advertise", p, "POST", adv, advert()))
    add(name_rows("poll", p, "GET", "/v1/rounds/{}/secagg", ROUND_NAMES, M))
    add(name_rows("advertise", p, "POST", "/v1/rounds/{}/secagg/advertise", ROUND_NAMES, M,
                  advert()))
    add(json_rows("advertise", p, adv, M))
    add([
        Case("advertise/empty-object", p, "POST", adv, 400, "secagg_bad_message", M, J({})),
        Case("advertise/missing-sig", p, "POST", adv, 400, "secagg_bad_message", M,
             advert(lambda o: {k: v for k, v in o.items() if k != "sig"})),
        Case("advertise/extra-field", p, "POST", adv, 400, "secagg_bad_message", M,
             advert(lambda o: {**o, "note": "hi"})),
        Case("advertise/key-number", p, "POST", adv, 400, "secagg_bad_message", M,
             advert(lambda o: {**o, "c_pk": 1})),
        Case("advertise/key-31-bytes", p, "POST", adv, 400, "secagg_bad_message", M,
             advert(lambda o: {**o, "e_pk": b64(bytes(31))})),
        Case("advertise/key-not-base64", p, "POST", adv, 400, "secagg_bad_message", M,
             advert(lambda o: {**o, "b_commit": "%%%"})),
        *[Case(f"advertise/{key.replace('_', '-')}-low-order-{label}", p, "POST", adv, 400,
               "secagg_bad_message", M, resigned_advert(**{key: point}))
          for key in ("c_pk", "e_pk") for label, point in LOW_ORDER.items()],
        Case("advertise/zero-signature", p, "POST", adv, 401, "secagg_bad_signature", M,
             advert(lambda o: {**o, "sig": b64(bytes(64))})),
        Case("advertise/signed-for-another-round", p, "POST", adv, 401,
             "secagg_bad_signature", M, advert(round_id="round-99")),
        Case("advertise/signed-by-another-key", p, "POST", adv, 401, "secagg_bad_signature",
             M, advert(signer="O")),
        Case("advertise/not-selected", p, "POST", adv, 403, "not_selected", OUT, advert()),
        Case("advertise/unknown-round", p, "POST", "/v1/rounds/round-99/secagg/advertise",
             404, "not_found", M, advert(round_id="round-99")),
        Case("poll/not-selected", p, "GET", poll, 403, "not_selected", OUT),
        Case("shares/while-collecting", p, "POST", shr, 409, "stage_closed", M,
             J({"shares": {}})),
        Case("masked/while-collecting", p, "POST", msk, 409, "stage_closed", M, masked()),
        Case("unmask/while-collecting", p, "POST", unm, 409, "stage_closed", M,
             J({"b": {}, "c": {}})),
        Case("update/secagg-round", p, "POST", f"/v1/rounds/{SECURE}/update", 409,
             "wrong_scheme", M, sealed(round_id=SECURE)),
        Case("open-round/round-in-progress-secagg", p, "POST", "/v1/admin/rounds", 409,
             "round_in_progress", ADMIN_OK, J({"target_clients": 3})),
    ])
    add([Case("advertise/duplicate", "advertised", "POST", adv, 409, "duplicate_answer", M,
              advert())])

    # -- share_keys: U1 = {H0, H1, H2, M}; S never advertised ------------------------------------
    p = "share_keys"
    add(auth_rows("shares", p, "POST", shr, shares()))
    add(name_rows("shares", p, "POST", "/v1/rounds/{}/secagg/shares", ROUND_NAMES, M,
                  shares()))
    add(json_rows("shares", p, shr, M))
    add([
        Case("shares/list", p, "POST", shr, 400, "secagg_bad_message", M, J({"shares": []})),
        Case("shares/missing-key", p, "POST", shr, 400, "secagg_bad_message", M, J({})),
        Case("shares/none", p, "POST", shr, 400, "secagg_bad_message", M, J({"shares": {}})),
        Case("shares/missing-a-neighbour", p, "POST", shr, 400, "secagg_bad_message", M,
             shares(lambda w, o: {"shares": dict(list(o["shares"].items())[1:])})),
        Case("shares/unknown-recipient", p, "POST", shr, 400, "secagg_bad_message", M,
             shares(lambda w, o: {"shares": {**o["shares"], "f" * 32: "AAAA"}})),
        Case("shares/to-itself", p, "POST", shr, 400, "secagg_bad_message", M,
             shares(lambda w, o: {"shares": {**o["shares"], w.id("M"): "AAAA"}})),
        Case("shares/to-a-non-participant", p, "POST", shr, 400, "secagg_bad_message", M,
             shares(lambda w, o: {"shares": {**o["shares"], w.id("S"): "AAAA"}})),
        Case("shares/ciphertext-number", p, "POST", shr, 400, "secagg_bad_message", M,
             shares(lambda w, o: {"shares": {**o["shares"], w.neighbours[0]: 7}})),
        Case("shares/ciphertext-empty", p, "POST", shr, 400, "secagg_bad_message", M,
             shares(lambda w, o: {"shares": {**o["shares"], w.neighbours[0]: ""}})),
        Case("shares/ciphertext-not-base64", p, "POST", shr, 400, "secagg_bad_message", M,
             shares(lambda w, o: {"shares": {**o["shares"], w.neighbours[0]: "%%%%"}})),
        Case("shares/ciphertext-nul", p, "POST", shr, 400, "secagg_bad_message", M,
             shares(lambda w, o: {"shares": {**o["shares"], w.neighbours[0]: "AAAA\0"}})),
        Case("shares/ciphertext-lone-surrogate", p, "POST", shr, 400, "secagg_bad_message", M,
             shares(lambda w, o: {"shares": {**o["shares"], w.neighbours[0]: "AA\ud800"}})),
        Case("shares/ciphertext-too-long", p, "POST", shr, 400, "secagg_bad_message", M,
             shares(lambda w, o: {"shares": {**o["shares"], w.neighbours[0]: "A" * 1028}})),
        Case("shares/not-a-participant", p, "POST", shr, 403, "not_a_participant", S,
             shares()),
        Case("shares/not-selected", p, "POST", shr, 403, "not_selected", OUT, shares()),
        Case("advertise/while-sharing", p, "POST", adv, 409, "stage_closed", M, advert()),
        Case("advertise/late-by-silent-device", p, "POST", adv, 409, "stage_closed", S,
             J({})),
        Case("masked/while-sharing", p, "POST", msk, 409, "stage_closed", M, masked()),
        Case("unmask/while-sharing", p, "POST", unm, 409, "stage_closed", M, reveal()),
    ])
    add([Case("shares/duplicate", "shares_sent", "POST", shr, 409, "duplicate_answer", M,
              shares())])

    # -- masked_input: U2 = {H0, H1, H2, M} ---------------------------------------------------
    p = "masked_input"
    add(auth_rows("masked", p, "POST", msk, masked()))
    add(name_rows("masked", p, "POST", "/v1/rounds/{}/secagg/masked", ROUND_NAMES, M,
                  masked()))
    add([
        Case("masked/huge", p, "POST", msk, 413, "body_too_large", M, HUGE),
        Case("masked/content-type-json", p, "POST", msk, 415, "unsupported_media_type", M,
             masked(), "application/json"),
        Case("masked/content-type-missing", p, "POST", msk, 415, "unsupported_media_type", M,
             masked(), None),
        Case("masked/not-prt1", p, "POST", msk, 400, "bad_frame", M, b"not a frame"),
        Case("masked/empty", p, "POST", msk, 400, "bad_frame", M, b""),
        Case("masked/truncated", p, "POST", msk, 400, "bad_frame", M,
             lambda w: masked()(w)[:-1]),
        Case("masked/trailing-bytes", p, "POST", msk, 400, "bad_frame", M,
             lambda w: masked()(w) + b"\0"),
        Case("masked/header-nan", p, "POST", msk, 400, "bad_frame", M,
             masked(frame=bad_frame_header(b'{"tensors": [], "meta": {"x": NaN}}'))),
        Case("masked/header-not-json", p, "POST", msk, 400, "bad_frame", M,
             masked(frame=bad_frame_header(b"{tensors"))),
        Case("masked/header-length-lies", p, "POST", msk, 400, "bad_frame", M,
             masked(frame=b"PRT1\xff\xff\xff\x7f{}")),
        Case("masked/dtype-float32", p, "POST", msk, 400, "secagg_bad_message", M,
             masked(lambda w: {"masked": np.zeros(w.length, np.float32)})),
        Case("masked/dtype-float32-nan", p, "POST", msk, 400, "secagg_bad_message", M,
             masked(lambda w: {"masked": np.full(w.length, np.nan, np.float32)})),
        Case("masked/dtype-float64-inf", p, "POST", msk, 400, "secagg_bad_message", M,
             masked(lambda w: {"masked": np.full(w.length, np.inf)})),
        Case("masked/dtype-uint64", p, "POST", msk, 400, "secagg_bad_message", M,
             masked(lambda w: {"masked": np.zeros(w.length, np.uint64)})),
        Case("masked/too-short", p, "POST", msk, 400, "secagg_bad_message", M,
             masked(lambda w: {"masked": np.zeros(w.length - 1, np.uint32)})),
        Case("masked/too-long", p, "POST", msk, 400, "secagg_bad_message", M,
             masked(lambda w: {"masked": np.zeros(w.length + 1, np.uint32)})),
        Case("masked/two-dimensional", p, "POST", msk, 400, "secagg_bad_message", M,
             masked(lambda w: {"masked": np.zeros((w.length, 1), np.uint32)})),
        Case("masked/wrong-name", p, "POST", msk, 400, "secagg_bad_message", M,
             masked(lambda w: {"update": np.zeros(w.length, np.uint32)})),
        Case("masked/extra-tensor", p, "POST", msk, 400, "secagg_bad_message", M,
             masked(lambda w: {"masked": np.zeros(w.length, np.uint32),
                               "x": np.zeros(1, np.uint32)})),
        Case("masked/meta-empty", p, "POST", msk, 400, "secagg_bad_message", M,
             masked(meta={})),
        Case("masked/meta-another-round", p, "POST", msk, 400, "secagg_bad_message", M,
             masked(meta={"round_id": SEALED})),
        Case("masked/meta-extra-key", p, "POST", msk, 400, "secagg_bad_message", M,
             masked(meta={"round_id": SECURE, "norm": 0.5})),
        Case("masked/not-a-participant", p, "POST", msk, 403, "not_a_participant", S,
             masked()),
        Case("masked/not-selected", p, "POST", msk, 403, "not_selected", OUT, masked()),
        Case("shares/while-masking", p, "POST", shr, 409, "stage_closed", M, shares()),
        Case("unmask/while-masking", p, "POST", unm, 409, "stage_closed", M, reveal()),
    ])
    add([Case("masked/duplicate", "masked_sent", "POST", msk, 409, "duplicate_answer", M,
              masked())])

    # -- unmasking: U3 = {H0, H1, H2, M}: M reveals b shares of its three neighbours -------------
    p = "unmasking"
    add(auth_rows("unmask", p, "POST", unm, reveal()))
    add(name_rows("unmask", p, "POST", "/v1/rounds/{}/secagg/unmask", ROUND_NAMES, M,
                  reveal()))
    add(json_rows("unmask", p, unm, M))
    add([
        Case("unmask/empty-object", p, "POST", unm, 400, "secagg_bad_message", M, J({})),
        Case("unmask/missing-c", p, "POST", unm, 400, "secagg_bad_message", M,
             reveal(lambda w, o: {"b": o["b"]})),
        Case("unmask/extra-field", p, "POST", unm, 400, "secagg_bad_message", M,
             reveal(lambda w, o: {**o, "d": {}})),
        Case("unmask/b-list", p, "POST", unm, 400, "secagg_bad_message", M,
             reveal(lambda w, o: {**o, "b": list(o["b"].values())})),
        Case("unmask/share-of-unknown-device", p, "POST", unm, 400, "secagg_bad_message", M,
             reveal(lambda w, o: {**o, "b": {**o["b"], "f" * 32: b64(bytes(32))}})),
        Case("unmask/own-share", p, "POST", unm, 400, "secagg_bad_message", M,
             reveal(lambda w, o: {**o, "b": {**o["b"], w.id("M"): b64(bytes(32))}})),
        Case("unmask/c-share-of-a-survivor", p, "POST", unm, 400, "secagg_bad_message", M,
             reveal(lambda w, o: {**o, "c": {w.neighbours[0]: b64(bytes(32))}})),
        Case("unmask/share-31-bytes", p, "POST", unm, 400, "secagg_bad_message", M,
             reveal(lambda w, o: {**o, "b": {**o["b"], w.neighbours[0]: b64(bytes(31))}})),
        Case("unmask/share-not-base64", p, "POST", unm, 400, "secagg_bad_message", M,
             reveal(lambda w, o: {**o, "b": {**o["b"], w.neighbours[0]: "%%%"}})),
        Case("unmask/share-number", p, "POST", unm, 400, "secagg_bad_message", M,
             reveal(lambda w, o: {**o, "b": {**o["b"], w.neighbours[0]: 5}})),
        Case("unmask/not-a-participant", p, "POST", unm, 403, "not_a_participant", S,
             reveal()),
        Case("unmask/not-selected", p, "POST", unm, 403, "not_selected", OUT, reveal()),
        Case("masked/while-unmasking", p, "POST", msk, 409, "stage_closed", M, masked()),
        Case("shares/while-unmasking", p, "POST", shr, 409, "stage_closed", M, shares()),
        Case("advertise/while-unmasking", p, "POST", adv, 409, "stage_closed", M, advert()),
    ])
    add([Case("unmask/duplicate", "unmask_sent", "POST", unm, 409, "duplicate_answer", M,
              reveal())])
    return rows


ROWS = build_rows()
assert len({r.id for r in ROWS}) == len(ROWS), "row ids must be unique"
assert [PHASES.index(r.phase) for r in ROWS] == sorted(PHASES.index(r.phase) for r in ROWS)
SEALED_ROWS = [r for r in ROWS if PHASES.index(r.phase) < PHASES.index("idle")]
LATER_ROWS = [r for r in ROWS if PHASES.index(r.phase) >= PHASES.index("idle")]


# --- the tests, in phase order -----------------------------------------------------------------


@pytest.mark.parametrize("case", SEALED_ROWS, ids=[r.id for r in SEALED_ROWS])
def test_bad_input_while_a_sealed_round_collects(world, case):
    check(world, case)


def test_the_sealed_round_continues_for_honest_devices(world):
    world.at("idle")
    view = world.sealed_view
    assert (view["state"], view["selected"], view["received"], view["published_version"]) == (
        "published", 3, 2, 2), view
    with zipfile.ZipFile(io.BytesIO(world.clients["H2"].download_bundle(2))) as zf, \
            np.load(io.BytesIO(zf.read("weights.npz"))) as npz:
        new = {k: npz[k] for k in npz.files}
    for name in world.sealed_shapes:  # FedAvg, server_lr 1: base + the honest devices' mean
        mean = (world.updates["H0"].delta[name].astype(np.float64)
                + world.updates["H1"].delta[name]) / 2
        np.testing.assert_allclose(new[name], world.base1[name] + mean, atol=1e-6)


@pytest.mark.parametrize("case", LATER_ROWS, ids=[r.id for r in LATER_ROWS])
def test_bad_input_while_idle_and_through_every_secagg_stage(world, case):
    check(world, case)


def test_the_secagg_round_continues_for_honest_devices(world):
    world.at("done")
    view = world.secure_view
    assert (view["state"], view["published_version"]) == ("published", 3), view
    assert {k: view["secagg"][k] for k in ("advertised", "shared", "masked", "unmasked")} == {
        "advertised": 4, "shared": 4, "masked": 4, "unmasked": 4}
    assert view["selected"] == 5  # S was selected, never advertised and was left behind
    with zipfile.ZipFile(io.BytesIO(world.clients["H0"].download_bundle(3))) as zf, \
            np.load(io.BytesIO(zf.read("weights.npz"))) as npz:
        new = {k: npz[k] for k in npz.files}
    bound = view["measurements"]["quantization_error_bound"] / 4
    for name in world.secure_shapes:
        mean = sum(world.updates[n].delta[name].astype(np.float64)
                   for n in ("H0", "H1", "H2", "M")) / 4
        error = np.abs(new[name].astype(np.float64) - world.base2[name] - mean)
        assert error.max() <= bound + 1e-6 * (1 + np.abs(world.base2[name]).max())


# --- the same answer many times at once ------------------------------------------------------


def started_server(root: Path, db: dict[str, str], tiny_export, names: list[str]):
    """A server with version 1 published and registered clients ``names``."""
    server = ServerProcess(root / "server", **SETTINGS, **db)
    response = server.admin("POST", "/v1/admin/models", body=zip_bundle(
        tiny_export.bundle_dir), headers={"Content-Type": "application/zip"})
    assert response.status == 201
    keys = json.loads(server.request("GET", "/v1/server-keys").data)
    clients = {}
    for name in names:
        clients[name] = SyncClient(server.url, DeviceIdentity.load_or_create(root / name),
                                   server_signing_key=base64.b64decode(keys["signing_key"]),
                                   outbox_dir=root / f"{name}.outbox", retries=0, timeout=60.0)
        clients[name].register()
    return server, clients, base64.b64decode(keys["transport_key"])


def all_at_once(send, bodies: list[bytes]) -> list[int]:
    """``send(body)`` for every body from its own thread, released together; the statuses."""
    start, statuses = threading.Barrier(len(bodies)), []

    def one(body: bytes) -> None:
        start.wait()
        statuses.append(send(body).status)

    threads = [threading.Thread(target=one, args=(b,)) for b in bodies]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return sorted(statuses)


def frames_in(server: ServerProcess) -> list[Path]:
    return [p for p in (server.data_dir / "blobs").rglob("*")
            if p.is_file() and p.read_bytes()[:4] == b"PRT1"]


def test_simultaneous_updates_from_one_device_store_exactly_one(tmp_path, db_settings,
                                                                 tiny_export):
    """A device sending eight different valid updates at the same instant: one is accepted,
    the others are refused as duplicates, and only the accepted one is left in the blob
    store (a refused update's plaintext frame must not outlive the request)."""
    server, clients, transport_key = started_server(tmp_path, db_settings, tiny_export, ["d"])
    with server:
        client = clients["d"]
        opened = server.admin("POST", "/v1/admin/rounds", json={
            "upload_scheme": SEALED_SCHEME, "target_clients": 2, "min_clients": 1})
        assert opened.status == 201
        task = client.checkin(1, 10)
        weights = load_bundle(tiny_export.bundle_dir).weights()
        shapes = {k: weights[k].shape for k in (task.trainable or weights)}
        rng = np.random.default_rng(5)
        bodies = [seal_update(random_update(shapes, rng, task.clip_norm, 1),
                              round_id=task.round_id, device_id=client.identity.device_id,
                              transport_public_key=transport_key) for _ in range(8)]
        statuses = all_at_once(lambda body: client.request(
            "POST", f"/v1/rounds/{task.round_id}/update", body=body), bodies)
        assert statuses == [202] + [409] * 7
        assert len(frames_in(server)) == 1
        assert server.round(task.round_id, settled=False)["received"] == 1


def test_simultaneous_masked_inputs_from_one_device_store_exactly_one(tmp_path, db_settings,
                                                                      tiny_export):
    """The same for SecAgg+ masked inputs: three devices reach masked_input, then one sends
    eight different well-formed masked inputs at once: one counts, one blob is stored."""
    server, clients, _ = started_server(tmp_path, db_settings, tiny_export, ["a", "b", "c"])
    with server:
        opened = server.admin("POST", "/v1/admin/rounds", json={
            "target_clients": 3, "min_clients": 3, "secagg_poll_s": 0.05,
            "secagg_stage_timeout_s": 3600.0})
        assert opened.status == 201
        weights = load_bundle(tiny_export.bundle_dir).weights()
        sessions = {}
        for name, client in clients.items():
            task = client.checkin(1, 10)
            shapes = {k: weights[k].shape for k in (task.trainable or weights)}
            sessions[name] = SecAggUpload().begin(client, task, random_update(
                shapes, np.random.default_rng(6), task.clip_norm, 1))
        for session in sessions.values():  # collecting closed when all three advertised
            session.step()
            assert session.answered == "share_keys"
        assert server.round(task.round_id, settled=False)["state"] == "masked_input"
        rng = np.random.default_rng(7)
        bodies = [encode_tensors({"masked": rng.integers(0, 2**32, task.secagg[
            "vector_length"], dtype=np.uint32)}, {"round_id": task.round_id})
            for _ in range(8)]
        statuses = all_at_once(lambda body: clients["a"].request(
            "POST", f"/v1/rounds/{task.round_id}/secagg/masked", body=body), bodies)
        assert statuses == [202] + [409] * 7
        assert len(frames_in(server)) == 1
        assert server.round(task.round_id, settled=False)["secagg"]["masked"] == 1


def test_simultaneous_publishes_of_one_version_store_exactly_one(tmp_path, db_settings,
                                                                 tiny_export):
    """Four different bundles, all version 2, published at once: one is published, three are
    refused (version_not_newer), and the blob store gains exactly the published zip. The
    same for rollbacks racing for the next version number."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    server, _, _ = started_server(tmp_path, db_settings, tiny_export, [])
    with server:
        before = {p.name for p in (server.data_dir / "blobs").rglob("*") if p.is_file()}
        bodies = [zip_bundle(resign_bundle(tiny_export.bundle_dir, tmp_path / f"v2-{n}",
                                           Ed25519PrivateKey.generate(), model_version=2,
                                           parent_version=1, provenance={"n": n}))
                  for n in range(4)]
        statuses = all_at_once(lambda body: server.admin(
            "POST", "/v1/admin/models", body=body,
            headers={"Content-Type": "application/zip"}), bodies)
        assert statuses == [201, 409, 409, 409]
        after = {p.name for p in (server.data_dir / "blobs").rglob("*") if p.is_file()}
        models = json.loads(server.admin("GET", "/v1/admin/models").data)["models"]
        assert after - before == {m["blob_sha256"] for m in models if m["model_version"] == 2}
        # Rollbacks of version 2 at once: whichever win, every zip left is a version's.
        statuses = all_at_once(lambda body: server.admin(
            "POST", "/v1/admin/models/2/rollback"), [b""] * 4)
        assert statuses[0] == 201 and set(statuses) <= {201, 409}
        models = json.loads(server.admin("GET", "/v1/admin/models").data)["models"]
        assert {p.name for p in (server.data_dir / "blobs").rglob("*") if p.is_file()} == {
            m["blob_sha256"] for m in models}
