"""How much one core's throughput moves on this machine: the same training step, repeated, with and without
DeepSpeed, and inside a Ray Train worker.

    python benchmarks/noise.py [--repeats 2]

The step is benchmarks/ddp_bound.py's patch step (demo model, K=4, 4,096 tokens in 2 micro-batches of 4 rows,
fused AdamW, clipping), one process, one thread, random token ids. Arms, interleaved `--repeats` times:
- plain: torch only, in a fresh process;
- DeepSpeed: the same step through DeepSpeed's engine without ZeRO (raypatch's config for the demo), fresh process;
- plain and DeepSpeed again inside a 1-worker Ray Train group.
A gap smaller than the spread between repeats of one arm cannot be shown on this machine (issue 23's 0.97 goal).
Writes benchmarks/results/noise.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

sys.path.insert(0, str(C.ROOT))
STEPS = 12


def loop(mode: str) -> dict[str, float]:
    """STEPS timed patch steps after 3 warm-up ones; tokens/s and the thread's CPU share."""
    import torch

    from raypatch import presets
    from raypatch.model import PatchLM, build_model
    from raypatch.optim import deepspeed_config, param_groups

    torch.set_num_threads(1)
    cfg = presets.demo()
    model = PatchLM(build_model(cfg.model, seed=0))
    k = 4
    ids = torch.randint(0, cfg.model.vocab_size, (4, k * cfg.data.seq_len))
    if mode == "deepspeed":
        import deepspeed
        import deepspeed.ops
        import torch.distributed as dist

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        if not dist.is_initialized():  # a fresh process (inside Ray Train the group exists already)
            import socket

            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
            os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed asks for it
        ds = deepspeed_config(cfg, 2, 1, sum(p.numel() for p in model.parameters()), 0)
        engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, 0.1), config=ds)

        def step() -> None:
            for i in range(2):
                engine.set_gradient_accumulation_boundary(i == 1)
                engine.backward(engine(ids, k))
            engine.step()
    else:
        opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-4, fused=True)

        def step() -> None:
            for _ in range(2):
                (model(ids, k) / 2).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    t, c = time.perf_counter(), time.thread_time()
    for _ in range(STEPS):
        step()
    dt = time.perf_counter() - t
    return {"tokens_per_s": STEPS * 4096 / dt, "cpu_share": (time.thread_time() - c) / dt}


def in_process(mode: str) -> dict[str, float]:
    code = (f"import sys, json; sys.path.insert(0, {str(Path(__file__).parent)!r}); import noise; "
            f"print(json.dumps(noise.loop({mode!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=os.environ | {"DS_ACCELERATOR": "cpu"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def _train_fn(config: dict[str, Any]) -> None:
    Path(config["out"]).write_text(json.dumps(loop(config["mode"])))


def in_ray(mode: str) -> dict[str, float]:
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    out = tempfile.mktemp(suffix=".json")
    TorchTrainer(_train_fn, train_loop_config={"mode": mode, "out": out},
                 scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1})).fit()
    r = json.loads(Path(out).read_text())
    os.unlink(out)
    return r


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)
    import ray

    t0 = time.perf_counter()
    load = C.LoadTracker()
    C.start_ray(4)
    arms = {"plain": lambda: in_process("plain"), "DeepSpeed": lambda: in_process("deepspeed"),
            "plain, in Ray Train": lambda: in_ray("plain"), "DeepSpeed, in Ray Train": lambda: in_ray("deepspeed")}
    runs: dict[str, list[dict[str, float]]] = {a: [] for a in arms}
    try:
        for rep in range(args.repeats):
            for arm in (list(arms) if rep % 2 == 0 else list(arms)[::-1]):
                runs[arm].append(arms[arm]())
                print(f"[{rep + 1}] {arm}: {runs[arm][-1]['tokens_per_s']:,.0f} tok/s", flush=True)
            load.mark(f"repeat {rep + 1}")
    finally:
        ray.shutdown()
    allv = [r["tokens_per_s"] for rs in runs.values() for r in rs]
    rows = [[arm, ", ".join(f"{r['tokens_per_s']:,.0f}" for r in rs),
             f"{statistics.mean(r['tokens_per_s'] for r in rs):,.0f}",
             f"{max(r['tokens_per_s'] for r in rs) / min(r['tokens_per_s'] for r in rs):.3f}",
             f"{statistics.mean(r['cpu_share'] for r in rs):.3f}"] for arm, rs in runs.items()]
    tables = (f"One patch step of the demo model (K=4, 4,096 tokens), one thread, {STEPS} timed steps per "
              f"measurement, {args.repeats} interleaved repeats (ABCD/DCBA).\n\n"
              + C.md_table(["arm", "tokens/s per repeat", "mean", "max ÷ min", "on CPU"], rows)
              + f"\n\nAll measurements: {min(allv):,.0f}–{max(allv):,.0f} tokens/s (max ÷ min "
              f"{max(allv) / min(allv):.3f}).")
    print("\n" + tables)
    C.write_outputs(C.RESULTS / "noise", {"machine": C.machine(), "load": load.summary(),
                                          "wall_s": time.perf_counter() - t0, "runs": runs}, tables)


if __name__ == "__main__":
    main()
