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
``trainer`` (export needs torch)."""

from __future__ import annotations

import importlib
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
                strategy.load_state(_state_load(self.blobs.get(prev.strategy_state_sha256)))
                break
        return strategy

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
            renew()
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
