"""raypatch/cluster.py: a run the local cluster can never hold fails in seconds, naming what is missing, before
Ray starts; on a cluster raypatch joined, a run that waits for resources says so while it waits."""

from __future__ import annotations

import time

import pytest

from raypatch import presets
from raypatch.cli import main
from raypatch.cluster import local_cpus, pending_lines, room_needed
from raypatch.config import apply_overrides


@pytest.mark.parametrize("workers", [64, local_cpus()])
def test_more_workers_than_the_local_cluster_holds_fail_at_once(workers, tmp_path, capsys, monkeypatch):
    """64 workers, and as many workers as the local cluster has CPUs (Ray Data's reads would never get one):
    one line, exit 2, in seconds, and no Ray cluster started (the unit tier's fixture checks that)."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    t0 = time.time()
    rc = main(["train", "--config", "tiny", "--set", f"scale.num_workers={workers}", "optim.tokens_per_step=8192",
               f"checkpoint.storage_path={tmp_path}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and err.startswith("raypatch: error: "), err
    assert f"scale.num_workers={workers}" in err and f"CPU {workers + 0.25:g} (has {local_cpus()})" in err, err
    assert "data.read_cpus" in err and time.time() - t0 < 30
    assert not list(tmp_path.rglob("checkpoint-*"))


def test_room_counts_the_fewest_workers_of_an_elastic_run():
    cfg = apply_overrides(presets.tiny(), ["scale.num_workers=8", "scale.min_workers=2", "scale.cpus_per_worker=2",
                                           "optim.tokens_per_step=1024", "scale.worker_resources=spot=1"])
    assert room_needed(cfg) == {"CPU": 2 * 2 + cfg.data.read_cpus, "spot": 2.0}


@pytest.mark.ray
def test_a_run_waiting_for_resources_says_what_it_waits_for(ray_local):
    """A placement group the cluster cannot place (as a worker group larger than the cluster asks for)."""
    from ray.util.placement_group import placement_group, remove_placement_group

    lines: list[str] = []
    pg = placement_group([{"CPU": 3.0}] * 5)
    try:
        with pending_lines(lines.append, every_s=1.0, after_s=1.0):
            t0 = time.time()
            while not lines and time.time() - t0 < 30:
                time.sleep(0.2)
    finally:
        remove_placement_group(pg)
    assert lines and lines[0].startswith("waiting "), lines
    assert "5 x {'CPU': 3.0}" in lines[0] and "free now: {'CPU': " in lines[0], lines
