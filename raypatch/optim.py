"""The optimizer side of a run: AdamW parameter groups, the DeepSpeed config, gradient accumulation per phase,
the optimizer reset at the switch and the learning-rate schedule. No Ray and no data code: a GPU script or a
benchmark imports these instead of copying them."""

from __future__ import annotations

import math
from typing import Any

import torch

from raypatch.config import Config

ZERO1_MAX_PARAMS = 1_000_000_000
NO_ZERO_MAX_PARAMS = 100_000_000


def zero_stage(cfg: Config, num_params: int) -> int:
    """scale.zero_stage, or with 0 the stage for the model's precision and size (0 = no ZeRO: DeepSpeed's plain
    data-parallel engine).

    - fp32 up to 100M parameters: no ZeRO. In fp32 ZeRO-1 keeps one more fp32 copy of its partition and, every
      step, copies gradients into it, computes the norm per tensor and copies the weights back: a fixed per-step
      cost that weighs K times more in a patch step (benchmarks/throughput.py, the "ZeRO-1" against the "no ZeRO"
      arms). Weights, gradients and both AdamW moments, all replicated: 16 bytes per parameter, at most 1.6 GB a
      worker at that size.
    - bf16 up to 1B: ZeRO-1 (its fp32 master weights are the partition DeepSpeed needs anyway). ZeRO-2 also shards
      gradients but reduces in buckets at every micro-batch, a fixed cost per micro-batch.
    - Above: ZeRO-2; ZeRO-3 only when asked for.
    """
    if cfg.scale.zero_stage:
        return cfg.scale.zero_stage
    if cfg.scale.precision == "fp32" and num_params <= NO_ZERO_MAX_PARAMS:
        return 0
    return 1 if num_params <= ZERO1_MAX_PARAMS else 2


def stage_name(stage: int) -> str:
    return f"ZeRO-{stage}" if stage else "no ZeRO"


