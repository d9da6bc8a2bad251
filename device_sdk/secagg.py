"""SecAgg+ (Bell et al. 2020, on Bonawitz et al. 2017), both halves of the math.

The server learns the sum of the devices' quantized updates and nothing else about any one
of them. docs/ARCHITECTURE.md ("Secure aggregation") is the specification; the device runs
``SecAggDevice`` (one object per round, in memory only: a device that crashes has dropped
out, which the protocol tolerates) and the server runs ``unmask_sum``.

Stages, for the round's participants U1 (devices that advertised keys):

0. advertise: two fresh X25519 key pairs (c: masks, e: share encryption) and a commitment to
   a fresh 256-bit self-mask seed b, signed with the device's Ed25519 identity.
1. share keys: the server fixes a sparse random neighbour graph over U1 (degree k, a Harary
   ring over a permutation drawn from a server seed); each device Shamir-splits b and its c
   private key t-of-k among its neighbours, each share AEAD-encrypted (ChaCha20-Poly1305)
   under an HKDF key from the e agreement, so the server relays shares it cannot read.
   U2 = devices whose shares arrived.
2. masked input: y = q + PRG(b) + sum over neighbours v in U2 of +-PRG(s_uv) (mod 2^32), with
   q the clipped, stochastically rounded update and s_uv from the c agreement.
   U3 = devices whose masked input arrived.
3. unmasking: each device in U3 reveals, for each neighbour in U2, the share of b if that
   neighbour is in U3 and the share of its c key if not; never both (it answers once).
   The server rebuilds b for survivors and c keys for dropped devices and removes the masks.

PRG: AES-256-CTR (``cryptography``) keyed by 256-bit seeds. Field for Shamir: GF(2^256 + 297).
Quantization: q = floor(x * scale + U[0,1)) per coordinate of the clipped float update; with
|x_i| <= C and n <= max_clients devices the centered sum never wraps (``quantization_scale``)
and the dequantized sum is within n / scale of the float sum in every coordinate.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from device_sdk.csprng import CryptoRandom
from device_sdk.protocol import ProtocolError, b64, b64decode

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

SCHEME = "secagg+-v1"
MODULUS_BITS = 32
SEED_BYTES = 32
PRIME = 2**256 + 297  # the smallest prime above 2^256: shares of 256-bit secrets, 33 bytes
SHARE_BYTES = 33
DOMAIN = b"pocketrec-secagg+-v1"
MAX_COMBINATIONS = 2000  # subsets tried when some revealed shares are wrong
OVERFLOW_SDS = 12.0  # noise tail kept inside the ring: P(one coordinate wraps) < 1e-32

# Security parameters (docs/ARCHITECTURE.md "Choosing k and t").
DEFAULT_DROPOUT = 0.3  # fraction of U1 a round must be able to lose
DEFAULT_COLLUSION = 0.1  # fraction of devices assumed to collude with the server
ROBUSTNESS_TARGET = 1e-4  # P(some neighbourhood keeps < t survivors) at DEFAULT_DROPOUT
SECURITY_TARGET = 2.0**-40  # P(some neighbourhood holds >= t colluders)


@dataclass(frozen=True)
class Stage:
    """One SecAgg+ stage, the one vocabulary of the server's round states, the device's
    session, the simulator and the OpenAPI document."""

    state: str  # the round's state on the server while this stage takes answers
    action: str | None  # what a poll asks the device to do (None: it answers unasked)
    path: str  # the device posts its answer to /v1/rounds/<id>/secagg/<path>
    media: str  # the answer's content type

    @property
    def answer(self) -> str:
        """The answer's name in a device's session: its action, or (unasked) its path."""
        return self.action or self.path


STAGES = (
    Stage("collecting", None, "advertise", "application/json"),  # U1: key advertisements
    Stage("share_keys", "share_keys", "shares", "application/json"),  # U2
    Stage("masked_input", "masked_input", "masked", "application/octet-stream"),  # U3
    Stage("unmasking", "unmask", "unmask", "application/json"),  # U4
)
STAGE_BY_STATE = {s.state: s for s in STAGES}
STAGE_BY_PATH = {s.path: s for s in STAGES}
STAGE_BY_ACTION = {s.action: s for s in STAGES if s.action is not None}


def next_stage(stage: Stage) -> Stage | None:
    """The stage after ``stage`` (None after unmasking: the round aggregates)."""
    at = STAGES.index(stage)
    return STAGES[at + 1] if at + 1 < len(STAGES) else None


# Every state a round (sealed or SecAgg+) can be in; sealed rounds skip the later stages.
ACTIVE_STATES = ("open", *(s.state for s in STAGES), "aggregating")
ENDED_STATES = ("published", "failed")
ROUND_STATES = (*ACTIVE_STATES, *ENDED_STATES)


class SecAggError(ProtocolError):
    """A SecAgg+ message or parameter that must be refused; ``code`` says which rule."""


_STATUS = {"secagg_bad_message": 400, "secagg_bad_signature": 401, "secagg_unsafe": 400,
           "secagg_refused": 409, "secagg_unrecoverable": 409}


def _error(code: str, message: str) -> SecAggError:
    return SecAggError(code, message, _STATUS[code])


# --- security parameters ---------------------------------------------------------------


def _log_binom_pmf(k: int, i: int, p: float) -> float:
    return (math.lgamma(k + 1) - math.lgamma(i + 1) - math.lgamma(k - i + 1)
            + i * math.log(p) + (k - i) * math.log1p(-p))


def binom_tail(k: int, p: float, at_least: int) -> float:
    """P(Binomial(k, p) >= at_least)."""
    if at_least <= 0:
        return 1.0
    if at_least > k or p <= 0:
        return 0.0
    if p >= 1:
        return 1.0
    return min(1.0, sum(math.exp(_log_binom_pmf(k, i, p)) for i in range(at_least, k + 1)))


def default_threshold(degree: int) -> int:
    """t = floor(k/2) + 1: a server that lies about who dropped cannot collect t shares of b
    from one half of a neighbourhood and t shares of the c key from the other."""
    return degree // 2 + 1


def risks(n: int, degree: int, threshold: int, *, dropout: float = DEFAULT_DROPOUT,
          collusion: float = DEFAULT_COLLUSION) -> dict[str, float]:
    """Union bounds over the n neighbourhoods: ``failure`` = P(some device keeps fewer than t
    surviving holders when each drops with probability ``dropout``); ``exposure`` = P(some
    device has >= t neighbours among a ``collusion`` fraction of colluders). A complete
    graph (k = n - 1) is the original SecAgg."""
    if n < 2:
        return {"failure": 1.0, "exposure": 1.0}
    complete = degree >= n - 1
    failure = n * (1.0 - binom_tail(degree, 1.0 - dropout, threshold))
    exposure = 0.0 if collusion == 0 else n * binom_tail(degree, collusion, threshold)
    if complete:  # every neighbourhood is everyone else: one event, not n
        failure /= n
        exposure /= n
    return {"failure": min(1.0, failure), "exposure": min(1.0, exposure)}


def default_degree(n: int, *, dropout: float = DEFAULT_DROPOUT,
                   collusion: float = DEFAULT_COLLUSION) -> int:
    """The smallest even k (or n - 1, the complete graph) whose neighbourhoods, with
    t = floor(k/2) + 1, meet ROBUSTNESS_TARGET and SECURITY_TARGET. Grows as log n."""
    if n < 2:
        raise _error("secagg_unsafe", f"secure aggregation needs >= 2 devices, got {n}")
    for degree in range(2, n - 1, 2):
        r = risks(n, degree, default_threshold(degree), dropout=dropout, collusion=collusion)
        if r["failure"] <= ROBUSTNESS_TARGET and r["exposure"] <= SECURITY_TARGET:
            return degree
    return n - 1


def check_graph(n: int, degree: int, threshold: int, *,
                collusion: float = DEFAULT_COLLUSION) -> None:
    """Refuse parameters that are unsafe (not merely fragile) for n participants."""
    if n < 3:
        raise _error("secagg_unsafe", f"{n} participant(s): a sum of fewer than 3 updates "
                     "reveals them to any one participant")
    if not 2 <= degree <= n - 1 or (degree < n - 1 and degree % 2):
        raise _error("secagg_unsafe", f"degree {degree} must be even and in [2, {n - 2}], "
                     f"or {n - 1} (complete graph) for {n} participants")
    if not degree // 2 < threshold <= degree:
        raise _error("secagg_unsafe", f"threshold {threshold} must be in "
                     f"({degree // 2}, {degree}] for degree {degree}: at or below half the "
                     "neighbourhood, disjoint halves could reveal both secrets of a device")
    # A complete graph is Bonawitz et al.'s SecAgg: safe against any t - 1 colluders, a
    # deterministic guarantee. A sparse graph's is probabilistic, so it must meet the target.
    exposure = risks(n, degree, threshold, collusion=collusion)["exposure"]
    if degree < n - 1 and exposure > SECURITY_TARGET:
        raise _error("secagg_unsafe", f"degree {degree}, threshold {threshold}: with "
                     f"{collusion:.0%} colluding devices some neighbourhood holds t colluders "
                     f"with probability {exposure:.2g} (> 2^-40); raise the degree")


# --- quantization --------------------------------------------------------------------------


def quantization_scale(clip_norm: float, max_clients: int, noise_std_units: float = 0.0
                       ) -> float:
    """Largest scale s (a power of two) with max_clients * (C s + 1) plus OVERFLOW_SDS noise
    std (``noise_std_units`` is the std of the summed noise in units of C) < 2^31: the
    centered sum of the quantized updates then never wraps modulo 2^32."""
    if not clip_norm > 0 or max_clients < 1 or noise_std_units < 0:
        raise ValueError("need clip_norm > 0, max_clients >= 1, noise_std_units >= 0")
    room = 2.0**31 - 1 - max_clients
    scale = room / (clip_norm * (max_clients + OVERFLOW_SDS * noise_std_units))
    if scale < 1:
        raise _error("secagg_unsafe", f"{max_clients} clients do not fit a 32-bit ring")
    return float(2.0 ** math.floor(math.log2(scale)))


def quantize(vector: np.ndarray, scale: float, rng: np.random.Generator | CryptoRandom
             ) -> np.ndarray:
    """Stochastic rounding: floor(x * scale + U[0,1)), unbiased, error < 1 unit; as int64."""
    scaled = np.array(vector, dtype=np.float64)  # a copy: worked on in place
    scaled *= scale
    scaled += rng.random(scaled.shape)
    return np.floor(scaled, out=scaled).astype(np.int64)


def to_ring(values: np.ndarray) -> np.ndarray:
    # int64 -> uint32 keeps the low 32 bits: the value modulo 2^32.
    return np.asarray(values, dtype=np.int64).astype(np.uint32)


def centered(ring_values: np.ndarray) -> np.ndarray:
    """Ring elements as signed integers in [-2^31, 2^31)."""
    values = np.asarray(ring_values, dtype=np.uint32).astype(np.int64)
    values[values >= 2**31] -= 2**32
    return values


def dequantize(ring_sum: np.ndarray, scale: float) -> np.ndarray:
    return centered(ring_sum).astype(np.float64) / scale


def ring_input(vector: np.ndarray, params: TaskParams,
               rng: np.random.Generator | CryptoRandom) -> np.ndarray:
    """A device's unmasked input to the ring: its clipped float update stochastically
    rounded at the round's scale, plus its share of distributed DP noise, modulo 2^32.
    The masks added on top cancel in the sum, so the ring sum of these over the survivors
    is exactly what the server unmasks (the fast simulator sums these directly)."""
    q = quantize(vector, params.scale, rng)
    if params.noise_std > 0:
        q += discrete_gaussian(params.noise_std, q.size, rng)
    return to_ring(q)


def discrete_gaussian(sigma: float, size: int, rng: np.random.Generator | CryptoRandom
                      ) -> np.ndarray:
    """Samples of N_Z(0, sigma^2) by rejection from a discrete Laplace (Canonne, Kamath and
    Steinke 2020, Algorithm 3), vectorised in floating point."""
    if sigma <= 0:
        return np.zeros(size, dtype=np.int64)
    t = math.floor(sigma) + 1
    p = -math.expm1(-1.0 / t)
    out = np.empty(size, dtype=np.int64)
    filled = 0
    while filled < size:
        m = int((size - filled) * 1.6) + 64
        y = rng.geometric(p, m).astype(np.int64) - rng.geometric(p, m).astype(np.int64)
        keep = rng.random(m) < np.exp(-((np.abs(y) - sigma**2 / t) ** 2) / (2 * sigma**2))
        take = y[keep][: size - filled]
        out[filled : filled + take.size] = take
        filled += take.size
    return out


# --- primitives ----------------------------------------------------------------------------


def prg(seed: bytes, length: int) -> np.ndarray:
    """``length`` uint32 words of AES-256-CTR keystream under a 256-bit seed (each seed keys
    one stream; a zero counter block is safe because no key is ever reused)."""
    out = np.zeros(length, dtype=np.uint32)
    add_masks(out, [(seed, 1)])
    return out


def add_masks(vector: np.ndarray, masks: Iterable[tuple[bytes, int]]) -> None:
    """vector += sign * PRG(seed) (mod 2^32) for each (seed, sign), in place, streaming
    through one reused buffer (AES-CTR here ran 2.2x faster than ChaCha20: AES-NI)."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    if vector.dtype != np.uint32 or not vector.flags.c_contiguous:
        raise ValueError("masks apply to a contiguous uint32 vector")
    zeros = bytes(4 * vector.size)
    buffer = bytearray(4 * vector.size + 16)
    words = np.frombuffer(buffer, dtype="<u4", count=vector.size)
    for seed, sign in masks:
        if len(seed) != SEED_BYTES:
            raise ValueError(f"PRG seeds are {SEED_BYTES} bytes, got {len(seed)}")
        encryptor = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
        encryptor.update_into(zeros, buffer)
        if sign > 0:
            np.add(vector, words, out=vector)
        else:
            np.subtract(vector, words, out=vector)


