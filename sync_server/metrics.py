"""Prometheus metrics in a registry of the app's own (two apps in one process, as in tests,
never share or collide)."""

from __future__ import annotations

from flask import Flask, Response, request
from prometheus_client import CollectorRegistry, Counter


class Metrics:
    """The server's counters; rounds, aggregation time and epsilon join them later."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "pocketrec_http_requests", "HTTP requests answered",
            ["endpoint", "method", "status"], registry=self.registry,
        )
        self.bytes_received = Counter(
            "pocketrec_http_received_bytes", "request body bytes received",
            ["endpoint"], registry=self.registry,
        )

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
