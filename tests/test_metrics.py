"""What the run's files survive: a metrics.jsonl torn by a kill mid-write, a full disk (ENOSPC, real, from
/dev/full) in the driver and inside a Ray worker (one `raypatch: error:` line naming the free space, exit 2), and
the local checkpoint copies a killed worker leaves (removed, and nothing else)."""

from __future__ import annotations

import errno
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from raypatch.cli import report_error
from raypatch.metrics import MetricsWriter, plot_runs, read_metrics


def rows(n: int, start: int = 0) -> list[dict]:
    return [{"step": s, "phase": "token", "val/loss": 5.0 - 0.1 * s, "positions/total": 100 * s, "eval/step": s,
             "perf/flops_total": 1e9 * s} for s in range(start, start + n)]


def test_a_torn_metrics_file_is_read_around_and_written_on_a_fresh_line(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    w = MetricsWriter(tmp_path)
    for r in rows(3):
        w.write(r)
    w.close()
    with open(path, "a") as f:  # a kill mid-write, then garbage bytes as from a damaged disk block
        f.write('{"step": 3, "phase": "tok')
    w = MetricsWriter(tmp_path)  # the resumed run
    for r in rows(2, start=3):
        w.write(r)
    w.close()
    with open(path, "ab") as f:
        f.write(b"\x00\xff garbage\n")
    got = read_metrics(path)
    assert [r["step"] for r in got] == [0, 1, 2, 3, 4]  # the resumed run's first row is not glued onto the torn one
    err = capsys.readouterr().err
    assert err.count("raypatch: warning:") == 1 and f"{path}:4 and 1 more" in err, err
    plot_runs({"run": path}, tmp_path / "plot.png")  # the plot is still drawn from the readable rows
    assert (tmp_path / "plot.png").stat().st_size > 0


def test_a_full_disk_in_the_driver_is_one_line(tmp_path, capsys):
    with pytest.raises(OSError) as e:
        with open("/dev/full", "w") as f:  # the kernel's own ENOSPC
            f.write("x" * 10_000)
            f.flush()
    assert e.value.errno == errno.ENOSPC
    out = tmp_path / "out"
    assert report_error(e.value, [(str(out), "--out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("raypatch: error: no space left on device") and "\n" not in err
    assert f"at {tmp_path} (--out)" in err and "GiB" in err  # the nearest existing folder of --out, measured


def _fill(path: str) -> None:
    Path(path).write_text(json.dumps(list(range(10_000))))


@pytest.mark.ray
def test_a_full_disk_inside_a_ray_worker_is_one_line(ray_local, tmp_path, capsys):
    import ray

    task = ray.remote(_fill)
    with pytest.raises(Exception) as e:  # ray.exceptions.RayTaskError wrapping the worker's OSError
        ray.get(task.remote("/dev/full"))
    assert not isinstance(e.value, OSError) or type(e.value).__module__.startswith("ray")
    assert report_error(e.value, [(str(tmp_path), "checkpoint.storage_path")]) == 2
    err = capsys.readouterr().err.strip()
    # A failed write names no file (the kernel reports it on write, not open): the line names where it writes.
    assert err.startswith("raypatch: error: no space left on device") and "\n" not in err, err
    assert f"at {tmp_path} (checkpoint.storage_path)" in err


def test_the_copies_of_dead_processes_are_swept_and_nothing_else():
    from raypatch.checkpoint import sweep_temp_copies, temp_prefix

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    tmp = Path(tempfile.gettempdir())
    left = Path(tempfile.mkdtemp(prefix=f"raypatch-ckpt-{dead}-"))  # a worker killed mid-save
    (left / "ds").mkdir()
    (left / "ds" / "shard.pt").write_bytes(b"x")
    mine = Path(tempfile.mkdtemp(prefix=temp_prefix("resume")))  # a live process's copy
    other = Path(tempfile.mkdtemp(prefix="raypatch-ckpt-notapid-"))  # not a name raypatch writes
    try:
        assert mine.name.startswith(f"raypatch-resume-{os.getpid()}-")
        assert left in sweep_temp_copies()
        assert not left.exists() and mine.is_dir() and other.is_dir() and tmp.is_dir()
    finally:
        for d in (left, mine, other):
            shutil.rmtree(d, ignore_errors=True)


def on_full_disk(tmp_path: Path, size: str, *args: str) -> tuple[int, str, list[str]]:
    """`raypatch *args` with the word FULL replaced by a fresh tmpfs of `size` (a real filesystem that runs
    out of space: the kernel's ENOSPC, mid-write), mounted in a private mount namespace (`unshare`) that ends
    with the command. Returns the exit code, stderr and what the command left on that filesystem."""
    if shutil.which("unshare") is None:
        pytest.skip("needs util-linux's unshare to mount a small filesystem privately")
    full = tmp_path / "full"
    full.mkdir()
    argv = " ".join(shlex.quote(a.replace("FULL", str(full))) for a in args)
    script = (f"mount -t tmpfs -o size={size} tmpfs {full} || exit 99; {shlex.quote(sys.executable)} -m "
              f"raypatch.cli {argv} 2>{tmp_path}/err; rc=$?; find {full} -mindepth 1 -printf '%P\\n' "
              f">{tmp_path}/left; exit $rc")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], env=env, capture_output=True, text=True,
                          timeout=600)
    if proc.returncode == 99:
        pytest.skip(f"this machine does not let a user mount a private tmpfs: {proc.stderr.strip()[:200]}")
    return proc.returncode, (tmp_path / "err").read_text(), (tmp_path / "left").read_text().split()


def test_prepare_onto_a_full_disk_is_one_line_and_leaves_nothing(corpus, tokenizer_dir, tmp_path):
    rc, err, left = on_full_disk(tmp_path, "256k", "prepare", "--input", str(corpus), "--tokenizer",
                                 tokenizer_dir, "--out", "FULL/shards", "--shard-tokens", "40000")
    lines = [ln for ln in err.splitlines() if ln.startswith("raypatch: error:")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert lines[0].startswith("raypatch: error: no space left on device"), lines
    assert f"at {tmp_path / 'full'} (--out)" in lines[0] or f"{tmp_path / 'full'}" in lines[0], lines
    assert left == [], left  # the half-written set (a temporary sibling) is gone


def test_a_full_disk_under_the_run_reaches_the_terminal(tmp_path):
    """The run's log file and checkpoints on a full disk: the one line still reaches the terminal."""
    rc, err, left = on_full_disk(tmp_path, "64k", "train", "--config", "tiny", "--set",
                                 "checkpoint.storage_path=FULL", "data.max_tokens=4096", "eval.wikitext=")
    lines = [ln for ln in err.splitlines() if ln.startswith("raypatch: error:")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert lines[0].startswith("raypatch: error: no space left on device"), lines
    assert f"{tmp_path / 'full'}" in lines[0] and "checkpoint.storage_path" in lines[0], lines
    assert not [f for f in left if "/checkpoint-" in f and f.endswith("committed.json")], left
