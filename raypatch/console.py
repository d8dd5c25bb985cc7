"""What the user sees: raypatch's own lines on the terminal, everything else in a log file the run names.

Ray, Ray Data, DeepSpeed, torch and the C++ core workers write to file descriptors 1 and 2 directly (not only
through Python's sys.stdout), so `capture` points both descriptors at the log file and keeps duplicates of the
terminal for `say`. Worker lines travel to the driver through a Ray queue (`Relay`), which works the same on a
laptop, under `ray job submit` and across nodes; the driver prints them with `say`.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

_term: dict[str, TextIO] = {}  # "out" and "err": the terminal while capture() is active
_log: list[TextIO] = []


def say(msg: str, *, err: bool = False) -> None:
    """One raypatch line: to the terminal, and to the log file while one is open."""
    stream = _term.get("err" if err else "out") or (sys.stderr if err else sys.stdout)
    stream.write(msg + "\n")
    stream.flush()
    if _log:
        _log[0].write(msg + "\n")
        _log[0].flush()


def terminal(err: bool = True) -> TextIO:
    """The terminal stream (for a progress bar), whether or not output is captured."""
    return _term.get("err" if err else "out") or (sys.stderr if err else sys.stdout)


def log_path() -> str | None:
    return _log[0].name if _log else None


@contextlib.contextmanager
def capture(path: Path | None, *, stop: Callable[[], None] | None = None) -> Iterator[Path | None]:
    """Send file descriptors 1 and 2 to `path` (appended) for the duration; `say` still reaches the terminal.
    `stop` (the command's `cluster.end_ray`) runs while output is still captured: Ray prints its last worker
    lines late, from its log monitor thread, and they belong in the log.

    Nested calls and RAYPATCH_VERBOSE=1 leave output where it is (the second for debugging).
    """
    if path is None or _term or os.environ.get("RAYPATCH_VERBOSE") == "1":
        yield None
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    log = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - closed below
    _term["out"] = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8", errors="replace")
    _term["err"] = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
    _log.append(log)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    try:
        yield path
    finally:
        try:
            if stop is not None:
                stop()
        finally:
            # The terminal comes back whatever happens: with the log file's disk full, flushing into it fails,
            # and the error line that says so must still reach the user.
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(OSError):
                    stream.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            for s in _term.values():
                s.close()
            _term.clear()
            _log.clear()
            with contextlib.suppress(OSError):
                log.close()


class Relay:
    """Worker lines to the driver's terminal: a Ray queue the workers put into, drained by a driver thread."""

    def __init__(self) -> None:
        from ray.util.queue import Queue

        self.queue = Queue(actor_options={"num_cpus": 0})
        self._stop, self._abandon = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._drain, daemon=True, name="raypatch-relay")
        self._thread.start()

    def _drain(self) -> None:
        from ray.util.queue import Empty

        while not self._abandon.is_set():
            try:
                say(self.queue.get(timeout=0.5))
            except Empty:
                if self._stop.is_set():
                    return
            except Exception:  # noqa: BLE001 - the queue's actor is gone (Ray shut down): nothing more to print
                return

    def close(self, drain: bool = True) -> None:
        """Print what is still queued (or, with drain=False, stop printing now), then end the thread and the
        queue's actor."""
        self._stop.set()
        if not drain:
            self._abandon.set()
        self._thread.join(timeout=10 if drain else 1)
        try:
            self.queue.shutdown()
        except Exception:  # noqa: BLE001 - already gone with the cluster
            pass


@contextlib.contextmanager
def relay() -> Iterator[Any]:
    """A Relay's queue for train_loop_config while the block runs (None when output is not captured)."""
    if not _term:
        yield None
        return
    r = Relay()
    try:
        yield r.queue
    except BaseException:
        # Ctrl-C or an error: the workers are ended next (end_ray), not waited for; while they still log, the
        # queue would never run dry.
        r.close(drain=False)
        raise
    r.close()
