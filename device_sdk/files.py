"""Crash-safe file writes and private key files, shared by the model store, the outbox,
the device identity and the publisher's signing key."""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

_KEY_BYTES = 32


def fsync_dir(directory: str | Path) -> None:
    """A rename or link is durable only once the directory entry itself is on disk."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(directory: str | Path) -> None:
    """Flush every file directly in ``directory``, then the directory itself."""
    for f in Path(directory).iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    fsync_dir(directory)


def write_temp(path: Path, data: bytes, mode: int) -> Path:
    """Write ``data`` to a new, fsynced temporary file beside ``path``, created with
    ``mode`` from the start (no window in which it is world-readable)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def atomic_write(path: str | Path, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` so a crash leaves either the old or the new file."""
    path = Path(path)
    tmp = write_temp(path, data, mode)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def load_or_create_private_bytes(
    path: str | Path, generate: Callable[[], bytes], what: str = "key"
) -> bytes:
    """The raw 32-byte private key in ``path`` (mode 0600), created by ``generate`` on first
    use.

    Created atomically and never overwritten: two processes starting at once end up with
    the same key. A file other users could read or replace is refused, not trusted."""
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = write_temp(path, generate(), 0o600)
        try:
            # link, unlike rename, fails if the file appeared meanwhile: then the other
            # process's key wins and both load the same key below.
            os.link(tmp, path)
            fsync_dir(path.parent)
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    return _read_private_file(path, what)


def load_or_create_ed25519(path: str | Path, what: str = "key") -> Ed25519PrivateKey:
    """The Ed25519 private key in ``path`` (raw 32 bytes, mode 0600), generated on first use
    (see ``load_or_create_private_bytes``)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

    def generate() -> bytes:
        return Ed25519PrivateKey.generate().private_bytes(
            Encoding.Raw, PrivateFormat.Raw, NoEncryption()
        )

    raw = load_or_create_private_bytes(path, generate, what)
    return Ed25519PrivateKey.from_private_bytes(raw)


def _read_private_file(path: Path, what: str) -> bytes:
    # O_NOFOLLOW: a symlink planted in place of the key file is refused, not followed.
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    try:
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
        if os.name == "posix" and mode & 0o077:
            raise PermissionError(
                f"{what} file {path} is accessible by group/others (mode {mode:o}); "
                f"refusing to use it. Fix with: chmod 600 {path}"
            )
        with os.fdopen(fd, "rb", closefd=False) as f:
            raw = f.read(_KEY_BYTES + 1)
    finally:
        os.close(fd)
    if len(raw) != _KEY_BYTES:
        raise ValueError(f"{what} file {path} is not a raw 32-byte private key")
    return raw
