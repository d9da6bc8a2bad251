"""The privacy ledger on dp_accounting: its epsilon is the library's own for the steps
recorded (PLD, the default, and RDP), its RDP agrees with opacus' RDP (an independent
implementation) within 1e-3 relative, PLD is the tighter of the two, and the budget stops
rounds. The reference computations compose every step one at a time, as recorded."""

import math

import dp_accounting
import pytest
from dp_accounting import pld, rdp

from sync_server.privacy import (
    MIN_CALIBRATED_NOISE,
    PLD_DISCRETIZATION,
    PLD_MAX_EPSILON,
    BudgetExceeded,
    LedgerEntry,
    Prefixes,
    PrivacyLedger,
    calibrate_noise,
    runs,
)

# (noise multiplier, sampling rate, rounds, delta): the demo's 24 rounds at z 0.5, q 32/1900;
# Online Retail's 15 rounds of 50 of 4,118 at z 0.7; 200 rounds at z 1, q 0.01.
CONFIGS = [(0.5, 32 / 1900, 24, 1e-4), (0.7, 50 / 4118, 15, 1e-4), (1.0, 0.01, 200, 1e-5)]


def _reference(accountant, entries, delta):
    for z, q in entries:
        event = dp_accounting.GaussianDpEvent(z)
        if q < 1:
            event = dp_accounting.PoissonSampledDpEvent(q, event)
        accountant.compose(event)
    return accountant.get_epsilon(delta)


@pytest.mark.parametrize("name", ["pld", "rdp"])
def test_ledger_epsilon_is_dp_accountings_for_the_recorded_steps(name):
    steps = [(1.0, 0.05), (0.8, 0.1), (1.0, 0.05), (2.0, 1.0)]
    ledger = PrivacyLedger(1e-5, accountant=name)
    for n, (z, q) in enumerate(steps):
        ledger.record(LedgerEntry(f"round-{n}", z, q))
    assert [e.mechanism for e in ledger.entries] == ["poisson_sampled_gaussian"] * 3 + [
        "gaussian"]
    reference = (pld.PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)
                 if name == "pld" else rdp.RdpAccountant())
    assert ledger.epsilon() == pytest.approx(_reference(reference, steps, 1e-5), rel=1e-6)
    if name == "pld":  # the coarser grid is pessimistic: at or just above the library default
        fine = _reference(pld.PLDAccountant(), steps, 1e-5)
        assert fine * (1 - 1e-9) <= ledger.epsilon() <= fine * (1 + 1e-3)
    restored = PrivacyLedger(1e-5, entries=ledger.entries, accountant=name)  # after a restart
    assert restored.epsilon() == ledger.epsilon()


@pytest.mark.parametrize("z, q, rounds, delta", CONFIGS)
def test_rdp_mode_matches_opacus_and_pld_is_tighter(z, q, rounds, delta):
    from opacus.accountants import RDPAccountant

    entries = [LedgerEntry(f"r{n}", z, q) for n in range(rounds)]
    opacus = RDPAccountant()
    opacus.history = [(z, q, rounds)]
    rdp_eps = PrivacyLedger(delta, entries=entries, accountant="rdp").epsilon()
    assert rdp_eps == pytest.approx(opacus.get_epsilon(delta), rel=1e-3)
    pld_eps = PrivacyLedger(delta, entries=entries).epsilon()
    assert 0 < pld_eps < rdp_eps


def test_the_budget_refuses_the_round_that_would_overspend_it():
    ledger = PrivacyLedger(1e-5, budget=2.0)
    entry = LedgerEntry("r0", 1.0, 0.1)
    spent = []
    with pytest.raises(BudgetExceeded, match="over the budget"):
        for n in range(1000):
            entry = LedgerEntry(f"r{n}", 1.0, 0.1)
            ledger.check(entry)
            spent.append(ledger.record(entry))
    assert len(spent) > 1 and spent[-1] <= 2.0 < ledger.epsilon([entry])
    assert ledger.accountant == "pld"


