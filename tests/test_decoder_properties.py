"""Hypothesis properties for every decoder of bytes or JSON that comes from the network or
from disk. Pure random input and mutations of VALID encodings (bit flips, truncations,
insertions, deletions; JSON values replaced by other types, keys dropped or added) either
decode — and round-trippable formats re-encode to the same value — or raise the decoder's
documented error. Any other exception escaping is a bug.

| decoder                                              | documented error              |
|------------------------------------------------------|-------------------------------|
| protocol.decode_tensors (PRT1)                       | ProtocolError bad_frame       |
| protocol.open_update (PRS1, sealed-x25519-v1)        | ProtocolError bad_update      |
| protocol.RoundTask.from_json                         | ProtocolError bad_task        |
| protocol.verify_request (signature headers)          | ProtocolError (401 codes)     |
| SyncClient: server-keys, manifest, check-in answers;  | SyncError                     |
|   SecAggSession (task parameters, every poll answer) |                               |
| secagg.TaskParams.from_json, verify_advert,          | SecAggError                   |
|   parse_reveal (server), SecAggDevice.share_keys /   |                               |
|   masked_input / unmask (device)                     |                               |
| a share ciphertext (SecAggDevice._open_share)        | None: the share is dropped    |
| bundle: manifest (load_bundle), zip                  | BundleError                   |
|   (extract_bundle_zip), weights.npz (load_weights,   |                               |
|   never unpickles), golden record (run_golden_check) |                               |
| ItemVocab.from_json (items.json)                     | ValueError                    |
| device files: models/state.json, sync.json, outbox   | BundleError / {} / None       |

Examples are bounded (``max_examples``) so the file runs in well under a minute."""

from __future__ import annotations

import base64
import io
import json
import os
import pickle
import shutil
import struct
import tempfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from device_sdk import protocol, secagg
from device_sdk.bundle import (
    ITEMS,
    MANIFEST,
    SIGNATURE,
    WEIGHTS,
    Bundle,
    BundleError,
    GoldenCheckError,
    encode_manifest,
    extract_bundle_zip,
    file_entry,
    load_bundle,
    load_weights,
    run_golden_check,
    save_weights,
)
from device_sdk.device_client import DeviceClient
from device_sdk.device_identity import DeviceIdentity
from device_sdk.item_vocab import ItemVocab
from device_sdk.model_store import ModelStore
from device_sdk.model_update import ModelUpdate
from device_sdk.protocol import (
    ProtocolError,
    RoundTask,
    decode_tensors,
    device_id_for,
    encode_tensors,
    open_update,
    seal_update,
    sign_headers,
    verify_request,
)
from device_sdk.secagg import SecAggDevice, SecAggError, TaskParams
from device_sdk.sync_client import ServerKeys, SyncClient, SyncError
from device_sdk.uploads import SecAggSession
from tests.support.bundles import copy_bundle, public_raw, zip_bundle

FAST = settings(max_examples=80, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SLOW = settings(max_examples=40, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# -- strategies: random JSON, mutated JSON, mutated bytes -----------------------------------

LEAVES = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**64), 2**64), st.sampled_from([10**400, -10**400]),
    st.floats(), st.text(max_size=12),
)
JSON = st.recursive(
    LEAVES,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12,
)


