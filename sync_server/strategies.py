"""Aggregation strategies, Flower-style: small composable pieces that each report what they did.

A ``Strategy`` turns one round's client deltas into new global weights:

- ``FedAvg``  weighted mean of the deltas, applied with a server learning rate;
- ``FedAvgM`` the same with server momentum (Hsu et al. 2019);
- ``FedAdam`` the mean delta as a pseudo-gradient for a server Adam (Reddi et al. 2021);
- ``FedYogi`` the same with Yogi's additive second moment (Reddi et al. 2021).

``DPFedAvg`` wraps any of them (central DP, McMahan et al. 2018; Flower's
DifferentialPrivacyClientSideFixedClipping is the model) and owns the clip norm C: its
``configure`` step puts C into the round task, devices clip to it, the wrapper re-checks
every delta against it (``CLIP_SLACK``, ``l2_norm``: the protocol's), sums the deltas with
equal weight, adds Gaussian noise with std = noise_multiplier x C to the *sum*, and the noised
sum divided by the expected number of clients becomes the mean the inner optimizer applies.
C is fixed for the round by its config. With adaptive clipping (``AdaptiveClip``, Andrew et
al. 2021) the round's config carries the C the previous round's noised quantile estimate
chose; the devices' under-the-clip bits travel inside the SecAgg+ vector, and the noise on
their count is part of the round's one Gaussian mechanism (``value_noise_multiplier``).

State (momentum and Adam moments) is plain numpy in ``state()`` / ``load_state()`` so the
server can persist it beside the weights and resume after a restart.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from device_sdk.csprng import CryptoRandom
from device_sdk.protocol import CLIP_SLACK, l2_norm

Weights = dict[str, np.ndarray]


@dataclass(frozen=True)
class ClientUpdate:
    """One device's contribution: float32 deltas by parameter name, and its example count."""

    delta: Mapping[str, np.ndarray]
    num_examples: int


@dataclass
class RoundResult:
    """New weights plus the measurements every stage added (TFF-style)."""

    weights: Weights
    measurements: dict[str, float] = field(default_factory=dict)


class Strategy(Protocol):
    name: str

    def configure(self) -> dict[str, Any]:
        """The round-task fields this strategy sets (the DP wrapper: ``clip_norm``)."""
        ...

    def aggregate(self, weights: Weights, updates: Sequence[ClientUpdate]) -> RoundResult:
        """From the individual deltas (sealed uploads)."""
        ...

    def aggregate_sum(self, weights: Weights, total: Weights, clients: int, *,
                      server_noise: bool = True) -> RoundResult:
        """From the sum of ``clients`` deltas (what secure aggregation reveals).
        ``server_noise=False``: the devices already noised the sum (distributed DP)."""
        ...

    def state(self) -> dict[str, np.ndarray]: ...

    def load_state(self, state: Mapping[str, np.ndarray]) -> None: ...


def _check(weights: Weights, updates: Sequence[ClientUpdate]) -> list[str]:
    if not updates:
        raise ValueError("cannot aggregate a round with no updates")
    names = sorted(updates[0].delta)
    for n, u in enumerate(updates):
        if sorted(u.delta) != names:
            raise ValueError(f"update {n} has parameters {sorted(u.delta)}, expected {names}")
        for name in names:
            if u.delta[name].shape != weights[name].shape:
                raise ValueError(
                    f"update {n}: {name} has shape {u.delta[name].shape}, "
                    f"weights have {weights[name].shape}"
                )
    return names


def weighted_mean(updates: Sequence[ClientUpdate], names: Sequence[str]) -> Weights:
    """Example-weighted mean of the deltas (plain mean when every count is 0)."""
    counts = np.array([max(u.num_examples, 0) for u in updates], dtype=np.float64)
    w = counts / counts.sum() if counts.sum() > 0 else np.full(len(updates), 1 / len(updates))
    return {
        name: sum(wi * u.delta[name].astype(np.float64) for wi, u in zip(w, updates, strict=True))
        for name in names
    }


