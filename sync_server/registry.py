"""The model registry: verify a bundle, sign its manifest, store it, record the version.

Admin uploads and (later) round publishing both go through ``publish_bundle``: whatever
signature came with the bundle is discarded and the server's own key signs the exact
manifest bytes, so devices only ever need the server's public key."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from device_sdk.bundle import (
    MANIFEST,
    SIGNATURE,
    BundleError,
    extract_bundle_zip,
    load_bundle,
    zip_bundle_dir,
)
from sync_server.blobs import BlobStore
from sync_server.db import Database
from sync_server.errors import ApiError
from sync_server.keys import ServerKeys
from sync_server.models import ModelVersion


def version_json(row: ModelVersion) -> dict[str, Any]:
    """What the admin API says about a version."""
    return {
        "model_version": row.version,
        "parent_version": row.parent_version,
        "status": row.status,
        "blob_sha256": row.blob_sha256,
        "size": row.size,
        "created_at": row.created_at.isoformat(),
    }


def publish_bundle(
    zip_bytes: bytes,
    *,
    db: Database,
    blobs: BlobStore,
    keys: ServerKeys,
    scratch_dir: str | Path,
    max_bytes: int,
) -> ModelVersion:
    """Verify a bundle zip (integrity, no unlisted files, a version above every published
    one), sign it and make it the current version. Raises ApiError with a stable code."""
    Path(scratch_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
    staged = Path(tempfile.mkdtemp(dir=scratch_dir))
    try:
        try:
            extract_bundle_zip(zip_bytes, staged, max_bytes)
            (staged / SIGNATURE).unlink(missing_ok=True)
            bundle = load_bundle(staged, public_key=None)
        except BundleError as exc:
            raise ApiError("bad_bundle", f"{exc.code}: {exc}", 400) from None
        unlisted = sorted({p.name for p in staged.iterdir()} - set(bundle.manifest["files"])
                          - {MANIFEST})
        if unlisted:
            raise ApiError("bad_bundle", f"files the manifest does not list: {unlisted}", 400)
        with db.session() as session:
            highest = session.scalar(select(func.max(ModelVersion.version)))
        if highest is not None and bundle.version <= highest:
            raise ApiError("version_not_newer", f"bundle is version {bundle.version}; "
                           f"versions up to {highest} exist (devices refuse older ones)", 409)
        signature = keys.sign(bundle.manifest_bytes)
        (staged / SIGNATURE).write_bytes(signature)
        served = zip_bundle_dir(staged)
        digest = blobs.put(served)
        parent = bundle.manifest.get("parent_version")
        row = ModelVersion(
            version=bundle.version,
            parent_version=parent if type(parent) is int else None,
            manifest=bundle.manifest_bytes,
            signature=signature,
            blob_sha256=digest,
            size=len(served),
            status="published",
        )
        try:
            with db.transaction() as session:
                session.add(row)
        except IntegrityError:
            raise ApiError("version_not_newer", f"version {bundle.version} was published "
                           "concurrently", 409) from None
        return row
    finally:
        shutil.rmtree(staged, ignore_errors=True)
