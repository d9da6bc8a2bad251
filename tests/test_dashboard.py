"""The operator dashboard on the real sync server (subprocess, real HTTP on loopback, SQLite),
with real devices running rounds: per-version metrics (POST /v1/admin/models/<v>/metrics),
the dashboard document (GET /v1/admin/dashboard), its auth (Bearer or HTTP Basic, read-only
views only), and the page (GET /dashboard) in a real headless Chromium through playwright,
which must update itself in place as rounds publish and metrics arrive.

The browser tests use the system Chromium (/usr/bin/chromium; playwright never downloads
one). Without it they skip, unless POCKETREC_REQUIRE_BROWSER=1 (CI sets it): then they fail.
Waits are bounded; no timed assertions."""

import base64
import json
import os
import time
from datetime import datetime
from functools import partial
from pathlib import Path

import pytest

from device_sdk.protocol import SEALED_SCHEME
from tests.support.bundles import zip_bundle
from tests.support.server import (
    ADMIN,
    REPUBLISH_SETTINGS,
    ServerProcess,
    error_of,
    publish,
    try_open_round,
)

DP_ROUND = {"target_clients": 3, "noise_multiplier": 1.0, "clip_norm": 0.5,
            "local_epochs": 1, "learning_rate": 0.3, "batch_size": 8, "max_examples": 100,
            "delta": 1e-5, "epsilon_budget": 50.0, "upload_scheme": SEALED_SCHEME}
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
WAIT_MS = 20_000  # the page polls every 2 s; a bound for each wait, not a measured time
# Opening the first DP round imports the accountant (opacus, torch) in the server process:
# seconds on a busy machine, more than the helper's default 10 s read timeout.
OPEN_TIMEOUT_S = 120.0
# It answers (status, body); the tests check the status themselves.
open_round = partial(try_open_round, timeout=OPEN_TIMEOUT_S)


@pytest.fixture
def server(tmp_path, tiny_export, db_settings):
    with ServerProcess(tmp_path / "server", **REPUBLISH_SETTINGS, **db_settings) as srv:
        assert publish(srv, zip_bundle(tiny_export.bundle_dir)).status == 201  # version 1
        yield srv


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def dashboard(server) -> dict:
    response = server.admin("GET", "/v1/admin/dashboard")
    assert response.status == 200, response.data
    assert response.headers["Cache-Control"] == "no-store"
    return json.loads(response.data)


def post_metrics(server, version, body, raw=None):
    if raw is not None:
        return server.admin("POST", f"/v1/admin/models/{version}/metrics", body=raw,
                            headers={"Content-Type": "application/json"})
    return server.admin("POST", f"/v1/admin/models/{version}/metrics", json=body)


def models(server) -> dict[int, dict]:
    listed = json.loads(server.admin("GET", "/v1/admin/models").data)["models"]
    return {m["model_version"]: m for m in listed}


# --- auth -----------------------------------------------------------------------------------


def test_dashboard_needs_the_admin_token_as_bearer_or_basic_password(server):
    for path in ("/dashboard", "/v1/admin/dashboard"):
        response = server.request("GET", path)
        assert error_of(response) == (401, "unauthorized")
        assert response.headers["WWW-Authenticate"] == 'Basic realm="pocketrec"'
        for headers in ({"Authorization": "Bearer wrong"}, basic("operator", "wrong"),
                        basic("operator", ADMIN + "x"), {"Authorization": "Basic !!!"},
                        {"Authorization": "Basic " + base64.b64encode(ADMIN.encode()).decode()},
                        {"Authorization": ADMIN}):
            assert error_of(server.request("GET", path, headers=headers)) == (
                401, "unauthorized"), headers
        for headers in (basic("operator", ADMIN), basic("", ADMIN),
                        {"Authorization": f"Bearer {ADMIN}"}):
            assert server.request("GET", path, headers=headers).status == 200, headers

    page = server.request("GET", "/dashboard", headers=basic("operator", ADMIN))
    assert page.headers["Content-Type"].startswith("text/html")
    csp = page.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "default-src 'none'" in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    html = page.data.decode()
    assert 'id="updated-at"' in html and 'id="chart"' in html and "<script>" not in html
    script = server.request("GET", "/static/dashboard.js")  # no secret in it: no auth
    assert script.status == 200 and "javascript" in script.headers["Content-Type"]

    # Basic credentials stay on the read-only dashboard: the rest of the admin API takes the
    # Bearer token alone (a browser would send cached Basic credentials cross-site too).
    assert error_of(server.request("GET", "/v1/admin/models",
                                   headers=basic("operator", ADMIN))) == (401, "unauthorized")
    refused = server.request("POST", "/v1/admin/models/1/metrics", json={"metrics": {"x": 1}},
                             headers=basic("operator", ADMIN))
    assert error_of(refused) == (401, "unauthorized")
    assert models(server)[1]["metrics"] == {}