def _mutate(draw: Any, value: Any) -> Any:
    """One structural mutation somewhere inside ``value`` (a new value; no sharing writes)."""
    if isinstance(value, dict) and value:
        op = draw(st.sampled_from(["child"] * 4 + ["delete", "add", "swap"]))
        key = draw(st.sampled_from(sorted(value)))
        if op == "child":
            return {**value, key: _mutate(draw, value[key])}
        if op == "delete":
            return {k: v for k, v in value.items() if k != key}
        if op == "add":
            return {**value, draw(st.text(max_size=8)): draw(JSON)}
    elif isinstance(value, list) and value:
        op = draw(st.sampled_from(["child"] * 4 + ["delete", "append", "duplicate", "swap"]))
        i = draw(st.integers(0, len(value) - 1))
        if op == "child":
            return [*value[:i], _mutate(draw, value[i]), *value[i + 1:]]
        if op == "delete":
            return value[:i] + value[i + 1:]
        if op == "append":
            return [*value, draw(JSON)]
        if op == "duplicate":
            return [*value, value[i]]
    elif isinstance(value, str) and value:
        op = draw(st.sampled_from(["truncate", "char", "swap"]))
        i = draw(st.integers(0, len(value) - 1))
        if op == "truncate":
            return value[:i]
        if op == "char":
            return value[:i] + draw(st.characters()) + value[i + 1:]
    elif isinstance(value, int | float) and not isinstance(value, bool):
        op = draw(st.sampled_from(["near", "swap"]))
        if op == "near":
            return draw(st.sampled_from([value + 1, value - 1, -value, 0, 2**31, 2**63,
                                         10**400, 0.5, -1e-300, float("nan"),
                                         float("inf")]))
    return draw(JSON)  # a type swap


@st.composite
def mutated_json(draw: Any, valid: Any, max_ops: int = 3) -> Any:
    value = valid
    for _ in range(draw(st.integers(1, max_ops))):
        value = _mutate(draw, value)
    return value


@st.composite
def mutated_bytes(draw: Any, valid: bytes, max_ops: int = 3) -> bytes:
    data = bytearray(valid)
    for _ in range(draw(st.integers(1, max_ops))):
        op = draw(st.sampled_from(["flip", "flip", "truncate", "insert", "delete", "overwrite"]))
        i = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del data[i:]
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[i:i + draw(st.integers(1, 16))]
        else:
            chunk = draw(st.binary(min_size=1, max_size=16))
            data[i:i + len(chunk)] = chunk
    return bytes(data)


def json_bytes(value: Any) -> bytes:
    return json.dumps(value).encode("utf-8")  # NaN / Infinity tokens included, as on a wire


def json_inputs(valid: Any, *, random_bytes: bool = True) -> st.SearchStrategy[bytes]:
    """Bytes of: the mutated value, byte-mutated valid JSON, random JSON, random bytes."""
    options = [mutated_json(valid).map(json_bytes), mutated_bytes(json_bytes(valid)),
               JSON.map(json_bytes)]
    if random_bytes:
        options.append(st.binary(max_size=200))
    return st.one_of(*options)


DEEP = b"[" * 3000 + b"]" * 3000  # nesting deeper than the JSON parser's recursion limit


# -- PRT1 tensor framing ---------------------------------------------------------------------

VALID_FRAME = encode_tensors({"w": np.ones(2, np.float32), "ids": np.arange(3, dtype=np.int64)},
                             {"round_id": "r1", "k": [1, 2.5, None]})
_HEADER_LEN = struct.unpack("<I", VALID_FRAME[4:8])[0]
VALID_HEADER = json.loads(VALID_FRAME[8:8 + _HEADER_LEN])
VALID_PAYLOAD = VALID_FRAME[8 + _HEADER_LEN:]


def frame(header: Any, payload: bytes) -> bytes:
    raw = json_bytes(header)
    return b"PRT1" + struct.pack("<I", len(raw)) + raw + payload


FRAMES = st.one_of(
    st.binary(max_size=200),
    st.binary(max_size=200).map(lambda d: b"PRT1" + d),
    mutated_bytes(VALID_FRAME),
    st.tuples(mutated_json(VALID_HEADER),
              st.one_of(st.just(VALID_PAYLOAD), mutated_bytes(VALID_PAYLOAD))).map(
        lambda hp: frame(*hp)),
)


@FAST
@given(FRAMES)
def test_frames_decode_or_raise_bad_frame_and_re_encode_equal(data):
    try:
        tensors, meta = decode_tensors(data)
    except ProtocolError as exc:
        assert exc.code == "bad_frame" and exc.status == 400
        return
    again, again_meta = decode_tensors(encode_tensors(tensors, meta))
    assert again_meta == meta and list(again) == list(tensors)
    for name, value in tensors.items():
        assert again[name].dtype == value.dtype
        np.testing.assert_array_equal(again[name], value)


