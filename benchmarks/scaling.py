"""raypatch at 1, 2, 4 and 8 workers, and 2 workers against torch DDP's bound, in one run on one machine.

    python benchmarks/scaling.py [--repeats 2]

- The bound: the same step as plain torch DDP in 2 processes (gloo on 127.0.0.1, one thread a process, the demo
  model, 4,096 tokens a step in micro-batches of 4 rows, fused AdamW, clipping, random token ids, no Ray, no
  DeepSpeed; DDP all-reduces the gradient in buckets during the last backward), measured between raypatch's
  2-worker runs (with the overlapped all-reduce, the default, and with scale.overlap_allreduce=false) in
  ABC/CBA order, so that all see the same machine state. Ratio: raypatch 2 workers ÷ DDP 2 processes, per phase
  (issue 23 asks >= 0.97).
- The table: raypatch's demo run (no ZeRO at this size in fp32, K=4, λ=2/3, one-thread CPU workers) at 1, 2, 4 and
  8 workers, tokens per step fixed: tokens/s per phase, data-wait, and the step's parts (forward+backward; the
  step's flags: from 2 workers on the wait for the overlapped gradient all-reduce that carries them, and the
  clipping; engine.step: the optimizer) as shares of training time, and the training thread's CPU share, from
  rank 0's log rows (each phase's first row, start-up, left out). The pair also says where the machine's CPU went.
  This machine has 2 cores: 4 and 8 workers time-share them, so the table
  shows what more workers cost in overhead, not a speedup.

Writes benchmarks/results/scaling.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

PARTS = ("data_wait", "forward_backward", "flags", "optimizer")
EXTRA = ("cpu_share",)
TOKENS_PER_STEP, MICRO_ROWS = 4096, 4  # the DDP loop's


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2, help="ABBA repeats of raypatch-2 against DDP-2")
    ap.add_argument("--steps", type=int, default=48, help="optimizer steps per raypatch run (2/3 patch, 1/3 token)")
    ap.add_argument("--workers", default="1,2,4,8", help="worker counts for the table")
    ap.add_argument("--out", default=str(C.RESULTS / "scaling"))
    return ap.parse_args(argv)


def ddp_phase(ddp: Any, opt: Any, k: int, seq_len: int, steps: int) -> float:
    """`steps` optimizer steps of this rank's half of TOKENS_PER_STEP, in rows of k·seq_len tokens and
    micro-batches of MICRO_ROWS (no_sync on all but the last); returns seconds."""
    import contextlib

    import torch

    ga = TOKENS_PER_STEP // (k * seq_len) // 2 // MICRO_ROWS
    ids = torch.randint(0, 4096, (MICRO_ROWS, k * seq_len))
    t = time.perf_counter()
    for _ in range(steps):
        for i in range(ga):
            with contextlib.nullcontext() if i == ga - 1 else ddp.no_sync():
                (ddp(ids, k) / ga).backward()  # a PatchLM: forward(ids, k) is the phase's loss
        torch.nn.utils.clip_grad_norm_(ddp.module.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t


def ddp_rank(rank: int, port: int, rounds: int, base_steps: int, q: Any) -> None:
    import torch
    import torch.distributed as dist

    from raypatch import presets
    from raypatch.model import PatchLM, build_model
    from raypatch.optim import param_groups

    torch.set_num_threads(1)
    cfg = presets.demo()
    seq_len = cfg.data.seq_len
    model = PatchLM(build_model(cfg.model, seed=0))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(param_groups(model.hf, 0.1), lr=1e-4, fused=True)
    rates: dict[int, list[float]] = {1: [], 4: []}
    for k in (1, 4):  # warm-up
        ddp_phase(ddp, opt, k, seq_len, 2)
    for r in range(rounds):
        for k in ((1, 4) if r % 2 == 0 else (4, 1)):
            n = base_steps * k  # the same time per phase per round
            rates[k].append(n * TOKENS_PER_STEP / ddp_phase(ddp, opt, k, seq_len, n))
    if rank == 0:
        q.put(rates)
    dist.destroy_process_group()


def ddp_measure(rounds: int = 4, base_steps: int = 4) -> dict[int, list[float]]:
    """tokens/s of the 2-process DDP loop per round, token phase (1) and patch phase (4), phases alternating."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=ddp_rank, args=(r, port, rounds, base_steps, q)) for r in range(2)]
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


