"""``pocketrec simulate`` and ``pocketrec demo``: pretrain on the public slice, export, start
the real sync server, run the federated simulation(s), write the report.

The demo runs the same fleet twice from the same starting model and the same device samples
(federated learning with SecAgg+ and central DP, and without DP) and trains the central
reference on everyone's data, so the report shows what federated learning gains over the
pretrained model and how close it comes to central training at the epsilon reached."""

from __future__ import annotations

import secrets
import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from trainer.data.dataset import DataSpec
from trainer.simulation.devices import peak_rss_mb
from trainer.simulation.population import Population, build_population
from trainer.simulation.run import RoundRecord, Simulation, SimulationConfig, calibrate
from trainer.simulation.server import ServerProcess


@dataclass
class ModelSpec:
    arch: str = "dual_encoder"
    options: dict[str, Any] = field(default_factory=dict)
    epochs: int = 15
    batch_size: int | None = None
    lr: float = 3e-3
    patience: int = 3
    seed: int = 0


def build_fleet(spec: DataSpec, model: ModelSpec, *, rounds: int, public_fraction: float,
                warmup: float) -> tuple[Population, ModelSpec]:
    """``build_population`` for ``model``: a session-aware model (``session_gap`` in its
    options) gets the separator in the vocabulary and the held-out histories, and its id in
    the returned spec's options."""
    population = build_population(spec, int(model.options.get("max_len", 50)), rounds=rounds,
                                  public_fraction=public_fraction, warmup=warmup,
                                  seed=spec.seed)
    gap = int(model.options.get("session_gap", 0))
    if gap:
        population = population.with_sessions(gap)
        model = replace(model, options={**model.options,
                                        "session_id": population.vocab.session_id})
    return population, model


def train_central(population: Population, which: str, model: ModelSpec,
                  progress: bool = True) -> Any:
    """Train ``model`` centrally on the public slice (``which="pretrain"``) or on every
    user's training data (``"central"``); returns (Checkpoint, best validation metrics)."""
    import torch

    import model_zoo
    from trainer.checkpoint import Checkpoint
    from trainer.train import TrainConfig, init_module, predicts_every_position, train

    split = population.pretrain if which == "pretrain" else population.central
    arch = model_zoo.get(model.arch)
    config = arch.config(n_items=len(population.vocab), **model.options)
    module = init_module(arch, config, model.seed)
    batch = model.batch_size or (128 if predicts_every_position(module) else 512)
    cfg = TrainConfig(epochs=model.epochs, batch_size=batch, lr=model.lr,
                      patience=model.patience, seed=model.seed)
    result = train(module, split, cfg, progress=progress)
    best = result.history[result.best_epoch - 1]
    meta = {"data": {"name": population.name, "slice": which,
                     "users": len(split.train), **population.stats},
            # torch's thread count: sums in another order take training down another
            # path (README, "Central training and the thread count").
            "training": {"epochs_run": result.epochs_run, "best_epoch": result.best_epoch,
                         "seconds": round(result.seconds, 1),
                         "threads": torch.get_num_threads()}}
    return Checkpoint(model.arch, config.to_dict(), result.params, population.vocab, meta), best


def central_metrics(ckpt: Any, population: Population) -> dict[str, float]:
    """The central model's metrics on the devices' held-out events (torch, float)."""
    from trainer.metrics import basket_metrics, ranking_metrics
    from trainer.train import torch_topk

    module = ckpt.torch_module()
    test = population.test
    line = ranking_metrics(torch_topk(module, test.history, 10), test.target,
                           population.ranked_items, 10)
    out = {"hr@10": line["hr@10"], "ndcg@10": line["ndcg@10"]}
    if population.basket is not None and len(population.basket):
        b = basket_metrics(torch_topk(module, population.basket.history, 10),
                           population.basket.baskets, 10)
        out.update({"basket_hr@10": b["basket_hr@10"], "basket_ndcg@10": b["basket_ndcg@10"]})
    return out


