"""CryptoRandom (AES-256-CTR keystream -> uniforms, Box-Muller normals, geometric): the
distributions are right (Kolmogorov-Smirnov and moment tests, each with a false-alarm rate
of 1e-6), a fresh generator never repeats another's stream, and only an explicit seed makes
one reproducible. The DP noise paths use it by default."""

import math

import numpy as np
import pytest
from scipy import stats

from device_sdk.csprng import CryptoRandom
from device_sdk.secagg import discrete_gaussian
from sync_server.strategies import DPFedAvg, FedAvg

ALARM = 1e-6
Z_ALARM = stats.norm.isf(ALARM / 2)  # two-sided z bound for a mean test


def test_normals_and_uniforms_have_their_distributions():
    rng = CryptoRandom()
    z = rng.standard_normal(200_000)
    assert stats.kstest(z, "norm").pvalue > ALARM
    n = z.size
    assert abs(z.mean()) < Z_ALARM / math.sqrt(n)
    assert abs(z.var() - 1) < Z_ALARM * math.sqrt(2 / n)
    u = rng.random((400, 500))
    assert u.shape == (400, 500) and u.min() > 0 and u.max() < 1
    assert stats.kstest(u.ravel(), "uniform").pvalue > ALARM
    scaled = rng.normal(3.0, 2.0, size=(7, 3))
    assert scaled.shape == (7, 3) and isinstance(rng.normal(), float)


def test_geometric_and_the_discrete_gaussian_built_on_it():
    rng = CryptoRandom()
    p, n = 0.2, 200_000
    g = rng.geometric(p, n)
    assert g.min() >= 1
    assert abs(g.mean() - 1 / p) < Z_ALARM * math.sqrt((1 - p) / p**2 / n)
    sigma = 30.0
    d = discrete_gaussian(sigma, n, rng)
    assert d.dtype == np.int64 and abs(d.mean()) < Z_ALARM * sigma / math.sqrt(n)
    # the sample variance of n draws has sd ~ sigma^2 sqrt(2 / n)
    assert abs(d.var() - sigma**2) < Z_ALARM * sigma**2 * math.sqrt(2 / n)


def test_streams_are_fresh_unless_a_seed_is_given():
    a, b = CryptoRandom(), CryptoRandom()
    assert not np.array_equal(a.words(8), b.words(8))
    assert not a.seeded
    s1, s2 = CryptoRandom.from_seed("sim/1"), CryptoRandom.from_seed("sim/1")
    assert s1.seeded and np.array_equal(s1.standard_normal(1000), s2.standard_normal(1000))
    assert not np.array_equal(CryptoRandom.from_seed("sim/2").words(4),
                              CryptoRandom.from_seed("sim/1").words(4))
    with pytest.raises(ValueError, match="32 bytes"):
        CryptoRandom(b"short")


def test_central_dp_noise_comes_from_the_csprng_by_default():
    dp = DPFedAvg(FedAvg(), clip_norm=1.0, noise_multiplier=1.0, expected_clients=4)
    assert isinstance(dp._rng, CryptoRandom)
