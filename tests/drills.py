"""Operations drills on a local multi-node Ray cluster (ray.cluster_utils.Cluster), one scenario per process.

    python tests/drills.py elastic  OUT_DIR SHARDS   # remove a node mid-run, then add it back
    python tests/drills.py preempt  OUT_DIR SHARDS   # drain a node with reason PREEMPTION, then reclaim it
    python tests/drills.py sigterm  OUT_DIR SHARDS   # SIGTERM a worker with no notice
    (KEY=VALUE config overrides may follow SHARDS, e.g. phases.schedule=4:0.0625,2:0.1875,1:0.75)

Each scenario trains the tiny preset on two "nodes" (the head and node B, one training slot each), disturbs it,
lets it finish, and writes OUT_DIR/result.json with the blocks trained per step (each rank's last attempt),
the log lines and what the scenario observed. tests/test_operations.py runs them and compares the blocks
with a fault-free run. A script, not a test module: a multi-node cluster needs its own driver process.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

# tests/ is first on sys.path when this runs as a script
from helpers import blocks_by_step, records, redone_steps, registered


def wait_for(pred, timeout: float, what: str) -> None:
    t0 = time.time()
    while not pred():
        if time.time() - t0 > timeout:
            raise TimeoutError(what)
        time.sleep(0.5)


def main(scenario: str, out_dir: str, shards: str, overrides: list[str]) -> None:
    import ray
    from ray.cluster_utils import Cluster

    from raypatch import presets
    from raypatch.config import apply_overrides
    from raypatch.driver import fit

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # This cluster's own dashboard for Train V2's placement-group cleaner (raypatch.cluster.start_local_ray says why),
    # not whatever a parent process (a pytest session with its own cluster) left in the environment.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dash = sock.getsockname()[1]
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{dash}"
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 3, "resources": {"slot": 1}, "include_dashboard": True, "dashboard_host": "127.0.0.1",
        "dashboard_port": dash})
    node_b = cluster.add_node(num_cpus=2, resources={"slot": 1})
    ray.init(address=cluster.address, log_to_driver=False)
    elastic = scenario == "elastic" or scenario == "preempt"
    cfg = apply_overrides(presets.tiny(), [
        f"data.shards={shards}", f"checkpoint.storage_path={out}", f"checkpoint.name={scenario}",
        "data.record_blocks=true", "data.max_tokens=65536", "checkpoint.every_steps=8", "checkpoint.keep=4",
        "checkpoint.max_failures=3", "scale.worker_resources=slot=1", "scale.cpus_per_worker=0.5",
        "scale.resize_check_s=5", f"scale.min_workers={1 if elastic else 0}", "eval.max_rows=4", "log_every=8",
        # The drill sends the notice mid-run: ask at every step. SIGTERM hands over (off by default).
        "checkpoint.preemption_check_every=1", "checkpoint.sigterm_grace_s=120", *overrides])
    run = out / scenario
    result: dict = {"scenario": scenario, "events": []}
    box: dict = {}

    def train() -> None:
        try:
            box["summary"] = fit(cfg, export=False)
        except BaseException as e:  # noqa: BLE001 - reported in result.json
            box["error"] = repr(e)

    t = threading.Thread(target=train)
    t.start()

    def steps_with(world: int) -> int:
        return sum(1 for r in records(run) if r["world"] == world and r["rank"] == 0)

    def event(msg: str) -> None:
        result["events"].append(f"{time.strftime('%H:%M:%S')} {msg}")
        print(msg, flush=True)

    try:
        if scenario != "reference":
            wait_for(lambda: steps_with(2) >= 12, 240, "two workers never trained 12 steps")
        if scenario == "elastic":
            # Shrink once a 2-worker checkpoint is registered, grow once a 1-worker one is: both resizes then
            # resume through a universal checkpoint at the other data-parallel size.
            wait_for(lambda: any(w == 2 for _, w in registered(run)), 240, "no 2-worker checkpoint registered")
            result["registered_before_shrink"] = registered(run)
            event(f"removing node B (registered checkpoints {result['registered_before_shrink']})")
            cluster.remove_node(node_b)
            wait_for(lambda: steps_with(1) >= 8 and any(w == 1 for _, w in registered(run)), 240,
                     "the run never continued on one worker and checkpointed there")
            event(f"one worker is training (registered {registered(run)}); adding node B back")
            result["registered_before_grow"] = registered(run)
            cluster.add_node(num_cpus=2, resources={"slot": 1})
            n2 = steps_with(2)
            wait_for(lambda: steps_with(2) > n2 + 4 or not t.is_alive(), 300, "the run never grew back to 2")
            event("two workers again" if steps_with(2) > n2 else "finished before growing")
        elif scenario == "preempt":
            from ray.core.generated import autoscaler_pb2

            gcs = ray._raylet.GcsClient(address=cluster.gcs_address)
            deadline = int(time.time() * 1000) + 60_000
            reason = autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION")
            ok, msg = gcs.drain_node(node_b.node_id, reason, "drill: spot reclaim", deadline)
            event(f"drain requested (accepted={ok} {msg})")
            def jit() -> list[int]:
                m = run / "metrics.jsonl"
                steps = [r["step"] for r in map(json.loads, m.read_text().splitlines())
                         if r.get("event") == "preemption"] if m.exists() else []
                return [s for s in steps if (run / f"checkpoint-{s:07d}" / "meta.json").exists()]

            wait_for(lambda: bool(jit()), 120, "no just-in-time checkpoint after the preemption notice")
            result["jit_steps"] = jit()
            # A reclaim comes at the notice's deadline, not at once: wait until Ray Train has registered the
            # checkpoint (its manager snapshot names it), as it would within the deadline on a real spot node.
            snap = run / "checkpoint_manager_snapshot.json"
            name = f"checkpoint-{result['jit_steps'][0]:07d}"
            wait_for(lambda: snap.exists() and name in snap.read_text(), 60, "the checkpoint was never registered")
            event(f"just-in-time checkpoint at step {result['jit_steps']}; reclaiming node B")
            cluster.remove_node(node_b)
        elif scenario == "sigterm":
            # Kill once Ray Train has registered a checkpoint (its manager snapshot names it): the claim under
            # test is "at most the work since the last checkpoint is lost".
            wait_for(lambda: bool(registered(run)), 240, "no checkpoint was registered")
            result["registered_at_kill"] = max(step for step, _ in registered(run))
            pid = next(r["pid"] for r in reversed(records(run)) if r["rank"] == 1)
            result["killed_at_step"] = max(r["global_step"] for r in records(run) if r["rank"] == 1)
            event(f"SIGTERM to rank 1 (pid {pid}) after step {result['killed_at_step']}")
            os.kill(pid, signal.SIGTERM)
        t.join(timeout=900)
    finally:
        result["error"] = box.get("error")
        result["finished"] = "summary" in box
        result["blocks"] = blocks_by_step(run)
        result["records"] = [{k: r[k] for k in ("rank", "world", "phase", "step", "global_step", "pid", "t",
                                                "attempt")} for r in records(run)]
        result["redone_steps"] = redone_steps(records(run))
        (out / "result.json").write_text(json.dumps(result))
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
    # Give up on a worker group that cannot start within 15 s (default 60), so a shrink happens quickly.
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "15")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    if sys.argv[1] not in ("reference", "elastic", "preempt", "sigterm"):
        sys.exit(f"drills.py: unknown scenario {sys.argv[1]!r} (reference, elastic, preempt or sigterm)")
    main(*sys.argv[1:4], sys.argv[4:])