def test_a_loss_too_large_for_a_pld_grid_is_reported_by_rdp_and_says_so():
    """z = 0.001 would need a PLD grid of gigabytes; RDP's (valid, looser) figure instead."""
    ledger = PrivacyLedger(1e-5)
    epsilon = ledger.epsilon([LedgerEntry("r", 1e-3, 1.0)])
    assert ledger.computed_by == "rdp" and epsilon > PLD_MAX_EPSILON
    reference = rdp.RdpAccountant()
    reference.compose(dp_accounting.GaussianDpEvent(1e-3))
    assert epsilon == reference.get_epsilon(1e-5)
    assert ledger.epsilon([LedgerEntry("r", 1.0, 0.1)]) < 5 and ledger.computed_by == "pld"


def test_bad_ledger_settings_are_refused():
    with pytest.raises(ValueError, match="accountant"):
        PrivacyLedger(1e-5, accountant="moments")
    with pytest.raises(ValueError, match="delta"):
        PrivacyLedger(0.0)
    with pytest.raises(ValueError, match="no finite epsilon"):
        LedgerEntry("r", 0.0, 0.1)


def test_ledgers_sharing_settled_runs_give_what_one_from_scratch_computes():
    """The fast simulator keeps one ledger and records a round at a time, its sampling rate
    changing every round (the eligible population grows); the server builds a new ledger
    from its rows for every check and record. Both start from the accountant a shared
    ``Prefixes`` holds after the settled runs; round by round both give what a ledger
    composing every run from scratch gives, bit for bit, a hypothetical check() in
    between changes nothing, and each rebuilt ledger found the previous round's runs."""
    prefixes = Prefixes()
    kept = PrivacyLedger(1e-5, prefixes=prefixes)
    entries = []
    for n in range(12):
        q = 0.02 if n in (4, 5, 6) else 0.01 + 0.001 * n  # a run of equal rounds in between
        entry = LedgerEntry(f"round-{n}", 1.1, q)
        if n % 3 == 0:
            kept.check(LedgerEntry("what-if", 0.9, 0.5))
        rebuilt = PrivacyLedger(1e-5, entries=entries, prefixes=prefixes)
        settled = runs([*entries, entry])[:-1]
        found, _ = prefixes.longest("pld", settled)
        assert found >= len(settled) - 1 or n == 0
        projected = rebuilt.check(entry)
        entries.append(entry)
        scratch = PrivacyLedger(1e-5, entries=entries, prefixes=None).epsilon()
        assert kept.record(entry) == projected == scratch
        assert PrivacyLedger(1e-5, entries=entries, prefixes=prefixes).epsilon() == scratch
    reference = pld.PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)
    assert kept.epsilon() == pytest.approx(
        _reference(reference, [(e.noise_multiplier, e.sampling_rate) for e in entries], 1e-5),
        rel=1e-6)


def _planned(z, rates):
    return [LedgerEntry(f"r{i}", z, q) for i, q in enumerate(rates)]


def test_calibrated_noise_is_the_smallest_the_ledger_keeps_under_the_target():
    # A growing population: q falls from 0.3 to 0.1 over 12 rounds.
    rates = [0.3] * 3 + [0.2] * 4 + [0.1] * 5
    for target in (2.0, 6.0):
        z = calibrate_noise(rates, target, 1e-5, tol=1e-3)
        assert PrivacyLedger(1e-5, entries=_planned(z, rates), prefixes=None).epsilon() <= target
        tighter = PrivacyLedger(1e-5, entries=_planned(z - 2e-3, rates), prefixes=None)
        assert tighter.epsilon() > target  # within 2 tol of the least noise that fits


def test_calibration_floors_the_noise_and_refuses_what_it_cannot_do():
    assert calibrate_noise([0.01] * 3, 500.0, 1e-5) == MIN_CALIBRATED_NOISE
    with pytest.raises(ValueError, match="no rounds"):
        calibrate_noise([], 4.0, 1e-5)
    with pytest.raises(ValueError, match="must be positive"):
        calibrate_noise([0.1], 0.0, 1e-5)


