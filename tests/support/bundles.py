"""Model bundles in tests: zip, copy, re-sign with changed manifest fields, a key's raw bytes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from device_sdk.bundle import MANIFEST, SIGNATURE, encode_manifest
from device_sdk.bundle import zip_bundle_dir as zip_bundle

__all__ = ["copy_bundle", "public_raw", "resign_bundle", "zip_bundle"]


def copy_bundle(src: Path, dst: Path) -> Path:
    """A copy of bundle directory ``src`` at ``dst`` (created; must not exist)."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def public_raw(private_key: Ed25519PrivateKey) -> bytes:
    """The raw 32-byte public half of an Ed25519 key (what a device pins)."""
    return private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def resign_bundle(src: Path, dst: Path, key: Ed25519PrivateKey, **manifest_changes: Any) -> Path:
    """A copy of bundle ``src`` with manifest fields replaced, signed by ``key``."""
    copy_bundle(src, dst)
    manifest = {**json.loads((dst / MANIFEST).read_bytes()), **manifest_changes}
    raw = encode_manifest(manifest)
    (dst / MANIFEST).write_bytes(raw)
    (dst / SIGNATURE).write_bytes(key.sign(raw))
    return dst