def _hkdf(secret: bytes, info: bytes) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


def _x25519_private(key: bytes | Any) -> Any:
    """A key object from raw bytes (a key object passes through: parsing costs ~40 us)."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    return X25519PrivateKey.from_private_bytes(key) if isinstance(key, bytes) else key


def _x25519_public(raw: bytes) -> Any:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

    return X25519PublicKey.from_public_bytes(raw)


def _raw_public(private: Any) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _raw_private(private: Any) -> bytes:
    from cryptography.hazmat.primitives.serialization import (
        Encoding,
        NoEncryption,
        PrivateFormat,
    )

    return private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def mask_seed(c_private: bytes | Any, peer_c_public: bytes, round_id: str, a: str, b: str
              ) -> bytes:
    """s_uv: HKDF of the X25519 agreement, bound to the round and the (sorted) pair."""
    try:
        shared = _x25519_private(c_private).exchange(_x25519_public(peer_c_public))
    except ValueError as exc:  # a low-order point gives an all-zero secret
        raise _error("secagg_bad_message", f"unusable mask key: {exc}") from None
    low, high = sorted((a, b))
    return _hkdf(shared, b"|".join([DOMAIN, b"mask", round_id.encode(), low.encode(),
                                    high.encode()]))


def pair_sign(me: str, peer: str) -> int:
    """The smaller id adds the pairwise mask, the larger subtracts it."""
    return 1 if me < peer else -1


def self_mask_commitment(round_id: str, device_id: str, seed: bytes) -> bytes:
    return hashlib.sha256(b"|".join([DOMAIN, b"self", round_id.encode(), device_id.encode(),
                                     seed])).digest()


# --- Shamir t-of-n over GF(2^256 + 297) ------------------------------------------------------


def shamir_split(secret: bytes, threshold: int, xs: Sequence[int]) -> list[bytes]:
    """Shares y_i = f(x_i) of a polynomial of degree t - 1 with f(0) = secret."""
    if len(secret) != SEED_BYTES or not 1 <= threshold <= len(xs):
        raise ValueError("need a 32-byte secret and 1 <= threshold <= len(xs)")
    coefficients = [int.from_bytes(secret, "big")] + [
        secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares = []
    for x in xs:
        y = 0
        for c in reversed(coefficients):
            y = (y * x + c) % PRIME
        shares.append(y.to_bytes(SHARE_BYTES, "big"))
    return shares


def shamir_combine(points: Sequence[tuple[int, bytes]]) -> bytes:
    """f(0) by Lagrange interpolation from exactly t points (x, y)."""
    xs = [x for x, _ in points]
    if len(set(xs)) != len(xs) or any(not 0 < x < PRIME for x in xs):
        raise ValueError("share x coordinates must be distinct and non-zero")
    # The x are small integers (participant indices), so the Lagrange products are exact
    # integer products reduced once, not t^2 modular multiplications of field elements.
    total = math.prod(-x for x in xs)
    nums, dens = [], []
    for xi in xs:
        nums.append(total // -xi % PRIME)
        dens.append(math.prod(xi - xj for xj in xs if xj != xi) % PRIME)
    # One modular inverse for all denominators (Montgomery's batch inversion).
    prefix = [1]
    for den in dens:
        prefix.append(prefix[-1] * den % PRIME)
    inverse = pow(prefix[-1], -1, PRIME)
    secret = 0
    for i in range(len(points) - 1, -1, -1):
        den_inverse = inverse * prefix[i] % PRIME
        inverse = inverse * dens[i] % PRIME
        secret = (secret + int.from_bytes(points[i][1], "big") * nums[i] * den_inverse) % PRIME
    if secret >= 2 ** (8 * SEED_BYTES):
        raise ValueError("shares do not combine to a 32-byte secret")
    return secret.to_bytes(SEED_BYTES, "big")


def combine_checked(points: Sequence[tuple[int, bytes]], threshold: int, check: Any
                    ) -> bytes | None:
    """A secret from any ``threshold`` of ``points`` that passes ``check(secret)``; tries
    subsets (up to MAX_COMBINATIONS) so a few wrong shares cannot block a reconstruction.
    None when no subset works."""
    for n, subset in enumerate(itertools.combinations(points, threshold)):
        if n >= MAX_COMBINATIONS:
            return None
        try:
            secret = shamir_combine(subset)
        except ValueError:
            continue
        if check(secret):
            return secret
    return None


# --- the neighbour graph ---------------------------------------------------------------------


def _permutation(n: int, seed: bytes) -> list[int]:
    """Fisher-Yates driven by the PRG (64-bit draws; modulo bias below 2^-40 for n < 2^24)."""
    words = prg(seed, 2 * n).astype(np.uint64)
    draws = (words[0::2] << np.uint64(32)) | words[1::2]
    order = list(range(n))
    for i in range(n - 1, 0, -1):
        j = int(draws[i]) % (i + 1)
        order[i], order[j] = order[j], order[i]
    return order


def neighbours_of(participants: Iterable[str], degree: int, seed: bytes, device: str
                  ) -> tuple[str, ...]:
    """``neighbour_graph(...)[device]`` without building every other neighbourhood."""
    ids = sorted(participants)
    n = len(ids)
    if degree >= n - 1:
        return tuple(v for v in ids if v != device)
    ring = [ids[i] for i in _permutation(n, seed)]
    pos, half = ring.index(device), degree // 2
    return tuple(sorted(ring[(pos + d) % n] for d in range(-half, half + 1) if d))


def neighbour_graph(participants: Iterable[str], degree: int, seed: bytes
                    ) -> dict[str, tuple[str, ...]]:
    """Each participant's neighbours: the k/2 on each side on a ring in random order (a
    Harary graph), or everyone else when k >= n - 1. Same result for the same inputs
    everywhere, so devices recompute and check the server's graph."""
    ids = sorted(participants)
    n = len(ids)
    if degree >= n - 1:
        return {u: tuple(v for v in ids if v != u) for u in ids}
    ring = [ids[i] for i in _permutation(n, seed)]
    half = degree // 2
    return {u: tuple(sorted(ring[(pos + d) % n] for d in range(-half, half + 1) if d))
            for pos, u in enumerate(ring)}


