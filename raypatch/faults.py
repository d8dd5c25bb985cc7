"""Audits and fault injection for tests and drills, called once after every optimizer step.

- Block audit (`data.record_blocks`): each rank appends the blocks it trained at the step to
  <run>/blocks-rank<r>.jsonl, with the attempt (worker group) that trained it, so a test can compare a run that
  lost workers with a fault-free one block by block.
- Fault injection: RAYPATCH_KILL_AT_STEPS="6,22" and RAYPATCH_KILL_RANK=1 make that rank SIGKILL itself once
  after each listed global step, once every checkpoint reported before has been committed (a marker file in the
  run directory keeps it to once).
- RAYPATCH_STEP_DELAY_S=0.3 adds that much sleep to every step, so that a drill can place a resize in a phase.
- RAYPATCH_NAN_LOSS_AT=3 (with RAYPATCH_KILL_RANK) makes that rank's loss NaN at global step 3, through the
  real backward: the non-finite check must stop the run there.
- RAYPATCH_KILL_IN_CHECKPOINT="8:upload" (with RAYPATCH_KILL_RANK) makes that rank SIGKILL itself at one point of
  writing checkpoint-0000008, once per run directory, after every earlier checkpoint was committed (so the point
  the run resumes from does not depend on timing). The points, in the order a checkpoint is written:
    start     before this rank wrote any file of it;
    local     mid-file in the local copy: DeepSpeed's files written, the largest one then cut to half its size;
    written   the local copy complete (rank 0: meta.json written last);
    upload    on Ray Train's upload thread: meta.json and half of one state file in storage, the rest never;
    uploaded  every file of this rank in storage, before Ray Train registers the checkpoint;
    hold      as `upload`, but the thread then waits instead of dying: a drill kills the whole process tree.
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


def nan_loss_at(global_step: int, rank: int) -> bool:
    """RAYPATCH_NAN_LOSS_AT (module docstring)."""
    at = os.environ.get("RAYPATCH_NAN_LOSS_AT", "")
    return bool(at) and int(at) == global_step and rank == int(os.environ.get("RAYPATCH_KILL_RANK", "0"))


def attempt_id(device: Any) -> int:
    """One id per (re)start of the worker group, the same on every rank: rank 0's pid (collective). Audits
    take, for every step, the blocks of the last attempt that trained it."""
    import torch
    import torch.distributed as dist

    t = torch.tensor([os.getpid()], dtype=torch.int64, device=device)
    dist.broadcast(t, 0)
    return int(t.item())


POINTS = ("start", "local", "written", "upload", "uploaded", "hold")


def _armed(name: str, rank: int, points: tuple[str, ...]) -> str | None:
    """The RAYPATCH_KILL_IN_CHECKPOINT point among `points` if it applies to this checkpoint and rank."""
    spec = os.environ.get("RAYPATCH_KILL_IN_CHECKPOINT", "")
    if not spec or rank != int(os.environ.get("RAYPATCH_KILL_RANK", "0")):
        return None
    step, _, point = spec.partition(":")
    if point not in POINTS:
        raise ValueError(f"RAYPATCH_KILL_IN_CHECKPOINT={spec!r}: expected <step>:<point>, point one of {POINTS}")
    return point if name == f"checkpoint-{int(step):07d}" and point in points else None


def _once(run_dir: Path, point: str, name: str) -> bool:
    marker = run_dir / f".killed-{point}-{name}"
    if marker.exists():
        return False
    marker.touch()
    return True


def _after_earlier_commit(run_dir: Path, name: str) -> None:
    """Until the newest checkpoint before `name` is committed (at most a minute). Polled from storage, not asked
    of Ray: the upload thread cannot wait on the training thread's reports."""
    deadline = time.time() + 60
    while time.time() < deadline:
        earlier = sorted(d for d in run_dir.glob("checkpoint-*") if d.name < name)
        if earlier and (earlier[-1] / "committed.json").exists():
            return
        time.sleep(0.2)


def maybe_kill_in_save(point: str, local: Path, name: str, rank: int) -> None:
    """The points on the training thread: start, local, written (module docstring)."""
    if _armed(name, rank, ("start", "local", "written")) != point:
        return
    import ray.train

    if not _once(Path(ray.train.get_context().get_storage().experiment_fs_path), point, name):
        return
    from raypatch.preemption import wait_until_committed

    wait_until_committed()
    if point == "local":
        big = max((p for p in local.rglob("*.pt")), key=lambda p: p.stat().st_size)
        with open(big, "r+b") as f:
            f.truncate(big.stat().st_size // 2)
    os.kill(os.getpid(), signal.SIGKILL)


def maybe_kill_in_upload(store: Any, local: Path, name: str, rank: int, done: bool) -> None:
    """The points on Ray Train's upload thread: upload and hold before the upload (done=False, which then writes
    the torn upload itself), uploaded after it (module docstring)."""
    point = _armed(name, rank, ("uploaded",) if done else ("upload", "hold"))
    run_dir = Path(store.experiment_fs_path)
    if point is None or not _once(run_dir, point, name):
        return
    _after_earlier_commit(run_dir, name)
    if point != "uploaded":
        fs, dest = store.storage_filesystem, store.build_checkpoint_path_from_name(name)
        files = sorted(p for p in local.rglob("*") if p.is_file())
        for p, part in [(p, 1.0) for p in files if p.name == "meta.json"] + \
                       [(p, 0.5) for p in files if p.suffix == ".pt"][:1]:
            target = f"{dest}/{p.relative_to(local).as_posix()}"
            fs.create_dir(target.rsplit("/", 1)[0])
            data = p.read_bytes()
            with fs.open_output_stream(target) as f:
                f.write(data[: int(len(data) * part)])
    if point == "hold":
        (run_dir / f".holding-{name}").touch()  # the torn upload is in storage: the drill may kill now
        while True:  # the drill kills this process, with every other one of the run
            time.sleep(1)
    os.kill(os.getpid(), signal.SIGKILL)
