"""Server configuration: defaults < a TOML/JSON file named by ``POCKETREC_SERVER_CONFIG`` <
``POCKETREC_<KEY>`` environment variables < the dict passed to ``create_app``.

Keys:
    DATA_DIR          keys/, blobs/ and the default SQLite file live here
    DATABASE_URL      SQLAlchemy URL; default ``sqlite:///DATA_DIR/pocketrec.db``
    ADMIN_TOKEN       bearer token of the admin API; unset = admin API disabled
    ENROLLMENT_TOKEN  when set, registration requires it (one token shared by all installs)
    ENROLLMENT_MODE   "open" (default: anyone, or ENROLLMENT_TOKEN holders) or "one-time":
                      registration consumes a token minted by POST /v1/admin/enrollment-tokens
    MAX_BODY_BYTES    largest request body a device may send (bytes)
    MAX_BUNDLE_BYTES  largest bundle zip an admin may upload (bytes)
    RATE_LIMIT        requests per minute per device (a fixed one-minute window, counted after
                      the request's signature verified), shared by all workers
    REGISTER_LIMIT_PER_ADDRESS  registrations per client address, in ``limits`` notation
                      (``"N per second|minute|hour|day"``, several joined by ``;``, each must
                      hold); default ``"20 per minute;200 per day"``; ``"off"`` disables it.
                      Counted before anything else is checked, in the database, so it holds
                      across workers (``sync_server.rate_limit``). Raise it for fleets behind
                      one carrier NAT
    CHECKIN_LIMIT_PER_ADDRESS  check-ins per client address (same notation); default
                      ``"600 per minute"`` (devices check in every CHECKIN_RETRY_AFTER s)
    TRUSTED_PROXY_HOPS  0 (default): the client address is the TCP peer (REMOTE_ADDR). N > 0:
                      N reverse proxies the server's operator runs append to
                      X-Forwarded-For, and the client is the Nth address from its right.
                      Set it to exactly the proxies in front: with one too many, a client
                      chooses its own address (and escapes the per-address limits)
    RATE_LIMIT_STORAGE  "database" (default: counters in DATABASE_URL's ``rate_limits``
                      table) or a ``limits`` storage URI such as ``redis://host:6379`` (its
                      client library installed separately)
    CHECKIN_RETRY_AFTER  seconds a device is told to wait when no task is offered
    PUBLISHER         "module:function" turning a round's new float weights into a bundle
                      directory (see ``sync_server.rounds``); imported on first use. Default
                      ``sync_server.publisher:patch_or_export``: new weights written into
                      the base's LiteRT file, the full export only when that cannot be done
    AGGREGATION_LEASE_S  seconds a worker's claim on an aggregating round lasts (default
                      120); a round whose worker died (or whose server was killed) is taken
                      over by the first request after that. The holder renews it before each
                      long step, so it must outlast the longest one (the publisher's export)
    DEVICE_RETENTION_DAYS  a registered device not seen for this many days is deleted once no
                      round record names it (default 180; 0 = never): it must register again
    ROUND_RECORD_RETENTION_DAYS  per-device rows of rounds that ended this many days ago
                      (selection coins, selections, update records, SecAgg+ membership) are
                      deleted (default 30; 0 = never); rounds and the ledger stay
    RETENTION_SWEEP_S  seconds between a worker's retention sweeps (default 3600; also on
                      demand: POST /v1/admin/retention/sweep). See ``sync_server.retention``
    ATTESTATION_VERIFIER  "module:function" called at each registration of a new key with the
                      registration's ``attestation`` evidence (``sync_server.attestation``);
                      unset (default): no attestation
    LOG_FORMAT        "json" (default: one JSON object per line on stderr) or "text"
    DP_ACCOUNTANT     "pld" (default: privacy loss distributions, tight) or "rdp" (Renyi DP),
                      both from Google's dp_accounting; the ledger's epsilon, every row
                      records which one computed it
    DETERMINISTIC_SEED  simulations and tests only: when set, selection coins and DP noise
                      are derived from it (reproducible, so predictable by whoever knows
                      it: no privacy against them); unset (the default) = the OS CSPRNG
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ENV_PREFIX = "POCKETREC_"
CONFIG_FILE_ENV = "POCKETREC_SERVER_CONFIG"

DEFAULTS: dict[str, Any] = {
    "DATA_DIR": "pocketrec-server",
    "DATABASE_URL": None,
    "ADMIN_TOKEN": None,
    "ENROLLMENT_TOKEN": None,
    "MAX_BODY_BYTES": 16 * 2**20,
    "MAX_BUNDLE_BYTES": 256 * 2**20,
    "RATE_LIMIT": 120,
    "REGISTER_LIMIT_PER_ADDRESS": "20 per minute;200 per day",
    "CHECKIN_LIMIT_PER_ADDRESS": "600 per minute",
    "TRUSTED_PROXY_HOPS": 0,
    "RATE_LIMIT_STORAGE": "database",
    "CHECKIN_RETRY_AFTER": 60,
    "PUBLISHER": "sync_server.publisher:patch_or_export",
    "AGGREGATION_LEASE_S": 120,
    "LOG_FORMAT": "json",
    "DETERMINISTIC_SEED": None,
    "DP_ACCOUNTANT": "pld",
    "ENROLLMENT_MODE": "open",
    "DEVICE_RETENTION_DAYS": 180,
    "ROUND_RECORD_RETENTION_DAYS": 30,
    "RETENTION_SWEEP_S": 3600,
    "ATTESTATION_VERIFIER": None,
}
_INTEGERS = {"MAX_BODY_BYTES", "MAX_BUNDLE_BYTES", "RATE_LIMIT", "CHECKIN_RETRY_AFTER",
             "AGGREGATION_LEASE_S", "RETENTION_SWEEP_S"}
# Integers where 0 means "never".
_COUNTS = {"DEVICE_RETENTION_DAYS", "ROUND_RECORD_RETENTION_DAYS"}


class ConfigError(ValueError):
    """The configuration cannot be used; the message names the key and what to change."""


def _read_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{CONFIG_FILE_ENV}={path}: cannot read it: {exc}") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text.decode())
    except (ValueError, UnicodeDecodeError) as exc:
        kind = "JSON" if path.suffix == ".json" else "TOML"
        raise ConfigError(f"{path} is not valid {kind}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a table/object of settings")
    return {str(k).upper(): v for k, v in data.items()}


def load_config(
    overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """The effective configuration (see the module docstring for the precedence)."""
    environ = os.environ if environ is None else environ
    config = dict(DEFAULTS)
    if environ.get(CONFIG_FILE_ENV):
        config.update(_read_file(Path(environ[CONFIG_FILE_ENV])))
    for key in DEFAULTS:
        if ENV_PREFIX + key in environ:
            config[key] = environ[ENV_PREFIX + key]
    config.update({str(k).upper(): v for k, v in (overrides or {}).items()})
    unknown = sorted(set(config) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown setting(s) {unknown}; known: {sorted(DEFAULTS)}")
    for key in _INTEGERS:
        try:
            config[key] = int(config[key])
        except (TypeError, ValueError):
            raise ConfigError(f"{key} must be an integer, got {config[key]!r}") from None
        if config[key] <= 0:
            raise ConfigError(f"{key} must be positive, got {config[key]}")
    for key in _COUNTS:
        try:
            config[key] = int(config[key])
        except (TypeError, ValueError):
            raise ConfigError(f"{key} must be an integer, got {config[key]!r}") from None
        if config[key] < 0:
            raise ConfigError(f"{key} must be >= 0 (0 = keep forever), got {config[key]}")
    for key in ("ADMIN_TOKEN", "ENROLLMENT_TOKEN", "DATABASE_URL", "DETERMINISTIC_SEED",
                "ATTESTATION_VERIFIER"):
        config[key] = config[key] or None  # an empty variable means unset
    if config["DETERMINISTIC_SEED"] is not None:
        config["DETERMINISTIC_SEED"] = str(config["DETERMINISTIC_SEED"])
    config["ENROLLMENT_MODE"] = str(config["ENROLLMENT_MODE"] or "open").lower()
    if config["ENROLLMENT_MODE"] not in ("open", "one-time"):
        raise ConfigError(f"ENROLLMENT_MODE must be 'open' or 'one-time', got "
                          f"{config['ENROLLMENT_MODE']!r}")
    if config["ENROLLMENT_MODE"] == "one-time" and config["ENROLLMENT_TOKEN"] is not None:
        raise ConfigError("ENROLLMENT_MODE one-time replaces ENROLLMENT_TOKEN: unset it")
    _check_rate_limits(config)
    config["DP_ACCOUNTANT"] = str(config["DP_ACCOUNTANT"] or "pld").lower()
    if config["DP_ACCOUNTANT"] not in ("pld", "rdp"):
        raise ConfigError(f"DP_ACCOUNTANT must be 'pld' or 'rdp', got "
                          f"{config['DP_ACCOUNTANT']!r}")
    config["LOG_FORMAT"] = str(config["LOG_FORMAT"] or "json").lower()
    if config["LOG_FORMAT"] not in ("json", "text"):
        raise ConfigError(f"LOG_FORMAT must be 'json' or 'text', got {config['LOG_FORMAT']!r}")
    config["DATA_DIR"] = str(Path(config["DATA_DIR"]).expanduser().resolve())
    if config["DATABASE_URL"] is None:
        config["DATABASE_URL"] = f"sqlite:///{Path(config['DATA_DIR']) / 'pocketrec.db'}"
    return config


def _check_rate_limits(config: dict[str, Any]) -> None:
    """Parse the per-address limits ("off" -> None), the proxy hops and the storage."""
    from limits import parse_many

    for key in ("REGISTER_LIMIT_PER_ADDRESS", "CHECKIN_LIMIT_PER_ADDRESS"):
        value = str(config[key] if config[key] is not None else "off").strip()
        if value.lower() == "off":
            config[key] = None
            continue
        try:
            parse_many(value)
        except ValueError:
            raise ConfigError(f"{key} must be a limit such as '20 per minute;200 per day' "
                              f"(or 'off'), got {value!r}") from None
        config[key] = value
    try:
        hops = int(config["TRUSTED_PROXY_HOPS"])
    except (TypeError, ValueError):
        hops = -1
    if hops < 0:
        raise ConfigError(f"TRUSTED_PROXY_HOPS must be an integer >= 0, got "
                          f"{config['TRUSTED_PROXY_HOPS']!r}")
    config["TRUSTED_PROXY_HOPS"] = hops
    storage = str(config["RATE_LIMIT_STORAGE"] or "database")
    if storage != "database" and "://" not in storage:
        raise ConfigError(f"RATE_LIMIT_STORAGE must be 'database' or a limits storage URI "
                          f"(e.g. redis://host:6379), got {storage!r}")
    config["RATE_LIMIT_STORAGE"] = storage
