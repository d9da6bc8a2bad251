"""Verified, atomic, rollback-able storage of model bundles on the device.

Layout under ``root``::

    state.json          {"current": v, "previous": p, "highest": h}, replaced atomically
    versions/<v>/       one verified bundle directory per kept version (current, previous)
    staging/            bundles being unpacked and verified; swept on open

An install unpacks into ``staging/``, verifies (pinned Ed25519 signature, every file's sha256
and size, vocabulary digest), refuses a version not above the highest ever installed unless
forced (anti-rollback survives uninstalls because ``highest`` is kept), runs the golden check,
fsyncs, renames into ``versions/`` and only then replaces ``state.json`` (write aside, fsync,
rename, fsync the directory). A process killed at any point before that last rename leaves the
old state, so the old model keeps serving; after it, the new one does. Nothing in between is
ever read."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from device_sdk.bundle import (
    Bundle,
    BundleError,
    BundleIntegrityError,
    GoldenCheckError,
    check_member_name,
    extract_bundle_zip,
    load_bundle,
)
from device_sdk.files import atomic_write, fsync_dir, fsync_tree
from device_sdk.recommender import HistoryPolicy, Recommender
from device_sdk.topk_model import ModelLoadError

STATE = "state.json"
MAX_BUNDLE_BYTES = 64 << 20
# The steps of an install, in order, as reported to ``ModelStore.on_step``: the bundle is
# unpacked into staging, verified (signature, digests, anti-rollback), golden-checked,
# fsynced, renamed into versions/, and made current by replacing state.json.
INSTALL_STEPS = ("unpacked", "verified", "golden_checked", "synced", "renamed",
                 "state_swapped")


class StaleVersionError(BundleError):
    """The bundle's version is not above the highest one installed (anti-rollback)."""

    code = "stale_version"


@dataclass(frozen=True)
class InstallResult:
    version: int
    previous: int | None
    golden_overlap: float


