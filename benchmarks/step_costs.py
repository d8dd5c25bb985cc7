"""Fixed per-step costs of the training step that issue 14 removed, measured apart from training.

1. `ray.train.get_preemption_info()` per call inside a Ray Train worker group of 1 and 2 workers: a barrier the
   loop used to call every step (now about every checkpoint.preemption_check_seconds).
2. One AdamW step over the demo model's parameters on one thread: torch's per-tensor loop, foreach and the fused
   kernel (raypatch now asks DeepSpeed for fused=True).
3. One whole patch-phase optimizer step (K=4, the demo's 4,096 tokens: micro-batches of 4 rows of 512 tokens,
   forward, backward, DeepSpeed's step) inside a Ray Train worker group of 1 and 2 workers, without ZeRO (the fp32
   default) and with ZeRO-1, on random token ids; and one gloo all-reduce of a gradient-sized fp32 tensor (what
   every data-parallel step sends), the fixed per-step cost of more than one worker.
4. The same patch micro-batch's forward and backward in plain processes without Ray: one alone, then two at once,
   which says whether the machine's cores scale on their own (the reference for the 2-worker rows of 3).

Run: python benchmarks/step_costs.py   (about 3 minutes; writes benchmarks/results/step_costs.json|md)
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def barrier_loop(config: dict[str, Any]) -> None:
    import ray.train

    for _ in range(5):
        ray.train.get_preemption_info()
    t = time.perf_counter()
    for _ in range(config["calls"]):
        ray.train.get_preemption_info()
    ms = 1e3 * (time.perf_counter() - t) / config["calls"]
    if ray.train.get_context().get_world_rank() == 0:
        Path(config["out"]).write_text(str(ms))


def engine_loop(config: dict[str, Any]) -> None:
    """Median ms of a whole patch step through DeepSpeed at config['stage'], and of one gradient all-reduce."""
    import json
    import statistics

    import deepspeed
    import deepspeed.ops
    import ray.train
    import torch
    import torch.distributed as dist

    from raypatch import presets
    from raypatch.model import PatchLM, build_model, num_params
    from raypatch.optim import deepspeed_config, grad_accum_steps, param_groups

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # as raypatch.train.build_engine
    cfg = presets.demo()
    ws, rank = dist.get_world_size(), dist.get_rank()
    model = PatchLM(build_model(cfg.model, seed=0))
    n = num_params(model.hf)
    k, mb = 4, cfg.optim.micro_batch_size
    ga = grad_accum_steps(cfg.optim.tokens_per_step // (k * cfg.data.seq_len), "patch", ws, mb)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, cfg.optim.weight_decay),
                                      config=deepspeed_config(cfg, ga, ws, n, config["stage"]))
    ids = torch.randint(0, cfg.model.vocab_size, (mb, k * cfg.data.seq_len),
                        generator=torch.Generator().manual_seed(rank))

    def step() -> None:
        for micro in range(ga):
            engine.set_gradient_accumulation_boundary(micro == ga - 1)
            engine.backward(engine(ids, k))
        engine.step()

    def timed(fn: Any, reps: int) -> float:
        ms = []
        for _ in range(reps):
            dist.barrier()
            t = time.perf_counter()
            fn()
            ms.append(1e3 * (time.perf_counter() - t))
        return statistics.median(ms)

    for _ in range(3):
        step()
    step_ms = timed(step, config["steps"])
    grad = torch.randn(n)
    allreduce_ms = timed(lambda: dist.all_reduce(grad), config["steps"])
    if ray.train.get_context().get_world_rank() == 0:
        Path(config["out"]).write_text(json.dumps({"step_ms": step_ms, "allreduce_ms": allreduce_ms,
                                                   "grad_accum": ga, "params": n}))


MICRO = """
import sys, time, torch
torch.set_num_threads(1)
from raypatch import presets
from raypatch.model import build_model, lm_loss
m = build_model(presets.demo().model, seed=0)
ids = torch.randint(0, 4096, (4, 512))
for _ in range(3):
    lm_loss(m, ids, 4).backward()
t = time.perf_counter()
for _ in range(30):
    lm_loss(m, ids, 4).backward()
