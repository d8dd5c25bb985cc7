"""Without ZeRO: the gradient all-reduce overlapped with the backward, as torch DDP does it.

DeepSpeed's engine without ZeRO all-reduces every gradient after the last micro-batch's backward has finished,
so each optimizer step waits for the whole all-reduce (4.5-5.6 ms for the demo model on 2 CPU workers over gloo,
as issue 14's per-step probe measured it). A patch step holds K times fewer micro-batches than a token step, so that
fixed cost weighs K times more there. `OverlappedAllReduce` turns DeepSpeed's all-reduce off and instead
launches an asynchronous all-reduce of each bucket of gradients as soon as the last micro-batch's backward has
produced all of them, in reverse parameter order (roughly the order the backward produces them); the loop
calls `finish` before `engine.step()`. The result is DeepSpeed's: every gradient summed over the ranks, then
divided by the world size.

A step that waits on more than one collective waits for the slowest rank more than once. Two more went out per
step: the loop's flags (a data error, SIGTERM: train.step_flags) and DeepSpeed's gradient clipping, which
all-reduces the norm although every rank holds the same averaged gradient. Here the flags ride in the first
bucket and `finish` clips with torch's clip_grad_norm_ (DeepSpeed's clipping is off: `deepspeed_clipping`), so a
step has one collective, as under torch DDP.

Buckets are launched strictly in index order on every rank, whatever order the hooks fire in, because the ranks'
collectives must match one for one.
"""

from __future__ import annotations

from typing import Any

import torch

from raypatch.config import Config

BUCKET_BYTES = 4 << 20
"""Gradient bytes per all-reduce bucket (torch DDP uses 25 MB, and 1 MB for the first)."""


def overlapped(cfg: Config, stage: int, world_size: int) -> bool:
    """Whether the loop overlaps the all-reduce with the backward: without ZeRO, fp32, more than one worker."""
    return stage == 0 and world_size > 1 and cfg.scale.precision == "fp32" and cfg.scale.overlap_allreduce


def deepspeed_clipping(cfg: Config, stage: int, world_size: int) -> float:
    """DeepSpeed's gradient_clipping: 0 (off) where `OverlappedAllReduce.finish` clips instead."""
    return 0.0 if overlapped(cfg, stage, world_size) else cfg.optim.grad_clip


class OverlappedAllReduce:
    def __init__(self, engine: Any, bucket_bytes: int = BUCKET_BYTES, clip: float = 0.0) -> None:
        import torch.distributed as dist

        self.world, self.clip = dist.get_world_size(), clip
        params = [p for p in engine.module.parameters() if p.requires_grad]
        self.params = params
        self.buckets: list[list[torch.nn.Parameter]] = [[]]
        size = 0
        for p in reversed(params):  # the backward produces the last layers' gradients first
            if size and size + p.numel() * p.element_size() > bucket_bytes:
                self.buckets.append([])
                size = 0
            self.buckets[-1].append(p)
            size += p.numel() * p.element_size()
        self.index = {p: i for i, b in enumerate(self.buckets) for p in b}
        self.active = False
        self.reset()
        engine.enable_backward_allreduce = False  # DeepSpeed's own all-reduce after the backward: replaced
        for p in params:
            p.register_post_accumulate_grad_hook(self._ready)

    def reset(self) -> None:
        self.missing = [len(b) for b in self.buckets]
        self.launched: list[tuple[Any, torch.Tensor]] = []
        self.flags: torch.Tensor | None = None

    def arm(self, boundary: bool, flags: torch.Tensor | None = None) -> None:
        """Before each micro-batch's backward: only the last one's gradients (the accumulated sum) go out, and
        with them this rank's `flags` (a float tensor; `finish` returns their sum over the ranks)."""
        self.active = boundary
        if boundary:
            self.flags = flags

    def _ready(self, p: torch.nn.Parameter) -> None:
        if not self.active:
            return
        self.missing[self.index[p]] -= 1
        self._launch(complete_only=True)

    def _launch(self, complete_only: bool) -> None:
        import torch.distributed as dist

        while len(self.launched) < len(self.buckets):
            i = len(self.launched)
            if complete_only and self.missing[i]:
                return
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.buckets[i]]
            extra = [self.flags.to(grads[0].dtype)] if i == 0 and self.flags is not None else []
            flat = torch.cat([g.reshape(-1) for g in grads] + extra)
            self.launched.append((dist.all_reduce(flat, async_op=True), flat))

    def finish(self) -> torch.Tensor | None:
        """Wait for every bucket (launching any whose gradients never all arrived), average, write back, clip;
        returns the ranks' flags summed (None when `arm` got none)."""
        self._launch(complete_only=False)
        summed = None
        for i, ((work, flat), bucket) in enumerate(zip(self.launched, self.buckets)):
            work.wait()
            if i == 0 and self.flags is not None:
                summed = flat[-len(self.flags):].clone()
            flat.div_(self.world)
            at = 0
            for p in bucket:
                n = p.numel()
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                p.grad.copy_(flat[at:at + n].view_as(p))
                at += n
        if self.clip > 0:  # DeepSpeed's rule: scale by min(1, clip / (norm + 1e-6))
            torch.nn.utils.clip_grad_norm_(self.params, self.clip, foreach=True)
        self.active = False
        self.reset()
        return summed
