"""The model bundle: one published model version as a directory of files.

    manifest.json   what this version is (see docs/ARCHITECTURE.md), with sha256 + size of
                    every other file and a golden check
    manifest.sig    Ed25519 signature over the exact manifest bytes (once signing is on)
    model.tflite    serving graph: history int32[1, L] -> ids int32[1, K], scores f32[1, K]
    weights.npz     float trainable tensors (numpy-readable, never pickled) for local training
    items.json      item vocabulary and popularity fallback

Readers verify before they trust: manifest schema, signature (when a key is pinned), every
file's size and sha256, no file the manifest does not list, the vocabulary digest;
``run_golden_check`` then proves the local runtime computes what the publisher's did."""

from __future__ import annotations

import hashlib
import io
import json
import lzma
import re
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from device_sdk.item_vocab import ItemVocab
from device_sdk.topk_model import TopKModel

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
MODEL = "model.tflite"
WEIGHTS = "weights.npz"
ITEMS = "items.json"
REQUIRED_FILES = (MODEL, WEIGHTS, ITEMS)
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_REQUIRED_KEYS = {
    "format_version": int,
    "model_version": int,
    "architecture": dict,
    "items_digest": str,
    "files": dict,
    "golden": dict,
    "privacy": dict,
    "provenance": dict,
    "created": str,
}


class BundleError(Exception):
    """A bundle is malformed, tampered with, or fails its golden check; ``code`` is stable."""

    code = "bundle_invalid"


class BundleIntegrityError(BundleError):
    code = "bundle_integrity"


class GoldenCheckError(BundleError):
    code = "golden_check_failed"


def file_entry(data: bytes) -> dict[str, Any]:
    return {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


def encode_manifest(manifest: dict[str, Any]) -> bytes:
    """Canonical bytes (sorted keys), so the same manifest always signs the same."""
    return json.dumps(manifest, sort_keys=True, indent=2).encode("utf-8") + b"\n"


def save_weights(params: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v, dtype=np.float32) for k, v in params.items()})
    return buf.getvalue()


# What the stdlib zip reader (and np.load, which reads .npz through it) raises on corrupt
# input besides BadZipFile: truncated or garbled members, bad seeks, unknown or encrypted
# compression, broken deflate / bzip2 / lzma streams.
_ZIP_ERRORS = (zipfile.BadZipFile, OSError, EOFError, ValueError, RuntimeError, zlib.error,
               lzma.LZMAError)


def load_weights(data: bytes) -> dict[str, np.ndarray]:
    """The float tensors of a weights.npz; anything else (never unpickled) is BundleError."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            weights = {k: npz[k] for k in npz.files}
    except (*_ZIP_ERRORS, KeyError, TypeError, SyntaxError, MemoryError) as exc:
        raise BundleError(f"{WEIGHTS} is not a readable npz of arrays: {exc}") from None
    bad = sorted(k for k, v in weights.items() if v.dtype.kind != "f")
    if bad:
        raise BundleError(f"{WEIGHTS} holds non-float arrays {bad[:5]}")
    return weights


def write_bundle(
    directory: str | Path,
    files: dict[str, bytes],
    manifest: dict[str, Any],
    signer: Callable[[bytes], bytes] | None = None,
) -> Path:
    """Write ``files`` and a manifest listing them; ``signer`` (manifest bytes -> signature)
    is the seam where the sync server's Ed25519 key plugs in."""
    missing = [n for n in REQUIRED_FILES if n not in files]
    if missing:
        raise BundleError(f"bundle lacks file(s) {missing}")
    for name in files:
        check_file_name(name)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    manifest = {
        **manifest,
        "format_version": FORMAT_VERSION,
        "files": {n: file_entry(d) for n, d in sorted(files.items())},
    }
    _check_manifest(manifest)
    for name, data in files.items():
        (directory / name).write_bytes(data)
    raw = encode_manifest(manifest)
    (directory / MANIFEST).write_bytes(raw)
    if signer is not None:
        (directory / SIGNATURE).write_bytes(signer(raw))
    return directory


