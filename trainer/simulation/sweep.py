"""``pocketrec sweep GRID.toml``: many fast simulations of one fleet, one table, one plot.

GRID.toml::

    [base]                  # any `pocketrec simulate` flag (dashes or underscores)
    synthetic_users = 2000  # data and model flags belong here: every run shares the fleet,
    rounds = 30             # its round clock and the pretrained starting model
    clients_per_round = 32

    [grid]                  # simulation flags, each a list; every combination runs
    noise_multiplier = [0, 0.5, 1.0]   # 0: no differential privacy
    clip_norm = [0.1, 0.3]
    seed = [0, 1]           # the simulation's seed (sampling, dropouts, noise)

    [[run]]                 # optional, repeatable: one recipe whose flags differ from
    strategy = "fedavg"     # another's in more than one place; each [[run]] is combined
    local_epochs = 3        # with every [grid] combination (no flag in both)

    [sample]                # optional: n combinations drawn at random (seeded) instead
    n = 8
    seed = 0

Runs go ``--parallel`` at a time (threads: each run's devices are in its own worker
processes, and its coordinator's numpy releases the GIL), always in fast mode. Each run
writes its own report in OUT/runs/NAME; OUT holds ``sweep.csv`` (one row per run),
``sweep_configs.csv`` (one row per configuration: mean and spread over its seeds),
``sweep.json`` (both), ``index.html`` and ``privacy_utility.png`` (HR@10 of the float
model against epsilon, one curve per run over its rounds; runs without DP as their final
HR@10). The tables are rewritten after every finished run, and a Ctrl-C keeps the
finished runs in them."""

from __future__ import annotations

import argparse
import copy
import csv
import html
import itertools
import json
import threading
import time
import tomllib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any

import numpy as np

from device_sdk.files import atomic_write

# Flags a grid may vary: those of one simulation. Data, model and round-count flags shape
# the fleet, its clock and the starting model every run shares: [base] only.
GRID_FLAGS = ("noise_multiplier", "target_epsilon", "delta", "clip_norm", "clip_quantile",
              "clip_lr", "strategy", "server_lr", "server_lr_from", "server_lr_decay",
              "server_lr_warmup", "momentum", "beta1", "beta2", "tau", "serve_ema", "trainable",
              "local_epochs", "local_lr", "local_lr_from", "local_batch_size", "proximal_mu",
              "local_max_examples", "dp_mode", "device_dropout", "stragglers",
              "clients_per_round", "seed", "workers", "export_every")
FIELDS = ["run", "params", "rounds", "published", "device_updates", "epsilon", "delta",
          "final_hr10", "final_ndcg10", "final_basket_hr10", "final_basket_ndcg10",
          "best_hr10", "best_hr10_round", "best_ndcg10", "best_basket_hr10",
          "best_basket_ndcg10", "wall_s"]


def _key(name: str) -> str:
    return name.replace("-", "_")


def load_grid(path: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """GRID.toml -> ([base] flags, the runs' flag values). ValueError naming what is
    wrong."""
    with open(path, "rb") as f:
        try:
            doc = tomllib.load(f)
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{path}: {exc}") from None
    unknown = sorted(set(doc) - {"base", "grid", "run", "sample"})
    if unknown:
        raise ValueError(f"{path}: unknown table(s) {unknown}; use [base], [grid], [[run]], "
                         f"[sample]")
    base = {_key(k): v for k, v in doc.get("base", {}).items()}
    grid = {_key(k): v for k, v in doc.get("grid", {}).items()}
    bad = sorted(set(grid) - set(GRID_FLAGS))
    if bad:
        raise ValueError(f"{path}: [grid] cannot vary {bad} (every run shares the fleet, "
                         f"its clock and the starting model: put them in [base]); it can "
                         f"vary {list(GRID_FLAGS)}")
    for name, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ValueError(f"{path}: [grid] {name} must be a non-empty list")
    names = sorted(grid)
    combos = [dict(zip(names, values, strict=True))
              for values in itertools.product(*(grid[n] for n in names))]
    recipes = _recipes(path, doc.get("run"), set(grid))
    if recipes:
        combos = [{**combo, **recipe} for recipe in recipes for combo in combos]
        names = [run_name(combo) for combo in combos]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"{path}: [[run]] repeats a run: {repeated}")
    sample = doc.get("sample")
    if sample is not None:
        n = sample.get("n")
        if type(n) is not int or n < 1:
            raise ValueError(f"{path}: [sample] n must be a positive integer")
        rng = np.random.default_rng(int(sample.get("seed", 0)))
        keep = sorted(rng.choice(len(combos), size=min(n, len(combos)), replace=False))
        combos = [combos[i] for i in keep]
    return base, combos