# --- messages --------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskParams:
    """What a device must know before training: from the round task's ``secagg`` field."""

    scale: float
    vector_length: int
    min_clients: int
    noise_std: float = 0.0  # per-device discrete Gaussian std, in quantized units
    # Adaptive clipping: the input's last value is C (b - 1/2), b = 1 when the update's norm
    # before clipping was within the clip C (``device_sdk.uploads.secagg_vector``).
    clip_bit: bool = False

    @classmethod
    def from_json(cls, obj: Any) -> TaskParams:
        if not isinstance(obj, dict):
            raise _error("secagg_bad_message", "task secagg must be an object")
        scale, length = obj.get("scale"), obj.get("vector_length")
        min_clients, noise = obj.get("min_clients"), obj.get("noise_std", 0.0)
        if type(scale) not in (int, float) or not 0 < scale < 2**31 or not math.isfinite(scale):
            raise _error("secagg_bad_message", f"bad scale {scale!r}")
        if type(length) is not int or not 0 < length < 2**31:
            raise _error("secagg_bad_message", f"bad vector_length {length!r}")
        if type(min_clients) is not int or min_clients < 3:
            raise _error("secagg_unsafe", f"min_clients {min_clients!r}: secure aggregation "
                         "needs at least 3 survivors")
        if type(noise) not in (int, float) or not 0 <= noise < 2**31 or not math.isfinite(noise):
            raise _error("secagg_bad_message", f"bad noise_std {noise!r}")
        clip_bit = obj.get("clip_bit", False)
        if type(clip_bit) is not bool:
            raise _error("secagg_bad_message", f"bad clip_bit {clip_bit!r}")
        return cls(float(scale), length, min_clients, float(noise), clip_bit)

    def to_json(self) -> dict[str, Any]:
        out = {"scale": self.scale, "vector_length": self.vector_length,
               "min_clients": self.min_clients, "noise_std": self.noise_std}
        if self.clip_bit:  # absent from rounds with a fixed clip, as before it existed
            out["clip_bit"] = True
        return out


