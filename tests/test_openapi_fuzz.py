"""Schemathesis against the OpenAPI document the real sync server serves (issue 7).

One real server per database (SQLite, PostgreSQL): a subprocess on loopback, the tiny real
export published as version 1, a SecAgg+ round (round-1) open with device D selected in it.
The schema is loaded from the server's own ``GET /v1/openapi.json``; every operation in it
gets seeded (derandomized), bounded Hypothesis examples:

- positive data (what the document allows): no 5xx; the status is one the document lists;
  the response's media type, headers and body conform to what the document declares;
- negative data (what the document forbids): no 5xx;
- either way, every error is exactly ``{"error": {"code": str, "message": str}}``.

Device operations are signed as D (a requests ``AuthBase`` signs the PreparedRequest, so it
covers the final path with its query string and the exact body, as the SDK does); admin
operations carry the Bearer token. Half of the examples use the ids that exist (round-1,
version 1) instead of generated ones, so the deep paths are reached, not only their 404s.
Operations run in the document's order: device endpoints first, then the admin ones (which
may pause the model or close the round; that is allowed input too)."""

from __future__ import annotations

import json

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from device_sdk.device_identity import DeviceIdentity
from device_sdk.protocol import b64
from sync_server.openapi import openapi_document
from tests.support.bundles import zip_bundle
from tests.support.server import ADMIN, REPUBLISH, ServerProcess, sync_client

SETTINGS = {"ADMIN_TOKEN": ADMIN, "PUBLISHER": REPUBLISH,
            "RATE_LIMIT": 1_000_000}
POSITIVE_EXAMPLES = 25
NEGATIVE_EXAMPLES = 10
KNOWN = {"round_id": "round-1", "version": 1}
OPERATIONS = [(method.upper(), path) for path, item in openapi_document()["paths"].items()
              for method in item]


class SignAs(requests.auth.AuthBase):
    """Device operations signed by ``identity`` over the prepared request (method, the path
    with its query exactly as sent, the body bytes); admin operations get the token."""

    def __init__(self, identity: DeviceIdentity, device_paths: set[str]) -> None:
        self.identity, self.device_paths = identity, device_paths

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        path = r.path_url.split("?")[0]
        if path.startswith(("/v1/admin/", "/dashboard")):
            r.headers["Authorization"] = f"Bearer {ADMIN}"
        elif any(_matches(template, path) for template in self.device_paths):
            body = r.body or b""
            body = body.encode() if isinstance(body, str) else body
            r.headers.update(self.identity.headers(r.method, r.path_url, body))
        return r


def _matches(template: str, path: str) -> bool:
    parts, given_parts = template.split("/"), path.split("/")
    return len(parts) == len(given_parts) and all(
        t == g or (t.startswith("{") and t.endswith("}")) for t, g in zip(parts, given_parts,
                                                                           strict=True))


@schemathesis.check
def json_error_shape(ctx, response, case):
    """Every error response is our JSON error shape with a stable code."""
    if response.status_code < 400:
        return True
    assert response.headers.get("content-type", [""])[0].startswith("application/json"), (
        response.headers)
    body = json.loads(response.content)
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"code", "message"}, body
    assert isinstance(error["code"], str) and error["code"], body
    assert isinstance(error["message"], str) and error["message"], body
    return True


class Fuzz:
    def __init__(self, server: ServerProcess, tiny_export, root) -> None:
        self.server = server
        response = server.admin("POST", "/v1/admin/models",
                                body=zip_bundle(tiny_export.bundle_dir),
                                headers={"Content-Type": "application/zip"})
        assert response.status == 201, response.data
        client = sync_client(server, root, "D", timeout=60.0)  # registered
        identity = client.identity
        opened = server.admin("POST", "/v1/admin/rounds", json={
            "target_clients": 3, "min_clients": 3, "deadline_s": 3600.0})
        assert opened.status == 201 and json.loads(opened.data)["round_id"] == KNOWN["round_id"]
        task = client.checkin(1, 10)
        assert task is not None and task.round_id == KNOWN["round_id"]  # D is selected
        served = json.loads(server.request("GET", "/v1/openapi.json").data)
        assert served == json.loads(json.dumps(openapi_document()))
        device_paths = {path for path, item in served["paths"].items()
                        for op in item.values() if {"deviceSignature": []} in op.get(
                            "security", [])}
        self.public_key = b64(identity.public_key_raw)
        self.schema = schemathesis.openapi.from_url(server.url + "/v1/openapi.json")
        self.session = requests.Session()
        self.session.auth = SignAs(identity, device_paths)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def fuzz(request, tmp_path_factory, tiny_export):
    db = {} if request.param == "sqlite" else {
        "DATABASE_URL": request.getfixturevalue("postgres").create_database()}
    root = tmp_path_factory.mktemp(f"fuzz-{request.param}")
    with ServerProcess(root / "server", **SETTINGS, **db) as server:
        yield Fuzz(server, tiny_export, root)
        log = server.log_path.read_text()
    assert "Traceback" not in log and '"level": "ERROR"' not in log, log[-3000:]


def run_operation(fuzz: Fuzz, method: str, path: str, mode: GenerationMode) -> list[int]:
    """Run the examples; returns the statuses seen."""
    operation = fuzz.schema[path][method]
    checks = [not_a_server_error] if mode is GenerationMode.NEGATIVE else [
        not_a_server_error, status_code_conformance, content_type_conformance,
        response_headers_conformance, response_schema_conformance]

    @settings(max_examples=POSITIVE_EXAMPLES if mode is GenerationMode.POSITIVE
              else NEGATIVE_EXAMPLES, derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck), print_blob=False)
    @given(case=operation.as_strategy(generation_mode=mode), known=st.booleans())
    def example(case, known):
        if known and mode is GenerationMode.POSITIVE:
            for name in set(case.path_parameters or {}) & set(KNOWN):
                case.path_parameters[name] = KNOWN[name]
            if path == "/v1/devices":  # D's own key: a registration the server can verify
                case.body["public_key"] = fuzz.public_key
        response = case.call(base_url=fuzz.server.url, session=fuzz.session, timeout=60)
        statuses.append(response.status_code)
        case.validate_response(response, checks=checks, additional_checks=[json_error_shape])

    statuses: list[int] = []
    example()
    return statuses


@pytest.mark.parametrize("method,path", OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_every_operation_answers_as_documented_and_never_fails(fuzz, method, path):
    statuses = run_operation(fuzz, method, path, GenerationMode.POSITIVE)
    # The examples got past authentication and routing into the view, not only refusals.
    assert set(statuses) - {401, 404}, statuses
    documented = openapi_document()["paths"][path][method.lower()]
    if documented.get("parameters") or documented.get("requestBody"):  # else none is invalid
        run_operation(fuzz, method, path, GenerationMode.NEGATIVE)
