"""Cryptographically secure random numbers for DP noise, as numpy arrays.

``CryptoRandom`` draws from the AES-256-CTR keystream under a fresh 256-bit key from the OS
(``secrets.token_bytes``), one key per generator: predicting or reproducing its output means
breaking AES (or learning the key, which never leaves the process). numpy's bit generators
(PCG64, Philox, SFC64) are fast and statistically good but not cryptographic: their state
can be recovered from their output, and with it every later draw, including the noise that
hides a device's update. The counter block starts at zero: safe because no key is reused.

Distributions, vectorised: uniforms on (0, 1) from the top 53 bits of 64-bit words;
standard normals by Box-Muller (two uniforms -> two normals); geometric by inverse CDF.
These are what the central Gaussian noise (``sync_server.strategies.DPFedAvg``), SecAgg+'s
stochastic rounding and the distributed discrete Gaussian (``device_sdk.secagg``) use; the
methods mirror ``numpy.random.Generator``'s so either can be passed where tests or
simulations need the other.

``CryptoRandom.from_seed(text)`` keys the same stream from sha256(text): reproducible, so
*not* secret. Only for simulations and tests that configure a seed explicitly (the server's
``DETERMINISTIC_SEED``); nothing seeds it by default."""

from __future__ import annotations

import hashlib
import math
import secrets

import numpy as np

_KEY_BYTES = 32
_CHUNK_WORDS = 1 << 20  # keystream drawn 8 MiB at a time


class CryptoRandom:
    """Random arrays from AES-256-CTR under ``key`` (default: 32 bytes from the OS)."""

    def __init__(self, key: bytes | None = None) -> None:
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

        key = secrets.token_bytes(_KEY_BYTES) if key is None else bytes(key)
        if len(key) != _KEY_BYTES:
            raise ValueError(f"the key must be {_KEY_BYTES} bytes, got {len(key)}")
        self.seeded = False
        self._encryptor = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()

    @classmethod
    def from_seed(cls, seed: str) -> CryptoRandom:
        """A reproducible stream keyed by sha256(seed): for seeded simulations only."""
        rng = cls(hashlib.sha256(seed.encode()).digest())
        rng.seeded = True
        return rng

    def words(self, n: int) -> np.ndarray:
        """``n`` uniform uint64 words of keystream."""
        # The keystream is encrypted straight into the array (update_into wants room for
        # one block more than it writes): no intermediate bytes objects to copy.
        out = np.empty(n + 2, dtype="<u8")
        raw = out.view(np.uint8)
        zeros = memoryview(bytes(8 * min(_CHUNK_WORDS, n)))
        for start in range(0, n, _CHUNK_WORDS):
            count = min(_CHUNK_WORDS, n - start)
            self._encryptor.update_into(zeros[: 8 * count],
                                        raw[8 * start : 8 * (start + count + 2)])
        return out[:n].astype(np.uint64, copy=False)

    def random(self, size: int | tuple[int, ...] | None = None) -> np.ndarray | float:
        """Uniforms on the open interval (0, 1) (never 0: logs of them are finite)."""
        shape = () if size is None else size
        n = math.prod(shape) if isinstance(shape, tuple) else int(shape)
        words = self.words(n)
        words >>= np.uint64(11)
        u = words.astype(np.float64)
        u += 0.5
        u *= 2.0**-53
        return float(u[0]) if size is None else u.reshape(shape)

    def standard_normal(self, size: int | tuple[int, ...] | None = None
                        ) -> np.ndarray | float:
        """N(0, 1) samples by Box-Muller."""
        shape = () if size is None else size
        n = math.prod(shape) if isinstance(shape, tuple) else int(shape)
        half = (n + 1) // 2
        u = self.random(2 * half)
        radius = np.sqrt(-2.0 * np.log(u[:half]))
        angle = (2.0 * math.pi) * u[half:]
        z = np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:n]
        return float(z[0]) if size is None else z.reshape(shape)

    def normal(self, loc: float = 0.0, scale: float = 1.0,
               size: int | tuple[int, ...] | None = None) -> np.ndarray | float:
        return loc + scale * self.standard_normal(size)

    def geometric(self, p: float, size: int) -> np.ndarray:
        """Trials until the first success (support 1, 2, ...), by inverse CDF."""
        if not 0 < p <= 1:
            raise ValueError(f"p must be in (0, 1], got {p}")
        if p == 1:
            return np.ones(size, dtype=np.int64)
        return np.ceil(np.log(self.random(size)) / math.log1p(-p)).astype(np.int64)
