"""The device SDK on real Online Retail customers, side by side in one run:
recommend() end to end (SQLite log read + history policy + LiteRT + filtering), right after
the app logged an event and again with the log unchanged, vs the bare interpreter invoke;
HR@10 on each customer's real next purchase; the time of one round of local training.

    python bench/recommend.py                    # trains + exports on Online Retail first
    python bench/recommend.py --run runs/retail  # reuse a run made by pocketrec

Every sampled customer gets their own SQLite EventLog (one device = one customer) holding
their real purchase lines up to, not including, the held-out last purchase."""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
from _retail import ONLINE_RETAIL, ensure_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/bench-retail")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--customers", type=int, default=300)
    parser.add_argument("--requests", type=int, default=3000)
    args = parser.parse_args()
    run = Path(args.run)
    ensure_run(run, args.epochs)

    from device_sdk import EventLog, HistoryPolicy, LocalTrainer, LocalTrainingConfig, Recommender
    from device_sdk.bundle import load_bundle
    from trainer.cli import _load_run
    from trainer.data.loaders import load
    from trainer.train import model_rows

    ckpt, prepared = _load_run(str(run))
    raw = prepared.split.test
    test = model_rows(raw, ckpt.model_config())  # with session separators if it has them
    bundle = load_bundle(run / "bundle")
    rec = Recommender(bundle)  # the bundle's own history policy (its manifest's, or default)
    drop_bought = Recommender(bundle, policy=HistoryPolicy())
    keep_bought = Recommender(bundle, policy=HistoryPolicy(exclude_kinds=("dismiss",)))
    trainer = LocalTrainer(bundle)

    table = load(ONLINE_RETAIL)
    by_user = {u: part for u, part in table.groupby("user", sort=False)}
    rng = np.random.default_rng(0)
    rows = rng.choice(len(test), size=min(args.customers, len(test)), replace=False)
    tmp = Path(tempfile.mkdtemp(prefix="bench-recommend-"))
    logs, targets, histories, stamps = [], [], [], []
    for row in rows:
        user, target = test.users[row], ckpt.vocab.keys[test.target[row]]
        part = by_user[user]
        items = part["item"].tolist()
        end = len(items)
        while end and items[end - 1] == target:  # the held-out last step
            end -= 1
        log = EventLog(tmp / f"{user}.db")
        log.log_many(zip(items[:end], part["event"].tolist()[:end],
                         part["timestamp"].astype(float).tolist()[:end], strict=True))
        logs.append(log)
        targets.append(target)
        histories.append(test.history[row])
        stamps.append(None if raw.at is None else float(raw.at[row]))

    def hit_rate(recommender: Recommender) -> float:
        # Asked at the held-out purchase's time: a model with session separators sees
        # whether a new visit starts, as the evaluation's history shows it.
        hits = [t in {r.item for r in recommender.recommend(log, 10, now=now)}
                for log, t, now in zip(logs, targets, stamps, strict=True)]
        return float(np.mean(hits))

    bare_hits = [target in rec.model.topk(history)[0][:10]
                 for history, target in zip(histories, test.target[rows], strict=True)]
    named = bundle.manifest.get("history_policy")
    quality = {
        f"recommend(), the bundle's policy ({named or 'none named: the SDK default'})":
            hit_rate(rec),
        "recommend(), HistoryPolicy(): bought items dropped, last L distinct items":
            hit_rate(drop_bought),
        "recommend(), bought items kept, last L distinct items": hit_rate(keep_bought),
        "bare model top-10 on the split's history": float(np.mean(bare_hits)),
    }

    fresh, cached, bare = [], [], []
    keys = ckpt.vocab.keys[1:]
    for n in rng.integers(0, len(logs), size=args.requests):  # interleaved
        # an app logs a view, then asks for recommendations: nothing cached applies
        logs[n].log(keys[int(rng.integers(len(keys)))], "view")
        started = time.perf_counter_ns()
        rec.recommend(logs[n], 10)
        fresh.append((time.perf_counter_ns() - started) / 1e3)
        started = time.perf_counter_ns()
        rec.recommend(logs[n], 10)  # asked again, log unchanged (another widget, a refresh)
        cached.append((time.perf_counter_ns() - started) / 1e3)
        started = time.perf_counter_ns()
        rec.model.topk(histories[n])
        bare.append((time.perf_counter_ns() - started) / 1e3)

    config = LocalTrainingConfig(local_epochs=1, learning_rate=0.05, batch_size=32,
                                 clip_norm=1.0, max_examples=1000)
    train_ms, examples = [], []
    for log in logs[:100]:
        started = time.perf_counter()
        update = trainer.train(log.events(), config, base_version=bundle.version, seed=0)
        train_ms.append((time.perf_counter() - started) * 1e3)
        examples.append(update.num_examples)
    update_mb = update.num_values * 4 / 2**20

    print(f"model: {ckpt.architecture} {ckpt.config}, int8 {rec.model.size_bytes:,} B; "
          f"{len(logs)} Online Retail customers, one SQLite log each; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, 1 thread\n")
    print("| what | median | p99 | ratio to bare invoke (median) |")
    print("|---|---:|---:|---:|")
    bare_median = np.median(bare)
    for label, xs in (("recommend(k=10) right after a new event", fresh),
                      ("recommend(k=10) again, log unchanged", cached),
                      ("bare LiteRT invoke (TopKModel.topk)", bare)):
        print(f"| {label} | {np.median(xs):.1f} µs | {np.percentile(xs, 99):.1f} µs | "
              f"{np.median(xs) / bare_median:.2f}x |")
    t = np.asarray(train_ms)
    print(f"| local training, 1 epoch, 100 customers (median {int(np.median(examples))} "
          f"examples, max {max(examples)}) | {np.median(t):.0f} ms | "
          f"{np.percentile(t, 99):.0f} ms | - |")
    print(f"\nupdate size: {update.num_values:,} float32 values = {update_mb:.2f} MiB\n")
    print("| HR@10 on each customer's real next purchase | value |")
    print("|---|---:|")
    for name, value in quality.items():
        print(f"| {name} | {value:.4f} |")
    for log in logs:
        log.close()


if __name__ == "__main__":
    main()
