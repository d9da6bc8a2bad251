"""Local training on the device's own log with the architecture's numpy twin.

Examples are built the way the central trainer builds them (same windows, same collapsing
of consecutive repeats), from the positive events only (a dismiss is not an interest). A few
epochs of minibatch SGD start from the bundle's float weights; the result is the weight delta,
L2-clipped *as one vector* to the round's clip norm. Bounding each device's whole contribution
is what makes the server's noise give user-level (device-level) differential privacy.

FedProx (Li et al. 2020): with ``proximal_mu`` > 0 the local objective gains
``mu / 2 * ||w - w_base||^2``, which keeps devices with skewed logs from drifting far."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

import model_zoo
from device_sdk.bundle import Bundle
from device_sdk.model_update import ModelUpdate
from device_sdk.protocol import TrainingParams, l2_norm
from device_sdk.recommender import NEGATIVE_KINDS, HistoryPolicy
from device_sdk.sessions import session_targets, session_tokens

if TYPE_CHECKING:
    from device_sdk.event_log import Event


def next_item_windows(seq: np.ndarray, max_len: int) -> np.ndarray:
    """Histories for predicting each of seq[1:]: row t holds seq[:t+1]'s last max_len ids,
    left-padded with 0 -> int32 [len(seq) - 1, max_len]."""
    padded = np.concatenate([np.zeros(max_len, dtype=np.int32), seq[:-1].astype(np.int32)])
    view = np.lib.stride_tricks.sliding_window_view(padded, max_len)
    return np.ascontiguousarray(view[1:])


def round_seed(key: str, round_id: str) -> int:
    """The seed of a device's local training in a round (its shuffle): from its device id,
    or a simulator's seed and user, and the round id."""
    return int.from_bytes(hashlib.sha256(f"{key}/{round_id}".encode()).digest()[:8])


@dataclass(frozen=True, kw_only=True)
class LocalTrainingConfig(TrainingParams):
    """One round's local training: the fields and defaults of ``TrainingParams`` (the
    training half of a ``RoundTask``), checked on construction."""

    def __post_init__(self) -> None:
        for name in ("local_epochs", "batch_size", "max_examples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("learning_rate", "clip_norm"):
            if not np.isfinite(getattr(self, name)) or getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a positive number, got {getattr(self, name)}")
        if not np.isfinite(self.proximal_mu) or self.proximal_mu < 0:
            raise ValueError(f"proximal_mu must be >= 0, got {self.proximal_mu}")

    @classmethod
    def from_task(cls, task: TrainingParams) -> LocalTrainingConfig:
        params = task.training_params()
        params["trainable"] = tuple(task.trainable) if task.trainable else None
        return cls(**params)


class LocalTrainer:
    """Trains the bundle's architecture on one device's events. Deterministic: the same
    bundle, events, config and seed give bit-identical deltas."""

    def __init__(self, bundle: Bundle, policy: HistoryPolicy | None = None) -> None:
        self.bundle = bundle
        self.policy = policy or HistoryPolicy.from_manifest(bundle.manifest)
        self.arch = model_zoo.get(bundle.architecture)
        self.config = self.arch.config_from_dict(bundle.config)
        self.base = bundle.weights()
        self.vocab = bundle.items()

    def examples(self, events: Iterable[Event], max_examples: int) -> tuple[np.ndarray, np.ndarray]:
        """Events, oldest first -> (histories int32 [N, L], targets int32 [N]), the most
        recent ``max_examples`` next-item examples."""
        seq: list[int] = []
        stamps: list[float] = []
        for event in events:
            if event.kind in NEGATIVE_KINDS or self.policy.weight(event.kind) <= 0:
                continue
            item = self.vocab.id_of(event.item)
            if item and (not seq or seq[-1] != item):
                seq.append(item)
                stamps.append(event.ts)
        ids = np.asarray(seq, dtype=np.int32)
        empty = np.zeros((0, self.config.max_len), dtype=np.int32), np.zeros(0, dtype=np.int32)
        if len(ids) < 2:
            return empty
        separator = getattr(self.config, "session_id", 0)
        if not separator:
            histories = next_item_windows(ids, self.config.max_len)
            return histories[-max_examples:], ids[1:][-max_examples:]
        # As central training: separators between sessions, no example whose target is one.
        tokens = session_tokens(ids, np.asarray(stamps), separator, self.config.session_gap)
        targets = session_targets(tokens, separator)
        keep = targets > 0
        if not keep.any():
            return empty
        histories = next_item_windows(tokens, self.config.max_len)[keep]
        return histories[-max_examples:], targets[keep][-max_examples:]

    def evaluate_loss(
        self, params: dict[str, np.ndarray], histories: np.ndarray, targets: np.ndarray
    ) -> float:
        model = self.arch.numpy_model(self.config, params)
        return model.loss_and_grads(histories, targets, names=())[0]

    def train(
        self,
        events: Iterable[Event],
        config: LocalTrainingConfig,
        *,
        base_version: int,
        seed: int = 0,
    ) -> ModelUpdate:
        """Run ``config.local_epochs`` of SGD and return the clipped delta. With fewer than
        two usable events there is nothing to learn: the delta is zero, num_examples 0."""
        histories, targets = self.examples(events, config.max_examples)
        names = self._trainable(config)
        params = {k: v.copy() for k, v in self.base.items()}
        model = self.arch.numpy_model(self.config, params)
        rng = np.random.default_rng(seed)
        losses = []
        for _ in range(config.local_epochs if len(targets) else 0):
            order = rng.permutation(len(targets))
            for start in range(0, len(order), config.batch_size):
                batch = order[start : start + config.batch_size]
                loss, grads = model.loss_and_grads(histories[batch], targets[batch], names)
                losses.append(loss)
                for name in names:
                    grad = grads[name]
                    if config.proximal_mu:
                        grad = grad + config.proximal_mu * (model.params[name] - self.base[name])
                    model.params[name] -= config.learning_rate * grad
        delta = {n: (model.params[n] - self.base[n]).astype(np.float32) for n in names}
        norm = l2_norm(delta)
        scale = min(1.0, config.clip_norm / norm) if norm > 0 else 1.0
        if scale < 1.0:
            delta = {n: (d * np.float32(scale)).astype(np.float32) for n, d in delta.items()}
        stats = {"first_batch_loss": losses[0], "last_batch_loss": losses[-1]} if losses else {}
        return ModelUpdate(
            base_version=base_version,
            delta=delta,
            num_examples=int(len(targets)),
            clip_norm=config.clip_norm,
            norm=norm * scale,
            norm_before_clip=norm,
            stats=stats,
        )

    def _trainable(self, config: LocalTrainingConfig) -> list[str]:
        names = sorted(self.base)
        if config.trainable is None:
            return names
        unknown = sorted(set(config.trainable) - set(names))
        if unknown:
            raise ValueError(f"trainable names {unknown} are not parameters of this model")
        return sorted(config.trainable)
