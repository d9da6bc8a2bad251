"""The simulation coordinator: rounds of real devices against a real sync server.

Each round:

1. open the round through the admin API (SecAgg+ by default, central DP when a noise
   multiplier is set) with ``population`` = the devices with something to train on and
   ``target_clients`` = ``clients_per_round``: the server's q is their ratio;
2. ``begin`` on the devices that check in (its worker replays its events up to the round's
   clock, syncs the newest model, checks in, recommends and records whether the user's next
   real event is in the top 10); the server flips each device's coin at its check-in, exactly
   as for real devices, and the selected devices train and advertise. Its own server gets
   ``DETERMINISTIC_SEED`` from the simulation's seed and each device's key comes from the
   seed too, so a rerun selects the same devices; and since the coin is then a function of
   (seed, round id, device id) (``sync_server.selection.coin``), only the devices whose coin
   comes up check in: the same cohort as if all ~N did, at the cost of the cohort alone (the
   server's answer to each confirms it). Against a remote server every eligible device
   checks in;
3. close check-in once every device has answered (the admin close-stage: with q < 1 the
   server itself waits for the deadline, never for a count);
4. drive the SecAgg+ stages: when the server moves to a stage, every live device polls and
   answers it; devices chosen to drop stop answering at their stage, stragglers answer only
   after it closed (so the server goes on without them at the stage deadline);
5. wait for the published version, evaluate it offline (full ranking on the devices'
   held-out events, with the int8 LiteRT model the devices serve) and post the metrics to
   the server (the dashboard shows them).

A Ctrl-C stops after cleaning up (workers, server); the rounds completed are returned."""

from __future__ import annotations

import json
import math
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from device_sdk import secagg
from device_sdk.bundle import zip_bundle_dir
from device_sdk.protocol import b64decode
from device_sdk.sync_client import SyncError
from sync_server import strategies
from sync_server.privacy import calibrate_noise, default_delta
from sync_server.round_config import TASK_KEYS, RoundConfig
from sync_server.selection import coin
from trainer.metrics import basket_metrics, ranking_metrics
from trainer.simulation.backends import make_backend
from trainer.simulation.devices import STAGES, device_id
from trainer.simulation.population import Population

K = 10
SECAGG_STAGES = STAGES[1:]  # the stages after collecting, which the simulator drives
TERMINAL = secagg.ENDED_STATES


# The server's defaults (the training ones are device_sdk.protocol.TrainingParams').
_SERVER = RoundConfig()


