"""Wire protocol /v1, both halves: what a device sends and what a server must check.

docs/ARCHITECTURE.md ("Wire protocol /v1") is the specification; this module is its only
implementation, so the sync server imports the checks from here instead of re-writing them.

- request signatures: ``sign_headers`` (device) / ``verify_request`` (server)
- tensor framing ``PRT1``: ``encode_tensors`` / ``decode_tensors`` (never unpickles)
- sealed updates ``sealed-x25519-v1``: ``seal_update`` (device) / ``open_update`` (server)
- ``TrainingParams`` / ``RoundTask``, the server's transport-key endorsement, the JSON error
  shape (``error_body``) and the device's view of an error (``SyncError``)

Every refusal is a ``ProtocolError`` with a stable ``code`` and the HTTP ``status`` a server
answers with. cryptography is imported lazily so ``import device_sdk`` stays numpy-only."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import os
import re
import secrets
import struct
import time
from collections.abc import Callable, Mapping
from dataclasses import MISSING, Field, asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any

import numpy as np

from device_sdk.model_update import ModelUpdate

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

SIGNATURE_DOMAIN = "pocketrec-v1"
MAX_SKEW_S = 300
HEADER_DEVICE = "X-PocketRec-Device"
HEADER_TIMESTAMP = "X-PocketRec-Timestamp"
HEADER_NONCE = "X-PocketRec-Nonce"
HEADER_SIGNATURE = "X-PocketRec-Signature"
HEADER_MODEL_VERSION = "X-PocketRec-Model-Version"
HEADER_MANIFEST_SIGNATURE = "X-PocketRec-Manifest-Signature"

FRAME_MAGIC = b"PRT1"
MAX_HEADER_BYTES = 64 * 1024
MAX_TENSORS = 256
MAX_NDIM = 32
DTYPES = ("float32", "float64", "int32", "int64", "uint32", "uint64")
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")

SEALED_SCHEME = "sealed-x25519-v1"
SEALED_MAGIC = b"PRS1"
SEALED_INFO = b"pocketrec-v1/sealed-update"
SEALED_AAD = b"pocketrec-v1/update\n"
TRANSPORT_KEY_CONTEXT = b"pocketrec-v1/transport-key\n"
_KEY_BYTES = 32
_AEAD_NONCE_BYTES = 12
_AEAD_TAG_BYTES = 16

# Rounding slack on every clip check (device, sealed intake, DP wrapper, SecAgg+ sum
# guard): a delta clipped to C in float64 and stored in float32 can come out a hair longer.
CLIP_SLACK = 1e-6

_DEVICE_ID = re.compile(r"[0-9a-f]{32}")
_NONCE = re.compile(r"[0-9a-f]{32}")
_TIMESTAMP = re.compile(r"[0-9]{1,12}")

_STATUS = {
    "bad_frame": 400,
    "bad_update": 400,
    "bad_task": 400,
    "bad_signature": 401,
    "stale_request": 401,
    "replayed_request": 401,
    "unknown_device": 401,
    "bad_server_key": 401,
    "update_rejected": 422,
}


class ProtocolError(ValueError):
    """A message breaks the /v1 protocol. ``code`` is stable (clients branch on it),
    ``status`` is the HTTP status a server answers with."""

    def __init__(self, code: str, message: str, status: int | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status if status is not None else _STATUS.get(code, 400)


class SyncError(RuntimeError):
    """A sync request failed. ``code`` is the server's stable error code (or a client-side
    one: ``unreachable``, ``bad_response``, ...), ``status`` the HTTP status if there was a
    response, ``retryable`` whether trying again later may succeed."""

    def __init__(
        self, code: str, message: str, *, status: int | None = None, retryable: bool = False
    ) -> None:
        super().__init__(f"{code}: {message}" + (f" (HTTP {status})" if status else ""))
        self.code = code
        self.message = message
        self.status = status
        self.retryable = retryable


def error_body(code: str, message: str) -> dict[str, dict[str, str]]:
    """The JSON body of every error response."""
    return {"error": {"code": code, "message": message}}


def b64decode(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


def b64(data: bytes) -> str:
    """Standard base64 text, the encoding of every binary value inside JSON and headers."""
    return base64.b64encode(data).decode("ascii")


# --- device signatures ---------------------------------------------------------------------


def device_id_for(public_key_raw: bytes) -> str:
    """Hex of the first 16 bytes of sha256(raw Ed25519 public key)."""
    return hashlib.sha256(public_key_raw).digest()[:16].hex()


def signed_string(
    method: str, path_with_query: str, body: bytes, timestamp: int, nonce: str, device_id: str
) -> bytes:
    """The exact bytes a device signs. A field holding a newline could shift the others, so
    one is refused rather than escaped."""
    parts = [
        SIGNATURE_DOMAIN,
        method.upper(),
        path_with_query,
        hashlib.sha256(body).hexdigest(),
        str(int(timestamp)),
        nonce,
        device_id,
    ]
    if any("\n" in f for f in parts):
        raise ProtocolError("bad_signature", "a signed field contains a newline")
    return "\n".join(parts).encode("utf-8")


def sign_headers(
    private_key: Ed25519PrivateKey,
    device_id: str,
    method: str,
    path: str,
    body: bytes,
    now: float | None = None,
) -> dict[str, str]:
    """The four signature headers for one request; a fresh nonce every call, so every retry
    of a request is a new signature the server will not take for a replay."""
    timestamp = int(time.time() if now is None else now)
    nonce = secrets.token_hex(16)
    signature = private_key.sign(signed_string(method, path, body, timestamp, nonce, device_id))
    return {
        HEADER_DEVICE: device_id,
        HEADER_TIMESTAMP: str(timestamp),
        HEADER_NONCE: nonce,
        HEADER_SIGNATURE: b64(signature),
    }


def _lower_headers(headers: Mapping[str, str]) -> dict[str, str]:
    # HTTP header names are case-insensitive; servers hand us dicts, email Messages or
    # werkzeug Headers, so normalise instead of trusting each one's lookup rules.
    return {str(k).lower(): str(v) for k, v in headers.items()}


def claimed_device_id(headers: Mapping[str, str]) -> str:
    """The device id a request claims (well-formed, not yet verified): what a server looks
    the public key up by before calling ``verify_request``."""
    device_id = _lower_headers(headers).get(HEADER_DEVICE.lower(), "")
    if not _DEVICE_ID.fullmatch(device_id):
        raise ProtocolError("bad_signature", f"missing or malformed {HEADER_DEVICE} header")
    return device_id


def verify_request(
    headers: Mapping[str, str],
    method: str,
    path: str,
    body: bytes,
    public_key_raw: bytes | None,
    *,
    now: float | None = None,
    seen_nonce: Callable[[str, str], bool],
) -> str:
    """Check a signed request; return its device id or raise ProtocolError.

    ``public_key_raw`` is the key registered for ``claimed_device_id(headers)`` (None when
    there is none: ``unknown_device``). ``seen_nonce(device_id, nonce)`` returns True when
    the pair was seen before and records it otherwise; it must remember nonces for at least
    2 * MAX_SKEW_S. It is consulted only after the signature verifies, so a forger cannot
    burn a device's nonces."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    lowered = _lower_headers(headers)
    device_id = claimed_device_id(lowered)
    timestamp = lowered.get(HEADER_TIMESTAMP.lower(), "")
    nonce = lowered.get(HEADER_NONCE.lower(), "")
    if not _TIMESTAMP.fullmatch(timestamp):
        raise ProtocolError("bad_signature", f"missing or malformed {HEADER_TIMESTAMP} header")
    if not _NONCE.fullmatch(nonce):
        raise ProtocolError("bad_signature", f"missing or malformed {HEADER_NONCE} header")
    try:
        signature = b64decode(lowered.get(HEADER_SIGNATURE.lower(), ""))
    except (binascii.Error, ValueError):
        raise ProtocolError("bad_signature", f"{HEADER_SIGNATURE} is not base64") from None
    clock = time.time() if now is None else now
    if abs(clock - int(timestamp)) > MAX_SKEW_S:
        raise ProtocolError(
            "stale_request", f"timestamp is more than {MAX_SKEW_S} s from the server's clock"
        )
    if public_key_raw is None:
        raise ProtocolError("unknown_device", f"device {device_id} is not registered")
    if device_id_for(public_key_raw) != device_id:
        raise ProtocolError("bad_signature", "device id does not match the signing key")
    message = signed_string(method, path, body, int(timestamp), nonce, device_id)
    try:
        Ed25519PublicKey.from_public_bytes(public_key_raw).verify(signature, message)
    except (InvalidSignature, ValueError):
        raise ProtocolError("bad_signature", "signature does not verify") from None
    if seen_nonce(device_id, nonce):
        raise ProtocolError("replayed_request", "nonce was already used by this device")
    return device_id


