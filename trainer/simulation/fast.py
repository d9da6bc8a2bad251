"""``--mode fast``: the same federated learning as the full simulator, without the transport.

Full mode (``trainer.simulation.run``) is the system test: every sampled device replays its
events into its own SQLite log, speaks HTTP to the real sync server, signs, and runs
SecAgg+'s key agreement and masks; the server exports every round's model. Fast mode keeps
everything that changes the numbers and drops the rest:

- the same population, public slice, round clock, eligibility, Poisson sampling (the
  server's seeded coin, ``sync_server.selection.coin``, over the same device ids and round
  ids) and fate draws (dropouts, stragglers) from the same generator, in the same order;
- devices live in worker processes (``FastDeviceWorker``, the same backends as full mode)
  holding fixed shards; each reads its events up to the round's clock straight from its
  stream, builds examples and trains with the real ``LocalTrainer`` (numpy twin, clipping)
  under the seed full mode's device would use (``local_trainer.round_seed``);
- each update goes into the ring exactly as a device's SecAgg+ input does
  (``device_sdk.secagg.ring_input``: stochastic quantization, distributed DP noise), and
  each worker keeps the ring sum of its devices modulo 2^32. Masks cancel in the sum, so
  the coordinator's sum of the workers' sums is what the server unmasks (a test shows it
  bit for bit); only the quantization's random bits differ from full mode, whose devices
  draw them from the OS;
- the coordinator runs the server's code as a library: the round config
  (``sync_server.round_config.plan``), ``secure_aggregation.aggregate_ring_sum``
  (dequantize, norm guard, strategy step, central DP noise from the same seeded stream as
  the server's) and the privacy ledger (``sync_server.privacy``);
- a SecAgg+ stage with fewer than ``min_clients`` devices left (or more than max_clients
  advertising, or an unsafe graph) fails the round as the server would. What fast mode
  does not model: the neighbour graph's random seed, so a round the full server fails for
  lack of share holders (a target probability of 1e-4 at 30 % dropout) publishes here.

Evaluation: every round on the float weights (the numpy twin, batched) on the held-out
devices, both protocols for basket data; every ``export_every`` rounds and after the last
one the server's own publisher (``sync_server.publisher.patch_or_export``) writes the
int8 LiteRT bundle and the LiteRT interpreter evaluates it, so the report's last row is
what devices would serve (with a served average, ``serve_ema``: the model file serves the
average, evaluated likewise, and weights.npz keeps the weights devices train from). Online
HR@10 is measured with the float twin of the served tensors through the device's
history policy and filters (for a model that marks sessions, as of the user's next event, as
full mode's devices are asked). Same seed, same results, bit for bit.

Only ``secagg+-v1`` rounds run in fast mode (the sealed path's example-weighted float mean
needs each device's update at the server)."""

from __future__ import annotations

import base64
import math
import shutil
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from device_sdk import secagg
from device_sdk.bundle import load_bundle
from device_sdk.csprng import CryptoRandom
from device_sdk.event_log import Event
from device_sdk.local_trainer import LocalTrainer, LocalTrainingConfig, round_seed
from device_sdk.recommender import HistoryPolicy, history_ids, history_steps
from device_sdk.sessions import session_window
from device_sdk.uploads import secagg_vector
from trainer.simulation.devices import DeviceStream, ShardWorker, peak_rss_mb

K = 10


class _RoundBundle:
    """The base bundle with a round's weights: what ``LocalTrainer`` reads of a bundle."""

    def __init__(self, base: Any, weights: dict[str, np.ndarray]) -> None:
        self.architecture, self.config = base.architecture, base.config
        self._weights = weights
        self._items = base.items()

    def weights(self) -> dict[str, np.ndarray]:
        return self._weights

    def items(self) -> Any:
        return self._items


def _read(path: str) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def quantize_seed(seed: int, round_id: str, user: str) -> str:
    """The seed of a fast-mode device's stochastic rounding (full mode's come from the OS)."""
    return f"{seed}/quantize/{round_id}/{user}"


def encode_ring(values: np.ndarray) -> str:
    return base64.b64encode(np.asarray(values, "<u4").tobytes()).decode()


def decode_ring(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype="<u4").astype(np.uint32)