ARRAYS = hnp.arrays(dtype=st.sampled_from(["<f4", ">f8", "<i4", ">i8", "<u4", "<u8"]),
                    shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4))


@FAST
@given(st.dictionaries(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,8}", fullmatch=True),
                       ARRAYS, max_size=4))
def test_frames_round_trip(tensors):
    decoded, _ = decode_tensors(encode_tensors(tensors, {}))
    assert list(decoded) == list(tensors)
    for name, value in tensors.items():
        np.testing.assert_array_equal(decoded[name], value)


# -- sealed updates --------------------------------------------------------------------------

TRANSPORT = X25519PrivateKey.generate()
TRANSPORT_PUB = TRANSPORT.public_key().public_bytes_raw()
ROUND, DEVICE = "round-7", "d" * 32
UPDATE = ModelUpdate(base_version=3, delta={"out.bias": np.full(4, 0.1, np.float32)},
                     num_examples=5, clip_norm=1.0, norm=0.2, norm_before_clip=0.2)
VALID_SEALED = seal_update(UPDATE, round_id=ROUND, device_id=DEVICE,
                           transport_public_key=TRANSPORT_PUB)
VALID_UPDATE_FRAME = protocol.update_frame(UPDATE, ROUND)
_UH = struct.unpack("<I", VALID_UPDATE_FRAME[4:8])[0]


def seal_plaintext(plaintext: bytes) -> bytes:
    """Seal arbitrary plaintext exactly as the spec says: the opener then parses it."""
    ephemeral = X25519PrivateKey.generate()
    ephemeral_pub = ephemeral.public_key().public_bytes_raw()
    key = protocol._sealed_key(ephemeral.exchange(TRANSPORT.public_key()), ephemeral_pub,
                               TRANSPORT_PUB)
    nonce = os.urandom(12)
    return (protocol.SEALED_MAGIC + ephemeral_pub + nonce + ChaCha20Poly1305(key).encrypt(
        nonce, plaintext, protocol._sealed_aad(ROUND, DEVICE)))


SEALED = st.one_of(
    st.binary(max_size=120),
    mutated_bytes(VALID_SEALED),
    mutated_bytes(VALID_UPDATE_FRAME).map(seal_plaintext),
    mutated_json(json.loads(VALID_UPDATE_FRAME[8:8 + _UH])).map(
        lambda h: seal_plaintext(frame(h, VALID_UPDATE_FRAME[8 + _UH:]))),
)


@FAST
@given(SEALED)
def test_sealed_updates_open_or_raise_bad_update(sealed):
    try:
        tensors, meta = open_update(sealed, round_id=ROUND, device_id=DEVICE,
                                    transport_private_key=TRANSPORT)
    except ProtocolError as exc:
        assert exc.code == "bad_update"
        return
    assert meta["round_id"] == ROUND
    assert type(meta["base_version"]) is int and type(meta["num_examples"]) is int
    assert all(t.dtype == np.float32 for t in tensors.values())


def test_the_valid_sealed_update_opens_to_what_was_sealed():
    tensors, meta = open_update(VALID_SEALED, round_id=ROUND, device_id=DEVICE,
                                transport_private_key=TRANSPORT)
    np.testing.assert_array_equal(tensors["out.bias"], UPDATE.delta["out.bias"])
    assert (meta["base_version"], meta["num_examples"]) == (3, 5)


# -- round tasks and SecAgg+ task parameters --------------------------------------------------

SECAGG_PARAMS = {"scale": 1024.0, "vector_length": 8, "min_clients": 3, "noise_std": 0.0,
                 "clip_bit": True, "stage_timeout_s": 30.0, "poll_s": 0.1}
VALID_TASK = {"round_id": "r1", "model_version": 1, "clip_norm": 0.5, "local_epochs": 1,
              "learning_rate": 0.1, "batch_size": 8, "proximal_mu": 0.0, "max_examples": 100,
              "trainable": ["out.bias"], "deadline": 2e9, "upload_scheme": secagg.SCHEME,
              "secagg": SECAGG_PARAMS}


def canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


@FAST
@given(st.one_of(mutated_json(VALID_TASK), JSON))
def test_round_tasks_parse_or_raise_bad_task_and_round_trip(obj):
    try:
        task = RoundTask.from_json(obj)
    except ProtocolError as exc:
        assert exc.code == "bad_task"
        return
    assert canonical(RoundTask.from_json(task.to_json()).to_json()) == canonical(task.to_json())


@FAST
@given(st.one_of(mutated_json(SECAGG_PARAMS), JSON))
def test_secagg_task_parameters_parse_or_raise_secagg_error(obj):
    try:
        params = TaskParams.from_json(obj)
    except SecAggError as exc:
        assert exc.code in ("secagg_bad_message", "secagg_unsafe")
        return
    assert TaskParams.from_json(params.to_json()) == params


# -- request signature headers ---------------------------------------------------------------

SIGNER = Ed25519PrivateKey.generate()
SIGNER_PUB = public_raw(SIGNER)
SIGNER_ID = device_id_for(SIGNER_PUB)
NOW = 1_750_000_000
VALID_HEADERS = sign_headers(SIGNER, SIGNER_ID, "POST", "/v1/rounds/checkin", b"{}", now=NOW)


@FAST
@given(st.one_of(mutated_json(VALID_HEADERS), JSON).filter(lambda v: isinstance(v, dict)))
def test_signature_headers_verify_or_raise_a_401_code(headers):
    """(Any mapping: a server hands over its request's headers, never another type.)"""
    seen: set[tuple[str, str]] = set()

    def seen_nonce(device_id: str, nonce: str) -> bool:
        known = (device_id, nonce) in seen
        seen.add((device_id, nonce))
        return known

    try:
        device_id = verify_request(headers, "POST", "/v1/rounds/checkin", b"{}", SIGNER_PUB,
                                   now=NOW, seen_nonce=seen_nonce)
    except ProtocolError as exc:
        assert exc.code in ("bad_signature", "stale_request", "replayed_request",
                            "unknown_device") and exc.status == 401
        return
    assert device_id == SIGNER_ID  # only the genuine signature gets through


# -- the SDK's parsing of server answers (over real HTTP from a canned-answer server) --------


class CannedServer:
    """A stdlib HTTP server on loopback answering every GET and the check-in POST with the
    answer set last, and every other POST with 202 {} (recording the body): test
    infrastructure for feeding the SDK arbitrary server answers over real HTTP."""

    def __init__(self) -> None:
        self.answer: tuple[int, dict[str, str], bytes] = (200, {}, b"{}")
        self.posted: dict[str, bytes] = {}
        canned = self

        class Handler(BaseHTTPRequestHandler):
            def _reply(self, status: int, headers: dict[str, str], body: bytes) -> None:
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802
                self._reply(*canned.answer)

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length") or 0)
                canned.posted[self.path] = self.rfile.read(length)
                if self.path == "/v1/rounds/checkin":
                    self._reply(*canned.answer)
                else:
                    self._reply(202, {"Content-Type": "application/json"}, b"{}")

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


PINNED = Ed25519PrivateKey.generate()  # the server signing key the device pins
PINNED_PUB = public_raw(PINNED)


@pytest.fixture(scope="module")
def canned(tmp_path_factory):
    server = CannedServer()
    root = tmp_path_factory.mktemp("canned")
    client = SyncClient(server.url, DeviceIdentity.load_or_create(root / "key"),
                        server_signing_key=PINNED_PUB, outbox_dir=root / "outbox", retries=0,
                        timeout=60.0)  # a guard: the server answers at once
    yield server, client
    server.close()


SERVER_KEYS = {"signing_key": protocol.b64(PINNED_PUB),
               "transport_key": protocol.b64(TRANSPORT_PUB),
               "transport_key_sig": protocol.b64(PINNED.sign(
                   protocol.transport_key_message(TRANSPORT_PUB)))}


