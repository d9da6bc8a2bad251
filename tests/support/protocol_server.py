"""A minimal but real /v1 sync server for tests (stdlib ThreadingHTTPServer on loopback).

It speaks the documented protocol over real HTTP and checks requests with
``device_sdk.protocol`` (``verify_request``, ``open_update``, ``validate_update``): the same
code the Flask sync server (``sync_server``) uses. State lives in memory.

    with ProtocolServer(expected_shapes={"out.weight": (8, 4)}) as server:
        server.url                   base URL, http://127.0.0.1:<port>
        server.signing_public_key    raw Ed25519 key a device pins
        server.transport_public_key  raw X25519 key updates are sealed to
        server.signer                manifest bytes -> signature: write_bundle(signer=...)
        server.publish(bundle_dir)   zip a bundle directory, make it current; returns version
        server.set_task(task, selected=None)  RoundTask JSON dict (or None); ``selected`` =
                                     device ids allowed to upload (None: every device)
        server.close_round(round_id) later uploads for it get 409 round_closed
        server.devices               {device_id: raw public key}
        server.updates               [(device_id, round_id, tensors, meta)] accepted updates
        server.requests              [RequestRecord] every request, with the status answered
        server.fail_next(n, status=503, retry_after="0", path=None)  answer the next n
                                     requests (those whose path starts with ``path``) so;
        server.clear_faults()        drop the faults not used yet
        server.stop(); server.start()  take the listener down / bring it back, same port
        server.close()

``expected_shapes`` ({name: shape}) is what an update must contain; None accepts any names.
``signing_key`` (Ed25519 private key) replaces the generated one, so bundles signed
beforehand verify. ``enrollment_token``, when set, is required at registration
(403 ``enrollment_refused``).
Connections close after each response (HTTP/1.0), so ``stop()`` really takes it down.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import re
import threading
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from device_sdk.protocol import (
    HEADER_MANIFEST_SIGNATURE,
    HEADER_MODEL_VERSION,
    ProtocolError,
    RoundTask,
    b64,
    claimed_device_id,
    error_body,
    open_update,
    transport_key_message,
    validate_update,
    verify_request,
)

MAX_BODY = 16 * 2**20
CHECKIN_RETRY_AFTER = 60
_BUNDLE = re.compile(r"/v1/models/(\d{1,9})/bundle")
_UPDATE = re.compile(r"/v1/rounds/([^/]+)/update")

Reply = tuple[int, dict[str, str], bytes]


@dataclass
class RequestRecord:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes = b""
    status: int = 0


@dataclass
class _Published:
    manifest: bytes
    signature: bytes
    zip_bytes: bytes
    etag: str


@dataclass
class _Round:
    task: dict[str, Any]
    selected: set[str] | None
    received: set[str] = field(default_factory=set)


def _json_reply(status: int, obj: Any, headers: dict[str, str] | None = None) -> Reply:
    return status, {"Content-Type": "application/json", **(headers or {})}, json.dumps(
        obj
    ).encode("utf-8")


def _parse_json(body: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(body)
    except ValueError:
        obj = None
    if not isinstance(obj, dict):
        raise ProtocolError("bad_request", "body must be a JSON object")
    return obj


class _Handler(BaseHTTPRequestHandler):
    server: _Listener

    def do_GET(self) -> None:
        self.server.app.handle(self, "GET")

    def do_POST(self) -> None:
        self.server.app.handle(self, "POST")

    def log_message(self, *args: Any) -> None:  # keep pytest output clean
        pass


class _Listener(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, port: int, app: ProtocolServer) -> None:
        self.app = app
        super().__init__(("127.0.0.1", port), _Handler)


class ProtocolServer:
    """See the module docstring."""

    def __init__(
        self,
        *,
        expected_shapes: Mapping[str, tuple[int, ...]] | None = None,
        enrollment_token: str | None = None,
        signing_key: Ed25519PrivateKey | None = None,
    ) -> None:
        self._signing_key = signing_key or Ed25519PrivateKey.generate()
        self._transport_key = X25519PrivateKey.generate()
        self.signing_public_key = self._signing_key.public_key().public_bytes(
            Encoding.Raw, PublicFormat.Raw
        )
        self.transport_public_key = self._transport_key.public_key().public_bytes(
            Encoding.Raw, PublicFormat.Raw
        )
        self.expected_shapes = dict(expected_shapes) if expected_shapes is not None else None
        self.enrollment_token = enrollment_token
        self.devices: dict[str, bytes] = {}
        self.updates: list[tuple[str, str, dict[str, Any], dict[str, Any]]] = []
        self.requests: list[RequestRecord] = []
        self._nonces: set[tuple[str, str]] = set()
        self._bundles: dict[int, _Published] = {}
        self._current: int | None = None
        self._round: _Round | None = None
        self._closed: set[str] = set()
        self._faults: list[tuple[int, str | None, str]] = []
        self._lock = threading.Lock()
        self._listener: _Listener | None = None
        self._thread: threading.Thread | None = None
        self.port = 0
        self.start()

    # --- lifecycle -----------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Listen (again) on the same port; the first start picks a free one."""
        if self._listener is not None:
            return
        self._listener = _Listener(self.port, self)
        self.port = self._listener.server_address[1]
        # A short poll interval: shutdown() waits for the serve loop to notice it.
        self._thread = threading.Thread(target=self._listener.serve_forever, args=(0.02,),
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop listening: connections are refused until ``start()``."""
        if self._listener is None:
            return
        self._listener.shutdown()
        self._listener.server_close()
        assert self._thread is not None
        self._thread.join()
        self._listener = self._thread = None

    def close(self) -> None:
        self.stop()

    def __enter__(self) -> ProtocolServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- test controls -------------------------------------------------------------------

    def signer(self, manifest_bytes: bytes) -> bytes:
        return self._signing_key.sign(manifest_bytes)

    def publish(self, bundle_dir: str | Path) -> int:
        """Serve the bundle in ``bundle_dir`` (signed here if it has no manifest.sig) as
        the current model; returns its version."""
        bundle_dir = Path(bundle_dir)
        manifest = (bundle_dir / "manifest.json").read_bytes()
        sig_path = bundle_dir / "manifest.sig"
        signature = sig_path.read_bytes() if sig_path.exists() else self.signer(manifest)
        version = int(json.loads(manifest)["model_version"])
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
            for f in sorted(p for p in bundle_dir.iterdir() if p.is_file()):
                zf.writestr(f.name, f.read_bytes())
            if not sig_path.exists():
                zf.writestr("manifest.sig", signature)
        etag = '"' + hashlib.sha256(manifest).hexdigest()[:32] + '"'
        with self._lock:
            self._bundles[version] = _Published(manifest, signature, buf.getvalue(), etag)
            self._current = version
        return version

    def set_task(
        self, task: dict[str, Any] | None, selected: Iterable[str] | None = None
    ) -> None:
        """Offer ``task`` (validated as a RoundTask) at check-in; None offers nothing."""
        if task is not None:
            RoundTask.from_json(task)
        with self._lock:
            self._round = None if task is None else _Round(
                dict(task), None if selected is None else set(selected)
            )

    def close_round(self, round_id: str) -> None:
        with self._lock:
            self._closed.add(round_id)

    def fail_next(
        self, n: int, status: int = 503, retry_after: str | None = "0", path: str | None = None
    ) -> None:
        """Answer the next ``n`` requests (only those whose path starts with ``path``, when
        given) with ``status`` and an error body, before any other check."""
        with self._lock:
            self._faults.extend([(status, retry_after, path or "")] * n)

    def clear_faults(self) -> None:
        """Forget the faults ``fail_next`` queued and not yet used."""
        with self._lock:
            self._faults.clear()

    def _take_fault(self, path: str) -> tuple[int, str | None] | None:
        for i, (status, retry_after, prefix) in enumerate(self._faults):
            if path.startswith(prefix):
                del self._faults[i]
                return status, retry_after
        return None

    # --- request handling ----------------------------------------------------------------

    def handle(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        record = RequestRecord(method, handler.path, dict(handler.headers.items()))
        with self._lock:
            self.requests.append(record)
            fault = self._take_fault(handler.path)
        try:
            length = int(handler.headers.get("Content-Length") or 0)
            if length > MAX_BODY:
                raise ProtocolError("body_too_large", f"body exceeds {MAX_BODY}", 413)
            record.body = handler.rfile.read(length) if length > 0 else b""
            if fault is not None:
                status, retry_after = fault
                extra = {} if retry_after is None else {"Retry-After": retry_after}
                reply = _json_reply(status, error_body("unavailable", "injected fault"), extra)
            else:
                reply = self._route(method, handler.path, handler.headers, record.body)
        except ProtocolError as exc:
            reply = _json_reply(exc.status, error_body(exc.code, exc.message))
        status, headers, payload = reply
        record.status = status
        handler.send_response(status)
        for name, value in headers.items():
            handler.send_header(name, value)
        handler.send_header("Content-Length", str(len(payload)))
        handler.end_headers()
        handler.wfile.write(payload)

    def _route(self, method: str, path: str, headers: Mapping[str, str], body: bytes) -> Reply:
        route = path.split("?", 1)[0]
        if (method, route) == ("GET", "/v1/server-keys"):
            return self._server_keys()
        if (method, route) == ("POST", "/v1/devices"):
            return self._register(headers, path, body)
        bundle, update = _BUNDLE.fullmatch(route), _UPDATE.fullmatch(route)
        known = route in ("/v1/models/current", "/v1/rounds/checkin") or bundle or update
        if not known:
            raise ProtocolError("not_found", f"no endpoint {route}", 404)
        device_id = self._authenticate(headers, method, path, body)
        if (method, route) == ("GET", "/v1/models/current"):
            return self._current_model(headers)
        if method == "GET" and bundle:
            return self._bundle(int(bundle.group(1)))
        if (method, route) == ("POST", "/v1/rounds/checkin"):
            return self._checkin(device_id, body)
        if method == "POST" and update:
            return self._update(device_id, update.group(1), body)
        raise ProtocolError("method_not_allowed", f"{method} {route}", 405)

    def _seen_nonce(self, device_id: str, nonce: str) -> bool:
        # Kept forever: fine for a test server; a real one expires them after 2 * MAX_SKEW_S.
        with self._lock:
            if (device_id, nonce) in self._nonces:
                return True
            self._nonces.add((device_id, nonce))
            return False

    def _authenticate(self, headers: Mapping[str, str], method: str, path: str,
                      body: bytes) -> str:
        with self._lock:
            key = self.devices.get(claimed_device_id(headers))
        return verify_request(headers, method, path, body, key, seen_nonce=self._seen_nonce)

    def _server_keys(self) -> Reply:
        return _json_reply(200, {
            "signing_key": b64(self.signing_public_key),
            "transport_key": b64(self.transport_public_key),
            "transport_key_sig": b64(self.signer(transport_key_message(
                self.transport_public_key))),
        })

    def _register(self, headers: Mapping[str, str], path: str, body: bytes) -> Reply:
        obj = _parse_json(body)
        try:
            public_key = base64.b64decode(str(obj.get("public_key")), validate=True)
        except (binascii.Error, ValueError):
            public_key = b""
        if len(public_key) != 32:
            raise ProtocolError("bad_request", "public_key must be 32 raw bytes, base64")
        # Signed by the key being registered: proves possession of its private half.
        device_id = verify_request(headers, "POST", path, body, public_key,
                                   seen_nonce=self._seen_nonce)
        if self.enrollment_token is not None and obj.get("enrollment_token") != (
            self.enrollment_token
        ):
            raise ProtocolError("enrollment_refused", "enrollment token is not valid", 403)
        with self._lock:
            new = device_id not in self.devices
            self.devices[device_id] = public_key
        return _json_reply(201 if new else 200, {"device_id": device_id})

    def _current_model(self, headers: Mapping[str, str]) -> Reply:
        with self._lock:
            published = None if self._current is None else self._bundles[self._current]
            version = self._current
        if published is None:
            raise ProtocolError("no_model", "no model is published yet", 404)
        tags = {t.strip() for t in (headers.get("If-None-Match") or "").split(",")}
        if published.etag in tags or "*" in tags:
            return 304, {"ETag": published.etag}, b""
        return 200, {
            "Content-Type": "application/json",
            "ETag": published.etag,
            HEADER_MODEL_VERSION: str(version),
            HEADER_MANIFEST_SIGNATURE: b64(published.signature),
        }, published.manifest

    def _bundle(self, version: int) -> Reply:
        with self._lock:
            published = self._bundles.get(version)
        if published is None:
            raise ProtocolError("no_model", f"no model version {version}", 404)
        return 200, {"Content-Type": "application/zip"}, published.zip_bytes

    def _checkin(self, device_id: str, body: bytes) -> Reply:
        obj = _parse_json(body)
        model_version, num_examples = obj.get("model_version"), obj.get("num_examples")
        if not (model_version is None or type(model_version) is int) or not (
            type(num_examples) is int and num_examples >= 0
        ):
            raise ProtocolError("bad_request", "model_version int|null, num_examples int >= 0")
        with self._lock:
            current = self._round
            offered = (
                current is not None
                and current.task["round_id"] not in self._closed
                and (current.selected is None or device_id in current.selected)
                and device_id not in current.received
            )
        if not offered:
            return _json_reply(200, {"task": None, "retry_after": CHECKIN_RETRY_AFTER})
        return _json_reply(200, {"task": current.task})

    def _update(self, device_id: str, round_id: str, body: bytes) -> Reply:
        with self._lock:
            current = self._round
        if current is None or current.task["round_id"] != round_id or round_id in self._closed:
            raise ProtocolError("round_closed", f"round {round_id} is not open", 409)
        if current.selected is not None and device_id not in current.selected:
            raise ProtocolError("not_selected", "this device is not in the round", 403)
        if device_id in current.received:
            raise ProtocolError("duplicate_update", "this device already uploaded", 409)
        task = RoundTask.from_json(current.task)
        tensors, meta = open_update(body, round_id=round_id, device_id=device_id,
                                    transport_private_key=self._transport_key)
        if meta["base_version"] != task.model_version:
            raise ProtocolError("update_rejected", "update was trained on another version")
        expected = self.expected_shapes
        if expected is None:
            expected = {name: t.shape for name, t in tensors.items()}
        validate_update(tensors, expected, task.clip_norm)
        with self._lock:
            # Checked again under the lock: two concurrent uploads must not both count.
            if device_id in current.received:
                raise ProtocolError("duplicate_update", "this device already uploaded", 409)
            current.received.add(device_id)
            self.updates.append((device_id, round_id, tensors, meta))
        return _json_reply(202, {"accepted": True, "round_id": round_id})
