"""The round configuration, typed: what an operator may send (``RoundConfig``), what the server
works out from it (``Derived``), and the task devices get (``RoundPlan.task``).

``RoundConfig`` extends ``device_sdk.protocol.TrainingParams``: the training fields and their
defaults are defined once, on the device side (which cannot import the server), and the
server builds on them. Each numeric field carries its ``Bound`` (and each closed set its
``enum``) in the field's metadata, so the server's checks and the OpenAPI schema
(``sync_server.openapi``) read the same definition.

A round's config is stored as one flat JSON object (``rounds.config``): the operator's
fields with their defaults, overwritten by the derived ones (``RoundPlan.stored``). The
database layout is that of the loose dict this module replaced.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from device_sdk import secagg
from device_sdk.protocol import (
    ProtocolError,
    RoundTask,
    TrainingParams,
    bounded,
)
from sync_server import selection, strategies, upload_schemes

# No number in a round config may exceed this (a count beyond the database's INTEGER, or a
# deadline beyond the year 9999, would fail later, inside every request touching the round).
MAX_NUMBER = 2**31 - 1
SCHEMES = tuple(upload_schemes.SCHEMES)
DP_MODES = ("central", "distributed")


def _choice(default: str, choices: tuple[str, ...]) -> Any:
    return field(default=default, metadata={"enum": choices})


def _optional(*, minimum: float, exclusive: bool = False, maximum: float | None = None,
              exclusive_maximum: bool = False) -> Any:
    """An optional number: None means "derived" (or, for strategy settings, the strategy's
    own default)."""
    f = bounded(None, minimum=minimum, exclusive=exclusive)
    extra = {"maximum": maximum, "exclusive_maximum": exclusive_maximum}
    return field(default=None, metadata={**f.metadata, **extra})


@dataclass(frozen=True, kw_only=True)
class RoundConfig(TrainingParams):
    """What the operator sent (POST /v1/admin/rounds), defaults filled in. None: worked out
    when the round opens (``Derived``), or the strategy's own default."""

    strategy: str = _choice("fedavg", tuple(strategies.SERVER_OPTIMIZERS))
    target_clients: int = bounded(10, minimum=1)
    min_clients: int | None = _optional(minimum=1)
    deadline_s: float = bounded(3600.0, minimum=0.0, exclusive=True)
    noise_multiplier: float | None = _optional(minimum=0.0, exclusive=True)
    delta: float | None = _optional(minimum=0.0, exclusive=True, maximum=1.0,
                                    exclusive_maximum=True)
    epsilon_budget: float | None = _optional(minimum=0.0, exclusive=True)
    population: int | None = _optional(minimum=1)
    sampling_rate: float | None = _optional(minimum=0.0, exclusive=True, maximum=1.0)
    max_clients: int | None = _optional(minimum=1)
    model_version: int | None = _optional(minimum=0)
    upload_scheme: str = _choice(secagg.SCHEME, SCHEMES)
    dp_mode: str = _choice("central", DP_MODES)
    secagg_degree: int | None = _optional(minimum=2)
    secagg_threshold: int | None = _optional(minimum=2)
    secagg_stage_timeout_s: float = bounded(60.0, minimum=0.0, exclusive=True)
    secagg_poll_s: float = bounded(1.0, minimum=0.0, exclusive=True)
    # The server optimizer's settings (sync_server.strategies); stored only when sent.
    server_lr: float | None = _optional(minimum=0.0, exclusive=True)
    momentum: float | None = _optional(minimum=0.0, maximum=1.0, exclusive_maximum=True)
    beta1: float | None = _optional(minimum=0.0, maximum=1.0, exclusive_maximum=True)
    beta2: float | None = _optional(minimum=0.0, maximum=1.0, exclusive_maximum=True)
    tau: float | None = _optional(minimum=0.0, exclusive=True)
    # Adaptive clipping (sync_server.strategies.AdaptiveClip): the target quantile of the
    # devices' update norms; clip_norm is then the first round's clip only. None: fixed.
    clip_quantile: float | None = _optional(minimum=0.0, exclusive=True, maximum=1.0,
                                            exclusive_maximum=True)
    clip_lr: float | None = _optional(minimum=0.0, exclusive=True)
    clip_count_stddev: float | None = _optional(minimum=0.0, exclusive=True)
    # The served model (``sync_server.publishing``): the published version's model.tflite,
    # what devices recommend with, is the exponential moving average of the published
    # weights with this decay, s_v = d s_(v-1) + (1 - d) w_v; its weights.npz, what devices
    # train from, stays the optimizer's iterate w_v. Post-processing: no privacy cost.
    # None: the iterate serves.
    serve_ema: float | None = _optional(minimum=0.0, exclusive=True, maximum=1.0,
                                        exclusive_maximum=True)

    def to_json(self) -> dict[str, Any]:
        """The operator's half of the stored config."""
        obj = asdict(self)
        obj["trainable"] = None if self.trainable is None else list(self.trainable)
        for key in (*STRATEGY_KEYS, *CLIP_KEYS, "serve_ema"):
            if obj[key] is None:
                del obj[key]
        return obj


