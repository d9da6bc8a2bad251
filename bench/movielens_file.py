"""Write a MovieLens-100k-format file (``u.data``: user, item, rating, timestamp; tab
separated) with no repeats: the embedded synthetic shop's log with each shopper's first event
per item only. The repeat-aware model must not lose to the recency item-KNN there either.

    python bench/movielens_file.py runs/ml/u.data
    pocketrec train --data runs/ml/u.data --run runs/ml-rs && pocketrec export --run runs/ml-rs
    pocketrec evaluate --run runs/ml-rs"""

from __future__ import annotations

import argparse
from pathlib import Path

from trainer.data import synthetic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    log = synthetic.generate(args.users, args.items, args.seed)
    log = log[log["event"] != "dismiss"].sort_values("timestamp", kind="stable")
    first = log.drop_duplicates(["user", "item"], keep="first")
    users = {u: n + 1 for n, u in enumerate(sorted(first["user"].unique()))}
    items = {i: n + 1 for n, i in enumerate(sorted(first["item"].unique()))}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w") as f:
        for user, item, ts in zip(first["user"], first["item"], first["timestamp"], strict=True):
            f.write(f"{users[user]}\t{items[item]}\t4\t{int(ts)}\n")
    print(f"{args.out}: {len(first):,} ratings, {len(users):,} users, {len(items):,} items "
          f"(dropped {len(log) - len(first):,} repeat events)")


if __name__ == "__main__":
    main()
