"""The device's long-term Ed25519 identity: generated once, kept in a private key file.

The key file holds the raw 32-byte private key, mode 0600 (``files.load_or_create_ed25519``:
created atomically, never overwritten, refused when other users could read it)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from device_sdk.files import load_or_create_ed25519
from device_sdk.protocol import device_id_for, sign_headers

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey


class DeviceIdentity:
    """An Ed25519 key pair and the device id derived from it; signs requests."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        self._private_key = private_key
        self._public_key_raw = private_key.public_key().public_bytes(
            Encoding.Raw, PublicFormat.Raw
        )
        self._device_id = device_id_for(self._public_key_raw)

    @classmethod
    def load_or_create(cls, path: str | Path) -> DeviceIdentity:
        """Load the key at ``path``, generating and storing one on first run."""
        return cls(load_or_create_ed25519(path, "device key"))

    @property
    def device_id(self) -> str:
        return self._device_id

    @property
    def public_key_raw(self) -> bytes:
        return self._public_key_raw

    def sign(self, data: bytes) -> bytes:
        return self._private_key.sign(data)

    def headers(
        self, method: str, path: str, body: bytes, now: float | None = None
    ) -> dict[str, str]:
        """Signature headers for one request (fresh nonce each call)."""
        return sign_headers(self._private_key, self._device_id, method, path, body, now=now)

