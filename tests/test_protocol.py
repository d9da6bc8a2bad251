"""The /v1 protocol halves: request signatures, PRT1 framing, sealed updates, round tasks.
Real cryptography throughout; every refusal is checked by its stable code."""

import json
import struct

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from device_sdk.model_update import ModelUpdate
from device_sdk.protocol import (
    HEADER_NONCE,
    HEADER_SIGNATURE,
    HEADER_TIMESTAMP,
    MAX_SKEW_S,
    ProtocolError,
    RoundTask,
    decode_tensors,
    device_id_for,
    encode_tensors,
    error_body,
    open_update,
    seal_update,
    sign_headers,
    transport_key_message,
    update_frame,
    validate_update,
    verify_request,
    verify_transport_key,
)

NOW = 1_750_000_000


def raw_public(key) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


class Device:
    def __init__(self) -> None:
        self.key = Ed25519PrivateKey.generate()
        self.public = raw_public(self.key)
        self.id = device_id_for(self.public)

    def sign(self, method="POST", path="/v1/rounds/checkin", body=b"{}", now=NOW):
        return sign_headers(self.key, self.id, method, path, body, now=now)


class NonceBook:
    """The server-side nonce storage verify_request expects."""

    def __init__(self) -> None:
        self.seen: set[tuple[str, str]] = set()

    def __call__(self, device_id: str, nonce: str) -> bool:
        if (device_id, nonce) in self.seen:
            return True
        self.seen.add((device_id, nonce))
        return False


def verify(headers, device, method="POST", path="/v1/rounds/checkin", body=b"{}", now=NOW,
           key="own", nonces=None):
    public = device.public if key == "own" else key
    return verify_request(headers, method, path, body, public, now=now,
                          seen_nonce=nonces if nonces is not None else NonceBook())


def refusal(code):
    return pytest.raises(ProtocolError, match=f"^{code}:")


# --- signatures --------------------------------------------------------------------------


def test_device_id_is_hex_of_first_16_bytes_of_sha256():
    import hashlib

    device = Device()
    assert device.id == hashlib.sha256(device.public).hexdigest()[:32]


def test_signed_request_verifies_and_headers_are_case_insensitive():
    device = Device()
    headers = device.sign()
    assert len(headers[HEADER_NONCE]) == 32
    assert verify(headers, device) == device.id
    lowered = {k.lower(): v for k, v in device.sign().items()}
    assert verify(lowered, device) == device.id


def test_each_signature_has_a_fresh_nonce():
    device = Device()
    nonces = {device.sign()[HEADER_NONCE] for _ in range(20)}
    assert len(nonces) == 20


@pytest.mark.parametrize("skew", [MAX_SKEW_S + 1, -(MAX_SKEW_S + 1)])
def test_stale_timestamp_is_refused(skew):
    device = Device()
    with refusal("stale_request") as info:
        verify(device.sign(now=NOW + skew), device)
    assert info.value.status == 401
    assert verify(device.sign(now=NOW + MAX_SKEW_S), device) == device.id


def test_replayed_request_is_refused():
    device, nonces = Device(), NonceBook()
    headers = device.sign()
    assert verify(headers, device, nonces=nonces) == device.id
    with refusal("replayed_request") as info:
        verify(headers, device, nonces=nonces)
    assert info.value.status == 401


@pytest.mark.parametrize("change", [
    {"body": b'{"num_examples": 9}'},
    {"path": "/v1/rounds/checkin?x=1"},
    {"path": "/v1/devices"},
    {"method": "PUT"},
])
def test_tampered_request_is_refused(change):
    device = Device()
    with refusal("bad_signature"):
        verify(device.sign(), device, **change)


def test_signature_by_another_key_is_refused():
    device, other = Device(), Device()
    forged = other.sign()
    forged["X-PocketRec-Device"] = device.id  # claims to be `device`, signed by `other`
    with refusal("bad_signature"):
        verify(forged, device)
    with refusal("bad_signature"):  # the registered key does not derive the claimed id
        verify(device.sign(), device, key=other.public)


