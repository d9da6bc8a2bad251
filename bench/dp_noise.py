"""What CSPRNG noise costs per round: N values of Gaussian noise (central DP), of stochastic
rounding uniforms and of discrete Gaussian noise (distributed DP, per device), from
numpy's PCG64 (not cryptographic) against ``device_sdk.csprng.CryptoRandom`` (AES-256-CTR
keystream under a key from the OS). Median of ``--repeat`` runs, one thread.

    python bench/dp_noise.py [--values 500000] [--repeat 7]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from device_sdk.csprng import CryptoRandom
from device_sdk.secagg import discrete_gaussian


def _median_ms(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--values", type=int, default=500_000)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    n = args.values
    pcg, aes = np.random.default_rng(), CryptoRandom()
    rows = [
        ("Gaussian (central DP)", lambda r: r.normal(0.0, 1.0, size=n)),
        ("uniform (stochastic rounding)", lambda r: r.random(n)),
        ("discrete Gaussian, sigma 100 (distributed DP)",
         lambda r: discrete_gaussian(100.0, n, r)),
    ]
    print(f"{n:,} values, median of {args.repeat}")
    print("| draw | numpy PCG64 ms | CryptoRandom (AES-256-CTR) ms | ratio |")
    print("|---|---:|---:|---:|")
    for name, draw in rows:
        fast = _median_ms(lambda d=draw: d(pcg), args.repeat)
        secure = _median_ms(lambda d=draw: d(aes), args.repeat)
        print(f"| {name} | {fast:.1f} | {secure:.1f} | {secure / fast:.1f}x |")


if __name__ == "__main__":
    main()
