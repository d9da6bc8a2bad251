"""Federated rounds: the state machine, sampling at check-in, update intake, aggregation.

States (``rounds.state``)::

    open -> collecting -> aggregating -> published
                                     \\-> failed

- ``open``: the row exists (config checked, budget checked); it becomes ``collecting`` in the
  next transaction (a crash in between is repaired by ``advance``).
- ``collecting``: each device checking in with the round's base version gets one stored
  coin of probability q (``sync_server.selection``: Poisson sampling; q = 1 takes every
  device, first come, up to target_clients); selected devices upload once, before the
  deadline. With q < 1 collecting ends at the deadline (or the operator's close-stage) and
  never early, so no device's selection depends on the others'.
- ``aggregating``: claimed by one worker through a conditional UPDATE (state + a random claim
  token + a lease), so two workers never both aggregate; the worker that publishes must still
  hold the claim. A claim whose lease (``AGGREGATION_LEASE_S``, default 120 s) ran out is
  taken over: that is how a round survives a worker killed mid-aggregation, or a server
  killed and restarted (the new process cannot tell a dead worker's claim from a live one on
  another host, so it waits for the lease: at most 120 s, at the first request after it).
  The holder renews its lease before each long step (aggregation, the publisher), so the
  lease only has to outlast the longest single step.
- ``published``: the new model version, the ledger entry and the round's outcome are written
  in ONE transaction, so the noised result is either released and accounted, or neither.
- Privacy: once any round was differentially private (a ledger entry, or a round configured
  with ``noise_multiplier`` / ``epsilon_budget``), or when this round sets an
  ``epsilon_budget``, a round without ``noise_multiplier`` is refused (409
  ``privacy_required``): its result would escape the accountant.
- ``failed``: fewer than ``min_clients`` updates at the deadline, or the aggregation raised;
  ``reason`` says which.

No timer drives a round: ``advance`` runs at every check-in, upload and admin read, and at
the upload that completes the round. Inside a request (``defer_aggregations``) the
aggregation it starts runs after that request's response has been sent, in a thread of its
own in the same worker (``app.py``), so no device waits (or times out) on an export.

Publishing: the server never imports ``trainer`` (export needs torch). A *publisher* is a
callable ``(weights, base_bundle_dir, version, provenance) -> Path`` of a new unsigned
bundle directory; ``create_app(publisher=...)`` passes one, or the ``PUBLISHER`` setting
names one as "module:function" (imported on first use). The default,
``sync_server.publisher:patch_or_export``, writes the weights into the base's LiteRT file
(milliseconds, no torch) and falls back to ``trainer.publish:export_weights`` (the real
export) when it cannot; ``sync_server.registry:republish_weights`` replaces weights.npz
only. Whatever the publisher wrote, the server sets the manifest's ``model_version``,
``parent_version``, ``provenance`` and ``privacy`` itself, then signs and stores it.
"""

from __future__ import annotations

import functools
import importlib
import io
import json
import logging
import math
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError

from device_sdk import secagg
from device_sdk.bundle import MANIFEST, encode_manifest
from device_sdk.csprng import CryptoRandom
from device_sdk.protocol import (
    SEALED_SCHEME,
    ProtocolError,
    RoundTask,
    decode_tensors,
    encode_tensors,
    open_update,
    validate_update,
)
from sync_server import secure_aggregation, selection, strategies
from sync_server.blobs import BlobStore
from sync_server.db import Database
from sync_server.errors import ApiError
from sync_server.keys import ServerKeys
from sync_server.models import (
    ModelVersion,
    PrivacyLedger,
    Round,
    SecAggMember,
    Selection,
    SelectionCoin,
    Update,
    as_utc,
    utcnow,
)
from sync_server.privacy import DEFAULT_ACCOUNTANT, DESCRIPTIONS, BudgetExceeded, LedgerEntry
from sync_server.privacy import PrivacyLedger as Ledger
from sync_server.registry import (
    extract_version,
    highest_version,
    newest_full_version,
    sign_and_store,
)

log = logging.getLogger(__name__)

Publisher = Callable[[dict[str, np.ndarray], Path, int, dict[str, Any]], Path]

ACTIVE = ("open", "collecting", "share_keys", "masked_input", "unmasking", "aggregating")
STATES = (*ACTIVE, "published", "failed")

# The round config an admin may send, with defaults (None: required or computed).
TASK_DEFAULTS: dict[str, Any] = {
    "clip_norm": 1.0, "local_epochs": 1, "learning_rate": 0.1, "batch_size": 32,
    "proximal_mu": 0.0, "max_examples": 1000, "trainable": None,
}
ROUND_DEFAULTS: dict[str, Any] = {
    "strategy": "fedavg", "target_clients": 10, "min_clients": None, "deadline_s": 3600.0,
    "noise_multiplier": None, "delta": None, "epsilon_budget": None, "population": None,
    "sampling_rate": None, "max_clients": None,
    "model_version": None, "upload_scheme": secagg.SCHEME, "dp_mode": "central",
    "secagg_degree": None, "secagg_threshold": None, "secagg_stage_timeout_s": 60.0,
    "secagg_poll_s": 1.0, **TASK_DEFAULTS,
}
SCHEMES = (secagg.SCHEME, SEALED_SCHEME)
STRATEGY_KEYS = ("server_lr", "momentum", "beta1", "beta2", "tau")
# No number in a round config may exceed this (a count beyond the database's INTEGER, or a
# deadline beyond the year 9999, would fail later, inside every request touching the round).
MAX_NUMBER = 2**31 - 1


