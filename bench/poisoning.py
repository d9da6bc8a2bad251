"""Model poisoning by one device, measured on the real server: how far an attacker's update
moves the published model, against the bound the clip allows.

    python bench/poisoning.py              # SQLite; add --postgresql for both backends

Runs ``tests/test_poisoning.py`` (the real server in a subprocess, real devices' sealed and
SecAgg+ uploads, a tiny real export; about a minute, most of it training and exporting the
tiny model) with ``POCKETREC_POISONING_REPORT`` set, then prints what each round measured:

- sealed path, FedAvg (server_lr 1, no DP), 4 devices, C = 1: a norm-C attacker (all on one
  coordinate, or against the honest mean) vs C x its FedAvg weight (C / 4 at equal counts);
- SecAgg+ path, 4 devices: honest max-norm rounds, an unclipped attacker the guard stops, and
  an attacker that knows the honest sum and stays inside the guard (the documented limit).

"moved" = |published delta - the delta without the attacker's term| (L2 over all weights)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--postgresql", action="store_true", help="also on PostgreSQL")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "poisoning.jsonl"
        env = {**os.environ, "POCKETREC_POISONING_REPORT": str(out)}
        select = [] if args.postgresql else ["-k", "sqlite"]
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               "tests/test_poisoning.py", *select], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, text=True)
        rows = [json.loads(line) for line in out.read_text().splitlines()] if (
            out.exists()) else []
    if done.returncode != 0:
        print(done.stdout[-4000:])
        return done.returncode
    print(f"{'path':7} {'backend':10} {'attack':40} {'bound':>9} {'moved':>9}  outcome")
    for r in rows:
        if r["path"] == "sealed":
            bound, moved = r["bound"], r["moved"]
            outcome = (f"published (examples honest {r['honest_examples']} x3, attacker "
                       f"{r['attacker_examples']})")
        elif "moved" in r:
            bound, moved = r["honest_bound"], r["moved"]
            outcome = (f"{r['outcome']}; limit (B + |h|) / n = {r['limit']:.4f}, "
                       f"B = {r['guard']:.4f}")
        elif "attacker_norm" in r:  # stopped by the guard: nothing published
            bound, moved = r["clip"] / r["clients"], 0.0
            outcome = (f"{r['outcome']} (|a| = {r['attacker_norm']:g}: unguarded it would "
                       f"move {r['attacker_norm'] / r['clients']:.4f})")
        else:  # honest devices only
            bound = moved = None
            outcome = f"{r['outcome']}, B = {r['guard']:.4f}"
        cells = ["-" if v is None else f"{v:.4f}" for v in (bound, moved)]
        print(f"{r['path']:7} {r['backend']:10} {r['attack']:40} {cells[0]:>9} {cells[1]:>9}  "
              f"{outcome}")
    print("bound: C x the attacker's FedAvg weight (C / n for SecAgg+, every device weighs the "
          "same); C = 1, n = 4")
    return 0


if __name__ == "__main__":
    sys.exit(main())
