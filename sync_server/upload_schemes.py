"""Upload schemes, server side: one object per scheme, the mirror of the device's
``device_sdk.uploads`` registry. A round's ``upload_scheme`` names one; the round state
machine (``sync_server.rounds``) and publishing (``sync_server.publishing``) ask it for
everything that differs between schemes, so adding a scheme touches this file only.

- ``SealedRounds`` (``sealed-x25519-v1``): each selected device POSTs its update sealed to
  the server's transport key; the server opens, validates (names, shapes, clip) and stores
  it, and aggregates the stored updates.
- ``SecAggRounds`` (``secagg+-v1``, the default): the SecAgg+ stages
  (``sync_server.secure_aggregation``); the server only ever sees the sum.

Class-level methods (config defaults and checks, the task's scheme parameters) need no
server; ``build`` makes the instances a ``RoundService`` uses."""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from device_sdk import secagg
from device_sdk.protocol import (
    SEALED_SCHEME,
    ProtocolError,
    decode_tensors,
    encode_tensors,
    open_update,
    validate_update,
)
from sync_server import secure_aggregation, selection, strategies
from sync_server.blobs import BlobStore
from sync_server.db import Database
from sync_server.errors import ApiError
from sync_server.keys import ServerKeyPairs
from sync_server.models import Round, Selection, Update, as_utc, utcnow
from sync_server.privacy import LedgerEntry

log = logging.getLogger(__name__)


def bad_round_config(message: str) -> ApiError:
    return ApiError("bad_round_config", message, 400)


@dataclass
class Aggregate:
    """What a scheme's aggregation gives publishing: the strategy's result, how many devices
    it sums, their example count (None: it stays on the devices) and, when the devices
    added the noise, the ledger entry for it."""

    result: strategies.RoundResult
    clients: int
    examples: int | None = None
    entry: LedgerEntry | None = None


class RoundScheme(ABC):
    """What the state machine and publishing ask of a round's upload scheme. The class-level
    half (defaults, checks, task parameters) needs no server."""

    name: ClassVar[str]
    # A floor on min_clients where the config leaves it to the server (Poisson cohorts).
    min_clients_floor: ClassVar[int] = 1

    def __init__(self, *, db: Database, blobs: BlobStore, keys: ServerKeyPairs,
                 metrics: Any, advance: Callable[[str], None]) -> None:
        self.db, self.blobs, self.keys, self.metrics = db, blobs, keys, metrics
        self._advance = advance

    @classmethod
    def default_min_clients(cls, config: Mapping[str, Any]) -> int:
        """min_clients when the operator sent none and selection is first come (q = 1)."""
        return int(config["target_clients"])

    @classmethod
    @abstractmethod
    def check_config(cls, config: Mapping[str, Any]) -> None:
        """400 ``bad_round_config`` on settings this scheme cannot run."""

    @classmethod
    def task_params(cls, stored: Mapping[str, Any]) -> dict[str, Any] | None:
        """The task's scheme parameters (its ``secagg`` field), or None."""
        return None

    @classmethod
    def projected_noise(cls, stored: Mapping[str, Any]) -> float:
        """The noise multiplier the ledger projects for the round before it runs."""
        return float(stored["noise_multiplier"])

    def view(self, row: Round) -> dict[str, Any] | None:
        """The scheme's part of the round view (``secagg``), or None."""
        return None

    def advance(self, row: Round, now: datetime, finish_soon: Callable[..., None]) -> bool:
        """Move a round through this scheme's own states; False: not in one of them."""
        return False

    def shortfall(self, row: Round) -> str | None:
        """Why the round cannot be aggregated, or None."""
        return None

    @abstractmethod
    def aggregate(self, row: Round, strategy: strategies.Strategy,
                  weights: strategies.Weights) -> Aggregate:
        """The round's sum through the strategy: new weights and what it measured."""

    @abstractmethod
    def forget(self, round_id: str) -> None:
        """Delete what only mattered while the round ran."""


