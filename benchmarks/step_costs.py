"""Fixed per-step costs of the training step that issue 14 removed, measured apart from training.

1. `ray.train.get_preemption_info()` per call inside a Ray Train worker group of 1 and 2 workers: a barrier the
   loop used to call every step (now about every checkpoint.preemption_check_seconds).
2. One AdamW step over the demo model's parameters on one thread: torch's per-tensor loop, foreach and the fused
   kernel (raypatch now asks DeepSpeed for fused=True).

Run: python benchmarks/step_costs.py   (about 1 minute; writes benchmarks/results/step_costs.json|md)
"""

from __future__ import annotations

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
    barrier = {}
    try:
        for n in (1, 2):
            out = Path(tempfile.mkdtemp(prefix="raypatch-step-costs-")) / "ms"
            TorchTrainer(barrier_loop, train_loop_config={"calls": 200, "out": str(out)},
                         scaling_config=ScalingConfig(num_workers=n, resources_per_worker={"CPU": 1})).fit()
            barrier[n] = float(out.read_text())
    finally:
        if started:
            ray.shutdown()
    load.mark("barrier")
    adam = adamw_ms()
    load.mark("adamw")
    res = {"machine": C.machine(), "load": load.summary(), "wall_s": time.perf_counter() - t0,
           "preemption_check_ms": barrier, "adamw_step_ms": adam}
    tables = ("Demo model (1,840,256 parameters), one thread.\n\n"
              + C.md_table(["cost", "ms per call/step"],
                           [[f"get_preemption_info, {n} worker(s)", f"{v:.2f}"] for n, v in barrier.items()]
                           + [[f"AdamW step, {k}", f"{v:.2f}"] for k, v in adam.items()]))
    C.write_outputs(C.RESULTS / "step_costs", res, tables)
    return res


if __name__ == "__main__":
    main()
