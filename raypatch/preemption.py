"""Handing a run over when its capacity goes away: a spot notice through Ray, or SIGTERM to a worker.

Either way the loop saves a just-in-time checkpoint at the next step boundary and then hands over, so that the
resumed run redoes no optimizer step:

- Ray's preemption notice (a node is draining with a deadline): every rank waits until the checkpoint is
  committed, then stops training and waits. Ray Train restarts the worker group from that checkpoint when the
  node goes or its deadline passes (Ray's own advice is to keep training, but every step trained after the
  checkpoint would be trained again after the restart; waiting costs the same wall-clock and no compute).
- SIGTERM (Kubernetes evicting a pod, a VM shutting down, `kill`), with checkpoint.sigterm_grace_s > 0: Ray's own
  handler would end the worker at once and lose every step since the last checkpoint. `install_sigterm_hook`
  replaces it with one that only takes note (and ends the worker after the grace period whatever happens); every
  rank learns of it in the step's flag all-reduce (train.step_flags, no extra collective), the checkpoint is
  saved and committed, then the signalled ranks exit (status 1, as Ray's handler would) and the others wait for
  Ray Train to restart the group. Off by default: when a whole local cluster shuts down (its driver killed), the
  raylet sends SIGTERM to the workers too, and a worker that waits out a hand-over that can no longer happen
  keeps the cluster's processes alive that long (tests/test_console.py caught it).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

_TERM: list[float] = []
"""When this process got SIGTERM (empty: never)."""
IDLE_LIMIT_S = 600.0
"""After a handover, how long a rank waits for Ray Train to end it before it gives up with an error."""


def install_sigterm_hook(grace_s: float) -> bool:
    """Note SIGTERM instead of exiting, in this Ray Train worker, for at most `grace_s` seconds
    (checkpoint.sigterm_grace_s; 0: not installed, SIGTERM ends the worker at once as Ray's handler does). Python
    installs signal handlers only from the main thread, and the training loop runs on another: the worker actor's
    main thread installs it (an actor task through the actor's own handle). False when that is not possible (not in
    an actor)."""
    import ray

    if grace_s <= 0:
        return False
    try:
        actor = ray.get_runtime_context().current_actor
        ray.get(actor.execute.remote(_install, grace_s), timeout=30)
        return True
    except Exception:  # noqa: BLE001 - outside an actor, or an actor without execute: SIGTERM keeps Ray's meaning
        return False


def _install(grace_s: float) -> None:
    previous = signal.getsignal(signal.SIGTERM)

    def note(signum: int, frame: Any) -> None:
        # Only while a training loop runs, and only the first time: otherwise (set-up, teardown, a second
        # SIGTERM) the process ends as Ray's own handler would end it.
        if not _ACTIVE or _TERM:
            if callable(previous):
                previous(signum, frame)
            raise SystemExit(1)
        _TERM.append(time.time())
        # A loop stuck in a collective (a peer already gone) never reaches the step boundary: end anyway.
        timer = threading.Timer(grace_s, lambda: os._exit(1))
        timer.daemon = True  # never what keeps a finished worker alive
        timer.start()

    signal.signal(signal.SIGTERM, note)


_ACTIVE: list[bool] = []
"""Non-empty while this process runs a training loop (`training`)."""


@contextlib.contextmanager
def training() -> Iterator[None]:
    """While the loop runs, SIGTERM is noted and handed over; outside, it ends the process as usual."""
    _ACTIVE.append(True)
    try:
        yield
    finally:
        _ACTIVE.clear()


def sigterm_received() -> bool:
    return bool(_TERM)


def wait_until_committed() -> None:
    """Block until Ray Train has registered (and so committed) every checkpoint this worker reported."""
    import ray.train

    ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)


def hand_over(step: int, reason: str, say: Callable[[str], None], deadline_ms: int | None = None) -> None:
    """After the just-in-time checkpoint of `step`: wait for its commit, then end this rank (SIGTERM) or wait
    for Ray Train to restart the group. Never returns."""
    wait_until_committed()
    if sigterm_received():
        say(f"{reason}: checkpoint at step {step} committed; this worker exits (SIGTERM) and the run resumes "
            f"from that step on the workers that remain")
        sys.stdout.flush()
        os._exit(1)
    say(f"{reason}: checkpoint at step {step} committed; waiting for Ray Train to restart the workers from it "
        f"(no step is trained twice)")
    limit = time.time() + IDLE_LIMIT_S
    if deadline_ms is not None:
        limit = max(limit, deadline_ms / 1000 + IDLE_LIMIT_S)
    while time.time() < limit:
        time.sleep(1.0)
    raise RuntimeError(f"{reason} at step {step}: the checkpoint is committed, but Ray Train never restarted the "
                       f"workers within {IDLE_LIMIT_S:.0f} s of the deadline")


def describe(info: Any) -> str:
    """A Ray PreemptionInfo in words."""
    when = "" if info.deadline_ms is None else f", deadline in {info.deadline_ms / 1000 - time.time():.0f} s"
    return f"preemption notice for ranks {info.preempted_ranks}{when}"