class _ServerOptimizer:
    """Applies a mean delta to the weights; subclasses keep optimizer state."""

    name = "fedavg"

    def __init__(self, server_lr: float = 1.0) -> None:
        if not server_lr > 0:
            raise ValueError(f"server_lr must be > 0, got {server_lr}")
        self.server_lr = server_lr

    def configure(self) -> dict[str, Any]:
        return {}  # devices clip to the round config's clip_norm; nothing to add

    def aggregate(self, weights: Weights, updates: Sequence[ClientUpdate]) -> RoundResult:
        names = _check(weights, updates)
        return self.apply(weights, weighted_mean(updates, names), len(updates))

    def aggregate_sum(self, weights: Weights, total: Weights, clients: int, *,
                      server_noise: bool = True) -> RoundResult:
        """The plain mean of the sum, each device weighted equally (per-device example
        counts stay private). Without the DP wrapper there is no noise to add or skip."""
        return self.apply(weights, {k: v / clients for k, v in total.items()}, clients)

    def apply(self, weights: Weights, mean: Weights, clients: int) -> RoundResult:
        new = dict(weights)
        for name, step in self.step(mean).items():
            new[name] = (weights[name].astype(np.float64) + step).astype(np.float32)
        return RoundResult(new, {"clients": float(clients), "mean_delta_norm": l2_norm(mean)})

    def step(self, mean: Weights) -> Weights:
        return {k: self.server_lr * v for k, v in mean.items()}

    def state(self) -> dict[str, np.ndarray]:
        return {}

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        return None


class FedAvg(_ServerOptimizer):
    """w <- w + server_lr * weighted mean delta (server_lr 1 is McMahan et al.'s FedAvg)."""


class FedAvgM(_ServerOptimizer):
    """Server momentum: v <- momentum * v + mean; w <- w + server_lr * v."""

    name = "fedavgm"

    def __init__(self, server_lr: float = 1.0, momentum: float = 0.9) -> None:
        super().__init__(server_lr)
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.momentum = momentum
        self._velocity: Weights = {}

    def step(self, mean: Weights) -> Weights:
        for k, v in mean.items():
            self._velocity[k] = self.momentum * self._velocity.get(k, 0.0) + v
        return {k: self.server_lr * self._velocity[k] for k in mean}

    def state(self) -> dict[str, np.ndarray]:
        return {f"velocity/{k}": v for k, v in self._velocity.items()}

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        self._velocity = {
            k.split("/", 1)[1]: np.asarray(v, np.float64)
            for k, v in state.items()
            if k.startswith("velocity/")
        }


class FedAdam(_ServerOptimizer):
    """Adam on the pseudo-gradient -mean (Reddi et al. 2021, no bias correction, as there):
    m <- b1 m + (1 - b1) d; v <- b2 v + (1 - b2) d^2; w <- w + lr m / (sqrt(v) + tau)."""

    name = "fedadam"

    def __init__(
        self, server_lr: float = 0.01, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3
    ) -> None:
        super().__init__(server_lr)
        if not (0 <= beta1 < 1 and 0 <= beta2 < 1 and tau > 0):
            raise ValueError("need 0 <= beta1, beta2 < 1 and tau > 0")
        self.beta1, self.beta2, self.tau = beta1, beta2, tau
        self._m: Weights = {}
        self._v: Weights = {}

    def step(self, mean: Weights) -> Weights:
        out = {}
        for k, d in mean.items():
            self._m[k] = self.beta1 * self._m.get(k, 0.0) + (1 - self.beta1) * d
            self._v[k] = self.second_moment(self._v.get(k, 0.0), d)
            out[k] = self.server_lr * self._m[k] / (np.sqrt(self._v[k]) + self.tau)
        return out

    def second_moment(self, v: Any, d: np.ndarray) -> np.ndarray:
        """Adam's: v <- b2 v + (1 - b2) d^2."""
        return self.beta2 * v + (1 - self.beta2) * d * d

    def state(self) -> dict[str, np.ndarray]:
        return {**{f"m/{k}": v for k, v in self._m.items()},
                **{f"v/{k}": v for k, v in self._v.items()}}

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        self._m = {k[2:]: np.asarray(v, np.float64) for k, v in state.items() if k[:2] == "m/"}
        self._v = {k[2:]: np.asarray(v, np.float64) for k, v in state.items() if k[:2] == "v/"}


