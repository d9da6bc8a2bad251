"""Central training of a zoo model: Adam on next-item softmax, early stopping on validation
HR@10, optional DP-SGD through Opacus (ghost clipping, RDP accountant)."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from sync_server.privacy import default_delta
from trainer.data.split import EvalSet, LeaveLastOut, with_sessions
from trainer.metrics import ranking_metrics


@dataclass
class DPConfig:
    """DP-SGD settings. Give ``noise_multiplier`` or ``target_epsilon`` (then the noise is
    calibrated for ``epochs``). The privacy unit is one training example (one next-item
    prediction), or for a sequence model one chunk of up to L consecutive steps of one user;
    user-level privacy comes from federated rounds with per-device clipping."""

    max_grad_norm: float = 1.0
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    delta: float | None = None

    def __post_init__(self) -> None:
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError("DP needs exactly one of noise_multiplier or target_epsilon")


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 512
    lr: float = 3e-3
    weight_decay: float = 0.0
    patience: int = 3
    loss: str = "full"  # "full" softmax, or "sampled" with uniform shared negatives
    negatives: int = 1000
    eval_users: int = 3000
    seed: int = 0
    dp: DPConfig | None = None
    # Weight of the basket objective for models with session separators (``_session_loss``);
    # off by default: on Online Retail it cost the line protocol and gained nothing on baskets.
    basket_weight: float = 0.0

    def __post_init__(self) -> None:
        if self.loss not in ("full", "sampled"):
            raise ValueError(f"loss must be 'full' or 'sampled', got {self.loss!r}")
        if self.dp is not None and self.loss != "full":
            raise ValueError("DP-SGD supports the full softmax only (per-sample gradients)")
        if not self.basket_weight >= 0:
            raise ValueError(f"basket_weight must be >= 0, got {self.basket_weight}")


def init_module(arch, config, seed: int) -> nn.Module:
    """``arch``'s torch module for ``config`` with its initial weights drawn from ``seed``
    (torch's global generator is seeded first: an unseeded init made the same command give
    a different model on every run)."""
    torch.manual_seed(seed)
    return arch.torch_module(config)


@dataclass
class TrainResult:
    params: dict[str, np.ndarray]
    epochs_run: int
    best_epoch: int
    history: list[dict] = field(default_factory=list)
    privacy: dict | None = None
    seconds: float = 0.0


@torch.no_grad()
def torch_topk(module: nn.Module, history: np.ndarray, k: int, batch: int = 1024) -> np.ndarray:
    """Full-ranking top-k ids of a logits module for many histories -> [U, k] int32."""
    module.eval()
    out = []
    for start in range(0, len(history), batch):
        logits = module(torch.from_numpy(history[start : start + batch]).long())
        out.append(torch.topk(logits, k).indices.to(torch.int32).numpy())
    return np.concatenate(out) if out else np.zeros((0, k), dtype=np.int32)


def evaluate_module(module: nn.Module, data: EvalSet, n_items: int, k: int = 10) -> dict:
    return ranking_metrics(torch_topk(module, data.history, max(k, 50)), data.target, n_items, k)


def predicts_every_position(module: nn.Module) -> bool:
    """Sequence models (``sequence_states`` / ``sequence_logits``) train on whole chunks:
    one forward gives a prediction at every position."""
    return hasattr(module, "sequence_logits")


def _sampled_loss(
    module: nn.Module, x: torch.Tensor, y: torch.Tensor, negatives: int, n_items: int
) -> torch.Tensor:
    """Softmax over the batch's targets plus shared uniform negatives (uniform sampling
    needs no logQ correction: every candidate has the same proposal probability)."""
    if predicts_every_position(module):
        real = y > 0
        u, y = module.sequence_states(x)[real], y[real]
    else:
        u = module.user_vectors(x)
    neg = torch.randint(1, n_items, (negatives,))
    cand, inverse = torch.unique(torch.cat([y, neg]), return_inverse=True)
    logits = u @ module.out.weight[cand].T + module.out.bias[cand]
    return nn.functional.cross_entropy(logits, inverse[: len(y)])


def _full_loss(
    module: nn.Module, trained: nn.Module, criterion, x: torch.Tensor, y: torch.Tensor,
    private: bool,
) -> torch.Tensor:
    """Full-softmax cross-entropy; for a sequence model over every position with a target
    (target 0 = padding is ignored). Under DP-SGD one chunk is one sample: Opacus' ghost
    clipping takes the [B, L, N] shape to clip per chunk, not per position."""
    if not predicts_every_position(module):
        return criterion(trained(x), y)
    logits = module.sequence_logits(x)
    extra = {"shape": logits.shape} if private else {}
    return criterion(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), **extra)


def _session_loss(module: nn.Module, x: torch.Tensor, y: torch.Tensor, anchor: torch.Tensor,
                  basket_weight: float) -> torch.Tensor:
    """Next-item cross-entropy at every position with a target, plus ``basket_weight`` x the
    basket objective: each item of a session scored from the separator that opened it (the
    mean over those items of -log p(item | history up to the separator)), so a new visit's
    prediction is fitted to the whole basket, not only its first line."""
    logp = torch.log_softmax(module.sequence_logits(x), dim=-1)  # [B, L, N]
    real = y > 0
    line = -logp.gather(-1, y.unsqueeze(-1)).squeeze(-1)[real].mean()
    has = anchor >= 0
    if not basket_weight or not has.any():
        return line
    rows = torch.arange(len(y)).unsqueeze(1).expand_as(y)
    basket = -logp[rows[has], anchor[has], y[has]].mean()
    return line + basket_weight * basket


def session_of(config) -> tuple[int, int]:
    """(separator id, gap in seconds) of a model trained with session separators, (0, 0)
    for any other."""
    return getattr(config, "session_id", 0), getattr(config, "session_gap", 0)


def model_rows(rows, config):
    """Evaluation rows as ``config``'s model sees them: with session separators when it was
    trained with them, as they are otherwise."""
    separator, gap = session_of(config)
    return with_sessions(rows, separator, gap) if separator else rows


def train(
    module: nn.Module,
    split: LeaveLastOut,
    cfg: TrainConfig,
    *,
    progress: bool = True,
) -> TrainResult:
    """Train ``module`` (a zoo torch module with ``.config``) in place; keep the best epoch."""
    if cfg.dp is not None and not getattr(module, "central_dp", True):
        raise ValueError(f"central DP-SGD does not support {type(module).__name__}; train "
                         "--model sasrec or dual_encoder with --dp (federated rounds give "
                         "user-level DP to every model)")
    torch.manual_seed(cfg.seed)
    started = time.perf_counter()
    n_items, max_len = module.config.n_items, module.config.max_len
    separator, gap = session_of(module.config)
    tensors = []
    if separator:
        if cfg.dp is not None or cfg.loss != "full":
            raise ValueError("session separators train with the full softmax, without "
                             "central DP-SGD (pocketrec train --session-gap 0 turns them off)")
        history, target, anchor = split.train_session_sequences(max_len, separator, gap)
        if cfg.basket_weight:  # without the basket objective, the plain full softmax
            tensors = [torch.from_numpy(anchor)]
    elif predicts_every_position(module):
        history, target = split.train_sequences(max_len)
    else:
        history, target = split.train_examples(max_len)
    valid = model_rows(split.valid.subset(cfg.eval_users, seed=cfg.seed), module.config)
    dataset = torch.utils.data.TensorDataset(
        torch.from_numpy(history).long(), torch.from_numpy(target).long(), *tensors
    )
    generator = torch.Generator().manual_seed(cfg.seed)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=cfg.batch_size, shuffle=True, generator=generator
    )
    optimizer = torch.optim.Adam(param_groups(module, cfg.lr), lr=cfg.lr,
                                 weight_decay=cfg.weight_decay)
    criterion = nn.CrossEntropyLoss(ignore_index=0)  # 0 = padding, never a real target
    trained, engine, delta = module, None, None
    if cfg.dp is not None:
        trained, optimizer, criterion, loader, engine, delta = _make_private(
            module, optimizer, criterion, loader, cfg, len(dataset)
        )

    def snapshot() -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in module.state_dict().items()}

    best = (-1.0, 0, snapshot())
    result = TrainResult(params={}, epochs_run=0, best_epoch=0)
    for epoch in range(1, cfg.epochs + 1):
        trained.train()
        losses = []
        bar = tqdm(loader, desc=f"epoch {epoch}/{cfg.epochs}", leave=False, disable=not progress)
        for x, y, *anchor in bar:
            if len(y) == 0:  # Poisson sampling can draw an empty batch
                continue
            optimizer.zero_grad()
            if anchor:
                loss = _session_loss(module, x, y, anchor[0], cfg.basket_weight)
            elif cfg.loss == "sampled":
                loss = _sampled_loss(module, x, y, cfg.negatives, n_items)
            else:
                loss = _full_loss(module, trained, criterion, x, y, engine is not None)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}")
        metrics = evaluate_module(module, valid, n_items)
        row = {"epoch": epoch, "loss": float(np.mean(losses)), **metrics}
        if engine is not None:
            row["epsilon"] = engine.get_epsilon(delta)
        result.history.append(row)
        if progress:
            shown = ", ".join(f"{k}={v:.4f}" for k, v in row.items() if k != "epoch")
            tqdm.write(f"epoch {epoch}: {shown}")
        if metrics["hr@10"] > best[0]:
            best = (metrics["hr@10"], epoch, snapshot())
        elif epoch - best[1] >= cfg.patience:
            break
    result.epochs_run = epoch
    result.best_epoch = best[1]
    module.load_state_dict(best[2])
    result.params = {k: v.numpy().copy() for k, v in best[2].items()}
    if engine is not None:
        # Spent budget counts every step taken, not just those up to the best epoch.
        result.privacy = {
            "epsilon": engine.get_epsilon(delta),
            "delta": delta,
            "unit": "sequence chunk" if predicts_every_position(module) else "example",
            "accountant": "rdp",
            "noise_multiplier": optimizer.noise_multiplier,
            "max_grad_norm": cfg.dp.max_grad_norm,
            # Opacus' Poisson loader samples at 1 / batches-per-epoch, not batch / n.
            "sample_rate": engine.accountant.history[-1][1],
            "steps": sum(steps for _, _, steps in engine.accountant.history),
            "config": asdict(cfg.dp),
        }
    result.seconds = time.perf_counter() - started
    return result


def param_groups(module: nn.Module, lr: float) -> list[dict]:
    """Adam parameter groups: a module's ``lr_multipliers`` ({name prefix: factor}) give some
    tensors a larger step (a few scalars per item or per age that must move by several logits
    in the few hundred steps a small data set affords); the rest train at ``lr``."""
    multipliers = getattr(module, "lr_multipliers", {})
    groups: dict[float, list[nn.Parameter]] = {}
    for name, param in module.named_parameters():
        factor = next((f for prefix, f in multipliers.items() if name.startswith(prefix)), 1.0)
        groups.setdefault(factor, []).append(param)
    return [{"params": params, "lr": lr * factor} for factor, params in groups.items()]


def _make_private(module, optimizer, criterion, loader, cfg: TrainConfig, n_examples: int):
    from opacus import PrivacyEngine
    from opacus.grad_sample.utils import register_norm_sampler

    # Layers that know their exact per-sample gradient norms tell Opacus so (ghost clipping).
    for layer in module.modules():
        if hasattr(layer, "per_sample_grad_norms"):
            register_norm_sampler(type(layer))(type(layer).per_sample_grad_norms)
    dp = cfg.dp
    delta = dp.delta if dp.delta is not None else default_delta(n_examples)
    engine = PrivacyEngine(accountant="rdp")
    common = dict(
        module=module,
        optimizer=optimizer,
        criterion=criterion,
        data_loader=loader,
        max_grad_norm=dp.max_grad_norm,
        grad_sample_mode="ghost",
        poisson_sampling=True,
    )
    if dp.target_epsilon is not None:
        wrapped, optimizer, criterion, loader = engine.make_private_with_epsilon(
            target_epsilon=dp.target_epsilon, target_delta=delta, epochs=cfg.epochs, **common
        )
    else:
        wrapped, optimizer, criterion, loader = engine.make_private(
            noise_multiplier=dp.noise_multiplier, **common
        )
    return wrapped, optimizer, criterion, loader, engine, delta
