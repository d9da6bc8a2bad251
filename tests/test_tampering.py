"""The model tampering matrix, on the device, against the real sync server.

Every case: a device serves a good version G (installed by a normal sync); the server then
offers a version whose stored bundle blob (DATA_DIR/blobs, content-addressed) was tampered
with on disk after publishing, or (replay) an older validly signed version. The next
``DeviceClient.sync`` must refuse it with the SDK's documented code (``BundleError.code``,
reported as ``SyncReport.install_error = "<code>: <message>"``), keep serving G with the
same recommendations, and leave nothing behind. Where the blob was tampered, repairing it
lets the following sync install the offered version: a refused download is not remembered
as done.

The server does not re-hash a bundle blob when serving it (``send_file`` from disk), so all
of these reach the device, which is the check that matters. Runs on SQLite and PostgreSQL
(one server per backend for the module)."""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_sdk.bundle import ITEMS, MANIFEST, MODEL, SIGNATURE, WEIGHTS, load_bundle
from device_sdk.device_client import DeviceClient
from sync_server.registry import republish_weights
from tests.support.bundles import copy_bundle, zip_bundle
from tests.support.server import ADMIN, ServerProcess, signing_key_of


@dataclass
class Published:
    version: int
    blob: Path

    @property
    def zip(self) -> bytes:
        return self.blob.read_bytes()


class Registry:
    """The module's server, plus publishing distinct versions (shifted weights)."""

    def __init__(self, server: ServerProcess, bundle_dir: Path, scratch: Path) -> None:
        self.server, self.bundle_dir, self.scratch = server, bundle_dir, scratch
        self.key = signing_key_of(server)
        self.next_version = 1

    def publish(self) -> Published:
        v = self.next_version
        self.next_version += 1
        base = copy_bundle(self.bundle_dir, self.scratch / f"base{v}")
        weights = {k: w + np.float32(0.001 * v) for k, w in load_bundle(base).weights().items()}
        response = self.server.admin(
            "POST", "/v1/admin/models",
            body=zip_bundle(republish_weights(weights, base, v, {"note": f"v{v}"})),
            headers={"Content-Type": "application/zip"})
        assert response.status == 201, response.data
        digest = json.loads(response.data)["blob_sha256"]
        return Published(v, self.server.data_dir / "blobs" / digest[:2] / digest)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def registry(request, tiny_export, tmp_path_factory):
    settings = {}
    if request.param == "postgresql":
        settings["DATABASE_URL"] = request.getfixturevalue("postgres").create_database()
    root = tmp_path_factory.mktemp(f"tampering-{request.param}")
    with ServerProcess(root / "server", ADMIN_TOKEN=ADMIN, RATE_LIMIT=10_000,
                       **settings) as server:
        yield Registry(server, tiny_export.bundle_dir, root)


# -- the tampering, applied to a published version's stored zip ---------------------------


