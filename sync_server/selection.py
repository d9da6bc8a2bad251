"""Selection at check-in: one secret coin per (device, round), the sampling the accountant
assumes.

A round's sampling rate q comes from its config and nothing else: ``sampling_rate`` itself,
or ``target_clients / population`` where ``population`` is the eligible population the
operator vouches for (both recorded in the round's config). No count of registered device
keys ever enters q: anyone can register keys.

Every device that checks in while the round collects, holding the round's base model
version, gets one coin: selected with probability q, drawn from ``secrets`` (the OS CSPRNG)
and stored in ``selection_coins`` before the answer goes out, so checking in again (or
concurrently, from another worker) returns the stored outcome. The cohort is then a
Poisson sample of the devices that checked in, of random size, as the PLD and RDP analyses
of the Poisson-subsampled Gaussian mechanism assume.

- q < 1: selection is never capped and collecting ends only at its deadline (or when the
  operator closes it): a cap, or an early end once enough devices were selected, would make
  one device's selection depend on the others' coins and break the Poisson analysis.
  ``max_clients`` bounds the SecAgg+ ring; a cohort above it fails the round before
  anything is released.
- q = 1 (the default when the config names neither): every device is taken, first come,
  up to ``target_clients``, and the round ends once that many updates arrived. No
  amplification is claimed (q = 1 in the ledger), so how the cohort was chosen does not
  matter for the epsilon: each device still contributes at most once per round.

``DETERMINISTIC_SEED`` (a server setting, for simulations and tests only) replaces the
coins by HMAC-SHA256(seed, round id / device id): reproducible, and therefore predictable
by whoever knows the seed; a round records which kind of coin it used."""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
from datetime import datetime
from typing import Any

from sqlalchemy import update
from sqlalchemy.exc import IntegrityError

from sync_server.db import Database
from sync_server.models import Round, Selection, SelectionCoin, as_utc
from sync_server.privacy import default_delta

_BITS = 53  # a uniform double's worth of bits


def _bad(message: str) -> Exception:
    from sync_server.errors import ApiError

    return ApiError("bad_round_config", message, 400)


def resolve(config: dict[str, Any]) -> None:
    """Fill ``sampling_rate`` and ``sampling_basis`` (and the ``max_clients`` bound) into a
    round config in place; 400 ``bad_round_config`` when q cannot be determined."""
    target, population, q = (config["target_clients"], config["population"],
                             config["sampling_rate"])
    if q is not None:
        if type(q) not in (int, float) or not 0 < q <= 1:
            raise _bad(f"sampling_rate must be in (0, 1], got {q!r}")
        q, basis = float(q), "configured sampling_rate"
    elif population is not None:
        q = min(1.0, target / population)
        basis = f"target_clients {target} / population {population} (vouched by the operator)"
    else:
        q, basis = 1.0, "default: every device that checks in (no sampling amplification)"
    config["sampling_rate"], config["sampling_basis"] = q, basis
    if config["max_clients"] is None:
        # Poisson cohorts exceed their mean by 6 standard deviations with probability
        # below 1e-9: the ring is sized for that, not for every possible cohort.
        config["max_clients"] = target if q == 1 else int(
            target + math.ceil(6 * math.sqrt(target)) + 3)
    if config["max_clients"] < target:
        raise _bad("max_clients must be >= target_clients")


def resolve_delta(config: dict[str, Any]) -> None:
    """Fill ``delta`` (default: the power of ten at or below 1 / (10 N)) and ``delta_basis``
    in place, N = ``population`` or, when the config names none, target_clients / q (the
    population its q implies). A delta above 1 / N is refused (400 ``delta_too_large``): a
    mechanism that publishes one device's data outright with probability delta satisfies
    (0, delta)-DP, so such a delta guarantees nothing."""
    from sync_server.errors import ApiError

    if config["population"] is not None:
        n, where = int(config["population"]), "population"
    else:
        n = max(1, math.ceil(config["target_clients"] / float(config["sampling_rate"])))
        where = "target_clients / sampling_rate"
    delta = config["delta"]
    if delta is None:
        delta = default_delta(n)
        config["delta_basis"] = f"default: the power of ten <= 1/(10 N), N = {n} ({where})"
    elif type(delta) not in (int, float) or not 0 < delta < 1:
        raise _bad(f"delta must be in (0, 1), got {delta!r}")
    elif delta > 1 / n:
        raise ApiError("delta_too_large", f"delta {delta:g} is above 1/N = {1 / n:.3g} "
                       f"(N = {n}, {where}): a round that published one device's data "
                       f"outright with probability delta would meet it; use at most "
                       f"1/(10 N), e.g. {default_delta(n):g}",
                       400)
    else:
        config["delta_basis"] = f"configured (N = {n}, {where})"
    config["delta"] = float(delta)


def rate(config: dict[str, Any]) -> float:
    """A round's q. Rounds opened before revision 0006 have none in their config: they were
    first come up to target_clients, and keep that (q = 1 selection) until they end."""
    return float(config.get("sampling_rate", 1.0))


def capped(config: dict[str, Any]) -> bool:
    """Whether selection is first-come up to target_clients (only when q = 1)."""
    return rate(config) >= 1.0


def collecting_done(row: Round, now: datetime) -> bool:
    """Whether check-in may close: at the deadline, or (q = 1 only) once target_clients
    updates (SecAgg+: key advertisements) arrived."""
    if now >= as_utc(row.deadline):
        return True
    return capped(row.config) and row.received_count >= int(row.config["target_clients"])


def coin(q: float, round_id: str, device_id: str, seed: str | None) -> bool:
    """One Bernoulli(q) draw: from the OS CSPRNG, or from ``seed`` when one is configured."""
    if q >= 1.0:
        return True
    if seed is None:
        bits = secrets.randbits(_BITS)
    else:
        digest = hmac.new(seed.encode(), f"coin/{round_id}/{device_id}".encode(),
                          hashlib.sha256).digest()
        bits = int.from_bytes(digest[:8], "big") >> (64 - _BITS)
    return bits < q * 2**_BITS


def draw(db: Database, row: Round, device_id: str, seed: str | None) -> bool:
    """This device's selection for ``row``: the stored coin, or a new one stored now. The
    coin, the Selection row and the round's counter commit in one transaction; a
    concurrent check-in of the same device loses the insert and reads the winner's coin."""
    with db.session() as session:
        stored = session.get(SelectionCoin, (row.id, device_id))
        if stored is not None:
            return stored.selected
    selected = coin(rate(row.config), row.id, device_id, seed)
    try:
        with db.transaction() as session:
            if selected:
                condition = [Round.id == row.id, Round.state == "collecting"]
                if capped(row.config):
                    condition.append(Round.selected_count < int(row.config["target_clients"]))
                # One statement: atomic on SQLite and PostgreSQL, so concurrent check-ins
                # never take more than the cap.
                taken = session.execute(update(Round).where(*condition).values(
                    selected_count=Round.selected_count + 1)).rowcount
                selected = taken == 1
            session.add(SelectionCoin(round_id=row.id, device_id=device_id,
                                      selected=selected, model_version=row.model_version))
            if selected:
                session.add(Selection(round_id=row.id, device_id=device_id))
    except IntegrityError:
        with db.session() as session:
            return session.get(SelectionCoin, (row.id, device_id)).selected
    return selected