class FastDeviceWorker(ShardWorker):
    """A shard of devices for fast mode. ``config``: base_bundle (directory), seed,
    exclude_kinds. JSON in, JSON out, like ``DeviceWorker``: a local worker process or a Ray
    actor hosts it. Imports the device SDK and numpy only."""

    OPERATIONS = ("add", "round", "collect", "stats")

    def __init__(self, config: dict[str, Any]) -> None:
        self.seed = int(config.get("seed", 0))
        self.policy = HistoryPolicy(exclude_kinds=tuple(config.get("exclude_kinds",
                                                                   ("dismiss",))))
        self.base = load_bundle(config["base_bundle"])
        self.vocab = self.base.items()
        self.streams: dict[str, DeviceStream] = {}
        self._version: int | None = None
        self._trainer: LocalTrainer | None = None
        self._twin: Any = None
        self._ring: np.ndarray | None = None
        self._clients = 0

    def stats(self) -> dict[str, Any]:
        return {"devices": len(self.streams), "max_rss_mb": peak_rss_mb()}

    def _load(self, version: int, weights_path: str, served_path: str | None) -> None:
        """Version ``version``: devices train from its weights and recommend with its served
        tensors (a served average's, when ``served_path`` is given)."""
        if version == self._version:
            return
        weights = _read(weights_path)
        self._trainer = LocalTrainer(_RoundBundle(self.base, weights), self.policy)
        served = weights if served_path is None else {**weights, **_read(served_path)}
        self._twin = self._trainer.arch.numpy_model(self._trainer.config, served)
        self._version = version

    def round(self, users: list[str], round_id: str, version: int, weights: str, now: int,
              task: dict[str, Any], params: dict[str, Any],
              train: dict[str, bool] | None = None,
              served: str | None = None) -> list[dict[str, Any]]:
        """Each of ``users`` checked in (its coin came up): recommend with the served model
        (online hit), and those in ``train`` train, clip and add their quantized update to
        this worker's ring sum for the round."""
        self._load(version, weights, served)
        config = LocalTrainingConfig(**{**task, "trainable": tuple(task["trainable"]) if
                                           task["trainable"] else None})
        secagg_params = secagg.TaskParams.from_json(params)
        if self._ring is None:
            self._ring = np.zeros(secagg_params.vector_length, dtype=np.uint32)
        out = []
        for user in users:
            started = time.perf_counter()
            stream = self.streams[user]
            upto = int(np.searchsorted(stream.times, now, side="left"))
            result: dict[str, Any] = {"user": user, "events": upto}
            if upto < len(stream):
                rank = self._rank(stream, upto)
                result["hit"] = rank is not None
                result["ndcg"] = 0.0 if rank is None else 1.0 / math.log2(rank + 2)
            if (train or {}).get(user):
                events = [Event(i, float(stream.times[i]), stream.kinds[i], stream.items[i],
                                None) for i in range(upto)]
                update = self._trainer.train(events, config, base_version=version,
                                             seed=round_seed(f"{self.seed}/{user}", round_id))
                rng = CryptoRandom.from_seed(quantize_seed(self.seed, round_id, user))
                vector = secagg_vector(update, clip_bit=secagg_params.clip_bit)
                np.add(self._ring, secagg.ring_input(vector, secagg_params, rng),
                       out=self._ring)
                self._clients += 1
                result.update(examples=update.num_examples,
                              update_norm=update.norm_before_clip)
            result["seconds"] = time.perf_counter() - started
            out.append(result)
        return out

    def collect(self) -> dict[str, Any]:
        """This worker's ring sum for the round (and how many inputs are in it); reset."""
        ring, clients = self._ring, self._clients
        self._ring, self._clients = None, 0
        return {"ring": None if ring is None else encode_ring(ring), "clients": clients}

    def history(self, stream: DeviceStream, upto: int) -> np.ndarray:
        """The model input ``Recommender.history`` builds from the user's first ``upto``
        events: with session separators, as of the next event's time (when the user asks)."""
        config = self.base.config  # what the Recommender reads too
        max_len = int(config["max_len"])
        start = max(0, upto - self.policy.scan_factor * max_len)
        separator = int(config.get("session_id", 0))
        if not separator:
            pairs = list(zip(stream.items[start:upto], stream.kinds[start:upto], strict=True))
            return history_ids(pairs, self.vocab.id_of, max_len, self.policy)
        steps = history_steps(zip(stream.items[start:upto], stream.kinds[start:upto],
                                  stream.times[start:upto].tolist(), strict=True),
                              self.vocab.id_of, max_len, self.policy)
        return session_window(np.array([i for i, _ in steps], dtype=np.int32),
                              np.array([t for _, t in steps], dtype=np.float64),
                              separator, float(config["session_gap"]),
                              float(stream.times[upto]),
                              max_len)

    def _rank(self, stream: DeviceStream, upto: int) -> int | None:
        """Where the user's next real event ranks in the K items the device would show
        (``Recommender.recommend``'s history, filters and popularity fill), float model."""
        history = self.history(stream, upto)
        excluded = {stream.items[i] for i in range(upto)
                    if stream.kinds[i] in self.policy.exclude_kinds}
        n_items = len(self.vocab)
        ranked: list[str] = []
        if history.any():
            ids, _ = self._twin.topk(history[None, :])
            ranked = [self.vocab.keys[i] for i in ids[0].tolist() if 0 < i < n_items]
        shown: list[str] = []
        for key in [*ranked, *(self.vocab.keys[i] for i in self.vocab.popular)]:
            if key in shown or key in excluded:
                continue
            shown.append(key)
            if len(shown) == K:
                break
        nxt = stream.items[upto]
        return shown.index(nxt) if nxt in shown else None


