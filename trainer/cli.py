"""`pocketrec`: train, export and evaluate on-device recommenders; run the demo."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import warnings
from dataclasses import asdict, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from trainer.simulation.experiment import ModelSpec

DEFAULT_RUN = "runs/default"
# `pocketrec train` without --model: the best shipped family (README, "Repeat-aware model":
# it wins the line protocol; on the basket protocol the tuned baselines still win), and the
# family demo, simulate and sweep pretrain and federate (README, "The demo").
DEFAULT_MODEL = "repeat_sasrec"
SIMULATION_MODEL = "repeat_sasrec"
DP_MODEL = "sasrec"
# repeat_sasrec's default session gap (seconds): a new visit after 30 minutes without events.
SESSION_GAP = 1800


def _quiet() -> None:
    """The converter stack (torchao, litert-torch, absl) is chatty at import and at INFO."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("GLOG_minloglevel", "2")
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("torchao", "litert_torch", "absl", "torch", "root"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _data_args(p: argparse.ArgumentParser) -> None:
    from trainer.data.loaders import FORMATS

    p.add_argument("--data", help="interaction file (default: the embedded synthetic shop)")
    p.add_argument("--format", default="auto", choices=("auto", *FORMATS),
                   help="file format (default: detected from the file)")
    p.add_argument("--kcore", type=int, default=0, help="keep users/items with >= k events")
    p.add_argument("--holdout", default="auto", choices=("auto", "line", "basket"),
                   help="held-out test data per user: the last two lines, or the whole last "
                   "basket (needed for the next-basket protocol); auto: basket when "
                   "purchases come in baskets (Online Retail)")
    p.add_argument("--synthetic-users", type=int, default=2000)
    p.add_argument("--synthetic-items", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)


def _train_args(p: argparse.ArgumentParser) -> None:
    import model_zoo

    g = p.add_argument_group("model")
    g.add_argument("--model", "--arch", dest="arch", choices=model_zoo.names(),
                   help=f"architecture (model_zoo name; default: {DEFAULT_MODEL}; demo, "
                   "simulate and sweep with --base-bundle: the bundle's)")
    g.add_argument("--dim", type=int, default=64)
    g.add_argument("--hidden", type=int, default=128, help="MLP / feed-forward width")
    g.add_argument("--max-len", type=int, default=50, help="history length L")
    g.add_argument("--recency-decay", type=float, help="dual_encoder: 1.0 = plain mean")
    g.add_argument("--blocks", type=int, help="sasrec: self-attention blocks (default 2)")
    g.add_argument("--heads", type=int, help="sasrec: attention heads (default 1)")
    g.add_argument("--dropout", type=float, help="sasrec: dropout in training (default 0.2)")
    g.add_argument("--federated-blocks", type=int,
                   help="sasrec: last blocks devices train with the output table (default 1)")
    g.add_argument("--top-k", type=int, default=50, help="K returned by the exported graph")
    g.add_argument("--session-gap", type=int,
                   help="repeat_sasrec: seconds between two steps that start a new session "
                   f"(a separator in the history); default {SESSION_GAP}, 0 = none")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=30)
    g.add_argument("--batch-size", type=int,
                   help="default 512 examples; 128 chunks of L steps for a sequence model")
    g.add_argument("--lr", type=float, default=3e-3)
    g.add_argument("--patience", type=int, default=3, help="epochs without val HR@10 gain")
    g.add_argument("--loss", default="full", choices=("full", "sampled"))
    g.add_argument("--negatives", type=int, default=1000, help="for --loss sampled")
    g.add_argument("--basket-weight", type=float,
                   help="with session separators: weight of the basket objective (each item "
                   "of a session scored from the separator that opens it); default 0: "
                   "measured on Online Retail it cost the line protocol and gained nothing "
                   "on baskets (README)")
    g = p.add_argument_group("differential privacy (DP-SGD, Opacus)")
    g.add_argument("--dp", action="store_true",
                   help="train with DP-SGD (without a noise setting: --target-epsilon 8)")
    g.add_argument("--noise-multiplier", type=float)
    g.add_argument("--target-epsilon", type=float,
                   help="calibrate the noise to this epsilon: train --dp, DP-SGD's; demo, "
                   "simulate and sweep, the federated rounds' (the smallest noise multiplier "
                   "whose ledger epsilon over the planned rounds is at most it)")
    g.add_argument("--delta", type=float, help="default: the power of ten below 1/examples")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="per-example clip norm")


def _data_spec(args: argparse.Namespace):
    from trainer.data.dataset import DataSpec

    return DataSpec(path=args.data, format=args.format, kcore=args.kcore,
                    synthetic_users=args.synthetic_users,
                    synthetic_items=args.synthetic_items, seed=args.seed,
                    holdout=args.holdout)


# The model flags that set its shape (and its config's fields of the same names).
MODEL_SHAPE = ("dim", "hidden", "max_len", "recency_decay", "blocks", "heads", "dropout",
               "federated_blocks", "top_k")


def _flag_default(args: argparse.Namespace, key: str) -> Any:
    """What ``key`` is when the command line leaves it out (None without a command)."""
    command = getattr(args, "command", None)
    if command is None:
        return None
    sub = next(a for a in build_parser()._actions
               if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command].get_default(key)


def _model_options(args: argparse.Namespace, arch) -> dict:
    """The model flags this architecture's config has; unset optional flags keep its defaults,
    and a flag it does not have is refused rather than silently ignored."""
    known = {f.name for f in fields(arch.config_cls)}
    options = {}
    for name in MODEL_SHAPE:
        value = getattr(args, name)
        if value is None:
            continue
        if name not in known:
            raise ValueError(f"--{name.replace('_', '-')} does not apply to --model {arch.name}")
        options[name] = value
    return options