@FAST
@given(json_inputs(SERVER_KEYS))
def test_server_keys_answers_parse_or_raise_sync_error(canned, body):
    server, client = canned
    server.answer = (200, {"Content-Type": "application/json"}, body)
    try:
        keys = client.server_keys()
    except SyncError:
        return
    assert keys == ServerKeys(PINNED_PUB, TRANSPORT_PUB)  # only the genuine keys are taken


MANIFEST_OBJ = {"format_version": 1, "model_version": 4, "architecture": {"name": "x",
                "config": {}}, "items_digest": "0" * 64, "files": {}, "golden": {},
                "privacy": {}, "provenance": {}, "created": "2026-01-01"}


@st.composite
def manifest_answers(draw: Any) -> tuple[bytes, dict[str, str]]:
    body = draw(st.one_of(json_inputs(MANIFEST_OBJ), st.just(DEEP)))
    # Signed by the pinned key more often than not, so parsing AFTER the signature check runs.
    signature = PINNED.sign(body) if draw(st.integers(0, 3)) else draw(st.binary(max_size=64))
    headers = {protocol.HEADER_MANIFEST_SIGNATURE: protocol.b64(signature),
               protocol.HEADER_MODEL_VERSION: draw(st.sampled_from(["4", "x", "", "1e3"])),
               "ETag": '"e"'}
    return body, headers


@FAST
@given(manifest_answers())
def test_manifest_answers_parse_or_raise_sync_error(canned, answer):
    server, client = canned
    body, headers = answer
    server.answer = (200, {"Content-Type": "application/json", **headers}, body)
    try:
        manifest = client.fetch_manifest()
    except SyncError:
        return
    assert manifest.version == json.loads(manifest.manifest_bytes)["model_version"] == 4


@FAST
@given(st.one_of(json_inputs({"task": VALID_TASK}), json_inputs({"task": None,
                                                                 "retry_after": 5}),
                 json_inputs({"error": {"code": "x", "message": "y"}}), st.just(DEEP)),
       st.sampled_from([200, 200, 200, 400, 409]))
def test_checkin_and_error_answers_parse_or_raise_sync_error(canned, body, status):
    server, client = canned
    server.answer = (status, {"Content-Type": "application/json"}, body)
    try:
        task = client.checkin(1, 10)
    except SyncError as exc:
        assert isinstance(exc.code, str) and (exc.status in (None, status))
        return
    assert status == 200 and (task is None or isinstance(task, RoundTask))


def _task_with(secagg_params: Any) -> RoundTask:
    return RoundTask.from_json({**VALID_TASK, "secagg": secagg_params})


@FAST
@given(mutated_json(SECAGG_PARAMS).filter(lambda v: isinstance(v, dict)))
def test_secagg_sessions_accept_task_parameters_or_raise_sync_error(canned, params):
    _, client = canned
    try:
        session = SecAggSession(client, _task_with(params), np.zeros(8))
    except SyncError as exc:
        assert exc.code == "bad_task"
        return
    assert session.stage_timeout > 0 and np.isfinite(session.stage_timeout)


# -- SecAgg+ messages --------------------------------------------------------------------------

PARAMS = TaskParams(scale=1024.0, vector_length=8, min_clients=3)
RID = "r1"


class Peer:
    def __init__(self) -> None:
        self.key = Ed25519PrivateKey.generate()
        self.id = device_id_for(public_raw(self.key))
        self.device = SecAggDevice(RID, self.id, self.key, PARAMS)
        self.advert = self.device.advertise()


def roster_for(me: str, peers: list[tuple[str, bytes, dict]]) -> dict[str, Any]:
    """A valid complete-graph roster: peers = [(device_id, identity_pub, advert)]."""
    return {"participants": [p[0] for p in peers], "degree": len(peers) - 1,
            "threshold": (len(peers) - 1) // 2 + 1, "graph_seed": protocol.b64(bytes(32)),
            "adverts": {p[0]: {"identity": protocol.b64(p[1]), "advert": p[2]} for p in peers}}


def fresh_round(n: int = 4) -> list[Peer]:
    return [Peer() for _ in range(n)]


