"""Audits and fault injection for tests and drills, called once after every optimizer step.

- Block audit (`data.record_blocks`): each rank appends the blocks it trained at the step to
  <run>/blocks-rank<r>.jsonl, with the attempt (worker group) that trained it, so a test can compare a run that
  lost workers with a fault-free one block by block.
- Fault injection: RAYPATCH_KILL_AT_STEPS="6,22" and RAYPATCH_KILL_RANK=1 make that rank SIGKILL itself once
  after each listed global step (a marker file in the run directory keeps it to once).
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any


def after_step(run_dir: Path, *, record: bool, phase: str, step: int, global_step: int, rank: int, world_size: int,
               attempt: int, blocks: list[int]) -> None:
    if record:
        with open(run_dir / f"blocks-rank{rank}.jsonl", "a") as f:
            f.write(json.dumps({"phase": phase, "step": step, "global_step": global_step, "rank": rank,
                                "world": world_size, "pid": os.getpid(), "attempt": attempt, "t": time.time(),
                                "blocks": blocks}) + "\n")
    maybe_inject_fault(run_dir, rank, global_step)


def maybe_inject_fault(run_dir: Path, rank: int, global_step: int) -> None:
    steps = os.environ.get("RAYPATCH_KILL_AT_STEPS", "")
    if not steps or rank != int(os.environ.get("RAYPATCH_KILL_RANK", "0")):
        return
    if str(global_step) in steps.split(","):
        marker = run_dir / f".killed-at-{global_step}"
        if not marker.exists():
            marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)


def attempt_id(device: Any) -> int:
    """One id per (re)start of the worker group, the same on every rank: rank 0's pid (collective). Audits
    take, for every step, the blocks of the last attempt that trained it."""
    import torch
    import torch.distributed as dist

    t = torch.tensor([os.getpid()], dtype=torch.int64, device=device)
    dist.broadcast(t, 0)
    return int(t.item())
