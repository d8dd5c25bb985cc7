"""Cost of a full patch-level run (K=4, λ=2/3) against a token-only run on the same data, in one invocation.

Both runs go through raypatch.driver.fit (Ray Train + DeepSpeed ZeRO-2, 2 CPU workers, fp32) with the demo preset's
model on the same shards (python-3.11-docs, BPE of the model's vocabulary) and the same data.max_tokens = D:
the token-only run trains D tokens at token level; the patch run trains λ·D at patch level (blocks of K·T tokens
read as T patches) and (1-λ)·D at token level, with the same tokens per optimizer step in both phases.

Reported: the training phases' wall-clock (summary state "seconds" per phase: optimizer-step time, without
evaluation, checkpoints and start-up), the whole fit's wall-clock (Ray Train start, DeepSpeed init, evals at the
switch and the end, checkpoints, teardown), FLOPs (state "flops": 6N + attention per position, counted per model
position) and positions. Target: training-phase wall-clock of the patch run <= 0.52 × the token-only run's
(theory λ/K + 1 − λ = 0.50).

Both kinds run twice by default, in ABBA order (token, patch, patch, token), so that load from other processes that
drifts during the run hits both alike; a drift-free estimate from the patch run's own token phase is shown beside.

Run: python benchmarks/cost.py          (about 4-5 minutes; writes benchmarks/results/cost.json|md)
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=99,
                    help="optimizer steps of the token-only run; D = steps × tokens_per_step (a multiple of 3 keeps "
                         "both phases of λ=2/3 on whole steps)")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--lam", default="2/3")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--zero-stage", type=int, default=2)
    ap.add_argument("--order", default="token,patch", help="run order: token,patch or patch,token")
    ap.add_argument("--repeats", type=int, default=2,
                    help="pairs of runs, in ABBA order (token, patch, patch, token, ...); ratios use the means")
    ap.add_argument("--out", default=str(C.RESULTS / "cost"), help="output stem (.json and .md are added)")
    return ap.parse_args(argv)


def run(cfg: Any) -> dict[str, Any]:
    s, rows, wall = C.fit_run(cfg)
    evals = [r for r in rows if r.get("event") == "eval"]
    return {"fit_wall_s": wall, "state": s["state"], "params": s["params"],
            "flops_per_position": s["flops_per_position"], "final_val_loss": evals[-1].get("val/loss") if evals
            else None, "data_wait": {ph: [r["perf/data_wait"] for r in rows if r.get("phase") == ph
                                          and "perf/data_wait" in r] for ph in ("patch", "token")}}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    import ray

    from raypatch import presets
    from raypatch.config import apply_overrides
    from raypatch.patching import relative_cost

    t0 = time.perf_counter()
    load = C.LoadTracker()
    base = presets.demo()
    tps = base.optim.tokens_per_step
    d = args.steps * tps
    first, second = args.order.split(",")
    # ABBA: token, patch, patch, token, ... so that load that drifts linearly hits both kinds alike.
    order = [x for i in range(args.repeats) for x in ((first, second) if i % 2 == 0 else (second, first))]
    started = C.start_ray()
    tmp = Path(tempfile.mkdtemp(prefix="raypatch-cost-"))
    runs: list[dict[str, Any]] = []
    try:
        shards = C.shards(base.model.vocab_size)
        common = [f"data.shards={shards}", f"data.max_tokens={d}", f"scale.num_workers={args.workers}",
                  f"scale.zero_stage={args.zero_stage}", "eval.every_steps=0", "checkpoint.every_steps=0",
                  "compare_baseline=false", f"checkpoint.storage_path={tmp}", f"patch.k={args.k}"]
        lams = {"token": "0", "patch": args.lam}
        lam = apply_overrides(base, [*common, f"patch.lam={args.lam}"]).patch.lam
        print(f"demo model, D={d:,} tokens, {args.workers} CPU workers, ZeRO-{args.zero_stage}; K={args.k}, "
              f"λ={lam:.3g}; order {', '.join(order)}", flush=True)
        for i, kind in enumerate(order):
            # A fresh checkpoint.name per run: a reused name would resume the earlier run.
            cfg = apply_overrides(base, [*common, f"patch.lam={lams[kind]}", f"checkpoint.name=cost-{i}-{kind}"])
            print(f"\n=== run {i + 1}/{len(order)}: {kind}", flush=True)
            runs.append({"kind": kind, **run(cfg)})
            runs[-1]["load_after"] = load.mark(f"after run {i + 1}")
            st = runs[-1]["state"]
            print(f"  phases {st['seconds']} s, fit {runs[-1]['fit_wall_s']:.0f} s, FLOPs {st['flops']:.3g}",
                  flush=True)
    finally:
        if started:
            ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)

    def mean(kind: str, f: Any) -> float:
        xs = [f(r) for r in runs if r["kind"] == kind]
        return sum(xs) / len(xs)

    sec = {k: mean(k, lambda r: sum(r["state"]["seconds"].values())) for k in ("token", "patch")}
    pats = [r for r in runs if r["kind"] == "patch"]
    tok0 = next(r for r in runs if r["kind"] == "token")
    # Drift-free estimate: the patch run's own token phase, extrapolated to D tokens, stands in for token-only.
    within = [sum(r["state"]["seconds"].values()) / (r["state"]["seconds"]["token"] * d / r["state"]["tokens"]["token"])
              for r in pats]
    ratios = {"train_seconds": sec["patch"] / sec["token"],
              "fit_wall": mean("patch", lambda r: r["fit_wall_s"]) / mean("token", lambda r: r["fit_wall_s"]),
              "within_patch_run": sum(within) / len(within),
              "flops": pats[0]["state"]["flops"] / tok0["state"]["flops"],
              "positions": sum(pats[0]["state"]["positions"].values()) / sum(tok0["state"]["positions"].values()),
              "theory": relative_cost(args.k, lam)}
    result = {"machine": C.machine(), "data_tokens": d, "k": args.k, "lam": lam,
              "workers": args.workers, "zero_stage": args.zero_stage, "shards": shards, "order": order, "runs": runs,
              "ratios": ratios, "target": 0.52,
              "wall_s": time.perf_counter() - t0, "load": load.summary()}
    md = tables(result)
    print("\n" + md)
    C.write_outputs(Path(args.out), result, md)
    return result


def tables(res: dict[str, Any]) -> str:
    """The runs, then patch ÷ token-only ratios (means over the repeats), from the result dict alone."""
    r = res["ratios"]

    def rate(st: dict[str, Any], ph: str) -> str:
        return f"{st['tokens'][ph] / st['seconds'][ph]:,.0f}" if st["seconds"][ph] else "-"

    runs = [[i + 1, x["kind"], f"{x['state']['tokens']['patch']:,} + {x['state']['tokens']['token']:,}",
             f"{sum(x['state']['positions'].values()):,}", f"{x['state']['flops']:.3g}",
             f"{x['state']['seconds']['patch']:.1f} + {x['state']['seconds']['token']:.1f}",
             f"{rate(x['state'], 'patch')} / {rate(x['state'], 'token')}", f"{x['fit_wall_s']:.1f}",
             f"{x['final_val_loss']:.4f}" if x["final_val_loss"] is not None else "-"]
            for i, x in enumerate(res["runs"])]
    ratios = [["training-phase seconds", f"{r['train_seconds']:.3f}", f"≤ {res['target']}"],
              ["training-phase seconds, patch run's own token phase as the baseline", f"{r['within_patch_run']:.3f}",
               ""],
              ["whole fit wall-clock", f"{r['fit_wall']:.3f}", ""],
              ["FLOPs", f"{r['flops']:.3f}", f"= {r['theory']:.3f} (λ/K + 1 − λ)"],
              ["model positions", f"{r['positions']:.3f}", f"= {r['theory']:.3f}"]]
    return (f"D = {res['data_tokens']:,} tokens, K={res['k']}, λ={res['lam']:.3g}, {res['workers']} workers, "
            f"ZeRO-{res['zero_stage']}, runs in the order {', '.join(res['order'])}.\n\n"
            + C.md_table(["#", "run", "tokens patch + token", "positions", "FLOPs", "phase s patch + token",
                          "tokens/s patch / token", "fit s", "final val loss"], runs) + "\n\n"
            + C.md_table(["patch ÷ token-only", "value", "target"], ratios))


if __name__ == "__main__":
    main()