def cmd_train(args: argparse.Namespace) -> dict:
    import model_zoo
    from trainer.checkpoint import Checkpoint
    from trainer.data.dataset import prepare
    from trainer.train import DPConfig, TrainConfig, init_module, predicts_every_position, train

    if args.arch is None:
        # Central DP-SGD cannot train the default family; SASRec is the next best that can.
        args.arch = DP_MODEL if args.dp else DEFAULT_MODEL
        why = ("the default family has no central DP-SGD" if args.dp else
               "the repeat-aware family is the best shipped model")
        print(f"model: {args.arch} (the default: {why}; --model picks another)")
    spec = _data_spec(args)
    print(f"loading {spec.name} ...", flush=True)
    prepared = prepare(spec, args.max_len)
    s = prepared.stats
    print(f"  {s['events']:,} events, {s['users']:,} users, {s['items']:,} items; "
          f"{s['eval_users']:,} users held out ({s['holdout']} holdout)")
    dp = None
    if args.dp:
        if args.noise_multiplier is None and args.target_epsilon is None:
            args.target_epsilon = 8.0
        dp = DPConfig(max_grad_norm=args.max_grad_norm, noise_multiplier=args.noise_multiplier,
                      target_epsilon=args.target_epsilon, delta=args.delta)
    elif args.noise_multiplier is not None or args.target_epsilon is not None:
        raise SystemExit("error: --noise-multiplier/--target-epsilon need --dp")
    arch = model_zoo.get(args.arch)
    options = _model_options(args, arch)
    gap = getattr(args, "session_gap", None)
    if "session_gap" in {f.name for f in fields(arch.config_cls)} and not args.dp:
        gap = SESSION_GAP if gap is None else gap
        if gap:
            prepared.vocab = prepared.vocab.with_session()
            options.update(session_id=prepared.vocab.session_id, session_gap=gap)
            print(f"  session separator: a gap over {gap:,} s starts a new session")
    elif gap:
        raise ValueError(f"--session-gap does not apply to --model {arch.name}"
                         + (" with --dp" if args.dp else ""))
    config = arch.config(n_items=len(prepared.vocab), **options)
    module = init_module(arch, config, args.seed)
    if args.batch_size is None:
        args.batch_size = 128 if predicts_every_position(module) else 512
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                      patience=args.patience, loss=args.loss, negatives=args.negatives,
                      seed=args.seed, dp=dp,
                      basket_weight=args.basket_weight or 0.0)
    result = train(module, prepared.split, cfg, progress=not args.no_progress)
    best = result.history[result.best_epoch - 1]
    meta = {
        "data": {**spec.to_dict(), "name": spec.name, **prepared.stats},
        "training": {**asdict(cfg), "epochs_run": result.epochs_run,
                     "best_epoch": result.best_epoch, "seconds": round(result.seconds, 1),
                     "history": result.history},
        "privacy": result.privacy,
    }
    ckpt = Checkpoint(args.arch, config.to_dict(), result.params, prepared.vocab, meta)
    path = ckpt.save(Path(args.run) / "checkpoint")
    print(f"trained {result.epochs_run} epochs in {result.seconds:.0f} s; best epoch "
          f"{result.best_epoch}: validation HR@10 {best['hr@10']:.4f}, "
          f"NDCG@10 {best['ndcg@10']:.4f}")
    if result.privacy:
        p = result.privacy
        print(f"privacy: epsilon {p['epsilon']:.2f} at delta {p['delta']:g} (RDP accountant, "
              f"noise multiplier {p['noise_multiplier']:.3f}, clip {p['max_grad_norm']}, "
              f"unit: one training example)")
    print(f"checkpoint: {path}")
    return {"checkpoint": str(path), "best": best, "privacy": result.privacy}


def _load_run(run: str):
    from trainer.checkpoint import Checkpoint
    from trainer.data.dataset import DataSpec, prepare

    ckpt = Checkpoint.load(Path(run) / "checkpoint")
    data = ckpt.meta["data"]
    fields = {k: data[k] for k in DataSpec.__dataclass_fields__ if k in data}
    spec = DataSpec(**{"holdout": "line", **fields})  # older runs held out lines
    prepared = prepare(spec, ckpt.model_config().max_len, vocab=ckpt.vocab)
    return ckpt, prepared


