"""Evaluation numbers per model version, posted by an evaluation job and shown to operators.

``POST /v1/admin/models/<v>/metrics`` with ``{"metrics": {"hr@10": 0.12}, "source":
"offline"}``: ``source`` says where a number comes from (``offline``: held-out data, the
default; ``online``: what devices saw; any other lower-case name); a later post of the same
(version, source, name) replaces the value. Not to be confused with ``sync_server.metrics``
(the Prometheus counters of the server itself)."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from sync_server.db import Database
from sync_server.errors import ApiError
from sync_server.models import ModelMetric, ModelVersion, utcnow

DEFAULT_SOURCE = "offline"
SOURCE_RE = re.compile(r"[a-z][a-z0-9_-]{0,31}")
NAME_RE = re.compile(r"[a-z0-9][a-z0-9@_.-]{0,63}")
MAX_METRICS = 32

# version -> source -> name -> value
VersionMetrics = dict[int, dict[str, dict[str, float]]]


def _bad(message: str) -> ApiError:
    return ApiError("bad_metrics", message, 400)


def parse_metrics(body: dict[str, Any]) -> tuple[str, dict[str, float]]:
    """(source, {name: value}) from a request body, or 400 ``bad_metrics``: at most
    MAX_METRICS names matching NAME_RE, finite numbers (not booleans), a source matching
    SOURCE_RE, no other keys."""
    unknown = sorted(set(body) - {"metrics", "source"})
    if unknown:
        raise _bad(f"unknown keys {unknown}: the body is {{\"metrics\": {{name: number}}, "
                   "\"source\": name}")
    source = body.get("source", DEFAULT_SOURCE)
    if not isinstance(source, str) or not SOURCE_RE.fullmatch(source):
        raise _bad(f"source must match ^{SOURCE_RE.pattern}$, got {source!r}")
    metrics = body.get("metrics")
    if not isinstance(metrics, dict) or not metrics:
        raise _bad("metrics must be a non-empty object {name: number}")
    if len(metrics) > MAX_METRICS:
        raise _bad(f"at most {MAX_METRICS} metrics per request, got {len(metrics)}")
    parsed: dict[str, float] = {}
    for name, value in metrics.items():
        if not NAME_RE.fullmatch(name):
            raise _bad(f"metric names must match ^{NAME_RE.pattern}$, got {name!r}")
        number = finite_number(value)
        if number is None:
            raise _bad(f"metric {name!r} must be a finite number, got {value!r}")
        parsed[name] = number
    return source, parsed


def finite_number(value: Any) -> float | None:
    """``value`` as a finite float; None for NaN, infinities, booleans, non-numbers and
    integers too large for a float."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def record_metrics(db: Database, version: int, source: str, metrics: dict[str, float]) -> None:
    """Store ``metrics`` for ``version`` in one transaction, replacing earlier values of the
    same (source, name). 404 ``not_found`` (as the registry answers) for an unknown version."""
    for attempt in range(3):
        try:
            with db.transaction() as session:
                if session.get(ModelVersion, version) is None:
                    raise ApiError("not_found", f"no model version {version}", 404)
                session.execute(delete(ModelMetric).where(
                    ModelMetric.version == version, ModelMetric.source == source,
                    ModelMetric.name.in_(list(metrics))))
                now = utcnow()
                session.add_all(ModelMetric(version=version, source=source, name=name,
                                            value=value, created_at=now)
                                for name, value in metrics.items())
            return
        except IntegrityError:
            # A concurrent post of the same names won the insert: replace its values too.
            if attempt == 2:
                raise ApiError("metrics_conflict", "the same metrics were posted "
                               "concurrently; retry", 409) from None


def version_metrics(session: Session, versions: Iterable[int] | None = None) -> VersionMetrics:
    """{version: {source: {name: value}}} for ``versions`` (every version when None), sources
    and names in sorted order. Versions without metrics are absent."""
    query = select(ModelMetric.version, ModelMetric.source, ModelMetric.name,
                   ModelMetric.value).order_by(ModelMetric.version, ModelMetric.source,
                                               ModelMetric.name)
    if versions is not None:
        query = query.where(ModelMetric.version.in_(list(versions)))
    out: VersionMetrics = {}
    for version, source, name, value in session.execute(query):
        out.setdefault(version, {}).setdefault(source, {})[name] = value
    return out