def deepspeed_config(cfg: Config, grad_accum: int, world_size: int, num_params: int,
                     stage: int | None = None) -> dict[str, Any]:
    """DeepSpeed's config for `cfg`: ZeRO stage (`stage`, else zero_stage's), precision, clipping and AdamW (the
    learning rate is set by the loop every step, from `lr_at`)."""
    o = cfg.optim
    stage = zero_stage(cfg, num_params) if stage is None else stage
    zero: dict[str, Any] = {"stage": stage}
    if stage == 3:
        # Tiny models would otherwise stay whole on every rank (below DeepSpeed's 1e5-element default).
        zero["stage3_param_persistence_threshold"] = cfg.scale.zero3_persistence_threshold
    return {
        "train_micro_batch_size_per_gpu": o.micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": o.micro_batch_size * grad_accum * world_size,
        "gradient_clipping": o.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.scale.precision == "bf16"},
        # torch_adam avoids compiling DeepSpeed's fused Adam (40-70 s) and runs on CPU and GPU alike; torch's own
        # fused kernel (CPU and CUDA) steps the demo model's AdamW in 0.95 ms instead of 3.1 (1 core;
        # issue 14's per-step probe): a fixed per-step cost that weighs more in a patch step.
        "optimizer": {"type": "AdamW", "params": {"lr": o.lr, "betas": [o.beta1, o.beta2], "eps": o.eps,
                                                  "weight_decay": o.weight_decay, "torch_adam": True,
                                                  "fused": o.fused_adamw}},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def restore_weight_decay(engine: Any, weight_decay: float) -> list[str]:
    """Set each optimizer group's weight decay back to what `param_groups` gave it; returns what was wrong.

    DeepSpeed 0.19's ZeRO-3 universal-checkpoint loader copies the first parameter group's hyper-parameters onto
    every group (stage3.py, load_hp_checkpoint_state_from_checkpoint_dir_stage3), so after a resize norms and
    biases would be decayed like matrices. Found by the 8-worker drills: the first step after the resize matched
    the fault-free run, the second did not."""
    fixed = []
    for i, (group, want) in enumerate(zip(engine.optimizer.param_groups, (weight_decay, 0.0))):
        if group.get("weight_decay") != want:
            fixed.append(f"group {i}: {group.get('weight_decay')} -> {want}")
            group["weight_decay"] = want
    return fixed


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices and embeddings; not norms and biases (as HF Trainer does in the reference)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def grad_accum_steps(rows_per_step: int, phase: str, world_size: int, micro_batch: int) -> int:
    """Micro-batches every worker runs per optimizer step, for a phase of `rows_per_step` global rows: enough
    for the worker with the most rows (`step_split`)."""
    if rows_per_step < 1:
        raise ValueError(f"optim.tokens_per_step: a {phase}-phase step has no whole row")
    return -(-max(rows_per_counts(rows_per_step, world_size)) // micro_batch)


def rows_per_counts(rows_per_step: int, world_size: int) -> list[int]:
    """Rows of one optimizer step per rank: the step's blocks split into contiguous runs as evenly as possible
    (rank r takes rows [r·B//W, (r+1)·B//W) of the step), so counts differ by at most one."""
    return [rows_per_step * (r + 1) // world_size - rows_per_step * r // world_size for r in range(world_size)]


def step_split(rows_per_step: int, world_size: int, micro_batch: int, rank: int) -> list[tuple[int, float]]:
    """This rank's micro-batches of one optimizer step as (rows, loss weight).

    The global batch rule: every optimizer step trains exactly the tokens_per_step the config asks for, at any
    worker count. When the step's rows divide into whole micro-batches on every worker, each micro-batch holds
    optim.micro_batch_size rows and weighs 1 (the ordinary DeepSpeed step, bit for bit). When they do not (a
    resize from 8 to 5 workers, say), the rows are split as evenly as possible, every rank runs the same number
    of micro-batches (the collectives need it), and each micro-batch's mean loss is weighted by
    W·GA·rows/B, so that DeepSpeed's average over ranks and micro-batches is exactly the mean over the step's B
    rows: the same optimisation problem, at the price of some idle rows on the ranks with fewer. A micro-batch
    of 0 rows (more workers than rows) runs one zero row at weight 0: ZeRO-3's forward is a collective.
    """
    ga = grad_accum_steps(rows_per_step, "", world_size, micro_batch)
    n = rows_per_counts(rows_per_step, world_size)[rank]
    sizes = [n * (i + 1) // ga - n * i // ga for i in range(ga)]
    return [(m, world_size * ga * m / rows_per_step) for m in sizes]


def split_note(rows_per_step: int, phase: str, world_size: int, micro_batch: int) -> str:
    """'' when the step splits evenly; else one line for the log saying how it is split."""
    counts = rows_per_counts(rows_per_step, world_size)
    if len(set(counts)) == 1 and counts[0] % micro_batch == 0:
        return ""
    ga = grad_accum_steps(rows_per_step, phase, world_size, micro_batch)
    return (f"{phase} phase: {rows_per_step} rows per step do not split into whole micro-batches of "
            f"{micro_batch} on {world_size} workers: {min(counts)}-{max(counts)} rows per worker in {ga} "
            f"micro-batches, losses weighted by rows (the step is still the mean over all {rows_per_step} rows)")


def start_phase(engine: Any, micro_batch: int, grad_accum: int, world_size: int, *, reset_optimizer: bool) -> None:
    """Set the engine's batch for the phase's gradient accumulation; at the switch, reset AdamW's state.

    Tokens per step are fixed across phases, so the patch phase (K·T-token rows) needs K times fewer rows
    per step than the token phase: the micro-batch stays, gradient accumulation changes. The paper resets
    the optimizer at the switch and keeps only the weights: clearing AdamW's moments and step counts keeps
    DeepSpeed's fp32 master weights exactly, with no round trip through bf16 module weights.
    """
    engine.set_train_batch_size(micro_batch * grad_accum * world_size)
    if reset_optimizer:
        base = engine.optimizer.optimizer if hasattr(engine.optimizer, "optimizer") else engine.optimizer
        base.state.clear()


def set_lr(engine: Any, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


def lr_at(step: int, total_steps: int, *, lr: float, warmup_steps: int, min_lr: float = 0.0) -> float:
    """Linear warmup from lr/warmup to lr over warmup_steps, then cosine to min_lr at total_steps.

    `step` counts optimizer steps from 0 within the schedule. The paper resets the schedule at the switch
    (2000 warmup steps, cosine to 0, in both phases), so the trainer calls this with per-phase steps.
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    decay = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))
