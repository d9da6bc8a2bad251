"""The device's HTTP client for the /v1 sync protocol (docs/ARCHITECTURE.md).

Every request is signed by the device identity. Retries (connection errors and 429 / 502 /
503 / 504, for every method: the server makes POSTs idempotent, a repeated upload is answered
409 ``duplicate_update``) run in a loop *around* urllib3 rather than inside it, because each
attempt needs a fresh nonce and timestamp: urllib3's own retry would resend the same
signature and the server would refuse it as a replay. urllib3's ``Retry`` object still keeps
the attempt counts and parses ``Retry-After``; the backoff is exponential with full jitter so
a fleet of devices that failed together does not retry in lockstep.

This module is transport and outbox: uploads go through the ``UploadScheme`` the round task
names (``device_sdk.uploads``), which makes its requests through ``request`` and, when it
can queue (the sealed scheme), ``send_or_queue``: the already *sealed* payload waits in
``outbox_dir`` while the server stays unreachable, and ``flush_outbox`` delivers it later; an
update never leaves the device unencrypted."""

from __future__ import annotations

import base64
import binascii
import json as jsonlib
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import urllib3
from urllib3.exceptions import (
    ConnectTimeoutError,
    HTTPError,
    InvalidHeader,
    MaxRetryError,
    ReadTimeoutError,
)
from urllib3.exceptions import ProtocolError as ConnectionBrokenError
from urllib3.util.retry import Retry

from device_sdk.bundle import BundleIntegrityError, verify_signature
from device_sdk.device_identity import DeviceIdentity
from device_sdk.files import atomic_write
from device_sdk.model_update import ModelUpdate
from device_sdk.protocol import (
    HEADER_MANIFEST_SIGNATURE,
    HEADER_MODEL_VERSION,
    ProtocolError,
    RoundTask,
    SyncError,
    b64,
    verify_transport_key,
)
from device_sdk.uploads import SecAggSession, scheme_for

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({429, 502, 503, 504})
MAX_BACKOFF_S = 30.0
# A longer Retry-After is capped to this: a device should not block a sync for hours.
MAX_RETRY_AFTER_S = 60
OUTBOX_SUFFIX = ".upload"
# Failures of the network itself (refused, reset, timed out), as opposed to TLS or URL errors.
_NETWORK_ERRORS = (ConnectTimeoutError, ReadTimeoutError, ConnectionBrokenError)


@dataclass(frozen=True)
class ServerKeys:
    """The server's raw Ed25519 signing key and its endorsed raw X25519 transport key."""

    signing_key: bytes
    transport_key: bytes


@dataclass(frozen=True)
class ManifestResponse:
    """The current model's manifest (exact bytes, signature already verified)."""

    manifest_bytes: bytes
    signature: bytes
    version: int
    etag: str | None

    @property
    def manifest(self) -> dict[str, Any]:
        return jsonlib.loads(self.manifest_bytes)


class _FullJitterRetry(Retry):
    """urllib3's Retry with "full jitter" backoff: after the n-th consecutive failure sleep
    uniform(0, min(backoff_max, backoff_factor * 2^(n-1))). urllib3's own jitter is additive
    and its first retry immediate, which keeps devices that failed together synchronised."""

    def get_backoff_time(self) -> float:
        failures = len(self.history)
        if failures == 0:
            return 0.0
        ceiling = min(self.backoff_max, self.backoff_factor * 2 ** (failures - 1))
        return random.uniform(0.0, ceiling)


