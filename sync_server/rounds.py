"""Federated rounds: the state machine (claims, leases, stage transitions), sampling at
check-in, and the admin and device entry points. The round config is ``round_config``, what
differs per upload scheme (intake, SecAgg+ stages, how the sum is formed) ``upload_schemes``,
and aggregate-noise-account-export-sign ``publishing``.

States (``rounds.state``; ``device_sdk.secagg.ROUND_STATES``)::

    open -> collecting [-> share_keys -> masked_input -> unmasking] -> aggregating
                                                                       -> published | failed

- ``open``: the row exists (config checked, budget checked); it becomes ``collecting`` in the
  next transaction (a crash in between is repaired by ``advance``).
- ``collecting``: each device checking in with the round's base version gets one stored
  coin of probability q (``sync_server.selection``: Poisson sampling; q = 1 takes every
  device, first come, up to target_clients); selected devices upload once (SecAgg+:
  advertise keys), before the deadline. With q < 1 collecting ends at the deadline (or the
  operator's close-stage) and never early, so no device's selection depends on the others'.
- SecAgg+ rounds then pass the scheme's stages (``sync_server.secure_aggregation``).
- ``aggregating``: claimed by one worker through a conditional UPDATE (state + a random claim
  token + a lease), so two workers never both aggregate; the worker that publishes must still
  hold the claim. A claim whose lease (``AGGREGATION_LEASE_S``, default 120 s) ran out is
  taken over: that is how a round survives a worker killed mid-aggregation, or a server
  killed and restarted (the new process cannot tell a dead worker's claim from a live one on
  another host, so it waits for the lease: at most 120 s, at the first request after it).
  The holder renews its lease before each long step (aggregation, the publisher), so the
  lease only has to outlast the longest single step.
- ``published``: the new model version, the ledger entry and the round's outcome are written
  in ONE transaction (``publishing``), so the noised result is either released and
  accounted, or neither.
- Privacy: once any round was differentially private (a ledger entry, or a round configured
  with ``noise_multiplier`` / ``epsilon_budget``), or when this round sets an
  ``epsilon_budget``, a round without ``noise_multiplier`` is refused (409
  ``privacy_required``): its result would escape the accountant.
- ``failed``: fewer than ``min_clients`` updates at the deadline, or the aggregation raised;
  ``reason`` says which.

No timer drives a round: ``advance`` moves rounds on at every check-in, upload, admin read
and dashboard poll, and at the answer that completes a stage. The aggregation a request
starts (``defer_aggregations``) runs after that request's response has been sent, in a
background thread ``app.py`` starts for it in the same worker, so no device waits (or times
out) on an export.
"""

from __future__ import annotations

import functools
import json
import logging
import secrets
import shutil
import threading
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError

from device_sdk import secagg
from device_sdk.protocol import SEALED_SCHEME
from sync_server import round_config, secure_aggregation, selection, upload_schemes
from sync_server.blobs import BlobStore
from sync_server.db import Database
from sync_server.errors import ApiError
from sync_server.keys import ServerKeyPairs
from sync_server.models import (
    LedgerRow,
    ModelVersion,
    Round,
    SecAggMember,
    Selection,
    SelectionCoin,
    Update,
    as_utc,
    utcnow,
)
from sync_server.privacy import DEFAULT_ACCOUNTANT, BudgetExceeded, LedgerEntry, PrivacyLedger
from sync_server.publishing import LostClaim, Publisher, RoundPublishing, ledger_entries
from sync_server.registry import extract_version, newest_full_version
from sync_server.round_config import RoundPlan

log = logging.getLogger(__name__)

ACTIVE = secagg.ACTIVE_STATES
STATES = secagg.ROUND_STATES


def task_json(row: Round) -> dict[str, Any]:
    """The RoundTask a selected device is given, as sent."""
    plan = RoundPlan.from_stored(row.config)
    return plan.task(row.id, as_utc(row.deadline).timestamp()).to_json()