def export_base(ckpt: Any, population: Population, out: Path) -> Path:
    from trainer.export import export_bundle

    result = export_bundle(ckpt, out, histories=population.test.history[:8])
    return result.bundle_dir


class _Interrupt:
    """SIGINT raises KeyboardInterrupt once; a second Ctrl-C during clean-up is ignored so
    the workers and the server are always stopped and the report written."""

    def __enter__(self) -> _Interrupt:
        self.hits = 0
        self._old = signal.signal(signal.SIGINT, self._handler)
        return self

    def _handler(self, signum: int, frame: Any) -> None:
        self.hits += 1
        if self.hits == 1:
            raise KeyboardInterrupt

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGINT, self._old)


def simulate_one(population: Population, base_bundle: Path, root: Path,
                 config: SimulationConfig, *, server_url: str | None = None,
                 admin_token: str | None = None, progress: bool = True,
                 on_round: Callable[[RoundRecord], None] | None = None,
                 stop: threading.Event | None = None, bar_offset: int = 0,
                 resources: dict[str, Any] | None = None,
                 ) -> tuple[list[RoundRecord], bool]:
    """One federated simulation against a fresh server in ``root/server`` (or against
    ``server_url``). Returns the round records and whether it was interrupted (Ctrl-C, or
    ``stop`` set by another thread)."""
    root.mkdir(parents=True, exist_ok=True)
    calibrate(population, config)  # --target-epsilon: the noise multiplier it needs
    if config.mode == "fast":
        return _simulate_fast(population, base_bundle, root, config, server_url=server_url,
                              progress=progress, on_round=on_round, stop=stop,
                              bar_offset=bar_offset, resources=resources)
    if config.mode != "full":
        raise ValueError(f"unknown simulation mode {config.mode!r}: full or fast")
    server: Any
    if server_url is None:
        # Fresh means fresh: a rerun into the same directory starts a new server and fleet
        # (the old database would refuse the base model, version 1, as not newer).
        for stale in ("server", "devices", "evaluator"):
            shutil.rmtree(root / stale, ignore_errors=True)
        token = secrets.token_urlsafe(24)
        # The seed decides the server's selection coins and DP noise too (reproducible runs;
        # a simulation protects nobody's data, so a predictable stream costs nothing here).
        server = ServerProcess(root / "server", ADMIN_TOKEN=token, LOG_FORMAT="json",
                               RATE_LIMIT=100000, AGGREGATION_LEASE_S=600,
                               DETERMINISTIC_SEED=f"simulation/{config.seed}")  # coin_seed
        (root / "admin-token").write_text(token + "\n")
    else:
        server = RemoteServer(server_url, admin_token)
    interrupted = False
    sim = None
    try:
        sim = Simulation(population, server, root, config, progress=progress,
                         on_round=on_round,
                         coin_seed=None if server_url else f"simulation/{config.seed}")
        sim.bar_offset = bar_offset
        if stop is not None:
            sim.stop = stop
        if progress:
            print(f"[{config.label}] server {server.url}  dashboard {server.url}/dashboard",
                  flush=True)
        version = sim.publish_base(base_bundle)
        sim.run(version)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        if sim is not None and resources is not None:
            resources.update(sim.resources)
        if isinstance(server, ServerProcess):
            if resources is not None:
                resources["server_max_rss_mb"] = peak_rss_mb(server.process.pid)
            server.close()
    return (sim.records if sim is not None else []), interrupted


