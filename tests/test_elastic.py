"""The global batch across resizes (optim.step_split): what DeepSpeed computes from the weighted micro-batches is
exactly the mean over the step's rows, at every worker count. No Ray: the data-parallel average is written out."""

from __future__ import annotations

import pytest
import torch

from raypatch.optim import grad_accum_steps, rows_per_counts, split_note, step_split


def deepspeed_gradient(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, world: int, mb: int) -> torch.Tensor:
    """What a DeepSpeed step computes: each rank sums backward(loss·weight / GA) over its micro-batches, then
    the ranks' gradients are averaged; rows are dealt as data.worker_runs deals them (contiguous runs)."""
    rows = len(x)
    ga = grad_accum_steps(rows, "token", world, mb)
    total = torch.zeros_like(model.weight)
    start = 0
    for r in range(world):
        n = rows_per_counts(rows, world)[r]
        xs, ys = x[start:start + n], y[start:start + n]
        start += n
        model.zero_grad()
        at = 0
        for m, weight in step_split(rows, world, mb, r):
            xb, yb = (xs[at:at + m], ys[at:at + m]) if m else (x[:1] * 0, y[:1] * 0)
            at += m
            loss = torch.nn.functional.mse_loss(model(xb).squeeze(1), yb)  # a mean over the micro-batch's rows
            (loss * weight / ga).backward()
        total += model.weight.grad
    return total / world


@pytest.mark.parametrize("rows,world,mb", [(64, 8, 2), (64, 5, 2), (32, 5, 2), (32, 3, 4), (4, 8, 2), (40, 5, 8)])
def test_every_worker_count_computes_the_mean_over_the_step(rows, world, mb):
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 1, bias=False).double()
    x, y = torch.randn(rows, 6).double(), torch.randn(rows).double()
    model.zero_grad()
    torch.nn.functional.mse_loss(model(x).squeeze(1), y).backward()
    full = model.weight.grad.clone()
    got = deepspeed_gradient(model, x, y, world, mb)
    assert torch.allclose(got, full, rtol=1e-12, atol=1e-15)


def test_even_splits_are_the_ordinary_step_and_say_nothing():
    assert step_split(64, 8, 2, 3) == [(2, 1.0)] * 4  # weight exactly 1.0: the loss is not even multiplied
    assert split_note(64, "token", 8, 2) == ""
    note = split_note(64, "token", 5, 2)
    assert "12-13 rows per worker in 7 micro-batches" in note and "mean over all 64 rows" in note
    assert [sum(m for m, _ in step_split(64, 5, 2, r)) for r in range(5)] == [12, 13, 13, 13, 13]
