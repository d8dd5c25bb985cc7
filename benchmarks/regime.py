"""Where patch-level training pays off: a ladder of tokens per parameter at several model sizes, every run a
raypatch.driver.fit.

At each rung r (tokens per parameter, total parameters) of a model size, on the Debian documentation corpus
(benchmarks/corpus_debian.py; a byte-level BPE of --vocab-size tokens):
- token-only on D = r·N tokens (λ=0),
- E1, equal data: K=4, λ=2/3 on the same D (half the compute),
- E2, equal compute: K=4, λ=2/3 on 2·D (λ/K + 1 − λ = 1/2, so the same model positions as token-only),
- control: token-only from scratch on D/3 tokens, the data E1's token phase reads: E1 − control is what the
  patch phase gave the token phase (0: nothing; < 0: a head start).
Every run is a complete Ray Train + DeepSpeed fit on 2 CPU workers (fp32); D beyond the corpus repeats it
(data.epochs, stated per run). The score is the final token-level (K=1) loss on the corpus's validation split;
Δ = patch − token-only, paired by seed. Each size's learning rate comes from a sweep of token-only runs at one rung
(--lr-sweep, recorded in the results) unless --lr gives it.

Outputs (--out, default benchmarks/results): regime.json (every run, per size), regime_ladder.json (the rungs, each
with its model size, in the format `raypatch plan --ladder` reads), regime.md (tables), regime.png (Δ and
E1 − control against tokens per parameter, one line per size, the paper's Table-4 points beside them).

Run: python benchmarks/corpus_debian.py && python benchmarks/regime.py --size xs --rungs 3,10,30 --seeds 1
     (--append adds rungs, seeds or sizes to a study; sizes: xs, s, m)
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
# Model sizes (hidden, intermediate, layers; 4 heads): non-embedding parameters 25,248 / 55,536 / 443,232
# (17.6× from xs to m), total 90,784 / 153,840 / 639,840 with the 1,024-token vocabulary.
SIZES = {"xs": (32, 88, 2), "s": (48, 128, 2), "m": (96, 256, 4)}
MODEL = ["model.vocab_size={vocab}", "model.hidden_size={hidden}", "model.intermediate_size={inter}",
         "model.num_layers={layers}", "model.num_heads=4", "model.max_position_embeddings=64", "data.seq_len=64",
         "optim.tokens_per_step=8192", "optim.micro_batch_size=16", "optim.lr={lr}", "optim.warmup_steps=20",
         "eval.every_steps=0", "eval.max_rows=512", "eval.wikitext=", "checkpoint.every_steps=0", "checkpoint.keep=1",
         "log_every=100", "compare_baseline=false", "patch.k=4", "scale.num_workers=2"]
KINDS = ("token", "E1", "E2", "control")


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
                    help="keep the runs of --out/regime.json (every size) with the same model and corpus; run only "
                         "the missing ones")
    ap.add_argument("--size", default="s", choices=sorted(SIZES), help="the model size of this invocation")
    ap.add_argument("--lr", type=float, default=0.0,
                    help="the size's learning rate (default: the one its sweep chose, else a sweep now)")
    ap.add_argument("--lr-sweep", default="", help="learning rates the sweep tries (token-only; default "
                    "1e-3,3e-3,1e-2); with --append, rates the size's recorded sweep lacks are added to it")
    ap.add_argument("--lr-rung", type=float, default=10, help="the rung the learning-rate sweep trains at")
    ap.add_argument("--kinds", default=",".join(KINDS), help="which runs per rung (e.g. control, to add the "
                    "control arm to a study)")
    return ap.parse_args(argv)


def params_of(cfg: Any) -> tuple[int, int]:
    """(total, non-embedding) parameters; non-embedding leaves out the input and output embeddings."""
    from raypatch.model import count_params

    return count_params(cfg.model), count_params(cfg.model, exclude_embeddings=True)


def fit_run(base: Any, *, name: str, lam: float, tokens: int, corpus: int, seed: int, storage: Path,
            k: int = 4, **sections: dict) -> dict:
    """One complete fit: base with its seed, (K, λ), data and name; sections (e.g. phases, patch weights) on top."""
    from raypatch.config import replace
    from raypatch.driver import fit

    patch = {"lam": lam, "k": k, **sections.pop("patch", {})}
    cfg = replace(base, seed=seed, patch=patch, data={"max_tokens": tokens,
                                                      "epochs": max(1, math.ceil(tokens / corpus))},
                  checkpoint={"name": name, "storage_path": str(storage)}, **sections)
    t = time.perf_counter()
    s = fit(cfg, export=False)
    shutil.rmtree(Path(s["run_dir"]), ignore_errors=True)  # checkpoints of a finished rung are not needed
    return {"name": name, "lam": lam, "tokens": tokens, "epochs": cfg.data.epochs, "seed": seed,
            "label": cfg.run_label(), "weights": cfg.patch.weights,
            "val_loss": s["final"]["val/loss"], "positions": sum(s["state"]["positions"].values()),
            "flops": s["state"]["flops"], "wall_s": time.perf_counter() - t}


def base_config(args: argparse.Namespace, size: str, lr: float, shards: str) -> Any:
    from raypatch import presets
    from raypatch.config import apply_overrides

    hidden, inter, layers = SIZES[size]
    return apply_overrides(presets.tiny(), [*(o.format(vocab=args.vocab_size, hidden=hidden, inter=inter,
                                                       layers=layers, lr=lr) for o in MODEL), f"data.shards={shards}"])


def essentials(cfg: dict[str, Any]) -> dict[str, Any]:
    """What makes runs of one size comparable across sessions: the model, the data and the recipe (fields the
    trainer gained since, such as checkpointing or kernel settings, do not enter)."""
    m, o = cfg["model"], cfg["optim"]
    return {"model": {k: m[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads")},
            "data": {k: cfg["data"][k] for k in ("shards", "seq_len")},
            "optim": {k: o[k] for k in ("lr", "warmup_steps", "tokens_per_step", "weight_decay", "beta2", "grad_clip")},
            "k": cfg["patch"]["k"]}


def rung_tokens(r: float, total: int, tps: int) -> int:
    return max(6, round(r * total / tps / 6) * 6) * tps  # whole steps, and λ=2/3 splits them exactly


def lr_sweep(args: argparse.Namespace, size: str, shards: str, corpus: int, storage: Path) -> list[dict[str, Any]]:
    """Token-only runs at --lr-rung, seed 0, one per learning rate of --lr-sweep."""
    out = []
    for lr in (float(x) for x in (args.lr_sweep or "1e-3,3e-3,1e-2").split(",")):
        base = base_config(args, size, lr, shards)
        total, _ = params_of(base)
        d = rung_tokens(args.lr_rung, total, base.optim.tokens_per_step)
        print(f"[{size} lr sweep] lr={lr:g}, D={d:,}", flush=True)
        run = fit_run(base, name=f"{size}-lr{lr:g}", lam=0.0, tokens=d, corpus=corpus, seed=0, storage=storage)
        out.append({"lr": lr, "rung": args.lr_rung, "val_loss": run["val_loss"], "wall_s": run["wall_s"], "run": run})
        print(f"    val loss {run['val_loss']:.4f}", flush=True)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    import ray

    from raypatch.data import TokenStream

    t0 = time.perf_counter()
    load = C.LoadTracker()
    rungs = [float(x) for x in args.rungs.split(",")]
    kinds = [k for k in args.kinds.split(",") if k]
    if set(kinds) - set(KINDS):
        raise SystemExit(f"--kinds: expected some of {','.join(KINDS)}, got {args.kinds}")
    started = C.start_ray()
    storage = Path(tempfile.mkdtemp(prefix="raypatch-regime-"))
    study: dict[str, Any] = {"sizes": {}, "runs": [], "wall_s": 0.0, "history": []}
    try:
        shards = C.shards(args.vocab_size, corpus=Path(args.corpus))
        corpus = TokenStream(shards).total_tokens
        identity = C.corpus_identity(Path(args.corpus))
        study["corpus_identity"] = identity
        if args.append:
            study = kept_study(Path(args.out) / "regime.json", corpus, identity)
        size = study["sizes"].get(args.size, {})
        if args.lr:
            size["lr"] = args.lr
        elif "lr_sweep" in size and args.lr_sweep:
            # Widening a recorded sweep (its best rate at an edge): only the new rates train. The size's runs keep
            # the rate they trained with; the table shows the whole sweep beside it.
            have = {x["lr"] for x in size["lr_sweep"]}
            args.lr_sweep = ",".join(x for x in args.lr_sweep.split(",") if float(x) not in have)
            if args.lr_sweep:
                size["lr_sweep"] = sorted([*size["lr_sweep"], *({k: v for k, v in x.items() if k != "run"} for x in
                                                              lr_sweep(args, args.size, shards, corpus, storage))],
                                          key=lambda x: x["lr"])
                best = min(size["lr_sweep"], key=lambda x: x["val_loss"])["lr"]
                if best != size["lr"]:
                    print(f"size {args.size}: the sweep's best rate is now {best:g}; its runs trained at "
                          f"{size['lr']:g}", flush=True)
                load.mark("lr sweep")
        elif "lr_sweep" not in size:
            size["lr_sweep"] = lr_sweep(args, args.size, shards, corpus, storage)
            best = min(size["lr_sweep"], key=lambda x: x["val_loss"])["lr"]
            # A size with runs keeps the learning rate they trained with; the table shows the sweep beside it.
            size["lr"] = size.get("lr", best)
            load.mark("lr sweep")
            kept = next((x["run"] for x in size["lr_sweep"] if x["lr"] == size["lr"]), None)
            for x in size["lr_sweep"]:
                x.pop("run", None)
            if kept and args.lr_rung in rungs and "token" in kinds:
                # The sweep's run at the chosen rate is the rung's token-only run, seed 0: the same fit, not redone.
                params = params_of(base_config(args, args.size, size["lr"], shards))
                name = f"{args.size}-r{args.lr_rung:g}-token-s0"
                study["runs"].append({"size": args.size, "rung": args.lr_rung, "kind": "token",
                                      "tokens_per_param": kept["tokens"] / params[0],
                                      "tokens_per_nonemb_param": kept["tokens"] / params[1], **kept, "name": name})
        base = base_config(args, args.size, size["lr"], shards)
        if essentials(size.get("config", base.to_dict())) != essentials(base.to_dict()):
            raise SystemExit(f"size {args.size}: the study's runs trained another model or recipe "
                             f"({essentials(size['config'])}); drop --append or choose another --out")
        total, non_emb = params_of(base)
        size |= {"config": size.get("config", base.to_dict()), "params_total": total, "params_non_embedding": non_emb,
                 "shape": dict(zip(("hidden", "intermediate", "layers"), SIZES[args.size]))}
        study["sizes"][args.size] = size
        tps = base.optim.tokens_per_step
        print(f"model {args.size}: {total:,} parameters ({non_emb:,} non-embedding), lr {size['lr']:g}; corpus "
              f"{corpus:,} train tokens", flush=True)
        if args.switch_control:
            return switch_control(args, base, corpus, storage, total, load, t0)
        runs = study["runs"]
        rungs = sorted({*rungs, *(x["rung"] for x in runs if x["size"] == args.size)})
        for i, r in enumerate(rungs):
            d = rung_tokens(r, total, tps)
            seeds = args.top_seeds if i >= len(rungs) - 2 else args.seeds
            trained = False
            for seed in range(seeds):
                for kind, lam, tokens in (("token", 0.0, d), ("E1", 2 / 3, d), ("E2", 2 / 3, 2 * d),
                                          ("control", 0.0, d // 3)):
                    name = f"{args.size}-r{r:g}-{kind}-s{seed}"
                    if kind not in kinds or any(x["name"] == name for x in runs):
                        continue
                    print(f"[{name}] D={tokens:,} ({tokens / total:.3g} tokens/param, "
                          f"{tokens / corpus:.2f} epochs)", flush=True)
                    run = fit_run(base, name=name, lam=lam, tokens=tokens, corpus=corpus, seed=seed,
                                  storage=storage)
                    runs.append({"size": args.size, "rung": r, "kind": kind, "tokens_per_param": tokens / total,
                                 "tokens_per_nonemb_param": tokens / non_emb, **run})
                    print(f"    val loss {run['val_loss']:.4f} ({run['wall_s']:.0f} s)", flush=True)
                    trained = True
            if trained:  # a rung with nothing left to train has no load of its own to record
                load.mark(f"{args.size} rung {r:g}")
                write(args, study, corpus, t0, load)
    finally:
        if started:
            ray.shutdown()
        shutil.rmtree(storage, ignore_errors=True)
    return write(args, study, corpus, t0, load)


def switch_control(args: argparse.Namespace, base: Any, corpus: int, storage: Path, total: int, load: Any,
                   t0: float) -> dict[str, Any]:
    """K=1, λ=2/3 at one rung: the switch's fresh optimizer and warmup without patches (regime_switch.md)."""
    r = args.switch_control
    d = rung_tokens(r, total, base.optim.tokens_per_step)
    run = fit_run(base, name=f"r{r:g}-K1switch-s0", lam=2 / 3, tokens=d, corpus=corpus, seed=0, storage=storage, k=1)
    kept = json.loads((Path(args.out) / "regime.json").read_text())["runs"]
    rows = [[x["name"], f"{x['val_loss']:.4f}"] for x in kept
            if x["rung"] == r and x["kind"] in ("token", "E1") and x.get("size", "s") == args.size]
    C.write_outputs(Path(args.out) / "regime_switch", {"machine": C.machine(), "load": load.summary(),
                                                       "wall_s": time.perf_counter() - t0, "run": run},
                    f"Rung {r:g}, D={d:,} tokens. K=1, λ=2/3 restarts AdamW and the warmup at 2/3 of the data "
                    f"as a patch run does, without patches.\n\n"
                    + C.md_table(["run", "val loss"], [[run["name"], f"{run['val_loss']:.4f}"], *rows]))
    return run