def advert_message(round_id: str, device_id: str, c_pk: bytes, e_pk: bytes,
                   b_commit: bytes) -> bytes:
    return b"\n".join([DOMAIN, b"advertise", round_id.encode(), device_id.encode(),
                       c_pk, e_pk, b_commit])


def _field(obj: Mapping[str, Any], key: str, size: int | None = None) -> bytes:
    value = obj.get(key)
    if not isinstance(value, str):
        raise _error("secagg_bad_message", f"{key} must be a base64 string")
    try:
        raw = b64decode(value)
    except ValueError:
        raise _error("secagg_bad_message", f"{key} is not base64") from None
    if size is not None and len(raw) != size:
        raise _error("secagg_bad_message", f"{key} must be {size} bytes, got {len(raw)}")
    return raw


def verify_advert(advert: Any, round_id: str, device_id: str, identity_public: bytes
                  ) -> dict[str, bytes]:
    """Check one advertisement's shape and Ed25519 signature; returns its raw fields."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    if not isinstance(advert, dict) or set(advert) != {"c_pk", "e_pk", "b_commit", "sig"}:
        raise _error("secagg_bad_message", "an advertisement has exactly c_pk, e_pk, "
                     "b_commit and sig")
    fields = {k: _field(advert, k, 64 if k == "sig" else 32) for k in advert}
    try:
        Ed25519PublicKey.from_public_bytes(identity_public).verify(
            fields["sig"], advert_message(round_id, device_id, fields["c_pk"], fields["e_pk"],
                                          fields["b_commit"]))
    except (InvalidSignature, ValueError):
        raise _error("secagg_bad_signature", f"advertisement of {device_id} is not signed by "
                     "its identity key for this round") from None
    for name in ("c_pk", "e_pk"):
        if not _usable_x25519(fields[name]):
            raise _error("secagg_bad_message", f"{name} of {device_id} is a small-order X25519 "
                         "point: every key agreement with it would fail or be known")
    return fields


def _usable_x25519(raw: bytes) -> bool:
    """Whether a key can be agreed with ``raw``: a small-order point gives an all-zero shared
    secret, which the cryptography library refuses. Checked on every advert, by the server
    when it arrives and by each neighbour when it is relayed, so one such key can neither
    break its neighbours' round nor be slipped in by a server."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    try:
        X25519PrivateKey.generate().exchange(_x25519_public(raw))
    except ValueError:
        return False
    return True


