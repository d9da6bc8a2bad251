"""Publishing a round's weights: written into the base's LiteRT file vs the full re-export, for
both architectures on Online Retail, side by side in one run; optionally the install size of
each extra.

    python bench/publish.py                      # trains + exports both models first (1 epoch)
    python bench/publish.py --sizes              # also: fresh venvs per extra, their size

Each (architecture, publisher) runs in a fresh process that first builds the sync server's app
(Flask, SQLAlchemy, the round service: what a gunicorn worker holds), then publishes the same
round weights (the base + a few percent of noise on the federated tensors) ``--repeats`` times.
The table gives the first publish (cold: imports, converter start-up), the median of the rest,
and the process's RSS before and after (peak). "patched" is ``sync_server.publisher:patch_bundle``
(numpy + the flatbuffer schema + the LiteRT interpreter for the golden check); "full export"
is ``trainer.publish:export_weights`` (litert-torch + ai-edge-quantizer)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

from _retail import REPO, ensure_run

CHILD = r"""
import json, resource, statistics, sys, tempfile, time
from pathlib import Path
import numpy as np

def rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

bundle_dir, which, repeats = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
from sync_server.app import create_app
app = create_app({"DATA_DIR": tempfile.mkdtemp(), "ADMIN_TOKEN": "x"})
from device_sdk.bundle import MODEL, load_bundle
base = load_bundle(bundle_dir)
before = rss_mib()
rng = np.random.default_rng(0)
params = base.weights()
weights = {k: params[k] + (0.05 * params[k].std() * rng.normal(size=params[k].shape)
                           ).astype(np.float32)
           for k in base.manifest["architecture"]["federated"]}
if which == "patched":
    from sync_server.publisher import patch_bundle as publish
else:
    from trainer.publish import export_weights as publish
seconds, out = [], None
for i in range(repeats):
    started = time.perf_counter()
    out = publish(weights, bundle_dir, 2 + i, {})
    seconds.append(time.perf_counter() - started)
after = rss_mib()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
model = load_bundle(out).read(MODEL)
print(json.dumps({"first": seconds[0], "median": statistics.median(seconds[1:] or seconds),
                  "rss_before": before, "rss_after": after, "rss_peak": peak,
                  "model_bytes": len(model), "params": int(sum(v.size for v in weights.values())),
                  "torch_loaded": "torch" in sys.modules}))
"""

EXTRAS = ("device", "server", "trainer", "all")


def measure(bundle_dir: Path, which: str, repeats: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(bundle_dir), which, str(repeats)],
                         check=True, capture_output=True, text=True, cwd=REPO)
    return json.loads(out.stdout.strip().splitlines()[-1])


def venv_size(extra: str, root: Path) -> tuple[float, bool]:
    """MiB of a fresh venv with ``pocketrec[extra]`` (non-editable), and whether torch is in it."""
    env = root / extra
    subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
    pip = [str(env / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, f"{REPO}[{extra}]"], check=True)
    du = subprocess.run(["du", "-sm", str(env)], check=True, capture_output=True, text=True)
    has_torch = subprocess.run([str(env / "bin" / "python"), "-c", "import torch"],
                               capture_output=True).returncode == 0
    return float(du.stdout.split()[0]), has_torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=1,
                        help="training epochs of the base models (timing does not depend on it)")
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--sizes", action="store_true", help="also measure install sizes")
    args = parser.parse_args()
    runs = {"dual_encoder": REPO / "runs" / "bench-publish-dual",
            "sasrec": REPO / "runs" / "bench-publish-sasrec"}
    ensure_run(runs["dual_encoder"], args.epochs)
    ensure_run(runs["sasrec"], args.epochs, train_args=("--holdout", "line", "--arch", "sasrec"))

    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}; Online Retail base models, {args.repeats} "
          "publishes each in a fresh process holding the server app\n")
    head = ["architecture", "publisher", "federated values", "model file", "first publish",
            "median publish", "RSS before", "RSS after", "peak RSS", "torch loaded"]
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 3) + ["---"]) + "|")
    for arch, run in runs.items():
        results = {which: measure(run / "bundle", which, args.repeats)
                   for which in ("patched", "full export")}
        for which, r in results.items():
            print(f"| {arch} | {which} | {r['params']:,} | {r['model_bytes'] / 1024:.0f} KiB | "
                  f"{r['first'] * 1000:.0f} ms | {r['median'] * 1000:.0f} ms | "
                  f"{r['rss_before']:.0f} MiB | {r['rss_after']:.0f} MiB | "
                  f"{r['rss_peak']:.0f} MiB | {'yes' if r['torch_loaded'] else 'no'} |")
        ratio = results["full export"]["median"] / results["patched"]["median"]
        print(f"| {arch} | ratio full / patched (median) | | | | {ratio:.0f}x | | | | |")

    if args.sizes:
        print("\n| extra | installed venv | torch importable |\n|---|---:|---|")
        with tempfile.TemporaryDirectory(prefix="pocketrec-sizes-") as root:
            for extra in EXTRAS:
                size, torch = venv_size(extra, Path(root))
                print(f"| `{extra}` | {size:,.0f} MiB | {'yes' if torch else 'no'} |",
                      flush=True)


if __name__ == "__main__":
    main()
