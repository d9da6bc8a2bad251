"""The typed round config (sync_server.round_config): one definition of the task fields and
their defaults, checks that read the fields' bounds, and the OpenAPI schemas the real server
serves generated from the same types."""

import json
from dataclasses import MISSING, fields, replace

import pytest

from device_sdk.local_trainer import LocalTrainingConfig
from device_sdk.protocol import RoundTask, TrainingParams
from sync_server.errors import ApiError
from sync_server.round_config import (
    OPERATOR_KEYS,
    STRATEGY_KEYS,
    RoundConfig,
    RoundPlan,
    plan,
    with_clip,
)
from trainer.simulation.run import SimulationConfig
from trainer.simulation.server import ServerProcess

TRAINING = [f.name for f in fields(TrainingParams)]


def default_of(f):
    return None if f.default is MISSING else f.default


def test_training_defaults_come_from_one_place():
    params = TrainingParams()
    simulated = SimulationConfig()
    for name in TRAINING:
        assert getattr(LocalTrainingConfig(), name) == getattr(params, name)
        assert getattr(RoundConfig(), name) == getattr(params, name)
        if hasattr(simulated, name):
            assert getattr(simulated, name) == getattr(params, name)
    assert params.learning_rate == 0.1  # what the server's rounds always sent devices


def test_an_empty_config_is_the_defaults_and_its_task_carries_them():
    opened = plan({})
    assert opened.config == RoundConfig()
    stored = opened.stored()
    assert not {*STRATEGY_KEYS, "serve_ema"} & set(stored)  # stored only when sent
    assert {"min_clients", "sampling_rate", "delta", "selection"} <= set(stored)
    ready = replace(opened, derived=replace(
        opened.derived, model_version=3, expected_shapes={"out.bias": [4]},
        selection="csprng"))
    task = ready.task("round-1", 2e9)
    assert task == RoundPlan.from_stored(ready.stored()).task("round-1", 2e9)
    assert task == RoundTask.from_json(task.to_json())
    assert task.training_params() == TrainingParams().training_params()
    assert task.model_version == 3 and task.secagg["vector_length"] == 4
    sealed = plan({"upload_scheme": "sealed-x25519-v1", "trainable": ["out.bias"]})
    sealed = replace(sealed, derived=replace(sealed.derived, model_version=1))
    assert "secagg" not in sealed.task("r", 1.0).to_json()  # the wire form as before


@pytest.mark.parametrize("f", [f for f in fields(RoundConfig) if "bound" in f.metadata],
                         ids=lambda f: f.name)
def test_each_number_below_its_bound_is_bad_round_config(f):
    bound = f.metadata["bound"]
    below = bound.minimum if bound.exclusive else bound.minimum - 1
    config = {f.name: below}
    if f.name in ("min_clients", "secagg_degree", "secagg_threshold"):
        config["upload_scheme"] = "sealed-x25519-v1"  # only the bound itself is refused
    config["strategy"] = {"momentum": "fedavgm", "beta1": "fedadam", "beta2": "fedadam",
                          "tau": "fedadam"}.get(f.name, "fedavg")  # the one that reads it
    with pytest.raises(ApiError) as refused:
        plan(config)
    assert (refused.value.code, refused.value.status) == ("bad_round_config", 400)
    assert f.name in refused.value.message