class FedYogi(FedAdam):
    """Yogi on the pseudo-gradient (Reddi et al. 2021, Algorithm 2): FedAdam's step with
    v <- v - (1 - b2) d^2 sign(v - d^2). v moves by at most (1 - b2) d^2 a round, and towards
    d^2 from either side, so a coordinate whose updates stop for a while keeps its
    denominator instead of decaying to tau (Adam's v shrinks geometrically there, and the
    next update of that coordinate is a near-full lr step)."""

    name = "fedyogi"

    def second_moment(self, v: Any, d: np.ndarray) -> np.ndarray:
        d2 = d * d
        return v - (1 - self.beta2) * d2 * np.sign(v - d2)


class DPFedAvg:
    """Central DP around a server optimizer; see the module docstring.

    ``expected_clients`` is the denominator of the mean (fixed, not the number that arrived,
    so one device's presence changes the result by at most C / expected_clients)."""

    def __init__(
        self,
        inner: _ServerOptimizer,
        *,
        clip_norm: float,
        noise_multiplier: float,
        expected_clients: int,
        rng: Any = None,
    ) -> None:
        if not clip_norm > 0 or noise_multiplier < 0 or expected_clients < 1:
            raise ValueError("need clip_norm > 0, noise_multiplier >= 0, expected_clients >= 1")
        self.inner = inner
        self.name = f"dp-{inner.name}"
        self.clip_norm = float(clip_norm)
        self.noise_multiplier = float(noise_multiplier)
        self.expected_clients = int(expected_clients)
        # The noise that hides each device: AES-CTR under a fresh OS key (a numpy bit
        # generator's state can be recovered from its output). A seeded generator only when
        # a simulation configures one (``CryptoRandom.from_seed``).
        self._rng = rng or CryptoRandom()

    @property
    def rng(self) -> Any:
        """The noise stream (adaptive clipping draws its count's noise from it too)."""
        return self._rng

    def configure(self) -> dict[str, Any]:
        """The clip norm devices must clip to: the wrapper's noise is calibrated to it."""
        return {**self.inner.configure(), "clip_norm": self.clip_norm}

    def aggregate(self, weights: Weights, updates: Sequence[ClientUpdate]) -> RoundResult:
        names = _check(weights, updates)
        for n, u in enumerate(updates):
            norm = l2_norm({k: u.delta[k] for k in names})
            if norm > self.clip_norm * (1 + CLIP_SLACK):
                raise ValueError(f"update {n} has norm {norm:.6g} > clip norm {self.clip_norm}")
        total = {k: sum(u.delta[k].astype(np.float64) for u in updates) for k in names}
        return self.aggregate_sum(weights, total, len(updates))

    def aggregate_sum(self, weights: Weights, total: Weights, clients: int, *,
                      server_noise: bool = True) -> RoundResult:
        """Noise the sum of ``clients`` clipped deltas and apply sum / expected_clients.
        ``server_noise=False`` when the devices already added the noise (distributed DP
        inside secure aggregation)."""
        std = self.noise_multiplier * self.clip_norm if server_noise else 0.0
        noised = {k: v + self._rng.normal(0.0, std, size=v.shape) if std else v
                  for k, v in total.items()}
        mean = {k: v / self.expected_clients for k, v in noised.items()}
        result = self.inner.apply(weights, mean, clients)
        result.measurements.update({"clip_norm": self.clip_norm, "noise_std": std,
                                    "update_noise_multiplier": self.noise_multiplier})
        return result

    def state(self) -> dict[str, np.ndarray]:
        return self.inner.state()

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        self.inner.load_state(state)


# --- adaptive clipping ------------------------------------------------------------------

DEFAULT_CLIP_LR = 0.2  # Andrew et al. 2021's eta_C for the geometric update
# The count noise's default std, as a fraction of the expected cohort (TFF's default for
# ``DifferentiallyPrivateFactory.gaussian_adaptive``: clients_per_round / 20), and at least
# the round's noise multiplier, so a small cohort still leaves the update most of the noise
# budget (z_v <= 1.155 z) instead of being refused.
DEFAULT_COUNT_STDDEV_FRACTION = 0.05