@dataclass
class SimulationConfig:
    rounds: int = 20
    clients_per_round: int = 50
    noise_multiplier: float | None = None  # None: no differential privacy
    # Without a noise_multiplier: calibrate one so the planned rounds' epsilon is at most
    # this (``calibrate``); the config then carries the z it found.
    target_epsilon: float | None = None
    delta: float | None = None  # default: the power of ten at or below 1 / (10 x devices)
    clip_norm: float = _SERVER.clip_norm  # with clip_quantile: the first round's clip
    clip_quantile: float | None = None  # adaptive clipping's target quantile; None: fixed
    clip_lr: float | None = None  # its geometric step; None: the server's default
    strategy: str = _SERVER.strategy
    server_lr: float = 1.0
    # Cosine decay of the server lr over the planned rounds, from server_lr at round 1 to
    # this fraction of it at the last (each round's config carries its own); None: constant.
    server_lr_decay: float | None = None
    # Linear warmup of the server lr: round r < W runs at r / W of the scheduled lr; 0:
    # none. (A server optimizer's early rounds take its largest steps: FedAdam without
    # bias correction about 2 x lr a coordinate over rounds 5-30. On Online Retail it did
    # not remove the early dip: README, "What the early dip is not".)
    server_lr_warmup: int = 0
    momentum: float | None = None  # fedavgm; None: the strategy's default
    beta1: float | None = None  # fedadam's / fedyogi's; None: the strategy's defaults
    beta2: float | None = None
    tau: float | None = None
    # The served average (sync_server.round_config's serve_ema): each published model
    # serves the EMA of the published weights with this decay while devices train from the
    # weights themselves; None: the weights serve.
    serve_ema: float | None = None
    trainable: tuple[str, ...] | None = None  # federated tensors; None: the architecture's
    local_epochs: int = _SERVER.local_epochs
    learning_rate: float = _SERVER.learning_rate
    # Steps of the devices' local lr: ((R, lr), ...) with R increasing, from round R on the
    # rounds' tasks carry lr (before the first R: learning_rate). The server optimizer's
    # state carries on across a step. On Online Retail a tenth of the local lr after the
    # 12-step recipe's rounds took line HR@10 from 73% to 88-89% of central (README, "Two
    # phases", "The two phases as one run").
    local_lr_schedule: tuple[tuple[int, float], ...] = ()
    # The same steps for the server lr (before a decay or warmup applies to it).
    server_lr_schedule: tuple[tuple[int, float], ...] = ()
    batch_size: int = _SERVER.batch_size
    # FedProx (Li et al. 2020): each device's local objective gains mu / 2 ||w - w_round||^2;
    # it travels in the round's task (device_sdk.local_trainer). 0: plain local SGD.
    proximal_mu: float = _SERVER.proximal_mu
    max_examples: int = _SERVER.max_examples
    upload_scheme: str = _SERVER.upload_scheme
    dp_mode: str = _SERVER.dp_mode
    dropout: float = 0.0
    stragglers: float = 0.0
    deadline_s: float | None = None  # collecting; None: from the measured pace
    stage_timeout_s: float | None = None  # each SecAgg+ stage; None: from the measured pace
    workers: int = 2
    backend: str = "local"
    ray_address: str | None = None
    chunk: int = 8
    seed: int = 0
    label: str = "federated"
    mode: str = "full"  # "fast": trainer.simulation.fast (no transport, same learning)
    export_every: int = 0  # fast mode: int8 export + evaluation every N rounds (and last)
    # The rounds the devices' clock runs through for this run (``Population.with_clock``;
    # it holds its last step after them); None: the fleet's clock (``run_experiment``'s).
    clock_rounds: int | None = None

    def __post_init__(self) -> None:
        if self.clock_rounds is not None and not 1 <= self.clock_rounds <= self.rounds:
            raise ValueError(f"clock_rounds must be in [1, rounds {self.rounds}], got "
                             f"{self.clock_rounds}")
        if self.server_lr_decay is not None and not 0 < self.server_lr_decay <= 1:
            raise ValueError(f"server_lr_decay is a fraction of server_lr in (0, 1], got "
                             f"{self.server_lr_decay}")
        if self.server_lr_warmup < 0:
            raise ValueError(f"server_lr_warmup is a number of rounds >= 0, got "
                             f"{self.server_lr_warmup}")
        if self.serve_ema is not None and not 0 < self.serve_ema < 1:
            raise ValueError(f"serve_ema is the served average's decay, in (0, 1), got "
                             f"{self.serve_ema}")
        if not (math.isfinite(self.proximal_mu) and self.proximal_mu >= 0):
            raise ValueError(f"proximal_mu is FedProx's weight, a number >= 0, got "
                             f"{self.proximal_mu}")
        self.local_lr_schedule = _steps("local_lr_schedule", self.local_lr_schedule)
        self.server_lr_schedule = _steps("server_lr_schedule", self.server_lr_schedule)

    def local_lr_at(self, r: int) -> float:
        """Round r's local lr (1-based): that of the last ``local_lr_schedule`` step at or
        before r, else ``learning_rate``."""
        return _step_at(self.local_lr_schedule, r, self.learning_rate)

    def server_lr_at(self, r: int) -> float:
        """Round r's server lr (1-based): ``server_lr`` (or the last ``server_lr_schedule``
        step at or before r), or its cosine decay to ``server_lr_decay`` x that at round
        ``rounds`` (held after it), times min(1, r / ``server_lr_warmup``) with a warmup."""
        lr = _step_at(self.server_lr_schedule, r, self.server_lr)
        floor = self.server_lr_decay
        if floor is not None:
            progress = min(max(r - 1, 0), self.rounds - 1) / max(self.rounds - 1, 1)
            lr *= floor + (1 - floor) * (1 + math.cos(math.pi * progress)) / 2
        if self.server_lr_warmup:
            lr *= min(1.0, r / self.server_lr_warmup)
        return lr

    def round_config(self, n: int, population: int, version: int, delta: float,
                     deadline_s: float, stage_timeout_s: float, *, r: int) -> dict[str, Any]:
        """The body of POST /v1/admin/rounds (sync_server.round_config.RoundConfig) for
        round ``r``."""
        config: dict[str, Any] = {
            "strategy": self.strategy, "target_clients": n, "deadline_s": deadline_s,
            "population": population, "model_version": version,
            "upload_scheme": self.upload_scheme, "server_lr": self.server_lr_at(r),
            **{key: getattr(self, key) for key in TASK_KEYS if hasattr(self, key)},
            "learning_rate": self.local_lr_at(r),
        }
        if self.trainable is not None:
            config["trainable"] = list(self.trainable)
        for key in strategies.OPTIONS[self.strategy]:
            if key != "server_lr" and getattr(self, key, None) is not None:
                config[key] = getattr(self, key)
        if self.noise_multiplier is not None:
            config.update(noise_multiplier=self.noise_multiplier, delta=delta)
        for key in ("clip_quantile", "clip_lr", "serve_ema"):
            if getattr(self, key) is not None:
                config[key] = getattr(self, key)
        if self.upload_scheme == secagg.SCHEME:
            config.update(dp_mode=self.dp_mode, secagg_stage_timeout_s=stage_timeout_s,
                          secagg_poll_s=0.2)
        else:
            config["min_clients"] = max(1, math.ceil(0.5 * n))
        return config


