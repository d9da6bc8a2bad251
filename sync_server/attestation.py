"""The attestation hook: a verifier the operator names (``ATTESTATION_VERIFIER =
"module:function"``), called at every registration of a key the server does not know yet.

A platform attestation (Android Play Integrity, Apple App Attest / DeviceCheck, a TPM quote)
is the platform's signed statement that a request comes from a genuine install of the app on
a genuine device. The app obtains it, binding it to the device's key (for example a nonce =
SHA-256 of the public key), and the SDK sends it in the registration body as
``attestation`` (any JSON value; ``SyncClient(attestation=fn)`` / ``DeviceClient(attestation=
fn)`` with ``fn(public_key_raw) -> evidence``). The server calls the verifier with an
``AttestationRequest`` once the request's signature proved possession of the key and the
per-address limit let it through, before an enrollment token is consumed:

- returns (anything but ``False``): accepted; the device is registered.
- raises ``AttestationFailed("why")`` or returns ``False``: 403 ``attestation_failed``
  with the reason; nothing is stored and no enrollment token is used.
- raises anything else (the platform's service is down): 503 ``attestation_unavailable``
  with ``Retry-After``; the device tries again later. Logged with its traceback.

The verifier runs in the request, in every worker: it must be thread-safe, and its own
timeouts bound how long a registration takes. PocketRec ships no verifier (each platform's
check needs the operator's credentials with that platform); unset, registration needs no
attestation. ``ENROLLMENT_MODE = "one-time"`` is the other gate: the app's backend can run
the attestation itself and hand out a token only to installs that passed."""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sync_server.errors import ApiError

log = logging.getLogger(__name__)
RETRY_AFTER_S = 30


@dataclass(frozen=True)
class AttestationRequest:
    """What a verifier sees: the id and raw Ed25519 public key being registered (the request
    was signed with it), the body's ``attestation`` value (None when absent) and the client
    address the rate limits count it under."""

    device_id: str
    public_key: bytes
    evidence: Any
    client_address: str


class AttestationFailed(Exception):
    """Raised by a verifier that refuses the evidence; the message says why."""


Verifier = Callable[[AttestationRequest], Any]


def resolve(spec: str | None) -> Verifier | None:
    """``"module:function"`` -> the verifier (imported now: a wrong name stops the server at
    start, not at the first registration); None -> no attestation."""
    if spec is None:
        return None
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ValueError(f"ATTESTATION_VERIFIER must be 'module:function', got {spec!r}")
    verifier = getattr(importlib.import_module(module), name)
    if not callable(verifier):
        raise ValueError(f"ATTESTATION_VERIFIER {spec!r} is not callable")
    return verifier


def check(verifier: Verifier | None, request: AttestationRequest) -> None:
    """Run ``verifier`` on ``request``; ApiError 403 / 503 as the module docstring says."""
    if verifier is None:
        return
    try:
        verdict = verifier(request)
    except AttestationFailed as exc:
        raise ApiError("attestation_failed", f"attestation refused: {exc}", 403) from None
    except Exception:
        log.exception("attestation verifier failed", extra={"device_id": request.device_id})
        raise ApiError("attestation_unavailable", "attestation could not be checked now; "
                       "retry later", 503, {"Retry-After": str(RETRY_AFTER_S)}) from None
    if verdict is False:
        raise ApiError("attestation_failed", "attestation refused by the verifier", 403)
