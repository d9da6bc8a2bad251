"""User-level privacy accounting for federated rounds, on Google's ``dp_accounting``.

The privacy unit is a device (one user): each device's whole round contribution is clipped
to C, Gaussian noise with std = z x C lands on the sum, and each device that checks in is
selected by its own coin of probability q (``sync_server.selection``). One round is then
one step of the Poisson-subsampled Gaussian mechanism with (z, q); with q = 1, of the plain
Gaussian mechanism. Rounds with different (z, q) compose; the ledger keeps one entry per
round so epsilon can be recomputed after a restart, and a budget refuses rounds that
would overspend it.

Accountants (a registry, ``ACCOUNTANTS``): ``pld`` (privacy loss distributions: tight,
the default) and ``rdp`` (Rényi DP: looser, a cross-check; it equals opacus' RDP). Both
are pure Python: this module never imports torch or opacus, and imports ``dp_accounting``
on first use only. Distributed DP (each device adds discrete Gaussian noise inside secure
aggregation) is accounted as the Gaussian of the summed variance with its effective z."""

from __future__ import annotations

import copy
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

DEFAULT_ACCOUNTANT = "pld"
# PLD discretization of the privacy loss. dp_accounting's discretization is pessimistic,
# so the epsilon stays an upper bound; 1e-3 instead of its default 1e-4 is ~10x faster and
# moved the demo's 24-round epsilon (4.7317) in the sixth digit.
PLD_DISCRETIZATION = 1e-3
# PLD's grid grows with the privacy loss it has to cover: at z = 0.001 one step asked for
# 7.6 GiB. Beyond this RDP epsilon (itself a valid upper bound) the ledger reports RDP's
# figure and says so (``computed_by``) rather than building that grid.
PLD_MAX_EPSILON = 500.0


def default_delta(n: int) -> float:
    """The default delta for ``n`` privacy units: the power of ten at or below 1 / (10 n).
    A mechanism that publishes one unit's data outright with probability delta is
    (0, delta)-DP, so delta must stay well below 1 / n. The one rule for the server's
    rounds, the simulator and central DP-SGD (``trainer.train``)."""
    return 10.0 ** -math.ceil(math.log10(10 * max(n, 1)) - 1e-9)


@dataclass(frozen=True)
class LedgerEntry:
    """One round's privacy cost: noise multiplier z, sampling rate q, steps (1 per round)."""

    round_id: str
    noise_multiplier: float
    sampling_rate: float
    steps: int = 1
    mode: str = "central"  # or "distributed" (devices' discrete Gaussian noise, effective z)

    def __post_init__(self) -> None:
        if self.noise_multiplier <= 0:
            raise ValueError("a round without noise has no finite epsilon")
        if not 0 < self.sampling_rate <= 1:
            raise ValueError(f"sampling_rate must be in (0, 1], got {self.sampling_rate}")
        if self.steps < 1:
            raise ValueError("steps must be >= 1")

    @property
    def mechanism(self) -> str:
        """What the accountant composes for this entry."""
        return "gaussian" if self.sampling_rate >= 1 else "poisson_sampled_gaussian"

    def dp_event(self) -> Any:
        """The entry as a ``dp_accounting`` event (its ``steps`` self-composed)."""
        import dp_accounting

        event = dp_accounting.GaussianDpEvent(self.noise_multiplier)
        if self.sampling_rate < 1:
            event = dp_accounting.PoissonSampledDpEvent(self.sampling_rate, event)
        return event if self.steps == 1 else dp_accounting.SelfComposedDpEvent(event,
                                                                                self.steps)


class BudgetExceeded(RuntimeError):
    """Running the round would push epsilon past the configured budget."""

    code = "privacy_budget_exhausted"


def _pld() -> Any:
    from dp_accounting import pld

    return pld.PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)


def _rdp() -> Any:
    from dp_accounting import rdp

    return rdp.RdpAccountant()