def cmd_export(args: argparse.Namespace) -> dict:
    from trainer.evaluate import K
    from trainer.export import export_bundle
    from trainer.metrics import topk_agreement
    from trainer.train import model_rows, torch_topk

    ckpt, prepared = _load_run(args.run)
    # Runs trained before the repeat rate was recorded get it measured here (same split).
    ckpt.meta.setdefault("data", {}).setdefault("repeat_rate", prepared.stats["repeat_rate"])
    test = model_rows(prepared.split.test, ckpt.model_config())
    print("exporting: litert-torch -> float .tflite -> ai-edge-quantizer "
          f"{args.recipe} ...", flush=True)
    signer = None
    if args.signing_key:
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        from device_sdk.files import load_or_create_ed25519

        key = load_or_create_ed25519(args.signing_key, "signing key")
        signer = key.sign
        public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        print(f"signing with {args.signing_key}; devices pin public key {public.hex()}")
    out = args.out or args.run
    result = export_bundle(ckpt, out, model_version=args.model_version,
                           parent_version=args.parent_version, recipe_name=args.recipe,
                           histories=test.history, signer=signer)
    from device_sdk.bundle import load_bundle

    bundle = load_bundle(result.bundle_dir)
    int8_ids = bundle.model().topk_many(test.history)[0]
    torch_ids = torch_topk(ckpt.torch_module(), test.history, K)
    agreement = topk_agreement(int8_ids, torch_ids, K)
    report = {
        "bundle": str(result.bundle_dir),
        "float_bytes": result.float_bytes,
        "int8_bytes": result.int8_bytes,
        "size_ratio_int8_float": result.int8_bytes / result.float_bytes,
        f"agree@{K}_int8_vs_torch": agreement,
        "test_users": len(test),
        "seconds": round(result.seconds, 1),
    }
    (Path(out) / "export_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"bundle v{args.model_version}: {result.bundle_dir}  (int8 {result.int8_bytes:,} B, "
          f"float {result.float_bytes:,} B, ratio {report['size_ratio_int8_float']:.2f})")
    print(f"top-{K} agreement int8 LiteRT vs torch on {len(test):,} test users: {agreement:.4f}")
    return report


def cmd_evaluate(args: argparse.Namespace) -> list[dict]:
    import numpy as np

    from trainer.evaluate import (
        RunToEvaluate,
        evaluate,
        evaluate_runs,
        format_table,
        ranked_items,
    )
    from trainer.export import FLOAT_MODEL

    if args.baselines_only:
        from trainer.data.dataset import prepare

        if args.compare:
            raise ValueError("--baselines-only evaluates no run; drop --compare")
        first = prepare(_data_spec(args), args.max_len)
        print(f"baselines only on {first.spec.name} (no trained run), L={args.max_len}")
        result = evaluate(first.split, len(first.vocab), first.vocab.popular, [], args.split)
        out = Path(args.run) / f"baselines_{args.split}.json"
    else:
        if args.data is not None:
            raise ValueError("evaluate rebuilds the data a run was trained on; --data "
                             "(and the other data flags) go with --baselines-only")
        runs = []
        for run in [args.run, *args.compare]:
            ckpt, prepared = _load_run(run)
            bundle = Path(run) / "bundle"
            runs.append(RunToEvaluate(ckpt, prepared.split,
                                      bundle if bundle.is_dir() else None,
                                      Path(run) / FLOAT_MODEL))
            if len(runs) == 1:
                first = prepared
        result = evaluate_runs(runs, args.split)
        out = Path(args.run) / f"evaluation_{args.split}.json"
    rows = result.rows
    data = getattr(first.split, args.split)
    print("baseline settings tried (fitted on the training steps before each validation "
          "target; the picked one, *, then ranks the evaluated split):")
    print(result.format_tunings())
    print(f"{args.split}: {len(data):,} users of {first.spec.name} ({first.split.holdout} "
          f"holdout), full ranking over {ranked_items(first.vocab) - 1:,} items")
    print(format_table(rows))
    if first.split.basket is None or args.split != "test":
        print("basket columns: the next-basket protocol needs whole last baskets held out "
              "(train with --holdout basket) and the test split")
    else:
        sizes = [len(b) for b in first.split.basket.baskets]
        print(f"line: each user's last purchase line; basket: the {len(sizes):,} users' last "
              f"baskets (median {int(np.median(sizes))} items) from the lines before them; "
              f"basket tuning: the {len(first.split.basket_valid):,} users' baskets before "
              "those")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"rows: {out}")
    return rows