def kept_study(path: Path, corpus: int, identity: dict[str, Any]) -> dict[str, Any]:
    """An earlier study on the same corpus: its sizes (config, learning rate, sweep), runs, wall-clock and the
    commands (with their load) that measured them. A study from before sizes were recorded is size s."""
    if not path.exists():
        return {"sizes": {}, "runs": [], "wall_s": 0.0, "history": [], "corpus_identity": identity}
    old = json.loads(path.read_text())
    why = C.same_corpus(old, identity, corpus)
    if why:
        raise SystemExit(f"{path}: another corpus ({why}); drop --append or choose another --out")
    if "sizes" not in old:  # the one-size study (learning rate 3e-3, set by hand; no control arm)
        old["sizes"] = {"s": {"config": old["config"], "lr": old["config"]["optim"]["lr"],
                              "params_total": old["params_total"], "params_non_embedding": old["params_non_embedding"],
                              "shape": dict(zip(("hidden", "intermediate", "layers"), SIZES["s"]))}}
        old["runs"] = [{**x, "size": "s", "name": f"s-{x['name']}"} for x in old["runs"]]
    # A study from before identities were recorded keeps none: its token count is all that was checked.
    return {"sizes": old["sizes"], "runs": old["runs"], "wall_s": old["wall_s"], "history": old.get("history", []),
            **({"corpus_identity": old["corpus_identity"]} if "corpus_identity" in old else {})}


