"""Checkpoints and Tune on real S3 semantics: a local S3-compatible server (moto's standalone server, as Ray's own
storage tests use), started and stopped here on 127.0.0.1 with the fake credentials conftest.py sets (none from
the environment reach it). Run: pytest tests/test_s3.py
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import step_losses
from tests.test_train import reference, tiny, trained_steps  # noqa: F401 - reference is a fixture

pytestmark = pytest.mark.ray
BUCKET = "raypatch-test"


@pytest.fixture(scope="module")
def s3_server():
    """(endpoint, boto3 client) of a moto server with one empty bucket; stopped after the module."""
    import boto3

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        client = boto3.client("s3", endpoint_url=f"http://{endpoint}", region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        yield endpoint, client
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def s3_uri(endpoint: str, prefix: str) -> str:
    return f"s3://{BUCKET}/{prefix}?endpoint_override={endpoint}&scheme=http&region=us-east-1"


def keys(client, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [o["Key"] for p in pages for o in p.get("Contents", [])]


@pytest.fixture()
def home(tmp_path, monkeypatch):
    """Runs on S3 keep metrics, plots and exports under ~/raypatch-runs: a temporary home here."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_checkpoints_on_s3_survive_a_worker_kill_and_a_stopped_run(reference, shards, s3_server, home,  # noqa: F811
                                                                   tmp_path, monkeypatch):
    """A worker killed in the patch phase resumes from the S3 checkpoint; then the run is stopped with no retries
    left and run again: it resumes from S3 too. Blocks and losses equal the fault-free local run's."""
    from raypatch.config import replace
    from raypatch.driver import fit

    endpoint, client = s3_server
    _, ref = reference
    cfg = replace(tiny(shards, tmp_path, "s3run", "checkpoint.max_failures=1"),
                  checkpoint={"storage_path": s3_uri(endpoint, "runs")})
    # The kill at step 6 uses the one retry (the group restarts from the S3 checkpoint); the kill at 22 stops it.
    monkeypatch.setenv("RAYPATCH_KILL_RANK", "1")
    monkeypatch.setenv("RAYPATCH_KILL_AT_STEPS", "6,22")
    with pytest.raises(Exception):  # noqa: B017 - no retries left: the run stops
        fit(cfg)
    saved = sorted({k.split("/")[2] for k in keys(client, "runs/s3run/checkpoint-")})
    assert len(saved) >= 2, keys(client, "runs/s3run/")[:10]
    monkeypatch.delenv("RAYPATCH_KILL_AT_STEPS")
    summary = fit(cfg)  # the same name and storage: resumes from the newest checkpoint in the bucket
    run = Path(summary["run_dir"])
    assert run.is_relative_to(home)
    assert summary["checkpoint"].startswith(f"{BUCKET}/runs/s3run/checkpoint-")
    assert trained_steps(run) == trained_steps(Path(ref["run_dir"]))
    a, b = step_losses(run), step_losses(Path(ref["run_dir"]))
    assert a.keys() == b.keys()
    for s in a:
        assert a[s] == pytest.approx(b[s], rel=1e-4, abs=1e-5), s
    assert (run / "hf" / "model.safetensors").is_file() and (run / "metrics.jsonl").is_file()

    # `raypatch export` reads the checkpoint from the bucket; the same weights as the run's own export.
    from safetensors.torch import load_file

    from raypatch.cli import main

    name = summary["checkpoint"].rsplit("/", 1)[1]
    assert main(["export", "--checkpoint", s3_uri(endpoint, f"runs/s3run/{name}"), "--out", str(tmp_path / "x")]) == 0
    a, b = load_file(tmp_path / "x" / "model.safetensors"), load_file(run / "hf" / "model.safetensors")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    assert main(["export", "--checkpoint", s3_uri(endpoint, "runs/s3run/checkpoint-9999999"), "--out",
                 str(tmp_path / "y")]) == 2 and not (tmp_path / "y").exists()


def test_tune_stores_and_restores_its_experiment_on_s3(shards, s3_server, home, tmp_path):
    """A search with storage on S3: Tune's experiment state and every trial's checkpoints and trial.json land in
    the bucket; running the same name again restores it from there and retrains nothing."""
    from raypatch.tune import parse_space, run_search
    from tests.test_tune import BUDGET, base

    endpoint, client = s3_server
    cfg = base(shards, tmp_path)
    storage = s3_uri(endpoint, "tune")
    space = parse_space(["patch.k=1,2"])
    rows = run_search(cfg, budget=BUDGET, space=space, name="s3search", storage=storage, concurrency=2)
    ok = sorted(r["trial"] for r in rows if r.get("val_loss") is not None)
    assert len(ok) == 2 and all(BUDGET - 512 < r["positions"] <= BUDGET for r in rows), rows
    stored = keys(client, "tune/s3search/")
    assert any(k.endswith("/trial.json") for k in stored) and any("/checkpoint-" in k for k in stored)
    assert any(k.startswith("tune/s3search/experiment_state") or "tuner.pkl" in k for k in stored), stored[:20]
    again = run_search(cfg, budget=BUDGET, space=space, name="s3search", storage=storage, concurrency=2)
    assert sorted(r["trial"] for r in again) == ok
    assert [r["val_loss"] for r in sorted(again, key=lambda r: r["trial"])] == \
        [r["val_loss"] for r in sorted(rows, key=lambda r: r["trial"])]