def _sim_args(p: argparse.ArgumentParser, *, rounds: int, clients: int) -> None:
    from device_sdk import secagg
    from device_sdk.protocol import SEALED_SCHEME

    g = p.add_argument_group("fleet")
    g.add_argument("--rounds", type=int, default=rounds)
    g.add_argument("--clients-per-round", type=int, default=clients)
    g.add_argument("--public-fraction", type=float, default=0.05,
                   help="share of users whose data pretrains the starting model centrally")
    g.add_argument("--warmup", type=float, default=0.5,
                   help="share of the devices' events already logged at round 1")
    g.add_argument("--clock-rounds", type=int, metavar="N",
                   help="the devices' clock runs through their events in N rounds and "
                   "holds its last step after them (the last round's of a clock of N: "
                   "with --warmup 0.5 and N 120, 99.6%% of the events); default: --rounds")
    g.add_argument("--device-dropout", type=float, default=0.05,
                   help="chance that a sampled device stops answering at a random stage")
    g.add_argument("--stragglers", type=float, default=0.0,
                   help="chance that a sampled device answers a random stage too late")
    g.add_argument("--deadline", type=float, help="collecting deadline (s); default: paced")
    g.add_argument("--stage-timeout", type=float, help="SecAgg+ stage timeout (s); default: paced")
    g = p.add_argument_group("federated training")
    defaults = {key: ", ".join(f"{name} {values[key]:g}" for name, values in
                               STRATEGY_DEFAULTS.items() if key in values)
                for key in ("server_lr", "momentum", "tau")}
    g.add_argument("--strategy", choices=tuple(STRATEGY_DEFAULTS),
                   help=f"server optimizer (default: {RECIPE_STRATEGY[False]} without DP, "
                   f"{RECIPE_STRATEGY[True]} with DP, each with its own settings)")
    g.add_argument("--server-lr", type=float, help=f"default: {defaults['server_lr']}")
    g.add_argument("--server-lr-decay", type=float, metavar="F",
                   help="cosine decay of the server lr over the planned rounds to F x "
                   "--server-lr at the last round, F in (0, 1] (default: constant)")
    g.add_argument("--server-lr-from", type=_lr_steps, metavar="R:LR[,R:LR...]",
                   help="steps of the server lr: from round R on the server steps at LR "
                   "(before a decay or warmup; e.g. 241:0.03); default: --server-lr "
                   "throughout")
    g.add_argument("--server-lr-warmup", type=int, default=0, metavar="W",
                   help="round r < W runs at r / W of the server lr (linear warmup; "
                   "default 0: none)")
    g.add_argument("--momentum", type=float, help=f"default: {defaults['momentum']}")
    g.add_argument("--beta1", type=float, help="fedadam / fedyogi (default 0.9)")
    g.add_argument("--beta2", type=float, help="fedadam / fedyogi (default 0.99)")
    g.add_argument("--tau", type=float, help=f"fedadam's / fedyogi's adaptivity floor (default: "
                   f"{defaults['tau']}; with DP "
                   f"{DP_STRATEGY_DEFAULTS['fedadam']['tau']:g}, about twice the noise's "
                   "std on the mean, z x clip / cohort, on the demo's shop)")
    g.add_argument("--serve-ema", type=float, metavar="D",
                   help="the served average: each published model file serves the "
                   "exponential moving average of the published weights with decay D in "
                   "(0, 1) (devices still train from the weights themselves; no privacy "
                   "cost); default: the weights serve")
    g.add_argument("--trainable", metavar="NAMES",
                   help="the tensors rounds federate, comma-separated: parameter names or "
                   "their dotted prefixes, or 'all' (dual encoder: 'mlp,out.bias' freezes both "
                   "item tables); default: the architecture's")
    g.add_argument("--clip-norm", type=float, default=0.3,
                   help="per-device update clip C (typical unclipped norms are printed in the "
                   "report: update_norm_median); with --clip-quantile, the first round's")
    g.add_argument("--clip-quantile", type=_quantile, metavar="Q",
                   help="adaptive clipping (Andrew et al. 2021): each round's clip moves "
                   "towards the Q-th quantile of the devices' update norms, estimated from "
                   "their noised under-the-clip count; 'off': a fixed --clip-norm (default: "
                   f"{RECIPE_CLIP_QUANTILE} with DP over SecAgg+ with central noise, else off)")
    g.add_argument("--clip-lr", type=float,
                   help="adaptive clipping's geometric step (default 0.2)")
    g.add_argument("--local-epochs", type=int, default=1)
    g.add_argument("--local-lr", type=float, default=0.3)
    g.add_argument("--local-lr-from", type=_lr_steps, metavar="R:LR[,R:LR...]",
                   help="steps of the local lr: from round R on the devices train at LR "
                   "(e.g. 121:0.001; the server optimizer's state carries on); default: "
                   "--local-lr throughout")
    g.add_argument("--local-batch-size", type=int, default=32)
    g.add_argument("--proximal-mu", type=float, default=0.0, metavar="MU",
                   help="FedProx: each device's local loss gains MU / 2 ||w - w_round||^2, "
                   "pulling its steps back towards the round's model (default 0: plain SGD)")
    g.add_argument("--local-max-examples", type=int, default=1000,
                   help="a device trains on at most its most recent N next-item examples")
    g.add_argument("--upload-scheme", default=secagg.SCHEME, choices=(secagg.SCHEME, SEALED_SCHEME))
    g.add_argument("--dp-mode", default="central", choices=("central", "distributed"))
    g = p.add_argument_group("execution")
    g.add_argument("--mode", default="full", choices=("full", "fast"),
                   help="full: real devices (SQLite logs, HTTP, SecAgg+ masks) against the "
                   "real server; fast: the same learning math without the transport "
                   "(trainer.simulation.fast)")
    g.add_argument("--export-every", type=int, default=0, metavar="N",
                   help="fast mode: int8 LiteRT export and evaluation every N rounds "
                   "(always after the last); every round is evaluated on float weights")
    g.add_argument("--workers", type=int, default=2, help="device worker processes / actors")
    g.add_argument("--backend", default="local", choices=("local", "ray"))
    g.add_argument("--ray-address", help="a Ray cluster (default: a local Ray instance)")
    g.add_argument("--server", metavar="URL", help="use this running sync server instead of "
                   "starting one (needs --admin-token or POCKETREC_ADMIN_TOKEN)")
    g.add_argument("--admin-token", default=os.environ.get("POCKETREC_ADMIN_TOKEN"))
    g.add_argument("--out", help="report directory (default: RUN/report)")


# The federated recipe demo, simulate and sweep default to, from the sweeps on the demo's
# fleet (README, "The recipe search" and "The demo"): FedAdam with and without DP. Without
# DP its tau is 1e-3; with DP a tau at or below the noise's std on the mean turns the noise
# into full steps, and one about twice that std keeps FedAdam's momentum and its step for
# the few coordinates whose updates outgrow tau (DP_STRATEGY_DEFAULTS: 2e-2 for the
# demo's z 0.6 and cohort of 32). A strategy's settings default to the best found for it;
# flags override each.
RECIPE_STRATEGY = {False: "fedadam", True: "fedadam"}  # by "with DP"
STRATEGY_DEFAULTS: dict[str, dict[str, float]] = {
    "fedavg": {"server_lr": 1.0},
    "fedavgm": {"server_lr": 0.5, "momentum": 0.5},
    "fedadam": {"server_lr": 0.1, "tau": 1e-3},
    "fedyogi": {"server_lr": 0.1, "tau": 1e-3},  # FedAdam's, not searched separately
}
DP_STRATEGY_DEFAULTS: dict[str, dict[str, float]] = {"fedadam": {"tau": 2e-2},
                                                     "fedyogi": {"tau": 2e-2}}


# With DP the clip adapts towards the median update norm (Andrew et al. 2021) where the
# protocol carries it (SecAgg+, central noise): on the demo's shop it gave +0.011 HR@10 on
# each of three simulation seeds, on Online Retail +0.010 line HR@10 at epsilon 8 (README).
RECIPE_CLIP_QUANTILE = 0.5


