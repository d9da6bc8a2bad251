"""The OpenAPI 3.1 document served at /v1/openapi.json, written from docs/ARCHITECTURE.md
("Wire protocol /v1"). tests/test_server_api.py checks that it lists exactly the app's /v1
routes. The round config and round task schemas are generated from their types
(``sync_server.round_config.RoundConfig``, ``device_sdk.protocol.RoundTask``), never
written by hand; tests/test_round_config.py compares the served ones with the types."""

from __future__ import annotations

import types
import typing
from dataclasses import MISSING, fields
from typing import Any

from device_sdk import secagg
from device_sdk.protocol import (
    HEADER_DEVICE,
    HEADER_MANIFEST_SIGNATURE,
    HEADER_MODEL_VERSION,
    HEADER_NONCE,
    HEADER_SIGNATURE,
    HEADER_TIMESTAMP,
    NAME_PATTERN,
    RoundTask,
)
from sync_server.round_config import MAX_NUMBER, RoundConfig

_ERROR = {"$ref": "#/components/schemas/Error"}
_JSON_TYPES = {int: "integer", float: "number", str: "string", dict: "object",
               tuple: "array"}


def _type_schema(annotation: Any) -> dict[str, Any]:
    """The JSON schema of a field's type: int, float, str, dict[...], tuple[str, ...] (a
    non-empty list of names), each optionally ``| None``."""
    args = typing.get_args(annotation)
    nullable = isinstance(annotation, types.UnionType) and type(None) in args
    if nullable:
        annotation = next(a for a in args if a is not type(None))
    base = typing.get_origin(annotation) or annotation
    schema: dict[str, Any] = {"type": _JSON_TYPES[base]}
    if base is tuple:
        schema.update(items={"type": "string", "pattern": f"^{NAME_PATTERN.pattern}$"},
                      minItems=1)
    if nullable:
        schema["type"] = [schema["type"], "null"]
    return schema


def dataclass_schema(cls: type, *, maximum: float | None = None) -> dict[str, Any]:
    """An object schema with one property per dataclass field: its type, default, ``Bound``
    (metadata ``bound``, ``maximum``, ``exclusive_maximum``) and ``enum``. ``maximum``
    caps every number without a smaller one."""
    hints = typing.get_type_hints(cls)
    properties: dict[str, Any] = {}
    for f in fields(cls):
        schema = _type_schema(hints[f.name])
        if "enum" in f.metadata:
            schema = {"enum": list(f.metadata["enum"])}
        bound = f.metadata.get("bound")
        if bound is not None:
            schema["exclusiveMinimum" if bound.exclusive else "minimum"] = bound.minimum
            top = f.metadata.get("maximum")
            if top is not None:
                schema["exclusiveMaximum" if f.metadata.get("exclusive_maximum")
                       else "maximum"] = top
            elif maximum is not None:
                schema["maximum"] = maximum
        if f.default is not MISSING:
            schema["default"] = list(f.default) if isinstance(f.default, tuple) else f.default
        properties[f.name] = schema
    return {"type": "object", "properties": properties}


def round_config_schema() -> dict[str, Any]:
    """POST /v1/admin/rounds's body: every key optional, unknown keys refused."""
    return {**dataclass_schema(RoundConfig, maximum=MAX_NUMBER), "additionalProperties": False,
            "description": _ROUND_CONFIG_TEXT}


def round_task_schema() -> dict[str, Any]:
    """The task a selected device gets at check-in; ``secagg`` only in SecAgg+ rounds."""
    schema = dataclass_schema(RoundTask)
    schema["required"] = [f.name for f in fields(RoundTask) if f.name != "secagg"]
    schema["properties"]["secagg"]["description"] = (
        "SecAgg+ parameters: scale, vector_length, min_clients, noise_std, stage_timeout_s, "
        "poll_s")
    return schema