def _entries(peers: list[Peer]) -> list[tuple[str, bytes, dict]]:
    return [(p.id, public_raw(p.key), p.advert) for p in peers]


@SLOW
@given(st.data())
def test_rosters_are_taken_or_refused_with_secagg_error(data):
    peers = fresh_round()
    roster = roster_for(peers[0].id, _entries(peers))
    candidate = data.draw(st.one_of(mutated_json(roster), JSON))
    try:
        out = peers[0].device.share_keys(candidate)
    except SecAggError:
        return
    assert set(out["shares"]) <= {p.id for p in peers[1:]}


def _to_masked_input(peers: list[Peer]) -> dict[str, Any]:
    """Every peer shares keys; returns the first peer's valid inbox."""
    entries = _entries(peers)
    shares = {p.id: p.device.share_keys(roster_for(p.id, entries))["shares"] for p in peers}
    target = peers[0].id
    return {"u2": [p.id for p in peers],
            "shares": {sender: out[target] for sender, out in shares.items() if target in out}}


@SLOW
@given(st.data())
def test_masked_input_inboxes_are_taken_or_refused_with_secagg_error(data):
    peers = fresh_round()
    inbox = _to_masked_input(peers)
    candidate = data.draw(st.one_of(mutated_json(inbox), JSON))
    try:
        masked = peers[0].device.masked_input(candidate, np.zeros(8))
    except SecAggError:
        return
    assert masked.dtype == np.uint32 and masked.shape == (8,)


@SLOW
@given(st.data())
def test_unmask_requests_are_answered_or_refused_with_secagg_error(data):
    peers = fresh_round()
    peers[0].device.masked_input(_to_masked_input(peers), np.zeros(8))
    request = {"u3": [p.id for p in peers]}
    candidate = data.draw(st.one_of(mutated_json(request), JSON))
    try:
        out = peers[0].device.unmask(candidate)
    except SecAggError:
        return
    assert set(out) == {"b", "c"}


SHARE_PEERS = fresh_round()
SHARE_INBOX = _to_masked_input(SHARE_PEERS)
SHARE_SENDER = SHARE_PEERS[1].id
VALID_SHARE = SHARE_INBOX["shares"][SHARE_SENDER]


@FAST
@given(st.one_of(mutated_json(VALID_SHARE), JSON,
                 mutated_bytes(base64.b64decode(VALID_SHARE)).map(protocol.b64)))
def test_share_ciphertexts_open_or_are_dropped(ciphertext):
    opened = SHARE_PEERS[0].device._open_share(SHARE_SENDER, ciphertext)
    assert opened is None or (len(opened[0]) == len(opened[1]) == secagg.SHARE_BYTES)


ADVERT_PEER = Peer()


@FAST
@given(st.one_of(mutated_json(ADVERT_PEER.advert), JSON))
def test_adverts_verify_or_raise_secagg_error(advert):
    try:
        fields = secagg.verify_advert(advert, RID, ADVERT_PEER.id, public_raw(ADVERT_PEER.key))
    except SecAggError as exc:
        assert exc.code in ("secagg_bad_message", "secagg_bad_signature")
        return
    assert {k: protocol.b64(v) for k, v in fields.items()} == ADVERT_PEER.advert


REVEAL = {"b": {"a" * 32: protocol.b64(bytes(33))}, "c": {"b" * 32: protocol.b64(bytes(33))}}


@FAST
@given(st.one_of(mutated_json(REVEAL), JSON))
def test_unmask_reveals_parse_or_raise_secagg_error(obj):
    try:
        out = secagg.parse_reveal(obj, {"a" * 32}, {"b" * 32})
    except SecAggError as exc:
        assert exc.code == "secagg_bad_message"
        return
    assert all(len(v) == secagg.SHARE_BYTES for kind in out.values() for v in kind.values())