# --- server transport key ------------------------------------------------------------------


def transport_key_message(transport_key_raw: bytes) -> bytes:
    """What the server's signing key signs to endorse its X25519 transport key."""
    return TRANSPORT_KEY_CONTEXT + transport_key_raw


def verify_transport_key(signing_key_raw: bytes, transport_key_raw: bytes, sig: bytes) -> None:
    """Raise ProtocolError("bad_server_key") unless ``sig`` endorses the transport key."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    if len(transport_key_raw) != _KEY_BYTES:
        raise ProtocolError("bad_server_key", "transport key is not 32 bytes")
    try:
        Ed25519PublicKey.from_public_bytes(signing_key_raw).verify(
            sig, transport_key_message(transport_key_raw)
        )
    except (InvalidSignature, ValueError):
        raise ProtocolError(
            "bad_server_key", "transport key is not signed by the server's signing key"
        ) from None


# --- tensor framing PRT1 -------------------------------------------------------------------


def _bad_frame(message: str) -> ProtocolError:
    return ProtocolError("bad_frame", message)


def encode_tensors(tensors: Mapping[str, np.ndarray], meta: dict[str, Any]) -> bytes:
    """One PRT1 frame: magic, uint32 LE header length, JSON header, raw LE C-order bytes."""
    if len(tensors) > MAX_TENSORS:
        raise _bad_frame(f"{len(tensors)} tensors (at most {MAX_TENSORS})")
    entries, chunks = [], []
    for name, value in tensors.items():
        array = np.asarray(value)
        if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
            raise _bad_frame(f"bad tensor name {name!r}")
        if array.dtype.name not in DTYPES:
            raise _bad_frame(f"tensor {name}: dtype {array.dtype} is not one of {DTYPES}")
        if array.ndim > MAX_NDIM:
            raise _bad_frame(f"tensor {name}: {array.ndim} dimensions (at most {MAX_NDIM})")
        entries.append({"name": name, "dtype": array.dtype.name, "shape": list(array.shape)})
        little = array.astype(array.dtype.newbyteorder("<"), copy=False)
        chunks.append(np.ascontiguousarray(little).tobytes())
    try:
        header = json.dumps(
            {"tensors": entries, "meta": meta}, separators=(",", ":"), allow_nan=False
        ).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise _bad_frame(f"meta is not plain JSON: {exc}") from None
    if len(header) > MAX_HEADER_BYTES:
        raise _bad_frame(f"header is {len(header)} bytes (at most {MAX_HEADER_BYTES})")
    return b"".join([FRAME_MAGIC, struct.pack("<I", len(header)), header, *chunks])


def _reject_constant(name: str) -> None:
    # json.loads accepts NaN / Infinity by default; the frame header is strict JSON.
    raise ValueError(f"non-standard JSON constant {name}")


def _parse_header(raw: bytes) -> tuple[list[Any], dict[str, Any]]:
    try:
        header = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _bad_frame(f"header is not JSON: {exc}") from None
    if not isinstance(header, dict) or set(header) != {"tensors", "meta"}:
        raise _bad_frame("header must be an object with exactly 'tensors' and 'meta'")
    tensors, meta = header["tensors"], header["meta"]
    if not isinstance(tensors, list) or not isinstance(meta, dict):
        raise _bad_frame("'tensors' must be a list and 'meta' an object")
    if len(tensors) > MAX_TENSORS:
        raise _bad_frame(f"{len(tensors)} tensors (at most {MAX_TENSORS})")
    return tensors, meta


def _parse_entry(entry: Any, seen: set[str]) -> tuple[str, np.dtype, tuple[int, ...]]:
    if not isinstance(entry, dict) or set(entry) != {"name", "dtype", "shape"}:
        raise _bad_frame("a tensor entry must have exactly name, dtype and shape")
    name, dtype, shape = entry["name"], entry["dtype"], entry["shape"]
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise _bad_frame(f"bad tensor name {name!r}")
    if name in seen:
        raise _bad_frame(f"tensor {name} appears twice")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise _bad_frame(f"tensor {name}: dtype {dtype!r} is not one of {DTYPES}")
    # bool is an int subclass; a shape of [true] is malformed, not [1].
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_NDIM
        or not all(type(d) is int and 0 <= d < 2**31 for d in shape)
    ):
        raise _bad_frame(f"tensor {name}: shape {shape!r} is not a list of ints in [0, 2^31)")
    return name, np.dtype(dtype), tuple(shape)


def decode_tensors(data: bytes) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Parse one PRT1 frame into (native-endian writable arrays, meta). Every malformed input
    raises ProtocolError("bad_frame"); sizes are checked against the bytes present before
    anything is allocated."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise _bad_frame(f"expected bytes, got {type(data).__name__}")
    try:
        view = memoryview(data).cast("B")
    except TypeError:  # a non-contiguous memoryview
        raise _bad_frame("frame buffer is not contiguous") from None
    if len(view) < 8 or bytes(view[:4]) != FRAME_MAGIC:
        raise _bad_frame("missing PRT1 magic")
    (header_len,) = struct.unpack("<I", view[4:8])
    if header_len > MAX_HEADER_BYTES:
        raise _bad_frame(f"header length {header_len} exceeds {MAX_HEADER_BYTES}")
    if len(view) < 8 + header_len:
        raise _bad_frame("frame is truncated inside its header")
    entries, meta = _parse_header(bytes(view[8 : 8 + header_len]))
    offset = 8 + header_len
    tensors: dict[str, np.ndarray] = {}
    for entry in entries:
        name, dtype, shape = _parse_entry(entry, set(tensors))
        nbytes = math.prod(shape) * dtype.itemsize  # Python ints: cannot overflow
        if nbytes > len(view) - offset:
            raise _bad_frame(f"tensor {name} needs {nbytes} bytes, frame has fewer left")
        try:
            array = np.frombuffer(
                view, dtype=dtype.newbyteorder("<"), count=math.prod(shape), offset=offset
            ).reshape(shape)
        except (ValueError, OverflowError) as exc:  # e.g. a zero-size shape numpy can't hold
            raise _bad_frame(f"tensor {name}: {exc}") from None
        # Copy to native byte order: the caller gets arrays it owns, not views of the wire.
        tensors[name] = array.astype(dtype, copy=True)
        offset += nbytes
    if offset != len(view):
        raise _bad_frame(f"{len(view) - offset} trailing bytes after the last tensor")
    return tensors, meta


# --- sealed updates sealed-x25519-v1 -------------------------------------------------------


def _sealed_aad(round_id: str, device_id: str) -> bytes:
    return SEALED_AAD + round_id.encode("utf-8") + b"\n" + device_id.encode("utf-8")


def _sealed_key(shared: bytes, ephemeral_pub: bytes, transport_pub: bytes) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    info = SEALED_INFO + ephemeral_pub + transport_pub
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)


def l2_norm(tensors: Mapping[str, np.ndarray]) -> float:
    """The L2 norm of several tensors taken as one vector (accumulated in float64): the
    norm every clip is about."""
    return math.sqrt(sum(float(np.square(v, dtype=np.float64).sum()) for v in tensors.values()))


def update_frame(update: ModelUpdate, round_id: str) -> bytes:
    """The plaintext PRT1 frame of an update (float32 delta + meta); only ever sent sealed.
    Refuses non-finite or unclipped deltas: the privacy guarantee rests on the clip."""
    delta = {name: np.asarray(v, dtype=np.float32) for name, v in update.delta.items()}
    norm = l2_norm(delta)
    if not all(np.isfinite(v).all() for v in delta.values()) or not math.isfinite(norm):
        raise ProtocolError("bad_update", "update delta has non-finite values")
    if norm > update.clip_norm * (1 + CLIP_SLACK):
        raise ProtocolError("bad_update", f"delta norm {norm:.6g} exceeds {update.clip_norm}")
    meta = {
        "round_id": round_id,
        "base_version": int(update.base_version),
        "num_examples": int(update.num_examples),
        "clip_norm": float(update.clip_norm),
        "norm": norm,
    }
    return encode_tensors(delta, meta)


def seal_update(
    update: ModelUpdate, *, round_id: str, device_id: str, transport_public_key: bytes
) -> bytes:
    """Encrypt an update to the server's X25519 transport key, bound to round and device."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import (
        X25519PrivateKey,
        X25519PublicKey,
    )
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    frame = update_frame(update, round_id)
    ephemeral = X25519PrivateKey.generate()  # fresh per update: forward secrecy
    ephemeral_pub = ephemeral.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    try:
        shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(transport_public_key))
    except ValueError as exc:  # wrong length or a low-order point
        raise ProtocolError("bad_server_key", f"unusable transport key: {exc}") from None
    key = _sealed_key(shared, ephemeral_pub, transport_public_key)
    nonce = os.urandom(_AEAD_NONCE_BYTES)
    ciphertext = ChaCha20Poly1305(key).encrypt(nonce, frame, _sealed_aad(round_id, device_id))
    return SEALED_MAGIC + ephemeral_pub + nonce + ciphertext


