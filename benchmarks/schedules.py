"""Phase schedules and weighted bags against the paper's two phases, at equal compute, on the regime study's model
and corpus (issue 31's measurement).

At one rung of one size of benchmarks/regime.py's study (default: size xs, 100 tokens per parameter, its largest
rung, with two seeds; the arms below take about a quarter of an hour here), beside the study's own token-only and
E2 runs (K=4, λ=2/3 on twice the data: the same model positions), every run a complete raypatch.driver.fit:
- schedule: phases.schedule (default 16:0.2,4:0.4,1:0.4, Next Patch Prediction's coarse-to-fine order) with the
  data that spends the same compute (patching.schedule_split, as `raypatch tune` would train it),
- power: E2 with patch.weights=power:1 (Token Superposition Training's weighting inside a bag).
Δ = arm − token-only final token-level val loss, paired by seed.

The study's runs are reused, not retrained, so the new arms must compute as they did: --kernels names the CPU
kernel set (the default avx2, as the xs runs used), and a check run first retrains the study's smallest E2 run of
the size and refuses to go on unless its val loss is the recorded one to the last bit (size s's token, E1 and E2
runs come from an earlier trainer and fail it under either kernel set: 6.3176 or 6.3178 against 6.3188).

Outputs (--out, default benchmarks/results): schedules.json and schedules.md.
Run: python benchmarks/schedules.py          (4 fits of ~3-4 min plus a half-minute check on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import regime as R  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--study", default=str(C.RESULTS / "regime.json"), help="the regime study whose runs to pair with")
    ap.add_argument("--size", default="xs", choices=sorted(R.SIZES))
    ap.add_argument("--rung", type=float, default=100, help="tokens per parameter of the token-only run")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--schedule", default="16:0.2,4:0.4,1:0.4")
    ap.add_argument("--weights", default="power:1", help="the bag weighting of the power arm (two phases, K=4)")
    ap.add_argument("--kernels", default="avx2", choices=("native", "avx2"),
                    help="scale.cpu_kernels of the new runs: the one the study's runs of this size used")
    ap.add_argument("--corpus", default=str(C.CACHE / "debian-docs" / "corpus.jsonl.gz"))
    ap.add_argument("--vocab-size", type=int, default=1024)
    ap.add_argument("--out", default=str(C.RESULTS))
    ap.add_argument("--render", action="store_true", help="only rewrite --out/schedules.md from schedules.json")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.render:
        res = json.loads((Path(args.out) / "schedules.json").read_text())
        C.write_outputs(Path(args.out) / "schedules", res, tables(res), res["command"])
        return res
    import ray

    from raypatch.config import parse_schedule, replace
    from raypatch.data import TokenStream
    from raypatch.patching import schedule_split

    t0, load = time.perf_counter(), C.LoadTracker()
    study = json.loads(Path(args.study).read_text())
    size = study["sizes"][args.size]
    runs = [x for x in study["runs"] if x["size"] == args.size]
    started = C.start_ray()
    storage = Path(tempfile.mkdtemp(prefix="raypatch-schedules-"))
    try:
        shards = C.shards(args.vocab_size, corpus=Path(args.corpus))
        corpus = TokenStream(shards).total_tokens
        why = C.same_corpus(study, C.corpus_identity(Path(args.corpus)), corpus)
        if why:
            raise SystemExit(f"{args.study}: another corpus ({why})")
        ns = argparse.Namespace(vocab_size=args.vocab_size)
        base = replace(R.base_config(ns, args.size, size["lr"], shards), scale={"cpu_kernels": args.kernels})
        if R.essentials(size["config"]) != R.essentials(base.to_dict()):
            raise SystemExit(f"size {args.size}: the study trained another model or recipe")
        total, _ = R.params_of(base)
        d = R.rung_tokens(args.rung, total, base.optim.tokens_per_step)
        at = {(x["kind"], x["seed"]): x for x in runs if x["rung"] == args.rung}
        missing = [f"{k}-s{s}" for k in ("token", "E2") for s in range(args.seeds) if (k, s) not in at]
        if missing:
            raise SystemExit(f"{args.study}: size {args.size}, rung {args.rung:g} lacks {missing}")

        # The check: the study's smallest E2 run of this size, retrained here, must give its recorded loss.
        ref = min((x for x in runs if x["kind"] == "E2"), key=lambda x: x["tokens"])
        print(f"[check] retraining {ref['name']} ({ref['tokens']:,} tokens, {args.kernels} kernels)", flush=True)
        chk = R.fit_run(base, name="check", lam=2 / 3, seed=ref["seed"], tokens=ref["tokens"], corpus=corpus,
                        storage=storage)
        if chk["val_loss"] != ref["val_loss"]:
            raise SystemExit(f"{ref['name']} retrained gives {chk['val_loss']!r}, the study recorded "
                             f"{ref['val_loss']!r}: the new runs would not pair with the study's (other kernels or "
                             f"code); try --kernels avx2 or rerun the study")
        print(f"    val loss {chk['val_loss']:.6f}: identical to the study's", flush=True)
        load.mark("check")

        exact, d_sched, _ = schedule_split(d, parse_schedule(args.schedule), tokens_per_step=base.optim.tokens_per_step)
        new, cost = [], {"schedule": sum(x / k for k, x in parse_schedule(exact)), "power": 0.5}
        for seed in range(args.seeds):
            # The schedule arm keeps base's (K, λ), which phases.schedule overrides.
            for arm, k, lam, tokens, sections in (
                    ("schedule", base.patch.k, base.patch.lam, d_sched, {"phases": {"schedule": exact}}),
                    ("power", 4, 2 / 3, 2 * d, {"patch": {"weights": args.weights}})):
                name = f"{args.size}-r{args.rung:g}-{arm}-s{seed}"
                print(f"[{name}] D={tokens:,}", flush=True)
                run = R.fit_run(base, name=name, lam=lam, seed=seed, tokens=tokens, corpus=corpus, storage=storage,
                                k=k, **sections)
                new.append({"arm": arm, "cost": cost[arm], **run})
                print(f"    val loss {run['val_loss']:.4f} ({run['wall_s']:.0f} s)", flush=True)
            load.mark(f"seed {seed}")
    finally:
        if started:
            ray.shutdown()
        shutil.rmtree(storage, ignore_errors=True)

    kept = []
    for kind, arm, label, cost_ in (("token", "token-only", "token-only", 1.0), ("E2", "two phases (E2)",
                                                                              "patch K=4 λ=0.667", 0.5)):
        kept += [{"arm": arm, "label": label, "weights": "uniform", "cost": cost_, **at[(kind, s)]}
                 for s in range(args.seeds)]
    result = {"machine": C.machine(), "study": args.study, "size": args.size, "rung": args.rung,
              "params_total": total, "kernels": args.kernels, "schedule": exact, "check": {"ref": ref, "run": chk},
              "runs": kept + new, "wall_s": time.perf_counter() - t0, "load": load.summary(),
              "command": C.command_line()}
    C.write_outputs(Path(args.out) / "schedules", result, tables(result))
    return result


def cell(ds: list[float]) -> str:
    return f"{statistics.mean(ds):+.4f}" + (f" ± {statistics.stdev(ds):.4f}" if len(ds) > 1 else "")


def tables(res: dict[str, Any]) -> str:
    tok = {x["seed"]: x["val_loss"] for x in res["runs"] if x["arm"] == "token-only"}
    two = {x["seed"]: x["val_loss"] for x in res["runs"] if x["arm"] == "two phases (E2)"}
    rows = []
    for arm in dict.fromkeys(x["arm"] for x in res["runs"]):
        at = [x for x in res["runs"] if x["arm"] == arm]
        deltas = [x["val_loss"] - tok[x["seed"]] for x in at]
        vs_two = [x["val_loss"] - two[x["seed"]] for x in at]
        rows.append([arm, at[0]["label"], at[0]["weights"], f"{at[0]['tokens']:,}", f"{at[0]['cost']:.4f}",
                     " / ".join(f"{x['positions']:,}" for x in at), " / ".join(f"{x['val_loss']:.4f}" for x in at),
                     cell(deltas), cell(vs_two) if arm != "token-only" else "-"])
    ref, chk = res["check"]["ref"], res["check"]["run"]
    return (f"Size {res['size']} ({res['params_total']:,} parameters), rung {res['rung']:g} tokens per parameter; "
            f"CPU kernels {res['kernels']}. Token-only and two phases are the regime study's runs "
            f"({Path(res['study']).name}); "
            f"the check retrained {ref['name']}: val loss {chk['val_loss']!r} (recorded {ref['val_loss']!r}). "
            f"Δ = arm − token-only (or − two phases) final val loss, paired by seed (mean ± sd over seeds).\n\n"
            + C.md_table(["arm", "phases", "bag weights", "D (tokens)", "relative cost", "positions per seed",
                          "val loss per seed", "Δ vs token-only", "Δ vs two phases"], rows))


if __name__ == "__main__":
    main()
