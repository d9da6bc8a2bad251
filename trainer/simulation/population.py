"""A data set as a fleet: public users for central pretraining, the rest as virtual devices.

Every user is one device (the privacy unit). A small, seeded share of users is the *public
slice* (users who opted in to central collection): the starting model is trained on it
alone. Every other user is a device that replays its own events, in time order, into its
own SQLite EventLog while the simulation runs:

- held-out data: the same split ``pocketrec evaluate`` uses (the last line, or the whole
  last basket for basket data). A device never logs its held-out events, so the offline
  metrics of every published model are measured on data no device trained on;
- the clock: the simulation starts when ``warmup`` of the devices' replayed events have
  happened (the app was installed a while ago) and each round moves "now" forward by an
  equal share of the rest, so logs grow between rounds as they would on phones;
- the catalogue (item vocabulary) is the shop's, not personal data: it covers every item.

The central reference model is trained on every user's training portion (the non-private
upper bound the federated models are compared with)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import numpy as np
import pandas as pd

from device_sdk.item_vocab import ItemVocab
from trainer.data.dataset import DataSpec, holdout_split, set_popular
from trainer.data.split import BasketSet, EvalSet, LeaveLastOut, with_sessions
from trainer.simulation.devices import DeviceStream


@dataclass
class Population:
    name: str
    vocab: ItemVocab
    public_users: list[str]
    devices: dict[str, DeviceStream]
    clock: np.ndarray  # "now" at the start of round r (index r - 1); rounds = len(clock)
    pretrain: LeaveLastOut  # the public slice only
    central: LeaveLastOut  # every user's training portion (the non-private reference)
    test: EvalSet  # devices' held-out events (line protocol)
    basket: BasketSet | None  # devices' held-out baskets, for basket data
    stats: dict = field(default_factory=dict)

    def with_sessions(self, gap: int) -> Population:
        """The fleet as a model trained with session separators sees it: the vocabulary
        with the separator as its last id, and the held-out rows' histories with
        separators (placed once here, not at every evaluation). The devices' streams and
        the pretraining and central splits stay as they are: training places separators
        itself, and so do devices (``LocalTrainer``, ``Recommender``)."""
        vocab = self.vocab.with_session()
        separator = vocab.session_id
        return replace(self, vocab=vocab, test=with_sessions(self.test, separator, gap),
                       basket=None if self.basket is None else
                       with_sessions(self.basket, separator, gap),
                       stats={**self.stats, "session_gap": gap})

    def with_clock(self, rounds: int) -> Population:
        """The same fleet with its clock spread over ``rounds`` rounds instead (a run whose
        recipe paces the devices' events differently from the fleet's other runs: the
        demo's two runs on Online Retail). The same clock ``build_population`` would set."""
        if len(self.clock) == rounds:
            return self
        times = np.sort(np.concatenate([d.times for d in self.devices.values()]))
        clock = round_clock(times, self.stats["warmup"], rounds)
        return replace(self, clock=clock, stats={
            **self.stats, "clock_start": pd.Timestamp(int(clock[0]), unit="s").isoformat()})

    @property
    def ranked_items(self) -> int:
        """The id range models rank, padding included (the separator is never ranked)."""
        return len(self.vocab) - (1 if self.vocab.session_id else 0)


def _rows(data, keep: set[str]):
    """An ``EvalSet`` or ``BasketSet`` cut to the users in ``keep``, every per-row field
    (history, targets, step and request times) with them."""
    if data is None:
        return None
    rows = [i for i, u in enumerate(data.users) if u in keep]

    def cut(value):  # a list (users, baskets) or an array with a row per user
        return [value[i] for i in rows] if isinstance(value, list) else value[rows]

    return replace(data, **{f.name: cut(getattr(data, f.name)) for f in fields(data)
                            if getattr(data, f.name) is not None})


def _restrict(split: LeaveLastOut, keep: set[str]) -> LeaveLastOut:
    times = split.train_times
    return LeaveLastOut(
        train={u: s for u, s in split.train.items() if u in keep},
        valid=_rows(split.valid, keep), test=_rows(split.test, keep),
        basket=_rows(split.basket, keep), holdout=split.holdout,
        train_times=None if times is None else {u: t for u, t in times.items() if u in keep},
        basket_valid=_rows(split.basket_valid, keep))


def round_clock(times: np.ndarray, warmup: float, rounds: int) -> np.ndarray:
    """The time ("now") at the start of each of ``rounds`` rounds: after ``warmup`` of the
    devices' events (``times``, sorted), then an equal share of the rest a round."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    clock = np.quantile(times, warmup + (1 - warmup) * np.arange(rounds) / rounds)
    return np.floor(clock).astype(np.int64)


def build_population(
    spec: DataSpec, max_len: int, *, rounds: int, public_fraction: float = 0.1,
    warmup: float = 0.5, seed: int = 0,
) -> Population:
    """Split ``spec``'s users into a public slice and devices and set the round clock."""
    if not 0 < public_fraction < 1:
        raise ValueError(f"public_fraction must be in (0, 1), got {public_fraction}")
    if not 0 <= warmup < 1:
        raise ValueError(f"warmup must be in [0, 1), got {warmup}")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    df = spec.load()
    vocab = ItemVocab.from_items(df["item"])
    # A device replays everything before its held-out events.
    split, cut = holdout_split(df, vocab, spec.holdout, max_len)
    users = sorted(df["user"].unique())
    held = set(split.test.users)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(users))
    n_public = max(1, int(round(public_fraction * len(users))))
    public = sorted(users[i] for i in order[:n_public])
    device_users = {users[i] for i in order[n_public:]}
    if len(device_users) < 3:
        raise ValueError(f"{len(users)} users leave {len(device_users)} devices; a "
                         "federated simulation needs at least 3")

    devices: dict[str, DeviceStream] = {}
    rows = df[df["user"].isin(device_users)]
    limit = rows["user"].map(lambda u: cut[u] if u in held else np.iinfo(np.int64).max)
    rows = rows[rows["timestamp"] < limit]
    for user, part in rows.groupby("user", sort=True):
        devices[user] = DeviceStream(user, part["item"].tolist(), part["event"].tolist(),
                                     part["timestamp"].to_numpy(np.int64))
    times = np.sort(np.concatenate([d.times for d in devices.values()]))
    clock = round_clock(times, warmup, rounds)

    pretrain = _restrict(split, set(public))
    set_popular(vocab, pretrain)  # what the starting model's bundle falls back to
    test = _rows(split.test, device_users)
    stats = {
        "events": int(len(df)), "users": len(users), "items": len(vocab) - 1,
        "public_users": len(public), "devices": len(devices),
        "device_events": int(len(times)), "held_out_devices": len(test),
        "holdout": split.holdout, "warmup": warmup,
        "clock_start": pd.Timestamp(int(clock[0]), unit="s").isoformat(),
        "clock_end": pd.Timestamp(int(times[-1]), unit="s").isoformat(),
    }
    return Population(spec.name, vocab, public, devices, clock, pretrain, split, test,
                      _rows(split.basket, device_users), stats)
