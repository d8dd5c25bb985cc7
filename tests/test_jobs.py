"""`ray job submit` against a real local head started with `ray start --head`.

Submits the tiny pretrain job and checks its artifacts, stops a second job with the job API, and resubmits it
under the same run name to resume from its checkpoint. Then a head is lost mid-run (every process of it
SIGKILLed) and the job is submitted to a fresh head, as a KubeRay RayJob retry does (k8s/pretrain.yaml): it
resumes from storage and trains the blocks of an uninterrupted run. Each head runs in its own process session and
is shut down by killing that session (never `ray stop`, which would end every Ray process on the machine).

Run: pytest tests/test_jobs.py -m slow   (about 6 minutes)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from raypatch.checkpoint import COMMITTED

from .conftest import ROOT
from .helpers import blocks_by_step, registered

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_head(tmp: Path) -> tuple[subprocess.Popen, str, Any]:
    """A head node on 127.0.0.1 with its own ports and temp dir, in its own process session; token auth off for
    head and client alike. Returns the `ray start` process, the dashboard address and a job client."""
    port, dash, agent, agent_grpc, metrics, rt_env = (_free_port() for _ in range(6))
    # RAY_API_SERVER_ADDRESS: this head's own dashboard (raypatch.cluster.start_local_ray says why), not the one a
    # local cluster of this pytest session may have put in the environment.
    # PATH: a job's `python` is this interpreter, as on a cluster image with the venv activated, also when pytest
    # itself was started as .venv/bin/python without activating it.
    env = os.environ | {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
                        "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{dash}",
                        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", f"--port={port}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=4", "--include-dashboard=true",
         # Own agent ports: the session's other local cluster already holds Ray's default ones.
         f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
         f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={rt_env}", f"--temp-dir={tmp}"],
        env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    address = f"http://127.0.0.1:{dash}"
    from ray.job_submission import JobSubmissionClient

    for _ in range(180):  # a loaded 2-core machine can take minutes to bring a head up
        try:
            with _talking_to(address):
                client = JobSubmissionClient(address)
                client.list_jobs()
            return proc, address, client
        except Exception:  # noqa: BLE001 - the head is still starting
            time.sleep(1)
    kill_session(proc)
    raise AssertionError("the head did not come up")


@contextlib.contextmanager
def _talking_to(address: str) -> Iterator[None]:
    """RAY_API_SERVER_ADDRESS overrides the address given to JobSubmissionClient, so it must name the head the
    test talks to (the session's local cluster set it to its own dashboard)."""
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_API_SERVER_ADDRESS")}
    os.environ.update(RAY_AUTH_MODE="disabled", RAY_API_SERVER_ADDRESS=address)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def kill_session(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Every process of the head's session (GCS, raylet, dashboard, job drivers, workers) at once, as when the
    head's pod or VM is lost; then wait until none is left. Never `ray stop`: it ends every Ray process here."""
    import psutil

    def members() -> list[psutil.Process]:
        out = []
        for p in psutil.process_iter():
            try:
                if os.getsid(p.pid) == proc.pid:
                    out.append(p)
            except (OSError, psutil.Error):
                pass
        return out

    for p in members():
        try:
            p.send_signal(sig)
        except psutil.Error:
            pass
    proc.wait(timeout=60)
    t0 = time.time()
    while (left := members()) and time.time() - t0 < 60:
        if sig == signal.SIGKILL or time.time() - t0 > 20:  # a SIGTERM gets 20 s to end on its own
            for p in left:
                try:
                    p.kill()
                except psutil.Error:
                    pass
        time.sleep(0.5)
    assert not members(), "processes of the killed head are still alive"


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    proc, address, client = start_head(tmp_path_factory.mktemp("rayhead"))
    with _talking_to(address):
        yield client
    kill_session(proc, signal.SIGTERM)


def _wait(client, job_id: str, states: set[str], timeout: float = 400) -> str:
    from ray.job_submission import JobStatus

    t0 = time.time()
    while time.time() - t0 < timeout:
        status = client.get_job_status(job_id)
        if status.value in states:
            return status.value
        if status in (JobStatus.FAILED,) and "FAILED" not in states:
            raise AssertionError(client.get_job_logs(job_id)[-3000:])
        time.sleep(1)
    raise AssertionError(f"job {job_id} not in {states} after {timeout}s: {client.get_job_logs(job_id)[-3000:]}")


def _submit(client, args: str, **env: str) -> str:
    runtime_env = {"working_dir": str(ROOT), "excludes": [".venv", ".git", "runs", "benchmarks/results"],
                   "env_vars": {"RAY_AUTH_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false", **env}}
    for _ in range(60):  # the head answers list_jobs before its job agent is ready to take a submission
        try:
            return client.submit_job(entrypoint=f"python jobs/pretrain.py --config tiny --set {args}",
                                     runtime_env=runtime_env)
        except RuntimeError as e:
            if "No available agent" not in str(e):
                raise
            time.sleep(2)
    raise AssertionError("the head's job agent never became available")


def test_submit_stop_and_resubmit(head, shards, tmp_path):
    client = head
    common = f"data.shards={shards} checkpoint.storage_path={tmp_path} eval.wikitext="
    job = _submit(client, f"{common} checkpoint.name=job1")
    assert _wait(client, job, {"SUCCEEDED", "FAILED"}) == "SUCCEEDED", client.get_job_logs(job)[-3000:]
    run = tmp_path / "job1"
    assert sorted(run.glob("checkpoint-*")) and (run / "metrics.jsonl").exists()
    assert (run / "hf" / "model.safetensors").exists() and (run / "summary.json").exists()
    assert "| patch K=2" in client.get_job_logs(job)

    # A longer job: stop it once Ray Train has registered a checkpoint, then resubmit the same run name. An
    # upload Ray has not registered yet (it registers on its controller's next poll) does not count: a stop
    # in that window resumes from the previous registered checkpoint, or from scratch if there is none.
    long = f"{common} checkpoint.name=job2 data.max_tokens=0 checkpoint.every_steps=2"
    job2 = _submit(client, long)
    t0 = time.time()
    while not (stopped_at := registered(tmp_path / "job2")):
        assert time.time() - t0 < 300, client.get_job_logs(job2)[-3000:]
        assert client.get_job_status(job2).value in ("PENDING", "RUNNING"), client.get_job_logs(job2)[-3000:]
        time.sleep(1)
    assert client.stop_job(job2)
    assert _wait(client, job2, {"STOPPED"}, timeout=120) == "STOPPED"
    time.sleep(3)  # let the stopped job's workers release their CPUs
    job3 = _submit(client, long)
    logs = ""
    t0 = time.time()
    while "resumed from" not in logs:
        assert time.time() - t0 < 300, logs[-3000:]
        assert client.get_job_status(job3).value in ("PENDING", "RUNNING"), logs[-3000:]
        logs = client.get_job_logs(job3)
        time.sleep(2)
    assert client.stop_job(job3)
    assert _wait(client, job3, {"STOPPED"}, timeout=120) == "STOPPED"
    # It resumed from a checkpoint Ray had registered when job2 was stopped (or a later one job2 reached).
    resumed = int(logs.split("resumed from")[1].split("checkpoint-")[1][:7])
    assert resumed >= max(step for step, _ in stopped_at), (resumed, stopped_at)
    assert Path(tmp_path / "job2").is_dir()


def test_a_lost_head_resumes_from_storage_on_a_fresh_head(head, shards, tmp_path):
    """What a KubeRay RayJob retry does after its head pod is lost (k8s/pretrain.yaml, backoffLimit): the same job,
    same checkpoint.name and storage path, submitted to a new cluster. A restarted head keeps no state of its own
    (kuberay#2155), so the run must resume from storage alone; it then trains exactly the blocks of a run that was
    never interrupted."""
    store = tmp_path / "bucket"
    common = (f"data.shards={shards} checkpoint.storage_path={store} eval.wikitext= data.record_blocks=true "
              "data.max_tokens=12288 checkpoint.every_steps=4")
    # A short --temp-dir: Ray's Unix sockets live under it, and their paths may not exceed 107 bytes.
    lost_tmp = Path(tempfile.mkdtemp(prefix="rayhead-"))
    lost_proc, lost_address, lost_client = start_head(lost_tmp)
    try:
        with _talking_to(lost_address):
            # Slowed down (faults.py) so that the head is lost mid-run, after a checkpoint and before the end.
            job = _submit(lost_client, f"{common} checkpoint.name=run", RAYPATCH_STEP_DELAY_S="0.3")
            t0 = time.time()
            while not list((store / "run").glob(f"checkpoint-*/{COMMITTED}")):
                assert time.time() - t0 < 300, lost_client.get_job_logs(job)[-3000:]
                assert lost_client.get_job_status(job).value in ("PENDING", "RUNNING"), \
                    lost_client.get_job_logs(job)[-3000:]
                time.sleep(0.5)
    finally:
        kill_session(lost_proc)  # GCS, raylet, the driver and both workers at once
        shutil.rmtree(lost_tmp, ignore_errors=True)
    assert not (store / "run" / "summary.json").exists(), "the run ended before its head was lost"

    # The retry: a fresh head (this module's), the same submission.
    job = _submit(head, f"{common} checkpoint.name=run")
    assert _wait(head, job, {"SUCCEEDED", "FAILED"}) == "SUCCEEDED", head.get_job_logs(job)[-3000:]
    logs = head.get_job_logs(job)
    resumed = int(logs.split("resumed from")[1].split("checkpoint-")[1][:7])
    assert 0 < resumed, logs[-3000:]
    ref = _submit(head, f"{common} checkpoint.name=ref")
    assert _wait(head, ref, {"SUCCEEDED", "FAILED"}) == "SUCCEEDED", head.get_job_logs(ref)[-3000:]
    assert blocks_by_step(store / "run") == blocks_by_step(store / "ref")
    assert (store / "run" / "hf" / "model.safetensors").exists()