def _recipes(path: str | Path, tables: Any, grid_flags: set[str]) -> list[dict[str, Any]]:
    """The [[run]] tables: each one recipe's flag values (single values, flags a grid may
    vary, none the [grid] varies too). ValueError naming what is wrong."""
    if tables is None:
        return []
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise ValueError(f"{path}: run must be an array of tables, written [[run]]")
    recipes = []
    for i, table in enumerate(tables, 1):
        recipe = {_key(k): v for k, v in table.items()}
        if not recipe:
            raise ValueError(f"{path}: [[run]] number {i} is empty")
        bad = sorted(set(recipe) - set(GRID_FLAGS))
        if bad:
            raise ValueError(f"{path}: [[run]] number {i} cannot set {bad} (every run "
                             f"shares the fleet, its clock and the starting model: put them "
                             f"in [base]); it can set {list(GRID_FLAGS)}")
        both = sorted(set(recipe) & grid_flags)
        if both:
            raise ValueError(f"{path}: [[run]] number {i} sets {both}, which [grid] varies")
        lists = sorted(k for k, v in recipe.items() if isinstance(v, (list, dict)))
        if lists:
            raise ValueError(f"{path}: [[run]] number {i}: {lists} must be single values "
                             f"(vary them in [grid])")
        recipes.append(recipe)
    return recipes


def run_name(params: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(params.items())) or "base"


def summarise(name: str, params: dict[str, Any], records: list[Any], seconds: float
              ) -> dict[str, Any]:
    """One table row: the final (int8, what devices would serve) and best (float, over the
    rounds) metrics of both protocols, epsilon, the work done."""
    done = [r for r in records if r.round > 0]
    last = records[-1]
    row: dict[str, Any] = {
        "run": name, "params": params, "rounds": len(done),
        "published": sum(r.state == "published" for r in done),
        "device_updates": sum(r.completed for r in done), "epsilon": last.epsilon,
        "delta": last.delta, "final_hr10": last.hr10, "final_ndcg10": last.ndcg10,
        "final_basket_hr10": last.basket_hr10, "final_basket_ndcg10": last.basket_ndcg10,
        "wall_s": round(seconds, 1)}
    scored = [r for r in records if r.float_hr10 is not None]
    for metric in ("hr10", "ndcg10", "basket_hr10", "basket_ndcg10"):
        values = [getattr(r, f"float_{metric}") for r in scored
                  if getattr(r, f"float_{metric}") is not None]
        row[f"best_{metric}"] = max(values) if values else None
    if scored:
        row["best_hr10_round"] = max(scored, key=lambda r: r.float_hr10).round
    return row


# Summarised over seeds: each configuration's mean and sample standard deviation.
SEED_METRICS = ("final_hr10", "final_ndcg10", "final_basket_hr10", "final_basket_ndcg10",
                "best_hr10", "best_basket_hr10", "epsilon")