@SLOW
@given(st.data())
def test_secagg_poll_answers_are_handled_or_raise_sync_error(canned, data):
    """SecAggSession.step on any poll answer: the roster it carries, and the view itself."""
    server, client = canned
    session = SecAggSession(client, _task_with(SECAGG_PARAMS), np.zeros(8))
    session.start()
    mine = json.loads(server.posted[f"/v1/rounds/{RID}/secagg/advertise"])
    others = fresh_round(3)
    roster = roster_for(client.identity.device_id, [
        (client.identity.device_id, client.identity.public_key_raw, mine), *_entries(others)])
    view = {"round_id": RID, "stage": "share_keys", "action": "share_keys", "payload": roster,
            "dropped": False, "retry_after": 0.01}
    server.answer = (200, {"Content-Type": "application/json"},
                     data.draw(st.one_of(json_inputs(view), st.just(DEEP))))
    try:
        done = session.step()
    except SyncError:
        return
    assert done is False


# -- bundles: manifest, zip, weights, golden record, items -------------------------------------


@pytest.fixture(scope="module")
def bundle_dir(tiny_export, tmp_path_factory):
    return copy_bundle(tiny_export.bundle_dir, tmp_path_factory.mktemp("prop") / "bundle")


@SLOW
@given(st.data())
def test_manifests_load_or_raise_bundle_error(bundle_dir, data):
    valid = json.loads((bundle_dir / MANIFEST).read_bytes())
    raw = data.draw(st.one_of(mutated_json(valid).map(encode_manifest),
                              mutated_bytes(encode_manifest(valid)), st.just(DEEP)))
    work = Path(tempfile.mkdtemp())
    try:
        for f in bundle_dir.iterdir():
            if f.name not in (MANIFEST, SIGNATURE):
                os.link(f, work / f.name)
        (work / MANIFEST).write_bytes(raw)
        (work / SIGNATURE).write_bytes(PINNED.sign(raw))  # validly signed: parsing runs
        try:
            bundle = load_bundle(work, public_key=PINNED_PUB)
        except BundleError:
            return
        assert isinstance(bundle, Bundle) and bundle.manifest_bytes == raw
    finally:
        shutil.rmtree(work)


@SLOW
@given(st.data())
def test_golden_records_pass_or_raise_golden_check_error(tiny_export, data):
    bundle = load_bundle(tiny_export.bundle_dir)
    model = _model(bundle)
    golden = data.draw(st.one_of(mutated_json(bundle.manifest["golden"]), JSON))
    try:
        overlap = run_golden_check(model, golden)
    except GoldenCheckError:
        return
    assert 0.0 <= overlap <= 1.0


_MODELS: dict[Path, Any] = {}


def _model(bundle: Bundle) -> Any:
    if bundle.directory not in _MODELS:
        _MODELS[bundle.directory] = bundle.model()
    return _MODELS[bundle.directory]


def _small_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(MANIFEST, b'{"a": 1}\n' * 4)
        zf.writestr(ITEMS, b'{"keys": [""], "popular": []}')
        zf.writestr(WEIGHTS, b"weights" * 20)
    return buf.getvalue()


@SLOW
@given(st.data())
def test_bundle_zips_extract_or_raise_bundle_error(tiny_export, data):
    candidate = data.draw(st.one_of(mutated_bytes(_small_zip()),
                                    mutated_bytes(zip_bundle(tiny_export.bundle_dir)),
                                    st.binary(max_size=300)))
    work = Path(tempfile.mkdtemp())
    try:
        try:
            extract_bundle_zip(candidate, work, 1 << 22)
        except BundleError:
            return
        with zipfile.ZipFile(io.BytesIO(candidate)) as zf:
            assert {p.name for p in work.iterdir()} == set(zf.namelist())
    finally:
        shutil.rmtree(work)


VALID_WEIGHTS = save_weights({"out.weight": np.ones((3, 2)), "out.bias": np.arange(3.0)})


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch /tmp/pocketrec-unpickled",))


def _object_npz() -> bytes:
    buf = io.BytesIO()
    np.savez(buf, evil=np.array([_Boom()], dtype=object))
    return buf.getvalue()


