"""PocketRec sync server: Flask app factory, SQLAlchemy models, device auth, signed model
distribution, federated rounds with DP aggregation and a privacy ledger (``rounds``).

Development::

    pocketrec serve --host 127.0.0.1 --port 8080 --data-dir server-data
    python -m sync_server --port 8080 --data-dir server-data

Production (configuration from ``POCKETREC_SERVER_CONFIG`` and ``POCKETREC_*`` variables,
see ``sync_server.config``)::

    gunicorn 'sync_server:create_app()' -k gthread --threads 8 -w 4 -b 0.0.0.0:8080

gthread workers, not the default sync ones: keep-alive and database waits that overlap in
threads (README, "Reliability"); a round is aggregated in a thread of the worker after the
response that completed it, and tests/test_load.py checks that a gthread worker outlives an
aggregation longer than ``--timeout``. Threads at most SQLAlchemy's pool size (5 + 10
overflow connections per worker).
Each worker runs ``alembic upgrade head`` on start under a file lock, so workers on one host
never migrate concurrently. Rate limits (per device, and per client address on registration
and check-in) are counted in the database (``sync_server.rate_limit``), so they hold across
all workers.

``create_app`` is imported on first use: ``sync_server.privacy`` (the delta rule, which
central DP-SGD in ``trainer`` shares) then imports without Flask or SQLAlchemy."""

from __future__ import annotations

from typing import Any

__all__ = ["create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from sync_server.app import create_app

        return create_app
    raise AttributeError(f"module 'sync_server' has no attribute {name!r}")
