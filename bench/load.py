"""Load on the real sync server: N concurrent devices against gunicorn (several workers) and
a private PostgreSQL (or SQLite), all on loopback.

Builds a tiny real model (small dual encoder on a synthetic shop, real litert-torch export),
starts PostgreSQL (tests/support/postgres.py) and ``gunicorn 'sync_server:create_app()'``, publishes
the model, opens a sealed FedAvg round for exactly N clients, then drives N devices (the
real SDK, one Ed25519 identity and one keep-alive connection each, threads in
``--processes`` client processes): register, manifest (full, then 304), bundle, then
``--iterations`` x (check in, upload a sealed clipped update when selected, conditional
manifest). Prints per request type and overall: count, req/s, median / p99 / max latency,
4xx, 5xx and connection errors; CPU used by the client, gunicorn and PostgreSQL; and the
round's outcome (published? received == selected? every device then holds the new version?).

    python bench/load.py                                   # 64 devices, 4 gthread workers
    python bench/load.py --devices 16 64 128 --json load.json
    python bench/load.py --devices 64 --worker-class sync --database sqlite

The server's per-device rate limit (counted in the database, shared by the workers) is
raised here (``--rate-limit``) so the run measures the server, not the limiter; the
per-address limits are off (every simulated device shares one loopback address). The round
publishes with the weights-only publisher (the served tflite is unchanged): the real export is a
minutes-long job of its own (bench/export_latency.py), not a request path. No timings are
asserted anywhere; tests/test_load.py runs a small bounded version and checks correctness."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from device_sdk.bundle import zip_bundle_dir  # noqa: E402
from trainer.simulation.load import (  # noqa: E402
    format_table,
    publish_and_open_round,
    run_load,
    summarize,
)
from trainer.simulation.server import GunicornServer  # noqa: E402

ADMIN = "load-admin"


def tiny_bundle(out: Path) -> Path:
    """A small dual encoder (dim 16) trained 2 epochs on a 300-user synthetic shop and
    exported for real, as the test fixtures build it."""
    import model_zoo
    from trainer.checkpoint import Checkpoint
    from trainer.data.dataset import DataSpec, prepare
    from trainer.export import export_bundle
    from trainer.train import TrainConfig, init_module, train

    spec = DataSpec(synthetic_users=300, synthetic_items=120, seed=7)
    prepared = prepare(spec, max_len=12)
    arch = model_zoo.get("dual_encoder")
    config = arch.config(n_items=len(prepared.vocab), dim=16, hidden=16, max_len=12, top_k=20)
    result = train(init_module(arch, config, 0), prepared.split,
                   TrainConfig(epochs=2, batch_size=256), progress=False)
    ckpt = Checkpoint("dual_encoder", config.to_dict(), result.params, prepared.vocab,
                      {"data": spec.to_dict()})
    return export_bundle(ckpt, out, histories=prepared.split.test.history[:3]).bundle_dir


def postmaster_pid(pg) -> int:
    return int((pg.data / "postmaster.pid").read_text().split()[0])


def one_run(args: argparse.Namespace, devices: int, bundle_zip: bytes, root: Path,
            pg) -> dict:
    settings = {"ADMIN_TOKEN": ADMIN, "RATE_LIMIT": args.rate_limit,
                "PUBLISHER": "sync_server.registry:republish_weights"}
    cpu_pids = {}
    if pg is not None:
        settings["DATABASE_URL"] = pg.create_database()
        cpu_pids["postgres"] = postmaster_pid(pg)
    with GunicornServer(root / f"server-{devices}", workers=args.workers,
                        worker_class=args.worker_class, threads=args.threads,
                        **settings) as server:
        cpu_pids["gunicorn"] = server.process.pid
        round_id, _ = publish_and_open_round(server, bundle_zip, devices)
        result = run_load(server, round_id, devices=devices, iterations=args.iterations,
                          processes=args.processes, timeout=args.timeout, cpu_pids=cpu_pids)
    summary = summarize(result)
    summary["loadavg_1m"] = os.getloadavg()[0]  # the machine is shared: context for the numbers
    summary["server"] = {"workers": args.workers, "worker_class": args.worker_class,
                         "threads": args.threads if args.worker_class == "gthread" else None,
                         "database": args.database}
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, nargs="+", default=[64])
    parser.add_argument("--iterations", type=int, default=5,
                        help="check-in + manifest cycles per device (default 5)")
    parser.add_argument("--workers", type=int, default=4, help="gunicorn workers (4)")
    parser.add_argument("--worker-class", default="gthread", choices=["gthread", "sync"])
    parser.add_argument("--threads", type=int, default=8, help="threads per gthread worker")
    parser.add_argument("--database", default="postgresql", choices=["postgresql", "sqlite"])
    parser.add_argument("--processes", type=int, default=2, help="client processes (2)")
    parser.add_argument("--timeout", type=float, default=10.0,
                        help="client connect/read timeout, seconds (10: the SDK's default)")
    parser.add_argument("--rate-limit", type=int, default=100_000,
                        help="server RATE_LIMIT (per device, per minute)")
    parser.add_argument("--json", type=Path, help="write the summaries here")
    args = parser.parse_args()

    summaries = []
    with tempfile.TemporaryDirectory(prefix="bench-load-") as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        bundle_zip = zip_bundle_dir(tiny_bundle(root / "export"))
        print(f"model built and exported in {time.perf_counter() - started:.1f} s "
              f"({len(bundle_zip):,} byte bundle)\n", flush=True)
        pg = None
        if args.database == "postgresql":
            from tests.support.postgres import PostgresServer

            pg = PostgresServer()  # a directory of its own: the server user must reach it
        try:
            for devices in args.devices:
                summary = one_run(args, devices, bundle_zip, root, pg)
                summaries.append(summary)
                s = summary["server"]
                print(f"### {devices} devices; gunicorn {s['workers']} x {s['worker_class']}"
                      + (f" ({s['threads']} threads)" if s["threads"] else "")
                      + f", {s['database']}\n")
                print(format_table(summary))
                print(f"load average (1 min) after the run: {summary['loadavg_1m']:.2f}\n",
                      flush=True)
        finally:
            if pg is not None:
                pg.close()
    if args.json:
        args.json.write_text(json.dumps(summaries, indent=2))
    bad = [s["devices"] for s in summaries
           if s["rows"]["all"]["5xx"] or s["rows"]["all"]["conn_errors"]
           or s["round"]["state"] != "published"]
    if bad:
        print(f"5xx, connection errors or an unpublished round at {bad} devices")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