ACCOUNTANTS: dict[str, Callable[[], Any]] = {"pld": _pld, "rdp": _rdp}
DESCRIPTIONS = {
    "pld": "pld (dp_accounting privacy loss distributions), user-level, all rounds",
    "rdp": "rdp (dp_accounting Renyi DP), user-level, all rounds",
}


def runs(entries: Iterable[LedgerEntry]) -> list[tuple[tuple[float, float, int], int]]:
    """The entries as consecutive runs of equal (z, q, steps), in recorded order, each with
    its length: the PLD ledger composes one self-composed event per run."""
    out: list[tuple[tuple[float, float, int], int]] = []
    for e in entries:
        key = (e.noise_multiplier, e.sampling_rate, e.steps)
        if out and out[-1][0] == key:
            out[-1] = (key, out[-1][1] + 1)
        else:
            out.append((key, 1))
    return out


def _run_event(key: tuple[float, float, int], count: int) -> Any:
    z, q, steps = key
    return LedgerEntry("", z, q, steps * count).dp_event()


class Prefixes:
    """Accountants after composing a sequence of settled runs, shared by every ledger that
    uses it (LRU, ``size`` sequences). The server rebuilds its ledger from the rounds'
    rows for every check and record, and in a simulation q changes every round (the
    eligible population grows), so composing from scratch grew with the square of the
    rounds: about one second per distinct run with PLD, 26 s a round by round 21 of the
    demo. A ledger finds the accountant after its own settled runs, or after all but the
    last one or two of them (what the previous round left), copies it and composes the
    rest. The compose calls and their order are those from scratch: the same epsilon, bit
    for bit."""

    def __init__(self, size: int = 32) -> None:
        self.size = size
        self._lock = threading.Lock()
        self._items: OrderedDict[tuple[str, tuple[Any, ...]], Any] = OrderedDict()

    def longest(self, name: str, settled: list[Any]) -> tuple[int, Any]:
        """(k, a copy of the accountant after ``settled[:k]``) for the longest k stored
        among the last three prefixes; (0, None) when none is."""
        with self._lock:
            for k in range(len(settled), max(-1, len(settled) - 3), -1):
                key = (name, tuple(settled[:k]))
                if key in self._items:
                    self._items.move_to_end(key)
                    return k, copy.deepcopy(self._items[key])
        return 0, None

    def put(self, name: str, settled: list[Any], accountant: Any) -> None:
        snapshot = copy.deepcopy(accountant)
        with self._lock:
            self._items[(name, tuple(settled))] = snapshot
            self._items.move_to_end((name, tuple(settled)))
            while len(self._items) > self.size:
                self._items.popitem(last=False)


# The process's: every ledger shares it unless given its own (or None: from scratch).
SHARED_PREFIXES = Prefixes()


# --target-epsilon never asks for less noise than this: below it the subsampled Gaussian's
# privacy loss distribution gets costly to build, and federated DP runs sit well above it.
MIN_CALIBRATED_NOISE = 0.3


def calibrate_noise(rates: Iterable[float], target_epsilon: float, delta: float,
                    accountant: str = DEFAULT_ACCOUNTANT, tol: float = 1e-3) -> float:
    """The noise multiplier z for rounds at these sampling rates, one round each in order,
    whose ledger epsilon at ``delta`` is at most ``target_epsilon``: the smallest such z
    to within ``tol`` (never below ``MIN_CALIBRATED_NOISE``), found by dp_accounting's
    ``calibrate_dp_mechanism`` (Brent's method) on the events the ledger composes, then
    confirmed by a ledger. ValueError on no rounds or a target that is not positive."""
    import dp_accounting
    from dp_accounting import mechanism_calibration as calibration

    rates = [float(q) for q in rates]
    if not rates:
        raise ValueError("no rounds to calibrate the noise for")
    if not target_epsilon > 0:
        raise ValueError(f"target epsilon must be positive, got {target_epsilon}")

    def entries(z: float) -> list[LedgerEntry]:
        return [LedgerEntry(f"planned-{i}", z, q) for i, q in enumerate(rates, 1)]

    def event(z: float) -> Any:
        return dp_accounting.ComposedDpEvent([_run_event(key, count)
                                              for key, count in runs(entries(z))])

    def ledger_epsilon(z: float) -> float:
        return PrivacyLedger(delta, entries=entries(z), accountant=accountant,
                             prefixes=None).epsilon()

    make = ACCOUNTANTS[accountant]
    low, guess = MIN_CALIBRATED_NOISE, 1.0
    if ledger_epsilon(guess) <= target_epsilon:
        if ledger_epsilon(low) <= target_epsilon:
            return low
        bracket: Any = calibration.ExplicitBracketInterval(low, guess)
    else:
        bracket = calibration.LowerEndpointAndGuess(guess, 2 * guess)
    z = float(dp_accounting.calibrate_dp_mechanism(make, event, target_epsilon, delta,
                                                   bracket, tol=tol))
    # The ledger is what the rounds will report (it may answer from RDP where PLD's grid
    # would be too large): step up until it agrees.
    while ledger_epsilon(z) > target_epsilon:
        z += tol
    return z


