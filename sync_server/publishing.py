"""Publishing a round: aggregate, noise, account, export, sign, store, in that order.

The state machine (``sync_server.rounds``) hands over a round it holds the aggregation
claim of; ``RoundPublishing.publish`` builds the round's strategy (its optimizer state
carried over from the last comparable round), lets the round's upload scheme
(``sync_server.upload_schemes``) produce the sum and the strategy's result, records the
privacy cost, has the *publisher* write the new bundle, signs it, and writes the new model
version, the ledger entry and the round's outcome in ONE transaction, conditional on the
claim: the noised result is either released and accounted, or neither.

A *publisher* is a callable ``(weights, base_bundle_dir, version, provenance) -> Path`` of a
new unsigned bundle directory; ``create_app(publisher=...)`` passes one, or the
``PUBLISHER`` setting names one as "module:function" (imported on first use). The default,
``sync_server.publisher:patch_or_export``, writes the weights into the base's LiteRT file
(milliseconds, no torch) and falls back to ``trainer.publish:export_weights`` (the real
export) when it cannot; ``sync_server.registry:republish_weights`` replaces weights.npz
only. Whatever the publisher wrote, the server sets the manifest's ``model_version``,
``parent_version``, ``provenance`` and ``privacy`` itself. The server never imports
``trainer`` (export needs torch).

A served average (the round config's ``serve_ema``): the new version's model file serves
the exponential moving average of the published weights (``publisher.served_average`` of
the base version's served tensors and the round's result) while its weights.npz keeps the
result, the point the next round's devices train from. The served tensors are kept in the
publishing round's state blob (``SERVED`` keys, beside the optimizer state), so the next
round finds its base's; a publisher is then called with ``served=`` and ``base_served=``
(the default one takes them; one that does not fails such a round, naming why)."""

from __future__ import annotations

import importlib
import inspect
import io
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select, update

from device_sdk.bundle import MANIFEST, encode_manifest
from device_sdk.csprng import CryptoRandom
from sync_server import strategies
from sync_server.blobs import BlobStore
from sync_server.db import Database
from sync_server.keys import ServerKeyPairs
from sync_server.models import LedgerRow, ModelVersion, Round, utcnow
from sync_server.privacy import DESCRIPTIONS, LedgerEntry, PrivacyLedger
from sync_server.publisher import served_average
from sync_server.registry import extract_version, highest_version, sign_and_store
from sync_server.upload_schemes import RoundScheme

log = logging.getLogger(__name__)

Publisher = Callable[[dict[str, np.ndarray], Path, int, dict[str, Any]], Path]


class LostClaim(RuntimeError):
    """Another worker took the round over (our lease ran out): our result is discarded."""


def resolve_publisher(spec: str) -> Publisher:
    """``"module:function"`` -> the callable (imported now, on first use)."""
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ValueError(f"PUBLISHER must be 'module:function', got {spec!r}")
    return getattr(importlib.import_module(module), name)


def ledger_entries(session: Any) -> list[LedgerEntry]:
    """Every round's privacy cost so far, oldest first (what the accountant composes)."""
    rows = session.scalars(select(LedgerRow).order_by(LedgerRow.id)).all()
    return [LedgerEntry(r.round_id, r.noise_multiplier, r.sampling_rate, r.steps, r.mode)
            for r in rows]


SERVED = "served/"  # state-blob keys of a version's served tensors (serve_ema)


def _state_bytes(state: Mapping[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in state.items()})
    return buf.getvalue()


