"""Strategies and the DP wrapper: the maths each one promises, and who owns the clip norm."""

import math

import numpy as np
import pytest

from sync_server.privacy import BudgetExceeded, LedgerEntry, PrivacyLedger
from sync_server.strategies import (
    AdaptiveClip,
    ClientUpdate,
    DPFedAvg,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedYogi,
    build,
    value_noise_multiplier,
)

SHAPES = {"a": (3, 2), "b": (4,)}


def _weights():
    return {k: np.ones(s, np.float32) for k, s in SHAPES.items()}


def _update(rng, n, scale=1.0, norm=None):
    delta = {k: rng.normal(size=s).astype(np.float32) * scale for k, s in SHAPES.items()}
    if norm is not None:
        total = math.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in delta.values()))
        delta = {k: (v * (norm / total)).astype(np.float32) for k, v in delta.items()}
    return ClientUpdate(delta, n)


def test_fedavg_is_the_example_weighted_mean(rng):
    updates = [_update(rng, 1), _update(rng, 3)]
    result = FedAvg().aggregate(_weights(), updates)
    for k in SHAPES:
        expected = 1 + (updates[0].delta[k] * 1 + updates[1].delta[k] * 3) / 4
        np.testing.assert_allclose(result.weights[k], expected, rtol=1e-6)
    assert result.measurements["clients"] == 2


def test_fedavgm_accumulates_velocity_and_survives_a_restart(rng):
    updates = [_update(rng, 2)]
    opt = FedAvgM(server_lr=1.0, momentum=0.5)
    w1 = opt.aggregate(_weights(), updates).weights
    resumed = FedAvgM(server_lr=1.0, momentum=0.5)
    resumed.load_state(opt.state())
    w2 = resumed.aggregate(w1, updates).weights
    for k in SHAPES:  # second step = 0.5 * first + delta
        np.testing.assert_allclose(w2[k], w1[k] + 1.5 * updates[0].delta[k], rtol=1e-5)


def test_fedadam_first_step_is_lr_times_sign_like(rng):
    updates = [_update(rng, 1)]
    opt = FedAdam(server_lr=0.1, beta1=0.9, beta2=0.99, tau=1e-9)
    w = opt.aggregate(_weights(), updates).weights
    for k in SHAPES:  # m = 0.1 d, v = 0.01 d^2 -> step = 0.1 * 0.1 d / (0.1 |d|) = 0.1 sign(d)
        np.testing.assert_allclose(w[k] - 1, 0.1 * np.sign(updates[0].delta[k]), atol=1e-4)


def test_fedyogi_keeps_the_denominator_of_a_coordinate_whose_updates_stop(rng):
    """Yogi's v moves by at most (1 - b2) d^2 towards d^2; Adam's decays by b2 when d = 0.
    The first step from zero moments is Adam's; after a silent round Yogi's v is unchanged
    where Adam's has shrunk, and a round with a smaller update lowers it by (1 - b2) d^2."""
    first = _update(rng, 1)
    zero = ClientUpdate({k: np.zeros(s, np.float32) for k, s in SHAPES.items()}, 1)
    small = ClientUpdate({k: (0.05 * v).astype(np.float32) for k, v in first.delta.items()}, 1)
    yogi, adam = FedYogi(server_lr=0.1, tau=1e-9), FedAdam(server_lr=0.1, tau=1e-9)
    w_yogi = yogi.aggregate(_weights(), [first]).weights
    w_adam = adam.aggregate(_weights(), [first]).weights
    for k in SHAPES:
        np.testing.assert_allclose(w_yogi[k], w_adam[k], rtol=1e-6)
    v1 = {k: v.copy() for k, v in yogi.state().items() if k.startswith("v/")}
    yogi.aggregate(w_yogi, [zero])
    adam.aggregate(w_adam, [zero])
    for k in SHAPES:
        np.testing.assert_allclose(yogi.state()[f"v/{k}"], v1[f"v/{k}"])
        np.testing.assert_allclose(adam.state()[f"v/{k}"], 0.99 * v1[f"v/{k}"])
    resumed = FedYogi(server_lr=0.1, tau=1e-9)
    resumed.load_state(yogi.state())
    resumed.aggregate(w_yogi, [small])
    for k in SHAPES:  # d^2 < v: v <- v - (1 - b2) d^2
        d2 = small.delta[k].astype(np.float64) ** 2
        np.testing.assert_allclose(resumed.state()[f"v/{k}"], v1[f"v/{k}"] - 0.01 * d2,
                                   rtol=1e-9)


def test_dp_noise_has_the_promised_std_and_sum(rng):
    clients, clip, z = 4, 0.5, 2.0
    updates = [_update(rng, 10, norm=clip) for _ in range(clients)]
    big = {"a": np.zeros((300, 300), np.float32)}
    zero_updates = [ClientUpdate({"a": np.zeros((300, 300), np.float32)}, 1)] * clients
    dp = DPFedAvg(FedAvg(), clip_norm=clip, noise_multiplier=z, expected_clients=clients,
                  rng=np.random.default_rng(1))
    noise = dp.aggregate(big, zero_updates).weights["a"]
    # mean of (sum + N(0, (z C)^2)) / clients: std z C / clients
    assert np.std(noise) == pytest.approx(z * clip / clients, rel=0.02)
    quiet = DPFedAvg(FedAvg(), clip_norm=clip, noise_multiplier=0.0, expected_clients=clients)
    w = quiet.aggregate(_weights(), updates).weights
    for k in SHAPES:  # equal weights, fixed denominator
        np.testing.assert_allclose(w[k], 1 + sum(u.delta[k] for u in updates) / clients,
                                   rtol=1e-5)