def raypatch_run(base: Any, shards: str, workers: int, steps: int, storage: Path, name: str,
                 *extra: str) -> dict[str, Any]:
    from raypatch.config import apply_overrides

    cfg = apply_overrides(base, [f"data.shards={shards}", f"scale.num_workers={workers}", "compare_baseline=false",
                                 f"data.max_tokens={steps * base.optim.tokens_per_step}", "log_every=4",
                                 "eval.every_steps=0", "eval.wikitext=", "eval.max_rows=8",
                                 "checkpoint.every_steps=0", f"checkpoint.storage_path={storage}",
                                 f"checkpoint.name={name}", "checkpoint.keep=1", *extra])
    rows = [r for r in C.fit_run(cfg)[1] if "perf/tokens_per_s" in r]
    out: dict[str, Any] = {}
    for phase in ("patch", "token"):
        rs = [r for r in rows if r["phase"] == phase][1:]
        out[phase] = {"tokens_per_s": statistics.mean(r["perf/tokens_per_s"] for r in rs),
                      **{p: statistics.mean(r[f"perf/{p}"] for r in rs) for p in PARTS + EXTRA}}
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from raypatch.presets import PRESETS

    t0 = time.perf_counter()
    load = C.LoadTracker()
    counts = [int(x) for x in args.workers.split(",")]
    C.start_ray(max(counts) + 2)  # one-CPU workers plus room for Ray Data's reads
    base = PRESETS["demo"]()
    shards = C.shards(base.model.vocab_size)
    work = Path(tempfile.mkdtemp(prefix="scaling-"))
    pair: dict[str, list[dict[str, float]]] = {"raypatch": [], "raypatch, all-reduce after backward": [],
                                               "ddp": []}
    table: dict[int, list[dict[str, Any]]] = {w: [] for w in counts}
    try:
        for rep in range(args.repeats):
            for i, arm in enumerate(list(pair) if rep % 2 == 0 else list(pair)[::-1]):
                if arm == "ddp":
                    with C.CpuSampler("spawn_main") as cpu:
                        rates = ddp_measure()
                    pair["ddp"].append({"token": statistics.median(rates[1]), "patch": statistics.median(rates[4]),
                                        "cpu": cpu.shares()})
                    print(f"[pair {rep + 1}] ddp: {pair['ddp'][-1]}", flush=True)
                    continue
                extra = [] if arm == "raypatch" else ["scale.overlap_allreduce=false"]
                with C.CpuSampler("RayTrainWorker") as cpu:
                    r = raypatch_run(base, shards, 2, args.steps, work, f"pair-{rep}-{i}", *extra)
                pair[arm].append({**{ph: r[ph]["tokens_per_s"] for ph in ("patch", "token")}, "cpu": cpu.shares()})
                if arm == "raypatch":
                    table[2].append(r)
                print(f"[pair {rep + 1}] {arm}: {pair[arm][-1]}", flush=True)
                load.mark(f"{arm} {rep + 1}")
        for w in counts:
            if w == 2:
                continue  # the pair's runs
            table[w].append(raypatch_run(base, shards, w, args.steps, work, f"w{w}"))
            print(f"[table] {w} workers: {table[w][-1]}", flush=True)
            load.mark(f"{w} workers")
    finally:
        import ray

        ray.shutdown()

    ratio = {ph: statistics.mean(r[ph] for r in pair["raypatch"]) / statistics.mean(r[ph] for r in pair["ddp"])
             for ph in ("patch", "token")}
    names = {"raypatch": "raypatch, 2 workers", "raypatch, all-reduce after backward":
             "raypatch, 2 workers, scale.overlap_allreduce=false", "ddp": "torch DDP, 2 processes"}
    prow = [[names[arm], *(f"{statistics.mean(r[ph] for r in rs):,.0f}" for ph in ("token", "patch")),
             *(f"{100 * statistics.mean(r['cpu'][who] for r in rs):.1f} %" for who in ("trainers", "others"))]
            for arm, rs in pair.items()]
    prow.append(["raypatch ÷ DDP (≥ 0.97)", f"{ratio['token']:.3f}", f"{ratio['patch']:.3f}", "", ""])
    trow = []
    for w in counts:
        for ph in ("patch", "token"):
            m = {k: statistics.mean(r[ph][k] for r in table[w]) for k in ("tokens_per_s", *PARTS)}
            other = 1 - sum(m[p] for p in PARTS)
            trow.append([w, ph, f"{m['tokens_per_s']:,.0f}", *(f"{100 * m[p]:.1f} %" for p in PARTS),
                         f"{100 * other:.1f} %", f"{statistics.mean(r[ph]['cpu_share'] for r in table[w]):.2f}"])
    tables = (f"Demo model (K=4 patch phase, token phase), 4,096 tokens a step, one-thread CPU workers. Pair: "
              f"{args.repeats} repeat(s) in ABC/CBA order, mean tokens/s per phase.\n\n"
              + C.md_table(["setup", "token phase tok/s", "patch phase tok/s", "CPU: the 2 trainers",
                            "CPU: all other processes"], prow)
              + "\n\nCPU: shares of the machine's CPU time (2 cores) in the seconds the trainers used at least 3/4 "
              "of it (benchmarks/_common.CpuSampler), the rest idle. raypatch's other processes are Ray's: "
              "the Train controller and its helper actors, Ray Data's, GCS, raylet, dashboard."
              + "\n\nraypatch by worker count (2 cores: more than 2 workers time-share them); shares of training "
              "time, rank 0\n\n"
              + C.md_table(["workers", "phase", "tokens/s", "data-wait", "forward+backward", "flags, all-reduce",
                            "engine.step", "other", "on CPU"], trow)
              + "\n\non CPU: the training thread's CPU time ÷ training time (perf/cpu_share): below 1 it waited "
              "(collectives, data) or other processes had its core.")
    print("\n" + tables)
    result = {"machine": C.machine(), "load": load.summary(), "wall_s": time.perf_counter() - t0,
              "args": vars(args), "pair": pair, "ratio": ratio, "table": {str(k): v for k, v in table.items()}}
    C.write_outputs(Path(args.out), result, tables)


if __name__ == "__main__":
    main()
