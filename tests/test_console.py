"""What a user sees and what a command leaves behind: `raypatch train` as a subprocess, the way a user runs it.

- The terminal carries raypatch's own lines only; Ray's, DeepSpeed's and the workers' output is in the log file
  the first line names, and the last lines say where the outputs are.
- Rerunning a finished run starts no Ray, takes seconds and changes no file.
- Every process the command started ends with it: after success, after Ctrl-C mid-training and after an error.

Run: pytest tests/test_console.py   (about 3 minutes on 2 cores)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

FOREIGN = re.compile(r"\(RayTrainWorker|\(TrainController|core_worker\.cc|\[WARNING\]|FutureWarning|INFO |"
                     r"Traceback|built successfully|Progress bars")


def raypatch(args: list[str], mark: str) -> subprocess.Popen:
    # RAYPATCH_TEST_MARK is inherited by every process the command starts (raylet, GCS, workers, the Train
    # controller): a leak is any live process that still carries it.
    env = os.environ | {"RAYPATCH_TEST_MARK": mark}
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_API_SERVER_ADDRESS", None)  # the test session's own cluster: the command starts its own
    # SIGINT as in an interactive shell: a test runner started in the background inherits it ignored, and an
    # ignored SIGINT stays ignored (Unix semantics; Python then installs no KeyboardInterrupt handler).
    return subprocess.Popen([sys.executable, "-m", "raypatch.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def marked(mark: str) -> list[int]:
    pids = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            if f"RAYPATCH_TEST_MARK={mark}".encode() in (p / "environ").read_bytes():
                pids.append(int(p.name))
        except OSError:
            continue
    return pids


def assert_no_leak(mark: str) -> None:
    t0 = time.time()
    while (left := marked(mark)) and time.time() - t0 < 20:
        time.sleep(1)
    assert not left, [Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")[:120] for pid in left]


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def train_args(shards: str, storage: Path, *extra: str) -> list[str]:
    return ["train", "--config", "tiny", "--set", f"data.shards={shards}", f"checkpoint.storage_path={storage}",
            "data.max_tokens=4096", "eval.max_rows=4", "compare_baseline=true", *extra]


@pytest.mark.ray
def test_terminal_shows_raypatch_lines_and_a_rerun_changes_nothing(shards, tmp_path):
    mark = uuid.uuid4().hex
    proc = raypatch(train_args(shards, tmp_path), mark)
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-2000:] + err[-3000:]
    lines = (out + err).splitlines()
    assert not [ln for ln in lines if FOREIGN.search(ln)], [ln for ln in lines if FOREIGN.search(ln)]
    log = Path(re.search(r"output to (\S+\.log)", lines[0]).group(1))
    assert log.is_file() and re.search(r"RayTrainWorker|raylet|Ray", log.read_text())
    assert "| patch K=2" in out and "saved 25%" in out  # the table and the savings meter (λ=1/2, K=2)
    tail = "\n".join(lines[-8:])
    assert "outputs:" in out and str(tmp_path / "tiny" / "hf") in tail and "tensorboard --logdir" in tail
    assert_no_leak(mark)

    before = tree_digest(tmp_path)
    t0 = time.time()
    again = raypatch(train_args(shards, tmp_path), mark)
    out2, err2 = again.communicate(timeout=300)
    assert again.returncode == 0, err2
    assert time.time() - t0 < 30 and "already trained" in out2 and "| patch K=2" in out2
    assert tree_digest(tmp_path) == before
    assert_no_leak(mark)


def temp_copies() -> set[Path]:
    """The local checkpoint copies workers write before an upload (raypatch.checkpoint.temp_prefix)."""
    return set(Path(tempfile.gettempdir()).glob("raypatch-ckpt-*"))


@pytest.mark.ray
def test_ctrl_c_and_errors_end_every_process(shards, tmp_path):
    mark = uuid.uuid4().hex
    before = temp_copies()
    # A checkpoint every step: Ctrl-C lands while one is being written or uploaded.
    proc = raypatch(train_args(shards, tmp_path, "data.max_tokens=0", "checkpoint.name=long",
                               "checkpoint.every_steps=1", "data.record_blocks=true"), mark)
    seen = ""
    t0 = time.time()
    while not re.search(r"\] step +\d+ .* loss ", seen):  # a log line: Ray and both workers are up, training
        assert time.time() - t0 < 600 and proc.poll() is None, seen
        seen += proc.stdout.readline()
    t_int = time.time()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted" in err and "Traceback" not in err
    assert_no_leak(mark)
    # The workers stopped with the interrupt: no step ended more than 1.5 s after it (each rank records a step
    # when it ends; a step of the tiny model takes well under a second). A record torn by the kill is skipped.
    times = [json.loads(ln)["t"] for f in tmp_path.glob("long*/blocks-rank*.jsonl")  # the token-only run first
             for ln in f.read_text().splitlines() if ln.endswith("}")]
    assert times, "no step was recorded before the interrupt"
    late = [t for t in times if t > t_int + 1.5]
    assert not late, f"{len(late)} step(s) trained after Ctrl-C"
    assert not temp_copies() - before, "local checkpoint copies outlived the run"

    # `kill` (SIGTERM), the way a scheduler stops a process. Ray's own signal handler in the driver ends the
    # process at once (status -6 after its stack dump); the local cluster's processes follow their driver.
    proc = raypatch(train_args(shards, tmp_path, "data.max_tokens=0", "checkpoint.name=long2"), mark)
    seen = ""
    while "step" not in seen:
        assert time.time() - t0 < 900 and proc.poll() is None, seen
        seen += proc.stdout.readline()
    proc.terminate()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0, err[-2000:]
    assert_no_leak(mark)

    # An error after Ray started (the evaluation file vanishes before the run's checks): one line, exit 2.
    missing = tmp_path / "gone.jsonl"
    proc = raypatch(train_args(shards, tmp_path, f"eval.wikitext={missing}", "checkpoint.name=bad"), mark)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 2 and err.strip().startswith("raypatch: error:") and "eval.wikitext" in err, err
    assert_no_leak(mark)


def test_ray_start_up_failures_are_retried_then_reported(monkeypatch, capsys):
    """A local cluster that does not come up (the raylet's "node timed out during startup" on a busy machine)
    is retried with a message, and after the last attempt reported as one line, not a traceback. ray.init is
    made to fail here; nothing starts."""
    import ray

    from raypatch import cluster
    from raypatch.cli import report_error
    from raypatch.safety import InputError

    calls = []

    def failing_init(*args, **kwargs):
        calls.append(kwargs)
        raise RuntimeError("The current node timed out during startup. This could happen because ...")

    from ray._private import ray_constants

    monkeypatch.setattr(ray, "init", failing_init)
    # As on a fresh process, whatever this test session holds: no Ray yet, and a shutdown that touches nothing
    # (the session's own cluster keeps running); the settings start_local_ray changes are restored after.
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", ray_constants.ENABLE_RAY_CLUSTER)
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0"))
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", os.environ.get("RAY_API_SERVER_ADDRESS", "http://127.0.0.1:1"))
    monkeypatch.setattr(cluster, "RETRY_S", 0)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(InputError) as e:
        cluster.init_ray(4)
    assert len(calls) == cluster.START_ATTEMPTS
    err = capsys.readouterr().err
    assert err.count("retrying") == cluster.START_ATTEMPTS - 1 and "node timed out during startup" in err
    assert report_error(e.value) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith("raypatch: error: the local Ray cluster did not start in 3 attempts") and "\n" not in line
