"""The training loop every demo-asset recipe shares: AdamW over minibatches of cached examples."""
from __future__ import annotations

import torch
from torch import nn
from tqdm import tqdm


def _batches(n: int, size: int):
    for i in range(0, n, size):
        yield slice(i, min(n, i + size))


def fit(params: list[nn.Parameter], loss_of, n: int, steps: int, seed: int, lr: float = 1e-3,
        batch: int = 64, desc: str = "fit") -> float:
    """AdamW on minibatches of ``n`` cached examples drawn with a seeded generator; returns the last loss.
    The recipes' losses apply dropout, which draws from torch's global generator: it is seeded here, in a
    fork, so a recipe's result depends on its seed alone, not on what the process ran before (in
    ``python -m siren.demo_assets train`` the codec's build; another part of ``only=``), and the caller's
    generator is left as it was."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    loss = torch.tensor(float("nan"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in tqdm(range(steps), desc=desc, leave=False):
            loss = loss_of(torch.randint(0, n, (min(batch, n),), generator=g))
            opt.zero_grad()
            loss.backward()
            opt.step()
    return float(loss.detach())