def _steps(name: str, steps: Any) -> tuple[tuple[int, float], ...]:
    """A schedule's ((round, lr), ...) steps, checked: rounds increasing from 2 on (round 1
    runs at the constant), each lr finite and > 0. ValueError naming what is wrong."""
    steps = tuple((int(r), float(lr)) for r, lr in steps)
    starts = [r for r, _ in steps]
    if any(r < 2 for r in starts) or starts != sorted(set(starts)):
        raise ValueError(f"{name}'s rounds must increase from 2 on (round 1 runs at the "
                         f"constant lr), got {starts}")
    for r, lr in steps:
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"{name}: round {r}'s lr must be > 0, got {lr}")
    return steps


def _step_at(steps: tuple[tuple[int, float], ...], r: int, default: float) -> float:
    """The lr of the last step at or before round r, else ``default``."""
    lr = default
    for start, value in steps:
        if r >= start:
            lr = value
    return lr


# A round needs this many eligible devices; with fewer the simulator skips it (no cost).
MIN_DEVICES = 3


def round_time(population: Population, r: int) -> int:
    """Round r's time on the population's clock (rounds past the clock's end stay at it)."""
    clock = population.clock
    return int(clock[min(r - 1, len(clock) - 1)])


def eligible_users(population: Population, users: list[str], now: int) -> list[str]:
    """The devices that can train at ``now``: two or more events logged by then."""
    return [u for u in users if np.searchsorted(population.devices[u].times, now) >= 2]


def planned_rates(population: Population, config: SimulationConfig) -> list[float]:
    """Each round's sampling rate as the simulator will ask the server for it: a target of
    min(clients_per_round, eligible) devices over the eligible population (the server's
    ``selection.resolve``), for every round that is not skipped."""
    users = sorted(population.devices)
    rates = []
    for r in range(1, config.rounds + 1):
        eligible = len(eligible_users(population, users, round_time(population, r)))
        n = min(config.clients_per_round, eligible)
        if n >= MIN_DEVICES:
            rates.append(min(1.0, n / eligible))
    return rates


def calibrate(population: Population, config: SimulationConfig) -> bool:
    """``target_epsilon`` without a ``noise_multiplier``: set the smallest noise multiplier
    whose ledger epsilon over the planned rounds (``planned_rates``, every one assumed to
    publish) stays at most the target (``sync_server.privacy.calibrate_noise``). Rounds that
    fail spend nothing, so the run's epsilon can only come out lower. Returns whether it
    calibrated (a no-op otherwise)."""
    if config.target_epsilon is None or config.noise_multiplier is not None:
        return False
    delta = config.delta or default_delta(len(population.devices))
    config.noise_multiplier = calibrate_noise(planned_rates(population, config),
                                              config.target_epsilon, delta)
    return True