class SealedRounds(RoundScheme):
    """``sealed-x25519-v1``: one sealed POST per device, validated and stored one by one."""

    name: ClassVar[str] = SEALED_SCHEME

    @classmethod
    def check_config(cls, config: Mapping[str, Any]) -> None:
        if config["dp_mode"] == "distributed":
            raise bad_round_config("dp_mode 'distributed' needs upload_scheme secagg+-v1: the "
                                   "devices' noise shares only protect a sum")

    def shortfall(self, row: Round) -> str | None:
        """Why the round cannot be aggregated (too few updates), or None."""
        if row.received_count < int(row.config["min_clients"]):
            return (f"{row.received_count} update(s) by the deadline, min_clients is "
                    f"{row.config['min_clients']}")
        return None

    def aggregate(self, row: Round, strategy: strategies.Strategy,
                  weights: strategies.Weights) -> Aggregate:
        with self.db.session() as session:
            updates = session.scalars(select(Update).where(Update.round_id == row.id)
                                      .order_by(Update.id)).all()
        result = strategy.aggregate(weights, [
            strategies.ClientUpdate(decode_tensors(self.blobs.get(u.blob_sha256))[0],
                                    u.num_examples) for u in updates])
        return Aggregate(result, len(updates), sum(u.num_examples for u in updates))

    def forget(self, round_id: str) -> None:
        """Delete what only mattered during the round: the stored update frames (their rows
        keep the digests as the round's record)."""
        with self.db.session() as session:
            digests = session.scalars(select(Update.blob_sha256)
                                      .where(Update.round_id == round_id)).all()
        for digest in digests:
            self.blobs.delete(digest)

    # --- devices ---------------------------------------------------------------------------

    def accept(self, device_id: str, round_id: str, sealed: bytes) -> dict[str, Any]:
        """Open, validate and durably record an update; answers only after the commit."""
        with self.db.session() as session:
            row = session.get(Round, round_id)
        if row is not None and row.state == "collecting" and utcnow() >= as_utc(row.deadline):
            self._advance(round_id)
            raise ApiError("round_closed", f"round {round_id}: the deadline has passed", 409)
        if row is None or row.state != "collecting":
            state = "unknown" if row is None else row.state
            raise ApiError("round_closed", f"round {round_id} is not collecting ({state})", 409)
        if row.config["upload_scheme"] != self.name:
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
        self._advance(round_id)  # the update that completes the round aggregates it now
        return {"accepted": True, "round_id": round_id}


