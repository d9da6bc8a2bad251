"""The app factory: ``create_app(config)`` wires config, database (migrated to head), keys,
blob store, rate limits (shared by all workers), metrics, rounds, the dashboard, error
handlers and blueprints. No module-level app. Templates (``templates/``) and the dashboard's
script and stylesheet (``static/``, served at ``/static/``) ship inside the package."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flask import Flask, Response, g, request

from sync_server import attestation
from sync_server.api import CONVERTERS, blueprints
from sync_server.auth import NonceStore
from sync_server.blobs import BlobStore
from sync_server.config import ConfigError, load_config
from sync_server.dashboard import Dashboard
from sync_server.db import Database, upgrade
from sync_server.errors import register_error_handlers
from sync_server.keys import ServerKeyPairs
from sync_server.logs import install as install_logging
from sync_server.metrics import Metrics
from sync_server.publishing import Publisher
from sync_server.rate_limit import RateLimits
from sync_server.retention import Retention
from sync_server.rounds import RoundService


def create_app(
    config: Mapping[str, Any] | None = None, publisher: Publisher | None = None
) -> Flask:
    """A configured sync server (see ``sync_server.config`` for the keys). Creates DATA_DIR,
    the keys and the schema on first start. ``publisher`` turns a round's new weights into a
    bundle directory (``sync_server.rounds``); default: the ``PUBLISHER`` setting."""
    settings = load_config(config)
    install_logging(settings["LOG_FORMAT"])
    data_dir = Path(settings["DATA_DIR"])
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)

    app = Flask(__name__)
    app.config["POCKETREC"] = settings
    app.config["MAX_CONTENT_LENGTH"] = settings["MAX_BODY_BYTES"]
    app.json.sort_keys = False
    _install_access_log(app)

    db = Database(settings["DATABASE_URL"])
    upgrade(db.engine, lock_path=data_dir / "migrate.lock")
    # No pooled connection may survive into forked gunicorn workers (gunicorn --preload).
    db.engine.dispose()
    app.extensions["pocketrec_db"] = db
    app.extensions["pocketrec_nonces"] = NonceStore(db)
    app.extensions["pocketrec_keys"] = ServerKeyPairs.load_or_create(data_dir / "keys")
    app.extensions["pocketrec_blobs"] = BlobStore(data_dir / "blobs")
    app.extensions["pocketrec_rate_limits"] = rate_limits = RateLimits(app, db, settings)
    metrics = Metrics(db)
    metrics.install(app)
    app.extensions["pocketrec_metrics"] = metrics
    app.extensions["pocketrec_rounds"] = RoundService(
        db=db, blobs=app.extensions["pocketrec_blobs"], keys=app.extensions["pocketrec_keys"],
        scratch_dir=data_dir / "tmp", publisher=publisher or settings["PUBLISHER"],
        lease_s=settings["AGGREGATION_LEASE_S"], metrics=metrics,
        seed=settings["DETERMINISTIC_SEED"], accountant=settings["DP_ACCOUNTANT"],
    )
    if settings["DETERMINISTIC_SEED"] is not None:
        logging.getLogger(__name__).warning(
            "DETERMINISTIC_SEED is set: selection coins and DP noise are reproducible from "
            "it, so they protect nobody from whoever knows it; for simulations and tests only")
    app.extensions["pocketrec_dashboard"] = Dashboard(db, app.extensions["pocketrec_rounds"])

    app.extensions["pocketrec_retention"] = Retention(db, settings)
    try:
        app.extensions["pocketrec_attestation"] = attestation.resolve(
            settings["ATTESTATION_VERIFIER"])
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigError(f"ATTESTATION_VERIFIER: {exc}") from None

    _defer_aggregations(app)
    _sweep_retention(app)
    register_error_handlers(app)
    app.url_map.converters.update(CONVERTERS)
    # No 308 redirect (an HTML page) from "/v1//x" to "/v1/x": such a path is simply unknown.
    app.url_map.merge_slashes = False
    for bp in blueprints():
        app.register_blueprint(bp)
    rate_limits.limit_views(app)
    logging.getLogger(__name__).info("sync server ready: data in %s", data_dir,
                                      extra={"data_dir": str(data_dir)})
    return app


access_log = logging.getLogger("sync_server.access")


def _install_access_log(app: Flask) -> None:
    """One INFO line per response: method, path, status, duration_ms and, once the request
    was authenticated, device_id. Registered first, so the clock starts before any other
    hook runs."""

    @app.before_request
    def _start_clock() -> None:
        g.pocketrec_started = time.perf_counter()

    @app.after_request
    def _access(response: Response) -> Response:
        started = g.get("pocketrec_started")
        duration_ms = round((time.perf_counter() - started) * 1000, 3) if started else None
        fields = {"method": request.method, "path": request.path,
                  "status": response.status_code, "duration_ms": duration_ms}
        device_id = g.get("device_id")
        if device_id:
            fields["device_id"] = device_id
        access_log.info("%s %s %d %.1f ms", request.method, request.path,
                        response.status_code, duration_ms or 0.0, extra=fields)
        return response


def _defer_aggregations(app: Flask) -> None:
    """A round that a request completes is aggregated after its response is sent
    (``RoundService.defer_aggregations``): ``call_on_close`` runs once the body is out."""
    rounds = app.extensions["pocketrec_rounds"]

    @app.before_request
    def _defer() -> None:
        g.pocketrec_deferred = rounds.defer_aggregations()

    @app.after_request
    def _after_response(response: Response) -> Response:
        jobs = g.pop("pocketrec_deferred", [])
        if jobs:
            def run() -> None:
                for job in jobs:
                    try:
                        job()
                    except Exception:  # the round keeps its lease; a later request resumes it
                        logging.getLogger("sync_server.rounds").exception(
                            "deferred aggregation failed; it resumes when its lease ends")

            # In a thread of its own, so the connection's next request (keep-alive) is not
            # held behind the aggregation nor the request thread tied up by it. A daemon: a
            # worker that exits mid-aggregation leaves a lease that a later request takes
            # over, exactly like a crash.
            response.call_on_close(lambda: threading.Thread(
                target=run, name="pocketrec-aggregation", daemon=True).start())
        return response

    @app.teardown_request
    def _stop(exc: BaseException | None) -> None:
        rounds.stop_deferring()
        for job in g.pop("pocketrec_deferred", []):  # no response went out: run them now
            job()


def _sweep_retention(app: Flask) -> None:
    """Each worker's retention sweep (``sync_server.retention``): at its first response and
    then every RETENTION_SWEEP_S, after the response is sent, in a thread of its own."""
    retention: Retention = app.extensions["pocketrec_retention"]

    def run() -> None:
        try:
            retention.sweep()
        except Exception:  # the database may be away; the next sweep tries again
            logging.getLogger("sync_server.retention").exception("retention sweep failed")

    @app.after_request
    def _maybe_sweep(response: Response) -> Response:
        if retention.due():
            response.call_on_close(lambda: threading.Thread(
                target=run, name="pocketrec-retention", daemon=True).start())
        return response
