"""User-level privacy accounting for federated rounds, on opacus' RDP accountant.

The privacy unit is a device (one user): each device's whole round contribution is clipped
to C, the server adds Gaussian noise with std = z x C to the sum, and devices are sampled
with rate q = clients per round / population. One round is then one step of the sampled
Gaussian mechanism with (z, q), exactly what opacus accounts for DP-SGD. Rounds with
different (z, q) compose; the ledger keeps one entry per round so epsilon can be recomputed
after a restart, and a budget refuses rounds that would overspend it.

(Uniform sampling of a fixed number of clients is accounted as Poisson sampling at the same
rate, the usual approximation in federated DP; the docs say so.)"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


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


class BudgetExceeded(RuntimeError):
    """Running the round would push epsilon past the configured budget."""

    code = "privacy_budget_exhausted"


class PrivacyLedger:
    """Cumulative (epsilon, delta) over ledger entries, via opacus' RDPAccountant."""

    def __init__(
        self, delta: float, budget: float | None = None, entries: Iterable[LedgerEntry] = ()
    ) -> None:
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        self.delta = delta
        self.budget = budget
        self.entries: list[LedgerEntry] = list(entries)

    def epsilon(self, extra: Iterable[LedgerEntry] = ()) -> float:
        """Epsilon at ``delta`` after every entry (plus ``extra``, hypothetically)."""
        from opacus.accountants import RDPAccountant

        entries = [*self.entries, *extra]
        if not entries:
            return 0.0
        accountant = RDPAccountant()
        accountant.history = [(e.noise_multiplier, e.sampling_rate, e.steps) for e in entries]
        return float(accountant.get_epsilon(self.delta))

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