def _share_key(e_private: bytes | Any, peer_e_public: bytes, round_id: str, sender: str,
               recipient: str) -> bytes:
    shared = _x25519_private(e_private).exchange(_x25519_public(peer_e_public))
    return _hkdf(shared, b"|".join([DOMAIN, b"share", round_id.encode(), sender.encode(),
                                    recipient.encode()]))


def _share_aad(round_id: str, sender: str, recipient: str) -> bytes:
    return b"|".join([DOMAIN, b"share-aad", round_id.encode(), sender.encode(),
                      recipient.encode()])


def _digests(ids: Iterable[str]) -> np.ndarray:
    """Sorted 64-bit BLAKE2b digests of ``ids``: a compact set for membership checks."""
    return np.sort(np.fromiter(
        (int.from_bytes(hashlib.blake2b(i.encode(), digest_size=8).digest(), "little")
         for i in ids), dtype=np.uint64))


def _subset(ids: set[str], digests: np.ndarray) -> bool:
    mine = _digests(ids)
    at = np.searchsorted(digests, mine)
    return bool(np.all(at < len(digests)) and np.all(digests[np.minimum(at, len(digests) - 1)]
                                                    == mine))


def _id_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(i, str) for i in value)


def participant_index(participants: Sequence[str]) -> dict[str, int]:
    """Shamir x coordinate of each participant: 1 + its position in sorted U1."""
    return {u: i + 1 for i, u in enumerate(sorted(participants))}


