"""DP-SGD step time with Opacus ghost clipping: the dual encoder's PooledEmbedding (closed-form
per-sample norms) vs the same model on nn.Embedding (Opacus' generic embedding norm sampler),
side by side in one run, Online Retail shapes (3,660 items, L=50).

    python bench/dp_step.py [--batch 1024] [--steps 15]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from opacus import PrivacyEngine
from opacus.grad_sample.utils import register_norm_sampler
from torch import nn

import model_zoo
from model_zoo.dual_encoder.torch_module import DualEncoder, PooledEmbedding


class LookupThenMean(nn.Module):
    """The same math as PooledEmbedding, through nn.Embedding (Opacus' generic path)."""

    def __init__(self, n_items: int, dim: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(n_items, dim, padding_idx=0)

    def forward(self, history: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        return (attn.unsqueeze(-1) * self.emb(history)).sum(dim=1)


def step_seconds(module: nn.Module, batch: int, steps: int, max_len: int, n_items: int) -> list:
    x = torch.randint(0, n_items, (batch * steps, max_len))
    y = torch.randint(1, n_items, (batch * steps,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch)
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-3)
    model, optimizer, criterion, loader = PrivacyEngine().make_private(
        module=module, optimizer=optimizer, criterion=nn.CrossEntropyLoss(), data_loader=loader,
        noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode="ghost")
    times = []
    for xb, yb in loader:
        started = time.perf_counter()
        optimizer.zero_grad()
        criterion(model(xb), yb).backward()
        optimizer.step()
        times.append(time.perf_counter() - started)
    return times[1:]  # the first step pays one-off allocation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=15)
    args = parser.parse_args()
    register_norm_sampler(PooledEmbedding)(PooledEmbedding.per_sample_grad_norms)
    config = model_zoo.get("dual_encoder").config(n_items=3660, dim=64, hidden=128, max_len=50)
    results = {}
    for name in ("PooledEmbedding (closed form)", "nn.Embedding (Opacus generic)"):
        torch.manual_seed(0)
        module = DualEncoder(config)
        if name.startswith("nn."):
            module.item_emb = LookupThenMean(config.n_items, config.dim)
        results[name] = np.median(step_seconds(module, args.batch, args.steps, 50, 3660))
    base = results["PooledEmbedding (closed form)"]
    print(f"batch {args.batch}, {args.steps} Poisson steps, torch threads "
          f"{torch.get_num_threads()}\n")
    print("| per-sample norms | median s/step | vs closed form |\n|---|---:|---:|")
    for name, sec in results.items():
        print(f"| {name} | {sec:.3f} | {sec / base:.1f}x |")


if __name__ == "__main__":
    main()