def write(args: argparse.Namespace, study: dict[str, Any], corpus: int, t0: float, load: Any) -> dict[str, Any]:
    """All outputs from the runs so far (called after every rung, so a stopped study keeps what it measured)."""
    ladder, runs = [], study["runs"]
    for name, size in sorted(study["sizes"].items(), key=lambda kv: kv[1].get("params_total", 0)):
        for r in sorted({x["rung"] for x in runs if x["size"] == name}):
            at = [x for x in runs if x["size"] == name and x["rung"] == r]
            tok = {x["seed"]: x for x in at if x["kind"] == "token"}
            for kind in ("E1", "E2"):
                pts = [x for x in at if x["kind"] == kind and x["seed"] in tok]
                if pts:
                    ladder.append({"k": 4, "lam": 0.667, "setting": kind, "tokens_per_param": r * 1.0,
                                   "model_params": size["params_total"], "size": name,
                                   "deltas": [x["val_loss"] - tok[x["seed"]]["val_loss"] for x in pts]})
    result = {"machine": C.machine(), "corpus": args.corpus, "corpus_tokens": corpus,
              **({"corpus_identity": study["corpus_identity"]} if study.get("corpus_identity") else {}),
              "sizes": study["sizes"],
              "runs": runs, "ladder": ladder, "paper_table4": PAPER_TABLE4,
              "wall_s": study["wall_s"] + time.perf_counter() - t0, "load": load.summary(),
              "history": [*study["history"], {"command": C.command_line(), "load": load.summary()}]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "regime_ladder.json").write_text(json.dumps({"params": "total", "rungs": ladder}, indent=1) + "\n")
    if ladder:
        plot(result, out / "regime.png")
    result["load"] = "; then ".join(h["load"] for h in result["history"])
    C.write_outputs(out / "regime", result, tables(result), "`, then `".join(h["command"] for h in result["history"]))
    return result


