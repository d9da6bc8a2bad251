"""Structured logs: the real server (subprocess) writes one JSON object per line on stderr,
an access line per request (method, path, status, duration_ms, device_id once known) and the
round events with their fields; the formatter and its installation on their own."""

import io
import json
import logging
import sys

import pytest

from device_sdk.device_identity import DeviceIdentity
from device_sdk.protocol import SEALED_SCHEME
from device_sdk.sync_client import SyncClient
from sync_server import logs
from sync_server.app import create_app
from sync_server.config import ConfigError, load_config
from tests.support.bundles import zip_bundle
from tests.support.server import ADMIN, REPUBLISH, ServerProcess, signing_key_of


def log_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_the_server_logs_one_json_object_per_line_with_access_fields(tmp_path, tiny_export):
    with ServerProcess(tmp_path / "server", ADMIN_TOKEN=ADMIN, RATE_LIMIT=1000,
                       PUBLISHER=REPUBLISH) as server:
        published = server.admin("POST", "/v1/admin/models",
                                 body=zip_bundle(tiny_export.bundle_dir),
                                 headers={"Content-Type": "application/zip"})
        assert published.status == 201
        assert server.request("GET", "/no/such/thing").status == 404
        identity = DeviceIdentity.load_or_create(tmp_path / "device.key")
        client = SyncClient(server.url, identity, server_signing_key=signing_key_of(server),
                            outbox_dir=tmp_path / "outbox", retries=0, timeout=30.0)
        client.register()
        opened = server.admin("POST", "/v1/admin/rounds", json={
            "target_clients": 1, "upload_scheme": SEALED_SCHEME})
        assert opened.status == 201
        round_id = json.loads(opened.data)["round_id"]
        task = client.checkin(1, 10)
        assert task is not None and task.round_id == round_id
    text = server.log_path.read_text()
    assert text.strip(), "the server wrote no log"
    for line in text.splitlines():  # every line, not only ours: no stray text output
        entry = json.loads(line)
        assert {"ts", "level", "logger", "message"} <= set(entry), line
        assert entry["ts"].endswith("Z") and "T" in entry["ts"]
    entries = log_lines(server.log_path)

    access = [e for e in entries if e["logger"] == "sync_server.access"]
    assert all(e["level"] == "INFO" for e in access)
    assert all({"method", "path", "status", "duration_ms"} <= set(e) for e in access)
    assert all(isinstance(e["duration_ms"], float) and e["duration_ms"] >= 0 for e in access)
    by_path = {(e["method"], e["path"]): e for e in access}
    assert by_path[("GET", "/healthz")]["status"] == 200
    assert by_path[("GET", "/no/such/thing")]["status"] == 404
    assert by_path[("POST", "/v1/admin/models")]["status"] == 201
    assert "device_id" not in by_path[("GET", "/healthz")]
    checkin = [e for e in access if e["path"] == "/v1/rounds/checkin"]
    assert checkin and all(e["device_id"] == identity.device_id for e in checkin)

    [opened_line] = [e for e in entries if e["logger"] == "sync_server.rounds"
                     and "opened" in e["message"]]
    assert (opened_line["round_id"], opened_line["version"]) == (round_id, 1)
    assert opened_line["config"]["target_clients"] == 1


def test_json_formatter_carries_extra_fields_and_tracebacks_on_one_line():
    record = logging.LogRecord("sync_server.rounds", logging.WARNING, __file__, 1,
                               "round %s failed", ("round-1",), None)
    record.round_id, record.epsilon = "round-1", 0.5
    entry = json.loads(logs.JsonFormatter().format(record))
    assert entry["message"] == "round round-1 failed"
    assert (entry["level"], entry["logger"]) == ("WARNING", "sync_server.rounds")
    assert (entry["round_id"], entry["epsilon"]) == ("round-1", 0.5)
    try:
        raise ValueError("boom")
    except ValueError:
        failed = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    line = logs.JsonFormatter().format(failed)
    assert "\n" not in line and "ValueError: boom" in json.loads(line)["exc_info"]


def test_create_app_installs_one_handler_and_honours_log_format(tmp_path):
    logger = logging.getLogger("sync_server")
    before = list(logger.handlers)
    try:
        create_app({"DATA_DIR": tmp_path / "a"})
        create_app({"DATA_DIR": tmp_path / "b"})
        ours = [h for h in logger.handlers if getattr(h, "_pocketrec", False)]
        assert len(ours) == 1 and isinstance(ours[0].formatter, logs.JsonFormatter)
        create_app({"DATA_DIR": tmp_path / "c", "LOG_FORMAT": "text"})
        ours = [h for h in logger.handlers if getattr(h, "_pocketrec", False)]
        assert len(ours) == 1 and not isinstance(ours[0].formatter, logs.JsonFormatter)
        stream = io.StringIO()
        ours[0].setStream(stream)
        logging.getLogger("sync_server.rounds").info("hello %s", "there")
        assert stream.getvalue().rstrip().endswith("INFO sync_server.rounds: hello there")
    finally:
        for handler in logger.handlers:
            if handler not in before:
                logger.removeHandler(handler)
    with pytest.raises(ConfigError, match="LOG_FORMAT"):
        load_config({"DATA_DIR": tmp_path, "LOG_FORMAT": "xml"}, environ={})


def test_a_root_handler_installed_later_does_not_repeat_the_servers_lines():
    """The real publisher's export (litert-torch) logs through the root logger, which then
    gets logging's default stderr handler: the server's lines must not go there too."""
    logger = logging.getLogger("sync_server")
    before, propagate = list(logger.handlers), logger.propagate
    root, root_stream, ours_stream = logging.getLogger(), io.StringIO(), io.StringIO()
    # What logging.basicConfig() adds when a library logs through the root logger first.
    root_handler = logging.StreamHandler(root_stream)
    root_handler.setFormatter(logging.Formatter(logging.BASIC_FORMAT))
    handler = logs.install("json")
    old_stream = handler.setStream(ours_stream)
    try:
        root.addHandler(root_handler)
        logging.getLogger("sync_server.access").info("GET /healthz 200", extra={"status": 200})
        [line] = ours_stream.getvalue().splitlines()
        assert json.loads(line)["status"] == 200
        assert root_stream.getvalue() == ""
    finally:
        root.removeHandler(root_handler)
        handler.setStream(old_stream)
        if handler not in before:
            logger.removeHandler(handler)
        logger.propagate = propagate