def test_forgery_does_not_burn_the_nonce():
    device, other, nonces = Device(), Device(), NonceBook()
    genuine = device.sign()
    forged = dict(genuine, **{HEADER_SIGNATURE: other.sign()[HEADER_SIGNATURE]})
    with refusal("bad_signature"):
        verify(forged, device, nonces=nonces)
    assert verify(genuine, device, nonces=nonces) == device.id


def test_unknown_device_and_malformed_headers_are_refused():
    device = Device()
    with refusal("unknown_device"):
        verify(device.sign(), device, key=None)
    for name, value in [(HEADER_TIMESTAMP, "1e9"), (HEADER_NONCE, "xyz"),
                        (HEADER_SIGNATURE, "not base64!"), ("X-PocketRec-Device", "ab")]:
        with refusal("bad_signature"):
            verify({**device.sign(), name: value}, device)
    with refusal("bad_signature"):
        verify({}, device)


# --- PRT1 framing ------------------------------------------------------------------------


def test_frame_round_trips_every_dtype_and_shape(rng):
    tensors = {
        "f32": rng.normal(size=(3, 4)).astype(np.float32),
        "f64.big-endian": rng.normal(size=5).astype(">f8"),
        "i32": np.arange(-6, 6, dtype=np.int32).reshape(2, 3, 2),
        "i64": np.array(-(2**40), dtype=np.int64),  # 0-d
        "u32": np.array([0, 2**32 - 1], dtype=np.uint32),
        "u64": np.array([[2**64 - 1]], dtype=np.uint64),
        "empty": np.zeros((0, 7), dtype=np.float32),
        "strided": np.arange(20, dtype=np.float32).reshape(4, 5)[:, ::2],  # non-contiguous
    }
    meta = {"round_id": "r-1", "nested": {"a": [1, 2.5, None, "x"]}}
    data = encode_tensors(tensors, meta)
    decoded, decoded_meta = decode_tensors(data)
    assert decoded_meta == meta and list(decoded) == list(tensors)
    for name, value in tensors.items():
        assert decoded[name].dtype == value.dtype.newbyteorder("=")
        assert decoded[name].shape == value.shape
        np.testing.assert_array_equal(decoded[name], value)
        assert decoded[name].flags.writeable
    assert decode_tensors(bytearray(data))[1] == meta


def _frame(header, payload=b"", header_len=None):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    length = len(raw) if header_len is None else header_len
    return b"PRT1" + struct.pack("<I", length) + raw + payload


def _one(name="w", dtype="float32", shape=(2,), payload=b"\0" * 8, **extra):
    entry = {"name": name, "dtype": dtype, "shape": list(shape), **extra}
    return _frame({"tensors": [entry], "meta": {}}, payload)


VALID = encode_tensors({"w": np.ones(2, np.float32)}, {"k": 1})

