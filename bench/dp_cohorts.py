"""What a privacy budget buys on a fleet: for each cohort size n and number of rounds T, the
noise multiplier z the server's ledger calibrates to the target epsilon (Poisson sampling at
q = n / N, the ledger's accountant and delta), the noise on the round's mean per value (z / n,
per unit of clip), and the noise left after T rounds against the signal they add up to.

After T rounds of a server step on the mean of n clipped updates that share a direction of
norm g x C, the signal has grown by T g C and each value's noise by sqrt(T) z C / n: their
ratio is z / (n sqrt(T) g). The last column holds z / (n sqrt(T)) over the same figure at
the reference cohort and rounds (the demo's DP run on Online Retail: 400 x 100), so below 1
is less noise for the same learning signal, assuming g does not depend on n and T (the same
local recipe on every device). It says nothing about how fast a recipe learns per round.

    python bench/dp_cohorts.py [--devices 3912] [--epsilon 8] [--delta 1e-5]
                               [--cohorts 100 200 400 800 1600] [--rounds 50 100 200 400]
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def calibrated(devices: int, n: int, t: int, epsilon: float, delta: float
               ) -> tuple[float, float]:
    """(z, z / (n sqrt T)): the noise multiplier the server calibrates for T rounds of
    cohorts of n out of ``devices`` at (epsilon, delta), and the noise against the signal
    after those rounds, per unit of the devices' common update (x C)."""
    from sync_server.privacy import calibrate_noise

    z = calibrate_noise([n / devices] * t, epsilon, delta)
    return z, z / (n * math.sqrt(t))


def main(argv: list[str] | None = None) -> None:
    from sync_server.privacy import DEFAULT_ACCOUNTANT

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=3912,
                        help="N, the fleet the cohorts are sampled from (default: Online "
                             "Retail's eligible devices in the demo)")
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--cohorts", type=int, nargs="+", default=[100, 200, 400, 800, 1600])
    parser.add_argument("--rounds", type=int, nargs="+", default=[50, 100, 200, 400])
    parser.add_argument("--reference", type=int, nargs=2, default=[400, 100],
                        metavar=("N", "T"), help="the cohort and rounds the last column is "
                                                 "relative to")
    args = parser.parse_args(argv)
    if any(not 0 < n <= args.devices for n in args.cohorts + [args.reference[0]]):
        parser.error(f"cohorts must be between 1 and --devices {args.devices}")
    logging.getLogger("absl").setLevel(logging.ERROR)  # RDP orders dropped on the way

    def ratio(n: int, t: int) -> tuple[float, float]:
        return calibrated(args.devices, n, t, args.epsilon, args.delta)

    started = time.perf_counter()
    ref = ratio(*args.reference)[1]
    print(f"N {args.devices}, epsilon {args.epsilon}, delta {args.delta:g}, accountant "
          f"{DEFAULT_ACCOUNTANT}; relative to {args.reference[0]} x {args.reference[1]}")
    print()
    print("| cohort n | rounds T | q | noise multiplier z | noise on the mean per value, "
          "z / n (x C) | device updates | noise / signal after T rounds, relative |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for n in args.cohorts:
        for t in args.rounds:
            z, r = ratio(n, t)
            print(f"| {n} | {t} | {n / args.devices:.3f} | {z:.3f} | {z / n:.5f} | "
                  f"{n * t:,} | {r / ref:.2f} |", flush=True)
    print(f"\n{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
