"""What synchronous data parallelism can reach on this machine at all: torch DDP without Ray or DeepSpeed.

Issue 14 asks for the patch phase at >= 0.95·K times the token phase and >= 0.95 of the plain loop on 2 workers
too. raypatch's 2-worker run misses both on 2 cores (benchmarks/results/throughput.md). This script measures the
best-known plain implementation of the same step, so the miss can be read against what the machine allows:

- "1 process": the plain loop (raypatch.model.lm_loss + fused AdamW, grad clip), one process, one thread, the demo
  model and its 4,096 tokens per optimizer step, micro-batches of 4 rows: the token phase (K=1) runs 8 micro-batches
  of 128 tokens per row, the patch phase (K=4) 2 of 512.
- "2 processes, DDP": the same step in two processes with torch DistributedDataParallel over gloo on 127.0.0.1,
  each process running half of the micro-batches (no_sync on all but the last): DDP all-reduces the gradient in
  buckets during the last backward, overlapping communication with compute, which DeepSpeed's engine without
  ZeRO does not do (it all-reduces after the backward).

The phases alternate round by round; the figures are medians over rounds. Random token ids (speed does not depend
on them). Ratios: patch ÷ token tokens/s (target >= 3.80 at K=4) and 2-process tokens/s ÷ (2 × 1-process) per phase
(target >= 0.95).

Run: python benchmarks/ddp_bound.py   (about 2 minutes; writes benchmarks/results/ddp_bound.json|md)
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

TOKENS_PER_STEP, MICRO_ROWS = 4096, 4


def phase_steps(model: Any, opt: Any, k: int, seq_len: int, rows: int, steps: int, ddp: Any = None) -> float:
    """`steps` optimizer steps of `rows` rows of k·seq_len tokens, micro-batches of MICRO_ROWS; returns seconds."""
    import contextlib

    import torch

    net = ddp or model  # a PatchLM: forward(ids, k) is the phase's loss, through DDP's forward when there is one
    ga = rows // MICRO_ROWS
    ids = torch.randint(0, 4096, (MICRO_ROWS, k * seq_len))
    t = time.perf_counter()
    for _ in range(steps):
        for i in range(ga):
            sync = ddp is None or i == ga - 1
            with contextlib.nullcontext() if sync else ddp.no_sync():
                (net(ids, k) / ga).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t


def run_rank(rank: int, world: int, port: int, rounds: int, base_steps: int, q: Any) -> None:
    import torch

    from raypatch import presets
    from raypatch.model import PatchLM, build_model
    from raypatch.optim import param_groups

    torch.set_num_threads(1)
    cfg = presets.demo()
    seq_len = cfg.data.seq_len
    model = PatchLM(build_model(cfg.model, seed=0))
    ddp = None
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(param_groups(model.hf, 0.1), lr=1e-4, fused=True)
    rates: dict[int, list[float]] = {1: [], 4: []}
    for k in (1, 4):  # warm-up
        phase_steps(model, opt, k, seq_len, TOKENS_PER_STEP // (k * seq_len) // world, 2, ddp)
    for r in range(rounds):
        for k in ((1, 4) if r % 2 == 0 else (4, 1)):
            n = base_steps * k  # the same time per phase per round
            sec = phase_steps(model, opt, k, seq_len, TOKENS_PER_STEP // (k * seq_len) // world, n, ddp)
            rates[k].append(n * TOKENS_PER_STEP / sec)
    if rank == 0:
        q.put(rates)
    if world > 1:
        torch.distributed.destroy_process_group()


def measure(world: int, rounds: int, base_steps: int) -> dict[int, list[float]]:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=run_rank, args=(r, world, port, rounds, base_steps, q)) for r in range(world)]
    for p in procs:
        p.start()
    rates = None
    while rates is None:  # a rank that dies (an error) must not leave this waiting forever
        try:
            rates = q.get(timeout=5)
        except Exception:  # noqa: BLE001 - queue.Empty
            if any(p.exitcode not in (None, 0) for p in procs):
                for p in procs:
                    p.kill()
                raise SystemExit("a rank failed (its traceback is above)") from None
    for p in procs:
        p.join()
    return rates


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--base-steps", type=int, default=4, help="token-phase steps per round (patch: 4x as many)")
    ap.add_argument("--repeats", type=int, default=2, help="1-process and 2-process measurements, interleaved")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    load = C.LoadTracker()
    t0 = time.perf_counter()
    runs: dict[int, dict[int, list[float]]] = {1: {1: [], 4: []}, 2: {1: [], 4: []}}
    for rep in range(args.repeats):
        for world in ((1, 2) if rep % 2 == 0 else (2, 1)):
            rates = measure(world, args.rounds, args.base_steps)
            for k in (1, 4):
                runs[world][k] += rates[k]
            load.mark(f"{world}p #{rep + 1}")
            print(f"{world} process(es): token {statistics.median(rates[1]):,.0f} tok/s, "
                  f"patch {statistics.median(rates[4]):,.0f} tok/s", flush=True)
    med = {w: {k: statistics.median(v) for k, v in r.items()} for w, r in runs.items()}
    res = {"machine": C.machine(), "load": load.summary(), "wall_s": time.perf_counter() - t0,
           "tokens_per_s": {str(w): {str(k): v for k, v in r.items()} for w, r in runs.items()},
           "median": {str(w): {str(k): v for k, v in r.items()} for w, r in med.items()},
           "patch_over_token": {str(w): med[w][4] / med[w][1] for w in med},
           "two_over_twice_one": {str(k): med[2][k] / (2 * med[1][k]) for k in (1, 4)}}

    def spread(xs: list[float]) -> str:
        return f"{statistics.median(xs):,.0f} ({min(xs):,.0f}–{max(xs):,.0f})"

    rows = [[f"{w} process" + ("es, DDP (gloo)" if w > 1 else ""), spread(runs[w][1]), spread(runs[w][4]),
             f"{res['patch_over_token'][str(w)]:.2f}",
             f"{res['two_over_twice_one']['1']:.2f} / {res['two_over_twice_one']['4']:.2f}" if w > 1 else "-"]
            for w in (1, 2)]
    tables = ("Demo model, 4,096 tokens per optimizer step, micro-batches of 4 rows, one thread per process, "
              f"{args.repeats} interleaved measurements of {args.rounds} rounds each; tokens/s median (min–max) "
              "over rounds.\n\n"
              + C.md_table(["setup", "token phase tok/s", "patch phase K=4 tok/s", "patch ÷ token (≥ 3.80)",
                            "÷ 2 × one process, token / patch (≥ 0.95)"], rows))
    C.write_outputs(C.RESULTS / "ddp_bound", res, tables)
    return res


if __name__ == "__main__":
    main()