MALFORMED = {
    "empty": b"",
    "short magic": b"PRT",
    "wrong magic": b"PRT2" + VALID[4:],
    "no header length": b"PRT1\x01\x00",
    "header over 64 KiB": _frame(b"{}", header_len=64 * 1024 + 1),
    "header truncated": VALID[:12],
    "header not utf-8": _frame(b"\xff\xfe{}"),
    "header not json": _frame(b"{nope"),
    "header a list": _frame([]),
    "header NaN constant": _frame(b'{"tensors": [], "meta": {"x": NaN}}'),
    "deeply nested header": _frame(b"[" * 30000 + b"]" * 30000),
    "meta missing": _frame({"tensors": []}),
    "extra header key": _frame({"tensors": [], "meta": {}, "x": 1}),
    "tensors not a list": _frame({"tensors": {}, "meta": {}}),
    "meta not an object": _frame({"tensors": [], "meta": []}),
    "too many tensors": _frame({"tensors": [{}] * 257, "meta": {}}),
    "entry not an object": _frame({"tensors": ["w"], "meta": {}}),
    "entry missing dtype": _frame({"tensors": [{"name": "w", "shape": [1]}], "meta": {}}),
    "entry extra key": _one(offset=0),
    "name empty": _one(name=""),
    "name leading dot": _one(name=".w"),
    "name with slash": _one(name="a/b"),
    "name too long": _one(name="a" * 129),
    "name not a string": _one(name=7),
    "duplicate names": _frame({"tensors": [{"name": "w", "dtype": "float32", "shape": [1]}] * 2,
                               "meta": {}}, b"\0" * 8),
    "dtype float16": _one(dtype="float16", payload=b"\0" * 4),
    "dtype object": _one(dtype="object"),
    "dtype with byte order": _one(dtype="<f4"),
    "negative dim": _one(shape=(-2,)),
    "huge dim": _one(shape=(2**40,)),
    "huge product": _one(shape=(2**30, 2**30, 2**30)),
    "zero size with huge dims": _one(shape=(0,) + (2**31 - 1,) * 8, payload=b""),
    "bool dim": _one(shape=(True,), payload=b"\0" * 4),
    "float dim": _one(shape=(2.0,)),
    "shape not a list": _frame({"tensors": [{"name": "w", "dtype": "float32", "shape": 2}],
                                "meta": {}}, b"\0" * 8),
    "too many dims": _one(shape=(1,) * 33, payload=b"\0" * 4),
    "data truncated": VALID[:-1],
    "trailing bytes": VALID + b"\0",
    "not bytes": "PRT1",
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_frames_raise_bad_frame(name):
    with refusal("bad_frame") as info:
        decode_tensors(MALFORMED[name])
    assert info.value.status == 400


def test_encoder_refuses_what_the_decoder_would():
    with refusal("bad_frame"):
        encode_tensors({"bad/name": np.zeros(1, np.float32)}, {})
    with refusal("bad_frame"):
        encode_tensors({"w": np.zeros(1, np.float16)}, {})
    with refusal("bad_frame"):
        encode_tensors({"w": np.zeros(1, np.float32)}, {"x": float("nan")})


# (Properties of the decoders, random and mutated input: test_decoder_properties.py.)


# --- sealed updates ----------------------------------------------------------------------


@pytest.fixture
def transport():
    return X25519PrivateKey.generate()


def make_update(rng, clip_norm=1.0, scale=0.5):
    delta = {"out.weight": rng.normal(size=(6, 3)).astype(np.float32),
             "out.bias": rng.normal(size=6).astype(np.float32)}
    norm = float(np.sqrt(sum((v.astype(np.float64) ** 2).sum() for v in delta.values())))
    delta = {k: (v * (scale * clip_norm / norm)).astype(np.float32) for k, v in delta.items()}
    return ModelUpdate(base_version=3, delta=delta, num_examples=42, clip_norm=clip_norm,
                       norm=scale * clip_norm, norm_before_clip=norm)


def seal(update, transport, round_id="round-7", device_id="d" * 32):
    return seal_update(update, round_id=round_id, device_id=device_id,
                       transport_public_key=raw_public(transport))


def test_seal_open_round_trip(rng, transport):
    update = make_update(rng)
    tensors, meta = open_update(seal(update, transport), round_id="round-7",
                                device_id="d" * 32, transport_private_key=transport)
    assert set(tensors) == set(update.delta)
    for name, value in update.delta.items():
        assert tensors[name].dtype == np.float32
        np.testing.assert_array_equal(tensors[name], value)
    assert meta["round_id"] == "round-7" and meta["base_version"] == 3
    assert meta["num_examples"] == 42 and meta["clip_norm"] == 1.0
    assert meta["norm"] == pytest.approx(0.5, rel=1e-6)


def test_sealed_bytes_hide_the_plaintext_and_never_repeat(rng, transport):
    update = make_update(rng)
    sealed, again = seal(update, transport), seal(update, transport)
    frame = update_frame(update, "round-7")
    assert sealed[:4] == b"PRS1" and sealed != again
    assert len(sealed) == 4 + 32 + 12 + len(frame) + 16
    assert frame not in sealed
    weights = update.delta["out.weight"].tobytes()
    assert all(weights[i:i + 8] not in sealed for i in range(0, len(weights) - 8, 8))
    assert b"out.weight" not in sealed and b"round-7" not in sealed


@pytest.mark.parametrize("change", ["round", "device", "key", "truncated", "magic",
                                    "ephemeral", "nonce", "ciphertext", "tag"])
def test_open_refuses_anything_but_the_exact_sealed_update(rng, transport, change):
    sealed = bytearray(seal(make_update(rng), transport))
    kwargs = {"round_id": "round-7", "device_id": "d" * 32, "transport_private_key": transport}
    flip_at = {"magic": 0, "ephemeral": 10, "nonce": 40, "ciphertext": 60, "tag": -1}
    if change == "round":
        kwargs["round_id"] = "round-8"
    elif change == "device":
        kwargs["device_id"] = "e" * 32
    elif change == "key":
        kwargs["transport_private_key"] = X25519PrivateKey.generate()
    elif change == "truncated":
        sealed = sealed[:40]
    else:
        sealed[flip_at[change]] ^= 0x01
    with refusal("bad_update") as info:
        open_update(bytes(sealed), **kwargs)
    assert info.value.status == 400


def test_seal_refuses_unclipped_or_non_finite_updates(rng, transport):
    with refusal("bad_update"):
        seal(make_update(rng, scale=1.5), transport)
    update = make_update(rng)
    update.delta["out.bias"][0] = np.nan
    with refusal("bad_update"):
        seal(update, transport)


def test_validate_update_enforces_names_shapes_finiteness_and_clip(rng):
    delta = make_update(rng).delta
    shapes = {k: v.shape for k, v in delta.items()}
    assert validate_update(delta, shapes, 1.0) == pytest.approx(0.5, rel=1e-6)
    cases = [
        (delta, {**shapes, "extra": (1,)}, 1.0),
        (delta, {**shapes, "out.bias": (5,)}, 1.0),
        ({**delta, "out.bias": np.full(6, np.inf, np.float32)}, shapes, 1.0),
        (delta, shapes, 0.4),
    ]
    for tensors, expected, clip in cases:
        with refusal("update_rejected") as info:
            validate_update(tensors, expected, clip)
        assert info.value.status == 422


def test_transport_key_endorsement():
    signing, transport = Ed25519PrivateKey.generate(), raw_public(X25519PrivateKey.generate())
    sig = signing.sign(transport_key_message(transport))
    verify_transport_key(raw_public(signing), transport, sig)
    other = raw_public(X25519PrivateKey.generate())
    for args in [(raw_public(signing), other, sig),
                 (raw_public(Ed25519PrivateKey.generate()), transport, sig),
                 (raw_public(signing), transport[:31], sig)]:
        with refusal("bad_server_key"):
            verify_transport_key(*args)


# --- round tasks and errors --------------------------------------------------------------

TASK = {"round_id": "r-12", "model_version": 4, "clip_norm": 1.5, "local_epochs": 2,
        "learning_rate": 0.05, "batch_size": 16, "proximal_mu": 0.0, "max_examples": 500,
        "trainable": ["out.weight", "out.bias"], "deadline": 1.75e9,
        "upload_scheme": "sealed-x25519-v1"}


def test_round_task_parses_and_round_trips():
    task = RoundTask.from_json({**TASK, "future_field": 1})
    assert task.trainable == ("out.weight", "out.bias") and task.clip_norm == 1.5
    assert RoundTask.from_json(task.to_json()) == task
    assert RoundTask.from_json({**TASK, "trainable": None}).trainable is None


@pytest.mark.parametrize("change", [
    {"round_id": "../etc"}, {"round_id": 5}, {"model_version": -1}, {"model_version": True},
    {"clip_norm": 0}, {"clip_norm": float("inf")}, {"local_epochs": 0}, {"learning_rate": "1"},
    {"batch_size": 2.5}, {"proximal_mu": -0.1}, {"max_examples": 0}, {"trainable": []},
    {"trainable": ["a/b"]}, {"deadline": None}, {"upload_scheme": ""},
])
def test_round_task_refuses_bad_fields(change):
    with refusal("bad_task"):
        RoundTask.from_json({**TASK, **change})
    with refusal("bad_task"):
        RoundTask.from_json([TASK])


def test_error_body_shape():
    assert error_body("round_closed", "too late") == {
        "error": {"code": "round_closed", "message": "too late"}
    }