def _bad(message: str) -> ApiError:
    return ApiError("bad_round_config", message, 400)


def _number(config: dict[str, Any], key: str, low: float, *, allow_none: bool = False,
            integer: bool = False, inclusive: bool = False) -> None:
    value = config[key]
    if value is None and allow_none:
        return
    kinds = (int,) if integer else (int, float)
    if type(value) not in kinds or not math.isfinite(value) or value < low or (
        value == low and not inclusive
    ):
        kind = "an integer" if integer else "a number"
        raise _bad(f"{key} must be {kind} {'>=' if inclusive else '>'} {low}, got {value!r}")


def normalise_config(obj: Mapping[str, Any]) -> dict[str, Any]:
    """The admin's round config with defaults filled in; 400 ``bad_round_config`` on
    anything unusable (unknown keys included, so a typo never silently means a default)."""
    unknown = sorted(set(obj) - set(ROUND_DEFAULTS) - set(STRATEGY_KEYS))
    if unknown:
        known = sorted({*ROUND_DEFAULTS, *STRATEGY_KEYS})
        raise _bad(f"unknown round setting(s) {unknown}; known: {known}")
    config = {**ROUND_DEFAULTS, **obj}
    for key, value in config.items():  # counts go into INTEGER columns, seconds into dates
        if type(value) in (int, float) and not abs(value) <= MAX_NUMBER:  # NaN included
            raise _bad(f"{key} must be a finite number at most {MAX_NUMBER}, got {value!r}")
    _number(config, "target_clients", 1, integer=True, inclusive=True)
    _number(config, "population", 1, allow_none=True, integer=True, inclusive=True)
    _number(config, "max_clients", 1, allow_none=True, integer=True, inclusive=True)
    if config["sampling_rate"] is not None and config["population"] is not None and (
        "target_clients" not in obj
    ):
        raise _bad("with sampling_rate and population, set target_clients too (the expected "
                   "cohort, q x population): it is the mean's denominator")
    selection.resolve(config)
    if config["min_clients"] is None and not selection.capped(config):
        # A Poisson cohort is random: waiting for all of target_clients would fail half the
        # rounds. Half the expected cohort falls short with small probability.
        floor = 3 if config["upload_scheme"] == secagg.SCHEME else 1
        config["min_clients"] = max(floor, math.ceil(config["target_clients"] / 2))
    if config["min_clients"] is None:  # SecAgg+ rounds survive the dropout they are built for
        config["min_clients"] = config["target_clients"] if (
            config["upload_scheme"] != secagg.SCHEME or config["target_clients"] < 3
        ) else max(3, math.ceil((1 - secagg.DEFAULT_DROPOUT) * config["target_clients"]))
    _number(config, "min_clients", 1, integer=True, inclusive=True)
    if config["min_clients"] > config["target_clients"]:
        raise _bad("min_clients must be <= target_clients")
    _number(config, "deadline_s", 0)
    _number(config, "noise_multiplier", 0, allow_none=True)
    _number(config, "epsilon_budget", 0, allow_none=True)
    _number(config, "model_version", 0, allow_none=True, integer=True, inclusive=True)
    selection.resolve_delta(config)
    _check_upload(config)
    try:  # the device-facing half, checked exactly as a device will check it
        RoundTask.from_json({**{k: config[k] for k in TASK_DEFAULTS}, "round_id": "check",
                             "model_version": 0, "deadline": 0.0,
                             "upload_scheme": SEALED_SCHEME})
    except ProtocolError as exc:
        raise _bad(exc.message) from None
    try:
        strategies.build({**config, "expected_clients": config["target_clients"]})
    except (ValueError, TypeError) as exc:
        raise _bad(f"strategy: {exc}") from None
    return config


def _check_upload(config: dict[str, Any]) -> None:
    """The upload scheme and DP mode settings; SecAgg+ ones checked as devices will."""
    if config["upload_scheme"] not in SCHEMES:
        raise _bad(f"upload_scheme must be one of {SCHEMES}, got {config['upload_scheme']!r}")
    if config["dp_mode"] not in ("central", "distributed"):
        raise _bad(f"dp_mode must be 'central' or 'distributed', got {config['dp_mode']!r}")
    _number(config, "secagg_stage_timeout_s", 0)
    _number(config, "secagg_poll_s", 0)
    _number(config, "secagg_degree", 2, allow_none=True, integer=True, inclusive=True)
    _number(config, "secagg_threshold", 2, allow_none=True, integer=True, inclusive=True)
    if config["upload_scheme"] != secagg.SCHEME:
        if config["dp_mode"] == "distributed":
            raise _bad("dp_mode 'distributed' needs upload_scheme secagg+-v1: the devices' "
                       "noise shares only protect a sum")
        return
    if config["min_clients"] < 3:
        raise _bad(f"min_clients {config['min_clients']}: secure aggregation needs at least "
                   "3 devices (a sum of two reveals each to the other); use upload_scheme "
                   f"{SEALED_SCHEME!r} for smaller rounds")
    if config["dp_mode"] == "distributed" and config["noise_multiplier"] is None:
        raise _bad("dp_mode 'distributed' needs noise_multiplier")
    if config["secagg_degree"] is not None:
        n = int(config["target_clients"])
        degree = min(int(config["secagg_degree"]), n - 1)
        threshold = config["secagg_threshold"] or secagg.default_threshold(degree)
        try:
            secagg.check_graph(n, degree, int(threshold))
        except secagg.SecAggError as exc:
            raise _bad(exc.message) from None
    elif config["secagg_threshold"] is not None:
        raise _bad("secagg_threshold needs secagg_degree (the default degree comes with "
                   "its own threshold)")