@SLOW
@given(st.one_of(mutated_bytes(VALID_WEIGHTS), st.binary(max_size=300),
                 st.just(_object_npz()), st.just(pickle.dumps({"a": 1}))))
def test_weights_load_or_raise_bundle_error_and_never_unpickle(data):
    try:
        weights = load_weights(data)
    except BundleError:
        assert not Path("/tmp/pocketrec-unpickled").exists()
        return
    assert all(isinstance(v, np.ndarray) and v.dtype != object for v in weights.values())
    assert load_weights(save_weights(weights)).keys() == weights.keys()


VALID_ITEMS = ItemVocab(["", "a", "b", "c"], popular=[2, 1]).to_json()


@FAST
@given(st.one_of(json_inputs(json.loads(VALID_ITEMS)), st.just(DEEP)))
def test_item_vocabularies_parse_or_raise_value_error_and_round_trip(raw):
    try:
        vocab = ItemVocab.from_json(raw)
    except ValueError:
        return
    assert ItemVocab.from_json(vocab.to_json()) == vocab


# -- the device's own files ---------------------------------------------------------------------


@FAST
@given(st.one_of(json_inputs({"current": 2, "previous": 1, "highest": 2}), st.just(DEEP)))
def test_model_store_state_reads_or_raises_bundle_error(raw):
    root = Path(tempfile.mkdtemp())
    try:
        store = ModelStore(root, PINNED_PUB)
        (root / "state.json").write_bytes(raw)
        try:
            current, highest = store.current_version, store.highest_version
        except BundleError:
            return
        assert current is None or type(current) is int
        assert type(highest) is int
    finally:
        shutil.rmtree(root)


@FAST
@given(st.one_of(json_inputs({"round_id": "r1", "path": "/v1/rounds/r1/update",
                              "deadline": 2e9}), st.just(DEEP)),
       st.binary(max_size=20))
def test_outbox_entries_read_or_are_dropped(raw_head, body):
    from device_sdk.sync_client import _read_outbox_entry

    with tempfile.NamedTemporaryFile(suffix=".upload") as f:
        f.write(raw_head + b"\n" + body)
        f.flush()
        parsed = _read_outbox_entry(Path(f.name))
    if parsed is not None:
        round_id, path, deadline, payload = parsed
        assert path.startswith("/v1/rounds/") and payload == body and np.isfinite(deadline)


@pytest.fixture(scope="module")
def offline_device(tmp_path_factory):
    with DeviceClient(tmp_path_factory.mktemp("dev"), server_key=PINNED_PUB) as device:
        yield device


@FAST
@given(st.one_of(json_inputs({"etag": '"e"', "registered": True, "answered": ["r1"]}),
                 st.just(DEEP)))
def test_sync_state_reads_or_starts_afresh(offline_device, raw):
    offline_device._state_path.write_bytes(raw)
    state = offline_device._read_state()
    assert isinstance(state, dict)
    # what sync() acts on has the types it expects
    assert isinstance(state.get("etag"), str | None)
    assert isinstance(state.get("registered", False), bool)
    answered = state.get("answered", [])
    assert isinstance(answered, list) and all(isinstance(r, str) for r in answered)


def test_a_listed_items_json_that_is_no_vocabulary_is_a_bundle_error(bundle_dir, tmp_path):
    """items.json matching its signed manifest entry but holding no vocabulary: a
    BundleError (the ValueError used to escape load_bundle, ModelStore.install and the
    server's publish, which answered 500)."""
    bad = copy_bundle(bundle_dir, tmp_path / "bad")
    manifest = json.loads((bad / MANIFEST).read_bytes())
    (bad / ITEMS).write_bytes(b'{"keys": ["", "a"], "popular": [7]}')
    manifest["files"][ITEMS] = file_entry((bad / ITEMS).read_bytes())
    raw = encode_manifest(manifest)
    (bad / MANIFEST).write_bytes(raw)
    (bad / SIGNATURE).write_bytes(PINNED.sign(raw))
    with pytest.raises(BundleError, match="popular ids"):
        load_bundle(bad, public_key=PINNED_PUB)
