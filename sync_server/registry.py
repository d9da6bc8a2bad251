"""The model registry: verify a bundle, sign its manifest, store it, record the version.

Admin uploads (``publish_bundle``) and round publishing (``sync_server.rounds``) both go
through ``sign_and_store``: whatever signature came with the bundle is discarded and the
server's own key signs the exact manifest bytes, so devices only ever need the server's
public key. ``republish_weights`` is the weights-only publisher.

Staged rollout: every version has ``rollout_percent``; ``serving_version`` picks, per device,
the newest non-paused version whose rollout includes it (``in_rollout``: a stable hash of
version and device id), else the newest fully rolled-out one. Devices refuse any version not
newer than one they hold (anti-rollback), so a rollback is never "serve the old version
again": ``rollback_version`` pauses the bad version and republishes its parent's exact files
under a NEW, higher version number."""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from device_sdk.bundle import (
    MANIFEST,
    SIGNATURE,
    WEIGHTS,
    Bundle,
    BundleError,
    encode_manifest,
    extract_bundle_zip,
    load_bundle,
    save_weights,
    write_bundle,
    zip_bundle_dir,
)
from sync_server.blobs import BlobStore
from sync_server.db import Database
from sync_server.errors import ApiError
from sync_server.keys import ServerKeyPairs
from sync_server.models import ModelVersion, as_utc


def version_json(
    row: ModelVersion, metrics: Mapping[str, Mapping[str, float]] | None = None
) -> dict[str, Any]:
    """What the admin API says about a version; ``metrics`` {source: {name: value}} as
    stored by ``sync_server.model_metrics`` (the caller looks them up)."""
    return {
        "model_version": row.version,
        "parent_version": row.parent_version,
        "status": row.status,
        "rollout_percent": row.rollout_percent,
        "blob_sha256": row.blob_sha256,
        "size": row.size,
        "created_at": as_utc(row.created_at).isoformat(),
        "metrics": {source: dict(values) for source, values in (metrics or {}).items()},
    }


def sign_and_store(staged: Path, *, blobs: BlobStore, keys: ServerKeyPairs,
                   check: Callable[[int], None] | None = None) -> ModelVersion:
    """Verify the bundle directory ``staged`` (integrity, no unlisted files), sign its exact
    manifest bytes with the server key (any signature present is discarded), store the flat
    zip as a blob. Returns the row, NOT yet added to a session: the caller inserts it in the
    transaction that makes it current (and checks the version is the newest). ``check(version)``
    runs before anything is stored and may refuse the bundle by raising."""
    try:
        (staged / SIGNATURE).unlink(missing_ok=True)
        bundle = load_bundle(staged, public_key=None)
    except BundleError as exc:
        raise ApiError("bad_bundle", f"{exc.code}: {exc}", 400) from None
    if check is not None:
        check(bundle.version)
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
        rollout_percent=100,
    )


def highest_version(session: Session) -> int | None:
    return session.scalar(select(func.max(ModelVersion.version)))


def rollout_percent(value: Any) -> int:
    """An admin's rollout percentage: an integer 0-100, else 400 ``bad_rollout``."""
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if type(value) is not int or not 0 <= value <= 100:
        raise ApiError("bad_rollout", f"percent must be an integer 0-100, got {value!r}", 400)
    return value


def in_rollout(version: int, device_id: str, percent: int) -> bool:
    """Whether ``device_id`` is in version ``version``'s rollout of ``percent`` %: the first 32
    bits of sha256("<version>:<device_id>") mod 100 below the percentage. Stable per device
    (raising the percentage only adds devices) and independent across versions."""
    if percent >= 100:
        return True
    bucket = int(hashlib.sha256(f"{version}:{device_id}".encode()).hexdigest()[:8], 16) % 100
    return bucket < percent


def serving_version(session: Session, device_id: str) -> ModelVersion | None:
    """The version ``device_id`` is offered: the newest non-paused version whose rollout
    includes it; a fully rolled-out (100 %) version includes every device, so this falls back
    to the newest of those."""
    rows = session.scalars(select(ModelVersion).where(ModelVersion.status == "published")
                           .order_by(ModelVersion.version.desc()))
    for row in rows:
        if in_rollout(row.version, device_id, row.rollout_percent):
            return row
    return None


def newest_full_version(session: Session) -> int | None:
    """The newest non-paused, fully rolled-out version: what rounds train by default."""
    return session.scalar(select(func.max(ModelVersion.version)).where(
        ModelVersion.status == "published", ModelVersion.rollout_percent >= 100))


def _existing(session: Session, version: int) -> ModelVersion:
    row = session.get(ModelVersion, version)
    if row is None:
        raise ApiError("not_found", f"no model version {version}", 404)
    return row