@dataclass
class Bundle:
    directory: Path
    manifest: dict[str, Any]
    manifest_bytes: bytes
    signature: bytes | None

    @property
    def version(self) -> int:
        return int(self.manifest["model_version"])

    @property
    def architecture(self) -> str:
        return str(self.manifest["architecture"]["name"])

    @property
    def config(self) -> dict[str, Any]:
        return dict(self.manifest["architecture"]["config"])

    def read(self, name: str) -> bytes:
        """A listed file's bytes, verified against the manifest again (files can change)."""
        entry = self.manifest["files"].get(name)
        if entry is None:
            raise BundleError(f"bundle has no file {name!r}")
        data = (self.directory / name).read_bytes()
        if file_entry(data) != {"sha256": entry["sha256"], "size": entry["size"]}:
            raise BundleIntegrityError(f"{name} does not match its manifest entry")
        return data

    def weights(self) -> dict[str, np.ndarray]:
        return load_weights(self.read(WEIGHTS))

    def items(self) -> ItemVocab:
        try:
            return ItemVocab.from_json(self.read(ITEMS))
        except ValueError as exc:
            raise BundleError(str(exc)) from None

    def model(self, num_threads: int = 1) -> TopKModel:
        return TopKModel(self.read(MODEL), num_threads=num_threads)


def load_bundle(directory: str | Path, public_key: bytes | None = None) -> Bundle:
    """Open and verify a bundle. With ``public_key`` (raw 32-byte Ed25519) the signature is
    required and checked; without it only integrity is (trainer and tests)."""
    directory = Path(directory)
    try:
        raw = (directory / MANIFEST).read_bytes()
    except FileNotFoundError:
        raise BundleError(f"no {MANIFEST} in {directory}") from None
    sig_path = directory / SIGNATURE
    signature = sig_path.read_bytes() if sig_path.exists() else None
    if public_key is not None:
        verify_signature(raw, signature, public_key)
    try:
        manifest = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise BundleError(f"{MANIFEST} is not JSON: {exc}") from None
    _check_manifest(manifest)
    bundle = Bundle(directory, manifest, raw, signature)
    unlisted = sorted(
        {p.name for p in directory.iterdir()} - set(manifest["files"]) - {MANIFEST, SIGNATURE}
    )
    if unlisted:
        raise BundleError(f"bundle has files the manifest does not list: {unlisted}")
    for name in manifest["files"]:
        if not (directory / name).is_file():
            raise BundleIntegrityError(f"bundle file {name} is missing")
        bundle.read(name)
    if bundle.items().digest() != manifest["items_digest"]:
        raise BundleIntegrityError("items.json does not match the manifest's items_digest")
    return bundle


def verify_signature(manifest_bytes: bytes, signature: bytes | None, public_key: bytes) -> None:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    if signature is None:
        raise BundleIntegrityError(f"bundle is unsigned ({SIGNATURE} missing)")
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, manifest_bytes)
    except (InvalidSignature, ValueError):
        raise BundleIntegrityError(
            "manifest signature does not verify with the pinned key"
        ) from None


def check_file_name(name: str) -> None:
    """Refuse anything but a plain listed file name: no paths, no manifest or signature."""
    if not _SAFE_NAME.match(name) or name in (MANIFEST, SIGNATURE):
        raise BundleError(f"bad bundle file name {name!r}")


def check_member_name(name: str) -> None:
    """Refuse anything but a name a bundle directory may hold (manifest and signature too)."""
    if name not in (MANIFEST, SIGNATURE):
        check_file_name(name)


def extract_bundle_zip(data: bytes, dest: str | Path, max_bytes: int) -> None:
    """Unpack a bundle zip (flat, plain member names) into the existing directory ``dest``,
    refusing archives over ``max_bytes`` packed or unpacked. Verification is load_bundle's."""
    dest = Path(dest)
    if len(data) > max_bytes:
        raise BundleError(f"bundle archive is {len(data)} bytes (limit {max_bytes})")
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except _ZIP_ERRORS as exc:
        raise BundleError(f"bundle archive is not a zip file: {exc}") from None
    with archive:
        members = archive.infolist()
        names = [m.filename for m in members]
        if len(set(names)) != len(names):
            raise BundleError("bundle archive lists a file twice")
        total = 0
        for member in members:
            check_member_name(member.filename)
            total += member.file_size
            if total > max_bytes:
                raise BundleError("bundle archive unpacks beyond the size limit")
            # read() checks the CRC; a lying file_size cannot make us write more than the
            # limit because we read at most limit + 1 bytes.
            try:
                with archive.open(member) as src:
                    content = src.read(max_bytes + 1)
            except _ZIP_ERRORS as exc:
                raise BundleError(f"bundle member {member.filename} is corrupt: {exc}") from None
            if len(content) != member.file_size:
                raise BundleError(f"bundle member {member.filename} has a wrong size")
            (dest / member.filename).write_bytes(content)


