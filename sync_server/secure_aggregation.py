"""SecAgg+ rounds on the server: stage intake, stage transitions, unmasking the sum.

The math lives in ``device_sdk.secagg`` (both halves). Here: what is stored, when a stage
closes and whether the round can still finish. A SecAgg+ round's states are::

    collecting (check-in, local training, key advertisements: U1)
      -> share_keys (encrypted shares relayed: U2) -> masked_input (U3)
      -> unmasking (revealed shares: U4) -> aggregating -> published | failed

A stage closes when every device expected in it answered, or at its deadline
(``secagg_stage_timeout_s``; ``deadline_s`` for collecting). Each answer is counted by a
conditional UPDATE on the round's state and the transition is a conditional UPDATE on the
state *and* the count it observed, so an answer either lands before a stage closes (and is in
the set the next stage uses) or is refused ``stage_closed``; two workers never both move a
round on. Before each transition the server checks that the round can still finish: at least
``min_clients`` devices, and every device whose secrets will be needed keeps >= t holders.
Otherwise the round fails right there, before anything that could reveal an input.

Nothing here can unmask one device: the server holds masked inputs, shares it cannot read
(AEAD under keys agreed between devices), and at most one kind of revealed share per device.
Masked inputs, relayed shares and revealed shares are deleted when the round ends.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import threading
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any

import numpy as np
from sqlalchemy import delete, select, update

from device_sdk import secagg
from device_sdk.protocol import CLIP_SLACK, b64, b64decode, decode_tensors
from sync_server import selection, strategies
from sync_server.blobs import BlobStore
from sync_server.db import Database
from sync_server.errors import ApiError
from sync_server.models import (
    Device,
    Round,
    SecAggMember,
    SecAggShare,
    Selection,
    as_utc,
    utcnow,
)
from sync_server.privacy import LedgerEntry

log = logging.getLogger(__name__)

# The round states of the stages, in order (device_sdk.secagg.STAGES is the one table).
STAGES = tuple(s.state for s in secagg.STAGES)
MAX_CIPHERTEXT_CHARS = 1024
# Recipients whose relayed shares one clean-up transaction deletes (about 64·k rows).
FORGET_BATCH = 64


def vector_length(expected_shapes: Mapping[str, list[int]]) -> int:
    return int(sum(math.prod(shape) for shape in expected_shapes.values()))


def input_length(config: Mapping[str, Any]) -> int:
    """A device's SecAgg+ input: the trainable tensors' values (sorted names), then, when
    the round adapts its clip, one value for its under-the-clip bit (``clip_bit``)."""
    return vector_length(config["expected_shapes"]) + (
        config.get("clip_quantile") is not None)


def task_params(config: Mapping[str, Any]) -> dict[str, Any]:
    """The ``secagg`` field of a round task (device_sdk.secagg.TaskParams + timing).

    Central DP: the server noises the unmasked float sum, the ring holds only the updates.
    Distributed DP: each device adds N_Z(0, s_dev^2) with s_dev = z C scale / sqrt(min_clients),
    so any >= min_clients survivors carry at least the noise of z C on the sum."""
    clip = float(config["clip_norm"])
    # The ring holds the largest cohort the round accepts (a Poisson cohort can exceed its
    # mean, target_clients); rounds from before max_clients existed had target_clients.
    target = int(config.get("max_clients") or config["target_clients"])
    minimum = int(config["min_clients"])
    distributed = config["dp_mode"] == "distributed"
    z = float(config["noise_multiplier"] or 0.0) if distributed else 0.0
    scale = secagg.quantization_scale(clip, target, z * math.sqrt(target / minimum))
    params = secagg.TaskParams(scale=scale, vector_length=input_length(config),
                               min_clients=minimum,
                               noise_std=z * clip * scale / math.sqrt(minimum),
                               clip_bit=config.get("clip_quantile") is not None)
    return {**params.to_json(), "stage_timeout_s": float(config["secagg_stage_timeout_s"]),
            "poll_s": float(config["secagg_poll_s"])}


def effective_noise_multiplier(config: Mapping[str, Any], survivors: int) -> float:
    """z of the noise ``survivors`` devices put on the sum in distributed mode, against the
    L2 sensitivity of one quantized update: C scale + sqrt(d) (stochastic rounding moves each
    coordinate by < 1). The sum of discrete Gaussians is accounted as a Gaussian of the
    summed variance (Kairouz et al. 2021 bound the gap; it is negligible at these stds)."""
    params = task_params(config)
    sensitivity = float(config["clip_norm"]) * params["scale"] + math.sqrt(
        params["vector_length"])
    return math.sqrt(survivors) * params["noise_std"] / sensitivity


class SumAboveBound(Exception):
    """The unmasked sum is longer than honest devices could have made it: some device
    bypassed its clipping. The round fails (``sum_norm_above_bound``); nothing is noised,
    released or accounted."""

    code = "sum_norm_above_bound"


def sum_norm_bound(config: Mapping[str, Any], clients: int) -> float:
    """The largest L2 norm the dequantized sum of ``clients`` honest inputs can have: each
    update clipped to C (with the protocol's CLIP_SLACK), stochastic rounding < 1 unit per
    coordinate per device (sqrt(d) clients / scale), and in distributed DP mode the devices'
    discrete Gaussian noise: a sum of std sigma = sqrt(clients) noise_std / scale per
    coordinate, sub-Gaussian, so its norm exceeds sigma (sqrt(d) + 10) with probability below
    exp(-50)."""
    params = task_params(config)
    scale, d = float(params["scale"]), int(params["vector_length"])
    bound = (clients * float(config["clip_norm"]) * (1 + CLIP_SLACK)
             + math.sqrt(d) * clients / scale)
    if config["dp_mode"] == "distributed":
        sigma = math.sqrt(clients) * float(params["noise_std"]) / scale
        bound += sigma * (math.sqrt(d) + 10)
    return bound


def check_sum_norm(config: Mapping[str, Any], flat: np.ndarray, clients: int
                   ) -> dict[str, float]:
    """The norm guard on an unmasked, dequantized sum (before any server noise): raises
    SumAboveBound above ``sum_norm_bound``; returns the bound as a measurement (not the
    norm: in central DP mode that is a number of the sum before its noise).

    SecAgg+ hides each input, so the server cannot refuse one unclipped update as it does on
    the sealed path; a device that skips the SDK's clipping could otherwise move the sum by
    up to the ring's range. The guard caps the whole sum instead: within it one malicious
    device can still add any vector a with |honest sum + a| <= the bound (about |U3| C), far
    more than the C of an honest device. A per-device bound needs the device to prove its
    input's norm (e.g. zero-knowledge range proofs), which this protocol does not have."""
    norm = float(np.linalg.norm(flat))
    bound = sum_norm_bound(config, clients)
    if not norm <= bound:
        # The norm itself stays out of the reason: it is a statistic of the noiseless sum,
        # and a failed round releases nothing and enters no ledger.
        raise SumAboveBound(f"sum_norm_above_bound: the unmasked sum of {clients} inputs is "
                            f"longer than the {bound:.6g} that inputs clipped to "
                            f"{config['clip_norm']} can reach; some device did not clip. "
                            "Nothing was released")
    return {"sum_norm_bound": bound}


def aggregate_ring_sum(config: Mapping[str, Any], strategy: strategies.Strategy,
                       weights: Mapping[str, np.ndarray], ring_sum: np.ndarray, clients: int,
                       *, round_id: str, sampling_rate: float
                       ) -> tuple[strategies.RoundResult, LedgerEntry | None]:
    """The unmasked ring sum of ``clients`` inputs -> the strategy's new weights: dequantize,
    check its norm (before any noise), split it into tensors (sorted names, the order
    devices flatten in) and hand it to the strategy (central DP noise is added there). In
    distributed DP mode the devices' noise is already in the sum; the returned ledger entry
    then carries the effective noise multiplier of the survivors' noise (None otherwise:
    the caller accounts central noise). The server's aggregation and the fast simulator
    both run this."""
    scale = float(task_params(config)["scale"])
    flat = secagg.dequantize(ring_sum, scale)
    adaptive = strategies.AdaptiveClip.from_config(config)
    centred_below = 0.0
    if adaptive is not None:  # the last value: the sum of C (b_i - 1/2)
        clip = float(config["clip_norm"])
        bound = clients * clip / 2 + clients / scale
        if not abs(flat[-1]) <= bound:
            raise SumAboveBound(f"sum_norm_above_bound: the {clients} inputs' under-the-clip "
                                f"bits sum beyond the {bound:.6g} honest devices can reach; "
                                "some device sent something else. Nothing was released")
        centred_below, flat = float(flat[-1]) / clip, flat[:-1]
    guard = check_sum_norm(config, flat, clients)
    total, offset = {}, 0
    for name in sorted(config["expected_shapes"]):
        shape = tuple(config["expected_shapes"][name])
        size = math.prod(shape)
        total[name] = flat[offset : offset + size].reshape(shape)
        offset += size
    distributed = config["dp_mode"] == "distributed"
    result = strategy.aggregate_sum(dict(weights), total, clients, server_noise=not distributed)
    entry = None
    if distributed:
        entry = LedgerEntry(round_id, effective_noise_multiplier(config, clients),
                            float(sampling_rate), mode="distributed")
    result.measurements.update(guard)
    result.measurements["quantization_error_bound"] = clients / scale
    if adaptive is not None:  # after the update's noise: the same stream, in that order
        result.measurements.update(adaptive.next_clip(
            float(config["clip_norm"]), centred_below, int(config["target_clients"]),
            getattr(strategy, "rng", None) if config["noise_multiplier"] is not None
            else None))
    return result, entry


@functools.lru_cache(maxsize=8)
def _graph(participants: tuple[str, ...], degree: int, seed: str) -> dict[str, tuple[str, ...]]:
    return secagg.neighbour_graph(participants, degree, b64decode(seed))


def _is_base64(text: str) -> bool:
    """Whether ``text`` is standard base64 (what a device's share ciphertext is); anything
    else (a NUL byte, which PostgreSQL text cannot hold, or a lone surrogate included) would
    only be relayed to a device that cannot open it."""
    try:
        b64decode(text)
    except (ValueError, UnicodeEncodeError):
        return False
    return True


def _closed(row: Round, stage: str) -> ApiError:
    return ApiError("stage_closed", f"round {row.id} is at {row.state}, not {stage}; this "
                    "answer came too late (the device counts as dropped)", 409)


class SecAggStages:
    """SecAgg+ stage handling for ``RoundService`` (same database and blob store)."""

    def __init__(self, db: Database, blobs: BlobStore) -> None:
        self.db, self.blobs = db, blobs
        # (round id, state) -> the member sets frozen by the stages before it. Each poll and
        # answer needs them; reading every member for every request would make a round of n
        # devices cost O(n^2) on the server.
        self._frozen: dict[tuple[str, str], tuple[list[str], set[str], set[str]]] = {}
        self._frozen_lock = threading.Lock()

    # --- sets ----------------------------------------------------------------------------

    def _members(self, round_id: str) -> list[SecAggMember]:
        with self.db.session() as session:
            return list(session.scalars(select(SecAggMember)
                                        .where(SecAggMember.round_id == round_id)))

    @staticmethod
    def sets(members: list[SecAggMember]) -> tuple[list[str], set[str], set[str], set[str]]:
        """(sorted U1, U2, U3, U4) from the members' stage timestamps."""
        u1 = sorted(m.device_id for m in members)
        u2 = {m.device_id for m in members if m.shared_at is not None}
        u3 = {m.device_id for m in members if m.masked_at is not None}
        u4 = {m.device_id for m in members if m.unmasked_at is not None}
        return u1, u2, u3, u4

    def frozen_sets(self, row: Round) -> tuple[list[str], set[str], set[str]]:
        """(sorted U1, U2, U3) as far as the stages before ``row.state`` fixed them: U1 from
        share_keys on, U2 from masked_input on, U3 from unmasking on (a set not yet fixed
        comes back empty). An answer to a stage is only counted while the round is at that
        stage (one conditional UPDATE with it), so a set never changes after its stage."""
        key = (row.id, row.state)
        with self._frozen_lock:
            cached = self._frozen.get(key)
        if cached is not None:
            return cached
        with self.db.session() as session:
            rows = session.execute(
                select(SecAggMember.device_id, SecAggMember.shared_at.is_not(None),
                       SecAggMember.masked_at.is_not(None))
                .where(SecAggMember.round_id == row.id)).all()
        at = STAGES.index(row.state)
        u1 = sorted(r[0] for r in rows) if at >= 1 else []
        u2 = {r[0] for r in rows if r[1]} if at >= 2 else set()
        u3 = {r[0] for r in rows if r[2]} if at >= 3 else set()
        with self._frozen_lock:
            if len(self._frozen) >= 16:
                self._frozen.pop(next(iter(self._frozen)))
            self._frozen[key] = (u1, u2, u3)
        return u1, u2, u3

    @staticmethod
    def graph(row: Round, u1: list[str]) -> dict[str, tuple[str, ...]]:
        sa = row.secagg
        return _graph(tuple(u1), int(sa["degree"]), sa["graph_seed"])

    def _member(self, row: Round, device_id: str, stage: str) -> SecAggMember:
        if row.state != stage:
            raise _closed(row, stage)
        with self.db.session() as session:
            member = session.get(SecAggMember, (row.id, device_id))
        if member is None:
            raise ApiError("not_a_participant", f"this device did not advertise keys in "
                           f"round {row.id}", 403)
        return member

    def _count_answer(self, session: Any, row: Round, stage: str) -> None:
        counted = session.execute(
            update(Round).where(Round.id == row.id, Round.state == stage)
            .values(received_count=Round.received_count + 1)).rowcount
        if counted != 1:
            raise _closed(row, stage)

    def _record(self, row: Round, device_id: str, stage: str, answered: Any,
                rows: Iterable[Any] = (), **values: Any) -> None:
        """In one transaction: count the answer (refused once the stage closed), mark the
        member's stage column (refused if already set: each stage is answered once) and add
        ``rows``."""
        with self.db.transaction() as session:
            self._count_answer(session, row, stage)
            done = session.execute(
                update(SecAggMember).where(SecAggMember.round_id == row.id,
                                           SecAggMember.device_id == device_id,
                                           answered.is_(None)).values(**values)).rowcount
            if done != 1:
                raise ApiError("duplicate_answer", f"this device already answered {stage}", 409)
            session.add_all(rows)

    # --- device answers --------------------------------------------------------------------

    def answer(self, row: Round, device_id: str, stage: secagg.Stage, body: Any) -> None:
        """Record one device's answer to ``stage`` (refused once the stage closed)."""
        handler = {"collecting": self.advertise, "share_keys": self.post_shares,
                   "masked_input": self.post_masked, "unmasking": self.post_unmask}[stage.state]
        handler(row, device_id, body)

    def advertise(self, row: Round, device_id: str, advert: Any) -> None:
        if row.state != "collecting":
            raise _closed(row, "collecting")
        with self.db.session() as session:
            if session.get(Selection, (row.id, device_id)) is None:
                raise ApiError("not_selected", f"this device is not in round {row.id}", 403)
            if session.get(SecAggMember, (row.id, device_id)) is not None:
                raise ApiError("duplicate_answer", "this device already advertised keys", 409)
            identity = session.get(Device, device_id).public_key
        secagg.verify_advert(advert, row.id, device_id, identity)  # small-order keys too
        with self.db.transaction() as session:
            self._count_answer(session, row, "collecting")
            session.add(SecAggMember(round_id=row.id, device_id=device_id, advert=advert))

    def post_shares(self, row: Round, device_id: str, obj: Any) -> None:
        member = self._member(row, device_id, "share_keys")
        if member.shared_at is not None:
            raise ApiError("duplicate_answer", "this device already sent its shares", 409)
        u1, _, _ = self.frozen_sets(row)
        neighbours = set(self.graph(row, u1)[device_id])
        shares = obj.get("shares") if isinstance(obj, dict) else None
        if not isinstance(shares, dict) or set(shares) != neighbours or not all(
                isinstance(c, str) and 0 < len(c) <= MAX_CIPHERTEXT_CHARS and _is_base64(c)
                for c in shares.values()):
            raise ApiError("secagg_bad_message", f"shares must map each of this device's "
                           f"{len(neighbours)} neighbours to one ciphertext (base64, at most "
                           f"{MAX_CIPHERTEXT_CHARS} characters)", 400)
        self._record(row, device_id, "share_keys", SecAggMember.shared_at,
                     [SecAggShare(round_id=row.id, recipient=v, sender=device_id, ciphertext=c)
                      for v, c in shares.items()], shared_at=utcnow())

    def post_masked(self, row: Round, device_id: str, data: bytes) -> None:
        member = self._member(row, device_id, "masked_input")
        if member.shared_at is None:
            raise ApiError("not_a_participant", "this device sent no shares (not in U2)", 403)
        if member.masked_at is not None:
            raise ApiError("duplicate_answer", "this device already sent its masked input", 409)
        tensors, meta = decode_tensors(data)
        length = input_length(row.config)
        masked = tensors.get("masked")
        if set(tensors) != {"masked"} or masked.dtype != np.uint32 or masked.shape != (
                length,) or meta != {"round_id": row.id}:
            raise ApiError("secagg_bad_message", f"a masked input is one uint32 tensor "
                           f"'masked' of shape [{length}] with meta {{round_id: {row.id}}}",
                           400)
        digest = self.blobs.put(bytes(data))
        try:
            self._record(row, device_id, "masked_input", SecAggMember.masked_at,
                         masked_at=utcnow(), masked_sha256=digest)
        except ApiError:  # refused after all (a simultaneous answer won, the stage closed)
            with self.db.session() as session:
                if session.scalar(select(SecAggMember.device_id).where(
                        SecAggMember.masked_sha256 == digest)) is None:
                    self.blobs.delete(digest)
            raise

    def post_unmask(self, row: Round, device_id: str, obj: Any) -> None:
        member = self._member(row, device_id, "unmasking")
        if member.masked_at is None:
            raise ApiError("not_a_participant", "this device sent no masked input (not in U3)",
                           403)
        if member.unmasked_at is not None:
            raise ApiError("duplicate_answer", "this device already revealed its shares", 409)
        u1, u2, u3 = self.frozen_sets(row)
        neighbours = set(self.graph(row, u1)[device_id]) & u2
        secagg.parse_reveal(obj, neighbours & u3, neighbours - u3)
        self._record(row, device_id, "unmasking", SecAggMember.unmasked_at,
                     unmasked_at=utcnow(), reveal=obj)

    def poll(self, row: Round, device_id: str) -> dict[str, Any]:
        """What this device should do now: ``action`` (share_keys | masked_input | unmask)
        with its ``payload``, or nothing yet; ``dropped`` once it can no longer take part."""
        poll_s = float(row.config["secagg_poll_s"])
        view: dict[str, Any] = {"round_id": row.id, "stage": row.state, "action": None,
                                "dropped": False, "retry_after": poll_s}
        if row.state not in STAGES:
            view["dropped"] = row.state == "failed"
            return view
        with self.db.session() as session:
            mine = session.get(SecAggMember, (row.id, device_id))
        if row.state == "collecting" or mine is None:
            view["dropped"] = row.state != "collecting"
            return view
        u1, u2, u3 = self.frozen_sets(row)
        answered = {"share_keys": mine.shared_at, "masked_input": mine.masked_at,
                    "unmasking": mine.unmasked_at}[row.state]
        eligible = {"share_keys": True, "masked_input": device_id in u2,
                    "unmasking": device_id in u3}[row.state]
        if not eligible:
            view["dropped"] = True
            return view
        if answered is not None:
            return view
        view["action"] = secagg.STAGE_BY_STATE[row.state].action
        if row.state == "share_keys":
            neighbours = self.graph(row, u1)[device_id]
            with self.db.session() as session:
                keys = dict(session.execute(select(Device.id, Device.public_key).where(
                    Device.id.in_([*neighbours, device_id]))).all())
                adverts = dict(session.execute(
                    select(SecAggMember.device_id, SecAggMember.advert).where(
                        SecAggMember.round_id == row.id,
                        SecAggMember.device_id.in_([*neighbours, device_id]))).all())
            view["payload"] = {
                "participants": u1, "degree": row.secagg["degree"],
                "threshold": row.secagg["threshold"], "graph_seed": row.secagg["graph_seed"],
                "adverts": {v: {"identity": b64(keys[v]), "advert": adverts[v]}
                            for v in (*neighbours, device_id)}}
        elif row.state == "masked_input":
            with self.db.session() as session:
                shares = dict(session.execute(
                    select(SecAggShare.sender, SecAggShare.ciphertext).where(
                        SecAggShare.round_id == row.id, SecAggShare.recipient == device_id)
                ).all())
            view["payload"] = {"u2": sorted(u2),
                               "shares": {s: c for s, c in shares.items() if s in u2}}
        else:
            view["payload"] = {"u3": sorted(u3)}
        return view

    # --- transitions -------------------------------------------------------------------------

    def ready(self, row: Round, now: datetime) -> bool:
        """Whether the current stage may close now."""
        if row.state == "collecting":
            return selection.collecting_done(row, now)
        return (row.received_count >= int(row.secagg["expected"])
                or now >= as_utc(row.stage_deadline))

    def close_stage(self, row: Round, now: datetime) -> str | None:
        """Move ``row`` from its stage to the next one (not from unmasking: aggregation does
        that). Returns a failure reason when the round can no longer finish, else None."""
        config = row.config
        minimum = int(config["min_clients"])
        members = self._members(row.id)
        u1, u2, u3, _ = self.sets(members)
        sa = dict(row.secagg or {})
        if row.state == "collecting":
            n = len(u1)
            if n < minimum:
                return f"{n} device(s) advertised keys, min_clients is {minimum}"
            most = int(config.get("max_clients") or config["target_clients"])
            if n > most:  # the ring is sized for max_clients: a larger sum could wrap
                return f"{n} device(s) advertised keys, max_clients is {most}"
            degree = min(int(config["secagg_degree"] or secagg.default_degree(n)), n - 1)
            threshold = int(config["secagg_threshold"] or secagg.default_threshold(degree))
            try:
                secagg.check_graph(n, degree, threshold)
            except secagg.SecAggError as exc:
                return f"unsafe SecAgg+ parameters for {n} participants: {exc.message}"
            sa = {"n": n, "degree": degree, "threshold": threshold,
                  "graph_seed": b64(os.urandom(secagg.SEED_BYTES)), "expected": n,
                  "risks": secagg.risks(n, degree, threshold)}
        else:
            current = u2 if row.state == "share_keys" else u3
            if len(current) < minimum:
                which = "sent shares" if row.state == "share_keys" else "sent masked inputs"
                return f"{len(current)} device(s) {which}, min_clients is {minimum}"
            graph, t = self.graph(row, u1), int(sa["threshold"])
            short = sorted(u for u in u2 if len(set(graph[u]) & current) < t)
            if short:
                return (f"{len(short)} device(s) would keep fewer than threshold {t} share "
                        "holders; nothing was unmasked")
            sa["expected"] = len(current)
        with self.db.transaction() as session:
            session.execute(
                update(Round).where(Round.id == row.id, Round.state == row.state,
                                    Round.received_count == row.received_count)
                .values(state=secagg.next_stage(secagg.STAGE_BY_STATE[row.state]).state,
                        received_count=0, secagg=sa,
                        stage_deadline=now + timedelta(
                            seconds=float(config["secagg_stage_timeout_s"]))))
        return None

    # --- the sum -------------------------------------------------------------------------------

    def unmasked_sum(self, row: Round) -> tuple[np.ndarray, int, dict[str, float]]:
        """The ring sum of U3's quantized inputs, unmasked; (sum uint32, |U3|, measurements).
        Raises SecAggError("secagg_unrecoverable") when some secret cannot be rebuilt."""
        members = self._members(row.id)
        u1, u2, u3, u4 = self.sets(members)
        by_id = {m.device_id: m for m in members}
        length = input_length(row.config)
        masked_sum = np.zeros(length, dtype=np.uint32)
        for u in sorted(u3):
            tensors, _ = decode_tensors(self.blobs.get(by_id[u].masked_sha256))
            np.add(masked_sum, tensors["masked"], out=masked_sum)
        graph = self.graph(row, u1)
        adverts = {u: {k: b64decode(by_id[u].advert[k]) for k in ("c_pk", "b_commit")}
                   for u in u2}
        reveals = {}
        for r in u4:
            neighbours = set(graph[r]) & u2
            reveals[r] = secagg.parse_reveal(by_id[r].reveal, neighbours & u3, neighbours - u3)
        total = secagg.unmask_sum(round_id=row.id, masked_sum=masked_sum, graph=graph,
                                  adverts=adverts, u2=u2, u3=u3, reveals=reveals,
                                  threshold=int(row.secagg["threshold"]))
        measurements = {"secagg_advertised": float(len(u1)), "secagg_shared": float(len(u2)),
                        "secagg_masked": float(len(u3)), "secagg_unmasked": float(len(u4)),
                        "secagg_degree": float(row.secagg["degree"]),
                        "secagg_threshold": float(row.secagg["threshold"])}
        return total, len(u3), measurements

    def counts(self, round_id: str) -> dict[str, int]:
        _, u2, u3, u4 = self.sets(members := self._members(round_id))
        return {"advertised": len(members), "shared": len(u2), "masked": len(u3),
                "unmasked": len(u4)}

    def forget(self, round_id: str) -> None:
        """Drop what only mattered during the round: masked inputs, relayed and revealed
        shares (the member rows stay, as the record of who took part in which stage)."""
        with self._frozen_lock:
            for key in [k for k in self._frozen if k[0] == round_id]:
                del self._frozen[key]
        # The shares go in batches of recipients, one short transaction each: a round of n
        # devices relayed n·k shares (1.7 M rows at 10,000 devices), and one DELETE of them
        # all held SQLite's write lock for tens of seconds while devices waited.
        with self.db.session() as session:
            recipients = session.scalars(select(SecAggShare.recipient.distinct()).where(
                SecAggShare.round_id == round_id)).all()
        for start in range(0, len(recipients), FORGET_BATCH):
            with self.db.transaction() as session:
                session.execute(delete(SecAggShare).where(
                    SecAggShare.round_id == round_id,
                    SecAggShare.recipient.in_(recipients[start:start + FORGET_BATCH])))
        with self.db.transaction() as session:
            digests = session.scalars(select(SecAggMember.masked_sha256).where(
                SecAggMember.round_id == round_id,
                SecAggMember.masked_sha256.is_not(None))).all()
            session.execute(delete(SecAggShare).where(SecAggShare.round_id == round_id))
            session.execute(update(SecAggMember).where(SecAggMember.round_id == round_id)
                            .values(reveal=None, masked_sha256=None))
        for digest in digests:
            self.blobs.delete(digest)