class ModelStore:
    """Install, serve and roll back bundles signed by the server key pinned at provisioning
    (``public_key``: raw 32-byte Ed25519)."""

    def __init__(
        self,
        root: str | Path,
        public_key: bytes,
        *,
        policy: HistoryPolicy | None = None,
        max_bundle_bytes: int = MAX_BUNDLE_BYTES,
        on_step: Callable[[str], None] | None = None,
    ) -> None:
        if len(public_key) != 32:
            raise ValueError("public_key must be the raw 32-byte Ed25519 server key")
        self.root = Path(root)
        self.public_key = bytes(public_key)
        self.policy = policy
        self.max_bundle_bytes = max_bundle_bytes
        # Called with each INSTALL_STEPS name as an install passes it (progress for an app;
        # the kill tests stop the process right after a chosen step).
        self.on_step = on_step
        self._lock = threading.Lock()
        (self.root / "versions").mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.root / "staging", ignore_errors=True)
        (self.root / "staging").mkdir()

    # -- state ---------------------------------------------------------------------------
    def _state(self) -> dict[str, int | None]:
        try:
            state = json.loads((self.root / STATE).read_text())
        except FileNotFoundError:
            return {"current": None, "previous": None, "highest": 0}
        except (ValueError, RecursionError) as exc:  # only a foreign writer: rename is atomic
            raise BundleError(f"model store state {self.root / STATE} is corrupt: {exc}") from None
        values = {k: state.get(k) for k in ("current", "previous", "highest")} if isinstance(
            state, dict) else None
        if values is None or not all(v is None or type(v) is int for v in values.values()):
            raise BundleError(f"model store state {self.root / STATE} is corrupt: {state!r:.80}")
        return values

    def _write_state(self, state: dict[str, int | None]) -> None:
        atomic_write(self.root / STATE, json.dumps(state, sort_keys=True).encode())

    @property
    def current_version(self) -> int | None:
        return self._state()["current"]

    @property
    def previous_version(self) -> int | None:
        return self._state()["previous"]

    @property
    def highest_version(self) -> int:
        return int(self._state()["highest"] or 0)

    def bundle(self, version: int) -> Bundle:
        return load_bundle(self.root / "versions" / str(version), public_key=self.public_key)

    # -- install -------------------------------------------------------------------------
    def install(
        self,
        source: bytes | str | Path,
        *,
        force: bool = False,
        expect_manifest: bytes | None = None,
    ) -> InstallResult:
        """Install a bundle given as zip bytes, a zip file or a bundle directory, and make it
        current. ``expect_manifest``: the exact (signed) manifest bytes the bundle must carry,
        e.g. the one the server offered before the download. Raises ``BundleError``
        (``StaleVersionError``, ``BundleIntegrityError``, ``GoldenCheckError``) and leaves
        the store untouched when anything is wrong."""
        with self._lock:
            staged = Path(tempfile.mkdtemp(dir=self.root / "staging"))
            try:
                self._unpack(source, staged)
                self._step("unpacked")
                bundle = load_bundle(staged, public_key=self.public_key)
                if expect_manifest is not None and bundle.manifest_bytes != expect_manifest:
                    raise BundleIntegrityError(
                        f"the bundle carries the manifest of version {bundle.version}, not "
                        "the one it was offered with"
                    )
                state = self._state()
                highest = int(state["highest"] or 0)
                if bundle.version <= highest and not force:
                    raise StaleVersionError(
                        f"bundle version {bundle.version} is not newer than version {highest} "
                        "already installed (pass force=True to reinstall or downgrade)"
                    )
                self._step("verified")
                overlap = _golden(bundle)
                self._step("golden_checked")
                fsync_tree(staged)
                self._step("synced")
                final = self.root / "versions" / str(bundle.version)
                if final.exists():  # a forced reinstall of a kept version
                    shutil.rmtree(final)
                os.rename(staged, final)
                fsync_dir(final.parent)
                self._step("renamed")
                previous = state["current"] if state["current"] != bundle.version else None
                self._write_state(
                    {
                        "current": bundle.version,
                        "previous": previous if previous is not None else state["previous"],
                        "highest": max(highest, bundle.version),
                    }
                )
                self._step("state_swapped")
                self._prune()
                return InstallResult(bundle.version, previous, overlap)
            finally:
                shutil.rmtree(staged, ignore_errors=True)

    def _step(self, name: str) -> None:
        if self.on_step is not None:
            self.on_step(name)

    def _unpack(self, source: bytes | str | Path, dest: Path) -> None:
        if isinstance(source, str | Path) and Path(source).is_dir():
            for f in Path(source).iterdir():
                if f.is_file():
                    check_member_name(f.name)
                    shutil.copyfile(f, dest / f.name)
            return
        data = Path(source).read_bytes() if isinstance(source, str | Path) else bytes(source)
        extract_bundle_zip(data, dest, self.max_bundle_bytes)

    # -- serving and rollback ------------------------------------------------------------
    def open_recommender(self, num_threads: int = 1) -> Recommender | None:
        """A Recommender on the current version; if that fails to load or fails its golden
        check, roll back to the previous version automatically. None when nothing is
        installed (or nothing installed still loads)."""
        with self._lock:
            state = self._state()
            for attempt in ("current", "previous"):
                version = state[attempt]
                if version is None:
                    continue
                try:
                    rec = Recommender(
                        self.bundle(version), policy=self.policy, num_threads=num_threads
                    )
                except (BundleError, ModelLoadError, OSError):
                    continue
                if attempt == "previous":
                    self._write_state(
                        {"current": version, "previous": None, "highest": state["highest"]}
                    )
                return rec
            return None

    def rollback(self) -> int:
        """Make the previous version current again (an operator's or app's decision; the
        anti-rollback floor stays where it was)."""
        with self._lock:
            state = self._state()
            if state["previous"] is None:
                raise BundleError("no previous model version to roll back to")
            self.bundle(state["previous"])  # verify before switching
            self._write_state(
                {"current": state["previous"], "previous": None, "highest": state["highest"]}
            )
            return int(state["previous"])

    def _prune(self) -> None:
        state = self._state()
        keep = {str(v) for v in (state["current"], state["previous"]) if v is not None}
        for path in (self.root / "versions").iterdir():
            if path.name not in keep:
                shutil.rmtree(path, ignore_errors=True)


def _golden(bundle: Bundle) -> float:
    try:
        return Recommender(bundle).golden_overlap
    except ModelLoadError as exc:
        raise GoldenCheckError(f"the model does not load in this runtime: {exc}") from None