def task_json(row: Round) -> dict[str, Any]:
    """The RoundTask a selected device is given."""
    config = row.config
    task = {k: config[k] for k in TASK_DEFAULTS}
    task.update(round_id=row.id, model_version=row.model_version,
                upload_scheme=config["upload_scheme"],
                deadline=as_utc(row.deadline).timestamp())
    if config["upload_scheme"] == secagg.SCHEME:
        task["secagg"] = secure_aggregation.task_params(config)
    return task


def _state_bytes(state: Mapping[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in state.items()})
    return buf.getvalue()


def _state_load(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def resolve_publisher(spec: str) -> Publisher:
    """``"module:function"`` -> the callable (imported now, on first use)."""
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ValueError(f"PUBLISHER must be 'module:function', got {spec!r}")
    return getattr(importlib.import_module(module), name)


class _LostClaim(RuntimeError):
    """Another worker took the round over (our lease ran out): our result is discarded."""


class RoundService:
    """Rounds on one app's database, blob store and keys (``app.extensions``)."""

    def __init__(self, *, db: Database, blobs: BlobStore, keys: ServerKeys, scratch_dir: Path,
                 publisher: Publisher | str, lease_s: int, metrics: Any = None,
                 seed: str | None = None, accountant: str = DEFAULT_ACCOUNTANT) -> None:
        self.db, self.blobs, self.keys = db, blobs, keys
        self.scratch_dir = Path(scratch_dir)
        self._publisher = publisher
        self.lease_s = lease_s
        self.seed = seed  # DETERMINISTIC_SEED: reproducible coins and noise (not private)
        self.accountant = accountant  # DP_ACCOUNTANT: "pld" | "rdp" (sync_server.privacy)
        self.metrics = metrics
        self.secagg = secure_aggregation.SecAggStages(db, blobs)
        self._local = threading.local()  # the current request's deferred aggregations
        self._swept = False  # _sweep_ended_rounds ran in this process

    @property
    def publisher(self) -> Publisher:
        if isinstance(self._publisher, str):
            self._publisher = resolve_publisher(self._publisher)
        return self._publisher

    def _scratch(self) -> Path:
        self.scratch_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        return Path(tempfile.mkdtemp(dir=self.scratch_dir))

    # --- admin ---------------------------------------------------------------------------

    def create(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """Open a round (POST /v1/admin/rounds); returns its view."""
        config = normalise_config(obj)
        self.advance()
        with self.db.session() as session:
            active = session.scalars(select(Round).where(Round.state.in_(ACTIVE))).first()
            if active is not None:
                raise ApiError("round_in_progress", f"round {active.id} is {active.state}; "
                               "one round runs at a time", 409)
            private = self._private_history(session)
            version = config["model_version"]
            if version is None:  # never a version still in staged rollout
                version = newest_full_version(session)
            base = None if version is None else session.get(ModelVersion, version)
            if base is None or base.status != "published":
                which = ("no published, fully rolled-out version" if version is None
                         else f"there is no published version {version}")
                raise ApiError("no_model", f"a round trains a published model; {which}", 409)
            n_rounds = session.scalar(select(func.count()).select_from(Round)) or 0
            entries = self._ledger_entries(session)
        if config["noise_multiplier"] is None and (
            private or config["epsilon_budget"] is not None
        ):
            why = ("an epsilon_budget is set" if config["epsilon_budget"] is not None
                   else f"earlier rounds were differentially private ({private})")
            raise ApiError("privacy_required", f"{why}: a round without noise_multiplier "
                           "would release an update outside the privacy accounting; set "
                           "noise_multiplier", 409)
        config["model_version"] = version
        if config["trainable"] is None:  # the architecture's federated tensors, if it says
            federated = json.loads(base.manifest).get("architecture", {}).get("federated")
            config["trainable"] = list(federated) if federated else None
        config["expected_shapes"] = self._expected_shapes(base, config["trainable"])
        if config["upload_scheme"] == secagg.SCHEME:
            try:
                secure_aggregation.task_params(config)
            except secagg.SecAggError as exc:
                raise _bad(exc.message) from None
        sampling_rate = float(config["sampling_rate"])  # never from a count of keys
        config["selection"] = "seeded" if self.seed is not None else "csprng"
        round_id = f"round-{n_rounds + 1}"
        if config["noise_multiplier"] is not None:
            ledger = Ledger(config["delta"], config["epsilon_budget"], entries,
                            accountant=self.accountant)
            z = float(config["noise_multiplier"])
            if config["dp_mode"] == "distributed":  # the least noise that can reach the sum
                z = secure_aggregation.effective_noise_multiplier(config,
                                                                  int(config["min_clients"]))
            try:
                config["epsilon_projected"] = ledger.check(LedgerEntry(round_id, z,
                                                                       sampling_rate))
            except BudgetExceeded as exc:
                raise ApiError(BudgetExceeded.code, str(exc), 409) from None
        now = utcnow()
        row = Round(id=round_id, state="open", config=config, created_at=now,
                    deadline=now + timedelta(seconds=float(config["deadline_s"])),
                    model_version=version, sampling_rate=sampling_rate,
                    selected_count=0, received_count=0)
        try:
            with self.db.transaction() as session:
                session.add(row)
        except IntegrityError:
            raise ApiError("round_in_progress", "another round was opened concurrently",
                           409) from None
        self.advance(round_id)
        log.info("round %s opened on version %s: %s", round_id, version, config,
                 extra={"round_id": round_id, "version": version, "config": config,
                        "epsilon": config.get("epsilon_projected")})
        return self.view(round_id)

    def _expected_shapes(self, base: ModelVersion, trainable: list[str] | None
                         ) -> dict[str, list[int]]:
        scratch = self._scratch()
        try:
            weights = extract_version(self.blobs.get(base.blob_sha256), scratch).weights()
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        names = sorted(weights) if trainable is None else list(trainable)
        missing = sorted(set(names) - set(weights))
        if missing:
            raise _bad(f"trainable names {missing} are not weights of version "
                       f"{base.version} (it has {sorted(weights)})")
        return {name: list(weights[name].shape) for name in names}

    @staticmethod
    def _private_history(session: Any) -> str:
        """Why this server is committed to DP ('' if it is not): a privacy ledger entry, or
        an earlier round (whatever its outcome) configured with noise or a budget. Once
        any round was private, a noiseless round would release data the accountant never
        sees, so every later round must be private too."""
        if session.scalar(select(func.count()).select_from(PrivacyLedger)):
            return "the privacy ledger has entries"
        for round_id, config in session.execute(select(Round.id, Round.config)):
            if config.get("noise_multiplier") is not None or config.get(
                "epsilon_budget"
            ) is not None:
                return f"round {round_id} was configured with DP"
        return ""

    @staticmethod
    def _ledger_entries(session: Any) -> list[LedgerEntry]:
        rows = session.scalars(select(PrivacyLedger).order_by(PrivacyLedger.id)).all()
        return [LedgerEntry(r.round_id, r.noise_multiplier, r.sampling_rate, r.steps, r.mode)
                for r in rows]

    def close_stage(self, round_id: str) -> dict[str, Any]:
        """Operator: stop waiting for the current stage (collecting, or a SecAgg+ stage). Its
        deadline becomes now, so the round goes on with the devices that answered, exactly
        as at the deadline (or fails there, when too few did). Returns the round's view."""
        now = utcnow()
        with self.db.transaction() as session:
            row = session.get(Round, round_id)
            if row is None:
                raise ApiError("not_found", f"no round {round_id}", 404)
            if row.state in ("open", "collecting"):
                row.deadline = min(as_utc(row.deadline), now)
            elif row.state in secure_aggregation.STAGES:
                row.stage_deadline = min(as_utc(row.stage_deadline), now)
            else:
                raise ApiError("round_closed", f"round {round_id} is {row.state}: no stage "
                               "is waiting for devices", 409)
        self.advance(round_id)
        return self.view(round_id)

    def view(self, round_id: str) -> dict[str, Any]:
        with self.db.session() as session:
            row = session.get(Round, round_id)
            if row is None:
                raise ApiError("not_found", f"no round {round_id}", 404)
            ledger = session.scalars(select(PrivacyLedger)
                                     .where(PrivacyLedger.round_id == round_id)).first()
            checked_in = session.scalar(select(func.count()).select_from(SelectionCoin)
                                        .where(SelectionCoin.round_id == round_id))
        config = {k: v for k, v in row.config.items() if k != "expected_shapes"}
        return {
            "round_id": row.id,
            "state": row.state,
            "model_version": row.model_version,
            "published_version": row.published_version,
            "created_at": as_utc(row.created_at).isoformat(),
            "deadline": as_utc(row.deadline).timestamp(),
            "target_clients": config["target_clients"],
            "min_clients": config["min_clients"],
            "checked_in": checked_in,  # devices that got a coin
            "selected": row.selected_count,
            "received": row.received_count,
            "sampling_rate": row.sampling_rate,
            "epsilon": None if ledger is None else ledger.epsilon,
            "delta": config["delta"],
            "measurements": row.measurements,
            "reason": row.reason,
            "config": config,
            "secagg": None if config["upload_scheme"] != secagg.SCHEME else {
                **{k: v for k, v in (row.secagg or {}).items() if k != "graph_seed"},
                **self.secagg.counts(row.id)},
        }

    def list_rounds(self) -> dict[str, Any]:
        self.advance()
        with self.db.session() as session:
            ids = session.scalars(select(Round.id).order_by(Round.created_at)).all()
            spent = session.execute(select(PrivacyLedger.epsilon, PrivacyLedger.delta)
                                    .order_by(PrivacyLedger.id.desc()).limit(1)).first()
        return {"rounds": [self.view(i) for i in ids],
                "epsilon_spent": spent.epsilon if spent else 0.0,
                "delta": spent.delta if spent else None}

    # --- devices -------------------------------------------------------------------------

    def checkin(self, device_id: str, model_version: int | None) -> dict[str, Any] | None:
        """The task for this device, or None. Only a device reporting the round's base
        version gets a coin; its coin is stored, so check-in is idempotent: a selected
        device (not yet uploaded) gets its task again, an unselected one never does."""
        self.advance()
        with self.db.session() as session:
            row = session.scalars(select(Round).where(Round.state == "collecting")).first()
            if row is None or model_version != row.model_version:
                return None
            if utcnow() >= as_utc(row.deadline):
                return None
            selected = session.get(Selection, (row.id, device_id)) is not None
            uploaded = session.scalar(select(Update.id).where(
                Update.round_id == row.id, Update.device_id == device_id)) is not None or (
                session.get(SecAggMember, (row.id, device_id)) is not None)
        if uploaded:
            return None
        if selected or selection.draw(self.db, row, device_id, self.seed):
            return task_json(row)
        return None

    def accept_update(self, device_id: str, round_id: str, sealed: bytes) -> dict[str, Any]:
        """Open, validate and durably record an update; answers only after the commit."""
        with self.db.session() as session:
            row = session.get(Round, round_id)
        if row is not None and row.state == "collecting" and utcnow() >= as_utc(row.deadline):
            self.advance(round_id)
            raise ApiError("round_closed", f"round {round_id}: the deadline has passed", 409)
        if row is None or row.state != "collecting":
            state = "unknown" if row is None else row.state
            raise ApiError("round_closed", f"round {round_id} is not collecting ({state})", 409)
        if row.config["upload_scheme"] != SEALED_SCHEME:
            raise ApiError("wrong_scheme", f"round {round_id} takes uploads through "
                           f"{row.config['upload_scheme']}", 409)
        with self.db.session() as session:
            if session.get(Selection, (round_id, device_id)) is None:
                raise ApiError("not_selected", f"this device is not in round {round_id}", 403)
            if session.scalar(select(Update.id).where(Update.round_id == round_id,
                                                      Update.device_id == device_id)):
                raise ApiError("duplicate_update", "this device already uploaded", 409)
        tensors, meta = open_update(sealed, round_id=round_id, device_id=device_id,
                                    transport_private_key=self.keys.transport)
        if meta["base_version"] != row.model_version:
            raise ProtocolError("update_rejected", f"update was trained on version "
                                f"{meta['base_version']}, the round trains {row.model_version}")
        examples, most = int(meta["num_examples"]), int(row.config["max_examples"])
        if not 0 <= examples <= most:
            # FedAvg weighs updates by this count: an unbounded claim would let one device
            # outweigh every other update in the round.
            raise ProtocolError("update_rejected", f"num_examples {examples} is outside "
                                f"[0, max_examples {most}] of the task")
        shapes = {k: tuple(v) for k, v in row.config["expected_shapes"].items()}
        norm = validate_update(tensors, shapes, float(row.config["clip_norm"]))
        # Stored: the validated plaintext PRT1 frame, not the sealed bytes. Aggregation then
        # never needs the transport private key again (rotating it cannot strand accepted
        # updates), and what is stored is exactly what was validated. Individual updates
        # are plaintext at rest only until the round ends: their blobs are deleted then.
        digest = self.blobs.put(encode_tensors(tensors, meta))  # fsynced before the commit
        try:
            with self.db.transaction() as session:
                counted = session.execute(
                    update(Round).where(Round.id == round_id, Round.state == "collecting")
                    .values(received_count=Round.received_count + 1)
                ).rowcount
                if counted != 1:
                    raise ApiError("round_closed", f"round {round_id} closed meanwhile", 409)
                session.add(Update(round_id=round_id, device_id=device_id, blob_sha256=digest,
                                   num_examples=int(meta["num_examples"]), size=len(sealed),
                                   norm=norm))
        except (ApiError, IntegrityError) as exc:
            # Refused after all (a simultaneous upload of this device won, or the round
            # closed): its plaintext frame must not stay behind, unless an accepted update
            # has the very same bytes.
            with self.db.session() as session:
                if session.scalar(select(Update.id).where(Update.blob_sha256 == digest)) is None:
                    self.blobs.delete(digest)
            if isinstance(exc, ApiError):
                raise
            raise ApiError("duplicate_update", "this device already uploaded", 409) from None
        if self.metrics is not None:
            self.metrics.updates_accepted.inc()
        log.info("round %s: update from %s accepted (%d bytes, norm %.4g)", round_id,
                 device_id, len(sealed), norm,
                 extra={"round_id": round_id, "device_id": device_id, "bytes": len(sealed),
                        "norm": norm})
        self.advance(round_id)  # the update that completes the round aggregates it now
        return {"accepted": True, "round_id": round_id}

    def _secagg_round(self, round_id: str, device_id: str) -> Round:
        self.advance(round_id)
        with self.db.session() as session:
            row = session.get(Round, round_id)
            selected = session.get(Selection, (round_id, device_id)) is not None
        if row is None:
            raise ApiError("not_found", f"no round {round_id}", 404)
        if row.config["upload_scheme"] != secagg.SCHEME:
            raise ApiError("wrong_scheme", f"round {round_id} takes uploads through "
                           f"{row.config['upload_scheme']}", 409)
        if not selected:
            raise ApiError("not_selected", f"this device is not in round {round_id}", 403)
        return row

    def secagg_poll(self, device_id: str, round_id: str) -> dict[str, Any]:
        """GET /v1/rounds/<id>/secagg: what this device should do next."""
        return self.secagg.poll(self._secagg_round(round_id, device_id), device_id)

    def secagg_answer(self, device_id: str, round_id: str, stage: str, body: Any
                      ) -> dict[str, Any]:
        """POST /v1/rounds/<id>/secagg/<stage>: one device's answer, durably recorded."""
        row = self._secagg_round(round_id, device_id)
        handler = {"advertise": self.secagg.advertise, "shares": self.secagg.post_shares,
                   "masked": self.secagg.post_masked, "unmask": self.secagg.post_unmask}[stage]
        handler(row, device_id, body)
        if self.metrics is not None and stage == "masked":
            self.metrics.updates_accepted.inc()
        log.info("round %s: %s from %s accepted", round_id, stage, device_id,
                 extra={"round_id": round_id, "device_id": device_id, "stage": stage})
        self.advance(round_id)  # the answer that completes a stage moves the round on now
        return {"accepted": True, "round_id": round_id, "stage": stage}

    # --- the state machine ---------------------------------------------------------------

    def advance(self, round_id: str | None = None) -> None:
        """Move active rounds on: open -> collecting; collecting -> finish when full or past
        the deadline; aggregating with an expired lease -> taken over. Idempotent."""
        if not self._swept:
            self._swept = True
            self._sweep_ended_rounds()
        now = utcnow()
        with self.db.session() as session:
            query = select(Round).where(Round.state.in_(ACTIVE))
            if round_id is not None:
                query = query.where(Round.id == round_id)
            rows = session.scalars(query).all()
        for row in rows:
            if row.state == "open":
                with self.db.transaction() as session:
                    session.execute(update(Round).where(Round.id == row.id,
                                                        Round.state == "open")
                                    .values(state="collecting"))
                row.state = "collecting"
            if row.config["upload_scheme"] == secagg.SCHEME and (
                row.state in secure_aggregation.STAGES
            ):
                self._advance_secagg(row, now)
                continue
            if row.state == "collecting" and selection.collecting_done(row, now):
                self._finish_soon(row.id, takeover=False)
            elif row.state == "aggregating" and (
                row.lease_until is None or now >= as_utc(row.lease_until)
            ):
                self._finish_soon(row.id, takeover=True)

    def _advance_secagg(self, row: Round, now: Any) -> None:
        """Close the current SecAgg+ stage when it is done; unmasking closes into the usual
        aggregation claim. A round that can no longer finish fails here."""
        if not self.secagg.ready(row, now):
            return
        if row.state == "unmasking":
            self._finish_soon(row.id, takeover=False, from_state="unmasking")
            return
        reason = self.secagg.close_stage(row, now)
        if reason is not None:
            with self.db.transaction() as session:
                failed = session.execute(
                    update(Round).where(Round.id == row.id, Round.state == row.state,
                                        Round.received_count == row.received_count)
                    .values(state="failed", reason=reason, finished_at=utcnow())).rowcount
            if failed == 1:
                log.warning("round %s failed at %s: %s", row.id, row.state, reason,
                            extra={"round_id": row.id, "status": "failed", "reason": reason})
                self.secagg.forget(row.id)

    def defer_aggregations(self) -> list[Callable[[], None]]:
        """Until ``stop_deferring`` (one request, this thread), aggregations that ``advance``
        would start are appended to the returned list instead of run: the app runs them
        after the response has been sent, so the device whose answer completed a round is
        not kept waiting (nor timed out) while the server aggregates and exports."""
        self._local.jobs = []
        return self._local.jobs

    def stop_deferring(self) -> None:
        self._local.jobs = None

    def _finish_soon(self, round_id: str, *, takeover: bool, from_state: str = "collecting"
                     ) -> None:
        """Claim the round for aggregation now (so every read after this request sees it
        ``aggregating``), and aggregate now or, while deferring, after the response."""
        claim = self._claim(round_id, takeover=takeover, from_state=from_state)
        if claim is None:
            return  # another worker has it
        jobs = getattr(self._local, "jobs", None)
        if jobs is None:
            self._finish(round_id, claim, takeover=takeover)
        else:
            jobs.append(functools.partial(self._finish, round_id, claim, takeover=takeover))

    def _claim(self, round_id: str, *, takeover: bool, from_state: str) -> str | None:
        """Move the round to ``aggregating`` under a fresh claim and lease, or None when
        another worker holds it (one conditional UPDATE: atomic across workers)."""
        claim = secrets.token_hex(16)
        now = utcnow()
        condition = (Round.state == "aggregating") & (
            (Round.lease_until.is_(None)) | (Round.lease_until <= now)
        ) if takeover else (Round.state == from_state)
        with self.db.transaction() as session:
            claimed = session.execute(
                update(Round).where(Round.id == round_id, condition)
                .values(state="aggregating", claim=claim,
                        lease_until=now + timedelta(seconds=self.lease_s))
            ).rowcount
        return claim if claimed == 1 else None

    def _finish(self, round_id: str, claim: str, *, takeover: bool) -> None:
        """Aggregate and publish (or fail) a round we hold the claim of."""
        with self.db.session() as session:
            row = session.get(Round, round_id)
        if takeover:
            log.warning("round %s: taking over an aggregation whose lease ran out", round_id,
                        extra={"round_id": round_id})
        try:
            if row.config["upload_scheme"] == SEALED_SCHEME and (
                row.received_count < int(row.config["min_clients"])
            ):
                self._fail(row, claim, f"{row.received_count} update(s) by the deadline, "
                           f"min_clients is {row.config['min_clients']}")
                return
            self._aggregate(row, claim)
        except _LostClaim:
            log.warning("round %s: lost the claim; another worker finishes it", round_id,
                        extra={"round_id": round_id})
        except secure_aggregation.SumAboveBound as exc:
            self._fail(row, claim, str(exc))
        except Exception as exc:
            log.exception("round %s: aggregation failed", round_id,
                          extra={"round_id": round_id})
            self._fail(row, claim, f"aggregation failed: {type(exc).__name__}: {exc}")

    def _aggregate_secure(self, row: Round, strategy: Any, weights: dict[str, np.ndarray]
                          ) -> tuple[strategies.RoundResult, int, LedgerEntry | None]:
        """Unmask the SecAgg+ sum, dequantize it and hand it to the strategy. In distributed
        DP mode the devices' noise is already in the sum; the ledger entry then carries the
        effective noise multiplier of the survivors' noise."""
        ring_sum, clients, secure_measurements = self.secagg.unmasked_sum(row)
        result, entry = secure_aggregation.aggregate_ring_sum(
            row.config, strategy, weights, ring_sum, clients, round_id=row.id,
            sampling_rate=float(row.sampling_rate))
        result.measurements.update(secure_measurements)
        return result, clients, entry

    def _renew(self, round_id: str, claim: str) -> None:
        """Extend our lease before a long step (aggregation, the publisher's export), so the
        lease only has to cover the longest single step; _LostClaim if it was taken over."""
        with self.db.transaction() as session:
            renewed = session.execute(
                update(Round).where(Round.id == round_id, Round.state == "aggregating",
                                    Round.claim == claim)
                .values(lease_until=utcnow() + timedelta(seconds=self.lease_s))
            ).rowcount
        if renewed != 1:
            raise _LostClaim(round_id)

    def _fail(self, row: Round, claim: str, reason: str) -> None:
        with self.db.transaction() as session:
            done = session.execute(
                update(Round).where(Round.id == row.id, Round.state == "aggregating",
                                    Round.claim == claim)
                .values(state="failed", reason=reason, finished_at=utcnow(), lease_until=None)
            ).rowcount
        if done == 1:
            log.warning("round %s failed: %s", row.id, reason,
                        extra={"round_id": row.id, "status": "failed", "reason": reason})
            self._drop_update_blobs(row.id)

    def _sweep_ended_rounds(self) -> None:
        """Once per process: the blobs a round drops when it ends are deleted after the commit
        that ends it (a crash before the commit must keep them), so a process killed between
        the two leaves them behind. Sweep the rounds that can be in that state: any ended
        SecAgg+ round still naming a masked input, and the newest ended rounds (update rows
        keep their digests as the round's record, so those are recognised by recency)."""
        with self.db.session() as session:
            ended = select(Round.id).where(Round.state.in_(("published", "failed")))
            recent = session.scalars(ended.order_by(Round.finished_at.desc()).limit(8)).all()
            unforgotten = session.scalars(
                select(SecAggMember.round_id).distinct()
                .where(SecAggMember.round_id.in_(ended),
                       SecAggMember.masked_sha256.is_not(None))).all()
        for round_id in sorted({*recent, *unforgotten}):
            self._drop_update_blobs(round_id)

    def _drop_update_blobs(self, round_id: str) -> None:
        self.secagg.forget(round_id)
        with self.db.session() as session:
            digests = session.scalars(select(Update.blob_sha256)
                                      .where(Update.round_id == round_id)).all()
        for digest in digests:
            self.blobs.delete(digest)

    def _aggregate(self, row: Round, claim: str) -> None:
        started = time.perf_counter()
        config = row.config
        target = int(config["target_clients"])
        with self.db.session() as session:
            base_row = session.get(ModelVersion, row.model_version)
            updates = session.scalars(select(Update).where(Update.round_id == row.id)
                                      .order_by(Update.id)).all()
            previous = session.scalars(
                select(Round).where(Round.state == "published", Round.id != row.id,
                                    Round.strategy_state_sha256.is_not(None))
                .order_by(Round.finished_at.desc())).all()
            entries = self._ledger_entries(session)
        # Central DP noise: a CSPRNG stream under a fresh OS key per aggregation; seeded per
        # round only under DETERMINISTIC_SEED (simulations, tests).
        noise = CryptoRandom() if self.seed is None else CryptoRandom.from_seed(
            f"{self.seed}/noise/{row.id}")
        strategy = strategies.build({**config, "expected_clients": target}, rng=noise)
        dp = config["noise_multiplier"] is not None
        for prev in previous:  # server optimizer state (momentum, Adam moments) carries over
            if prev.config["strategy"] == config["strategy"] and (
                (prev.config["noise_multiplier"] is not None) == dp
            ):
                strategy.load_state(_state_load(self.blobs.get(prev.strategy_state_sha256)))
                break
        if isinstance(strategy, strategies.DPFedAvg):
            strategy.clip_norm = float(config["clip_norm"])  # what the devices clipped to
        scratch = self._scratch()
        try:
            base = extract_version(self.blobs.get(base_row.blob_sha256), scratch / "base")
            weights = base.weights()
            self._renew(row.id, claim)
            entry = None
            if config["upload_scheme"] == secagg.SCHEME:
                result, clients, entry = self._aggregate_secure(row, strategy, weights)
                examples = None  # per-device counts stay on the devices
            else:
                result = strategy.aggregate(weights, [
                    strategies.ClientUpdate(decode_tensors(self.blobs.get(u.blob_sha256))[0],
                                            u.num_examples) for u in updates])
                clients, examples = len(updates), sum(u.num_examples for u in updates)
            aggregate_s = time.perf_counter() - started
            epsilon, computed_by = None, None
            if dp:
                entry = entry or LedgerEntry(row.id, float(config["noise_multiplier"]),
                                             float(row.sampling_rate))
                ledger = Ledger(config["delta"], None, entries, accountant=self.accountant)
                epsilon, computed_by = ledger.record(entry), ledger.computed_by
            with self.db.session() as session:
                version = (highest_version(session) or 0) + 1
            base_provenance = base.manifest.get("provenance") or {}
            provenance = {
                "rounds": int(base_provenance.get("rounds") or 0) + 1,
                "round_id": row.id,
                "clients": clients,
                "upload_scheme": config["upload_scheme"],
                "strategy": strategy.name,
                "clip_norm": float(config["clip_norm"]),
                "noise_multiplier": config["noise_multiplier"],
            }
            self._renew(row.id, claim)
            new_dir = Path(self.publisher(result.weights, base.directory, version,
                                          dict(provenance)))
            manifest = json.loads((new_dir / MANIFEST).read_bytes())
            manifest.update(
                model_version=version,
                parent_version=row.model_version,
                provenance={**base_provenance, **manifest.get("provenance", {}), **provenance},
                privacy={"epsilon": epsilon, "delta": config["delta"] if dp else None,
                         "unit": "device" if dp else None,
                         "mode": entry.mode if dp else None,
                         "mechanism": entry.mechanism if dp else None,
                         "sampling_rate": entry.sampling_rate if dp else None,
                         "selection": config.get("selection") if dp else None,
                         "accountant": DESCRIPTIONS[computed_by] if dp else None},
            )
            (new_dir / MANIFEST).write_bytes(encode_manifest(manifest))
            version_row = sign_and_store(new_dir, blobs=self.blobs, keys=self.keys)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        state_digest = self.blobs.put(_state_bytes(strategy.state()))
        seconds = time.perf_counter() - started
        measurements = {**result.measurements, "updates": float(clients),
                        "aggregate_seconds": aggregate_s, "total_seconds": seconds}
        if examples is not None:
            measurements["examples"] = float(examples)
        with self.db.transaction() as session:
            done = session.execute(
                update(Round).where(Round.id == row.id, Round.state == "aggregating",
                                    Round.claim == claim)
                .values(state="published", published_version=version,
                        measurements=measurements, strategy_state_sha256=state_digest,
                        finished_at=utcnow(), lease_until=None)
            ).rowcount
            if done != 1:
                raise _LostClaim(row.id)
            session.add(version_row)
            if dp:
                session.add(PrivacyLedger(
                    round_id=row.id, noise_multiplier=entry.noise_multiplier,
                    sampling_rate=entry.sampling_rate, steps=1, epsilon=epsilon,
                    delta=float(config["delta"]), mode=entry.mode,
                    mechanism=entry.mechanism, accountant=computed_by))
        if self.metrics is not None:
            self.metrics.aggregation_seconds.observe(seconds)
        log.info("round %s published version %d (%d updates, epsilon %s at delta %s, "
                 "%.2f s)", row.id, version, clients, epsilon,
                 config["delta"] if dp else None, seconds,
                 extra={"round_id": row.id, "status": "published", "version": version,
                        "updates": clients, "epsilon": epsilon,
                        "duration_ms": round(seconds * 1000, 3)})
        self._drop_update_blobs(row.id)