def test_dp_refuses_an_update_above_the_clip_bound(rng):
    dp = DPFedAvg(FedAvg(), clip_norm=1.0, noise_multiplier=1.0, expected_clients=2)
    with pytest.raises(ValueError, match="clip norm"):
        dp.aggregate(_weights(), [_update(rng, 1, norm=1.5)])


def test_the_dp_wrapper_owns_the_clip_norm():
    """Its configure step puts C into the task; the optimizer state never carries it."""
    dp = build({"strategy": "fedavgm", "noise_multiplier": 1.0, "clip_norm": 0.3,
                "expected_clients": 4})
    assert dp.configure() == {"clip_norm": 0.3} and FedAvgM().configure() == {}
    assert not any("clip" in key for key in dp.state())


def test_build_from_a_round_config():
    assert isinstance(build({"strategy": "fedavgm", "momentum": 0.8}), FedAvgM)
    dp = build({"strategy": "fedadam", "noise_multiplier": 1.1, "clip_norm": 0.3,
                "expected_clients": 20})
    assert isinstance(dp, DPFedAvg) and isinstance(dp.inner, FedAdam)
    yogi = build({"strategy": "fedyogi", "server_lr": 0.05, "tau": 1e-2})
    assert isinstance(yogi, FedYogi) and (yogi.server_lr, yogi.tau) == (0.05, 1e-2)
    with pytest.raises(ValueError, match="unknown strategy"):
        build({"strategy": "fedsgd"})


def test_ledger_matches_opacus_and_the_budget_stops_rounds():
    """In RDP mode (PLD, the default, is checked against dp_accounting in
    test_privacy_ledger.py) the ledger agrees with opacus' RDP accountant."""
    from opacus.accountants import RDPAccountant

    ledger = PrivacyLedger(delta=1e-5, budget=2.0, accountant="rdp")
    eps = [ledger.record(LedgerEntry(f"r{i}", 1.0, 0.05)) for i in range(5)]
    assert all(b > a for a, b in zip(eps, eps[1:], strict=False))  # grows every round
    reference = RDPAccountant()
    for _ in range(5):
        reference.step(noise_multiplier=1.0, sample_rate=0.05)
    assert eps[-1] == pytest.approx(reference.get_epsilon(1e-5), rel=1e-3)
    restored = PrivacyLedger(1e-5, 2.0, ledger.entries, accountant="rdp")  # after a restart
    assert restored.epsilon() == pytest.approx(eps[-1])
    with pytest.raises(BudgetExceeded, match="over the budget"):
        for i in range(5, 10_000):
            entry = LedgerEntry(f"r{i}", 1.0, 0.05)
            restored.check(entry)
            restored.record(entry)
    assert 5 < len(restored.entries) < 10_000 and restored.epsilon() <= 2.0


def test_adaptive_clippings_count_noise_and_the_updates_are_one_gaussian_mechanism():
    """Andrew et al. 2021: the update noised at z_v (sensitivity C) and the centred bits'
    count noised at sigma (sensitivity 1/2) release as much as one Gaussian mechanism at
    the round's z; dp_accounting's RDP of the composed pair says the same."""
    import dp_accounting

    z, sigma = 1.037, 20.0
    z_v = value_noise_multiplier(z, sigma)
    assert z < z_v < z * 1.001  # a cohort's twentieth as the count's std costs little
    assert (z_v ** -2 + (2 * sigma) ** -2) ** -0.5 == pytest.approx(z, rel=1e-12)
    orders = [1.5, 2.0, 8.0, 64.0]
    pair = dp_accounting.rdp.RdpAccountant(orders)
    pair.compose(dp_accounting.ComposedDpEvent([dp_accounting.GaussianDpEvent(z_v),
                                                dp_accounting.GaussianDpEvent(2 * sigma)]))
    single = dp_accounting.rdp.RdpAccountant(orders)
    single.compose(dp_accounting.GaussianDpEvent(z))
    assert pair.get_epsilon(1e-5) == pytest.approx(single.get_epsilon(1e-5), rel=1e-9)
    with pytest.raises(ValueError, match="must exceed noise_multiplier / 2"):
        value_noise_multiplier(1.0, 0.5)
    dp = build({"strategy": "fedavgm", "noise_multiplier": z, "clip_norm": 0.3,
                "expected_clients": 400, "clip_quantile": 0.5})
    assert dp.noise_multiplier == pytest.approx(z_v)  # the default sigma: 400 / 20


def test_the_adaptive_clip_moves_towards_the_quantile_geometrically():
    clip = AdaptiveClip(quantile=0.5, lr=0.2, count_stddev=1.0)
    n = 40
    # All within the clip (each sent +1/2): it shrinks; none within: it grows; at the
    # quantile it stays.
    assert clip.next_clip(0.3, n / 2, n)["clip_norm_next"] == pytest.approx(
        0.3 * math.exp(-0.2 * 0.5))
    assert clip.next_clip(0.3, -n / 2, n)["clip_norm_next"] == pytest.approx(
        0.3 * math.exp(0.2 * 0.5))
    assert clip.next_clip(0.3, 0.0, n) == {"clip_norm": 0.3, "clip_below_fraction": 0.5,
                                           "clip_norm_next": 0.3}
    # The count's noise: std count_stddev on the sum, so count_stddev / n on the fraction.
    rng = np.random.default_rng(0)
    fractions = [clip.next_clip(0.3, 0.0, n, rng)["clip_below_fraction"]
                 for _ in range(4000)]
    assert np.std(fractions) == pytest.approx(1.0 / n, rel=0.05)
    assert AdaptiveClip.from_config({"target_clients": 400}) is None
    assert AdaptiveClip.from_config({"clip_quantile": 0.7, "target_clients": 400}) == \
        AdaptiveClip(0.7, 0.2, 20.0)