# The recipes `pocketrec demo` runs (--recipe; default: "shop" on the embedded shop,
# "retail" with --data): the public start's pretraining ("fleet"), then each run's own
# settings, the best the sweeps found on that data (README: "The recipe search" for the
# shop, issue 18's table for Online Retail). A flag given on the command line wins over
# the recipe's setting; --strategy (--dp-strategy for the DP run) replaces the recipe's
# server optimizer with that strategy's defaults, --rounds its clock, --noise-multiplier
# or --target-epsilon its noise. What the recipes leave out is `simulate`'s default.
DEMO_RECIPES: dict[str, dict[str, Any]] = {
    "shop": {
        "about": "the best found on the embedded shop; about 10 minutes in full mode",
        "fleet": {"epochs": 15},
        "federated+DP": {"rounds": 48, "clients_per_round": 32, "default_noise": 0.6},
        "federated": {"rounds": 48, "clients_per_round": 32},
    },
    "retail": {
        "about": "the best found on Online Retail (README, issue 18's table); about "
                 "45 minutes in fast mode on two cores, hours in full mode",
        "fleet": {"epochs": 20},
        "model": SIMULATION_MODEL,  # the tensors its runs federate are this model's
        # Adaptive clip from 0.3, FedAvgM 1.0 / 0.9, one local step at lr 0.2 on the last
        # block, the output table and the repeat head, 100 rounds of 400, epsilon 8.
        "federated+DP": {"rounds": 100, "clients_per_round": 400, "target_epsilon": 8.0,
                         "strategy": "fedavgm", "server_lr": 1.0, "momentum": 0.9,
                         "local_lr": 0.2, "local_max_examples": 200, "clip_norm": 0.3,
                         "clip_quantile": 0.5, "trainable": "blocks.1,ln_final,out,repeat"},
        # FedAdam 0.1, about 12 local steps (three epochs of batch 8) at local lr 0.01, a
        # tenth of it from round 121 and 0.0003 from round 241, every tensor, 360 rounds of
        # 100 on a clock of 120, the model file serving the EMA 0.9 of the weights.
        "federated": {"rounds": 360, "clock_rounds": 120, "clients_per_round": 100,
                      "strategy": "fedadam", "server_lr": 0.1, "tau": 1e-3,
                      "local_lr": 0.01, "local_lr_from": "121:0.001,241:0.0003",
                      "local_batch_size": 8, "local_epochs": 3, "local_max_examples": 200,
                      "clip_norm": 1.0, "trainable": "all", "serve_ema": 0.9},
    },
}
# The flags a recipe may set that have a value when not given (demo leaves them unset, so
# that the recipe, or else `simulate`'s default, fills them in).
DEMO_RECIPE_FLAGS = ("epochs", "rounds", "clients_per_round", "local_lr", "local_epochs",
                     "local_batch_size", "local_max_examples", "clip_norm")
SERVER_OPTIMIZER = ("strategy", "server_lr", "momentum", "tau", "beta1", "beta2")


def demo_runs(args: argparse.Namespace) -> tuple[str, dict[str, argparse.Namespace]]:
    """The demo's recipe name and each run's flags ("federated+DP", "federated"): the
    flags given, else the recipe's (``DEMO_RECIPES``), else `simulate`'s defaults. Sets the
    recipe's fleet settings (pretraining) on ``args`` itself."""
    name = args.recipe or ("retail" if args.data else "shop")
    recipe = DEMO_RECIPES[name]
    fallback = vars(build_parser().parse_args(["simulate"]))
    for key, value in recipe["fleet"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if recipe.get("model") and args.trainable is None:
        model = _simulation_model(argparse.Namespace(**vars(args))).arch
        if model != recipe["model"]:
            raise ValueError(f"--recipe {name} federates tensors of {recipe['model']}, not of "
                             f"{model}: give --trainable, or --recipe shop")
    runs = {}
    for label in ("federated+DP", "federated"):
        settings = dict(recipe[label])
        named = [args.strategy, args.dp_strategy if label == "federated+DP" else None]
        if any(named):
            for key in SERVER_OPTIMIZER:
                settings.pop(key, None)
        if args.rounds is not None:
            settings.pop("clock_rounds", None)
        if args.noise_multiplier is not None or args.target_epsilon is not None:
            settings.pop("target_epsilon", None)
            settings.pop("default_noise", None)
        run = argparse.Namespace(**vars(args))
        for key, value in settings.items():
            if getattr(args, key, None) is None:
                setattr(run, key, value)
        for key in DEMO_RECIPE_FLAGS:
            if getattr(run, key) is None:
                setattr(run, key, fallback[key])
        runs[label] = run
    return name, runs


def _quantile(text: str) -> float | str:
    """--clip-quantile: a number in (0, 1), or 'off'."""
    if text == "off":
        return text
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"a quantile in (0, 1) or 'off', got {text}")
    return value


def _lr_steps(text: str) -> tuple[tuple[int, float], ...]:
    """--local-lr-from's and --server-lr-from's text: 'R:LR' steps, comma-separated."""
    steps = []
    for part in text.split(","):
        round_, _, lr = part.strip().partition(":")  # no ":" leaves lr empty: refused
        try:
            steps.append((int(round_), float(lr)))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"steps of the form ROUND:LR (e.g. 121:0.001), got {part.strip()!r}") from None
    return tuple(steps)


def _schedule(args: argparse.Namespace, flag: str) -> tuple[tuple[int, float], ...]:
    """--local-lr-from's or --server-lr-from's steps (a sweep grid gives the flag's
    text)."""
    given = getattr(args, flag, None)
    if isinstance(given, str):
        try:
            return _lr_steps(given)
        except argparse.ArgumentTypeError as exc:
            raise ValueError(f"{flag}: {exc}") from None
    return tuple(given or ())


