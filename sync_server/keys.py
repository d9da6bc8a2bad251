"""The server's long-term keys, generated on first start under ``DATA_DIR/keys`` (0600):

    signing.key    Ed25519: signs manifests and endorses the transport key; devices pin
                   its public half at provisioning
    transport.key  X25519: devices seal their updates to it (raw 32 bytes, like the other)

Rotation of the transport key (keeping old ones until open rounds' deadlines pass) comes
with the rounds work."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from device_sdk.files import load_or_create_ed25519, load_or_create_private_bytes
from device_sdk.protocol import b64, transport_key_message


def _new_x25519() -> bytes:
    return X25519PrivateKey.generate().private_bytes(
        Encoding.Raw, PrivateFormat.Raw, NoEncryption()
    )


class ServerKeyPairs:
    """The signing and transport key pairs of one server."""

    def __init__(self, signing: Ed25519PrivateKey, transport: X25519PrivateKey) -> None:
        self.signing = signing
        self.transport = transport
        self.signing_public = signing.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.transport_public = transport.public_key().public_bytes(
            Encoding.Raw, PublicFormat.Raw
        )
        self._endorsement = signing.sign(transport_key_message(self.transport_public))

    @classmethod
    def load_or_create(cls, directory: str | Path) -> ServerKeyPairs:
        """The keys in ``directory``, created (atomically, mode 0600) when missing."""
        directory = Path(directory)
        signing = load_or_create_ed25519(directory / "signing.key", "server signing key")
        transport_raw = load_or_create_private_bytes(
            directory / "transport.key", _new_x25519, "server transport key"
        )
        return cls(signing, X25519PrivateKey.from_private_bytes(transport_raw))

    def sign(self, data: bytes) -> bytes:
        """Ed25519 signature of ``data`` (e.g. exact manifest bytes)."""
        return self.signing.sign(data)

    def public_json(self) -> dict[str, Any]:
        """The GET /v1/server-keys answer: base64 raw public keys and the endorsement."""
        return {
            "signing_key": b64(self.signing_public),
            "transport_key": b64(self.transport_public),
            "transport_key_sig": b64(self._endorsement),
        }