def test_dashboard_is_disabled_without_an_admin_token(tmp_path):
    with ServerProcess(tmp_path / "server") as srv:
        for path in ("/dashboard", "/v1/admin/dashboard"):
            assert error_of(srv.request("GET", path)) == (403, "admin_disabled")
            assert error_of(srv.request("GET", path, headers=basic("operator", ""))) == (
                403, "admin_disabled")


# --- metrics --------------------------------------------------------------------------------


def test_metrics_are_stored_per_source_and_a_later_post_replaces_a_value(server):
    response = post_metrics(server, 1, {"metrics": {"hr@10": 0.1, "ndcg@10": 0.05}})
    assert response.status == 201
    body = json.loads(response.data)
    assert body["model_version"] == 1
    assert body["metrics"] == {"offline": {"hr@10": 0.1, "ndcg@10": 0.05}}  # default source

    post_metrics(server, 1, {"metrics": {"hr@10": 0.125}, "source": "offline"})
    body = json.loads(post_metrics(server, 1, {"metrics": {"hr@10": 0.2, "sessions": 40},
                                               "source": "online"}).data)
    expected = {"offline": {"hr@10": 0.125, "ndcg@10": 0.05},
                "online": {"hr@10": 0.2, "sessions": 40.0}}
    assert body["metrics"] == expected
    assert models(server)[1]["metrics"] == expected
    assert post_metrics(server, 1, {"metrics": {f"m{i}": i for i in range(32)},
                                    "source": "load-test_2"}).status == 201  # 32 is allowed

    data = dashboard(server)
    [model] = data["models"]
    assert model["metrics"]["online"] == expected["online"]
    assert data["series"] == [{"version": 1, "epsilon": None, "hr@10": 0.125,
                               "online_hr@10": 0.2}]
    # pause / resume answers carry the metrics too
    paused = json.loads(server.admin("POST", "/v1/admin/models/1/pause").data)
    assert paused["status"] == "paused" and paused["metrics"]["offline"]["hr@10"] == 0.125


# --- the dashboard document -----------------------------------------------------------------