STRATEGY_KEYS = ("server_lr", "momentum", "beta1", "beta2", "tau")
CLIP_KEYS = ("clip_quantile", "clip_lr", "clip_count_stddev")
OPERATOR_KEYS = tuple(f.name for f in fields(RoundConfig))
TASK_KEYS = tuple(f.name for f in fields(TrainingParams))
_FIELDS = {f.name: f for f in fields(RoundConfig)}


@dataclass(frozen=True)
class Derived:
    """What the server works out from a RoundConfig; never sent by the operator. The first
    six at validation (``plan``), the rest when the round opens."""

    min_clients: int
    max_clients: int
    sampling_rate: float  # q (sync_server.selection)
    sampling_basis: str
    delta: float  # of the round's (epsilon, delta), DP or not
    delta_basis: str
    model_version: int | None = None  # the base version trained
    trainable: tuple[str, ...] | None = None  # the operator's, else the architecture's
    expected_shapes: dict[str, list[int]] | None = None  # of the trainable tensors
    selection: str | None = None  # "csprng" | "seeded" coins
    epsilon_projected: float | None = None  # epsilon after this round (DP rounds)
    clip_basis: str | None = None  # adaptive clipping: where this round's clip_norm came from

    def to_json(self) -> dict[str, Any]:
        obj = asdict(self)
        obj["trainable"] = None if self.trainable is None else list(self.trainable)
        for key in ("epsilon_projected", "clip_basis"):
            if obj[key] is None:
                del obj[key]
        return obj


@dataclass(frozen=True)
class RoundPlan:
    """One round's configuration: the operator's ``config`` and the ``derived`` values."""

    config: RoundConfig
    derived: Derived

    def stored(self) -> dict[str, Any]:
        """The flat JSON object stored in ``rounds.config`` (and shown in the round view)."""
        return {**self.config.to_json(), **self.derived.to_json()}

    def task(self, round_id: str, deadline: float) -> RoundTask:
        """The RoundTask a selected device is given: the config's training fields, what
        the round's strategy configures (the DP wrapper: the clip norm its noise is
        calibrated to) and the upload scheme's parameters."""
        stored = self.stored()
        strategy = strategies.build({**stored, "expected_clients": stored["target_clients"]})
        params = {**self.config.training_params(), "trainable": self.derived.trainable,
                  **strategy.configure()}
        return RoundTask(round_id=round_id, model_version=int(self.derived.model_version),
                         deadline=deadline, upload_scheme=self.config.upload_scheme,
                         secagg=upload_schemes.SCHEMES[self.config.upload_scheme]
                         .task_params(stored), **params)

    @classmethod
    def from_stored(cls, stored: Mapping[str, Any]) -> RoundPlan:
        """A stored config read back (validated when it was stored; rounds opened before a
        setting existed get its default, as they ran with it)."""
        operator = {k: stored[k] for k in OPERATOR_KEYS if k in stored}
        for key in ("min_clients", "max_clients", "sampling_rate", "delta", "model_version",
                    "trainable"):
            operator.pop(key, None)  # stored values are the derived ones
        config = RoundConfig(**operator)
        trainable = stored.get("trainable")
        derived = Derived(
            min_clients=int(stored["min_clients"]),
            max_clients=int(stored.get("max_clients") or stored["target_clients"]),
            sampling_rate=selection.rate(stored),
            sampling_basis=str(stored.get("sampling_basis", "")),
            delta=stored.get("delta"),
            delta_basis=str(stored.get("delta_basis", "")),
            model_version=stored.get("model_version"),
            trainable=None if trainable is None else tuple(trainable),
            expected_shapes=stored.get("expected_shapes"),
            selection=stored.get("selection"),
            epsilon_projected=stored.get("epsilon_projected"),
            clip_basis=stored.get("clip_basis"),
        )
        return cls(config, derived)


bad = upload_schemes.bad_round_config


def _check_number(config: Mapping[str, Any], key: str) -> None:
    """``config[key]`` against its field's type and Bound (None allowed where it means
    "derived")."""
    f = _FIELDS[key]
    value, bound = config[key], f.metadata["bound"]
    if value is None and f.default is None:
        return
    integer = f.type.startswith("int")
    kinds = (int,) if integer else (int, float)
    low, inclusive = bound.minimum, not bound.exclusive
    if type(value) not in kinds or not math.isfinite(value) or value < low or (
        value == low and not inclusive
    ):
        kind = "an integer" if integer else "a number"
        raise bad(f"{key} must be {kind} {'>=' if inclusive else '>'} {low:g}, got {value!r}")


