"""The model registry: verify a bundle, sign its manifest, store it, record the version.

Admin uploads (``publish_bundle``) and round publishing (``sync_server.rounds``) both go
through ``sign_and_store``: whatever signature came with the bundle is discarded and the
server's own key signs the exact manifest bytes, so devices only ever need the server's
public key. ``republish_weights`` is the weights-only publisher."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from device_sdk.bundle import (
    MANIFEST,
    SIGNATURE,
    WEIGHTS,
    Bundle,
    BundleError,
    extract_bundle_zip,
    load_bundle,
    save_weights,
    write_bundle,
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


def sign_and_store(staged: Path, *, blobs: BlobStore, keys: ServerKeys) -> ModelVersion:
    """Verify the bundle directory ``staged`` (integrity, no unlisted files), sign its exact
    manifest bytes with the server key (any signature present is discarded), store the flat
    zip as a blob. Returns the row, NOT yet added to a session: the caller inserts it in the
    transaction that makes it current (and checks the version is the newest)."""
    try:
        (staged / SIGNATURE).unlink(missing_ok=True)
        bundle = load_bundle(staged, public_key=None)
    except BundleError as exc:
        raise ApiError("bad_bundle", f"{exc.code}: {exc}", 400) from None
    unlisted = sorted({p.name for p in staged.iterdir()} - set(bundle.manifest["files"])
                      - {MANIFEST})
    if unlisted:
        raise ApiError("bad_bundle", f"files the manifest does not list: {unlisted}", 400)
    signature = keys.sign(bundle.manifest_bytes)
    (staged / SIGNATURE).write_bytes(signature)
    served = zip_bundle_dir(staged)
    digest = blobs.put(served)
    parent = bundle.manifest.get("parent_version")
    return ModelVersion(
        version=bundle.version,
        parent_version=parent if type(parent) is int else None,
        manifest=bundle.manifest_bytes,
        signature=signature,
        blob_sha256=digest,
        size=len(served),
        status="published",
    )


def highest_version(session: Session) -> int | None:
    return session.scalar(select(func.max(ModelVersion.version)))


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
        except BundleError as exc:
            raise ApiError("bad_bundle", f"{exc.code}: {exc}", 400) from None
        row = sign_and_store(staged, blobs=blobs, keys=keys)
        with db.session() as session:
            highest = highest_version(session)
        if highest is not None and row.version <= highest:
            raise ApiError("version_not_newer", f"bundle is version {row.version}; "
                           f"versions up to {highest} exist (devices refuse older ones)", 409)
        try:
            with db.transaction() as session:
                session.add(row)
        except IntegrityError:
            raise ApiError("version_not_newer", f"version {row.version} was published "
                           "concurrently", 409) from None
        return row
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def extract_version(zip_bytes: bytes, dest: str | Path) -> Bundle:
    """Unpack a stored (server-produced, trusted) bundle zip into ``dest`` and open it."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    extract_bundle_zip(zip_bytes, dest, max(len(zip_bytes), 1) * 1000)
    return load_bundle(dest)


def republish_weights(
    weights: Mapping[str, np.ndarray], base_bundle_dir: Path, version: int,
    provenance: Mapping[str, Any],
) -> Path:
    """A publisher (see ``sync_server.rounds``): weights-only publish. Copies the base bundle
    and replaces only ``weights.npz``: the served tflite is unchanged. For tests and for
    rounds that only train device-side parameters; ``trainer.publish:export_weights`` re-runs
    the real export. Returns a new, unsigned bundle directory beside ``base_bundle_dir``."""
    base = load_bundle(base_bundle_dir)
    files = {name: base.read(name) for name in base.manifest["files"]}
    files[WEIGHTS] = save_weights({**base.weights(), **weights})
    manifest = {k: v for k, v in base.manifest.items() if k not in ("files", "format_version")}
    manifest.update(
        model_version=version,
        parent_version=base.version,
        provenance={**manifest.get("provenance", {}), **provenance},
        created=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    out = Path(tempfile.mkdtemp(prefix=f"publish-v{version}-", dir=base_bundle_dir.parent))
    return write_bundle(out / "bundle", files, manifest)