def _simulate_fast(population: Population, base_bundle: Path, root: Path,
                   config: SimulationConfig, *, server_url: str | None, progress: bool,
                   on_round: Callable[[RoundRecord], None] | None,
                   stop: threading.Event | None, bar_offset: int,
                   resources: dict[str, Any] | None) -> tuple[list[RoundRecord], bool]:
    """``simulate_one`` in fast mode (``trainer.simulation.fast``): no server, no transport."""
    from trainer.simulation.fast import run_fast

    if server_url is not None:
        raise ValueError("--mode fast runs the server's code in process; --server needs "
                         "--mode full")
    sim = Simulation(population, None, root, config, progress=progress, on_round=on_round,
                     coin_seed=f"simulation/{config.seed}")
    sim.bar_offset = bar_offset
    if stop is not None:
        sim.stop = stop
    interrupted = False
    try:
        run_fast(sim, base_bundle)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        if resources is not None:
            resources.update(sim.resources)
    return sim.records, interrupted


class RemoteServer:
    """An operator's running server (``--server URL``), driven through its admin API."""

    def __init__(self, url: str, admin_token: str | None) -> None:
        import urllib3

        if not admin_token:
            raise ValueError("--server needs --admin-token (or POCKETREC_ADMIN_TOKEN)")
        self.url = url.rstrip("/")
        self._auth = {"Authorization": f"Bearer {admin_token}"}
        self.http = urllib3.PoolManager(timeout=urllib3.Timeout(connect=10.0, read=300.0))

    def admin(self, method: str, path: str, headers: dict[str, str] | None = None,
              **kwargs: Any) -> Any:
        return self.http.request(method, self.url + path,
                                 headers={**self._auth, **(headers or {})}, **kwargs)