def _clock_rounds(args: argparse.Namespace) -> int:
    """The rounds the fleet's clock runs over: --clock-rounds, else --rounds."""
    given = getattr(args, "clock_rounds", None)
    if given is not None and not 1 <= given <= args.rounds:
        raise ValueError(f"--clock-rounds must be in [1, --rounds {args.rounds}], got {given}")
    return given or args.rounds


def _clip_quantile(args: argparse.Namespace, dp: bool) -> float | None:
    """The run's clip_quantile: the flag's, else the recipe's (adaptive with DP where the
    upload carries the bits: SecAgg+ with central noise; fixed otherwise)."""
    from device_sdk import secagg

    given = getattr(args, "clip_quantile", None)
    if given is not None:
        return None if given == "off" else given
    carried = args.upload_scheme == secagg.SCHEME and args.dp_mode == "central"
    return RECIPE_CLIP_QUANTILE if dp and carried else None


def _recipe(args: argparse.Namespace, dp: bool) -> dict[str, Any]:
    """strategy, server_lr and the strategy's own settings for one run: the flags given
    (demo's --dp-strategy for its DP run), else the recipe's (RECIPE_STRATEGY,
    STRATEGY_DEFAULTS, with DP DP_STRATEGY_DEFAULTS)."""
    from sync_server import strategies

    chosen = getattr(args, "dp_strategy", None) if dp else None  # demo's, for its DP run
    strategy = chosen or getattr(args, "strategy", None) or RECIPE_STRATEGY[dp]
    recipe: dict[str, Any] = {"strategy": strategy, **STRATEGY_DEFAULTS[strategy],
                              **(DP_STRATEGY_DEFAULTS.get(strategy, {}) if dp else {})}
    for key in strategies.OPTIONS[strategy]:
        if getattr(args, key, None) is not None:
            recipe[key] = getattr(args, key)
    return recipe


def _sim_config(args: argparse.Namespace, label: str, noise: float | None,
                target: float | None = None):
    """One run's SimulationConfig; ``target``: an epsilon to calibrate the noise to (when
    ``noise`` is None)."""
    from trainer.simulation.run import SimulationConfig

    return SimulationConfig(**_recipe(args, bool(noise) or target is not None),
        rounds=args.rounds, clients_per_round=args.clients_per_round, noise_multiplier=noise,
        server_lr_decay=args.server_lr_decay, server_lr_warmup=args.server_lr_warmup,
        server_lr_schedule=_schedule(args, "server_lr_from"),
        target_epsilon=None if noise else target,
        delta=args.delta, clip_norm=args.clip_norm,
        clip_quantile=_clip_quantile(args, bool(noise) or target is not None),
        clip_lr=args.clip_lr, serve_ema=args.serve_ema, trainable=_trainable(args),
        local_epochs=args.local_epochs,
        learning_rate=args.local_lr, local_lr_schedule=_schedule(args, "local_lr_from"),
        batch_size=args.local_batch_size,
        proximal_mu=args.proximal_mu, max_examples=args.local_max_examples,
        upload_scheme=args.upload_scheme, dp_mode=args.dp_mode, dropout=args.device_dropout,
        stragglers=args.stragglers, deadline_s=args.deadline,
        stage_timeout_s=args.stage_timeout, workers=args.workers, backend=args.backend,
        ray_address=args.ray_address, seed=args.seed, label=label, mode=args.mode,
        export_every=args.export_every, clock_rounds=_clock_rounds(args))


def _trainable(args: argparse.Namespace) -> tuple[str, ...] | None:
    """--trainable's names and prefixes -> the model's parameter names (sorted), or None.
    ValueError naming an entry that matches no parameter."""
    spec = getattr(args, "trainable", None)
    if spec is None:
        return None
    import model_zoo

    entries = spec if isinstance(spec, list | tuple) else str(spec).split(",")
    entries = [e.strip() for e in entries if e.strip()]
    if not entries:
        raise ValueError("--trainable needs at least one parameter name or prefix")
    model = _simulation_model(args)
    options = dict(model.options)
    if options.get("session_gap"):
        options["session_id"] = 1  # any valid id: with separators the model has more tensors
    names = list(model_zoo.get(model.arch).config(n_items=3, **options).param_shapes())
    chosen: set[str] = set()
    for entry in entries:
        matched = [n for n in names if entry == "all" or n == entry
                   or n.startswith(entry + ".")]
        if not matched:
            raise ValueError(f"--trainable {entry!r} matches no parameter of {model.arch}; "
                             f"its parameters: {names}")
        chosen.update(matched)
    return tuple(sorted(chosen))


