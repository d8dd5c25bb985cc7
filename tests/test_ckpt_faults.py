"""Kills at every point of a checkpoint write (raypatch/faults.py, RAYPATCH_KILL_IN_CHECKPOINT): before any file,
mid-file in the local copy, after meta.json, mid-file in storage, after the whole upload but before Ray Train
registered it, and the whole process tree (driver, GCS, raylet, workers) mid-upload. Each run has no retries
left, so it fails; rerunning the same command must pass over the uncommitted checkpoint, resume from the last
committed one and end with the fault-free run's losses and trained blocks, leaving no local copy behind.

The fast case of this class (a kill mid-upload) is in the default tier (tests/test_train.py). These take about
10 minutes on 2 cores and are left out of CI. Run:

    python -m pytest -m drill tests/test_ckpt_faults.py    # RAYPATCH_WRITE_RESULTS=1 also writes the table
                                                           # to benchmarks/results/ckpt_faults.{json,md}
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from raypatch import presets
from raypatch.checkpoint import COMMITTED, check_checkpoint, find_latest
from raypatch.config import Config, apply_overrides

from .helpers import blocks_by_step, step_losses
from .test_jobs import kill_session

pytestmark = [pytest.mark.slow, pytest.mark.drill]
RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
ARGS = ["data.record_blocks=true", "log_every=1", "data.max_tokens=4096", "eval.wikitext=",
        "checkpoint.max_failures=0"]
_rows: list[dict] = []


def config(shards: str, storage: Path, name: str) -> Config:
    return apply_overrides(presets.tiny(), [f"data.shards={shards}", f"checkpoint.storage_path={storage}",
                                            f"checkpoint.name={name}", *ARGS])


@pytest.fixture(scope="module")
def reference(shards, ray_local, tmp_path_factory):
    """The fault-free run: 16 steps (patch, then token), a checkpoint every 4."""
    from raypatch.driver import fit

    cfg = config(shards, tmp_path_factory.mktemp("runs"), "ref")
    summary = fit(cfg)
    yield Path(summary["run_dir"])
    if os.environ.get("RAYPATCH_WRITE_RESULTS") and _rows:
        write_results(_rows)


def temp_copies() -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob("raypatch-*"))


def storage_state(d: Path) -> str:
    """What a kill left of checkpoint d in storage, in words for the results table."""
    if not d.is_dir():
        return "nothing"
    files = sorted(p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file())
    if (d / COMMITTED).exists():
        return f"committed ({len(files)} files)"
    torn = [f for f in files if f.endswith(".pt")]
    return f"{len(files)} files, {'meta.json, ' if 'meta.json' in files else ''}{len(torn)} state files, no marker"


def compare(run: Path, ref: Path) -> dict:
    a, b = step_losses(run), step_losses(ref)
    assert a.keys() == b.keys()
    diff = max(abs(a[s] - b[s]) for s in a)
    assert diff <= 1e-4 * max(abs(v) for v in b.values()), diff  # CPU, fixed seed, fp32: the same run
    assert blocks_by_step(run) == blocks_by_step(ref)
    return {"max_loss_diff": diff, "steps": len(a), "blocks_equal": True}


@pytest.mark.parametrize(("point", "rank", "step"), [
    ("start", 1, 8),      # before any file
    ("local", 1, 8),      # mid-file, local copy
    ("written", 0, 8),    # after meta.json, before any upload
    ("upload", 1, 12),    # mid-file in storage, beside rank 0's meta.json
    ("uploaded", 1, 12),  # all of it in storage, never registered
])
def test_a_kill_while_a_checkpoint_is_written_is_resumed_past(point, rank, step, reference, shards, ray_local,
                                                              tmp_path, monkeypatch, capsys):
    from raypatch.driver import fit, preflight

    cfg = config(shards, tmp_path, point)
    before = temp_copies()
    monkeypatch.setenv("RAYPATCH_KILL_IN_CHECKPOINT", f"{step}:{point}")
    monkeypatch.setenv("RAYPATCH_KILL_RANK", str(rank))
    t0 = time.time()
    with pytest.raises(Exception):  # noqa: B017 - Ray's worker-death error type varies by version
        fit(cfg)
    monkeypatch.delenv("RAYPATCH_KILL_IN_CHECKPOINT")
    run = tmp_path / point
    assert (run / f".killed-{point}-checkpoint-{step:07d}").exists(), "the fault never fired"
    torn = run / f"checkpoint-{step:07d}"
    left = storage_state(torn)
    latest = find_latest(run)
    assert latest is not None and latest.name == f"checkpoint-{step - 4:07d}"  # the one committed before
    capsys.readouterr()
    preflight(cfg)
    said = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("passing over ")]
    if torn.is_dir():
        assert not (torn / COMMITTED).exists()
        assert len(said) == 1 and torn.name in said[0] and f"resumes from {latest.name}" in said[0], said
    summary = fit(cfg)
    row = {"kill": f"{point} (rank {rank}, checkpoint-{step:07d})", "left_in_storage": left,
           "resumed_from": latest.name, **compare(run, reference), "seconds": round(time.time() - t0, 1)}
    check_checkpoint(summary["checkpoint"])
    assert temp_copies() <= before, "a local checkpoint copy outlived its run"
    _rows.append(row)


def test_the_whole_process_tree_killed_mid_upload_is_resumed_past(reference, shards, tmp_path):
    """`raypatch train` as a user runs it, in its own session (its own local Ray: GCS, raylet, workers); rank 1
    holds on its upload thread with half a state file in storage, and every process of the session is then
    SIGKILLed at once, as when the machine is lost. Rerunning the command finishes the fault-free run."""
    name, step = "tree", 12
    args = [sys.executable, "-m", "raypatch.cli", "train", "--config", "tiny", "--set", f"data.shards={shards}",
            f"checkpoint.storage_path={tmp_path}", f"checkpoint.name={name}", *ARGS]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    run = tmp_path / name
    before = temp_copies()
    t0 = time.time()
    proc = subprocess.Popen(args, env=env | {"RAYPATCH_KILL_IN_CHECKPOINT": f"{step}:hold", "RAYPATCH_KILL_RANK": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    held = run / f".holding-checkpoint-{step:07d}"  # written once the torn upload is in storage
    while not held.exists():
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() - t0 < 600, "the run never reached the held upload"
        time.sleep(0.5)
    torn = run / f"checkpoint-{step:07d}"
    time.sleep(1.0)  # rank 0's upload may go on meanwhile: whatever it reaches, the checkpoint is never registered
    kill_session(proc, signal.SIGKILL)
    left = storage_state(torn)
    assert not (torn / COMMITTED).exists()
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    latest_line = [ln for ln in done.stdout.splitlines() if ln.startswith("passing over ")]
    assert len(latest_line) == 1 and torn.name in latest_line[0], done.stdout[-3000:]
    assert f"resumes from checkpoint-{step - 4:07d}" in latest_line[0], latest_line
    row = {"kill": f"whole process tree, rank 1 mid-upload of checkpoint-{step:07d}", "left_in_storage": left,
           "resumed_from": latest_line[0].rsplit("resumes from ", 1)[1].split()[0].rstrip(".;,"),
           **compare(run, reference), "seconds": round(time.time() - t0, 1)}
    check_checkpoint(find_latest(run))
    # The killed workers' copies belonged to this node's temp directory; the rerun's workers swept them.
    assert temp_copies() <= before, "a local checkpoint copy outlived its run"
    _rows.append(row)


def write_results(rows: list[dict]) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ckpt_faults.json").write_text(json.dumps(rows, indent=1) + "\n")
    lines = ["# Kills while a checkpoint is written (tests/test_ckpt_faults.py)", "",
             "Tiny preset, 2 workers, ZeRO-2, 16 steps (8 patch, 8 token), a checkpoint every 4 steps, no retries: "
             "each faulted run fails, and the same command rerun resumes. Written by "
             "`RAYPATCH_WRITE_RESULTS=1 python -m pytest -m drill tests/test_ckpt_faults.py`.", "",
             "| kill | left in storage | resumed from | steps | max loss diff vs fault-free | blocks equal | s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['kill']} | {r['left_in_storage']} | {r['resumed_from']} | {r['steps']} | "
                     f"{r['max_loss_diff']:.2e} | {r['blocks_equal']} | {r['seconds']} |")
    (RESULTS / "ckpt_faults.md").write_text("\n".join(lines) + "\n")