@dataclass
class RoundRecord:
    round: int
    label: str
    clock: str
    round_id: str | None = None
    state: str | None = None
    reason: str | None = None
    version: int | None = None
    population: int = 0
    sampled: int = 0
    completed: int = 0
    dropped: int = 0
    planned_dropouts: int = 0
    planned_stragglers: int = 0
    online_n: int = 0
    online_hr10: float | None = None
    online_ndcg10: float | None = None
    hr10: float | None = None
    ndcg10: float | None = None
    basket_hr10: float | None = None
    basket_ndcg10: float | None = None
    # Fast mode: every round's float weights (the numpy twin); hr10 etc. above are the int8
    # LiteRT model's, there on the rounds it exported.
    float_hr10: float | None = None
    float_ndcg10: float | None = None
    float_basket_hr10: float | None = None
    float_basket_ndcg10: float | None = None
    epsilon: float = 0.0
    delta: float | None = None
    bytes_up_per_device: float = 0.0
    bytes_down_per_device: float = 0.0
    device_seconds_median: float | None = None
    examples_median: float | None = None
    update_norm_median: float | None = None  # before clipping to clip_norm
    clip_norm: float | None = None  # the round's (adaptive clipping moves it)
    wall_s: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def offline_metrics(topk: Callable[[np.ndarray], np.ndarray], population: Population
                    ) -> dict[str, float]:
    """HR@10 / NDCG@10 of a model (``topk``: histories [U, L] -> ids [U, >=K], best first)
    on the devices' held-out events, full ranking; for basket data the basket protocol
    too."""
    test = population.test
    ids = topk(test.history)
    line = ranking_metrics(ids, test.target, population.ranked_items, K)
    out = {"hr@10": line["hr@10"], "ndcg@10": line["ndcg@10"]}
    basket = population.basket
    if basket is not None and len(basket):
        # Basket holdout: both protocols usually ask about the same histories.
        same = np.array_equal(basket.history, test.history)
        b = basket_metrics(ids if same else topk(basket.history), basket.baskets, K)
        out.update({"basket_hr@10": b["basket_hr@10"],
                    "basket_ndcg@10": b["basket_ndcg@10"]})
    return out


def draw_fates(rng: np.random.Generator, eligible: list[str], config: SimulationConfig
               ) -> tuple[dict[str, str], dict[str, str]]:
    """Each eligible device's fate should the server select it (drawn for all, used for
    those): the stage it drops out at, or answers late at (a straggler). Full and fast mode
    draw these in the same order from the same generator."""
    fate = rng.random(len(eligible))
    stage_of = rng.integers(0, len(STAGES), size=len(eligible))
    drop = {u: STAGES[s] for u, f, s in zip(eligible, fate, stage_of, strict=True)
            if f < config.dropout}
    late = {u: STAGES[s] for u, f, s in zip(eligible, fate, stage_of, strict=True)
            if config.dropout <= f < config.dropout + config.stragglers}
    return drop, late