# --- the device --------------------------------------------------------------------------------


class SecAggDevice:
    """One device's side of one round. Methods must be called in stage order; each answers
    once, so a server cannot get both secrets of a neighbour by asking twice."""

    def __init__(self, round_id: str, device_id: str, identity: Ed25519PrivateKey,
                 params: TaskParams) -> None:
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

        self.round_id, self.device_id, self.params = round_id, device_id, params
        self._identity = identity
        self._c_key, self._e_key = X25519PrivateKey.generate(), X25519PrivateKey.generate()
        self._c = _raw_private(self._c_key)  # raw: what gets Shamir-shared
        self._b = os.urandom(SEED_BYTES)
        self._stage = "advertise"
        self._neighbours: tuple[str, ...] = ()
        self._adverts: dict[str, dict[str, bytes]] = {}
        self._held: dict[str, tuple[bytes, bytes]] = {}  # owner -> (b share, c-key share)
        # U1 and U2 as sorted 64-bit digests: membership checks need them, and a round of
        # n devices would otherwise keep n strings per device (n^2 in a simulator).
        self._u1 = np.zeros(0, np.uint64)
        self._u2 = np.zeros(0, np.uint64)
        self._u2_neighbours: set[str] = set()
        self.threshold = 0

    def _advance(self, expected: str, following: str) -> None:
        if self._stage != expected:
            raise _error("secagg_refused", f"round {self.round_id}: asked for {following} "
                         f"while at stage {self._stage} (each stage is answered once)")
        self._stage = following

    def advertise(self) -> dict[str, str]:
        self._advance("advertise", "share_keys")
        c_pk, e_pk = _raw_public(self._c_key), _raw_public(self._e_key)
        commit = self_mask_commitment(self.round_id, self.device_id, self._b)
        sig = self._identity.sign(advert_message(self.round_id, self.device_id, c_pk, e_pk,
                                                 commit))
        return {"c_pk": b64(c_pk), "e_pk": b64(e_pk), "b_commit": b64(commit), "sig": b64(sig)}

    def share_keys(self, roster: Any) -> dict[str, Any]:
        """``roster``: {participants: [ids], degree, threshold, graph_seed, adverts: {id:
        {identity, advert}} for this device's neighbours}. Verifies everything, then returns
        {shares: {neighbour: ciphertext}}."""
        from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

        self._advance("share_keys", "masked_input")
        if not isinstance(roster, dict):
            raise _error("secagg_bad_message", "roster must be an object")
        participants = roster.get("participants")
        degree, threshold = roster.get("degree"), roster.get("threshold")
        if (not isinstance(participants, list) or not all(isinstance(p, str) for p in
                                                          participants)
                or len(set(participants)) != len(participants)
                or type(degree) is not int or type(threshold) is not int):
            raise _error("secagg_bad_message", "roster needs participants, degree, threshold")
        if self.device_id not in participants:
            raise _error("secagg_refused", "this device is not among the participants")
        if len(participants) < self.params.min_clients:
            raise _error("secagg_refused", f"{len(participants)} participants, fewer than the "
                         f"round's min_clients {self.params.min_clients}")
        check_graph(len(participants), degree, threshold)
        seed = _field(roster, "graph_seed", SEED_BYTES)
        self._neighbours = neighbours_of(participants, degree, seed, self.device_id)
        self.threshold = threshold
        self._u1 = _digests(participants)
        adverts = roster.get("adverts")
        if not isinstance(adverts, dict) or set(adverts) != {*self._neighbours,
                                                              self.device_id}:
            raise _error("secagg_bad_message", "roster adverts must cover exactly this "
                         "device and its neighbours in the graph")
        from device_sdk.protocol import device_id_for

        for peer, entry in adverts.items():
            if not isinstance(entry, dict):
                raise _error("secagg_bad_message", f"advert of {peer} must be an object")
            identity = _field(entry, "identity", 32)
            if device_id_for(identity) != peer:
                raise _error("secagg_bad_signature", f"identity key does not match {peer}")
            self._adverts[peer] = verify_advert(entry.get("advert"), self.round_id, peer,
                                                identity)
        mine = self._adverts[self.device_id]
        if mine["c_pk"] != _raw_public(self._c_key) or mine["e_pk"] != _raw_public(self._e_key):
            raise _error("secagg_refused", "the roster altered this device's advertisement")
        index = participant_index(participants)
        xs = [index[v] for v in self._neighbours]
        b_shares = shamir_split(self._b, threshold, xs)
        c_shares = shamir_split(self._c, threshold, xs)
        out = {}
        for v, b_share, c_share in zip(self._neighbours, b_shares, c_shares, strict=True):
            key = _share_key(self._e_key, self._adverts[v]["e_pk"], self.round_id,
                             self.device_id, v)
            nonce = os.urandom(12)
            plain = json.dumps({"from": self.device_id, "to": v, "b": b64(b_share),
                                "c": b64(c_share)}).encode()
            out[v] = b64(nonce + ChaCha20Poly1305(key).encrypt(
                nonce, plain, _share_aad(self.round_id, self.device_id, v)))
        return {"shares": out}

    def _open_share(self, sender: str, ciphertext: Any) -> tuple[bytes, bytes] | None:
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

        if not isinstance(ciphertext, str):
            return None
        try:
            raw = b64decode(ciphertext)
            key = _share_key(self._e_key, self._adverts[sender]["e_pk"], self.round_id, sender,
                             self.device_id)
            plain = json.loads(ChaCha20Poly1305(key).decrypt(
                raw[:12], raw[12:], _share_aad(self.round_id, sender, self.device_id)))
            if plain.get("from") != sender or plain.get("to") != self.device_id:
                return None
            b_share, c_share = b64decode(plain["b"]), b64decode(plain["c"])
        except (InvalidTag, ValueError, KeyError, TypeError, AttributeError, ProtocolError):
            return None
        if len(b_share) != SHARE_BYTES or len(c_share) != SHARE_BYTES:
            return None
        return b_share, c_share

    def masked_input(self, inbox: Any, vector: np.ndarray,
                     rng: Any = None) -> np.ndarray:
        """``inbox``: {u2: [ids of devices whose shares arrived], shares: {sender:
        ciphertext}}. ``vector`` is the clipped float update, flattened. Returns the masked
        uint32 vector. A share that does not decrypt is dropped (its sender keeps one holder
        fewer); the device still masks with every neighbour in U2."""
        self._advance("masked_input", "unmasking")
        if not isinstance(inbox, dict) or not _id_list(inbox.get("u2")) or \
                not isinstance(inbox.get("shares"), dict):
            raise _error("secagg_bad_message", "inbox needs u2 (a list of ids) and shares")
        u2 = set(inbox["u2"])
        if self.device_id not in u2 or not _subset(u2, self._u1):
            raise _error("secagg_refused", "U2 must contain this device and only participants")
        if len(u2) < self.params.min_clients:
            raise _error("secagg_refused", f"only {len(u2)} devices shared keys")
        self._u2 = _digests(u2)
        self._u2_neighbours = {v for v in self._neighbours if v in u2}
        for sender, ciphertext in inbox["shares"].items():
            if sender in self._neighbours and sender in u2:
                opened = self._open_share(sender, ciphertext)
                if opened is not None:
                    self._held[sender] = opened
        vector = np.asarray(vector, dtype=np.float64).ravel()
        if vector.size != self.params.vector_length:
            raise _error("secagg_bad_message", f"update has {vector.size} values, the round "
                         f"expects {self.params.vector_length}")
        # Stochastic rounding and the distributed DP noise: AES-CTR under a fresh OS key
        # (a numpy bit generator's state can be recovered from its output); ``rng`` only
        # for tests and simulations.
        masked = ring_input(vector, self.params, rng or CryptoRandom())
        masks = [(self._b, 1)]
        for v in self._neighbours:
            if v in u2:
                masks.append((mask_seed(self._c_key, self._adverts[v]["c_pk"], self.round_id,
                                        self.device_id, v), pair_sign(self.device_id, v)))
        add_masks(masked, masks)
        return masked

    def unmask(self, request: Any) -> dict[str, dict[str, str]]:
        """``request``: {u3: [ids whose masked input arrived]}. Reveals, per neighbour in U2,
        the b share (survivor) or the c-key share (dropped); never both, and only once."""
        self._advance("unmasking", "done")
        if not isinstance(request, dict) or not _id_list(request.get("u3")):
            raise _error("secagg_bad_message", "unmask request needs u3 (a list of ids)")
        u3 = set(request["u3"])
        if self.device_id not in u3 or not _subset(u3, self._u2):
            raise _error("secagg_refused", "U3 must contain this device and only U2 members")
        if len(u3) < self.params.min_clients:
            raise _error("secagg_refused", f"only {len(u3)} masked inputs arrived; revealing "
                         f"shares below min_clients {self.params.min_clients} is refused")
        b_out, c_out = {}, {}
        for owner, (b_share, c_share) in self._held.items():
            if owner in u3:
                b_out[owner] = b64(b_share)
            elif owner in self._u2_neighbours:
                c_out[owner] = b64(c_share)
        return {"b": b_out, "c": c_out}