class SyncClient:
    """Signed, retried requests to one sync server, plus the upload outbox.

    ``server_signing_key`` is the raw Ed25519 key pinned at provisioning: the transport key
    and every manifest must be signed by it. Not thread-safe: use one client per thread."""

    def __init__(
        self,
        base_url: str,
        identity: DeviceIdentity,
        *,
        server_signing_key: bytes,
        outbox_dir: str | Path,
        enrollment_token: str | None = None,
        attestation: Callable[[bytes], Any] | None = None,
        timeout: float = 10.0,
        retries: int = 4,
        backoff_factor: float = 0.2,
        pool: urllib3.PoolManager | None = None,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"base_url must be an http(s) URL, got {base_url!r}")
        if len(server_signing_key) != 32:
            raise ValueError("server_signing_key must be a raw 32-byte Ed25519 public key")
        self.identity = identity
        self._origin = f"{parts.scheme}://{parts.netloc}"
        # A path prefix (server mounted under /api) is part of what gets signed.
        self._prefix = parts.path.rstrip("/")
        self._pinned_key = bytes(server_signing_key)
        self.outbox_dir = Path(outbox_dir)
        self._enrollment_token = enrollment_token
        # fn(public_key_raw) -> JSON evidence sent at registration (the server's attestation
        # hook checks it): e.g. a platform attestation whose nonce binds this key.
        self._attestation = attestation
        self._timeout = urllib3.Timeout(connect=timeout, read=timeout)
        self._retry = _FullJitterRetry(
            total=retries,
            other=0,  # TLS and other non-network failures are not worth retrying
            allowed_methods=None,  # every method, POST included (idempotent at the server)
            status_forcelist=RETRY_STATUSES,
            backoff_factor=backoff_factor,
            backoff_max=MAX_BACKOFF_S,
            retry_after_max=MAX_RETRY_AFTER_S,
            raise_on_status=False,
        )
        self._pool = pool if pool is not None else urllib3.PoolManager()
        self._server_keys: ServerKeys | None = None
        # Seconds the server asked to wait after the last check-in that offered no task.
        self.checkin_retry_after: float | None = None

    # --- the request primitive ---------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        signed: bool = True,
        stream: bool = False,
    ) -> urllib3.BaseHTTPResponse:
        """Send one request (signed afresh on every attempt), retrying transient failures.

        Returns the final response whatever its status, including a 429/5xx once retries are
        exhausted; raises SyncError(code="unreachable", retryable=True) when the server could
        not be reached at all. With ``stream`` the body is left unread for the caller."""
        if json is not None and body is not None:
            raise ValueError("pass json or body, not both")
        method = method.upper()
        send_headers = {"Accept": "application/json"}
        payload = b""
        if json is not None:
            payload = jsonlib.dumps(json, separators=(",", ":")).encode("utf-8")
            send_headers["Content-Type"] = "application/json"
        elif body is not None:
            payload = bytes(body)
            send_headers["Content-Type"] = "application/octet-stream"
        send_headers.update(headers or {})
        full_path = self._prefix + path
        url = self._origin + full_path
        retry: Retry = self._retry
        while True:
            attempt_headers = dict(send_headers)
            if signed:
                attempt_headers.update(self.identity.headers(method, full_path, payload))
            try:
                response = self._pool.request(
                    method,
                    url,
                    body=payload if payload else None,
                    headers=attempt_headers,
                    retries=False,
                    redirect=False,
                    timeout=self._timeout,
                    preload_content=not stream,
                )
            except HTTPError as exc:
                try:
                    retry = retry.increment(method, url, error=exc)
                except (MaxRetryError, HTTPError):
                    raise self._transport_error(retry, exc) from exc
                time.sleep(retry.get_backoff_time())
                continue
            if response.status not in RETRY_STATUSES:
                return response
            try:
                retry = retry.increment(method, url, response=response)
            except MaxRetryError:
                return response
            delay = self._retry_delay(retry, response)
            response.drain_conn()
            time.sleep(delay)

    @staticmethod
    def _transport_error(retry: Retry, exc: HTTPError) -> SyncError:
        if isinstance(exc, _NETWORK_ERRORS):
            attempts = len(retry.history) + 1
            return SyncError(
                "unreachable", f"server unreachable after {attempts} attempt(s): {exc}",
                retryable=True,
            )
        return SyncError("transport_error", str(exc))

    @staticmethod
    def _retry_delay(retry: Retry, response: urllib3.BaseHTTPResponse) -> float:
        try:
            retry_after = retry.get_retry_after(response)
        except InvalidHeader:  # a garbled Retry-After falls back to our own backoff
            retry_after = None
        return retry.get_backoff_time() if retry_after is None else retry_after

    @staticmethod
    def error_from(response: urllib3.BaseHTTPResponse) -> SyncError:
        """The SyncError an error response stands for (the server's code when it sent one)."""
        code, message = f"http_{response.status}", response.reason or "error"
        try:
            error = jsonlib.loads(response.data)["error"]
            code, message = str(error["code"]), str(error.get("message", ""))
        except (ValueError, KeyError, TypeError, RecursionError):
            pass
        retryable = response.status == 429 or response.status >= 500
        return SyncError(code, message, status=response.status, retryable=retryable)

    def json_of(self, response: urllib3.BaseHTTPResponse, expected: tuple[int, ...]) -> dict:
        """The JSON object a response with one of the ``expected`` statuses carries; the
        SyncError it stands for otherwise."""
        if response.status not in expected:
            raise self.error_from(response)
        try:
            obj = jsonlib.loads(response.data)
        except (ValueError, RecursionError):
            obj = None
        if not isinstance(obj, dict):
            raise SyncError("bad_response", "expected a JSON object", status=response.status)
        return obj

    # --- endpoints ---------------------------------------------------------------------

    def register(self) -> str:
        """Register this device's public key (idempotent); returns the device id."""
        body = {
            "public_key": b64(self.identity.public_key_raw),
            "enrollment_token": self._enrollment_token,
        }
        if self._attestation is not None:
            body["attestation"] = self._attestation(self.identity.public_key_raw)
        obj = self.json_of(self.request("POST", "/v1/devices", json=body), (200, 201))
        if obj.get("device_id") != self.identity.device_id:
            raise SyncError("bad_response", f"server registered {obj.get('device_id')!r}, "
                            f"expected {self.identity.device_id}")
        return self.identity.device_id

    def server_keys(self) -> ServerKeys:
        """Fetch the server's keys and check them against the pinned signing key. The
        result is also remembered so an upload can be sealed (and queued) while the server
        is unreachable."""
        # Unsigned: the endpoint needs no auth, and the answer is verified, not trusted.
        obj = self.json_of(self.request("GET", "/v1/server-keys", signed=False), (200,))
        try:
            signing = base64.b64decode(obj["signing_key"], validate=True)
            transport = base64.b64decode(obj["transport_key"], validate=True)
            sig = base64.b64decode(obj["transport_key_sig"], validate=True)
        except (KeyError, TypeError, ValueError, binascii.Error):
            raise SyncError("bad_response", "server-keys answer is malformed") from None
        if signing != self._pinned_key:
            raise SyncError("server_key_mismatch",
                            "server presents a signing key other than the pinned one")
        try:
            verify_transport_key(self._pinned_key, transport, sig)
        except ProtocolError as exc:
            raise SyncError(exc.code, exc.message) from None
        self._server_keys = ServerKeys(signing, transport)
        return self._server_keys

    @property
    def known_server_keys(self) -> ServerKeys | None:
        """The keys from the last successful ``server_keys()`` call, if any."""
        return self._server_keys

    def fetch_manifest(self, etag: str | None = None) -> ManifestResponse | None:
        """The manifest of the model the server picked for this device; None when it still
        matches ``etag`` (304). Raises SyncError ``no_model`` (404) when none is published,
        ``bad_manifest_signature`` when the pinned key does not verify it."""
        headers = {"If-None-Match": etag} if etag else None
        response = self.request("GET", "/v1/models/current", headers=headers)
        if response.status == 304:
            return None
        if response.status != 200:
            raise self.error_from(response)
        manifest_bytes = response.data
        try:
            signature = base64.b64decode(
                response.headers.get(HEADER_MANIFEST_SIGNATURE, ""), validate=True
            )
            version = int(response.headers.get(HEADER_MODEL_VERSION, ""))
            verify_signature(manifest_bytes, signature, self._pinned_key)
            declared = jsonlib.loads(manifest_bytes)["model_version"]
        except BundleIntegrityError as exc:
            raise SyncError("bad_manifest_signature", str(exc)) from None
        except (ValueError, KeyError, TypeError, binascii.Error, RecursionError) as exc:
            raise SyncError("bad_response", f"manifest answer is malformed: {exc}") from None
        if declared != version:
            raise SyncError("bad_response", f"manifest is version {declared}, header says "
                            f"{version}")
        return ManifestResponse(manifest_bytes, signature, version, response.headers.get("ETag"))

    def download_bundle(self, version: int, max_bytes: int = 64 * 2**20) -> bytes:
        """The zip of bundle ``version``; refuses bodies over ``max_bytes`` while streaming.
        The caller extracts and verifies it (``load_bundle`` with the pinned key)."""
        response = self.request("GET", f"/v1/models/{int(version)}/bundle", stream=True)
        try:
            if response.status != 200:
                raise self.error_from(response)
            declared = response.headers.get("Content-Length")
            if declared is not None and declared.isdigit() and int(declared) > max_bytes:
                raise SyncError("body_too_large", f"bundle is {declared} bytes (max {max_bytes})")
            chunks, total = [], 0
            try:
                for chunk in response.stream(2**16):
                    total += len(chunk)
                    if total > max_bytes:
                        raise SyncError("body_too_large", f"bundle exceeds {max_bytes} bytes")
                    chunks.append(chunk)
            except HTTPError as exc:  # connection lost mid-body: not retried here (64 MiB)
                raise SyncError("unreachable", f"bundle download broke off: {exc}",
                                retryable=True) from exc
            return b"".join(chunks)
        finally:
            # Closing (not draining) means an oversized body is never read to its end.
            response.close()
            response.release_conn()

    def checkin(self, model_version: int | None, num_examples: int) -> RoundTask | None:
        """Ask for a round task; None when there is none (see ``checkin_retry_after``)."""
        body = {"model_version": model_version, "num_examples": int(num_examples)}
        obj = self.json_of(self.request("POST", "/v1/rounds/checkin", json=body), (200,))
        task = obj.get("task")
        if task is None:
            retry_after = obj.get("retry_after")
            valid = type(retry_after) in (int, float) and 0 <= retry_after < 2**31
            self.checkin_retry_after = float(retry_after) if valid else None
            return None
        try:
            return RoundTask.from_json(task)
        except ProtocolError as exc:
            raise SyncError(exc.code, exc.message) from None

    def upload(self, task: RoundTask, update: ModelUpdate) -> dict[str, Any]:
        """Deliver ``update`` with the task's upload scheme.

        Returns the server's acceptance ``{"accepted": true, "round_id": ...}``, or, when the
        server stayed unreachable (or kept answering 429/5xx) and the scheme could queue,
        ``{"accepted": false, "queued": true, "round_id": ..., "error": code}``: the sealed
        payload is then in the outbox for ``flush_outbox``. Final refusals raise SyncError
        (e.g. ``duplicate_update``, ``round_closed``, ``not_selected``); an update trained on
        another base version or clipped looser than the task asks raises ValueError."""
        return scheme_for(task, update).submit(self, task, update)

    def begin_upload(self, task: RoundTask, update: ModelUpdate) -> SecAggSession | None:
        """For a staged scheme (SecAgg+): send the first stage and return the session for
        the caller to ``step()`` through, instead of waiting in ``upload``. None when the
        task's scheme has one request only: use ``upload``."""
        scheme = scheme_for(task, update)
        begin = getattr(scheme, "begin", None)
        return None if begin is None else begin(self, task, update)

    # --- outbox ------------------------------------------------------------------------

    def send_or_queue(self, task: RoundTask, path: str, body: bytes) -> dict[str, Any]:
        """POST an (already encrypted) upload body; queue it when the failure is transient.
        For single-request schemes; see ``upload`` for the return value."""
        try:
            response = self.request("POST", path, body=body)
            if response.status in RETRY_STATUSES or response.status >= 500:
                raise self.error_from(response)
        except SyncError as exc:
            if not exc.retryable:
                raise
            self._enqueue(task, path, body)
            log.info("upload for round %s queued: %s", task.round_id, exc)
            return {"accepted": False, "queued": True, "round_id": task.round_id,
                    "error": exc.code}
        return self.json_of(response, (202,))

    def _enqueue(self, task: RoundTask, path: str, body: bytes) -> None:
        self.outbox_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        head = jsonlib.dumps({"round_id": task.round_id, "path": path, "deadline": task.deadline})
        # One file per round: a second queued upload for the same round replaces the first.
        atomic_write(self.outbox_dir / f"{task.round_id}{OUTBOX_SUFFIX}",
                     head.encode("utf-8") + b"\n" + body)

    def outbox(self) -> list[Path]:
        """Queued upload files, oldest round id first."""
        if not self.outbox_dir.is_dir():
            return []
        return sorted(self.outbox_dir.glob(f"*{OUTBOX_SUFFIX}"))

    def flush_outbox(self, now: float | None = None) -> int:
        """Send queued uploads; returns how many the server accepted.

        An entry is dropped once its round's deadline has passed or the server gave a final
        verdict on it (409 round_closed / duplicate_update, 403, 400, 413, 422). It is kept
        when the server is unreachable or answers 429/5xx (flushing stops there: the rest
        would fail the same way) and when the request itself was refused (401: clock skew or
        an unregistered device, which the SyncError raised then reports)."""
        now = time.time() if now is None else now
        delivered = 0
        for entry in self.outbox():
            parsed = _read_outbox_entry(entry)
            if parsed is None:
                log.warning("dropping unreadable outbox entry %s", entry)
                entry.unlink(missing_ok=True)
                continue
            round_id, path, deadline, body = parsed
            if deadline < now:
                log.info("dropping queued upload for round %s: deadline passed", round_id)
                entry.unlink(missing_ok=True)
                continue
            try:
                response = self.request("POST", path, body=body)
            except SyncError as exc:
                if exc.retryable:
                    break
                raise
            if response.status == 202:
                delivered += 1
            elif response.status in RETRY_STATUSES or response.status >= 500:
                break
            elif response.status == 401:
                raise self.error_from(response)
            else:
                log.info("dropping queued upload for round %s: %s", round_id,
                         self.error_from(response))
            entry.unlink(missing_ok=True)
        return delivered


def _read_outbox_entry(entry: Path) -> tuple[str, str, float, bytes] | None:
    head, sep, body = entry.read_bytes().partition(b"\n")
    try:
        meta = jsonlib.loads(head)
        round_id, path, deadline = meta["round_id"], meta["path"], float(meta["deadline"])
    except (ValueError, KeyError, TypeError, OverflowError, RecursionError):
        return None
    if not sep or not isinstance(path, str) or not path.startswith("/v1/rounds/"):
        return None
    if not math.isfinite(deadline):  # a NaN deadline would never pass: the entry would stay
        return None
    return str(round_id), path, deadline, body