class Simulation:
    """Runs rounds against ``server`` (an object with ``url`` and ``admin(method, path,
    **kw)``: ``ServerProcess``, or the same over a remote URL) starting from the published
    ``base_version``."""

    def __init__(self, population: Population, server: Any, root: Path,
                 config: SimulationConfig, *, progress: bool = True,
                 on_round: Callable[[RoundRecord], None] | None = None,
                 coin_seed: str | None = None) -> None:
        """``coin_seed``: the server's ``DETERMINISTIC_SEED`` when the simulator started the
        server itself. Then only the devices whose coin (``sync_server.selection.coin``, the
        server's own function, seed and ids) comes up check in: the cohort is exactly the
        one the server would select if every device checked in, without ~N check-ins a
        round; each check-in's answer confirms it. Without it (a remote server) every
        eligible device checks in and the server's answers are the cohort."""
        self.coin_seed = coin_seed
        self.population, self.server, self.config = population, server, config
        self.root = Path(root)
        self.progress = progress
        self.bar_offset = 0  # progress-bar rows below others (simulations side by side)
        self.on_round = on_round
        self.rng = np.random.default_rng(config.seed)
        self.users = sorted(population.devices)
        self.device_ids = ({u: device_id(config.seed, u) for u in self.users}
                           if coin_seed is not None else {})
        self.owner = {u: i % config.workers for i, u in enumerate(self.users)}
        self.records: list[RoundRecord] = []
        self.delta = config.delta or default_delta(len(self.users))
        self._pace = {"begin": 0.5, "stage": 0.5}  # seconds per device (measured later)
        self._evaluator: Any = None
        # Set from another thread (the demo runs simulations side by side) to stop like
        # Ctrl-C: the round under way is abandoned at the next wait.
        self.stop = threading.Event()
        self.resources: dict[str, Any] = {}  # peak memory, filled at the end of ``run``
        # No server in fast mode (trainer.simulation.fast): nothing to fetch.
        self.server_key = None if server is None else b64decode(
            self._admin_json("GET", "/v1/admin/server-keys")["signing_key"])

    # -- admin API helpers ------------------------------------------------------------------
    def _admin_json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.server.admin(method, path, **kwargs)
        if response.status >= 300:
            raise RuntimeError(f"{method} {path}: {response.status} {response.data[:300]!r}")
        return json.loads(response.data)

    def _round_view(self, round_id: str) -> dict[str, Any]:
        return self._admin_json("GET", f"/v1/admin/rounds/{round_id}")

    def publish_base(self, bundle_dir: Path) -> int:
        """Publish the starting model (the server signs it); returns its version."""
        response = self.server.admin("POST", "/v1/admin/models", body=zip_bundle_dir(bundle_dir),
                                     headers={"Content-Type": "application/zip"})
        if response.status != 201:
            raise RuntimeError(f"publishing the base model: {response.status} "
                               f"{response.data[:300]!r}")
        return int(json.loads(response.data)["model_version"])

    # -- evaluation ---------------------------------------------------------------------------
    def evaluate(self, version: int) -> dict[str, float]:
        """Offline metrics of ``version`` as the devices serve it (int8 LiteRT, downloaded
        and verified like a device does) on the devices' held-out events."""
        from device_sdk.device_client import DeviceClient

        if self._evaluator is None:
            self._evaluator = DeviceClient(self.root / "evaluator", server_key=self.server_key,
                                           server_url=self.server.url)
            self._evaluator.sync_client.register()
        ev = self._evaluator
        if ev.model_version != version:
            # Right after a large round the server may be busy for a while (it deletes the
            # round's shares and masked inputs): keep asking for up to ten minutes.
            give_up = time.monotonic() + 600
            while True:
                try:
                    ev.install(ev.sync_client.download_bundle(version))
                    break
                except SyncError as exc:
                    if not exc.retryable or time.monotonic() > give_up:
                        raise
                    time.sleep(5)
        model = ev.models.bundle(version).model()
        return offline_metrics(lambda histories: model.topk_many(histories)[0],
                               self.population)

    def _post_metrics(self, version: int, metrics: dict[str, float], source: str) -> None:
        clean = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(v)}
        if clean:
            self.server.admin("POST", f"/v1/admin/models/{version}/metrics",
                              json={"metrics": clean, "source": source})

    # -- running --------------------------------------------------------------------------------
    def run(self, base_version: int) -> list[RoundRecord]:
        config = self.config
        worker_config = {"root": str(self.root / "devices"), "server_url": self.server.url,
                         "server_key": self.server_key.hex(), "exclude_kinds": ["dismiss"],
                         "seed": self.config.seed}
        self.backend = make_backend(config.backend, config.workers, worker_config,
                                    config.ray_address)
        try:
            self._load_shards()
            start = RoundRecord(0, config.label, self._clock(0), state="published",
                                version=base_version, delta=self.delta)
            self._fill_offline(start, base_version)
            self._finish_record(start)
            version = base_version
            bar = self._bar(config.rounds, f"{config.label} rounds", position=0)
            for r in range(1, config.rounds + 1):
                self._check_stop()
                record = self.run_round(r, version)
                version = record.version if record.state == "published" else version
                bar.update(1)
                bar.set_postfix_str(self._postfix(record))
            bar.close()
            self.resources["worker_max_rss_mb"] = [
                self.backend.result(self.backend.submit(w, "stats", {}))["max_rss_mb"]
                for w in range(config.workers)]
        finally:  # on KeyboardInterrupt too: the rounds recorded so far are complete
            self.backend.close()
            if self._evaluator is not None:
                self._evaluator.close()
        return self.records

    def _check_stop(self) -> None:
        if self.stop.is_set():
            raise KeyboardInterrupt

    def _postfix(self, record: RoundRecord) -> str:
        parts = [f"v{record.version}"]
        if record.hr10 is not None:
            parts.append(f"HR@10 {record.hr10:.4f}")
        if record.epsilon:
            parts.append(f"eps {record.epsilon:.2f}")
        return " ".join(parts)

    def _bar(self, total: int, desc: str, position: int = 1) -> Any:
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, position=self.bar_offset + position,
                    leave=position == 0, disable=not self.progress, dynamic_ncols=True)

    def _load_shards(self) -> None:
        shards: dict[int, list[dict[str, Any]]] = {w: [] for w in range(self.config.workers)}
        for user in self.users:
            shards[self.owner[user]].append(self.population.devices[user].to_json())
        tickets = []
        for w, streams in shards.items():
            for i in range(0, len(streams), 2000):
                tickets.append(self.backend.submit(w, "add", {"streams": streams[i:i + 2000]}))
        for _ in self.backend.completed(tickets):
            pass

    def _clock(self, r: int) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self._now(max(r, 1))))

    def _now(self, r: int) -> int:
        return round_time(self.population, r)

    def _run_op(self, op: str, users: list[str], extra: dict[str, Any] | None = None,
                desc: str | None = None, per_user: dict[str, dict[str, Any]] | None = None
                ) -> list[dict[str, Any]]:
        """``op`` on ``users``, in chunks, on each user's own worker; results in any order.
        At most two chunks per worker are in flight (the pipes to a worker stay far from
        full in both directions). ``per_user``: argument name -> {user: value}, sliced to
        each chunk's users."""
        size = self.config.chunk
        queues: dict[int, list[list[str]]] = {}
        for user in users:
            chunks = queues.setdefault(self.owner[user], [[]])
            if len(chunks[-1]) == size:
                chunks.append([])
            chunks[-1].append(user)
        results: list[dict[str, Any]] = []
        bar = self._bar(len(users), desc or op) if desc and len(users) > size else None
        in_flight: dict[int, tuple[int, list[str]]] = {}

        def submit(worker: int) -> None:
            if queues.get(worker):
                chunk = queues[worker].pop(0)
                args = {"users": chunk, **(extra or {})}
                for name, values in (per_user or {}).items():
                    args[name] = {u: values[u] for u in chunk if u in values}
                in_flight[self.backend.submit(worker, op, args)] = (worker, chunk)

        for worker in list(queues):
            submit(worker)
            submit(worker)
        while in_flight:
            for ticket, chunk_results in self.backend.completed(list(in_flight)):
                self._check_stop()
                worker, chunk = in_flight.pop(ticket)
                results.extend(chunk_results)
                if bar is not None:
                    bar.update(len(chunk))
                submit(worker)
                break  # re-enter with the tickets now in flight
        if bar is not None:
            bar.close()
        return results

    def _timing(self, n: int) -> tuple[float, float]:
        """Deadlines far above the measured pace: the simulator closes each stage itself as
        soon as every device still alive has answered, so these only bound a stall."""
        batches = math.ceil(n / self.config.workers)
        deadline = self.config.deadline_s or 120.0 + 10.0 * self._pace["begin"] * batches
        stage = self.config.stage_timeout_s or 120.0 + 10.0 * self._pace["stage"] * batches
        return round(deadline, 1), round(stage, 1)

    def run_round(self, r: int, version: int) -> RoundRecord:
        config = self.config
        started = time.perf_counter()
        now = self._now(r)
        eligible = eligible_users(self.population, self.users, now)
        n = min(config.clients_per_round, len(eligible))
        record = RoundRecord(r, config.label, self._clock(r), population=len(eligible),
                             delta=self.delta)
        if n < MIN_DEVICES:
            record.state, record.reason = "skipped", f"{len(eligible)} eligible devices"
            self._finish_record(record)
            return record
        drop, late = draw_fates(self.rng, eligible, config)
        deadline_s, stage_timeout_s = self._timing(len(eligible))
        opened = self._admin_json("POST", "/v1/admin/rounds", json=config.round_config(
            n, len(eligible), version, self.delta, deadline_s, stage_timeout_s, r=r))
        round_id = record.round_id = opened["round_id"]
        record.clip_norm = float(opened["config"]["clip_norm"])
        phases: dict[str, float] = {}
        traffic: dict[str, list[int]] = {u: [0, 0] for u in eligible}

        def account(results: list[dict[str, Any]]) -> None:
            for res in results:
                t = traffic[res["user"]]
                t[0] += res.get("bytes_up", 0)
                t[1] += res.get("bytes_down", 0)

        # 1. begin: replay, sync, recommend, train, advertise
        t0 = time.perf_counter()
        late_collecting = [u for u, s in late.items() if s == "collecting"]
        dies = {u: s for u, s in drop.items() if s == "collecting"}
        checking_in = eligible
        if self.coin_seed is not None:
            q = float(opened["sampling_rate"])
            checking_in = [u for u in eligible
                           if coin(q, round_id, self.device_ids[u], self.coin_seed)]
        begun = self._run_op("begin", checking_in, {"now": now}, desc=f"round {r}: devices",
                             per_user={"drop": dies,
                                       "late": {u: True for u in late_collecting}})
        phases["begin"] = time.perf_counter() - t0
        account(begun)
        refused = [b["user"] for b in begun
                   if self.coin_seed is not None and b["status"] != "error"
                   and not b.get("selected")]
        if refused:
            raise RuntimeError(f"round {round_id}: the server did not select {len(refused)} "
                               f"device(s) whose seeded coin came up (e.g. {refused[0]}); "
                               "its DETERMINISTIC_SEED is not the simulator's, or the "
                               "device does not hold the round's model version")
        sampled = sorted(b["user"] for b in begun if b.get("selected"))
        late_collecting = [u for u in late_collecting if u in sampled]
        record.sampled = len(sampled)
        record.planned_dropouts = sum(u in drop for u in sampled)
        record.planned_stragglers = sum(u in late for u in sampled)
        self._pace["begin"] = max(
            0.05, statistics.median([b["seconds"] for b in begun]) if begun else 0.5)
        online = [b for b in begun if "hit" in b]
        record.online_n = len(online)
        if online:
            record.online_hr10 = float(np.mean([b["hit"] for b in online]))
            record.online_ndcg10 = float(np.mean([b["ndcg"] for b in online]))
        chosen = [b for b in begun if b.get("selected")] or begun
        record.device_seconds_median = statistics.median(b["seconds"] for b in chosen)
        examples = [b["examples"] for b in begun if b.get("examples") is not None]
        record.examples_median = statistics.median(examples) if examples else None
        norms = [b["update_norm"] for b in begun if b.get("update_norm") is not None]
        record.update_norm_median = statistics.median(norms) if norms else None
        live = {b["user"] for b in begun if b["status"] == "advertised"}
        errors = [b for b in begun if b["status"] == "error"]
        if errors and len(errors) == len(begun):
            raise RuntimeError(f"every device failed: {errors[0]['error']}")

        if config.upload_scheme == secagg.SCHEME:
            view = self._drive_stages(round_id, live, drop, late, late_collecting, phases,
                                      account)
        else:
            self._close_when_idle(round_id, "collecting")
            view = self._wait(round_id, lambda v: v["state"] in TERMINAL)
        record.state, record.reason = view["state"], view.get("reason")
        if view["state"] == "published":
            record.version = view["published_version"]
        record.completed = int((view.get("secagg") or {}).get("masked", view.get("received", 0))
                               if view["state"] == "published" else 0)
        record.dropped = record.sampled - record.completed
        record.epsilon = float(view.get("epsilon") or (self.records[-1].epsilon
                                                        if self.records else 0.0))
        ups = [traffic[u][0] for u in sampled] or [0]
        downs = [traffic[u][1] for u in sampled] or [0]
        record.bytes_up_per_device = float(np.mean(ups))
        record.bytes_down_per_device = float(np.mean(downs))
        t0 = time.perf_counter()
        if record.version is not None:
            self._fill_offline(record, record.version)
            self._post_metrics(record.version, {"hr@10": record.online_hr10,
                                                "ndcg@10": record.online_ndcg10}, "online")
        phases["evaluate"] = time.perf_counter() - t0
        record.phases = {k: round(v, 3) for k, v in phases.items()}
        record.wall_s = time.perf_counter() - started
        self._finish_record(record)
        return record

    def _fill_offline(self, record: RoundRecord, version: int) -> None:
        metrics = self.evaluate(version)
        record.hr10, record.ndcg10 = metrics["hr@10"], metrics["ndcg@10"]
        record.basket_hr10 = metrics.get("basket_hr@10")
        record.basket_ndcg10 = metrics.get("basket_ndcg@10")
        self._post_metrics(version, metrics, "offline")

    def _finish_record(self, record: RoundRecord) -> None:
        self.records.append(record)
        if self.on_round is not None:
            self.on_round(record)

    def _wait(self, round_id: str, until: Callable[[dict[str, Any]], bool],
              timeout: float = 3600.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        pause = 0.02
        while True:
            view = self._round_view(round_id)
            if until(view) or time.monotonic() > deadline:
                return view
            self._check_stop()
            time.sleep(pause)
            pause = min(0.25, pause * 1.5)  # quick for stage changes, gentle on exports

    def _close_when_idle(self, round_id: str, stage: str) -> None:
        """Every device that will answer ``stage`` has; the others crashed or straggle. The
        simulator knows that, so it tells the server to stop waiting (the admin
        close-stage, same outcome as the stage deadline) instead of sleeping until then."""
        view = self._wait(round_id, lambda v: v["state"] != stage, timeout=0.3)
        if view["state"] == stage:
            response = self.server.admin("POST", f"/v1/admin/rounds/{round_id}/close-stage")
            if response.status not in (200, 409):  # 409: it moved on by itself meanwhile
                raise RuntimeError(f"close-stage: {response.status} {response.data[:300]!r}")

    def _drive_stages(self, round_id: str, live: set[str], drop: dict[str, str],
                      late: dict[str, str], late_collecting: list[str],
                      phases: dict[str, float], account: Callable) -> dict[str, Any]:
        self._close_when_idle(round_id, "collecting")
        if late_collecting:
            # Stragglers of the first stage train and advertise now that it is over: refused.
            account(self._run_op("finish_late", late_collecting))
        for stage in SECAGG_STAGES:
            t0 = time.perf_counter()
            later = SECAGG_STAGES[SECAGG_STAGES.index(stage):]
            view = self._wait(round_id, lambda v, later=later: v["state"] in (
                *later, *TERMINAL, "aggregating"))
            if view["state"] != stage:
                if view["state"] in TERMINAL or view["state"] == "aggregating":
                    break
                continue
            dying = [u for u in live if drop.get(u) == stage]
            if dying:
                self._run_op("drop", dying)
                live -= set(dying)
            slow = [u for u in live if late.get(u) == stage]
            answering = sorted(live - set(slow))
            results = self._run_op("step", answering, desc=f"  {stage}")
            account(results)
            live -= {r["user"] for r in results if r["status"] in ("dropped", "error")}
            if answering:
                batches = max(1, math.ceil(len(answering) / self.config.workers))
                self._pace["stage"] = max(0.005, (time.perf_counter() - t0) / batches)
            phases[stage] = time.perf_counter() - t0
            self._close_when_idle(round_id, stage)
            if slow:
                results = self._run_op("step", slow)
                account(results)
                live -= {r["user"] for r in results if r["status"] in ("dropped", "error")}
        t0 = time.perf_counter()
        view = self._wait(round_id, lambda v: v["state"] in TERMINAL)
        phases["aggregate"] = time.perf_counter() - t0
        return view
