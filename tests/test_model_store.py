"""ModelStore: signed installs from bytes and paths, anti-rollback, hostile archives, atomic
switch, automatic rollback, and a process killed mid-install — real bundles, real LiteRT,
real files. The tampering matrix (flipped bytes, swapped manifests, keys) is test_tampering."""

import io
import json
import signal
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from device_sdk.bundle import MODEL, BundleError, GoldenCheckError
from device_sdk.model_store import INSTALL_STEPS, ModelStore, StaleVersionError
from tests.support.bundles import public_raw, resign_bundle, zip_bundle
from tests.support.paths import REPO, SUPPORT


@pytest.fixture
def store(tmp_path, server_key):
    return ModelStore(tmp_path / "models", public_raw(server_key))


def _snapshot(store):
    return (store.root / "state.json").read_bytes(), sorted(
        p.name for p in (store.root / "versions").iterdir()
    )


def test_install_from_directory_then_zip_bytes_then_zip_file(store, signed_bundles, tmp_path):
    assert store.current_version is None and store.open_recommender() is None
    first = store.install(signed_bundles[1])
    assert (first.version, first.previous) == (1, None) and first.golden_overlap >= 0.8
    second = store.install(zip_bundle(signed_bundles[2]))
    assert (second.version, second.previous) == (2, 1)
    archive = tmp_path / "v3.zip"
    archive.write_bytes(zip_bundle(signed_bundles[3]))
    store.install(archive)
    assert (store.current_version, store.previous_version, store.highest_version) == (3, 2, 3)
    assert store.open_recommender().version == 3
    # only the current and previous versions are kept; staging is empty
    assert sorted(p.name for p in (store.root / "versions").iterdir()) == ["2", "3"]
    assert not any((store.root / "staging").iterdir())


def test_older_or_equal_versions_are_refused_unless_forced(store, signed_bundles):
    store.install(signed_bundles[2])
    before = _snapshot(store)
    for version in (1, 2):
        with pytest.raises(StaleVersionError, match="not newer"):
            store.install(zip_bundle(signed_bundles[version]))
        assert _snapshot(store) == before
    store.install(signed_bundles[1], force=True)
    assert (store.current_version, store.highest_version) == (1, 2)


def test_hostile_and_oversized_archives_are_refused(store, signed_bundles, tmp_path):
    """(Tampered, wrongly signed, unsigned, truncated bundles: tests/test_tampering.py.)"""
    for bad_name in ("../escape.txt", "/abs.txt", "dir/model.tflite"):
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            zf.writestr(bad_name, b"x")
        with pytest.raises(BundleError, match="bad bundle file name"):
            store.install(buf.getvalue())
    with pytest.raises(BundleError, match="not a zip"):
        store.install(b"definitely not a zip")
    small = ModelStore(tmp_path / "small", store.public_key, max_bundle_bytes=1000)
    with pytest.raises(BundleError, match="limit"):
        small.install(zip_bundle(signed_bundles[2]))
    assert store.current_version is None
    assert not list(tmp_path.rglob("escape.txt"))


def test_a_signed_bundle_failing_its_golden_check_is_refused(store, signed_bundles, server_key,
                                                              tmp_path):
    manifest = json.loads((signed_bundles[2] / "manifest.json").read_bytes())
    golden = {**manifest["golden"], "scores": (np.asarray(manifest["golden"]["scores"]) * 3 + 1)
              .tolist()}
    bad = resign_bundle(signed_bundles[2], tmp_path / "bad", server_key, golden=golden)
    store.install(signed_bundles[1])
    with pytest.raises(GoldenCheckError, match="score gap"):
        store.install(bad)
    assert store.current_version == 1


def test_a_current_version_that_no_longer_loads_rolls_back(store, signed_bundles):
    store.install(signed_bundles[1])
    store.install(signed_bundles[2])
    model = store.root / "versions" / "2" / MODEL
    model.write_bytes(model.read_bytes()[:100])  # storage corruption after install
    rec = store.open_recommender()
    assert rec.version == 1
    assert (store.current_version, store.previous_version, store.highest_version) == (1, None, 2)
    with pytest.raises(StaleVersionError):
        store.install(signed_bundles[2])  # the floor stays: v2 needs force to come back


def test_explicit_rollback(store, signed_bundles):
    store.install(signed_bundles[1])
    store.install(signed_bundles[2])
    assert store.rollback() == 1
    assert store.open_recommender().version == 1
    with pytest.raises(BundleError, match="no previous"):
        store.rollback()


def test_kill_during_install_leaves_a_serving_model(store, signed_bundles, server_key, tmp_path):
    """A subprocess installs v2..v25 in turn and is SIGKILLed right after a chosen step of
    its first or second install (every step of INSTALL_STEPS in rotation: the installer
    pauses there until killed, so where the kill lands does not depend on the machine's
    speed); after every kill the store opens on exactly the version that step implies and
    serves it."""
    store.install(signed_bundles[1])
    zips = tmp_path / "zips"
    zips.mkdir()
    for v in range(2, 26):
        b = resign_bundle(signed_bundles[1], tmp_path / f"b{v}", server_key, model_version=v)
        (zips / f"v{v}.zip").write_bytes(zip_bundle(b))
    installed, kills, killed_after = 1, 0, set()
    while installed < 25:
        step = INSTALL_STEPS[kills % len(INSTALL_STEPS)]
        nth = 1 + (kills // len(INSTALL_STEPS)) % 2  # kill in the 1st or the 2nd install
        proc = subprocess.Popen(
            [sys.executable, str(SUPPORT / "model_store_installer.py"), str(store.root),
             public_raw(server_key).hex(), str(zips), step, str(nth)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO,
        )
        lines = []
        while not (lines and lines[-1].startswith("paused")):
            line = proc.stdout.readline()
            if not line:  # fewer than nth installs were left: it finished them all
                break
            lines.append(line)
        proc.send_signal(signal.SIGKILL)
        lines += proc.communicate()[0].splitlines()
        reported = [int(line) for line in lines if not line.startswith("paused")]
        paused = [line.split() for line in lines if line.startswith("paused")]
        kills += 1
        reopened = ModelStore(store.root, store.public_key)
        current = reopened.current_version
        # every reported install is in; the paused one is in exactly when state.json was
        # already replaced (it was killed before install() could return and report it)
        expected = max(reported, default=installed)
        if paused:
            assert paused == [["paused", step, str(expected + 1)]]
            expected += step == "state_swapped"
            killed_after.add(step)
        assert current == expected, (step, nth, lines)
        assert reopened.open_recommender().version == current
        assert not any((store.root / "staging").iterdir())  # a killed install is swept
        installed = current
    assert installed == 25
    assert killed_after == set(INSTALL_STEPS)  # a kill landed after every step