def run_experiment(spec: DataSpec, model: ModelSpec, out: Path,
                   configs: list[SimulationConfig], *, rounds: int,
                   public_fraction: float, warmup: float, central: bool,
                   export_central: bool = False,
                   base_bundle: Path | None = None, server_url: str | None = None,
                   admin_token: str | None = None, progress: bool = True,
                   side_by_side: bool = False,
                   log: Callable[[str], None] = print) -> tuple[Path, dict[str, Any]]:
    """Build the fleet, pretrain (unless ``base_bundle``), run each config, write the report.
    With ``central`` and ``export_central`` the central model is exported too (int8, as
    the start is: OUT/central/bundle), a start rounds can begin from. Returns (index.html,
    rounds.json content)."""
    from trainer.simulation.report import summary, write_report

    started = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    population, model = build_fleet(spec, model, rounds=rounds,
                                    public_fraction=public_fraction, warmup=warmup)
    s = population.stats
    log(f"{population.name}: {s['users']:,} users, {s['items']:,} items; "
        f"{s['public_users']:,} public users pretrain, {s['devices']:,} devices "
        f"({s['held_out_devices']:,} with held-out events, {s['holdout']} holdout); "
        f"clock {s['clock_start']} -> {s['clock_end']}")
    meta: dict[str, Any] = {"data": population.name, **{f"data_{k}": v for k, v in s.items()},
                            "model": model.arch, "model_options": model.options}
    central_result = None
    with _Interrupt():
        try:
            if base_bundle is None:
                log("pretraining on the public slice ...")
                ckpt, best = train_central(population, "pretrain", model, progress)
                meta["pretrain_valid_hr@10"] = best["hr@10"]
                log("exporting the starting model (int8 LiteRT) ...")
                base_bundle = export_base(ckpt, population, out / "base")
            if central:
                log("central reference: training on every user's data ...")
                ref, _ = train_central(population, "central", model, progress)
                central_result = central_metrics(ref, population)
                meta["central_training"] = ref.meta["training"]
                log(f"central model: HR@10 {central_result['hr@10']:.4f} on the devices' "
                    "held-out events")
                if export_central:
                    bundle = export_base(ref, population, out / "central")
                    log(f"central model exported: {bundle} (a --base-bundle)")
        except KeyboardInterrupt:
            log("interrupted before the first round; no report")
            raise
    runs: dict[str, list[RoundRecord]] = {c.label: [] for c in configs}
    lock = threading.Lock()
    stop = threading.Event()
    outcome: dict[str, bool] = {}
    written = {"next": 0.0}  # when the report may be rewritten next (perf_counter)
    # A run whose recipe paces the clock differently gets the same fleet on its own clock.
    fleets = {c.label: population if c.clock_rounds is None else
              population.with_clock(c.clock_rounds) for c in configs}
    for config in configs:
        if calibrate(fleets[config.label], config):
            log(f"[{config.label}] noise multiplier {config.noise_multiplier:g}: the smallest "
                f"whose epsilon over the {config.rounds} planned rounds is at most "
                f"{config.target_epsilon:g}")
        meta[f"config[{config.label}]"] = {k: v for k, v in config.__dict__.items()
                                           if k != "label"}

    def one(index: int, config: SimulationConfig) -> None:
        label = config.label

        def on_round(record: RoundRecord) -> None:
            with lock:
                runs[label].append(record)
                # Current after every round, unless rewriting it (three plots) would take
                # more than a fifth of the time: fast-mode rounds can be shorter than the
                # rewrite. The report is written once more at the end.
                if time.perf_counter() >= written["next"]:
                    t0 = time.perf_counter()
                    write_report(out, runs, central_result, meta)
                    written["next"] = t0 + 5 * (time.perf_counter() - t0)

        resources: dict[str, Any] = {}
        try:
            _, outcome[label] = simulate_one(
                fleets[label], base_bundle, out / label.replace("+", "_").replace(" ", "_"),
                config, server_url=server_url, admin_token=admin_token, progress=progress,
                on_round=on_round, stop=stop, bar_offset=3 * index, resources=resources)
        except BaseException:
            stop.set()  # one run failing stops the others
            raise
        finally:
            with lock:
                meta[f"resources[{label}]"] = resources  # peak memory (MiB) of each process

    if side_by_side and len(configs) > 1:
        # Each run has its own server and workers; while one server exports a model, the
        # other run's devices use the cores.
        errors: list[BaseException] = []

        def guarded(index: int, config: SimulationConfig) -> None:
            try:
                one(index, config)
            except BaseException as exc:  # re-raised in the main thread below
                errors.append(exc)

        threads = [threading.Thread(target=guarded, args=(i, c), daemon=True)
                   for i, c in enumerate(configs)]
        with _Interrupt():
            for t in threads:
                t.start()
            try:
                while any(t.is_alive() for t in threads):
                    for t in threads:
                        t.join(timeout=0.2)
            except KeyboardInterrupt:
                stop.set()
            for t in threads:
                t.join()
        if errors and not isinstance(errors[0], KeyboardInterrupt):
            raise errors[0]
    else:
        for index, config in enumerate(configs):
            with _Interrupt():
                one(index, config)
            if outcome.get(config.label):
                break
    interrupted = stop.is_set() or any(outcome.values())
    if interrupted:
        log("interrupted: the report covers the rounds completed")
    meta["seconds"] = round(time.perf_counter() - started, 1)
    meta["interrupted"] = interrupted
    meta["coordinator_max_rss_mb"] = peak_rss_mb()
    index = write_report(out, runs, central_result, meta)
    for row in summary(runs, central_result):
        share = row.get("share_of_central")
        log(f"{row['run']}: HR@10 {row['start_hr10']:.4f} -> {row['final_hr10']:.4f} "
            f"({row['gain_hr10']:+.4f}) after {row['published']} published rounds"
            + (f", {share:.0%} of central" if share is not None else "")
            + (f", epsilon {row['epsilon']:.2f} at delta {row['delta']:g}"
               if row["epsilon"] else ", no DP"))
    return index, {"runs": runs, "central": central_result, "interrupted": interrupted,
                   "meta": meta}


def demo_configs(base: SimulationConfig, noise_multiplier: float) -> list[SimulationConfig]:
    return [replace(base, noise_multiplier=noise_multiplier, label="federated+DP"),
            replace(base, noise_multiplier=None, label="federated")]

