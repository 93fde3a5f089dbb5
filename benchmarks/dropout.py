"""What placing dropout per sample costs a step (scripts/bench.py --dropout): forward and backward
of one process, 1 torch thread, with torch's dropout against the same step within
raytorch.seeded_forward (core/seeded_forward.py), and the same model with dropout 0 with and
without the context (the torch function mode's own cost). No Ray: the draw is per replica, over
its own samples only, so a replica's cost is this one's for its part, whatever W is.

Models: an MLP (512 -> 1024 -> 1024 -> 10, dropout 0.1 after each hidden layer, batch 256) and a
transformer encoder (4 layers, width 256, 4 heads, feed-forward 1024, dropout 0.1 in attention and
after each block, batch 16 x 128 tokens, batch_first), SGD's backward included, optimizer step not.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from raytorch import seeded_forward


def mlp(p: float) -> nn.Module:
    return nn.Sequential(nn.Linear(512, 1024), nn.ReLU(), nn.Dropout(p), nn.Linear(1024, 1024), nn.ReLU(),
                         nn.Dropout(p), nn.Linear(1024, 10))


def transformer(p: float) -> nn.Module:
    layer = nn.TransformerEncoderLayer(256, 4, dim_feedforward=1024, dropout=p, batch_first=True)
    return nn.TransformerEncoder(layer, 4, enable_nested_tensor=False)


MODELS = {"mlp": (mlp, (256, 512)), "transformer": (transformer, (16, 128, 256))}


def step_s(model: nn.Module, x: torch.Tensor, placed: bool, steps: int) -> float:
    """Median seconds of a forward and backward over `steps` (as many warm-up steps first)."""
    samples = torch.arange(len(x))
    times = []
    for k in range(2 * steps):
        started = time.perf_counter()
        if placed:
            with seeded_forward(0, k, samples):
                loss = model(x).square().mean()
        else:
            loss = model(x).square().mean()
        loss.backward()
        model.zero_grad(set_to_none=True)
        if k >= steps:
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def main(rounds: int = 3, steps: int = 10) -> dict:
    torch.set_num_threads(1)
    figures = {}
    for name, (build, shape) in MODELS.items():
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
        cases = {"torch_dropout": (0.1, False), "placed_dropout": (0.1, True), "no_dropout": (0.0, False),
                 "no_dropout_in_context": (0.0, True)}
        per_case: dict[str, list[float]] = {case: [] for case in cases}
        for _ in range(rounds):  # cases alternate within a round: drift hits all alike
            for case, (p, placed) in cases.items():
                torch.manual_seed(0)
                per_case[case].append(step_s(build(p).train(), x, placed, steps))
        figures[name] = {case: statistics.median(values) for case, values in per_case.items()}
        f = figures[name]
        print(f"{name:12s} ms/step: torch dropout {1e3 * f['torch_dropout']:.1f}, "
              f"placed {1e3 * f['placed_dropout']:.1f} "
              f"({f['placed_dropout'] / f['torch_dropout'] - 1:+.0%}); no dropout {1e3 * f['no_dropout']:.1f}, "
              f"in the context {1e3 * f['no_dropout_in_context']:.1f} "
              f"({f['no_dropout_in_context'] / f['no_dropout'] - 1:+.0%})", flush=True)
    return figures