def value_noise_multiplier(noise_multiplier: float, count_stddev: float) -> float:
    """The update's own noise multiplier z_v when a round also releases the noised count of
    its under-the-clip bits: each device adds (b - 1/2) (sensitivity 1/2) to a sum noised
    with std ``count_stddev``, and the pair is one Gaussian mechanism with multiplier
    (z_v^-2 + (2 count_stddev)^-2)^-1/2 (Andrew et al. 2021, Theorem 1). Solved so that
    multiplier is the round's ``noise_multiplier``, the z its ledger entry charges."""
    rest = noise_multiplier ** -2 - (2 * count_stddev) ** -2
    if not rest > 0:
        raise ValueError(f"clip_count_stddev {count_stddev:g} leaves no noise for the update "
                         f"at noise_multiplier {noise_multiplier:g}: it must exceed "
                         f"noise_multiplier / 2 = {noise_multiplier / 2:g}")
    return rest ** -0.5


@dataclass(frozen=True)
class AdaptiveClip:
    """Quantile-based adaptive clipping (Andrew et al. 2021): after each round the clip moves
    geometrically towards the ``quantile``-th quantile of the devices' update norms,
    C <- C exp(-lr (b - quantile)), where b is the noised fraction of devices whose update was
    already within C. Devices send b_i - 1/2 (scaled by C, the SecAgg+ vector's last value),
    so the server only ever sees the sum; ``count_stddev`` is the noise on that count."""

    quantile: float
    lr: float
    count_stddev: float

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> AdaptiveClip | None:
        """From a round config; None when it does not adapt its clip."""
        if config.get("clip_quantile") is None:
            return None
        lr = config.get("clip_lr")
        stddev = config.get("clip_count_stddev")
        if stddev is None:
            cohort = config.get("expected_clients") or config["target_clients"]
            stddev = max(DEFAULT_COUNT_STDDEV_FRACTION * int(cohort),
                         float(config.get("noise_multiplier") or 0.0))
        return cls(float(config["clip_quantile"]),
                   DEFAULT_CLIP_LR if lr is None else float(lr), float(stddev))

    def next_clip(self, clip_norm: float, centred_below: float, expected_clients: int,
                  rng: Any = None) -> dict[str, float]:
        """The next round's clip from this round's ``centred_below`` = sum over devices of
        (b_i - 1/2), noised here when ``rng`` is given (DP rounds: the strategy's noise
        stream). The fraction is over ``expected_clients``, the mean's denominator, so one
        device moves it by at most 1 / (2 expected_clients)."""
        noised = centred_below
        if rng is not None:
            noised += float(rng.normal(0.0, self.count_stddev, size=1)[0])
        below = noised / expected_clients + 0.5
        return {"clip_norm": clip_norm, "clip_below_fraction": below,
                "clip_norm_next": clip_norm * math.exp(-self.lr * (below - self.quantile))}


SERVER_OPTIMIZERS: dict[str, type[_ServerOptimizer]] = {
    cls.name: cls for cls in (FedAvg, FedAvgM, FedAdam, FedYogi)
}
# The round-config keys each server optimizer reads (absent: its defaults above).
OPTIONS: dict[str, tuple[str, ...]] = {
    "fedavg": ("server_lr",), "fedavgm": ("server_lr", "momentum"),
    "fedadam": ("server_lr", "beta1", "beta2", "tau"),
    "fedyogi": ("server_lr", "beta1", "beta2", "tau")}


def build(config: Mapping[str, Any], rng: Any = None) -> Strategy:
    """A strategy from a round config: ``strategy`` (fedavg | fedavgm | fedadam | fedyogi), its
    ``server_lr`` / ``momentum`` / ``beta1`` / ``beta2`` / ``tau``, and, when
    ``noise_multiplier`` is set, the DP wrapper with ``clip_norm`` and ``expected_clients``
    (its update noise the share ``value_noise_multiplier`` leaves when the round adapts
    its clip)."""
    name = config.get("strategy", "fedavg")
    if name not in SERVER_OPTIMIZERS:
        raise ValueError(f"unknown strategy {name!r}; known: {sorted(SERVER_OPTIMIZERS)}")
    cls = SERVER_OPTIMIZERS[name]
    inner = cls(**{k: float(config[k]) for k in OPTIONS[name] if k in config})
    if config.get("noise_multiplier") is None:
        return inner
    z = float(config["noise_multiplier"])
    adaptive = AdaptiveClip.from_config(config)
    return DPFedAvg(
        inner,
        clip_norm=float(config["clip_norm"]),
        noise_multiplier=z if adaptive is None else value_noise_multiplier(
            z, adaptive.count_stddev),
        expected_clients=int(config["expected_clients"]),
        rng=rng,
    )
