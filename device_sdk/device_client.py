"""DeviceClient: the one object an app uses — log, recommend, sync, forget, export.

Everything lives under one private data directory::

    events.db     the behaviour log (EventLog, SQLite WAL)
    models/       verified bundles (ModelStore): current + previous
    device_key    the device's Ed25519 identity (0600), created on the first sync
    outbox/       sealed uploads waiting for the server
    sync.json     last manifest ETag, whether this device is registered, rounds answered

``log`` and ``recommend`` are safe from any thread and never touch the network. ``sync``
(one at a time) talks to the server: deliver queued uploads, register once, fetch the
manifest (ETag), download + verify + install a newer model, check in, and when offered a
round task, train locally and upload the clipped update through the task's scheme."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from device_sdk.bundle import BundleError
from device_sdk.device_identity import DeviceIdentity
from device_sdk.event_log import EventLog
from device_sdk.files import atomic_write
from device_sdk.local_trainer import LocalTrainer, LocalTrainingConfig, round_seed
from device_sdk.model_store import InstallResult, ModelStore, StaleVersionError
from device_sdk.recommender import HistoryPolicy, Recommendation, Recommender
from device_sdk.sync_client import SyncClient, SyncError
from device_sdk.uploads import SecAggSession

log = logging.getLogger(__name__)

ANSWERED_KEPT = 100


class ModelNotReadyError(RuntimeError):
    """No model is installed yet: call ``sync()`` (or ``install()`` a provisioned bundle)."""

    code = "no_model"


@dataclass
class SyncReport:
    """What one ``sync()`` did."""

    model_version: int | None = None
    installed: int | None = None
    install_error: str | None = None
    outbox_delivered: int = 0
    round_id: str | None = None
    skipped: str | None = None
    num_examples: int = 0
    update_norm: float | None = None  # after clipping
    update_norm_before_clip: float | None = None
    uploaded: bool = False
    queued: bool = False
    # sync(wait=False) in a SecAgg+ round: the advertised session, for the caller to step().
    pending: SecAggSession | None = None


class DeviceClient:
    """The SDK facade. ``server_key`` is the raw 32-byte Ed25519 key the operator's server
    signs models with, pinned at provisioning; ``server_url`` is optional (offline apps
    install bundles themselves)."""

    def __init__(
        self,
        data_dir: str | Path,
        *,
        server_key: bytes,
        server_url: str | None = None,
        enrollment_token: str | None = None,
        attestation: Callable[[bytes], Any] | None = None,
        policy: HistoryPolicy | None = None,
        durability: str = "normal",
        max_age_days: float | None = None,
        max_rows: int | None = None,
        extra_kinds: tuple[str, ...] = (),
        num_threads: int = 1,
        http_pool: Any = None,
        training_seed: str | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Local training's shuffle is drawn from sha256(training_seed/round id); a real device
        # leaves it None (its device id stands in), a simulator passes its seed and user so
        # that a rerun trains exactly the same.
        self.training_seed = training_seed
        self.policy = policy  # None: each bundle's own (its manifest's history_policy)
        self.events = EventLog(
            self.data_dir / "events.db",
            durability=durability,
            max_age_days=max_age_days,
            max_rows=max_rows,
            extra_kinds=extra_kinds,
        )
        self.models = ModelStore(self.data_dir / "models", server_key, policy=self.policy)
        self._num_threads = num_threads
        self._recommender: Recommender | None = self.models.open_recommender(num_threads)
        self._server_url = server_url
        self._enrollment_token = enrollment_token
        self._attestation = attestation  # fn(public_key_raw) -> evidence (SyncClient)
        self._client: SyncClient | None = None
        self._http_pool = http_pool  # an urllib3.PoolManager to share; default: its own
        self._sync_lock = threading.Lock()
        self._state_path = self.data_dir / "sync.json"

    # -- the app's side ------------------------------------------------------------------
    def log(
        self,
        item: str,
        kind: str = "view",
        *,
        ts: float | None = None,
        context: dict[str, Any] | None = None,
    ) -> int:
        """Record one event (committed on return); returns its row id."""
        return self.events.log(item, kind, ts=ts, context=context)

    def log_many(self, events: Any) -> int:
        """Record a batch in one transaction: all or nothing."""
        return self.events.log_many(events)

    def recommend(
        self, k: int = 10, *, candidates: Any = None, now: float | None = None
    ) -> list[Recommendation]:
        """Up to ``k`` items for this user, best first (see ``Recommender.recommend``;
        ``now``, the request's Unix time, matters to a model that marks sessions)."""
        rec = self._recommender
        if rec is None:
            raise ModelNotReadyError(
                "no model is installed on this device yet: call sync() or install() first"
            )
        return rec.recommend(self.events, k, candidates=candidates, now=now)

    @property
    def model_version(self) -> int | None:
        rec = self._recommender
        return None if rec is None else rec.version

    def install(
        self,
        source: bytes | str | Path,
        *,
        force: bool = False,
        expect_manifest: bytes | None = None,
    ) -> InstallResult:
        """Install a signed bundle (zip bytes, zip file or directory) and serve it
        (``expect_manifest``: see ``ModelStore.install``)."""
        result = self.models.install(source, force=force, expect_manifest=expect_manifest)
        self._recommender = self.models.open_recommender(self._num_threads)
        return result

    def export(self, out: str | Path | IO[str]) -> int:
        """Write everything the log holds about the user as JSON lines; returns the count."""
        return self.events.export(out)

    def forget(self) -> None:
        """Delete everything recorded about the user: the event log (space reclaimed) and
        any queued update derived from it. The model and the device key are not personal."""
        with self._sync_lock:
            self.events.forget()
            outbox = self.data_dir / "outbox"
            if outbox.is_dir():
                for entry in outbox.iterdir():
                    entry.unlink()

    def close(self) -> None:
        self.events.close()

    def __enter__(self) -> DeviceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- sync ----------------------------------------------------------------------------
    @property
    def sync_client(self) -> SyncClient:
        if self._server_url is None:
            raise RuntimeError("this DeviceClient has no server_url: it cannot sync")
        if self._client is None:
            identity = DeviceIdentity.load_or_create(self.data_dir / "device_key")
            self._client = SyncClient(
                self._server_url,
                identity,
                server_signing_key=self.models.public_key,
                outbox_dir=self.data_dir / "outbox",
                enrollment_token=self._enrollment_token,
                attestation=self._attestation,
                pool=self._http_pool,
            )
        return self._client

    def sync(self, *, train: bool = True, wait: bool = True) -> SyncReport:
        """One sync with the server. Raises ``SyncError`` when the server cannot be reached
        or refuses the device; a model that fails verification is reported in
        ``install_error`` and the old one keeps serving; an upload that cannot be sent now is
        queued (``queued``) and delivered by a later sync.

        A SecAgg+ round has stages that wait for the other devices: ``sync()`` stays in the
        call until the last one. With ``wait=False`` it returns after the first stage with
        the session in ``report.pending``; call its ``step()`` (one poll, one answer when the
        server is ready) from the app's background scheduler until it returns True."""
        with self._sync_lock:
            client = self.sync_client
            state = self._read_state()
            report = SyncReport()
            if not state.get("registered"):
                self._register(client, state)
            try:
                report.outbox_delivered = client.flush_outbox()
                self._update_model(client, state, report)
            except SyncError as exc:
                if exc.code != "unknown_device":
                    raise
                # The server pruned this device after a long silence (its retention
                # policy): register the same key again, then carry on.
                log.info("the server no longer knows this device: registering again")
                self._register(client, state)
                report.outbox_delivered = client.flush_outbox()
                self._update_model(client, state, report)
            report.model_version = self.model_version
            task = client.checkin(self.model_version, self.events.count())
            if task is None or not train:
                return report
            report.round_id = task.round_id
            answered = state.get("answered", [])
            if task.round_id in answered:
                report.skipped = f"round {task.round_id} was already answered by this device"
                return report
            if task.model_version != self.model_version:
                report.skipped = (
                    f"round {task.round_id} trains version {task.model_version}, this device "
                    f"serves {self.model_version}"
                )
                return report
            trainer = LocalTrainer(self.models.bundle(task.model_version), self.policy)
            seed = round_seed(self.training_seed or client.identity.device_id, task.round_id)
            update = trainer.train(
                self.events.events(),
                LocalTrainingConfig.from_task(task),
                base_version=task.model_version,
                seed=seed,
            )
            report.num_examples, report.update_norm = update.num_examples, update.norm
            report.update_norm_before_clip = update.norm_before_clip
            try:
                report.pending = None if wait else client.begin_upload(task, update)
                result = {} if report.pending else client.upload(task, update)
            except SyncError as exc:
                if exc.code not in ("secagg_dropped", "stage_closed"):
                    raise
                # The round went on without this device (too slow for a SecAgg+ stage); it
                # cannot rejoin, so the round counts as answered.
                report.skipped = f"dropped out of round {task.round_id}: {exc.message}"
                result = {}
            report.uploaded = bool(result.get("accepted"))
            report.queued = bool(result.get("queued"))
            # Remembered so a re-offered task is not trained (battery) or sent twice.
            state["answered"] = [*answered, task.round_id][-ANSWERED_KEPT:]
            self._write_state(state)
            return report

    def _register(self, client: SyncClient, state: dict) -> None:
        client.register()
        state["registered"] = True
        self._write_state(state)

    def _update_model(self, client: SyncClient, state: dict, report: SyncReport) -> None:
        manifest = client.fetch_manifest(etag=state.get("etag"))
        if manifest is None or manifest.version == self.model_version:
            return
        try:
            if manifest.version <= self.models.highest_version:
                raise StaleVersionError(
                    f"server offers version {manifest.version}, not newer than "
                    f"{self.models.highest_version}"
                )
            # The download must be the very bundle the signed manifest answer described: a
            # blob of another (say older) version under this name is broken, not stale, and
            # is fetched again next time rather than remembered as refused.
            result = self.install(client.download_bundle(manifest.version),
                                  expect_manifest=manifest.manifest_bytes)
            report.installed = result.version
        except BundleError as exc:
            report.install_error = f"{exc.code}: {exc}"
            if not isinstance(exc, StaleVersionError):
                return  # a broken download is fetched again next time
        state["etag"] = manifest.etag
        self._write_state(state)

    def _read_state(self) -> dict[str, Any]:
        """sync.json, or a fresh start ({}) when it is missing or not what this SDK wrote."""
        try:
            state = json.loads(self._state_path.read_text())
        except (FileNotFoundError, ValueError, RecursionError):
            return {}
        answered = state.get("answered", []) if isinstance(state, dict) else None
        if (
            not isinstance(answered, list)
            or not all(isinstance(r, str) for r in answered)
            or not isinstance(state.get("etag"), str | None)
            or not isinstance(state.get("registered", False), bool)
        ):
            return {}
        return state

    def _write_state(self, state: dict[str, Any]) -> None:
        atomic_write(self._state_path, json.dumps(state).encode())
