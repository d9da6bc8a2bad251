"""A shop app's view of the PocketRec device SDK, on one real Online Retail customer.

Needs only ``pip install "pocketrec[device]"`` (numpy, ai-edge-litert, cryptography, urllib3)
and two signed bundles, e.g. made with the trainer:

    pocketrec export --run runs/retail --signing-key keys/server.key --model-version 1 --out v1
    pocketrec export --run runs/retail --signing-key keys/server.key --model-version 2 --out v2
    python examples/device_app.py --data online_retail.csv.gz --bundle v1/bundle \
        --newer v2/bundle --server-key <hex printed by export>

It logs the customer's purchases, recommends, installs the newer bundle, shows that a
tampered and an older bundle are refused while the current model keeps serving, and trains
locally to produce a clipped update (what a sync would upload)."""

from __future__ import annotations

import argparse
import csv
import gzip
import shutil
import tempfile
from collections import Counter
from datetime import datetime
from pathlib import Path

from device_sdk import BundleError, DeviceClient, LocalTrainer, LocalTrainingConfig


def customer_purchases(path: Path, customer: str | None) -> tuple[str, list[tuple]]:
    """(customer id, [(item, "purchase", ts, context)]) from the UCI Online Retail CSV; the
    busiest customer when none is given. Cancellations and returns are skipped."""
    with gzip.open(path, "rt", newline="") if path.suffix == ".gz" else open(path) as f:
        rows = [r for r in csv.DictReader(f) if r["CustomerID"] and float(r["Quantity"]) > 0
                and not r["InvoiceNo"].upper().startswith(("C", "A"))]
    if customer is None:
        customer = Counter(r["CustomerID"] for r in rows).most_common(1)[0][0]
    events = [
        (r["StockCode"].strip().upper(), "purchase",
         datetime.fromisoformat(r["InvoiceDate"]).timestamp(),
         {"invoice": r["InvoiceNo"], "price": float(r["UnitPrice"])})
        for r in rows if r["CustomerID"] == customer
    ]
    return customer, sorted(events, key=lambda e: e[2])


def tampered_copy(bundle: Path, into: Path) -> Path:
    shutil.copytree(bundle, into)
    weights = bytearray((into / "weights.npz").read_bytes())
    weights[len(weights) // 2] ^= 0x01
    (into / "weights.npz").write_bytes(bytes(weights))
    return into


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="online_retail.csv(.gz)")
    ap.add_argument("--customer", help="CustomerID (default: the busiest customer)")
    ap.add_argument("--bundle", type=Path, required=True, help="signed bundle directory")
    ap.add_argument("--newer", type=Path, required=True, help="a newer signed bundle")
    ap.add_argument("--server-key", required=True, help="the signer's public key, hex")
    ap.add_argument("--device-dir", type=Path, help="device data directory (default: temp)")
    args = ap.parse_args()

    customer, events = customer_purchases(args.data, args.customer)
    device_dir = args.device_dir or Path(tempfile.mkdtemp(prefix="pocketrec-device-"))
    with DeviceClient(device_dir, server_key=bytes.fromhex(args.server_key)) as device:
        installed = device.install(args.bundle)
        print(f"installed model v{installed.version} (golden check overlap "
              f"{installed.golden_overlap:.2f})")
        history, last = events[:-1], events[-1]
        device.log_many(history)
        print(f"customer {customer}: logged {device.events.count()} purchase events")
        recs = device.recommend(10)
        hit = any(r.item == last[0] for r in recs)
        print("top-10:", ", ".join(r.item for r in recs))
        print(f"next real purchase {last[0]} in top-10: {hit}")

        print(f"installed model v{device.install(args.newer).version}")
        with tempfile.TemporaryDirectory() as tmp:
            for label, source in (
                ("tampered", tampered_copy(args.newer, Path(tmp) / "tampered")),
                ("older", args.bundle),
            ):
                try:
                    device.install(source)
                    raise SystemExit(f"the {label} bundle was accepted")
                except BundleError as exc:
                    print(f"refused {label} bundle: {exc.code}: {exc}")
        print(f"serving model v{device.model_version}: {len(device.recommend(10))} items")

        bundle = device.models.bundle(device.model_version)
        config = LocalTrainingConfig(local_epochs=2, learning_rate=0.1, clip_norm=1.0)
        update = LocalTrainer(bundle).train(
            device.events.events(), config, base_version=bundle.version, seed=0
        )
        print(f"local training: {update.num_examples} examples, delta norm "
              f"{update.norm_before_clip:.3f} clipped to {update.norm:.3f} "
              f"({update.num_values:,} values)")


if __name__ == "__main__":
    main()
