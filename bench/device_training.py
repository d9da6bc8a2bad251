"""On-device local training on real Online Retail customers, for one or more trained runs side
by side in one run: time of one round of LocalTrainer (numpy twin) per customer, the update's
size (what SecAgg+ masks, shares and sums), and whether the federated tensors learn.

    python bench/device_training.py --run runs/sasrec --run runs/bench-retail

Each run trains what its bundle's manifest lists as ``federated`` (the dual encoder: every
tensor; SASRec: output table, final layer norm, last block) and, for comparison, every tensor.

Timing: every sampled customer's log is their whole purchase history before the held-out last
line (what the device holds), one round = 1 local epoch, batch 32, lr 0.05, at most 1000
examples; runs and variants are interleaved per customer, one thread.

Learning: a FedAvg simulation from each run's central model. Per round, ``--devices`` random
customers train on their log; the server adds the plain mean of their clipped deltas. The
logs hold what central training never saw (each customer's last basket up to the held-out
line, the most recent months), and the test HR@10 is on that held-out last line."""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core, like a phone's training job
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
from _retail import ensure_run  # noqa: E402


class _Event:
    """The two fields LocalTrainer reads from an EventLog row."""

    __slots__ = ("item", "kind")

    def __init__(self, item: str) -> None:
        self.item, self.kind = item, "purchase"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="append", help="run directory (repeatable)")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--customers", type=int, default=100, help="timed customers")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--devices", type=int, default=200, help="customers per round")
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--reset", action="store_true",
                        help="start the simulation with the trained tensors re-initialised "
                        "(fresh torch init), so the rounds must learn them from the devices")
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--federated-only", action="store_true",
                        help="leave out the every-tensor comparison")
    args = parser.parse_args()
    runs = [Path(r) for r in (args.run or ["runs/bench-retail"])]
    for run in runs:
        ensure_run(run, args.epochs)

    from device_sdk.bundle import load_bundle
    from device_sdk.local_trainer import LocalTrainer, LocalTrainingConfig
    from trainer.cli import _load_run
    from trainer.data.split import user_sequences
    from trainer.metrics import ranking_metrics

    loaded = []
    for run in runs:
        ckpt, prepared = _load_run(str(run))
        bundle = load_bundle(run / "bundle")
        federated = tuple(bundle.manifest["architecture"].get("federated") or bundle.weights())
        loaded.append((ckpt, prepared, bundle, LocalTrainer(bundle), federated))
    ckpt0, prepared0 = loaded[0][0], loaded[0][1]
    test = prepared0.split.test
    keys = ckpt0.vocab.keys

    sequences = user_sequences(prepared0.spec.load(), ckpt0.vocab)

    def device_log(row: int) -> list[_Event]:
        """The customer's purchases (consecutive repeats collapsed, as LocalTrainer would)
        up to, not including, the held-out last line."""
        return [_Event(keys[i]) for i in sequences[test.users[row]][:-1]]

    rng = np.random.default_rng(0)
    sample = rng.choice(len(test), size=min(args.customers, len(test)), replace=False)
    variants = []
    for ckpt, _, bundle, trainer, federated in loaded:
        names = sorted(bundle.weights())
        variants.append((f"{ckpt.architecture}: federated", trainer, federated))
        if set(federated) != set(names) and not args.federated_only:
            variants.append((f"{ckpt.architecture}: every tensor", trainer, tuple(names)))
    timing: dict[str, list[float]] = {v[0]: [] for v in variants}
    examples: list[int] = []
    values: dict[str, int] = {}
    for row in sample if not args.skip_timing else []:
        events = device_log(int(row))
        for label, trainer, names in variants:
            config = LocalTrainingConfig(local_epochs=1, learning_rate=args.lr, batch_size=32,
                                         clip_norm=args.clip, max_examples=1000,
                                         trainable=names)
            started = time.perf_counter()
            update = trainer.train(events, config, base_version=1, seed=0)
            timing[label].append((time.perf_counter() - started) * 1e3)
            values[label] = update.num_values
        examples.append(update.num_examples)

    if examples:
        print(f"{len(sample)} customers of {prepared0.spec.name} (logs up to the held-out "
              f"last line), {platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} cores, 1 thread; examples per customer: median "
              f"{int(np.median(examples))}, p90 {int(np.percentile(examples, 90))}, "
              f"max {max(examples)}\n")
        print("| model: trained tensors | update values | update MiB (float32) | median ms "
              "| p90 ms | max ms |")
        print("|---|---:|---:|---:|---:|---:|")
        for label, _, _ in variants:
            t = np.asarray(timing[label])
            print(f"| {label} | {values[label]:,} | {values[label] * 4 / 2**20:.2f} | "
                  f"{np.median(t):.0f} | {np.percentile(t, 90):.0f} | {t.max():.0f} |")

    start = "re-initialised trained tensors" if args.reset else "the central model"
    print(f"\nFedAvg simulation from {start}: {args.rounds} rounds x {args.devices} "
          f"customers, {args.local_epochs} local epoch(s), lr {args.lr}, clip {args.clip}, "
          f"plain mean; test HR@10 on {len(test):,} held-out last lines\n")
    print(f"| model: trained tensors | {'start' if args.reset else 'central'} | " +
          " | ".join(f"round {r}" for r in range(1, args.rounds + 1)) + " |")
    print("|---|---:|" + "---:|" * args.rounds)
    for label, timed_trainer, names in variants:
        trainer = LocalTrainer(timed_trainer.bundle)  # its base moves round by round
        arch = trainer.arch

        def hr10(params: dict[str, np.ndarray], trainer=trainer, arch=arch) -> float:
            model = arch.numpy_model(trainer.config, params)
            ids = np.concatenate([model.topk(test.history[s : s + 256], 10)[0]
                                  for s in range(0, len(test), 256)])
            return ranking_metrics(ids, test.target, len(keys), 10)["hr@10"]

        weights = {k: v.copy() for k, v in trainer.base.items()}
        if args.reset:
            import torch

            torch.manual_seed(0)
            fresh = arch.torch_module(trainer.config).state_dict()
            weights.update({k: fresh[k].numpy().copy() for k in names})
        scores = [hr10(weights)]
        round_rng = np.random.default_rng(1)
        for _ in range(args.rounds):
            trainer.base = weights  # every device starts from the current global model
            picked = round_rng.choice(len(test), size=min(args.devices, len(test)),
                                      replace=False)
            config = LocalTrainingConfig(local_epochs=args.local_epochs,
                                         learning_rate=args.lr, batch_size=32,
                                         clip_norm=args.clip, max_examples=1000,
                                         trainable=names)
            total = {k: np.zeros_like(weights[k]) for k in names}
            for row in picked:
                update = trainer.train(device_log(int(row)), config, base_version=1,
                                       seed=int(row))
                for k in names:
                    total[k] += update.delta[k]
            weights = {**weights, **{k: weights[k] + total[k] / len(picked) for k in names}}
            scores.append(hr10(weights))
        print(f"| {label} | " + " | ".join(f"{s:.4f}" for s in scores) + " |")


if __name__ == "__main__":
    main()