print(1e3 * (time.perf_counter() - t) / 30)
"""


def plain_micro_ms() -> dict[str, Any]:
    """ms per patch micro-batch (forward + backward, 1 thread) of one plain process alone and of two at once."""
    import subprocess

    def start() -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", MICRO], stdout=subprocess.PIPE, text=True, cwd=C.ROOT)

    alone = float(start().communicate()[0])
    pair = [start(), start()]
    together = [float(p.communicate()[0]) for p in pair]
    return {"alone_ms": alone, "two_at_once_ms": together}


def adamw_ms(steps: int = 30) -> dict[str, float]:
    import torch

    from raypatch import presets
    from raypatch.model import build_model
    from raypatch.optim import param_groups

    torch.set_num_threads(1)
    model = build_model(presets.demo().model, seed=0)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    out = {}
    for name, kw in (("per-tensor", {"foreach": False}), ("foreach", {"foreach": True}), ("fused", {"fused": True})):
        opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3, **kw)
        for _ in range(3):
            opt.step()
        t = time.perf_counter()
        for _ in range(steps):
            opt.step()
        out[name] = 1e3 * (time.perf_counter() - t) / steps
    return out


def main() -> dict[str, Any]:
    import ray
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    load = C.LoadTracker()
    t0 = time.perf_counter()
    started = C.start_ray()
    barrier: dict[int, float] = {}
    engine: dict[str, dict[str, Any]] = {}
    try:
        for n in (1, 2):
            out = Path(tempfile.mkdtemp(prefix="raypatch-step-costs-")) / "ms"
            TorchTrainer(barrier_loop, train_loop_config={"calls": 200, "out": str(out)},
                         scaling_config=ScalingConfig(num_workers=n, resources_per_worker={"CPU": 1})).fit()
            barrier[n] = float(out.read_text())
        load.mark("barrier")
        for n in (1, 2):
            for stage in (0, 1):
                out = Path(tempfile.mkdtemp(prefix="raypatch-step-costs-")) / "engine.json"
                TorchTrainer(engine_loop, train_loop_config={"stage": stage, "steps": 20, "out": str(out)},
                             scaling_config=ScalingConfig(num_workers=n, resources_per_worker={"CPU": 1})).fit()
                engine[f"{n}w-stage{stage}"] = {"workers": n, "stage": stage, **json.loads(out.read_text())}
    finally:
        if started:
            ray.shutdown()
    load.mark("engine")
    plain = plain_micro_ms()
    load.mark("plain")
    adam = adamw_ms()
    load.mark("adamw")
    res = {"machine": C.machine(), "load": load.summary(), "wall_s": time.perf_counter() - t0,
           "preemption_check_ms": barrier, "adamw_step_ms": adam, "patch_step": engine,
           "plain_micro": plain}
    from raypatch.optim import stage_name

    steps = C.md_table(
        ["workers", "DeepSpeed", "gradient accumulation", "patch step ms (median of 20)",
         "gloo all-reduce of the gradient, ms"],
        [[e["workers"], stage_name(e["stage"]), e["grad_accum"], f"{e['step_ms']:.1f}",
          f"{e['allreduce_ms']:.2f}" if e["workers"] > 1 else "-"] for e in engine.values()])
    tables = ("Demo model (1,840,256 parameters), one thread.\n\n"
              + C.md_table(["cost", "ms per call/step"],
                           [[f"get_preemption_info, {n} worker(s)", f"{v:.2f}"] for n, v in barrier.items()]
                           + [[f"AdamW step, {k}", f"{v:.2f}"] for k, v in adam.items()])
              + "\n\nOne patch-phase optimizer step (K=4, 4,096 tokens; each worker runs its share of the "
              "micro-batches of 4 rows), random token ids, per worker count and DeepSpeed stage:\n\n" + steps
              + "\n\nOne patch micro-batch (4 rows of 512 tokens, forward + backward) in plain processes without Ray: "
              f"{plain['alone_ms']:.1f} ms alone, "
              + " and ".join(f"{x:.1f}" for x in plain["two_at_once_ms"]) + " ms in two processes at once.")
    C.write_outputs(C.RESULTS / "step_costs", res, tables)
    return res


if __name__ == "__main__":
    main()
