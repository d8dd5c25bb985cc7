"""Where patch-level training pays off: a ladder of tokens per parameter, trained through raypatch.driver.fit.

At each rung r (tokens per parameter, total parameters), on the Debian documentation corpus
(benchmarks/corpus_debian.py; a byte-level BPE of --vocab-size tokens):
- token-only on D = r·N tokens (λ=0),
- E1, equal data: K=4, λ=2/3 on the same D (half the compute),
- E2, equal compute: K=4, λ=2/3 on 2·D (λ/K + 1 − λ = 1/2, so the same model positions as token-only).
Every run is a complete Ray Train + DeepSpeed ZeRO-2 fit on 2 CPU workers (fp32); D beyond the corpus repeats it
(data.epochs, stated per run). The score is the final token-level (K=1) loss on the corpus's validation split;
Δ = patch − token-only, paired by seed.

Outputs (--out, default benchmarks/results): regime.json (every run), regime_ladder.json (the rungs in the format
`raypatch plan --ladder` reads), regime.md (tables), regime.png (Δ against tokens per parameter, seed spread, the
paper's Table-4 points beside them, both parameter counts on the axes).

Run: python benchmarks/corpus_debian.py && python benchmarks/regime.py --rungs 3,10,30 --seeds 1
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

# The paper's Table 4 (370M parameters, K=4, λ=2/3, equal data): tokens per parameter and Δ = ln(PPL ratio).
PAPER_TABLE4 = [(45e9 / 370e6, math.log(12.84 / 12.50)), (90e9 / 370e6, math.log(11.80 / 11.71)),
                (180e9 / 370e6, math.log(11.17 / 11.28)), (360e9 / 370e6, math.log(10.68 / 10.94))]
MODEL = ["model.vocab_size={vocab}", "model.hidden_size=48", "model.intermediate_size=128", "model.num_layers=2",
         "model.num_heads=4", "model.max_position_embeddings=64", "data.seq_len=64", "optim.tokens_per_step=8192",
         "optim.micro_batch_size=16", "optim.lr=3e-3", "optim.warmup_steps=20", "eval.every_steps=0",
         "eval.max_rows=512", "eval.wikitext=", "checkpoint.every_steps=0", "checkpoint.keep=1", "log_every=100",
         "compare_baseline=false", "patch.k=4", "scale.num_workers=2"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", default=str(C.CACHE / "debian-docs" / "corpus.jsonl.gz"))
    ap.add_argument("--vocab-size", type=int, default=1024)
    ap.add_argument("--rungs", default="3,10,30,100,300", help="tokens per (total) parameter of the token-only run")
    ap.add_argument("--seeds", type=int, default=1, help="seeds per rung")
    ap.add_argument("--top-seeds", type=int, default=2, help="seeds at the two largest rungs")
    ap.add_argument("--out", default=str(C.RESULTS))
    ap.add_argument("--switch-control", type=float, default=0, metavar="RUNG",
                    help="only a control at this rung: K=1, λ=2/3 (the switch's fresh optimizer and warmup without "
                         "patches), seed 0, against the study's token-only run; writes regime_switch.md")
    ap.add_argument("--append", action="store_true",
                    help="keep the runs of --out/regime.json with the same model and corpus; run only the missing ones")
    return ap.parse_args(argv)


def params_of(cfg: Any) -> tuple[int, int]:
    """(total, non-embedding) parameters; non-embedding leaves out the input and output embeddings."""
    from raypatch.model import count_params

    return count_params(cfg.model), count_params(cfg.model, exclude_embeddings=True)


def fit_run(base: Any, *, name: str, lam: float, tokens: int, corpus: int, seed: int, storage: Path,
            k: int = 4) -> dict:
    from raypatch.config import replace
    from raypatch.driver import fit

    cfg = replace(base, seed=seed, patch={"lam": lam, "k": k}, data={"max_tokens": tokens,
                                                              "epochs": max(1, math.ceil(tokens / corpus))},
                  checkpoint={"name": name, "storage_path": str(storage)})
    t = time.perf_counter()
    s = fit(cfg, export=False)
    shutil.rmtree(Path(s["run_dir"]), ignore_errors=True)  # checkpoints of a finished rung are not needed
    return {"name": name, "lam": lam, "tokens": tokens, "epochs": cfg.data.epochs, "seed": seed,
            "val_loss": s["final"]["val/loss"], "positions": sum(s["state"]["positions"].values()),
            "flops": s["state"]["flops"], "wall_s": time.perf_counter() - t}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    import ray

    from raypatch import presets
    from raypatch.config import apply_overrides
    from raypatch.data import TokenStream

    t0 = time.perf_counter()
    load = C.LoadTracker()
    rungs = [float(x) for x in args.rungs.split(",")]
    started = C.start_ray()
    storage = Path(tempfile.mkdtemp(prefix="raypatch-regime-"))
    runs: list[dict[str, Any]] = []
    wall_before, history = 0.0, []
    try:
        shards = C.shards(args.vocab_size, corpus=Path(args.corpus))
        base = apply_overrides(presets.tiny(), [*(o.format(vocab=args.vocab_size) for o in MODEL),
                                                f"data.shards={shards}"])
        corpus = TokenStream(shards).total_tokens
        total, non_emb = params_of(base)
        tps = base.optim.tokens_per_step
        print(f"model: {total:,} parameters ({non_emb:,} non-embedding); corpus {corpus:,} train tokens", flush=True)
        if args.switch_control:
            r = args.switch_control
            d = max(6, round(r * total / tps / 6) * 6) * tps
            run = fit_run(base, name=f"r{r:g}-K1switch-s0", lam=2 / 3, tokens=d, corpus=corpus, seed=0,
                          storage=storage, k=1)
            kept = json.loads((Path(args.out) / "regime.json").read_text())["runs"]
            rows = [[x["name"], f"{x['val_loss']:.4f}"] for x in kept if x["rung"] == r and x["kind"] != "E2"]
            C.write_outputs(Path(args.out) / "regime_switch", {"machine": C.machine(), "load": load.summary(),
                                                               "wall_s": time.perf_counter() - t0, "run": run},
                            f"Rung {r:g}, D={d:,} tokens. K=1, λ=2/3 restarts AdamW and the warmup at 2/3 of the data "
                            f"as a patch run does, without patches.\n\n"
                            + C.md_table(["run", "val loss"], [[run["name"], f"{run['val_loss']:.4f}"], *rows]))
            return run
        if args.append:
            runs, wall_before, history = kept_runs(Path(args.out) / "regime.json", base, corpus)
            rungs = sorted({*rungs, *(x["rung"] for x in runs)})
        for i, r in enumerate(rungs):
            d = max(6, round(r * total / tps / 6) * 6) * tps  # whole steps, and λ=2/3 splits them exactly
            seeds = args.top_seeds if i >= len(rungs) - 2 else args.seeds
            for seed in range(seeds):
                for kind, lam, tokens in (("token", 0.0, d), ("E1", 2 / 3, d), ("E2", 2 / 3, 2 * d)):
                    name = f"r{r:g}-{kind}-s{seed}"
                    if any(x["name"] == name for x in runs):
                        continue
                    print(f"[{name}] D={tokens:,} ({tokens / total:.3g} tokens/param, "
                          f"{tokens / corpus:.2f} epochs)", flush=True)
                    run = fit_run(base, name=name, lam=lam, tokens=tokens, corpus=corpus, seed=seed,
                                  storage=storage)
                    runs.append({"rung": r, "kind": kind, "tokens_per_param": tokens / total,
                                 "tokens_per_nonemb_param": tokens / non_emb, **run})
                    print(f"    val loss {run['val_loss']:.4f} ({run['wall_s']:.0f} s)", flush=True)
            load.mark(f"rung {r:g}")
            write(args, rungs, runs, base, corpus, total, non_emb, t0 - wall_before, load, history)
    finally:
        if started:
            ray.shutdown()
        shutil.rmtree(storage, ignore_errors=True)
    return write(args, rungs, runs, base, corpus, total, non_emb, t0 - wall_before, load, history)


def kept_runs(path: Path, base: Any, corpus: int) -> tuple[list[dict[str, Any]], float, list[dict[str, str]]]:
    """The runs of an earlier study with the same model, training config and corpus, its wall-clock, and the
    commands (with their load) that measured them."""
    if not path.exists():
        return [], 0.0, []
    old = json.loads(path.read_text())
    if old["config"] != base.to_dict() or old["corpus_tokens"] != corpus:
        raise SystemExit(f"{path}: another model, config or corpus; drop --append or choose another --out")
    first = "python benchmarks/regime.py --rungs 3,10,30,100 --seeds 1 --top-seeds 2"  # before history was kept
    return old["runs"], old["wall_s"], old.get("history", [{"command": first, "load": old["load"]}])


def write(args: argparse.Namespace, rungs: list[float], runs: list[dict[str, Any]], base: Any, corpus: int,
          total: int, non_emb: int, t0: float, load: Any, history: list[dict[str, str]]) -> dict[str, Any]:
    """All outputs from the runs so far (called after every rung, so a stopped study keeps what it measured)."""
    ladder = []
    for r in rungs:
        tok = {x["seed"]: x for x in runs if x["rung"] == r and x["kind"] == "token"}
        for kind in ("E1", "E2"):
            pts = [x for x in runs if x["rung"] == r and x["kind"] == kind and x["seed"] in tok]
            if pts:
                ladder.append({"k": 4, "lam": 0.667, "setting": kind, "tokens_per_param": r * 1.0,
                               "deltas": [x["val_loss"] - tok[x["seed"]]["val_loss"] for x in pts]})
    result = {"machine": C.machine(), "params_total": total, "params_non_embedding": non_emb, "corpus": args.corpus,
              "corpus_tokens": corpus, "config": base.to_dict(), "runs": runs, "ladder": ladder,
              "paper_table4": PAPER_TABLE4, "wall_s": time.perf_counter() - t0, "load": load.summary(),
              "history": [*history, {"command": C.command_line(), "load": load.summary()}]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "regime_ladder.json").write_text(json.dumps({"params": "total", "rungs": ladder}, indent=1) + "\n")
    if ladder:
        plot(result, out / "regime.png")
    if history:  # an --append study: every command that measured a run, each with its load
        result["load"] = "; then ".join(h["load"] for h in result["history"])
    C.write_outputs(out / "regime", result, tables(result), "`, then `".join(h["command"] for h in result["history"]))
    return result


def tables(res: dict[str, Any]) -> str:
    def cell(ds: list[float]) -> str:
        return f"{statistics.mean(ds):+.4f}" + (f" ± {statistics.stdev(ds):.4f}" if len(ds) > 1 else "")

    ratio = res["params_total"] / res["params_non_embedding"]
    rows = [[f"{x['tokens_per_param']:g}", f"{x['tokens_per_param'] * ratio:.3g}", x["setting"], len(x["deltas"]),
             cell(x["deltas"])] for x in res["ladder"]]
    runs = [[x["name"], f"{x['tokens']:,}", x["epochs"], f"{x['positions']:,}", f"{x['val_loss']:.4f}",
             f"{x['wall_s']:.0f}"] for x in res["runs"]]
    return (f"Llama {res['params_total']:,} parameters ({res['params_non_embedding']:,} non-embedding), "
            f"{res['corpus_tokens']:,} train tokens of {Path(res['corpus']).name}. Δ = patch (K=4, λ=2/3) − "
            f"token-only final val loss, paired by seed (mean ± sd).\n\n"
            + C.md_table(["tokens/param (total)", "tokens/param (non-embedding)", "setting", "seeds", "Δ val loss"],
                         rows)
            + "\n\n" + C.md_table(["run", "tokens", "epochs", "positions", "val loss", "fit s"], runs))


def plot(res: dict[str, Any], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.4))
    for setting, color in (("E1", "C0"), ("E2", "C1")):
        pts = [x for x in res["ladder"] if x["setting"] == setting and x["deltas"]]
        ax.errorbar([x["tokens_per_param"] for x in pts], [statistics.mean(x["deltas"]) for x in pts],
                    yerr=[statistics.stdev(x["deltas"]) if len(x["deltas"]) > 1 else 0 for x in pts],
                    marker="o", capsize=3, color=color,
                    label=f"raypatch {setting} ({'equal data' if setting == 'E1' else 'equal compute'})")
    px, py = zip(*res["paper_table4"])
    ax.plot(px, py, "s--", color="gray", label="paper Table 4 (370M, equal data)")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xscale("log")
    ax.set(xlabel="tokens per parameter (total)", ylabel="Δ final val loss, patch − token (nats)",
           title="where patch-level training pays off (< 0: patch better)")
    ratio = res["params_total"] / res["params_non_embedding"]
    ax.secondary_xaxis("top", functions=(lambda x: x * ratio, lambda x: x / ratio)).set_xlabel(
        "tokens per non-embedding parameter (raypatch model)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
