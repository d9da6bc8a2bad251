"""PocketRec sync server: Flask app factory, SQLAlchemy models, device auth, signed model
distribution, federated rounds with DP aggregation and a privacy ledger (``rounds``).

Development::

    pocketrec serve --host 127.0.0.1 --port 8080 --data-dir server-data
    python -m sync_server --port 8080 --data-dir server-data

Production (configuration from ``POCKETREC_SERVER_CONFIG`` and ``POCKETREC_*`` variables,
see ``sync_server.config``)::

    gunicorn 'sync_server:create_app()' -w 4 -b 0.0.0.0:8080

Each worker runs ``alembic upgrade head`` on start under a file lock, so workers on one host
never migrate concurrently. The per-device rate limit is kept in process memory: with N
workers a device may get up to N times RATE_LIMIT requests per minute."""

from sync_server.app import create_app

__all__ = ["create_app"]