def test_the_dp_ftrl_comparison_accounts_its_trees_and_counts_their_nodes():
    """bench/dp_ftrl_noise.py (DP-FTRL against the shipped DP-FedAvg, README): its epochs
    cover the rounds with each device at most once in each; a one-round tree is the plain
    Gaussian mechanism under the same accountant; the z it finds is the smallest within
    the budget; a round's prefix sums one node per set bit of its step in the epoch, on top
    of each finished epoch's total."""
    from tests.support.paths import bench_module

    bench = bench_module("dp_ftrl_noise")

    epochs = bench.ftrl_epochs(3912, 400, 100)
    assert epochs == [9] * 11 + [1]
    assert bench.ftrl_epochs(800, 400, 4) == [2, 2]
    with pytest.raises(ValueError, match="no epoch"):
        bench.ftrl_epochs(300, 400, 10)
    # 9 = 0b1001: two nodes; 12 = a finished epoch (2) then 3 = 0b11 (2).
    assert [bench.ftrl_nodes(epochs, t) for t in (1, 8, 9, 12, 100)] == [1, 1, 2, 4, 23]

    gaussian = rdp.RdpAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_SPECIAL)
    gaussian.compose(dp_accounting.GaussianDpEvent(3.0))
    assert bench.ftrl_epsilon(3.0, [1], 1e-5) == pytest.approx(gaussian.get_epsilon(1e-5))
    # More rounds in a tree, or more trees, cost more at the same z.
    one = bench.ftrl_epsilon(3.0, [9], 1e-5)
    assert gaussian.get_epsilon(1e-5) < one < bench.ftrl_epsilon(3.0, [9, 9], 1e-5)

    z = bench.ftrl_z(epochs, 8.0, 1e-5)
    assert bench.ftrl_epsilon(z, epochs, 1e-5) <= 8.0 < bench.ftrl_epsilon(0.99 * z, epochs,
                                                                           1e-5)


def test_the_cohort_grid_calibrates_as_the_server_does_and_sets_noise_against_signal(capsys):
    """bench/dp_cohorts.py (README, "What epsilon 8 buys on this fleet"): a row's z is the
    server's own calibration for those rounds (its ledger within the target, a little less
    noise over it), the noise against the signal is z / (n sqrt T), and the last column is
    each row's over the reference's."""
    from tests.support.paths import bench_module

    bench = bench_module("dp_cohorts")
    z, ratio = bench.calibrated(1000, 100, 20, 4.0, 1e-5)
    assert z == calibrate_noise([0.1] * 20, 4.0, 1e-5)

    def spent(noise: float) -> float:
        entries = [LedgerEntry(f"round-{i}", noise, 0.1) for i in range(20)]
        return PrivacyLedger(1e-5, entries=entries, prefixes=None).epsilon()

    assert spent(z) <= 4.0 < spent(0.98 * z)
    assert ratio == pytest.approx(z / (100 * math.sqrt(20)))

    bench.main(["--devices", "1000", "--epsilon", "4", "--cohorts", "100", "200",
                "--rounds", "20", "--reference", "100", "20"])
    rows = {int(line.split("|")[1]): line.split("|")[1:-1]
            for line in capsys.readouterr().out.splitlines() if line.startswith("| ")
            and line.split("|")[1].strip().isdigit()}
    assert sorted(rows) == [100, 200]
    assert float(rows[100][3]) == pytest.approx(z, abs=5e-4)
    assert float(rows[100][-1]) == 1.0
    z200, ratio200 = bench.calibrated(1000, 200, 20, 4.0, 1e-5)
    assert float(rows[200][-1]) == pytest.approx(ratio200 / ratio, abs=5e-3)
    assert rows[200][5].strip() == "4,000"  # device updates
    with pytest.raises(SystemExit):
        bench.main(["--devices", "100", "--cohorts", "200"])