def test_dashboard_document_rounds_models_privacy_and_series(server, devices):
    data = dashboard(server)
    assert set(data) == {"rounds", "models", "privacy", "series", "fleet", "generated_at"}
    # the devices fixture synced once each (holding version 1, checked in with it)
    assert data["fleet"] == {"registered": 3, "seen_last_day": 3, "by_version": {"1": 3}}
    assert data["rounds"] == []
    assert data["privacy"] == {"epsilon": 0.0, "delta": None, "accountant": None,
                               "mechanism": None, "budget": None, "budget_left": None}
    [v1] = data["models"]
    assert (v1["version"], v1["status"], v1["rollout_percent"], v1["epsilon"]) == (
        1, "published", 100, None)

    status, opened = open_round(server, **DP_ROUND)
    assert status == 201
    [row] = dashboard(server)["rounds"]
    assert row["round_id"] == opened["round_id"] == "round-1"
    assert (row["state"], row["strategy"], row["upload_scheme"]) == (
        "collecting", "fedavg", SEALED_SCHEME)
    assert (row["target_clients"], row["selected"], row["received"], row["secagg"]) == (
        3, 0, 0, None)
    assert row["progress"] == "0/3 uploaded (0 selected)"

    assert all(device.sync().uploaded for device in devices)
    server.round(opened["round_id"])  # aggregated after the last upload's response
    data = dashboard(server)
    [row] = data["rounds"]
    assert (row["state"], row["published_version"], row["received"]) == ("published", 2, 3)
    assert row["progress"] == "3/3 uploaded (3 selected)"
    epsilon = row["epsilon"]
    assert epsilon > 0 and (row["delta"], row["sampling_rate"]) == (1e-5, 1.0)
    assert [m["version"] for m in data["models"]] == [1, 2]
    v2 = data["models"][1]
    assert (v2["parent_version"], v2["epsilon"], v2["delta"]) == (1, pytest.approx(epsilon),
                                                                 1e-5)
    # q = 1 (the round names no sampling_rate or population): the plain Gaussian mechanism
    assert data["privacy"] == {"epsilon": pytest.approx(epsilon), "delta": 1e-5,
                               "accountant": "pld", "mechanism": "gaussian",
                               "budget": 50.0, "budget_left": pytest.approx(50.0 - epsilon)}

    post_metrics(server, 2, {"metrics": {"hr@10": 0.125, "ndcg@10": 0.06}})
    post_metrics(server, 2, {"metrics": {"hr@10": 0.25}, "source": "online"})
    assert dashboard(server)["series"] == [
        {"version": 1, "epsilon": None, "hr@10": None, "online_hr@10": None},
        {"version": 2, "epsilon": pytest.approx(epsilon), "hr@10": 0.125,
         "online_hr@10": 0.25},
    ]

    # A SecAgg+ round (the default scheme) shows its stage answers; newest round first.
    status, second = open_round(server, **{**DP_ROUND, "upload_scheme": "secagg+-v1"})
    assert status == 201
    data = dashboard(server)
    assert [r["round_id"] for r in data["rounds"]] == ["round-2", "round-1"]
    newest = data["rounds"][0]
    assert newest["state"] == "collecting" and newest["upload_scheme"] == "secagg+-v1"
    assert newest["secagg"] == {"advertised": 0, "shared": 0, "masked": 0, "unmasked": 0}
    assert newest["progress"] == "0/3 advertised, 0 shared, 0 masked, 0 unmasked"
    assert datetime.fromisoformat(data["generated_at"]) >= datetime.fromisoformat(
        newest["created_at"])


# --- the page in a real browser ---------------------------------------------------------------


@pytest.fixture(scope="module")
def chromium():
    """The system Chromium under playwright; skipped when missing, unless required."""
    required = os.environ.get("POCKETREC_REQUIRE_BROWSER") == "1"
    missing = None
    if not CHROMIUM.exists():
        missing = f"{CHROMIUM} is missing (apt-get install chromium)"
    else:
        try:
            from playwright.sync_api import sync_playwright
        except ImportError:
            missing = "the playwright package is missing (pip install -e '.[dev]')"
    if missing:
        if required:
            pytest.fail(f"POCKETREC_REQUIRE_BROWSER=1 but {missing}")
        pytest.skip(missing)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                    args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def watch_for_errors(page) -> list[str]:
    """Console errors (a CSP violation is one) and uncaught exceptions of the page."""
    errors: list[str] = []
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    return errors


def updated_at(page) -> str:
    return page.locator("#updated-at").inner_text()


def wait_for_next_poll(page, before: str) -> str:
    page.wait_for_function(
        "before => document.getElementById('updated-at').textContent !== before",
        arg=before, timeout=WAIT_MS)
    return updated_at(page)


