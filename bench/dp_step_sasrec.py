"""SASRec DP-SGD step cost: one Adam step without DP vs one Opacus ghost-clipping DP-SGD step
(one 50-step chunk = one sample, clipped per chunk), side by side in one run, Online Retail
shapes (3,660 ids, dim 64, 2 blocks, L=50).

    python bench/dp_step_sasrec.py [--batch 128] [--steps 10]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from opacus import PrivacyEngine
from torch import nn

import model_zoo


def step_seconds(private: bool, batch: int, steps: int) -> list[float]:
    arch = model_zoo.get("sasrec")
    config = arch.config(n_items=3660)
    torch.manual_seed(0)
    module = arch.torch_module(config)
    x = torch.randint(1, config.n_items, (batch * steps, config.max_len))
    y = torch.randint(1, config.n_items, (batch * steps, config.max_len))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch)
    optimizer = torch.optim.Adam(module.parameters(), lr=3e-3)
    criterion = nn.CrossEntropyLoss(ignore_index=0)
    if private:
        _, optimizer, criterion, loader = PrivacyEngine().make_private(
            module=module, optimizer=optimizer, criterion=criterion, data_loader=loader,
            noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode="ghost",
            poisson_sampling=False)
    times = []
    for xb, yb in loader:
        started = time.perf_counter()
        optimizer.zero_grad()
        logits = module.sequence_logits(xb)
        extra = {"shape": logits.shape} if private else {}
        criterion(logits.reshape(-1, config.n_items), yb.reshape(-1), **extra).backward()
        optimizer.step()
        times.append(time.perf_counter() - started)
    return times[1:]  # the first step pays one-off allocation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    results = {name: np.median(step_seconds(private, args.batch, args.steps))
               for name, private in (("Adam, no DP", False), ("DP-SGD, ghost clipping", True))}
    base = results["Adam, no DP"]
    print(f"batch {args.batch} chunks x 50 positions, {args.steps} steps, torch threads "
          f"{torch.get_num_threads()}\n")
    print("| step | median s/step | vs no DP |\n|---|---:|---:|")
    for name, sec in results.items():
        print(f"| {name} | {sec:.3f} | {sec / base:.2f}x |")


if __name__ == "__main__":
    main()