def _state_load(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


class RoundPublishing:
    """Aggregate-and-publish for ``RoundService`` (same database, blobs and keys)."""

    def __init__(self, *, db: Database, blobs: BlobStore, keys: ServerKeyPairs,
                 scratch_dir: Path, publisher: Publisher | str, accountant: str,
                 seed: str | None, metrics: Any) -> None:
        self.db, self.blobs, self.keys = db, blobs, keys
        self.scratch_dir = Path(scratch_dir)
        self._publisher = publisher
        self.accountant = accountant
        self.seed = seed
        self.metrics = metrics

    @property
    def publisher(self) -> Publisher:
        if isinstance(self._publisher, str):
            self._publisher = resolve_publisher(self._publisher)
        return self._publisher

    def scratch(self) -> Path:
        self.scratch_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        return Path(tempfile.mkdtemp(dir=self.scratch_dir))

    def _strategy(self, row: Round, previous: list[Round]) -> strategies.Strategy:
        """The round's strategy, its optimizer state (momentum, Adam moments) carried over
        from the newest published round of the same strategy and the same DP-ness."""
        config = row.config
        # Central DP noise: a CSPRNG stream under a fresh OS key per aggregation; seeded per
        # round only under DETERMINISTIC_SEED (simulations, tests).
        noise = CryptoRandom() if self.seed is None else CryptoRandom.from_seed(
            f"{self.seed}/noise/{row.id}")
        strategy = strategies.build({**config, "expected_clients": config["target_clients"]},
                                    rng=noise)
        dp = config["noise_multiplier"] is not None
        for prev in previous:
            if prev.config["strategy"] == config["strategy"] and (
                (prev.config["noise_multiplier"] is not None) == dp
            ):
                state = _state_load(self.blobs.get(prev.strategy_state_sha256))
                strategy.load_state({k: v for k, v in state.items()
                                     if not k.startswith(SERVED)})
                break
        return strategy

    def _base_served(self, session: Any, version: int) -> dict[str, np.ndarray] | None:
        """The tensors version ``version``'s model file serves when they are not its
        weights.npz (a served average), from the state blob of the round that published
        it; else None."""
        digest = session.scalar(select(Round.strategy_state_sha256).where(
            Round.published_version == version, Round.state == "published"))
        if digest is None:
            return None
        served = {k[len(SERVED):]: v for k, v in _state_load(self.blobs.get(digest)).items()
                  if k.startswith(SERVED)}
        return served or None

    def _publish_files(self, weights: dict[str, np.ndarray], base: Any, version: int,
                       provenance: dict[str, Any], served: dict[str, np.ndarray] | None,
                       base_served: dict[str, np.ndarray] | None) -> Path:
        """The publisher's new bundle; with a served average (or a base that served one)
        the publisher must take ``served=`` and ``base_served=``."""
        if served is None and base_served is None:
            return Path(self.publisher(weights, base.directory, version, provenance))
        if "served" not in inspect.signature(self.publisher).parameters:
            raise RuntimeError(
                f"the publisher {getattr(self.publisher, '__name__', self.publisher)!r} takes "
                "no served= tensors, which serve_ema (or a base version that served an "
                "average) needs; use sync_server.publisher:patch_or_export")
        return Path(self.publisher(weights, base.directory, version, provenance,
                                   served=served, base_served=base_served))

    def publish(self, row: Round, claim: str, scheme: RoundScheme,
                renew: Callable[[], None]) -> None:
        """Aggregate and publish ``row`` (we hold ``claim``); ``renew`` extends the lease
        before each long step and raises LostClaim when the round was taken over."""
        started = time.perf_counter()
        config = row.config
        with self.db.session() as session:
            base_row = session.get(ModelVersion, row.model_version)
            previous = list(session.scalars(
                select(Round).where(Round.state == "published", Round.id != row.id,
                                    Round.strategy_state_sha256.is_not(None))
                .order_by(Round.finished_at.desc())).all())
            entries = ledger_entries(session)
            base_served = self._base_served(session, row.model_version)
        strategy = self._strategy(row, previous)
        dp = config["noise_multiplier"] is not None
        scratch = self.scratch()
        try:
            base = extract_version(self.blobs.get(base_row.blob_sha256), scratch / "base")
            weights = base.weights()
            renew()
            summed = scheme.aggregate(row, strategy, weights)
            result, clients, entry = summed.result, summed.clients, summed.entry
            aggregate_s = time.perf_counter() - started
            epsilon, computed_by = None, None
            if dp:
                entry = entry or LedgerEntry(row.id, float(config["noise_multiplier"]),
                                             float(row.sampling_rate))
                ledger = PrivacyLedger(config["delta"], None, entries,
                                       accountant=self.accountant)
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
            decay = config.get("serve_ema")
            served = None
            if decay is not None:
                served = served_average(decay, base_served or weights, result.weights)
            if decay is not None or "serve_ema" in base_provenance:  # never inherited
                provenance["serve_ema"] = None if decay is None else float(decay)
            renew()
            new_dir = self._publish_files(result.weights, base, version, dict(provenance),
                                          served, base_served)
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
        state = dict(strategy.state())
        if served is not None:
            state.update({SERVED + k: v for k, v in served.items()})
        state_digest = self.blobs.put(_state_bytes(state))
        seconds = time.perf_counter() - started
        measurements = {**result.measurements, "updates": float(clients),
                        "aggregate_seconds": aggregate_s, "total_seconds": seconds}
        if summed.examples is not None:
            measurements["examples"] = float(summed.examples)
        with self.db.transaction() as session:
            done = session.execute(
                update(Round).where(Round.id == row.id, Round.state == "aggregating",
                                    Round.claim == claim)
                .values(state="published", published_version=version,
                        measurements=measurements, strategy_state_sha256=state_digest,
                        finished_at=utcnow(), lease_until=None)
            ).rowcount
            if done != 1:
                raise LostClaim(row.id)
            session.add(version_row)
            if dp:
                session.add(LedgerRow(
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
