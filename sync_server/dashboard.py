"""What the operator dashboard shows (``GET /v1/admin/dashboard``, rendered by ``GET
/dashboard``): the newest rounds, every model version with its privacy and evaluation
metrics, the privacy budget, and a per-version series for the chart.

The page polls this every 2 s, so it stays cheap: round views come from
``RoundService.view`` (the same view the rounds API answers), and a view of a finished round
(published / failed: nothing about it changes any more) is kept in memory; the privacy a
version's manifest declares is read once per version (manifests never change). A few small
queries per poll otherwise."""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select

from sync_server import fleet
from sync_server.db import Database
from sync_server.model_metrics import finite_number, version_metrics
from sync_server.models import LedgerRow, ModelVersion, Round, as_utc
from sync_server.rounds import RoundService

RECENT_ROUNDS = 20
FINISHED = ("published", "failed")
# The series the chart draws: (key in the series, metric source, metric name).
SERIES_METRICS = (("hr@10", "offline", "hr@10"), ("online_hr@10", "online", "hr@10"))


def round_progress(view: dict[str, Any]) -> str:
    """One line for the rounds table: uploads against the target for sealed rounds, the
    answers per stage for SecAgg+ rounds."""
    target = view["target_clients"]
    counts = view.get("secagg")
    if counts is None:
        return f"{view['received']}/{target} uploaded ({view['selected']} selected)"
    return (f"{counts.get('advertised', 0)}/{target} advertised, {counts.get('shared', 0)} "
            f"shared, {counts.get('masked', 0)} masked, {counts.get('unmasked', 0)} unmasked")


def _round_row(view: dict[str, Any]) -> dict[str, Any]:
    """The dashboard's slice of a round view."""
    secagg = view["secagg"]
    counts = None if secagg is None else {k: secagg.get(k, 0) for k in (
        "advertised", "shared", "masked", "unmasked")}
    config = view["config"]
    row = {
        "round_id": view["round_id"],
        "state": view["state"],
        "strategy": config["strategy"],
        "upload_scheme": config["upload_scheme"],
        "model_version": view["model_version"],
        "published_version": view["published_version"],
        "target_clients": view["target_clients"],
        "min_clients": view["min_clients"],
        "selected": view["selected"],
        "received": view["received"],
        "secagg": counts,
        "epsilon": view["epsilon"],
        "delta": view["delta"] if config.get("noise_multiplier") is not None else None,
        "sampling_rate": view["sampling_rate"],
        "epsilon_budget": config.get("epsilon_budget"),
        "created_at": view["created_at"],
        "deadline": view["deadline"],
        "reason": view["reason"],
    }
    row["progress"] = round_progress(row)
    return row


def _manifest_privacy(manifest: bytes) -> tuple[float | None, float | None]:
    """(epsilon, delta) a manifest declares in ``privacy``, None where it says nothing."""
    try:
        privacy = json.loads(manifest).get("privacy") or {}
    except (ValueError, AttributeError):
        return None, None
    if not isinstance(privacy, dict):
        return None, None
    return finite_number(privacy.get("epsilon")), finite_number(privacy.get("delta"))


class Dashboard:
    """Assembles the dashboard document for one app; holds the per-process caches."""

    def __init__(self, db: Database, rounds: RoundService) -> None:
        self.db = db
        self.rounds = rounds
        self._lock = threading.Lock()
        self._finished_views: dict[str, dict[str, Any]] = {}
        self._privacy: dict[int, tuple[float | None, float | None]] = {}

    def data(self) -> dict[str, Any]:
        """The whole document (see docs/ARCHITECTURE.md, "Dashboard")."""
        rounds = self._recent_rounds()
        models = self._models()
        with self.db.session() as session:
            spent = session.execute(select(LedgerRow.epsilon, LedgerRow.delta,
                                           LedgerRow.accountant, LedgerRow.mechanism)
                                    .order_by(LedgerRow.id.desc()).limit(1)).first()
            devices = fleet.summary(session)
        epsilon = spent.epsilon if spent is not None else 0.0
        budget = rounds[0]["epsilon_budget"] if rounds else None
        return {
            "rounds": rounds,
            "models": models,
            "privacy": {
                "epsilon": epsilon,
                "delta": spent.delta if spent is not None else None,
                "accountant": spent.accountant if spent is not None else None,
                "mechanism": spent.mechanism if spent is not None else None,
                "budget": budget,
                "budget_left": None if budget is None else budget - epsilon,
            },
            "series": [
                {"version": m["version"], "epsilon": m["epsilon"],
                 **{key: m["metrics"].get(source, {}).get(name)
                    for key, source, name in SERIES_METRICS}}
                for m in models
            ],
            "fleet": devices,
            "generated_at": datetime.now(UTC).isoformat(timespec="milliseconds"),
        }

    def _recent_rounds(self) -> list[dict[str, Any]]:
        """The newest RECENT_ROUNDS rounds, newest first. Active rounds are moved on first,
        as every admin read does (a round past its deadline closes here too)."""
        self.rounds.advance()
        with self.db.session() as session:
            recent = session.execute(select(Round.id, Round.state)
                                     .order_by(Round.created_at.desc(), Round.id.desc())
                                     .limit(RECENT_ROUNDS)).all()
        out = []
        with self._lock:
            cached = dict(self._finished_views)
        for round_id, state in recent:
            row = cached.get(round_id)
            if row is None:
                row = _round_row(self.rounds.view(round_id))
                if state in FINISHED and row["state"] in FINISHED:
                    cached[round_id] = row
            out.append(row)
        with self._lock:  # keep only what is still shown
            self._finished_views = {r["round_id"]: r for r in out if r["round_id"] in cached}
        return out

    def _models(self) -> list[dict[str, Any]]:
        """Every version, oldest first: status, rollout, the privacy its manifest declares,
        its evaluation metrics."""
        with self.db.session() as session:
            rows = session.execute(select(
                ModelVersion.version, ModelVersion.parent_version, ModelVersion.status,
                ModelVersion.rollout_percent, ModelVersion.created_at,
            ).order_by(ModelVersion.version)).all()
            with self._lock:
                missing = [r.version for r in rows if r.version not in self._privacy]
            if missing:
                manifests = session.execute(select(ModelVersion.version, ModelVersion.manifest)
                                            .where(ModelVersion.version.in_(missing))).all()
                with self._lock:
                    for version, manifest in manifests:
                        self._privacy[version] = _manifest_privacy(manifest)
            metrics = version_metrics(session)
        with self._lock:
            privacy = dict(self._privacy)
        return [
            {
                "version": r.version,
                "parent_version": r.parent_version,
                "status": r.status,
                "rollout_percent": r.rollout_percent,
                "created_at": as_utc(r.created_at).isoformat(),
                "epsilon": privacy.get(r.version, (None, None))[0],
                "delta": privacy.get(r.version, (None, None))[1],
                "metrics": metrics.get(r.version, {}),
            }
            for r in rows
        ]