def run_fast(sim: Any, base_bundle: Path) -> list[Any]:
    """The fast-mode rounds of ``sim`` (a ``Simulation`` without a server); see the module
    docstring. Returns the round records (complete ones only on Ctrl-C)."""
    return FastRounds(sim, Path(base_bundle)).run()


class FastRounds:
    """The coordinator's side: the server's decisions and math, as library calls."""

    def __init__(self, sim: Any, base_bundle: Path) -> None:
        import model_zoo

        self.sim = sim
        self.config = sim.config
        if self.config.upload_scheme != secagg.SCHEME:
            raise ValueError(f"--mode fast simulates {secagg.SCHEME} rounds; upload scheme "
                             f"{self.config.upload_scheme!r} needs --mode full")
        self.base_dir = Path(base_bundle)
        self.base = load_bundle(self.base_dir)
        self.arch = model_zoo.get(self.base.architecture)
        self.model_config = self.arch.config_from_dict(self.base.config)
        self.weights = {k: np.asarray(v, np.float32) for k, v in self.base.weights().items()}
        # The served average's tensors (the round config's serve_ema), as the server keeps
        # them beside each version it publishes; None: the weights serve.
        self.served: dict[str, np.ndarray] | None = None
        self.coin_seed = f"simulation/{self.config.seed}"  # the server's DETERMINISTIC_SEED
        self.work = sim.root / "fast"
        self.work.mkdir(parents=True, exist_ok=True)
        self.opened = 0  # rounds the server would have opened (its round ids count them)
        self.strategy_state: dict[tuple[str, bool], dict[str, np.ndarray]] = {}
        self.ledger: Any = None
        self.previous_clip: tuple[str, float] | None = None  # adaptive clipping's estimate
        self.epsilon = 0.0  # spent so far (sim.records lags: the newest round is evaluating)

    # -- evaluation -------------------------------------------------------------------------
    def float_metrics(self, weights: dict[str, np.ndarray]) -> dict[str, float]:
        from trainer.simulation.run import offline_metrics

        twin = self.arch.numpy_model(self.model_config, weights)

        def topk(histories: np.ndarray) -> np.ndarray:
            parts = [twin.topk(histories[i:i + 512])[0] for i in range(0, len(histories), 512)]
            return np.concatenate(parts) if parts else np.zeros((0, K), np.int32)

        return offline_metrics(topk, self.sim.population)

    def export(self, weights: dict[str, np.ndarray], served: dict[str, np.ndarray] | None,
               version: int) -> dict[str, float]:
        """The server's publisher writes the int8 LiteRT bundle of ``weights`` (its model
        file serving ``served`` when given); the LiteRT interpreter evaluates it (what
        devices would serve). The newest stays in ``fast/bundle``."""
        from sync_server.publisher import patch_or_export
        from trainer.simulation.run import offline_metrics

        new_dir = Path(patch_or_export(weights, self.base_dir, version,
                                       {"simulation": "fast"}, served=served))
        target = self.work / "bundle"
        shutil.rmtree(target, ignore_errors=True)
        shutil.move(str(new_dir), target)
        shutil.rmtree(new_dir.parent, ignore_errors=True)
        model = load_bundle(target).model()
        return offline_metrics(lambda h: model.topk_many(h)[0], self.sim.population)

    def _base_metrics(self) -> dict[str, float]:
        from trainer.simulation.run import offline_metrics

        model = self.base.model()
        return offline_metrics(lambda h: model.topk_many(h)[0], self.sim.population)

    def _evaluate(self, record: Any, weights: dict[str, np.ndarray],
                  served: dict[str, np.ndarray] | None, version: int, export: bool) -> None:
        """Float metrics of the model a round published (``served`` over ``weights``: what
        its model file serves); with ``export`` the int8 metrics of the newest published
        model too."""
        t0 = time.perf_counter()
        if record.state == "published":
            metrics = self.float_metrics(weights if served is None else {**weights, **served})
            record.float_hr10, record.float_ndcg10 = metrics["hr@10"], metrics["ndcg@10"]
            record.float_basket_hr10 = metrics.get("basket_hr@10")
            record.float_basket_ndcg10 = metrics.get("basket_ndcg@10")
        if export:
            int8 = (self.export(weights, served, version) if version > 1
                    else self._base_metrics())
            record.hr10, record.ndcg10 = int8["hr@10"], int8["ndcg@10"]
            record.basket_hr10 = int8.get("basket_hr@10")
            record.basket_ndcg10 = int8.get("basket_ndcg@10")
        seconds = time.perf_counter() - t0
        record.phases["evaluate"] = round(seconds, 3)
        record.wall_s += seconds

    # -- running ------------------------------------------------------------------------------
    def run(self) -> list[Any]:
        """Round r's evaluation runs in a thread while the workers train round r + 1 (numpy
        releases the GIL); round r's record is finished (report, progress) once both are
        done, so a Ctrl-C keeps every round finished so far."""
        from concurrent.futures import Future, ThreadPoolExecutor

        from trainer.simulation.backends import make_backend
        from trainer.simulation.run import RoundRecord

        sim, config = self.sim, self.config
        worker_config = {"mode": "fast", "base_bundle": str(self.base_dir),
                         "exclude_kinds": ["dismiss"], "seed": config.seed,
                         "root": str(self.work)}
        sim.backend = make_backend(config.backend, config.workers, worker_config,
                                   config.ray_address)
        evaluator = ThreadPoolExecutor(1, thread_name_prefix="evaluate")
        bar = sim._bar(config.rounds, f"{config.label} rounds", position=0)

        def finish(future: Future, record: Any) -> None:
            future.result()
            sim._finish_record(record)
            if record.round:
                bar.update(1)
                bar.set_postfix_str(sim._postfix(record))

        try:
            sim._load_shards()
            version = 1
            start = RoundRecord(0, config.label, sim._clock(0), state="published",
                                version=version, delta=sim.delta)
            pending = (evaluator.submit(self._evaluate, start, self.weights, None, version,
                                        True), start)
            for r in range(1, config.rounds + 1):
                sim._check_stop()
                started = time.perf_counter()
                record = self.run_round(r, version)
                record.wall_s = time.perf_counter() - started
                if record.state == "published":
                    version = record.version
                # The int8 bundle of the newest published weights every export_every rounds
                # and after the last: what devices would serve.
                export = r == config.rounds or bool(
                    config.export_every and r % config.export_every == 0)
                future = evaluator.submit(self._evaluate, record, self.weights, self.served,
                                          version, export)
                finish(*pending)
                pending = (future, record)
            finish(*pending)
            sim.resources["worker_max_rss_mb"] = [
                sim.backend.result(sim.backend.submit(w, "stats", {}))["max_rss_mb"]
                for w in range(config.workers)]
            sim.resources["coordinator_max_rss_mb"] = peak_rss_mb()
        finally:
            bar.close()
            evaluator.shutdown(wait=True, cancel_futures=True)
            sim.backend.close()
        return sim.records

    def _round_config(self, n: int, population: int, version: int, r: int) -> dict[str, Any]:
        """The round config exactly as the server would store it (its own validation and
        defaults), plus what the server adds from the base model."""
        from sync_server import round_config

        plan = round_config.plan(self.config.round_config(
            n, population, version, self.sim.delta, 3600.0, 60.0, r=r))
        trainable = plan.derived.trainable
        if trainable is None:  # the architecture's federated tensors, if it says
            federated = self.base.manifest.get("architecture", {}).get("federated")
            trainable = tuple(federated) if federated else None
        names = sorted(self.weights) if trainable is None else list(trainable)
        plan = replace(plan, derived=replace(
            plan.derived, model_version=version, trainable=trainable, selection="seeded",
            expected_shapes={n: list(self.weights[n].shape) for n in names}))
        return round_config.with_clip(plan, self.previous_clip).stored()

    def _stage_failure(self, server: dict[str, Any], sampled: list[str],
                       gone: dict[str, str]) -> tuple[list[str], str | None]:
        """The devices whose input reaches the sum (they answered masked_input), or the
        server's reason to fail the round at a stage's close."""
        minimum = int(server["min_clients"])
        u1 = [u for u in sampled if gone.get(u) != "collecting"]
        if len(u1) < minimum:
            return [], f"{len(u1)} device(s) advertised keys, min_clients is {minimum}"
        most = int(server.get("max_clients") or server["target_clients"])
        if len(u1) > most:
            return [], f"{len(u1)} device(s) advertised keys, max_clients is {most}"
        degree = min(int(server["secagg_degree"] or secagg.default_degree(len(u1))),
                     len(u1) - 1)
        threshold = int(server["secagg_threshold"] or secagg.default_threshold(degree))
        try:
            secagg.check_graph(len(u1), degree, threshold)
        except secagg.SecAggError as exc:
            return [], f"unsafe SecAgg+ parameters for {len(u1)} participants: {exc.message}"
        u2 = [u for u in u1 if gone.get(u) != "share_keys"]
        if len(u2) < minimum:
            return [], f"{len(u2)} device(s) sent shares, min_clients is {minimum}"
        u3 = [u for u in u2 if gone.get(u) != "masked_input"]
        if len(u3) < minimum:
            return [], f"{len(u3)} device(s) sent masked inputs, min_clients is {minimum}"
        return u3, None

    def run_round(self, r: int, version: int) -> Any:
        from sync_server import secure_aggregation, strategies
        from sync_server.privacy import LedgerEntry, PrivacyLedger
        from sync_server.publisher import served_average
        from sync_server.selection import coin
        from trainer.simulation.run import MIN_DEVICES, RoundRecord, draw_fates, eligible_users

        sim, config = self.sim, self.config
        now = sim._now(r)
        eligible = eligible_users(sim.population, sim.users, now)
        n = min(config.clients_per_round, len(eligible))
        record = RoundRecord(r, config.label, sim._clock(r), population=len(eligible),
                             delta=sim.delta, epsilon=self.epsilon)
        if n < MIN_DEVICES:
            record.state, record.reason = "skipped", f"{len(eligible)} eligible devices"
            return record
        drop, late = draw_fates(sim.rng, eligible, config)  # as full mode draws them
        server = self._round_config(n, len(eligible), version, r)
        record.clip_norm = float(server["clip_norm"])
        self.opened += 1
        round_id = record.round_id = f"round-{self.opened}"
        q = float(server["sampling_rate"])
        sampled = [u for u in eligible if coin(q, round_id, sim.device_ids[u], self.coin_seed)]
        record.sampled = len(sampled)
        record.planned_dropouts = sum(u in drop for u in sampled)
        record.planned_stragglers = sum(u in late for u in sampled)
        # A straggler answers its stage after it closed: the round goes on without it, as
        # without a device that dropped there. Both stay in the sum from unmasking on.
        contributors, reason = self._stage_failure(server, sampled, {**late, **drop})
        phases: dict[str, float] = {}
        t0 = time.perf_counter()
        weights_path = self.work / f"weights-v{version}.npz"
        served_path = self.work / f"served-v{version}.npz"
        if not weights_path.exists():
            np.savez(weights_path, **self.weights)
            if self.served is not None:
                np.savez(served_path, **self.served)
            for old in [*self.work.glob("weights-v*.npz"), *self.work.glob("served-v*.npz")]:
                if old not in (weights_path, served_path):
                    old.unlink()
        task = {"local_epochs": server["local_epochs"],
                "learning_rate": server["learning_rate"], "batch_size": server["batch_size"],
                "clip_norm": server["clip_norm"], "proximal_mu": server["proximal_mu"],
                "max_examples": server["max_examples"],
                "trainable": server["trainable"]}
        params = secure_aggregation.task_params(server)
        params = {k: params[k] for k in ("scale", "vector_length", "min_clients", "noise_std",
                                         "clip_bit") if k in params}
        results = sim._run_op(
            "round", sampled,
            {"round_id": round_id, "version": version, "weights": str(weights_path),
             "now": now, "task": task, "params": params,
             "served": None if self.served is None else str(served_path)},
            desc=f"round {r}: devices", per_user={"train": {u: True for u in contributors}})
        ring = np.zeros(int(params["vector_length"]), dtype=np.uint32)
        clients = 0
        for w in range(config.workers):
            part = sim.backend.result(sim.backend.submit(w, "collect", {}))
            if part["ring"] is not None:
                np.add(ring, decode_ring(part["ring"]), out=ring)
            clients += part["clients"]
        phases["devices"] = time.perf_counter() - t0
        online = [x for x in results if "hit" in x]
        record.online_n = len(online)
        if online:
            record.online_hr10 = float(np.mean([x["hit"] for x in online]))
            record.online_ndcg10 = float(np.mean([x["ndcg"] for x in online]))
        trained = [x for x in results if "examples" in x]
        if trained:
            record.device_seconds_median = statistics.median(x["seconds"] for x in trained)
            record.examples_median = statistics.median(x["examples"] for x in trained)
            record.update_norm_median = statistics.median(x["update_norm"] for x in trained)
        if reason is not None:
            record.state, record.reason = "failed", reason
            record.dropped = record.sampled
            record.phases = {k: round(v, 3) for k, v in phases.items()}
            return record
        t0 = time.perf_counter()
        # The server's aggregation (sync_server.rounds): the strategy built from the round
        # config with its seeded noise stream, the optimizer state of the last published
        # round of the same strategy and DP-ness, the ring sum, the ledger.
        noise = CryptoRandom.from_seed(f"{self.coin_seed}/noise/{round_id}")
        strategy = strategies.build({**server, "expected_clients": int(
            server["target_clients"])}, rng=noise)
        dp = server["noise_multiplier"] is not None
        state = self.strategy_state.get((server["strategy"], dp))
        if state is not None:
            strategy.load_state(state)
        if isinstance(strategy, strategies.DPFedAvg):
            strategy.clip_norm = float(server["clip_norm"])
        try:
            result, entry = secure_aggregation.aggregate_ring_sum(
                server, strategy, self.weights, ring, clients, round_id=round_id,
                sampling_rate=q)
        except secure_aggregation.SumAboveBound as exc:
            record.state, record.reason = "failed", str(exc)
            record.dropped = record.sampled
            return record
        if dp:
            entry = entry or LedgerEntry(round_id, float(server["noise_multiplier"]), q)
            if self.ledger is None:
                self.ledger = PrivacyLedger(server["delta"])
            record.epsilon = self.epsilon = self.ledger.record(entry)
        self.strategy_state[(server["strategy"], dp)] = {
            k: np.asarray(v) for k, v in strategy.state().items()}
        if "clip_norm_next" in result.measurements:  # the server's _previous_clip
            self.previous_clip = (round_id, float(result.measurements["clip_norm_next"]))
        weights = {k: np.asarray(v, np.float32) for k, v in result.weights.items()}
        decay = server.get("serve_ema")  # the server's publishing: the served average
        self.served = None if decay is None else served_average(
            decay, self.served or self.weights, weights)
        self.weights = weights
        record.state, record.version = "published", version + 1
        record.completed, record.dropped = clients, record.sampled - clients
        phases["aggregate"] = time.perf_counter() - t0
        record.phases = {k: round(v, 3) for k, v in phases.items()}
        return record