def over_seeds(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per configuration (the run's flags but ``seed``): how many seeds finished,
    and for each of ``SEED_METRICS`` the mean and the sample standard deviation over them
    (``None`` with a single seed), so a difference between configurations can be set
    against the seed-to-seed spread."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        config = {k: v for k, v in row["params"].items() if k != "seed"}
        groups.setdefault(run_name(config), []).append(row)
    out = []
    for name, members in sorted(groups.items()):
        summary: dict[str, Any] = {
            "config": name, "seeds": sorted(m["params"].get("seed") for m in members
                                            if m["params"].get("seed") is not None)}
        for metric in SEED_METRICS:
            values = [m[metric] for m in members if m.get(metric) is not None]
            summary[f"{metric}_mean"] = float(np.mean(values)) if values else None
            summary[f"{metric}_sd"] = (float(np.std(values, ddof=1)) if len(values) > 1
                                       else None)
        out.append(summary)
    return out


def write_table(out: Path, rows: list[dict[str, Any]], curves: dict[str, list[Any]],
                meta: dict[str, Any]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    configs = over_seeds(rows)
    atomic_write(out / "sweep.json", (json.dumps({"meta": meta, "runs": rows,
                                                  "configs": configs}, indent=1)
                                      + "\n").encode(), mode=0o644)
    with open(out / "sweep_configs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(configs[0]) if configs else ["config"])
        writer.writeheader()
        for row in configs:
            writer.writerow({**row, "seeds": " ".join(map(str, row["seeds"]))})
    with open(out / "sweep.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({**{k: row.get(k) for k in FIELDS},
                             "params": json.dumps(row["params"], sort_keys=True)})
    _plot(out / "privacy_utility.png", rows, curves)
    (out / "index.html").write_text(_html(rows, configs, meta))
    return out / "index.html"


def _plot(path: Path, rows: list[dict[str, Any]], curves: dict[str, list[Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for row in rows:
        records = [r for r in curves[row["run"]] if r.float_hr10 is not None]
        if row["epsilon"]:
            pts = [(r.epsilon, r.float_hr10) for r in records if r.epsilon]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=row["run"])
        elif records:
            ax.axhline(records[-1].float_hr10, linestyle="--", linewidth=1,
                       label=f"{row['run']} (no DP)")
    ax.set_xlabel("cumulative epsilon (user level)")
    ax.set_ylabel("HR@10 (float model, held-out devices)")
    ax.set_title("Privacy-utility: each run over its rounds")
    ax.grid(alpha=0.3)
    if rows:
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, dict):
        return html.escape(run_name(value))
    return html.escape(str(value))


def _mean_sd(mean: float | None, sd: float | None) -> str:
    if mean is None:
        return "–"
    return f"{mean:.4f}" if sd is None else f"{mean:.4f} ± {sd:.4f}"


def _html(rows: list[dict[str, Any]], configs: list[dict[str, Any]],
          meta: dict[str, Any]) -> str:
    cols = [c for c in FIELDS if c != "params"]
    body = "".join("<tr>" + "".join(f"<td>{_fmt(row.get(c))}</td>" for c in cols) + "</tr>"
                   for row in rows)
    seed_head = "".join(f"<th>{m}</th>" for m in SEED_METRICS)
    seed_body = "".join(
        f"<tr><td>{html.escape(c['config'])}</td>"
        f"<td>{html.escape(' '.join(map(str, c['seeds'])))}</td>"
        + "".join(f"<td>{_mean_sd(c[m + '_mean'], c[m + '_sd'])}</td>" for m in SEED_METRICS)
        + "</tr>" for c in configs)
    info = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(json.dumps(v))}"
                   "</td></tr>" for k, v in meta.items())
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>PocketRec sweep</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; font-size: 0.85em; }}
td, th {{ border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: right; }}
th {{ background: #f3f3f3; }} img {{ max-width: 100%; }}
</style></head><body>
<h1>PocketRec sweep (fast simulations)</h1>
<p>final: the int8 LiteRT model of the last round (what devices would serve); best: the
float model's best round. Each run's own report is in runs/NAME/index.html.</p>
<h2>Over seeds (mean ± sample standard deviation)</h2>
<table><tr><th>configuration</th><th>seeds</th>{seed_head}</tr>{seed_body}</table>
<h2>Runs</h2>
<table><tr>{"".join(f"<th>{html.escape(c)}</th>" for c in cols)}</tr>{body}</table>
<img src="privacy_utility.png" alt="HR@10 against epsilon">
<h2>Setup</h2><table>{info}</table>
</body></html>
"""


def run_sweep(grid_path: str | Path, args_for: Callable[[dict[str, Any]], argparse.Namespace],
              out: Path, parallel: int, progress: bool = True,
              log: Callable[[str], None] = print) -> tuple[Path, list[dict[str, Any]], bool]:
    """Every run of GRID.toml (``args_for(flags)``: the simulate namespace for [base] +
    flags); returns (index.html, the rows of the finished runs, interrupted)."""
    from trainer.cli import _clock_rounds, _data_spec, _sim_config, _simulation_model
    from trainer.simulation.experiment import (
        _Interrupt,
        build_fleet,
        export_base,
        simulate_one,
        train_central,
    )
    from trainer.simulation.report import write_report

    base, combos = load_grid(grid_path)
    args = args_for(base)
    population, model = build_fleet(_data_spec(args), _simulation_model(args),
                                    rounds=_clock_rounds(args),
                                    public_fraction=args.public_fraction,
                                    warmup=args.warmup)
    out.mkdir(parents=True, exist_ok=True)
    if getattr(args, "base_bundle", None):
        bundle = Path(args.base_bundle)
    else:
        log(f"pretraining on the public slice of {population.name} ...")
        ckpt, _ = train_central(population, "pretrain", model, progress)
        bundle = export_base(ckpt, population, out / "base")
    meta = {"grid": str(grid_path), "base": base, "data": population.name,
            "devices": len(population.devices), "runs_planned": len(combos),
            "parallel": parallel}
    rows: list[dict[str, Any]] = []
    curves: dict[str, list[Any]] = {}
    lock = threading.Lock()
    stop = threading.Event()
    log(f"{len(combos)} runs, {parallel} at a time -> {out}")

    def one(params: dict[str, Any]) -> None:
        name = run_name(params)
        run_args = copy.copy(args)
        for k, v in params.items():
            setattr(run_args, k, v)
        noise = run_args.noise_multiplier or None  # 0: no DP
        config = _sim_config(run_args, name, noise, getattr(run_args, "target_epsilon", None))
        config.mode = "fast"
        root = out / "runs" / name.replace("/", "_")
        started = time.perf_counter()
        records, interrupted = simulate_one(population, bundle, root, config,
                                            progress=False, stop=stop)
        if interrupted or stop.is_set():
            return
        write_report(root, {name: records}, None,
                     {"params": params, "noise_multiplier": config.noise_multiplier})
        row = summarise(name, params, records, time.perf_counter() - started)
        with lock:
            rows.append(row)
            curves[name] = records
            rows.sort(key=lambda r: r["run"])
            write_table(out, rows, curves, meta)
        log(f"[{len(rows)}/{len(combos)}] {name}: final HR@10 {_fmt(row['final_hr10'])}, "
            f"best {_fmt(row['best_hr10'])}, epsilon {row['epsilon']:.2f}, "
            f"{row['wall_s']:.0f} s")

    interrupted = False
    with _Interrupt(), ThreadPoolExecutor(parallel) as pool:
        futures = [pool.submit(one, params) for params in combos]
        try:
            for future in futures:
                while True:  # a timed wait, so Ctrl-C reaches this thread promptly
                    try:
                        future.result(timeout=0.2)
                        break
                    except FutureTimeout:
                        continue
        except KeyboardInterrupt:
            interrupted = True
            log("interrupted: the table keeps the finished runs")
        except BaseException:
            stop.set()  # one run failing stops the others
            raise
        finally:
            stop.set()
            for future in futures:
                future.cancel()
    meta["interrupted"] = interrupted
    index = write_table(out, rows, curves, meta)
    return index, rows, interrupted