def set_rollout(db: Database, version: int, *, percent: int | None = None,
                status: str | None = None) -> ModelVersion:
    """Change a version's rollout percentage and/or status (published|paused)."""
    values: dict[str, Any] = {}
    if percent is not None:
        values["rollout_percent"] = rollout_percent(percent)
    if status is not None:
        values["status"] = status
    with db.transaction() as session:
        _existing(session, version)
        session.execute(update(ModelVersion).where(ModelVersion.version == version)
                        .values(**values))
    with db.session() as session:
        return _existing(session, version)


def rollback_version(
    version: int, *, db: Database, blobs: BlobStore, keys: ServerKeyPairs, scratch_dir: str | Path,
) -> tuple[ModelVersion, ModelVersion]:
    """Pause ``version`` and republish its parent's exact files (weights, tflite, items) as a
    new version above every other one, 100 % rolled out, with ``parent_version`` = the bad
    version and ``provenance.rollback_of``. Devices that installed the bad version accept it
    (it is newer); serving the parent's old version number again would be refused by them
    (anti-rollback). Returns (paused row, new row)."""
    with db.session() as session:
        bad = _existing(session, version)
        parent = None if bad.parent_version is None else session.get(ModelVersion,
                                                                     bad.parent_version)
    if parent is None:
        raise ApiError("no_parent", f"version {version} has no stored parent version to roll "
                       "back to", 409)
    Path(scratch_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
    staged = Path(tempfile.mkdtemp(dir=scratch_dir))
    try:
        data = blobs.get(parent.blob_sha256)
        extract_bundle_zip(data, staged, max(len(data), 1) * 1000)
        manifest = json.loads((staged / MANIFEST).read_bytes())
        with db.session() as session:
            new_version = (highest_version(session) or 0) + 1
        manifest.update(
            model_version=new_version,
            parent_version=version,
            provenance={**(manifest.get("provenance") or {}), "rollback_of": version,
                        "weights_of": parent.version},
            created=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        (staged / MANIFEST).write_bytes(encode_manifest(manifest))
        row = sign_and_store(staged, blobs=blobs, keys=keys)
        row.rollout_percent = 100
        try:
            with db.transaction() as session:
                session.execute(update(ModelVersion).where(ModelVersion.version == version)
                                .values(status="paused"))
                session.add(row)
        except IntegrityError:
            discard_unreferenced(db, blobs, row.blob_sha256)  # another rollback/publish won
            raise ApiError("version_not_newer", f"version {new_version} was published "
                           "concurrently; retry the rollback", 409) from None
        except BaseException:
            discard_unreferenced(db, blobs, row.blob_sha256)
            raise
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    with db.session() as session:
        return _existing(session, version), _existing(session, new_version)


def publish_bundle(
    zip_bytes: bytes,
    *,
    db: Database,
    blobs: BlobStore,
    keys: ServerKeyPairs,
    scratch_dir: str | Path,
    max_bytes: int,
    percent: int = 100,
) -> ModelVersion:
    """Verify a bundle zip (integrity, no unlisted files, a version above every published
    one), sign it and publish it to ``percent`` % of devices (staged rollout). Raises
    ApiError with a stable code."""
    percent = rollout_percent(percent)
    Path(scratch_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
    staged = Path(tempfile.mkdtemp(dir=scratch_dir))
    try:
        try:
            extract_bundle_zip(zip_bytes, staged, max_bytes)
        except BundleError as exc:
            raise ApiError("bad_bundle", f"{exc.code}: {exc}", 400) from None
        def newer(version: int) -> None:  # before the blob is stored: a refusal stores nothing
            with db.session() as session:
                highest = highest_version(session)
            if highest is not None and version <= highest:
                raise ApiError("version_not_newer", f"bundle is version {version}; versions "
                               f"up to {highest} exist (devices refuse older ones)", 409)

        row = sign_and_store(staged, blobs=blobs, keys=keys, check=newer)
        row.rollout_percent = percent
        try:
            with db.transaction() as session:
                session.add(row)
        except IntegrityError:
            discard_unreferenced(db, blobs, row.blob_sha256)  # the other publish won
            raise ApiError("version_not_newer", f"version {row.version} was published "
                           "concurrently", 409) from None
        except BaseException:
            discard_unreferenced(db, blobs, row.blob_sha256)
            raise
        return row
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def discard_unreferenced(db: Database, blobs: BlobStore, digest: str) -> None:
    """Delete a bundle blob written for a version that was then refused, unless some stored
    version has the very same bytes."""
    with db.session() as session:
        if session.scalar(select(ModelVersion.version).where(
                ModelVersion.blob_sha256 == digest)) is None:
            blobs.delete(digest)


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