# --- the server --------------------------------------------------------------------------------


def parse_reveal(obj: Any, allowed_b: set[str], allowed_c: set[str]
                 ) -> dict[str, dict[str, bytes]]:
    """A device's unmask answer: at most one share per owner, b only for survivors and c only
    for dropped devices among its neighbours."""
    if not isinstance(obj, dict) or set(obj) != {"b", "c"} or not all(
            isinstance(obj[k], dict) for k in ("b", "c")):
        raise _error("secagg_bad_message", "an unmask answer is {b: {...}, c: {...}}")
    out: dict[str, dict[str, bytes]] = {"b": {}, "c": {}}
    for kind, allowed in (("b", allowed_b), ("c", allowed_c)):
        for owner in obj[kind]:
            if owner not in allowed:
                raise _error("secagg_bad_message", f"a {kind} share of {owner} is not "
                             "expected from this device")
            out[kind][owner] = _field(obj[kind], owner, SHARE_BYTES)
    return out


def unmask_sum(*, round_id: str, masked_sum: np.ndarray, graph: Mapping[str, Sequence[str]],
               adverts: Mapping[str, Mapping[str, bytes]], u2: set[str], u3: set[str],
               reveals: Mapping[str, Mapping[str, Mapping[str, bytes]]], threshold: int
               ) -> np.ndarray:
    """Remove every mask from ``masked_sum`` (the ring sum of U3's masked inputs): rebuild b
    for each survivor and the c key of each dropped device in U2 from the revealed shares
    (``reveals[responder][kind][owner]``), checked against the advertised commitment and
    public key. Raises secagg_unrecoverable when some secret has fewer than t good shares."""
    index = participant_index(graph)
    result = np.asarray(masked_sum, dtype=np.uint32).copy()

    def points(kind: str, owner: str) -> list[tuple[int, bytes]]:
        return [(index[r], shares[kind][owner]) for r, shares in reveals.items()
                if owner in shares[kind]]

    masks: list[tuple[bytes, int]] = []
    for u in sorted(u3):
        b = combine_checked(points("b", u), threshold, lambda s, u=u: self_mask_commitment(
            round_id, u, s) == adverts[u]["b_commit"])
        if b is None:
            raise _error("secagg_unrecoverable", f"the self mask of {u} cannot be rebuilt "
                         f"from {len(points('b', u))} share(s) (threshold {threshold})")
        masks.append((b, -1))
    for d in sorted(u2 - u3):
        c = combine_checked(points("c", d), threshold, lambda s, d=d: _raw_public(
            _x25519_private(s)) == adverts[d]["c_pk"])
        if c is None:
            raise _error("secagg_unrecoverable", f"the mask key of dropped {d} cannot be "
                         f"rebuilt from {len(points('c', d))} share(s) (threshold {threshold})")
        # every surviving neighbour u added pair_sign(u, d) * PRG(s_ud): take it out
        c_key = _x25519_private(c)
        masks.extend((mask_seed(c_key, adverts[u]["c_pk"], round_id, d, u), -pair_sign(u, d))
                     for u in graph[d] if u in u3)
    add_masks(result, masks)
    return result