def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*statuses: int) -> dict[str, Any]:
    text = {
        400: "bad_request / malformed input", 401: "bad_signature, stale_request, "
        "replayed_request, unknown_device, unauthorized", 403: "refused", 404: "not found",
        409: "conflict", 413: "body_too_large", 415: "unsupported_media_type",
        422: "update_rejected",
        429: "rate_limited (see Retry-After)",
        503: "attestation_unavailable or database_unavailable (see Retry-After)",
    }
    return {str(s): _json(_ERROR, text[s]) for s in statuses}


_SIGNED = [{"deviceSignature": []}]
_ADMIN = [{"adminToken": []}]
_VERSION_PARAM = {"name": "version", "in": "path", "required": True,
                  "schema": {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}}
_ROUND_STATES = {"enum": list(secagg.ROUND_STATES)}
_MODEL_VERSION = {
    "type": "object",
    "properties": {
        "model_version": {"type": "integer"},
        "parent_version": {"type": ["integer", "null"]},
        "status": {"enum": ["published", "paused"]},
        "rollout_percent": {"type": "integer", "minimum": 0, "maximum": 100},
        "blob_sha256": {"type": "string"},
        "size": {"type": "integer"},
        "created_at": {"type": "string", "format": "date-time"},
        "metrics": {"type": "object", "description": "evaluation metrics {source: {name: "
                    "value}}, e.g. {\"offline\": {\"hr@10\": 0.12}, \"online\": {...}}",
                    "additionalProperties": {"type": "object",
                                             "additionalProperties": {"type": "number"}}},
    },
}
_METRICS_BODY = {
    "type": "object",
    "required": ["metrics"],
    "additionalProperties": False,
    "properties": {
        "metrics": {"type": "object", "minProperties": 1, "maxProperties": 32,
                    "propertyNames": {"pattern": "^[a-z0-9][a-z0-9@_.-]{0,63}$"},
                    "additionalProperties": {"type": "number",
                                             "description": "finite (no NaN, no infinity)"}},
        "source": {"type": "string", "pattern": "^[a-z][a-z0-9_-]{0,31}$",
                   "default": "offline",
                   "description": "offline (held-out data), online (seen by devices), ..."},
    },
}
_DASHBOARD_ROUND = {
    "type": "object",
    "description": "a slice of the round view (GET /v1/admin/rounds/{round_id})",
    "properties": {
        "round_id": {"type": "string"},
        "state": _ROUND_STATES,
        "strategy": {"type": "string"},
        "upload_scheme": {"type": "string"},
        "model_version": {"type": "integer"},
        "published_version": {"type": ["integer", "null"]},
        "target_clients": {"type": "integer"},
        "min_clients": {"type": "integer"},
        "selected": {"type": "integer"},
        "received": {"type": "integer", "description": "sealed rounds: updates accepted"},
        "secagg": {"type": ["object", "null"], "description": "SecAgg+ rounds: answers per "
                   "stage {advertised, shared, masked, unmasked}"},
        "epsilon": {"type": ["number", "null"]},
        "delta": {"type": ["number", "null"], "description": "of epsilon (DP rounds)"},
        "sampling_rate": {"type": ["number", "null"], "description": "q of the round"},
        "epsilon_budget": {"type": ["number", "null"]},
        "created_at": {"type": "string", "format": "date-time"},
        "deadline": {"type": "number", "description": "Unix seconds"},
        "reason": {"type": ["string", "null"]},
        "progress": {"type": "string", "description": "one line for people, e.g. "
                     "'7/10 uploaded (10 selected)'"},
    },
}
_DASHBOARD = {
    "type": "object",
    "required": ["rounds", "models", "privacy", "series", "fleet", "generated_at"],
    "properties": {
        "rounds": {"type": "array", "items": _DASHBOARD_ROUND,
                   "description": "the newest 20 rounds, newest first"},
        "models": {"type": "array", "description": "every version, oldest first", "items": {
            "type": "object", "properties": {
                "version": {"type": "integer"},
                "parent_version": {"type": ["integer", "null"]},
                "status": {"enum": ["published", "paused"]},
                "rollout_percent": {"type": "integer"},
                "created_at": {"type": "string", "format": "date-time"},
                "epsilon": {"type": ["number", "null"],
                            "description": "the manifest's privacy.epsilon"},
                "delta": {"type": ["number", "null"]},
                "metrics": _MODEL_VERSION["properties"]["metrics"],
            }}},
        "privacy": {"type": "object", "properties": {
            "epsilon": {"type": "number", "description": "cumulative, from the ledger"},
            "delta": {"type": ["number", "null"]},
            "accountant": {"type": ["string", "null"], "description": "pld | rdp: what "
                           "computed epsilon (dp_accounting)"},
            "mechanism": {"type": ["string", "null"], "description": "what the newest "
                          "ledger row composed, e.g. poisson_sampled_gaussian"},
            "budget": {"type": ["number", "null"],
                       "description": "the newest round's epsilon_budget"},
            "budget_left": {"type": ["number", "null"]}}},
        "series": {"type": "array", "description": "one point per version, oldest first",
                   "items": {"type": "object", "properties": {
                       "version": {"type": "integer"},
                       "epsilon": {"type": ["number", "null"]},
                       "hr@10": {"type": ["number", "null"], "description": "offline"},
                       "online_hr@10": {"type": ["number", "null"]}}}},
        "fleet": {"type": "object", "properties": {
            "registered": {"type": "integer", "description": "device keys registered"},
            "seen_last_day": {"type": "integer"},
            "by_version": {"type": "object", "description": "devices seen in the last day "
                           "by the version reported at their latest check-in ('none': "
                           "none)"}}},
        "generated_at": {"type": "string", "format": "date-time"},
    },
}
# What each stage's answer holds, by its path (device_sdk.secagg.STAGES).
_STAGE_BODIES = {
    "advertise": "{c_pk, e_pk, b_commit, sig} signed by the device identity",
    "shares": "{shares: {neighbour: base64 AEAD ciphertext}}",
    "masked": "PRT1 frame: uint32 'masked' [vector_length], meta {round_id}",
    "unmask": "{b: {survivor: share}, c: {dropped: share}}",
}
_ROUND_ID_PARAM = {"name": "round_id", "in": "path", "required": True,
                   "schema": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"}}
_ROUND = {
    "type": "object",
    "properties": {
        "round_id": {"type": "string"},
        "state": _ROUND_STATES,
        "model_version": {"type": "integer", "description": "the base model trained"},
        "published_version": {"type": ["integer", "null"]},
        "created_at": {"type": "string", "format": "date-time"},
        "deadline": {"type": "number", "description": "Unix seconds"},
        "target_clients": {"type": "integer"},
        "min_clients": {"type": "integer"},
        "checked_in": {"type": "integer", "description": "devices that got a selection "
                       "coin (checked in holding the base version)"},
        "selected": {"type": "integer", "description": "devices whose coin selected them"},
        "received": {"type": "integer"},
        "sampling_rate": {"type": ["number", "null"], "description": "q: each device that "
                          "checks in is selected with this probability (one stored coin)"},
        "epsilon": {"type": ["number", "null"],
                    "description": "cumulative epsilon after this round (once published)"},
        "delta": {"type": "number"},
        "measurements": {"type": ["object", "null"]},
        "reason": {"type": ["string", "null"], "description": "why the round failed"},
        "config": {"type": "object"},
        "secagg": {"type": ["object", "null"], "description": "SecAgg+ rounds: n, degree, "
                   "threshold, risks {failure, exposure}, stage answers so far (advertised, "
                   "shared, masked, unmasked)"},
    },
}
_ROUND_CONFIG_TEXT = (
    "null (or absent): derived when the round opens. strategy with server_lr, momentum, "
    "beta1, beta2, tau (absent: the strategy's defaults); noise_multiplier (null: no DP); "
    "delta (default: the power of ten <= 1/(10 N), N = population or target_clients / q; "
    "above 1/N: 400 delta_too_large); sampling_rate (q: each device checking in is selected "
    "with probability q); population (the eligible population the operator vouches for: q "
    "= target_clients / population when sampling_rate is unset; neither: q = 1, first come "
    "up to target_clients); max_clients (largest cohort the SecAgg+ ring holds; larger: the "
    "round fails); model_version (default: current); secagg_degree, secagg_threshold (null: "
    "the safe defaults)")
_SERVER_KEYS = {
    "type": "object",
    "required": ["signing_key", "transport_key", "transport_key_sig"],
    "properties": {
        "signing_key": {"type": "string", "contentEncoding": "base64",
                        "description": "raw Ed25519 public key (32 bytes)"},
        "transport_key": {"type": "string", "contentEncoding": "base64",
                          "description": "raw X25519 public key (32 bytes)"},
        "transport_key_sig": {"type": "string", "contentEncoding": "base64",
                              "description": "Ed25519 signature over "
                              "b'pocketrec-v1/transport-key\\n' + transport_key"},
    },
}


def openapi_document() -> dict[str, Any]:
    """The whole document as a dict."""
    return {
        "openapi": "3.1.0",
        "info": {"title": "PocketRec sync server", "version": "1",
                 "description": "Wire protocol /v1; every error is "
                 '{"error": {"code", "message"}} with a stable code.'},
        "paths": {
            "/v1/server-keys": {"get": {
                "summary": "The server's public keys (the transport key endorsed by the "
                "signing key)",
                "responses": {"200": _json(_SERVER_KEYS, "keys")},
            }},
            "/v1/devices": {"post": {
                "summary": "Register the Ed25519 key that signs this request (idempotent)",
                "security": _SIGNED,
                "requestBody": {"required": True, "content": {"application/json": {"schema": {
                    "type": "object", "required": ["public_key"],
                    "properties": {"public_key": {"type": "string", "contentEncoding": "base64"},
                                   "enrollment_token": {
                                       "type": ["string", "null"], "description":
                                       "ENROLLMENT_TOKEN, or (ENROLLMENT_MODE one-time) "
                                       "an unused token from the app's backend"},
                                   "attestation": {
                                       "description": "evidence for the server's "
                                       "ATTESTATION_VERIFIER (any JSON), e.g. a platform "
                                       "attestation bound to public_key"}},
                }}}},
                "responses": {
                    "201": _json({"$ref": "#/components/schemas/DeviceId"}, "registered"),
                    "200": _json({"$ref": "#/components/schemas/DeviceId"}, "already known"),
                    **_errors(400, 401, 403, 413, 415, 429, 503),
                },
            }},
            "/v1/models/current": {"get": {
                "summary": "The manifest of the model chosen for this device",
                "security": _SIGNED,
                "parameters": [{"name": "If-None-Match", "in": "header",
                                "schema": {"type": "string"}}],
                "responses": {
                    "200": {
                        "description": "exact manifest.json bytes",
                        "headers": {
                            "ETag": {"schema": {"type": "string"}},
                            HEADER_MODEL_VERSION: {"schema": {"type": "integer"}},
                            HEADER_MANIFEST_SIGNATURE: {
                                "description": "base64 Ed25519 signature over the body",
                                "schema": {"type": "string"}},
                        },
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    },
                    "304": {"description": "If-None-Match matched"},
                    **_errors(401, 404, 429),
                },
            }},
            "/v1/models/{version}/bundle": {"get": {
                "summary": "The bundle zip (flat: manifest.json, manifest.sig, model.tflite, "
                "weights.npz, items.json)",
                "security": _SIGNED,
                "parameters": [_VERSION_PARAM],
                "responses": {
                    "200": {"description": "bundle", "content": {"application/zip": {
                        "schema": {"type": "string", "contentMediaType": "application/zip"}}}},
                    **_errors(401, 404, 429),
                },
            }},
            "/v1/rounds/checkin": {"post": {
                "summary": "Ask for a round task",
                "security": _SIGNED,
                "requestBody": {"required": True, "content": {"application/json": {"schema": {
                    "type": "object", "required": ["num_examples"],
                    "properties": {"model_version": {
                        "type": ["integer", "null"], "description": "the version the device "
                        "holds: only a device holding the round's base version gets a coin"},
                                   "num_examples": {"type": "integer", "minimum": 0}},
                }}}},
                "responses": {
                    "200": _json({"type": "object", "properties": {
                        "task": {"oneOf": [{"type": "null"},
                                           {"$ref": "#/components/schemas/RoundTask"}]},
                        "retry_after": {"type": "number"},
                    }}, "a task, or none and when to ask again"),
                    **_errors(400, 401, 413, 415, 429),
                },
            }},
            "/v1/rounds/{round_id}/update": {"post": {
                "summary": "Upload a sealed update (sealed-x25519-v1) for a round this device "
                "was selected into. not_selected (403), round_closed / duplicate_update "
                "(409), bad_update (400), update_rejected (422)",
                "security": _SIGNED,
                "parameters": [_ROUND_ID_PARAM],
                "requestBody": {"required": True, "content": {"application/octet-stream": {
                    "schema": {"type": "string"}}}},
                "responses": {
                    "202": _json({"type": "object", "properties": {
                        "accepted": {"const": True}, "round_id": {"type": "string"}}},
                        "accepted: durably recorded before this answer"),
                    **_errors(400, 401, 403, 404, 409, 413, 415, 422, 429),
                },
            }},
            "/v1/rounds/{round_id}/secagg": {"get": {
                "summary": "SecAgg+: what this device should do now. `action` is null "
                "(wait retry_after seconds), share_keys (payload: participants, degree, "
                "threshold, graph_seed, adverts of this device and its neighbours), "
                "masked_input (payload: u2, shares addressed to it) or unmask (payload: u3); "
                "`dropped` once the round went on without it",
                "security": _SIGNED,
                "parameters": [_ROUND_ID_PARAM],
                "responses": {
                    "200": _json({"type": "object", "required": ["stage", "action"],
                                  "properties": {
                                      "round_id": {"type": "string"},
                                      "stage": {"type": "string"},
                                      "action": {"type": ["string", "null"]},
                                      "dropped": {"type": "boolean"},
                                      "retry_after": {"type": "number"},
                                      "payload": {"type": "object"}}}, "the device's view"),
                    **_errors(401, 403, 404, 409, 429),
                },
            }},
            **{f"/v1/rounds/{{round_id}}/secagg/{stage.path}": {"post": {
                "summary": f"SecAgg+ {stage.path}: {_STAGE_BODIES[stage.path]}. stage_closed / "
                "duplicate_answer (409), not_selected / not_a_participant (403), "
                "secagg_bad_message (400), secagg_bad_signature (401)",
                "security": _SIGNED,
                "parameters": [_ROUND_ID_PARAM],
                "requestBody": {"required": True, "content": {stage.media: {"schema": {
                    "type": "string" if stage.media != "application/json" else "object"}}}},
                "responses": {
                    "202": _json({"type": "object", "properties": {
                        "accepted": {"const": True}, "round_id": {"type": "string"},
                        "stage": {"type": "string"}}}, "recorded before this answer"),
                    **_errors(400, 401, 403, 404, 409, 413, 415, 429),
                },
            }} for stage in secagg.STAGES},
            "/v1/admin/rounds": {
                "get": {
                    "summary": "Every round, and the epsilon spent so far",
                    "security": _ADMIN,
                    "responses": {
                        "200": _json({"type": "object", "properties": {
                            "rounds": {"type": "array", "items": _ROUND},
                            "epsilon_spent": {"type": "number"},
                            "delta": {"type": ["number", "null"],
                                      "description": "of epsilon_spent"}}}, "rounds"),
                        **_errors(401, 403),
                    },
                },
                "post": {
                    "summary": "Open a round. bad_round_config / delta_too_large (400), "
                    "round_in_progress / "
                    "no_model / privacy_budget_exhausted / privacy_required (409)",
                    "security": _ADMIN,
                    "requestBody": {"required": True, "content": {"application/json": {
                        "schema": {"$ref": "#/components/schemas/RoundConfig"}}}},
                    "responses": {"201": _json(_ROUND, "opened"),
                                  **_errors(400, 401, 403, 409, 413, 415)},
                },
            },
            "/v1/admin/rounds/{round_id}": {"get": {
                "summary": "One round (checks its deadline first)",
                "security": _ADMIN,
                "parameters": [_ROUND_ID_PARAM],
                "responses": {"200": _json(_ROUND, "round"), **_errors(401, 403, 404)},
            }},
            "/v1/admin/rounds/{round_id}/close-stage": {"post": {
                "summary": "Stop waiting for the current stage (as at its deadline)",
                "security": _ADMIN,
                "parameters": [_ROUND_ID_PARAM],
                "responses": {"200": _json(_ROUND, "round"), **_errors(401, 403, 404, 409)},
            }},
            "/v1/admin/enrollment-tokens": {"post": {
                "summary": "Mint one-time enrollment tokens (ENROLLMENT_MODE one-time: each "
                "registers one device; only their digests are stored)",
                "security": _ADMIN,
                "requestBody": {"required": True, "content": {"application/json": {"schema": {
                    "type": "object", "required": ["count"],
                    "properties": {"count": {"type": "integer", "minimum": 1,
                                             "maximum": 1000}}}}}},
                "responses": {
                    "201": _json({"type": "object", "required": ["tokens", "mode"],
                                  "properties": {
                                      "tokens": {"type": "array",
                                                 "items": {"type": "string"}},
                                      "mode": {"enum": ["open", "one-time"]}}}, "minted"),
                    **_errors(400, 401, 403, 413, 415),
                },
            }},
            "/v1/admin/retention/sweep": {"post": {
                "summary": "Delete what is past its retention now (devices silent past "
                "DEVICE_RETENTION_DAYS, per-device rows of rounds ended past "
                "ROUND_RECORD_RETENTION_DAYS); every worker also does so every "
                "RETENTION_SWEEP_S",
                "security": _ADMIN,
                "responses": {
                    "200": _json({"type": "object", "required": ["pruned", "policy"],
                                  "properties": {
                                      "pruned": {"type": "object", "description":
                                                 "rows deleted per table",
                                                 "additionalProperties": {
                                                     "type": "integer"}},
                                      "policy": {"type": "object",
                                                 "additionalProperties": {
                                                     "type": "integer"}}}}, "swept"),
                    **_errors(401, 403),
                },
            }},
            "/v1/admin/server-keys": {"get": {
                "summary": "The server's public keys, for provisioning devices",
                "security": _ADMIN,
                "responses": {"200": _json(_SERVER_KEYS, "keys"), **_errors(401, 403)},
            }},
            "/v1/admin/models": {
                "get": {
                    "summary": "Every model version",
                    "security": _ADMIN,
                    "responses": {
                        "200": _json({"type": "object", "properties": {
                            "models": {"type": "array", "items": _MODEL_VERSION}}}, "versions"),
                        **_errors(401, 403),
                    },
                },
                "post": {
                    "summary": "Publish a bundle zip: verified, signed by the server, made "
                    "current for rollout_percent % of devices. bad_bundle / bad_rollout (400), "
                    "version_not_newer (409)",
                    "security": _ADMIN,
                    "parameters": [{"name": "rollout_percent", "in": "query",
                                    "schema": {"type": "integer", "minimum": 0,
                                               "maximum": 100, "default": 100}}],
                    "requestBody": {"required": True, "content": {
                        "application/zip": {"schema": {"type": "string"}},
                        "application/octet-stream": {"schema": {"type": "string"}}}},
                    "responses": {"201": _json(_MODEL_VERSION, "published"),
                                  **_errors(400, 401, 403, 409, 413, 415)},
                },
            },
            "/v1/admin/models/{version}/rollout": {"post": {
                "summary": "Set the share of devices offered this version (stable hash of "
                "version and device id: raising it only adds devices). bad_rollout (400)",
                "security": _ADMIN,
                "parameters": [_VERSION_PARAM],
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": {"type": "object", "required": ["percent"], "properties": {
                        "percent": {"type": "integer", "minimum": 0, "maximum": 100}}}}}},
                "responses": {"200": _json(_MODEL_VERSION, "updated"),
                              **_errors(400, 401, 403, 404, 413, 415)},
            }},
            "/v1/admin/models/{version}/pause": {"post": {
                "summary": "Never serve this version (devices that installed it keep it: "
                "they refuse older versions)",
                "security": _ADMIN,
                "parameters": [_VERSION_PARAM],
                "responses": {"200": _json(_MODEL_VERSION, "paused"),
                              **_errors(401, 403, 404)},
            }},
            "/v1/admin/models/{version}/resume": {"post": {
                "summary": "Serve a paused version again",
                "security": _ADMIN,
                "parameters": [_VERSION_PARAM],
                "responses": {"200": _json(_MODEL_VERSION, "published"),
                              **_errors(401, 403, 404)},
            }},
            "/v1/admin/models/{version}/rollback": {"post": {
                "summary": "Pause this version and republish its parent's exact files as a "
                "NEW, higher version (provenance.rollback_of): devices enforce anti-rollback. "
                "no_parent / version_not_newer (409)",
                "security": _ADMIN,
                "parameters": [_VERSION_PARAM],
                "responses": {
                    "201": _json({"type": "object", "properties": {
                        "paused": _MODEL_VERSION, "published": _MODEL_VERSION}},
                        "rolled back"),
                    **_errors(401, 403, 404, 409),
                },
            }},
            "/v1/admin/models/{version}/metrics": {"post": {
                "summary": "Record evaluation metrics of this version (an evaluation job "
                "posts offline hr@10 / ndcg@10 on held-out data, online ones seen by "
                "devices); a later post of the same (source, name) replaces the value. "
                "bad_metrics (400)",
                "security": _ADMIN,
                "parameters": [_VERSION_PARAM],
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": _METRICS_BODY}}},
                "responses": {"201": _json(_MODEL_VERSION, "recorded: the version with all "
                                           "its metrics"),
                              **_errors(400, 401, 403, 404, 409, 413, 415)},
            }},
            "/v1/admin/dashboard": {"get": {
                "summary": "What the operator dashboard (GET /dashboard, HTML) shows and polls: "
                "rounds, model versions with privacy and metrics, the privacy budget, the "
                "chart's series. Also takes HTTP Basic auth (the admin token as password)",
                "security": [*_ADMIN, {"adminBasic": []}],
                "responses": {"200": _json(_DASHBOARD, "dashboard"), **_errors(401, 403)},
            }},
            "/v1/openapi.json": {"get": {
                "summary": "This document",
                "responses": {"200": _json({"type": "object"}, "OpenAPI 3.1")},
            }},
        },
        "components": {
            "securitySchemes": {
                "deviceSignature": {
                    "type": "apiKey", "in": "header", "name": HEADER_SIGNATURE,
                    "description": f"Ed25519 over 'pocketrec-v1', method, raw path+query, "
                    f"sha256(body), {HEADER_TIMESTAMP}, {HEADER_NONCE}, {HEADER_DEVICE}, "
                    "joined by newlines",
                },
                "adminToken": {"type": "http", "scheme": "bearer"},
                "adminBasic": {"type": "http", "scheme": "basic", "description": "any user "
                               "name, the admin token as password; only the dashboard (GET "
                               "/dashboard, GET /v1/admin/dashboard) takes it"},
            },
            "schemas": {
                "Error": {"type": "object", "required": ["error"], "properties": {"error": {
                    "type": "object", "required": ["code", "message"],
                    "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
                }}},
                "DeviceId": {"type": "object", "properties": {
                    "device_id": {"type": "string", "pattern": "^[0-9a-f]{32}$"}}},
                "RoundTask": round_task_schema(),
                "RoundConfig": round_config_schema(),
            },
        },
    }
