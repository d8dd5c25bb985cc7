"""Audits and fault injection for tests and drills, called once after every optimizer step.

- Block audit (`data.record_blocks`): each rank appends the blocks it trained at the step to
  <run>/blocks-rank<r>.jsonl, with the attempt (worker group) that trained it, so a test can compare a run that
  lost workers with a fault-free one block by block.
- Fault injection: RAYPATCH_KILL_AT_STEPS="6,22" and RAYPATCH_KILL_RANK=1 make that rank SIGKILL itself once
  after each listed global step, once every checkpoint reported before has been committed (a marker file in the
  run directory keeps it to once).
- RAYPATCH_STEP_DELAY_S=0.3 adds that much sleep to every step, so that a drill can place a resize in a phase.
- RAYPATCH_KILL_IN_UPLOAD=8 (with RAYPATCH_KILL_RANK) makes that rank SIGKILL itself halfway through uploading
  checkpoint-0000008, on Ray Train's upload thread: meta.json and one state file are in storage, the rest never
  arrives (once per run directory too), after an earlier checkpoint was committed.
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
    delay = float(os.environ.get("RAYPATCH_STEP_DELAY_S", "0") or 0)
    if delay:  # drills: long enough steps that a resize lands where the drill means it to
        time.sleep(delay)


def maybe_inject_fault(run_dir: Path, rank: int, global_step: int) -> None:
    steps = os.environ.get("RAYPATCH_KILL_AT_STEPS", "")
    if not steps or rank != int(os.environ.get("RAYPATCH_KILL_RANK", "0")):
        return
    if str(global_step) in steps.split(","):
        marker = run_dir / f".killed-at-{global_step}"
        if not marker.exists():
            marker.touch()
            # Every checkpoint reported so far committed first (uploads run in the background): the drill is "a
            # worker lost after its last checkpoint", so where the run resumes does not depend on timing.
            from raypatch.preemption import wait_until_committed

            wait_until_committed()
            os.kill(os.getpid(), signal.SIGKILL)


def attempt_id(device: Any) -> int:
    """One id per (re)start of the worker group, the same on every rank: rank 0's pid (collective). Audits
    take, for every step, the blocks of the last attempt that trained it."""
    import torch
    import torch.distributed as dist

    t = torch.tensor([os.getpid()], dtype=torch.int64, device=device)
    dist.broadcast(t, 0)
    return int(t.item())


def maybe_kill_mid_upload(store: Any, local: Path, name: str, rank: int) -> None:
    """RAYPATCH_KILL_IN_UPLOAD (module docstring): upload meta.json and the first state file, then die."""
    step = os.environ.get("RAYPATCH_KILL_IN_UPLOAD", "")
    if not step or name != f"checkpoint-{int(step):07d}" or rank != int(os.environ.get("RAYPATCH_KILL_RANK", "0")):
        return
    run_dir = Path(store.experiment_fs_path)
    marker = run_dir / f".killed-in-upload-{step}"
    if marker.exists():
        return
    marker.touch()
    # The drill is "a crash mid-upload after an earlier checkpoint was committed": wait for that commit.
    deadline = time.time() + 60
    while not list(run_dir.glob("checkpoint-*/committed.json")) and time.time() < deadline:
        time.sleep(0.2)
    dest = store.build_checkpoint_path_from_name(name)
    store.storage_filesystem.create_dir(dest)
    files = sorted(p for p in local.rglob("*") if p.is_file())
    for p in [p for p in files if p.name == "meta.json"] + [p for p in files if p.suffix == ".pt"][:1]:
        target = f"{dest}/{p.relative_to(local).as_posix()}"
        store.storage_filesystem.create_dir(target.rsplit("/", 1)[0])
        with store.storage_filesystem.open_output_stream(target) as f:
            f.write(p.read_bytes())
    os.kill(os.getpid(), signal.SIGKILL)