def test_the_served_schemas_are_the_types(tmp_path):
    with ServerProcess(tmp_path / "server", ADMIN_TOKEN="admin-secret") as server:
        document = json.loads(server.request("GET", "/v1/openapi.json").data)
    schemas = document["components"]["schemas"]
    for cls, schema in ((RoundConfig, schemas["RoundConfig"]), (RoundTask, schemas["RoundTask"])):
        by_name = {f.name: f for f in fields(cls)}
        assert set(schema["properties"]) == set(by_name)
        for name, prop in schema["properties"].items():
            f = by_name[name]
            default = default_of(f)
            assert prop.get("default") == (list(default) if isinstance(default, tuple)
                                           else default)
            bound = f.metadata.get("bound")
            if bound is not None:
                key = "exclusiveMinimum" if bound.exclusive else "minimum"
                assert prop[key] == bound.minimum
            if "enum" in f.metadata:
                assert prop["enum"] == list(f.metadata["enum"])
    assert set(schemas["RoundConfig"]["properties"]) == set(OPERATOR_KEYS)
    assert schemas["RoundConfig"]["additionalProperties"] is False
    assert set(schemas["RoundTask"]["required"]) == {f.name for f in fields(RoundTask)} - {
        "secagg"}
    body = document["paths"]["/v1/admin/rounds"]["post"]["requestBody"]
    assert body["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/RoundConfig"}


@pytest.mark.parametrize("decay", [1.0, 1.5, "0.9", True, float("nan")])
def test_a_served_average_decay_outside_0_1_is_bad_round_config(decay):
    with pytest.raises(ApiError, match="serve_ema") as refused:
        plan({"serve_ema": decay})
    assert (refused.value.code, refused.value.status) == ("bad_round_config", 400)


def test_a_served_average_decay_is_stored_and_read_back():
    opened = plan({"serve_ema": 0.9})
    assert opened.stored()["serve_ema"] == 0.9
    assert RoundPlan.from_stored(opened.stored()).config.serve_ema == 0.9
    ready = replace(opened, derived=replace(opened.derived, model_version=3,
                                            expected_shapes={"out.bias": [4]}))
    assert "serve_ema" not in ready.task("round-1", 2e9).to_json()  # a server matter


@pytest.mark.parametrize(("config", "says"), [
    ({"clip_quantile": 0.5, "upload_scheme": "sealed-x25519-v1"}, "needs upload_scheme"),
    ({"clip_quantile": 0.5, "dp_mode": "distributed", "noise_multiplier": 1.0},
     "needs dp_mode 'central'"),
    ({"clip_quantile": 1.0}, r"clip_quantile must be in \(0, 1\)"),
    ({"clip_lr": 0.2}, "only apply with clip_quantile"),
    ({"clip_quantile": 0.5, "noise_multiplier": 4.0, "clip_count_stddev": 1.5},
     "must exceed noise_multiplier / 2"),
], ids=["sealed", "distributed", "quantile-1", "lr-alone", "count-noise-too-small"])
def test_adaptive_clipping_settings_that_cannot_run_are_refused(config, says):
    with pytest.raises(ApiError, match=says) as refused:
        plan(config)
    assert (refused.value.code, refused.value.status) == ("bad_round_config", 400)


def test_an_adaptive_round_takes_the_previous_estimate_as_its_clip_and_tells_devices():
    opened = plan({"clip_quantile": 0.5, "clip_norm": 0.3, "noise_multiplier": 1.0,
                   "target_clients": 100})
    ready = replace(opened, derived=replace(
        opened.derived, model_version=1, expected_shapes={"out.bias": [4]},
        selection="csprng"))
    first = with_clip(ready, None)
    assert first.stored()["clip_norm"] == 0.3 and "first estimate" in first.stored()[
        "clip_basis"]
    later = with_clip(ready, ("round-4", 0.2125))
    stored = later.stored()
    assert stored["clip_norm"] == 0.2125 and "round-4" in stored["clip_basis"]
    task = RoundPlan.from_stored(stored).task("round-5", 2e9)
    assert task == RoundTask.from_json(task.to_json())
    # Devices clip to the estimate and append their bit: one value more than the tensors.
    assert task.clip_norm == 0.2125
    assert task.secagg["clip_bit"] is True and task.secagg["vector_length"] == 5
    fixed = replace(opened, config=replace(opened.config, clip_quantile=None))
    assert with_clip(fixed, ("round-4", 0.2125)) is fixed
