"""Full mode against fast mode, round by round: how faithful the simulator is on one run.

    python bench/fidelity.py runs/full/report runs/fast/report [--label federated+DP]

Reads both reports' rounds.csv (``pocketrec simulate`` of the same flags and seed, one with
``--mode full``, one with ``--mode fast``) and prints, for every tenth round, the first,
the last and every round where they part: the cohort sampled and the survivors and the
epsilon spent (drawn and computed alike by construction: any difference fails the script),
the clip (with adaptive clipping, moved by a noised count of under-the-clip bits: shown
with its relative difference where that exceeds 1e-6, as when one device's update norm
sits at the clip and the SecAgg+ quantization's trace in the weights flips its bit), full
mode's int8 HR@10 (the model the real server published, evaluated as devices serve it)
beside fast mode's float HR@10 of the same round (and its int8 where it exported), on both
protocols. Then one line per measure: the rounds compared, in how many they agree, and
the largest difference. A full run stopped early is compared over the rounds it
finished."""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path

SAME = ("sampled", "completed", "epsilon")  # drawn and computed alike by construction
CLIP_RTOL = 1e-6  # the clip's quantization reach (tests/test_fast_simulation.py's parity)


def load(report: Path, label: str | None) -> tuple[str, dict[int, dict[str, str]]]:
    path = report / "rounds.csv"
    if not path.is_file():
        raise SystemExit(f"{path}: no rounds.csv (a report directory of pocketrec simulate?)")
    rows = list(csv.DictReader(path.open()))
    labels = sorted({r["label"] for r in rows})
    if label is None:
        if len(labels) != 1:
            raise SystemExit(f"{path} holds runs {labels}: name one with --label")
        label = labels[0]
    picked = {int(r["round"]): r for r in rows if r["label"] == label}
    if not picked:
        raise SystemExit(f"{path}: no run labelled {label!r} (runs: {labels})")
    return label, picked


def number(text: str) -> float | None:
    return float(text) if text not in ("", None) else None


def agree(a: str, b: str) -> bool:
    """Equal, or equal to a float's last digits."""
    x, y = number(a), number(b)
    if x is None or y is None:
        return a == b
    return math.isclose(x, y, rel_tol=1e-12, abs_tol=1e-15)


def relative(a: str, b: str) -> float:
    """(full - fast) / fast of a number both give; 0 where neither gives one."""
    x, y = number(a), number(b)
    if x is None or y is None:
        return 0.0 if x is None and y is None else math.inf
    return (x - y) / y if y else (0.0 if x == y else math.inf)


def served(row: dict[str, str], key: str) -> float | None:
    """Fast mode's float figure of a round (round 0: the start's int8, which both share)."""
    return number(row[f"float_{key}"]) if row[f"float_{key}"] else number(row[key])


def cell(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def paired(row: dict[str, str], key: str) -> str:
    """Fast mode's float figure, with its int8 one in brackets where it exported."""
    int8 = f" ({number(row[key]):.4f})" if row[f"float_{key}"] and row[key] else ""
    return f"{cell(served(row, key))}{int8}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("full", type=Path, help="the full-mode run's report directory")
    parser.add_argument("fast", type=Path, help="the fast-mode run's report directory")
    parser.add_argument("--label", help="the run to compare when a report holds several")
    args = parser.parse_args()
    label, full = load(args.full, args.label)
    _, fast = load(args.fast, label)
    rounds = sorted(set(full) & set(fast))
    if not rounds:
        raise SystemExit("the two reports share no round")
    last = rounds[-1]

    print(f"run {label!r}: {len(rounds)} rounds in both (full mode to round {max(full)}, "
          f"fast mode to round {max(fast)})\n")
    print("| round | sampled | survivors | epsilon | clip (relative difference) | full int8 "
          "line HR@10 | fast float (int8) line HR@10 | full int8 basket HR@10 | fast float "
          "(int8) basket HR@10 | alike |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    diffs: dict[str, list[float]] = {"hr10": [], "basket_hr10": []}
    int8: dict[str, list[float]] = {"hr10": [], "basket_hr10": []}  # where fast exported
    parted = 0
    clips: list[tuple[int, float]] = []  # (round, relative difference) beyond CLIP_RTOL
    largest_clip = 0.0
    for r in rounds:
        a, b = full[r], fast[r]
        same = all(agree(a[k], b[k]) for k in SAME)
        parted += not same
        clip = relative(a["clip_norm"], b["clip_norm"])
        largest_clip = max(largest_clip, abs(clip))
        if abs(clip) > CLIP_RTOL:
            clips.append((r, clip))
        for key in diffs:
            x, y = number(a[key]), served(b, key)
            if x is not None and y is not None:
                diffs[key].append(x - y)
            if r and x is not None and b[f"float_{key}"] and b[key]:
                int8[key].append(x - float(b[key]))
        if r % 10 == 0 or r in (rounds[0], 1, last) or not same or (
                clips and clips[0][0] == r):
            parts = [a["sampled"], a["completed"], cell(number(a["epsilon"]))]
            parts.append(cell(number(a["clip_norm"])) + (
                f" ({clip:+.1e})" if abs(clip) > CLIP_RTOL else ""))
            for key in diffs:
                parts += [cell(number(a[key])), paired(b, key)]
            parts.append("yes" if same else
                         "NO: " + ", ".join(k for k in SAME if not agree(a[k], b[k])))
            print(f"| {r} | " + " | ".join(parts) + " |")
    print()
    print(f"cohort, survivors and epsilon alike in {len(rounds) - parted} of "
          f"{len(rounds)} rounds")
    print(f"clip within {CLIP_RTOL:g} relative in {len(rounds) - len(clips)} of "
          f"{len(rounds)} rounds" + (f"; from round {clips[0][0]} apart by at most "
                                     f"{largest_clip:.1e} relative" if clips else ""))
    for key, name in (("hr10", "line"), ("basket_hr10", "basket")):
        d = diffs[key]
        if d:
            mean = sum(abs(x) for x in d) / len(d)
            print(f"{name} HR@10, full int8 - fast float: largest |difference| "
                  f"{max(abs(x) for x in d):.4f}, mean {mean:.4f} over {len(d)} rounds; "
                  f"round {last}: full {cell(number(full[last][key]))}, fast "
                  f"{cell(number(fast[last][key]) or served(fast[last], key))}")
        if int8[key]:
            print(f"{name} HR@10, full int8 - fast int8 (the rounds fast mode exported): "
                  f"largest |difference| {max(abs(x) for x in int8[key]):.4f} over "
                  f"{len(int8[key])} rounds")
    return 0 if parted == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
