"""How long a checkpoint stops training: synchronous against asynchronous uploads, to local disk and to S3.

    python benchmarks/ckpt_stall.py [--repeats 2]

A 2-worker ZeRO-2 run of a ~30M-parameter Llama (the demo's vocabulary and data, wider and deeper so a checkpoint
is a few hundred MB), a checkpoint every few steps, in four arms: checkpoint.upload=sync|async x storage on local
disk | on a local S3 server (moto, loopback). The stall is what the loop measures around each save
(metrics.jsonl, event "checkpoint": local snapshot, then the upload when sync); "steps/s" is over the whole
training loop, so it also shows what a background upload costs the steps it overlaps (2 cores: the upload and the
workers share them). Arms run in ABBA order. Writes benchmarks/results/ckpt_stall.{json,md}.
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

sys.path.insert(0, str(C.ROOT))

MODEL = ["model.hidden_size=512", "model.intermediate_size=1376", "model.num_layers=8", "model.num_heads=8"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=1, help="ABBA repeats of the four arms")
    ap.add_argument("--steps", type=int, default=16, help="optimizer steps per run (all in the token phase)")
    ap.add_argument("--every", type=int, default=4, help="checkpoint.every_steps")
    ap.add_argument("--out", default=str(C.RESULTS / "ckpt_stall"))
    return ap.parse_args(argv)


def train(cfg: Any) -> dict[str, Any]:
    s, rows, wall = C.fit_run(cfg)
    stalls = [r["checkpoint/stall_s"] for r in rows if r.get("event") == "checkpoint"]
    st = s["state"]
    train_s = sum(st["seconds"].values())
    return {"wall_s": wall, "stalls_s": stalls, "steps": st["global_step"],
            "train_s": train_s, "loop_steps_per_s": st["global_step"] / (train_s + sum(stalls)),
            "checkpoint": s.get("checkpoint")}


def size_of(path: str) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from raypatch.config import apply_overrides
    from raypatch.presets import PRESETS
    from tests.s3util import BUCKET, S3Server, uri

    C.fake_s3_env()
    t0 = time.perf_counter()
    load = C.LoadTracker()
    C.start_ray()
    base = PRESETS["demo"]()
    shards = C.shards(base.model.vocab_size)
    server = S3Server().start()
    server.client().create_bucket(Bucket=BUCKET)
    work = Path(tempfile.mkdtemp(prefix="ckpt-stall-"))
    tps = 1024  # 8 rows of 128 tokens a step: 2 workers x 2 micro-batches of 2
    arms = {(mode, where): None for where in ("local disk", "S3 (loopback)") for mode in ("sync", "async")}
    order = list(arms)
    runs: dict[str, list[dict[str, Any]]] = {f"{m} / {w}": [] for m, w in arms}
    size = 0
    try:
        for rep in range(args.repeats):
            for i, (mode, where) in enumerate(order if rep % 2 == 0 else order[::-1]):
                storage = str(work / "runs") if where == "local disk" else uri(server.endpoint, f"ckpt/{rep}")
                cfg = apply_overrides(base, [*MODEL, f"data.shards={shards}", "patch.lam=0", "compare_baseline=false",
                                             f"optim.tokens_per_step={tps}", "optim.micro_batch_size=2",
                                             f"data.max_tokens={args.steps * tps}", "optim.warmup_steps=2",
                                             f"checkpoint.every_steps={args.every}", "checkpoint.keep=2",
                                             f"checkpoint.upload={mode}", f"checkpoint.storage_path={storage}",
                                             f"checkpoint.name=r{rep}-{i}-{mode}", "eval.wikitext=",
                                             "eval.max_rows=4", "scale.zero_stage=2", "log_every=4"])
                print(f"[ckpt] {mode} upload to {where}, repeat {rep + 1}", flush=True)
                r = train(cfg)
                runs[f"{mode} / {where}"].append(r)
                if where == "local disk" and not size:
                    size = size_of(r["checkpoint"])
                load.mark(f"{mode} {where} {rep + 1}")
    finally:
        server.stop()
        import ray

        ray.shutdown()

    rows = []
    ref = {w: statistics.mean(r["loop_steps_per_s"] for r in runs[f"sync / {w}"]) for _, w in arms}
    for arm, rs in runs.items():
        stalls = [s for r in rs for s in r["stalls_s"]]
        sps = statistics.mean(r["loop_steps_per_s"] for r in rs)
        rows.append([arm, len(stalls), f"{statistics.median(stalls):.2f}", f"{max(stalls):.2f}",
                     f"{sps:.3f}", f"{sps / ref[arm.split(' / ')[1]]:.3f}"])
    tables = (f"2 workers, ZeRO-2 fp32, a {size / 2**20:.0f} MiB checkpoint (model, AdamW moments, fp32 master "
              f"weights) every {args.every} steps, {args.steps} steps per run, {args.repeats} repeat(s) in ABBA "
              f"order. Stall: seconds the training loop stood still per checkpoint (the last one, at the end, "
              f"included).\n\n"
              + C.md_table(["upload / storage", "checkpoints", "median stall (s)", "max stall (s)",
                            "steps/s incl. stalls", "÷ sync, same storage"], rows))
    print("\n" + tables)
    result = {"machine": C.machine(), "load": load.summary(), "wall_s": time.perf_counter() - t0,
              "args": vars(args), "checkpoint_bytes": size, "runs": runs}
    C.write_outputs(Path(args.out), result, tables)


if __name__ == "__main__":
    main()
