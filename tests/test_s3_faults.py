"""Fault drills for training from shards on S3 (slow tier): the store resets connections and throttles, the store
is killed and restarted, a worker is killed while streaming, a shard is deleted mid-run. Each run either ends
with exactly the blocks and losses of the fault-free run on local disk, or stops with one line naming the object.

The faults are timed around the phase switch (global step 16 of 32), where each worker opens the token phase's
stream and reads its first row groups from the store. Run: pytest -m slow tests/test_s3_faults.py (~4 min).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from raypatch.safety import InputError
from tests.helpers import step_losses
from tests.s3util import BUCKET, FaultProxy, S3Server, keys, restore, snapshot, uri
from tests.test_s3 import SHARD_ARGS
from tests.test_train import reference, tiny, trained_steps  # noqa: F401 - reference is a fixture

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def store(corpus, tokenizer_dir, shards):
    """A moto server holding the `shards` set at sets/a (prepared local -> S3), and a fault proxy before it."""
    from raypatch.prepare import prepare

    server = S3Server().start()
    server.client().create_bucket(Bucket=BUCKET)
    prepare([str(corpus)], tokenizer_dir, uri(server.endpoint, "sets/a"), **SHARD_ARGS)
    proxy = FaultProxy(server.endpoint)
    yield server, proxy
    proxy.close()
    server.stop()


def at_step(run_dir: Path, step: int, action: Callable[[], None]) -> threading.Thread:
    """Run `action` once rank 0's metrics show global step >= `step` (polled; the run logs every step)."""
    def watch() -> None:
        f = run_dir / "metrics.jsonl"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                rows = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
            except (OSError, ValueError):
                rows = []
            if any(r.get("step", 0) >= step for r in rows):
                action()
                return
            time.sleep(0.02)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    return t


def same_as_reference(summary: dict, ref: dict, exact: bool = True) -> None:
    run, ref_run = Path(summary["run_dir"]), Path(ref["run_dir"])
    assert trained_steps(run) == trained_steps(ref_run)  # no block lost, none repeated
    a, b = step_losses(run), step_losses(ref_run)
    assert a.keys() == b.keys()
    for s in a:
        assert a[s] == (b[s] if exact else pytest.approx(b[s], rel=1e-4, abs=1e-5)), s


def test_resets_and_slowdowns_are_retried_and_change_nothing(reference, store, tmp_path):  # noqa: F811
    """From step 10 the store resets the next 8 connections and answers 503 SlowDown for 4 s: the token phase's
    first reads meet them, retry with backoff, and the run trains exactly what the fault-free run trained."""
    from raypatch.driver import fit

    _, ref = reference
    _, proxy = store
    cfg = tiny(uri(proxy.endpoint, "sets/a"), tmp_path, "flaky")
    before = proxy.faults

    def fault() -> None:
        proxy.resets = 8
        proxy.slow_down(4.0)

    watcher = at_step(tmp_path / "flaky", 10, fault)
    summary = fit(cfg)
    watcher.join(1)
    assert proxy.faults - before >= 8, "no request met a fault: the drill tested nothing"
    same_as_reference(summary, ref)


def test_store_killed_and_restarted_mid_run(reference, store, tmp_path):  # noqa: F811
    """From step 10 the store is down (killed; connections refused) for 6 s, then a new server process starts on
    the same port with the same objects (a store's disks outlive its process): the run waits and ends exactly
    as the fault-free run."""
    from raypatch.driver import fit

    _, ref = reference
    server, proxy = store
    objects = snapshot(server.client())
    # Through the proxy (no faults of its own): it counts the requests that found the server gone.
    cfg = tiny(uri(proxy.endpoint, "sets/a"), tmp_path, "restart")
    before = proxy.faults
    down = threading.Event()

    def kill_and_restart() -> None:
        # moto keeps its objects in memory: the new process gets them back (a real store's disks outlive its
        # process) before the proxy lets requests through again, so no reader sees an empty bucket.
        proxy.down = True
        server.stop()
        down.set()
        time.sleep(6)
        server.start()
        restore(server.client(), objects)
        proxy.down = False

    watcher = at_step(tmp_path / "restart", 10, kill_and_restart)
    summary = fit(cfg)
    watcher.join(30)
    assert down.is_set() and proxy.faults > before, "no read met the dead store: the drill tested nothing"
    same_as_reference(summary, ref)


def test_worker_killed_while_streaming_from_s3(reference, store, tmp_path, monkeypatch):  # noqa: F811
    """A worker SIGKILLed in each phase: the group restarts from its checkpoint and streams again from the
    store at the exact block (the cursor counts blocks)."""
    from raypatch.driver import fit

    _, ref = reference
    server, _ = store
    monkeypatch.setenv("RAYPATCH_KILL_AT_STEPS", "6,22")
    monkeypatch.setenv("RAYPATCH_KILL_RANK", "1")
    summary = fit(tiny(uri(server.endpoint, "sets/a"), tmp_path, "killed", "checkpoint.max_failures=2"))
    run = Path(summary["run_dir"])
    assert (run / ".killed-at-6").exists() and (run / ".killed-at-22").exists()
    same_as_reference(summary, ref, exact=False)  # resumed from a checkpoint: as test_train's kill test


def test_shard_deleted_mid_run_stops_with_one_line(store, ray_local, tmp_path):
    """Every shard of a copy of the set deleted at step 10: the token phase's first read finds its shard gone
    and the run stops with one line naming the object (and nothing the user had is touched)."""
    from raypatch.driver import fit

    server, _ = store
    client = server.client()
    for k in keys(client, "sets/a/"):
        client.copy_object(Bucket=BUCKET, Key=k.replace("sets/a/", "sets/del/"), CopySource=f"{BUCKET}/{k}")
    shard_keys = [k for k in keys(client, "sets/del/") if k.endswith(".parquet")]

    def delete() -> None:
        for k in shard_keys:
            client.delete_object(Bucket=BUCKET, Key=k)

    at_step(tmp_path / "del", 10, delete)
    with pytest.raises(InputError, match=r"s3://raypatch-test/sets/del/train-\d{5}.parquet: no such object"):
        fit(tiny(uri(server.endpoint, "sets/del"), tmp_path, "del"))
