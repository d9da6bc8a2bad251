"""Content-addressed blob store on disk: ``root/ab/abcdef...`` named by sha256 of the bytes.

Writes are atomic (temporary file, fsync, rename), so a crash never leaves a partial blob
under a valid name; storing the same bytes twice is a no-op. The database references blobs
by hash."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from device_sdk.files import atomic_write

_SHA256 = re.compile(r"[0-9a-f]{64}")


class BlobStore:
    """Immutable blobs by sha256 hex digest."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)

    def path(self, digest: str) -> Path:
        if not _SHA256.fullmatch(digest):
            raise ValueError(f"not a sha256 hex digest: {digest!r}")
        return self.root / digest[:2] / digest

    def put(self, data: bytes) -> str:
        """Store ``data``; returns its sha256 hex digest."""
        digest = hashlib.sha256(data).hexdigest()
        path = self.path(digest)
        if not path.exists():
            path.parent.mkdir(exist_ok=True, mode=0o700)
            atomic_write(path, data, mode=0o600)
        return digest

    def get(self, digest: str) -> bytes:
        """The blob's bytes, checked against its name (disk corruption is refused)."""
        data = self.path(digest).read_bytes()
        if hashlib.sha256(data).hexdigest() != digest:
            raise OSError(f"blob {digest} is corrupt on disk")
        return data

    def delete(self, digest: str) -> None:
        """Remove a blob (absent is fine). Only for blobs one owner references: update
        payloads, whose bytes name their round and so are never shared."""
        self.path(digest).unlink(missing_ok=True)

    def exists(self, digest: str) -> bool:
        return self.path(digest).is_file()