class SecAggRounds(RoundScheme):
    """``secagg+-v1``: the SecAgg+ stages (``sync_server.secure_aggregation``), then the
    unmasked, dequantized sum, norm-guarded, goes to the strategy."""

    name: ClassVar[str] = secagg.SCHEME
    min_clients_floor: ClassVar[int] = 3  # a sum of two reveals each to the other

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.stages = secure_aggregation.SecAggStages(self.db, self.blobs)

    # --- config ----------------------------------------------------------------------------

    @classmethod
    def default_min_clients(cls, config: Mapping[str, Any]) -> int:
        """SecAgg+ rounds survive the dropout they are built for."""
        if config["target_clients"] < 3:
            return int(config["target_clients"])
        return max(3, math.ceil((1 - secagg.DEFAULT_DROPOUT) * config["target_clients"]))

    @classmethod
    def check_config(cls, config: Mapping[str, Any]) -> None:
        if config["min_clients"] < 3:
            raise bad_round_config(
                f"min_clients {config['min_clients']}: secure aggregation needs at least 3 "
                "devices (a sum of two reveals each to the other); use upload_scheme "
                f"{SEALED_SCHEME!r} for smaller rounds")
        if config["dp_mode"] == "distributed" and config["noise_multiplier"] is None:
            raise bad_round_config("dp_mode 'distributed' needs noise_multiplier")
        if config["secagg_degree"] is not None:
            n = int(config["target_clients"])
            degree = min(int(config["secagg_degree"]), n - 1)
            threshold = config["secagg_threshold"] or secagg.default_threshold(degree)
            try:
                secagg.check_graph(n, degree, int(threshold))
            except secagg.SecAggError as exc:
                raise bad_round_config(exc.message) from None
        elif config["secagg_threshold"] is not None:
            raise bad_round_config("secagg_threshold needs secagg_degree (the default degree "
                                   "comes with its own threshold)")

    @classmethod
    def task_params(cls, stored: Mapping[str, Any]) -> dict[str, Any] | None:
        try:
            return secure_aggregation.task_params(stored)
        except secagg.SecAggError as exc:
            raise bad_round_config(exc.message) from None

    @classmethod
    def projected_noise(cls, stored: Mapping[str, Any]) -> float:
        if stored["dp_mode"] == "distributed":  # the least noise that can reach the sum
            return secure_aggregation.effective_noise_multiplier(stored,
                                                                 int(stored["min_clients"]))
        return float(stored["noise_multiplier"])

    # --- the round -------------------------------------------------------------------------

    def view(self, row: Round) -> dict[str, Any] | None:
        return {**{k: v for k, v in (row.secagg or {}).items() if k != "graph_seed"},
                **self.stages.counts(row.id)}

    def advance(self, row: Round, now: datetime, finish_soon: Callable[..., None]) -> bool:
        """Close the current SecAgg+ stage when it is done; unmasking closes into the usual
        aggregation claim. A round that can no longer finish fails here."""
        if row.state not in secagg.STAGE_BY_STATE:
            return False
        if not self.stages.ready(row, now):
            return True
        if row.state == secagg.STAGES[-1].state:
            finish_soon(row.id, takeover=False, from_state=row.state)
            return True
        reason = self.stages.close_stage(row, now)
        if reason is not None:
            with self.db.transaction() as session:
                failed = session.execute(
                    update(Round).where(Round.id == row.id, Round.state == row.state,
                                        Round.received_count == row.received_count)
                    .values(state="failed", reason=reason, finished_at=utcnow())).rowcount
            if failed == 1:
                log.warning("round %s failed at %s: %s", row.id, row.state, reason,
                            extra={"round_id": row.id, "status": "failed", "reason": reason})
                self.stages.forget(row.id)
        return True

    def aggregate(self, row: Round, strategy: strategies.Strategy,
                  weights: strategies.Weights) -> Aggregate:
        """Unmask the SecAgg+ sum, dequantize it and hand it to the strategy. In distributed
        DP mode the devices' noise is already in the sum; the ledger entry then carries the
        effective noise multiplier of the survivors' noise."""
        ring_sum, clients, secure_measurements = self.stages.unmasked_sum(row)
        result, entry = secure_aggregation.aggregate_ring_sum(
            row.config, strategy, weights, ring_sum, clients, round_id=row.id,
            sampling_rate=float(row.sampling_rate))
        result.measurements.update(secure_measurements)
        return Aggregate(result, clients, None, entry)  # example counts stay on the devices

    def forget(self, round_id: str) -> None:
        self.stages.forget(round_id)

    # --- devices ---------------------------------------------------------------------------

    def _round(self, round_id: str, device_id: str) -> Round:
        self._advance(round_id)
        with self.db.session() as session:
            row = session.get(Round, round_id)
            selected = session.get(Selection, (round_id, device_id)) is not None
        if row is None:
            raise ApiError("not_found", f"no round {round_id}", 404)
        if row.config["upload_scheme"] != self.name:
            raise ApiError("wrong_scheme", f"round {round_id} takes uploads through "
                           f"{row.config['upload_scheme']}", 409)
        if not selected:
            raise ApiError("not_selected", f"this device is not in round {round_id}", 403)
        return row

    def poll(self, device_id: str, round_id: str) -> dict[str, Any]:
        """GET /v1/rounds/<id>/secagg: what this device should do next."""
        return self.stages.poll(self._round(round_id, device_id), device_id)

    def answer(self, device_id: str, round_id: str, stage: secagg.Stage, body: Any
               ) -> dict[str, Any]:
        """POST /v1/rounds/<id>/secagg/<stage.path>: one answer, durably recorded."""
        row = self._round(round_id, device_id)
        self.stages.answer(row, device_id, stage, body)
        if self.metrics is not None and stage.state == "masked_input":
            self.metrics.updates_accepted.inc()
        log.info("round %s: %s from %s accepted", round_id, stage.path, device_id,
                 extra={"round_id": round_id, "device_id": device_id, "stage": stage.path})
        self._advance(round_id)  # the answer that completes a stage moves the round on now
        return {"accepted": True, "round_id": round_id, "stage": stage.path}


# The registry: a round's upload_scheme -> its server side.
SCHEMES: dict[str, type[RoundScheme]] = {cls.name: cls for cls in (SecAggRounds, SealedRounds)}


def build(**kwargs: Any) -> dict[str, RoundScheme]:
    """One instance of each scheme over the service's database, blobs, keys and metrics."""
    return {name: cls(**kwargs) for name, cls in SCHEMES.items()}


def default_min_clients(config: Mapping[str, Any]) -> int:
    """min_clients when the operator sent none."""
    scheme = SCHEMES[config["upload_scheme"]]
    if not selection.capped(config):
        # A Poisson cohort is random: waiting for all of target_clients would fail half the
        # rounds. Half the expected cohort falls short with small probability.
        return max(scheme.min_clients_floor, math.ceil(config["target_clients"] / 2))
    return scheme.default_min_clients(config)