def members(data: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return {name: zf.read(name) for name in zf.namelist()}


def rezip(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name in sorted(files):
            zf.writestr(name, files[name])
    return buf.getvalue()


def flip(name: str) -> Callable[[bytes, bytes], bytes]:
    def tamper(offered: bytes, other: bytes) -> bytes:
        files = members(offered)
        data = bytearray(files[name])
        data[len(data) // 2] ^= 0x01  # one bit, mid-file
        return rezip({**files, name: bytes(data)})
    return tamper


def other_manifest_with_these_files(offered: bytes, other: bytes) -> bytes:
    o = members(other)
    return rezip({**members(offered), MANIFEST: o[MANIFEST], SIGNATURE: o[SIGNATURE]})


def this_manifest_with_other_files(offered: bytes, other: bytes) -> bytes:
    this = members(offered)
    return rezip({**members(other), MANIFEST: this[MANIFEST], SIGNATURE: this[SIGNATURE]})


def whole_other_version(offered: bytes, other: bytes) -> bytes:
    return other  # a validly signed, self-consistent older bundle under the newer name


def wrong_key(offered: bytes, other: bytes) -> bytes:
    files = members(offered)
    return rezip({**files, SIGNATURE: Ed25519PrivateKey.generate().sign(files[MANIFEST])})


def unsigned(offered: bytes, other: bytes) -> bytes:
    return rezip({k: v for k, v in members(offered).items() if k != SIGNATURE})


def extra_unlisted_file(offered: bytes, other: bytes) -> bytes:
    return rezip({**members(offered), "payload.sh": b"#!/bin/sh\necho pwned\n"})


def truncated_zip(offered: bytes, other: bytes) -> bytes:
    return offered[: len(offered) // 2]


def flipped_zip_byte(offered: bytes, other: bytes) -> bytes:
    data = bytearray(offered)
    data[len(data) // 3] ^= 0x01  # inside a compressed member: its CRC or inflate fails
    return bytes(data)


BLOB_CASES = {
    "flip-manifest.json": (flip(MANIFEST), "bundle_integrity"),
    "flip-manifest.sig": (flip(SIGNATURE), "bundle_integrity"),
    "flip-model.tflite": (flip(MODEL), "bundle_integrity"),
    "flip-weights.npz": (flip(WEIGHTS), "bundle_integrity"),
    "flip-items.json": (flip(ITEMS), "bundle_integrity"),
    "other-versions-signed-manifest": (other_manifest_with_these_files, "bundle_integrity"),
    "this-manifest-other-versions-files": (this_manifest_with_other_files, "bundle_integrity"),
    "whole-older-version-replayed": (whole_other_version, "bundle_integrity"),
    "wrong-signing-key": (wrong_key, "bundle_integrity"),
    "unsigned": (unsigned, "bundle_integrity"),
    "extra-unlisted-file": (extra_unlisted_file, "bundle_invalid"),
    "truncated-zip": (truncated_zip, "bundle_invalid"),
    "flipped-zip-byte": (flipped_zip_byte, "bundle_invalid"),
}


def _serving(device: DeviceClient) -> list[tuple[str, float]]:
    return [(r.item, round(r.score, 5)) for r in device.recommend(10)]


@pytest.fixture
def device_on_good_version(registry, tmp_path):
    """A device with a history, serving the newest good version G; yields (device, G)."""
    good = registry.publish()
    device = DeviceClient(tmp_path / "device", server_key=registry.key,
                          server_url=registry.server.url)
    try:
        report = device.sync(train=False)
        assert (report.installed, report.install_error) == (good.version, None)
        items = device.models.bundle(good.version).items().keys[3:9]
        device.log_many([(item, "view") for item in items])
        assert {r.source for r in device.recommend(10)} == {"model"}
        yield device, good
    finally:
        device.close()


def _assert_refused_and_serving(device, good, before, code):
    report = device.sync(train=False)
    assert report.installed is None
    assert report.install_error is not None and report.install_error.split(":")[0] == code, \
        report.install_error
    assert device.model_version == good.version == device.models.current_version
    assert _serving(device) == before  # the old model's own answers
    assert not any((device.models.root / "staging").iterdir())
    return report


@pytest.mark.parametrize("case", list(BLOB_CASES))
def test_a_tampered_blob_is_refused_and_the_old_model_serves(registry, device_on_good_version,
                                                             case):
    tamper, code = BLOB_CASES[case]
    device, good = device_on_good_version
    before = _serving(device)
    offered = registry.publish()
    original = offered.zip
    offered.blob.write_bytes(tamper(original, good.zip))
    _assert_refused_and_serving(device, good, before, code)
    _assert_refused_and_serving(device, good, before, code)  # fetched again, refused again
    offered.blob.write_bytes(original)  # the operator repairs the blob
    report = device.sync(train=False)
    assert (report.installed, report.install_error) == (offered.version, None)
    assert device.model_version == offered.version


def test_an_older_validly_signed_version_offered_again_is_refused(registry,
                                                                  device_on_good_version):
    """Replay: the operator pauses G, so the server offers the newest version below it,
    properly signed; the device refuses to go back (anti-rollback) before downloading."""
    device, good = device_on_good_version
    before = _serving(device)
    response = registry.server.admin("POST", f"/v1/admin/models/{good.version}/pause")
    assert response.status == 200
    try:
        _assert_refused_and_serving(device, good, before, "stale_version")
        # refused for good: the offer is remembered (ETag) and not downloaded again
        assert device.sync(train=False).install_error is None
        assert device.model_version == good.version
    finally:
        registry.server.admin("POST", f"/v1/admin/models/{good.version}/resume")
