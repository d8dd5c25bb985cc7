"""8-worker elastic drills on a local multi-node Ray cluster (ray.cluster_utils.Cluster), one scenario per process.

    python tests/elastic8.py SCENARIO STAGE OUT_DIR SHARDS

Two worker "nodes" hold the training slots: node A five, node B three (one-thread CPU workers), the head only
the driver, the Train controller and Ray Data's reads. Scenarios, for ZeRO stage STAGE (1, 2 or 3):

    reference    8 workers, no fault
    control5     5 workers from the start, no fault (the reduction-order spread of a 5-worker run)
    control4     4 workers from the start, no fault
    patch        node B removed in the patch phase (3 workers killed at once): the run goes on with 5
                 (scale.min_workers=5), then node B comes back and the run grows to 8
    switch       the same, with the removal just before the switch: the 5-worker group crosses it
    resume4      an 8-worker run stopped by a worker death with no retries left, rerun with scale.num_workers=4

Writes OUT_DIR/result.json: per-step blocks of the last attempt, per-step losses, each rank-0 record (world
size, attempt), the steps trained twice and what the scenario did. tests/test_elastic8.py runs and compares them.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

from helpers import blocks_by_step, records, redone_steps, registered, step_losses

SCENARIOS = ("reference", "control5", "control4", "patch", "switch", "resume4")
PATCH_STEPS = 40  # 2048 tokens a step, K=2: 32 patch rows (4 per worker at 8, 6-7 at 5) and 64 token rows


def wait_for(pred, timeout: float, what: str) -> None:
    t0 = time.time()
    while not pred():
        if time.time() - t0 > timeout:
            raise TimeoutError(what)
        time.sleep(0.3)


def main(scenario: str, stage: str, out_dir: str, shards: str) -> None:
    import ray
    from ray.cluster_utils import Cluster

    from raypatch import presets
    from raypatch.config import apply_overrides
    from raypatch.driver import fit

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dash = sock.getsockname()[1]
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{dash}"
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 4, "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": dash})
    cluster.add_node(num_cpus=5, resources={"slot": 5})
    node_b = cluster.add_node(num_cpus=3, resources={"slot": 3})
    ray.init(address=cluster.address, log_to_driver=False)
    workers = {"control5": 5, "control4": 4}.get(scenario, 8)
    cfg = apply_overrides(presets.tiny(), [
        f"data.shards={shards}", f"checkpoint.storage_path={out}", f"checkpoint.name={scenario}",
        f"scale.zero_stage={stage}", f"scale.num_workers={workers}", "scale.worker_resources=slot=1",
        "scale.cpus_per_worker=1", "scale.resize_check_s=5", "optim.tokens_per_step=2048",
        f"data.max_tokens={2 * PATCH_STEPS * 2048}", "data.record_blocks=true", "checkpoint.every_steps=5",
        "checkpoint.keep=3", "checkpoint.max_failures=4", "eval.max_rows=16", "log_every=1",
        *(["scale.min_workers=5"] if scenario in ("patch", "switch") else []),
        *(["checkpoint.max_failures=0"] if scenario == "resume4" else [])])
    run = out / scenario
    result: dict = {"scenario": scenario, "stage": int(stage), "events": []}

    def event(msg: str) -> None:
        result["events"].append(f"{time.strftime('%H:%M:%S')} {msg}")
        print(msg, flush=True)

    def rank0() -> list[dict]:
        return [r for r in records(run) if r["rank"] == 0]

    def steps_on(world: int, after: float = 0.0) -> int:
        return sum(1 for r in rank0() if r["world"] == world and r["t"] > after)

    box: dict = {}

    def train(c) -> None:
        try:
            box["summary"] = fit(c, export=False)
        except BaseException as e:  # noqa: BLE001 - reported in result.json
            box["error"] = repr(e)

    try:
        if scenario == "resume4":
            os.environ |= {"RAYPATCH_KILL_AT_STEPS": str(PATCH_STEPS - 8), "RAYPATCH_KILL_RANK": "3"}
            train(cfg)
            event(f"8-worker run stopped: {box.pop('error', 'no error')[:200]}")
            os.environ.pop("RAYPATCH_KILL_AT_STEPS")
            result["registered_at_stop"] = registered(run)
            train(apply_overrides(cfg, ["scale.num_workers=4"]))
            event("rerun on 4 workers done")
        else:
            t = threading.Thread(target=train, args=(cfg,))
            t.start()
            if scenario in ("patch", "switch"):
                # Remove node B once an 8-worker checkpoint is registered at the chosen point of the patch phase.
                at = 10 if scenario == "patch" else PATCH_STEPS - 6
                wait_for(lambda: any(w == 8 and s >= at for s, w in registered(run)), 600,
                         f"no 8-worker checkpoint registered at step {at} or later")
                result["registered_before_shrink"] = registered(run)
                event(f"removing node B (3 workers) after step {max(r['global_step'] for r in rank0())}")
                cluster.remove_node(node_b)
                t_shrink = time.time()
                wait_for(lambda: steps_on(5, t_shrink) >= 6 and any(w == 5 for _, w in registered(run)), 600,
                         "the run never went on with 5 workers and checkpointed there")
                result["registered_before_grow"] = registered(run)
                event(f"5 workers trained to step {max(r['global_step'] for r in rank0())}; adding node B back")
                cluster.add_node(num_cpus=3, resources={"slot": 3})
                t_grow = time.time()
                wait_for(lambda: steps_on(8, t_grow) >= 3 or not t.is_alive(), 600, "the run never grew back to 8")
                event("8 workers again" if steps_on(8, t_grow) else "finished before growing back")
            t.join(timeout=1800)
    finally:
        result["error"] = box.get("error")
        result["finished"] = "summary" in box
        result["blocks"] = blocks_by_step(run)
        result["losses"] = {str(k): v for k, v in step_losses(run).items()} if (run / "metrics.jsonl").exists() else {}
        result["records"] = [{k: r[k] for k in ("world", "phase", "step", "global_step", "attempt", "t")}
                             for r in rank0()]
        result["redone_steps"] = redone_steps(records(run))
        if "summary" in box:
            result["final"] = {k: v for k, v in box["summary"]["final"].items() if k.endswith("/loss")}
        (out / "result.json").write_text(json.dumps(result))
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
    # Ray's OpenTelemetry exporter thread crashed (SIGSEGV in TemporalMetricStorage::buildMetrics) one of the
    # first 8-worker runs on this machine; no metrics are needed here.
    os.environ.setdefault("RAY_enable_metrics_collection", "0")
    # Give up on a worker group that cannot start within 15 s (default 60), so a shrink happens quickly.
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "15")
    os.environ.setdefault("RAYPATCH_STEP_DELAY_S", "0.25")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    if len(sys.argv) != 5 or sys.argv[1] not in SCENARIOS or sys.argv[2] not in ("1", "2", "3"):
        sys.exit(f"usage: elastic8.py {{{','.join(SCENARIOS)}}} {{1,2,3}} OUT_DIR SHARDS")
    main(*sys.argv[1:5])