def test_dashboard_page_follows_a_round_and_metrics_live_in_chromium(
    server, devices, chromium
):
    started = time.monotonic()
    status, opened = open_round(server, **DP_ROUND)
    assert status == 201
    round_id = opened["round_id"]
    context = chromium.new_context(extra_http_headers={"Authorization": f"Bearer {ADMIN}"})
    try:
        page = context.new_page()
        errors = watch_for_errors(page)
        response = page.goto(server.url + "/dashboard")
        assert response.status == 200
        row = page.locator(f'#rounds tbody tr[data-round-id="{round_id}"]')
        assert row.get_attribute("data-state") == "collecting"
        assert row.locator("td.state").inner_text() == "collecting"
        assert row.locator("td.progress").inner_text().startswith("0/3 uploaded")
        assert page.locator("#models tbody tr").count() == 1
        assert page.locator('#models tbody tr[data-version="1"] td.status').inner_text() == (
            "published")

        first = wait_for_next_poll(page, updated_at(page))  # the script polls
        page.evaluate("window.__same_document = true")     # gone if the page reloads
        page.wait_for_function("document.getElementById('chart').dataset.points === '0'",
                               timeout=WAIT_MS)
        budget = page.locator("#budget")
        assert float(budget.get_attribute("data-budget")) == 50.0
        assert budget.inner_text() == "50 of 50"

        for device in devices:  # one after another: sealed uploads; the last one publishes
            assert device.sync().uploaded
        published = f'#rounds tbody tr[data-round-id="{round_id}"][data-state="published"]'
        page.wait_for_selector(published, timeout=WAIT_MS)
        assert page.locator(published).locator("td.progress").inner_text().startswith(
            "3/3 uploaded")
        assert page.locator(published).locator("td.versions").inner_text() == "v1 → v2"
        v2 = page.locator('#models tbody tr[data-version="2"]')
        v2.wait_for(timeout=WAIT_MS)
        epsilon = dashboard(server)["privacy"]["epsilon"]
        assert float(v2.locator("td.epsilon").inner_text()) == pytest.approx(epsilon, rel=1e-3)
        assert v2.locator("td.hr10").inner_text() == "–"
        # delta beside every epsilon: the round's row, the version's row, the privacy line
        assert page.locator(published).locator("td.delta").inner_text() == "0.00001"
        assert v2.locator("td.delta").inner_text() == "0.00001"
        page.wait_for_function("document.getElementById('accountant').textContent === 'pld'",
                               timeout=WAIT_MS)
        assert page.locator("#delta").inner_text() == "0.00001"
        left = float(budget.get_attribute("data-budget-left"))
        assert left == pytest.approx(50.0 - epsilon)
        # the epsilon series has its point, HR@10 none yet
        page.wait_for_selector('#chart circle.point.epsilon[data-version="2"]',
                               timeout=WAIT_MS)
        assert page.locator("#chart circle.point.hr").count() == 0

        assert post_metrics(server, 2, {"metrics": {"hr@10": 0.125}}).status == 201
        assert post_metrics(server, 2, {"metrics": {"hr@10": 0.25},
                                        "source": "online"}).status == 201
        point = page.locator('#chart circle.point.hr[data-version="2"]')
        point.wait_for(timeout=WAIT_MS)
        assert float(point.get_attribute("data-value")) == 0.125
        page.wait_for_function(
            "document.querySelector('#models tbody tr[data-version=\"2\"] td.hr10')"
            ".textContent === '0.125'", timeout=WAIT_MS)
        assert v2.locator("td.online-hr10").inner_text() == "0.25"
        assert page.locator('#chart circle.point.online[data-version="2"]').count() == 1
        assert page.locator("#chart polyline").count() == 0  # one version per series: dots
        assert wait_for_next_poll(page, updated_at(page)) != first
        assert page.evaluate("window.__same_document") is True  # never reloaded
        assert page.locator("#poll-status").get_attribute("data-ok") == "true"
        assert errors == []
        page.screenshot(path=str(server.data_dir.with_name("dashboard.png")), full_page=True)
    finally:
        context.close()
    print(f"browser flow took {time.monotonic() - started:.1f} s")


def test_dashboard_page_logs_in_with_basic_auth_in_chromium(server, chromium):
    wrong = chromium.new_context(http_credentials={"username": "operator", "password": "no"})
    try:  # the browser answers the Basic challenge and is refused
        page = wrong.new_page()
        refused = page.goto(server.url + "/dashboard")
        assert refused.status == 401
        assert refused.headers["www-authenticate"] == 'Basic realm="pocketrec"'
        assert page.locator("#updated-at").count() == 0
    finally:
        wrong.close()
    context = chromium.new_context(http_credentials={"username": "operator",
                                                     "password": ADMIN})
    try:
        page = context.new_page()
        errors = watch_for_errors(page)
        assert page.goto(server.url + "/dashboard").status == 200
        wait_for_next_poll(page, updated_at(page))  # the script's fetch is authorised too
        assert page.locator('#models tbody tr[data-version="1"]').count() == 1
        assert page.locator("#poll-status").get_attribute("data-ok") == "true"
        assert errors == []
    finally:
        context.close()