def tables(res: dict[str, Any]) -> str:
    def cell(ds: list[float]) -> str:
        return f"{statistics.mean(ds):+.4f}" + (f" ± {statistics.stdev(ds):.4f}" if len(ds) > 1 else "") if ds else "-"

    sizes = sorted(res["sizes"].items(), key=lambda kv: kv[1].get("params_total", 0))
    head = [f"Corpus: {res['corpus_tokens']:,} train tokens of {Path(res['corpus']).name}. Δ = patch (K=4, λ=2/3) − "
            f"token-only final val loss, paired by seed (mean ± sd); E1 − control: E1 against token-only training "
            f"on E1's token-phase data alone (< 0: the patch phase gave a head start).", "",
            f"Corpus text sha256 {res['corpus_identity']['text_sha256']}; the Debian package versions it was built "
            f"from are in regime.json." if "corpus_identity" in res else "The corpus was built before its text hash "
            "and Debian package versions were recorded: a rebuild from later point releases can be another corpus, "
            "which --append refuses (benchmarks/results/findings.md).", ""]
    shape_rows = []
    for name, z in sizes:
        sweep = ", ".join(f"{x['lr']:g}: {x['val_loss']:.4f}" for x in z.get("lr_sweep", [])) or "set by hand"
        sh = z.get("shape", {})
        shape_rows.append([name, sh.get("hidden", "-"), sh.get("intermediate", "-"), sh.get("layers", "-"),
                           f"{z.get('params_total', 0):,}", f"{z.get('params_non_embedding', 0):,}", f"{z['lr']:g}",
                           sweep])
    out = "\n".join(head) + "\n" + C.md_table(["size", "hidden", "intermediate", "layers", "parameters",
                                               "non-embedding", "lr", "lr sweep (val loss, token-only)"], shape_rows)
    for name, z in sizes:
        ratio = z["params_total"] / z["params_non_embedding"] if z.get("params_non_embedding") else float("nan")
        runs = [x for x in res["runs"] if x["size"] == name]
        rows = []
        for r in sorted({x["rung"] for x in runs}):
            at = [x for x in runs if x["rung"] == r]
            by = {k: {x["seed"]: x["val_loss"] for x in at if x["kind"] == k} for k in KINDS}
            d = {k: [by[k][s] - by["token"][s] for s in by[k] if s in by["token"]] for k in ("E1", "E2")}
            ctl = [by["E1"][s] - by["control"][s] for s in by["E1"] if s in by["control"]]
            rows.append([f"{r:g}", f"{r * ratio:.3g}", len(by["token"]), cell(d["E1"]), cell(d["E2"]), cell(ctl)])
        out += (f"\n\nSize {name}: {z.get('params_total', 0):,} parameters\n\n"
                + C.md_table(["tokens/param (total)", "tokens/param (non-embedding)", "seeds", "Δ E1 (equal data)",
                              "Δ E2 (equal compute)", "E1 − control"], rows))
    runs = [[x["name"], f"{x['tokens']:,}", x["epochs"], f"{x['positions']:,}", f"{x['val_loss']:.4f}",
             f"{x['wall_s']:.0f}"] for x in res["runs"]]
    return out + "\n\nEvery run:\n\n" + C.md_table(["run", "tokens", "epochs", "positions", "val loss", "fit s"], runs)