def open_update(
    sealed: bytes, *, round_id: str, device_id: str, transport_private_key: X25519PrivateKey
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Decrypt and parse a sealed update (server side). Anything wrong, including another
    round's or device's update, raises ProtocolError("bad_update")."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    head = len(SEALED_MAGIC) + _KEY_BYTES + _AEAD_NONCE_BYTES
    if len(sealed) < head + _AEAD_TAG_BYTES or sealed[:4] != SEALED_MAGIC:
        raise ProtocolError("bad_update", "not a PRS1 sealed update")
    ephemeral_pub = bytes(sealed[4 : 4 + _KEY_BYTES])
    nonce = bytes(sealed[4 + _KEY_BYTES : head])
    transport_pub = transport_private_key.public_key().public_bytes(
        Encoding.Raw, PublicFormat.Raw
    )
    try:
        shared = transport_private_key.exchange(X25519PublicKey.from_public_bytes(ephemeral_pub))
        key = _sealed_key(shared, ephemeral_pub, transport_pub)
        frame = ChaCha20Poly1305(key).decrypt(
            nonce, bytes(sealed[head:]), _sealed_aad(round_id, device_id)
        )
    except (InvalidTag, ValueError):
        raise ProtocolError(
            "bad_update", "sealed update does not decrypt for this round and device"
        ) from None
    try:
        tensors, meta = decode_tensors(frame)
    except ProtocolError as exc:
        raise ProtocolError("bad_update", f"sealed frame is malformed: {exc.message}") from None
    if meta.get("round_id") != round_id:
        raise ProtocolError("bad_update", "frame meta names another round")
    for key_name, kind in (("base_version", int), ("num_examples", int), ("norm", float)):
        value = meta.get(key_name)
        if type(value) is not kind and not (kind is float and type(value) is int):
            raise ProtocolError("bad_update", f"frame meta {key_name!r} is missing or mistyped")
    if any(t.dtype != np.float32 for t in tensors.values()):
        raise ProtocolError("bad_update", "update tensors must be float32")
    return tensors, meta


def validate_update(
    tensors: Mapping[str, np.ndarray],
    expected_shapes: Mapping[str, tuple[int, ...]],
    clip_norm: float,
) -> float:
    """Server policy on an opened update: exactly the expected names and shapes, finite, L2
    norm within the round's clip. Returns the norm; raises ProtocolError("update_rejected")."""
    if set(tensors) != set(expected_shapes):
        missing = sorted(set(expected_shapes) - set(tensors))
        extra = sorted(set(tensors) - set(expected_shapes))
        raise ProtocolError("update_rejected", f"tensor names differ: missing {missing}, "
                            f"unexpected {extra}")
    for name, value in tensors.items():
        if value.shape != tuple(expected_shapes[name]):
            raise ProtocolError(
                "update_rejected", f"{name} has shape {value.shape}, expected "
                f"{tuple(expected_shapes[name])}"
            )
        if not np.isfinite(value).all():
            raise ProtocolError("update_rejected", f"{name} has non-finite values")
    norm = l2_norm(tensors)
    if norm > clip_norm * (1 + CLIP_SLACK):
        raise ProtocolError("update_rejected", f"norm {norm:.6g} exceeds clip {clip_norm}")
    return norm


# --- round tasks and upload schemes --------------------------------------------------------


def _number(obj: Mapping[str, Any], key: str, *, minimum: float, exclusive: bool) -> float:
    value = obj.get(key)
    if type(value) not in (int, float) or not _finite(value):
        raise ProtocolError("bad_task", f"task field {key!r} must be a finite number")
    if value < minimum or (exclusive and value == minimum):
        raise ProtocolError("bad_task", f"task field {key!r} = {value} is out of range")
    return float(value)


def _finite(value: int | float) -> bool:
    """math.isfinite for JSON numbers: an int too large for a float (JSON has no limit) is
    not a usable number either."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _integer(obj: Mapping[str, Any], key: str, *, minimum: int) -> int:
    value = obj.get(key)
    if type(value) is not int or value < minimum:
        raise ProtocolError("bad_task", f"task field {key!r} must be an int >= {minimum}")
    return value


@dataclass(frozen=True)
class Bound:
    """The range of a numeric task or round-config field: the device's check, the server's
    check and the OpenAPI schema all read it from the field's metadata."""

    minimum: float
    exclusive: bool = False


def bounded(default: Any = MISSING, *, minimum: float, exclusive: bool = False) -> Any:
    """A dataclass field with a ``Bound`` (and a default, unless the field is required)."""
    return field(default=default, metadata={"bound": Bound(minimum, exclusive)})


def read_field(obj: Mapping[str, Any], f: Field[Any]) -> Any:
    """One int / float field of ``obj`` checked against its type and ``Bound``;
    ProtocolError("bad_task") otherwise. Other fields are returned as they are."""
    bound = f.metadata.get("bound")
    if bound is None:
        return obj.get(f.name)
    if f.type in ("int", "int | None"):
        if bound.exclusive:
            raise TypeError(f"{f.name}: integer bounds are inclusive")
        return _integer(obj, f.name, minimum=int(bound.minimum))
    return _number(obj, f.name, minimum=bound.minimum, exclusive=bound.exclusive)


def _trainable(value: Any) -> tuple[str, ...] | None:
    if value is not None and (
        not isinstance(value, list)
        or not value
        or not all(isinstance(n, str) and NAME_PATTERN.fullmatch(n) for n in value)
    ):
        raise ProtocolError("bad_task", "trainable must be null or a non-empty name list")
    return None if value is None else tuple(value)


@dataclass(frozen=True, kw_only=True)
class TrainingParams:
    """How a device trains in a round: the training half of every ``RoundTask``, with the
    defaults the server fills into a round config (``sync_server.round_config``) and the
    device's ``LocalTrainingConfig`` starts from. Defined once, here."""

    clip_norm: float = bounded(1.0, minimum=0.0, exclusive=True)
    local_epochs: int = bounded(1, minimum=1)
    learning_rate: float = bounded(0.1, minimum=0.0, exclusive=True)
    batch_size: int = bounded(32, minimum=1)
    proximal_mu: float = bounded(0.0, minimum=0.0)
    max_examples: int = bounded(1000, minimum=1)
    # None: every parameter. An architecture's default federated subset is its config's
    # ``federated_params()``, recorded in the bundle manifest (the server fills it in).
    trainable: tuple[str, ...] | None = None

    @classmethod
    def params_from_json(cls, obj: Mapping[str, Any]) -> dict[str, Any]:
        """The training fields of a JSON object, each checked (a missing one is refused):
        ProtocolError("bad_task") on the first that is not usable."""
        values = {f.name: read_field(obj, f) for f in fields(TrainingParams)}
        values["trainable"] = _trainable(obj.get("trainable"))
        return values

    def training_params(self) -> dict[str, Any]:
        """The training fields of this object (a task, a round config) by name."""
        return {f.name: getattr(self, f.name) for f in fields(TrainingParams)}


@dataclass(frozen=True, kw_only=True)
class RoundTask(TrainingParams):
    """A federated round the server offers a device (field meanings: ARCHITECTURE.md)."""

    round_id: str
    model_version: int = bounded(minimum=0)
    deadline: float = bounded(minimum=0.0)
    upload_scheme: str
    secagg: dict[str, Any] | None = None  # the SecAgg+ parameters (device_sdk.secagg)

    @classmethod
    def from_json(cls, obj: Any) -> RoundTask:
        """Validate a task object from the wire; unknown extra fields are ignored so a newer
        server can add some. round_id is held to the tensor-name pattern because it ends up
        in a URL path and an outbox file name."""
        if not isinstance(obj, dict):
            raise ProtocolError("bad_task", "task must be a JSON object")
        round_id = obj.get("round_id")
        if not isinstance(round_id, str) or not NAME_PATTERN.fullmatch(round_id):
            raise ProtocolError("bad_task", f"bad round_id {round_id!r}")
        training = cls.params_from_json(obj)
        scheme = obj.get("upload_scheme")
        if not isinstance(scheme, str) or not scheme:
            raise ProtocolError("bad_task", "upload_scheme must be a non-empty string")
        secure = obj.get("secagg")
        if secure is not None and not isinstance(secure, dict):
            raise ProtocolError("bad_task", "secagg must be an object or null")
        by_name = {f.name: f for f in fields(cls)}
        return cls(
            round_id=round_id,
            model_version=read_field(obj, by_name["model_version"]),
            deadline=read_field(obj, by_name["deadline"]),
            upload_scheme=scheme,
            secagg=secure,
            **training,
        )

    def to_json(self) -> dict[str, Any]:
        """The wire form; ``secagg`` only in SecAgg+ tasks."""
        obj = asdict(self)
        obj["trainable"] = None if self.trainable is None else list(self.trainable)
        if self.secagg is None:
            del obj["secagg"]
        return obj
