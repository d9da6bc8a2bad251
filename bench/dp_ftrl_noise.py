"""DP-FTRL (tree aggregation, Kairouz et al. 2021) against the DP-FedAvg we ship (Poisson
sampling, amplified), for one fleet: the noise each needs for the same epsilon, and the
noise that reaches the model after t rounds.

    python bench/dp_ftrl_noise.py [--devices 3912] [--cohort 400] [--rounds 100]
                                  [--delta 1e-5] [--epsilon 1 2 4 8]

DP-FedAvg: every device joins a round by its own coin (q = cohort / devices), the
Gaussian's multiplier z calibrated by the server's ledger (``sync_server.privacy``, PLD;
RDP beside it for the like-for-like comparison). The model's noise after t rounds at server
lr 1 without momentum is the sum of t independent noises on the mean: z C / n x sqrt(t).

DP-FTRL needs no sampling: rounds take fixed cohorts, every device at most once per epoch
of b = devices // cohort rounds (the participation rule; the tree restarts every epoch),
and the epochs compose (dp_accounting's single-epoch tree aggregation RDP, replace-one
adjacency, as in the paper). Each round's model reads the noised prefix sum of its epoch
from the tree (popcount(s) nodes after s steps) on top of each finished epoch's total
(popcount(b) nodes): z C / n x sqrt(sum of those node counts).

Both noises are per coordinate of the model, in units of the clip C; what the devices'
signal is, and so whether a noise this size learns, is the simulator's to measure (README,
"Federated learning on Online Retail"). Arithmetic and accounting only: nothing trains.
"""

from __future__ import annotations

import argparse
import logging
import math


def fedavg_z(devices: int, cohort: int, rounds: int, epsilon: float, delta: float,
             accountant: str) -> float:
    from sync_server.privacy import calibrate_noise

    return calibrate_noise([cohort / devices] * rounds, epsilon, delta, accountant=accountant)


def ftrl_epochs(devices: int, cohort: int, rounds: int) -> list[int]:
    """The rounds of each epoch: b = devices // cohort rounds (each device at most once),
    the last epoch what is left."""
    b = devices // cohort
    if b < 1:
        raise ValueError(f"a cohort of {cohort} from {devices} devices leaves no epoch")
    return [b] * (rounds // b) + ([rounds % b] if rounds % b else [])


def ftrl_epsilon(z: float, epochs: list[int], delta: float) -> float:
    import dp_accounting
    from dp_accounting import rdp

    accountant = rdp.RdpAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_SPECIAL)
    for steps in epochs:  # each epoch its own tree, each device once in it
        accountant.compose(dp_accounting.SingleEpochTreeAggregationDpEvent(z, [steps]))
    return accountant.get_epsilon(delta)


def ftrl_z(epochs: list[int], epsilon: float, delta: float) -> float:
    """The smallest z (to 1e-3 relative) whose composed epochs stay within epsilon."""
    lo, hi = 0.05, 1.0
    while ftrl_epsilon(hi, epochs, delta) > epsilon:
        lo, hi = hi, hi * 2
    while hi - lo > 1e-3 * hi:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ftrl_epsilon(mid, epochs, delta) > epsilon else (lo, mid)
    return hi


def ftrl_nodes(epochs: list[int], t: int) -> int:
    """Tree nodes summed into round t's prefix (finished epochs' totals, then this one's)."""
    nodes = 0
    for steps in epochs:
        if t <= 0:
            break
        nodes += bin(min(t, steps)).count("1")
        t -= steps
    return nodes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=3912,
                        help="the fleet (default: Online Retail's eligible devices)")
    parser.add_argument("--cohort", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--epsilon", type=float, nargs="+", default=[1.0, 2.0, 4.0, 8.0])
    args = parser.parse_args()
    # RDP's fractional orders near 1 may not converge at these q: dp_accounting drops
    # those orders (the epsilon stays an upper bound) and warns once per order and call.
    logging.getLogger("absl").setLevel(logging.ERROR)
    n, rounds = args.cohort, args.rounds
    epochs = ftrl_epochs(args.devices, n, rounds)
    checkpoints = sorted({max(1, rounds // 10), rounds // 2, rounds})
    print(f"{args.devices} devices, cohorts of {n}, {rounds} rounds, delta {args.delta:g}; "
          f"DP-FTRL: {len(epochs)} epochs of {epochs[0]} rounds (each device at most once "
          f"in each)")
    head = ["epsilon", "DP-FedAvg z (PLD)", "(RDP)", "DP-FTRL z (RDP)"]
    head += [f"model noise round {t}: FedAvg / FTRL" for t in checkpoints]
    print("| " + " | ".join(head) + " |")
    print("|" + "---:|" * len(head))
    for eps in args.epsilon:
        z_pld = fedavg_z(args.devices, n, rounds, eps, args.delta, "pld")
        z_rdp = fedavg_z(args.devices, n, rounds, eps, args.delta, "rdp")
        z_tree = ftrl_z(epochs, eps, args.delta)
        cells = [f"{eps:g}", f"{z_pld:.3f}", f"{z_rdp:.3f}", f"{z_tree:.3f}"]
        for t in checkpoints:
            fedavg = z_pld / n * math.sqrt(t)
            ftrl = z_tree / n * math.sqrt(ftrl_nodes(epochs, t))
            cells.append(f"{fedavg:.4f} / {ftrl:.4f} ({ftrl / fedavg:.2f}x)")
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