def _simulation_model(args: argparse.Namespace) -> ModelSpec:
    """The ModelSpec that demo, simulate and sweep pretrain (``SIMULATION_MODEL`` unless
    --model names another). With --base-bundle, the bundle's architecture, session separator
    (the fleet must see histories as that model does) and shape (``MODEL_SHAPE``: the central
    reference is trained at the size the rounds train, and the report names that model); a
    flag set against the bundle is refused, one at its default value gives way."""
    import model_zoo
    from trainer.simulation.experiment import ModelSpec

    if getattr(args, "base_bundle", None):
        from device_sdk.bundle import load_bundle

        bundle = load_bundle(args.base_bundle)
        name, config = bundle.architecture, bundle.config
        held: dict = {"arch": name}
        if "session_gap" in config:
            held["session_gap"] = int(config["session_gap"]) if config.get("session_id") else 0
        held.update({key: config[key] for key in MODEL_SHAPE if key in config})
        for key, value in held.items():
            given = getattr(args, key, None)
            if given is not None and given != value and given != _flag_default(args, key):
                flag = "--model" if key == "arch" else f"--{key.replace('_', '-')}"
                raise ValueError(f"--base-bundle holds a {name} model with {key} {value}; "
                                 f"{flag} {given} contradicts it (drop the flag)")
            setattr(args, key, value)
    if args.arch is None:
        args.arch = SIMULATION_MODEL
    if getattr(args, "basket_weight", None) is not None:
        raise ValueError("--basket-weight applies to pocketrec train; the simulator "
                         "pretrains with the next-item objective only")
    arch = model_zoo.get(args.arch)
    options = _model_options(args, arch)
    gap = getattr(args, "session_gap", None)
    if "session_gap" in {f.name for f in fields(arch.config_cls)}:
        # As pocketrec train: separators by default; the experiment adds the separator's id.
        gap = SESSION_GAP if gap is None else gap
        if gap:
            options["session_gap"] = gap
    elif gap:
        raise ValueError(f"--session-gap does not apply to --model {arch.name}")
    return ModelSpec(args.arch, options, epochs=args.epochs,
                     batch_size=args.batch_size, lr=args.lr, patience=args.patience,
                     seed=args.seed)


def _experiment(args: argparse.Namespace, configs: list, central: bool,
                side_by_side: bool = False, export_central: bool = False) -> dict:
    from trainer.simulation.experiment import run_experiment

    model = _simulation_model(args)
    out = Path(args.out or Path(args.run) / "report")
    index, result = run_experiment(
        _data_spec(args), model, out, configs, rounds=configs[0].clock_rounds,
        public_fraction=args.public_fraction, warmup=args.warmup, central=central,
        export_central=export_central,
        base_bundle=Path(args.base_bundle) if getattr(args, "base_bundle", None) else None,
        server_url=args.server, admin_token=args.admin_token,
        progress=not args.no_progress, side_by_side=side_by_side)
    print(f"report: {index}")
    if result["interrupted"]:
        raise KeyboardInterrupt
    return result


def _round_noise(args: argparse.Namespace) -> tuple[float | None, float | None]:
    """(noise multiplier, target epsilon) for the rounds: --target-epsilon calibrates the
    noise in place of --noise-multiplier (the two together are refused)."""
    target = getattr(args, "target_epsilon", None)
    if target is None:  # the demo's DP run has a default noise; simulate none (no DP)
        noise = args.noise_multiplier
        return (getattr(args, "default_noise", None) if noise is None else noise), None
    if args.noise_multiplier is not None:
        raise ValueError("give --noise-multiplier or --target-epsilon, not both")
    if not target > 0:
        raise ValueError(f"--target-epsilon must be positive, got {target}")
    return None, target


def cmd_simulate(args: argparse.Namespace) -> dict:
    noise, target = _round_noise(args)
    label = "federated+DP" if noise or target else "federated"
    return _experiment(args, [_sim_config(args, label, noise, target)], central=args.central,
                       export_central=args.central)