def zip_bundle_dir(directory: str | Path) -> bytes:
    """A bundle directory as the flat zip the /v1 bundle download serves (sorted members)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(p for p in Path(directory).iterdir() if p.is_file()):
            zf.writestr(f.name, f.read_bytes())
    return buf.getvalue()


def _check_manifest(manifest: Any) -> None:
    if not isinstance(manifest, dict):
        raise BundleError("manifest must be a JSON object")
    for key, kind in _REQUIRED_KEYS.items():
        if not isinstance(manifest.get(key), kind):
            raise BundleError(f"manifest field {key!r} is missing or not a {kind.__name__}")
    if manifest["format_version"] != FORMAT_VERSION:
        raise BundleError(
            f"bundle format {manifest['format_version']} is not supported (this SDK reads "
            f"{FORMAT_VERSION})"
        )
    for name, entry in manifest["files"].items():
        check_file_name(name)
        if not isinstance(entry, dict) or not {"sha256", "size"} <= set(entry):
            raise BundleError(f"manifest entry for {name} lacks sha256/size")
    missing = [n for n in REQUIRED_FILES if n not in manifest["files"]]
    if missing:
        raise BundleError(f"manifest lists no {missing}")
    arch = manifest["architecture"]
    if not isinstance(arch.get("name"), str) or not isinstance(arch.get("config"), dict):
        raise BundleError("manifest architecture needs a name and a config object")


def make_golden(
    model: TopKModel, histories: np.ndarray, k: int = 10, min_overlap: float = 0.8
) -> dict[str, Any]:
    """Record what ``model`` answers for ``histories`` [G, L]: the golden check's expectation.

    The check compares top-k *sets* and *sorted* scores, so a runtime whose kernels reorder
    near-ties still passes, while one that computes garbage does not."""
    ids, scores = model.topk_many(histories)
    spread = float(np.abs(scores[:, :k]).max()) if scores.size else 1.0
    return {
        "histories": histories.astype(int).tolist(),
        "ids": ids[:, :k].astype(int).tolist(),
        "scores": scores[:, :k].astype(float).tolist(),
        "k": k,
        "min_overlap": min_overlap,
        "score_tolerance": max(0.01 * spread, 1e-4),
    }


def run_golden_check(model: TopKModel, golden: dict[str, Any]) -> float:
    """Raise GoldenCheckError unless ``model`` reproduces the golden answers; returns the
    worst top-k overlap seen."""
    try:
        histories = np.asarray(golden["histories"], dtype=np.int32)
        expected_ids = np.asarray(golden["ids"], dtype=np.int64)
        expected_scores = np.asarray(golden["scores"], dtype=np.float32)
        k, min_overlap = int(golden["k"]), float(golden["min_overlap"])
        tolerance = float(golden["score_tolerance"])
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise GoldenCheckError(f"golden check record is malformed: {exc}") from None
    if (
        histories.ndim != 2
        or histories.shape[1] != model.max_len
        or not 1 <= k <= model.k
        or expected_ids.shape != (len(histories), k)
        or expected_scores.shape != (len(histories), k)
    ):
        raise GoldenCheckError(
            f"golden histories {histories.shape}, ids {expected_ids.shape}, scores "
            f"{expected_scores.shape}, k={k} do not fit the model (L={model.max_len}, "
            f"K={model.k})"
        )
    try:
        ids, scores = model.topk_many(histories)
    except (ValueError, RuntimeError) as exc:  # e.g. an id outside the embedding table
        raise GoldenCheckError(f"the model cannot run the golden histories: {exc}") from None
    worst = 1.0
    for row in range(len(histories)):
        overlap = len(np.intersect1d(ids[row, :k], expected_ids[row])) / k
        worst = min(worst, overlap)
        gap = np.abs(np.sort(scores[row, :k]) - np.sort(expected_scores[row])).max()
        if overlap < min_overlap or gap > tolerance:
            raise GoldenCheckError(
                f"golden check failed on history {row}: top-{k} overlap {overlap:.2f} "
                f"(need {min_overlap}), score gap {gap:.4g} (allowed {tolerance:.4g})"
            )
    return worst