class RoundService:
    """Rounds on one app's database, blob store and keys (``app.extensions``)."""

    def __init__(self, *, db: Database, blobs: BlobStore, keys: ServerKeyPairs,
                 scratch_dir: Path, publisher: Publisher | str, lease_s: int,
                 metrics: Any = None, seed: str | None = None,
                 accountant: str = DEFAULT_ACCOUNTANT) -> None:
        self.db, self.blobs, self.keys = db, blobs, keys
        self.lease_s = lease_s
        self.seed = seed  # DETERMINISTIC_SEED: reproducible coins and noise (not private)
        self.accountant = accountant  # DP_ACCOUNTANT: "pld" | "rdp" (sync_server.privacy)
        self.metrics = metrics
        self.schemes = upload_schemes.build(db=db, blobs=blobs, keys=keys, metrics=metrics,
                                            advance=self.advance)
        self.publishing = RoundPublishing(db=db, blobs=blobs, keys=keys,
                                          scratch_dir=scratch_dir, publisher=publisher,
                                          accountant=accountant, seed=seed, metrics=metrics)
        self._local = threading.local()  # the current request's deferred aggregations
        self._swept = False  # _sweep_ended_rounds ran in this process

    def _scheme(self, row: Round) -> upload_schemes.RoundScheme:
        return self.schemes[row.config["upload_scheme"]]

    # --- admin ---------------------------------------------------------------------------

    def create(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """Open a round (POST /v1/admin/rounds); returns its view."""
        plan = round_config.plan(obj)
        config = plan.config
        self.advance()
        with self.db.session() as session:
            active = session.scalars(select(Round).where(Round.state.in_(ACTIVE))).first()
            if active is not None:
                raise ApiError("round_in_progress", f"round {active.id} is {active.state}; "
                               "one round runs at a time", 409)
            private = self._private_history(session)
            version = plan.derived.model_version
            if version is None:  # never a version still in staged rollout
                version = newest_full_version(session)
            base = None if version is None else session.get(ModelVersion, version)
            if base is None or base.status != "published":
                which = ("no published, fully rolled-out version" if version is None
                         else f"there is no published version {version}")
                raise ApiError("no_model", f"a round trains a published model; {which}", 409)
            n_rounds = session.scalar(select(func.count()).select_from(Round)) or 0
            entries = ledger_entries(session)
            previous_clip = self._previous_clip(session) if (
                config.clip_quantile is not None) else None
        if config.noise_multiplier is None and (
            private or config.epsilon_budget is not None
        ):
            why = ("an epsilon_budget is set" if config.epsilon_budget is not None
                   else f"earlier rounds were differentially private ({private})")
            raise ApiError("privacy_required", f"{why}: a round without noise_multiplier "
                           "would release an update outside the privacy accounting; set "
                           "noise_multiplier", 409)
        trainable = plan.derived.trainable
        if trainable is None:  # the architecture's federated tensors, if it says
            federated = json.loads(base.manifest).get("architecture", {}).get("federated")
            trainable = tuple(federated) if federated else None
        plan = replace(plan, derived=replace(
            plan.derived, model_version=version, trainable=trainable,
            expected_shapes=self._expected_shapes(base, trainable),
            selection="seeded" if self.seed is not None else "csprng"))
        plan = round_config.with_clip(plan, previous_clip)
        scheme = upload_schemes.SCHEMES[config.upload_scheme]
        scheme.task_params(plan.stored())  # 400 if the scheme cannot run on these shapes
        sampling_rate = plan.derived.sampling_rate  # never from a count of keys
        round_id = f"round-{n_rounds + 1}"
        if config.noise_multiplier is not None:
            ledger = PrivacyLedger(plan.derived.delta, config.epsilon_budget, entries,
                                   accountant=self.accountant)
            z = scheme.projected_noise(plan.stored())
            try:
                projected = ledger.check(LedgerEntry(round_id, z, sampling_rate))
            except BudgetExceeded as exc:
                raise ApiError(BudgetExceeded.code, str(exc), 409) from None
            plan = replace(plan, derived=replace(plan.derived, epsilon_projected=projected))
        config = plan.stored()
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

    def _expected_shapes(self, base: ModelVersion, trainable: tuple[str, ...] | None
                         ) -> dict[str, list[int]]:
        scratch = self.publishing.scratch()
        try:
            weights = extract_version(self.blobs.get(base.blob_sha256), scratch).weights()
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        names = sorted(weights) if trainable is None else list(trainable)
        missing = sorted(set(names) - set(weights))
        if missing:
            raise round_config.bad(f"trainable names {missing} are not weights of version "
                                   f"{base.version} (it has {sorted(weights)})")
        return {name: list(weights[name].shape) for name in names}

    @staticmethod
    def _previous_clip(session: Any) -> tuple[str, float] | None:
        """(round id, clip_norm_next) of the newest published round that adapted its clip:
        where adaptive clipping goes on from (``round_config.with_clip``)."""
        rows = session.execute(select(Round.id, Round.measurements)
                               .where(Round.state == "published")
                               .order_by(Round.finished_at.desc()))
        for round_id, measurements in rows:
            clip = (measurements or {}).get("clip_norm_next")
            if clip is not None:
                return round_id, float(clip)
        return None

    @staticmethod
    def _private_history(session: Any) -> str:
        """Why this server is committed to DP ('' if it is not): a privacy ledger entry, or
        an earlier round (whatever its outcome) configured with noise or a budget. Once
        any round was private, a noiseless round would release data the accountant never
        sees, so every later round must be private too."""
        if session.scalar(select(func.count()).select_from(LedgerRow)):
            return "the privacy ledger has entries"
        for round_id, config in session.execute(select(Round.id, Round.config)):
            if config.get("noise_multiplier") is not None or config.get(
                "epsilon_budget"
            ) is not None:
                return f"round {round_id} was configured with DP"
        return ""

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
            ledger = session.scalars(select(LedgerRow)
                                     .where(LedgerRow.round_id == round_id)).first()
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
            "secagg": self._scheme(row).view(row),
        }

    def list_rounds(self) -> dict[str, Any]:
        self.advance()
        with self.db.session() as session:
            ids = session.scalars(select(Round.id).order_by(Round.created_at)).all()
            spent = session.execute(select(LedgerRow.epsilon, LedgerRow.delta)
                                    .order_by(LedgerRow.id.desc()).limit(1)).first()
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
        """POST /v1/rounds/<id>/update: a sealed update (``upload_schemes.SealedRounds``)."""
        return self.schemes[SEALED_SCHEME].accept(device_id, round_id, sealed)

    def secagg_poll(self, device_id: str, round_id: str) -> dict[str, Any]:
        """GET /v1/rounds/<id>/secagg: what this device should do next."""
        return self.schemes[secagg.SCHEME].poll(device_id, round_id)

    def secagg_answer(self, device_id: str, round_id: str, stage: secagg.Stage, body: Any
                      ) -> dict[str, Any]:
        """POST /v1/rounds/<id>/secagg/<stage.path>: one device's answer."""
        return self.schemes[secagg.SCHEME].answer(device_id, round_id, stage, body)

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
            if self._scheme(row).advance(row, now, self._finish_soon):
                continue
            if row.state == "collecting" and selection.collecting_done(row, now):
                self._finish_soon(row.id, takeover=False)
            elif row.state == "aggregating" and (
                row.lease_until is None or now >= as_utc(row.lease_until)
            ):
                self._finish_soon(row.id, takeover=True)

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
            scheme = self._scheme(row)
            shortfall = scheme.shortfall(row)
            if shortfall is not None:
                self._fail(row, claim, shortfall)
                return
            self.publishing.publish(row, claim, scheme,
                                    functools.partial(self._renew, row.id, claim))
            self._drop_update_blobs(row.id)
        except LostClaim:
            log.warning("round %s: lost the claim; another worker finishes it", round_id,
                        extra={"round_id": round_id})
        except secure_aggregation.SumAboveBound as exc:
            self._fail(row, claim, str(exc))
        except Exception as exc:
            log.exception("round %s: aggregation failed", round_id,
                          extra={"round_id": round_id})
            self._fail(row, claim, f"aggregation failed: {type(exc).__name__}: {exc}")

    def _renew(self, round_id: str, claim: str) -> None:
        """Extend our lease before a long step (aggregation, the publisher's export), so the
        lease only has to cover the longest single step; LostClaim if it was taken over."""
        with self.db.transaction() as session:
            renewed = session.execute(
                update(Round).where(Round.id == round_id, Round.state == "aggregating",
                                    Round.claim == claim)
                .values(lease_until=utcnow() + timedelta(seconds=self.lease_s))
            ).rowcount
        if renewed != 1:
            raise LostClaim(round_id)

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
        for scheme in self.schemes.values():
            scheme.forget(round_id)
