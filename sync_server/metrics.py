"""Prometheus metrics in a registry of the app's own (two apps in one process, as in tests,
never share or collide).

Request counters and the aggregation-time histogram are per process. Round state, updates,
bytes and epsilon are read from the database at scrape time, so every gunicorn worker
reports the same, true numbers."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from flask import Flask, Response, request
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from sync_server import fleet
from sync_server.db import Database
from sync_server.models import LedgerRow, Round, Update

ROUND_STATES = ("open", "collecting", "aggregating", "published", "failed")


class _RoundCollector(Collector):
    def __init__(self, db: Database) -> None:
        self._db = db

    def collect(self) -> Iterator[Any]:
        with self._db.session() as session:
            by_state = dict(session.execute(
                select(Round.state, func.count()).group_by(Round.state)).all())
            active = session.scalars(select(Round).where(
                Round.state.in_(("open", "collecting", "aggregating")))).first()
            updates, size = session.execute(
                select(func.count(Update.id), func.coalesce(func.sum(Update.size), 0))).one()
            spent = session.scalars(select(LedgerRow)
                                    .order_by(LedgerRow.id.desc()).limit(1)).first()
            devices = fleet.summary(session)
            last = session.scalars(select(Round.measurements)
                                   .where(Round.state == "published")
                                   .order_by(Round.finished_at.desc()).limit(1)).first()
        rounds = GaugeMetricFamily("pocketrec_rounds", "rounds by state", labels=["state"])
        for state in ROUND_STATES:
            rounds.add_metric([state], by_state.get(state, 0))
        yield rounds
        current = GaugeMetricFamily(
            "pocketrec_round_active", "1 while a round is in this state", labels=["state"])
        for state in ("open", "collecting", "aggregating"):
            current.add_metric([state], 1 if active is not None and active.state == state
                               else 0)
        yield current
        yield GaugeMetricFamily("pocketrec_round_selected", "devices selected in the active "
                                "round", value=active.selected_count if active else 0)
        yield GaugeMetricFamily("pocketrec_round_received", "updates received in the active "
                                "round", value=active.received_count if active else 0)
        yield CounterMetricFamily("pocketrec_updates_received", "updates accepted, all rounds",
                                  value=updates)
        yield CounterMetricFamily("pocketrec_update_bytes", "sealed bytes of accepted updates",
                                  value=size)
        yield GaugeMetricFamily("pocketrec_epsilon_spent", "cumulative user-level epsilon of "
                                "all published DP rounds, at pocketrec_epsilon_delta",
                                value=spent.epsilon if spent else 0.0)
        yield GaugeMetricFamily("pocketrec_epsilon_delta", "the delta of "
                                "pocketrec_epsilon_spent (0: no DP round yet)",
                                value=spent.delta if spent else 0.0)
        accountant = GaugeMetricFamily(
            "pocketrec_epsilon_accountant", "1 for the accountant and mechanism of the newest "
            "ledger row", labels=["accountant", "mechanism"])
        if spent is not None:
            accountant.add_metric([spent.accountant, spent.mechanism], 1)
        yield accountant
        yield GaugeMetricFamily("pocketrec_devices_registered", "device keys registered "
                                "(anyone can register one)", value=devices["registered"])
        yield GaugeMetricFamily("pocketrec_devices_seen_last_day", "devices that made a "
                                "signed request in the last 24 h",
                                value=devices["seen_last_day"])
        by_version = GaugeMetricFamily(
            "pocketrec_devices_by_version", "devices seen in the last 24 h by the model "
            "version reported at their latest check-in", labels=["version"])
        for version, count in devices["by_version"].items():
            by_version.add_metric([version], count)
        yield by_version
        yield GaugeMetricFamily(
            "pocketrec_last_aggregation_seconds", "load + aggregate + publish time of the "
            "last published round", value=(last or {}).get("total_seconds", 0.0))


class Metrics:
    """The server's counters and the round collector."""

    def __init__(self, db: Database | None = None) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "pocketrec_http_requests", "HTTP requests answered",
            ["endpoint", "method", "status"], registry=self.registry,
        )
        self.bytes_received = Counter(
            "pocketrec_http_received_bytes", "request body bytes received",
            ["endpoint"], registry=self.registry,
        )
        self.updates_accepted = Counter(
            "pocketrec_process_updates_accepted", "updates accepted by this process",
            registry=self.registry,
        )
        self.aggregation_seconds = Histogram(
            "pocketrec_aggregation_seconds", "round aggregation time in this process "
            "(load, aggregate, publish, sign)", registry=self.registry,
            buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600),
        )
        if db is not None:
            self.registry.register(_RoundCollector(db))

    def install(self, app: Flask) -> None:
        """Count every response, labelled by route name (not path: ids would explode the
        label set)."""

        @app.after_request
        def _count(response: Response) -> Response:
            endpoint = request.endpoint or "unmatched"
            self.requests.labels(endpoint, request.method, str(response.status_code)).inc()
            length = request.content_length or 0
            if length:
                self.bytes_received.labels(endpoint).inc(length)
            return response