def cmd_demo(args: argparse.Namespace) -> dict:
    """Pretrain on the public slice, then the same fleet with SecAgg+ and DP, and without DP,
    beside the central model; the report shows all three."""
    from dataclasses import replace

    started = time.perf_counter()
    name, runs = demo_runs(args)
    # The two runs go side by side, each with its own server and half the workers.
    workers = max(1, args.workers // 2)
    noise, target = _round_noise(runs["federated+DP"])
    configs = [replace(_sim_config(runs["federated+DP"], "federated+DP", noise, target),
                       workers=workers),
               replace(_sim_config(runs["federated"], "federated", None), workers=workers)]
    print(f"recipe {name}: {DEMO_RECIPES[name]['about']} (flags override it; --recipe "
          f"{'shop' if name == 'retail' else 'retail'} for the other)")
    for config in configs:
        print(f"  {config.label}: {_describe(config)}")
    result = _experiment(args, configs, central=True, side_by_side=args.server is None)
    print(f"demo finished in {time.perf_counter() - started:.0f} s")
    return result


def _describe(config) -> str:
    """One line of a run's recipe, as the demo prints it."""
    parts = [f"{config.rounds} rounds of {config.clients_per_round}"
             + (f" (clock {config.clock_rounds})" if config.clock_rounds != config.rounds
                else ""),
             f"{config.strategy} {config.server_lr:g}"
             + "".join(f" {k} {getattr(config, k):g}" for k in ("momentum", "tau")
                       if getattr(config, k) is not None),
             f"{config.local_epochs} local epoch(s) of batch {config.batch_size} at lr "
             f"{config.learning_rate:g}"
             + "".join(f", {lr:g} from round {r}" for r, lr in config.local_lr_schedule),
             f"clip {config.clip_norm:g}" + (f" adapting to the {config.clip_quantile:g} "
                                            "quantile" if config.clip_quantile else "")]
    if config.trainable is not None:
        parts.append(f"{len(config.trainable)} federated tensors")
    if config.serve_ema is not None:
        parts.append(f"serving the EMA {config.serve_ema:g} of the weights")
    if config.target_epsilon is not None:
        parts.append(f"noise for epsilon {config.target_epsilon:g}")
    elif config.noise_multiplier:
        parts.append(f"noise multiplier {config.noise_multiplier:g}")
    else:
        parts.append("no DP")
    return ", ".join(parts)


def cmd_sweep(args: argparse.Namespace) -> list[dict]:
    """Fast simulations over a grid of flags (trainer.simulation.sweep)."""
    from trainer.simulation.sweep import run_sweep

    parser = build_parser()

    def args_for(flags: dict) -> argparse.Namespace:
        ns = parser.parse_args(["simulate"])
        for key, value in flags.items():
            if key in ("func", "command") or not hasattr(ns, key):
                raise ValueError(f"{args.grid}: [base] {key!r} is not a pocketrec simulate "
                                 "flag")
            setattr(ns, key, value)
        ns.mode = "fast"
        if args.base_bundle:
            ns.base_bundle = args.base_bundle
        return ns

    out = Path(args.out or Path(args.run) / "sweep")
    index, rows, interrupted = run_sweep(args.grid, args_for, out, args.parallel,
                                         progress=not args.no_progress)
    print(f"sweep: {index}")
    if interrupted:
        raise KeyboardInterrupt
    return rows


def cmd_serve(args: argparse.Namespace) -> None:
    from sync_server.dev_server import serve

    serve(args.host, args.port, args.data_dir)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pocketrec",
        description="Train, quantize and evaluate on-device recommenders (PocketRec).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_text: str, func) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(func=func)
        p.add_argument("--run", default=DEFAULT_RUN,
                       help=f"run directory (default: {DEFAULT_RUN})")
        return p

    p = add("demo", "the main job: pretrain on a public slice, export, start the sync server, "
            "federated rounds with SecAgg+ and DP (and without DP) on virtual devices, beside "
            "central training; writes a report (synthetic shop unless --data)", cmd_demo)
    _data_args(p)
    _train_args(p)
    _sim_args(p, rounds=48, clients=32)
    p.add_argument("--dp-strategy", choices=tuple(STRATEGY_DEFAULTS),
                   help="the DP run's server optimizer, with its settings for DP; wins over "
                   "--strategy for that run (default: --strategy, else the recipe's)")
    p.add_argument("--recipe", choices=tuple(DEMO_RECIPES),
                   help="the two runs' settings: " + "; ".join(
                       f"{k}: {v['about']}" for k, v in DEMO_RECIPES.items())
                   + " (default: shop without --data, retail with it; flags override it)")
    p.add_argument("--no-progress", action="store_true")
    # Unset flags come from the recipe (demo_runs).
    p.set_defaults(dim=32, hidden=64, **{key: None for key in DEMO_RECIPE_FLAGS})
    p.add_argument("--base-bundle", metavar="DIR",
                   help="start from this exported bundle (same data) instead of pretraining")

    p = add("simulate", "federated simulation: every user a virtual device (real SDK, own "
            "SQLite log) against the real sync server over HTTP, SecAgg+, optional DP",
            cmd_simulate)
    _data_args(p)
    _train_args(p)
    _sim_args(p, rounds=20, clients=50)
    p.add_argument("--base-bundle", metavar="DIR",
                   help="start from this exported bundle (same data) instead of pretraining")
    p.add_argument("--central", action="store_true",
                   help="also train the central reference model on everyone's data and "
                   "export it (OUT/central/bundle: a --base-bundle to start rounds from)")
    p.add_argument("--no-progress", action="store_true")

    p = add("sweep", "fast simulations over a grid (or a random sample) of simulation flags "
            "and seeds, in parallel: one table (CSV, JSON, HTML) and a privacy-utility plot",
            cmd_sweep)
    p.add_argument("grid", metavar="GRID.toml",
                   help="[base] simulate flags, [grid] lists of flags to combine, optional "
                   "[[run]] recipes crossed with the grid, optional [sample] n (see "
                   "trainer/simulation/sweep.py)")
    p.add_argument("--parallel", type=int, default=2, help="runs at a time")
    p.add_argument("--out", help="table directory (default: RUN/sweep)")
    p.add_argument("--base-bundle", metavar="DIR",
                   help="start every run from this exported bundle instead of pretraining")
    p.add_argument("--no-progress", action="store_true")

    p = add("train", "central training; writes RUN/checkpoint", cmd_train)
    _data_args(p)
    _train_args(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")

    p = add("export", "RUN/checkpoint -> int8 LiteRT bundle in RUN/bundle", cmd_export)
    p.add_argument("--model-version", type=int, default=1)
    p.add_argument("--parent-version", type=int)
    p.add_argument("--recipe", default="dynamic_wi8_afp32",
                   choices=("dynamic_wi8_afp32", "weight_only_wi8_afp32"))
    p.add_argument("--signing-key", metavar="FILE",
                   help="Ed25519 private key (raw 32 bytes, 0600) to sign the manifest with; "
                   "created if missing. Devices pin its public half")
    p.add_argument("--out", metavar="DIR", help="write OUT/bundle instead of RUN/bundle")

    p = add("evaluate", "full-ranking metrics, line and next-basket protocols: popularity, "
            "item-KNN, torch, float and int8 LiteRT of RUN (and of --compare runs)",
            cmd_evaluate)
    p.add_argument("--split", default="test", choices=("test", "valid"))
    p.add_argument("--compare", nargs="*", default=[], metavar="RUN",
                   help="more runs trained on the same data (e.g. another --model) as rows "
                   "of the same table")
    p.add_argument("--baselines-only", action="store_true",
                   help="no trained run: the baselines alone on --data (the data flags below "
                   "and --max-len); rows go to RUN/baselines_SPLIT.json")
    p.add_argument("--max-len", type=int, default=50,
                   help="history length L for --baselines-only (a run uses its own)")
    _data_args(p)

    p = sub.add_parser("serve", help="run the sync server (development server; production: "
                       "gunicorn 'sync_server:create_app()')",
                       description="Run the sync server with the development web server. "
                       "Configuration: POCKETREC_SERVER_CONFIG and POCKETREC_* variables.")
    p.set_defaults(func=cmd_serve)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080, help="0 picks a free port")
    p.add_argument("--data-dir", help="server data directory (overrides DATA_DIR)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet()
    from trainer.data.interactions import DataFormatError

    try:
        args.func(args)
    except (DataFormatError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