class PrivacyLedger:
    """Cumulative (epsilon, delta) over ledger entries, via the named accountant.
    ``prefixes``: where accountants after settled runs are kept between ledgers (the
    process's by default; None composes every run on every call)."""

    def __init__(
        self, delta: float, budget: float | None = None, entries: Iterable[LedgerEntry] = (),
        accountant: str = DEFAULT_ACCOUNTANT, prefixes: Prefixes | None = SHARED_PREFIXES,
    ) -> None:
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        if accountant not in ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {sorted(ACCOUNTANTS)}, "
                             f"got {accountant!r}")
        self.delta = delta
        self.budget = budget
        self.accountant = accountant
        self.computed_by = accountant  # which accountant gave the last epsilon
        self.entries: list[LedgerEntry] = list(entries)
        self.prefixes = prefixes

    def epsilon(self, extra: Iterable[LedgerEntry] = ()) -> float:
        """Epsilon at ``delta`` after every entry (plus ``extra``, hypothetically)."""
        entries = [*self.entries, *extra]
        self.computed_by = self.accountant
        if not entries:
            return 0.0
        all_runs = runs(entries)
        if self.accountant == "pld":
            loose = float(self._after("rdp", all_runs).get_epsilon(self.delta))
            if not loose <= PLD_MAX_EPSILON:  # NaN / inf included
                self.computed_by = "rdp"
                return loose
        return float(self._after(self.accountant, all_runs).get_epsilon(self.delta))

    def _after(self, name: str, all_runs: list[tuple[tuple[float, float, int], int]]) -> Any:
        """Accountant ``name`` after composing ``all_runs`` one run at a time, in order,
        starting from the accountant ``prefixes`` holds after the settled runs (all but the
        last, which a next round may extend) or a prefix of them, and leaving it the
        accountant after the settled runs (``Prefixes``)."""
        settled, last = all_runs[:-1], all_runs[-1]
        done, accountant = (self.prefixes.longest(name, settled) if self.prefixes
                            else (0, None))
        if accountant is None:
            done, accountant = 0, ACCOUNTANTS[name]()
        for key, count in settled[done:]:
            accountant.compose(_run_event(key, count))
        if self.prefixes is not None and done < len(settled):
            self.prefixes.put(name, settled, accountant)
        accountant.compose(_run_event(*last))
        return accountant

    def check(self, entry: LedgerEntry) -> float:
        """Epsilon the round would reach; raises BudgetExceeded when over the budget."""
        after = self.epsilon([entry])
        if self.budget is not None and after > self.budget:
            raise BudgetExceeded(
                f"round {entry.round_id} would raise epsilon from {self.epsilon():.3f} to "
                f"{after:.3f} at delta {self.delta:g}, over the budget of {self.budget:g}; "
                "no more rounds can run with this noise and sampling rate"
            )
        return after

    def record(self, entry: LedgerEntry) -> float:
        """Append a round that ran (its noise was added); returns the new epsilon."""
        self.entries.append(entry)
        return self.epsilon()
