"""What the device install costs: installed size of `pip install "pocketrec[device]"` in an
empty venv, and peak memory (max RSS) of a process in that venv that imports the SDK, loads
the Online Retail model and serves 10,000 recommendations from a real customer's log.

    python bench/device_footprint.py                    # trains + exports Online Retail first
    python bench/device_footprint.py --run runs/retail  # reuse a run made by pocketrec

Needs the package registry (it runs pip)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from _retail import REPO, ensure_run

SERVE = r"""
import json, resource, sys, time
def rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
from pathlib import Path
base = rss_mib()
import device_sdk
from device_sdk import EventLog, Recommender, load_bundle
imported = rss_mib()
rec = Recommender(load_bundle(sys.argv[1]))
loaded = rss_mib()
log = EventLog(Path(sys.argv[2]) / "events.db")
keys = rec.vocab.keys[1:]
log.log_many((keys[(i * 7919) % len(keys)], "purchase", 1e9 + i) for i in range(2000))
started = time.perf_counter()
for i in range(10_000):
    rec.recommend(log, 10)
    if i % 100 == 0:
        log.log(keys[i % len(keys)], "view")
seconds = time.perf_counter() - started
print(json.dumps({"python": base, "import": imported, "model": loaded, "served": rss_mib(),
                  "seconds": seconds, "modules": sorted({m.split(".")[0] for m in sys.modules})}))
"""


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/bench-retail")
    parser.add_argument("--epochs", type=int, default=8)
    args = parser.parse_args()
    run = Path(args.run)
    ensure_run(run, args.epochs)

    with tempfile.TemporaryDirectory() as tmp:
        venv = Path(tmp) / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        site = next((venv / "lib").glob("python*/site-packages"))
        empty = dir_size(site)
        before = {entry.name for entry in site.iterdir()}
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", f"{REPO}[device]"],
                       check=True)
        packages = {}
        for entry in site.iterdir():
            if entry.is_dir() and entry.name not in before and not entry.name.endswith(
                (".dist-info", "__pycache__")
            ):
                packages[entry.name] = dir_size(entry)
        total = dir_size(site) - empty
        done = subprocess.run([str(venv / "bin" / "python"), "-c", SERVE,
                               str(run / "bundle"), tmp], capture_output=True, text=True,
                              check=True)
        mem = json.loads(done.stdout.strip().splitlines()[-1])

    print('Installed size of `pip install "pocketrec[device]"` into an empty venv '
          "(site-packages growth):\n")
    print("| package | MiB |")
    print("|---|---:|")
    for name, size in sorted(packages.items(), key=lambda kv: -kv[1])[:6]:
        if size > 2**20 // 4:
            print(f"| {name} | {size / 2**20:.1f} |")
    print(f"| **total** | **{total / 2**20:.1f}** |")
    print(f"\nPeak memory (max RSS) of one process in that venv, 10,000 recommend(k=10) calls "
          f"on a 2,000-event log in {mem['seconds']:.1f} s:\n")
    print("| after | max RSS MiB |")
    print("|---|---:|")
    for stage, label in (("python", "interpreter start"), ("import", "import device_sdk"),
                         ("model", "model loaded + golden check"),
                         ("served", "10,000 recommendations")):
        print(f"| {label} | {mem[stage]:.1f} |")
    heavy = {"torch", "flask", "sqlalchemy", "tensorflow", "jax", "pandas"} & set(mem["modules"])
    print(f"\nheavy modules loaded: {sorted(heavy) or 'none'}")


if __name__ == "__main__":
    main()