def _check_adaptive_clip(config: Mapping[str, Any]) -> None:
    """Adaptive clipping's settings: the devices' bits travel inside the SecAgg+ vector, and
    their count is noised by the server (central DP), so it needs both. Whether the count's
    noise leaves some for the update is the strategy's check (``plan`` builds it)."""
    for key in CLIP_KEYS:
        _check_number(config, key)
    if config["clip_quantile"] is None:
        extra = [k for k in CLIP_KEYS[1:] if config[k] is not None]
        if extra:
            raise bad(f"{extra} only apply with clip_quantile (adaptive clipping)")
        return
    if not config["clip_quantile"] < 1:
        raise bad(f"clip_quantile must be in (0, 1), got {config['clip_quantile']!r}")
    if config["upload_scheme"] != secagg.SCHEME:
        raise bad(f"clip_quantile needs upload_scheme {secagg.SCHEME!r}: the devices' "
                  "under-the-clip bits travel inside its vector, so the server sees only "
                  "their sum")
    if config["dp_mode"] != "central":
        raise bad("clip_quantile needs dp_mode 'central': the server noises the bits' count")


def with_clip(plan: RoundPlan, previous: tuple[str, float] | None) -> RoundPlan:
    """The round's clip under adaptive clipping: ``previous`` = (round id, its
    ``clip_norm_next``) of the newest published round that adapted its clip, else the
    operator's clip_norm as the first estimate. Unchanged without clip_quantile. The server
    (``sync_server.rounds``) and the fast simulator both call this."""
    quantile = plan.config.clip_quantile
    if quantile is None:
        return plan
    if previous is None:
        basis = (f"adaptive (quantile {quantile:g}): the operator's clip_norm as the first "
                 "estimate")
        return replace(plan, derived=replace(plan.derived, clip_basis=basis))
    round_id, clip = previous
    basis = f"adaptive (quantile {quantile:g}): {round_id}'s noised estimate"
    return RoundPlan(replace(plan.config, clip_norm=float(clip)),
                     replace(plan.derived, clip_basis=basis))


def plan(obj: Mapping[str, Any]) -> RoundPlan:
    """The admin's round config checked, defaults filled in and the derivable values derived
    (the rest come when the round opens); 400 ``bad_round_config`` on anything unusable
    (unknown keys included, so a typo never silently means a default), 400
    ``delta_too_large`` on a delta that guarantees nothing."""
    unknown = sorted(set(obj) - set(OPERATOR_KEYS))
    if unknown:
        raise bad(f"unknown round setting(s) {unknown}; known: {sorted(OPERATOR_KEYS)}")
    defaults = {f.name: f.default for f in fields(RoundConfig) if f.name not in STRATEGY_KEYS}
    config = {**defaults, **obj}
    for key, value in config.items():  # counts go into INTEGER columns, seconds into dates
        if type(value) in (int, float) and not abs(value) <= MAX_NUMBER:  # NaN included
            raise bad(f"{key} must be a finite number at most {MAX_NUMBER}, got {value!r}")
    for key in ("target_clients", "population", "max_clients"):
        _check_number(config, key)
    if config["sampling_rate"] is not None and config["population"] is not None and (
        "target_clients" not in obj
    ):
        raise bad("with sampling_rate and population, set target_clients too (the expected "
                  "cohort, q x population): it is the mean's denominator")
    selection.resolve(config)
    if config["upload_scheme"] not in SCHEMES:  # before the scheme's defaults are asked
        raise bad(f"upload_scheme must be one of {SCHEMES}, got {config['upload_scheme']!r}")
    if config["min_clients"] is None:
        config["min_clients"] = upload_schemes.default_min_clients(config)
    _check_number(config, "min_clients")
    if config["min_clients"] > config["target_clients"]:
        raise bad("min_clients must be <= target_clients")
    for key in ("deadline_s", "noise_multiplier", "epsilon_budget", "model_version"):
        _check_number(config, key)
    selection.resolve_delta(config)
    if config["dp_mode"] not in DP_MODES:
        raise bad(f"dp_mode must be 'central' or 'distributed', got {config['dp_mode']!r}")
    for key in ("secagg_stage_timeout_s", "secagg_poll_s", "secagg_degree",
                "secagg_threshold"):
        _check_number(config, key)
    upload_schemes.SCHEMES[config["upload_scheme"]].check_config(config)
    _check_adaptive_clip(config)
    _check_number(config, "serve_ema")
    if config["serve_ema"] is not None and not config["serve_ema"] < 1:
        raise bad(f"serve_ema is the served average's decay, in (0, 1), got "
                  f"{config['serve_ema']!r}")
    try:  # the device-facing half, checked exactly as a device will check it
        training = TrainingParams.params_from_json(config)
    except ProtocolError as exc:
        raise bad(exc.message) from None
    try:
        strategies.build({**config, "expected_clients": config["target_clients"]})
    except (ValueError, TypeError) as exc:
        raise bad(f"strategy: {exc}") from None
    return RoundPlan(
        RoundConfig(**{**defaults, **obj, **training}),
        Derived(min_clients=config["min_clients"], max_clients=config["max_clients"],
                sampling_rate=config["sampling_rate"],
                sampling_basis=config["sampling_basis"], delta=config["delta"],
                delta_basis=config["delta_basis"], model_version=config["model_version"],
                trainable=training["trainable"]),
    )