def plot(res: dict[str, Any], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), sharex=True)
    sizes = sorted(res["sizes"].items(), key=lambda kv: kv[1].get("params_total", 0))
    for i, (name, z) in enumerate(sizes):
        runs = [x for x in res["runs"] if x["size"] == name]
        for setting, style in (("E1", "-o"), ("E2", "--s")):
            pts = [x for x in res["ladder"] if x["size"] == name and x["setting"] == setting]
            if pts:
                axes[0].errorbar([x["tokens_per_param"] for x in pts], [statistics.mean(x["deltas"]) for x in pts],
                                 yerr=[statistics.stdev(x["deltas"]) if len(x["deltas"]) > 1 else 0 for x in pts],
                                 fmt=style, capsize=3, color=f"C{i}",
                                 label=f"{name} ({z['params_total']:,} params) {setting}")
        ctl = []
        for r in sorted({x["rung"] for x in runs}):
            e1 = {x["seed"]: x["val_loss"] for x in runs if x["rung"] == r and x["kind"] == "E1"}
            c = {x["seed"]: x["val_loss"] for x in runs if x["rung"] == r and x["kind"] == "control"}
            ds = [e1[s] - c[s] for s in e1 if s in c]
            if ds:
                ctl.append((r, statistics.mean(ds), statistics.stdev(ds) if len(ds) > 1 else 0))
        if ctl:
            axes[1].errorbar(*zip(*[(r, m) for r, m, _ in ctl]), yerr=[e for *_, e in ctl], fmt="-o", capsize=3,
                             color=f"C{i}", label=f"{name} ({z['params_total']:,} params)")
    px, py = zip(*res["paper_table4"])
    axes[0].plot(px, py, "^:", color="gray", label="paper Table 4 (370M, equal data)")
    for ax, title, ylabel in (
            (axes[0], "Δ: patch − token-only (< 0: patch better)", "Δ final val loss (nats)"),
            (axes[1], "E1 − control: what the patch phase gave (< 0: a head start)", "nats")):
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xscale("log")
        ax.set(xlabel="tokens per parameter (total)", ylabel=ylabel, title=title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
