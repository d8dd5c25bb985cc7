"""Ray Tune search over K, λ (and friends) under a fixed compute budget.

Every trial gets the same compute C (model positions: tokens in the token phase plus patches in the patch
phase, or FLOPs at flops_per_position each) and, for its K and λ, trains on D = C / (λ/K + 1 − λ) tokens of
the same stream: λ·D at patch level, the rest at token level. The phase budgets are rounded to whole optimizer
steps so that every trial's compute is C minus less than one token-phase step. A trial stops itself when its
budget is spent (it is an ordinary complete run), never through Tune's stop (Ray issue 54305).

The objective is the final token-level validation loss. No ASHA and no early stopping on training curves:
the patch-initialised model trails the baseline until late in the token phase (the paper's Figure 4). Successive
halving is offered over *budgets*: every rung runs complete two-phase schedules, at η times the budget of
the rung before, on the best 1/η of the configurations.

Ray Train V2's pattern: `Tuner(driver)`, whose driver builds and fits the same TorchTrainer as
`raypatch train`, with `TuneReportCallback`; trial run names derive from the trial id.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import time
from pathlib import Path
from typing import Any

from raypatch.checkpoint import TrainState
from raypatch.config import Config, apply_overrides, replace, set_dotted, to_yaml
from raypatch.patching import PhaseBudget, budget_split
from raypatch.safety import InputError, find_input_error

# --- the search space ------------------------------------------------------------------------------


SPACES = {
    # The paper's axes: patch size and patch share (K=1 is the token-only baseline).
    "k-lam": ["patch.k=1,2,4,8", "patch.lam=0.5,0.667,0.8"],
    "lam": ["patch.k=4", "patch.lam=0.25,0.5,0.667,0.75,0.875"],
    "k": ["patch.k=1,2,4,8,16", "patch.lam=0.5"],
    "k-lam-lr": ["patch.k=2,4,8", "patch.lam=uniform:0.3:0.9", "optim.lr=loguniform:1e-4:3e-3"],
}


def parse_space(items: list[str]) -> dict[str, list[Any] | tuple[str, float, float]]:
    """Dotted keys to values: 'patch.k=1,2,4' (a grid of choices), 'optim.lr=loguniform:1e-4:1e-2' or
    'patch.lam=uniform:0.3:0.8' (random search only), or the name of a space in SPACES."""
    if len(items) == 1 and items[0] in SPACES:
        items = SPACES[items[0]]
    space: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--space {item!r}: expected key=v1,v2,... or key=uniform:a:b")
        key, spec = item.split("=", 1)
        if spec.startswith(("uniform:", "loguniform:")):
            kind, a, b = spec.split(":")
            space[key] = (kind, float(a), float(b))
        else:
            space[key] = [v for v in spec.split(",") if v]
        set_dotted(Config().to_dict(), key, None)  # an unknown key fails here, naming it
    return space


def grid_points(space: dict[str, Any]) -> list[dict[str, str]]:
    """Every combination of the listed values; K=1 points collapse to the token-only baseline (λ=0)."""
    keys = list(space)
    for k in keys:
        if not isinstance(space[k], list):
            raise ValueError(f"--space {k}: a grid needs listed values, not {space[k][0]} (use --search random)")
    seen, out = set(), []
    for combo in itertools.product(*(space[k] for k in keys)):
        p = dict(zip(keys, combo))
        if str(p.get("patch.k", "")) == "1" and "patch.lam" in p:
            p["patch.lam"] = "0"  # K=1 is token-level training whatever λ says
        sig = tuple(sorted(p.items()))
        if sig not in seen:
            seen.add(sig)
            out.append(p)
    return out


# --- fixed compute -----------------------------------------------------------------------------------


def trial_budget(cfg: Config, budget: float, *, corpus_tokens: int, flops_per_pos: float | None = None,
                 multi_epoch: bool = False) -> PhaseBudget:
    """The data one trial can afford (patching.budget_split for its K, λ and step), checked against the corpus."""
    try:
        b = budget_split(budget, cfg.patch.k, cfg.patch.lam, tokens_per_step=cfg.optim.tokens_per_step,
                         flops_per_pos=flops_per_pos, patch_only=cfg.phases.patch_only)
    except ValueError as e:
        raise ValueError(f"--budget: {e}") from None
    if b.epochs(corpus_tokens) > 1 and not multi_epoch:
        raise ValueError(f"K={b.k}, λ={cfg.patch.lam:.3g} needs D={b.data_tokens:,} tokens for this budget but the "
                         f"corpus holds {corpus_tokens:,}; pass --multi-epoch to repeat it "
                         f"({b.epochs(corpus_tokens)} epochs)")
    return b


def trial_config(base: Config, params: dict[str, Any], budget: float, *, corpus_tokens: int,
                 flops_per_pos: float | None = None, multi_epoch: bool = False, name: str = "") -> Config:
    """The base config with a trial's parameters, its data budget and its run name."""
    cfg = apply_overrides(base, [f"{k}={v}" for k, v in params.items()])
    if cfg.patch.k == 1:
        cfg = replace(cfg, patch={"lam": 0.0})
    b = trial_budget(cfg, budget, corpus_tokens=corpus_tokens, flops_per_pos=flops_per_pos, multi_epoch=multi_epoch)
    # The whole-step phase budgets go to the data plan as they are; λ is the trained share, for the record.
    cfg = replace(cfg, patch={"lam": b.lam}, compare_baseline=False,
                  data={"max_tokens": b.data_tokens, "patch_tokens": b.patch_tokens, "epochs": b.epochs(corpus_tokens)})
    return replace(cfg, checkpoint={"name": name}) if name else cfg


# --- the Tune driver -------------------------------------------------------------------------------------


def train_driver(config: dict[str, Any]) -> None:
    """One Tune trial: build the same TorchTrainer as `raypatch train` for this trial's config and fit it."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from raypatch import storage
    from raypatch.driver import build_trainer, preflight

    base = Config.from_dict(config["base"])
    trial = ray.tune.get_context().get_trial_id()
    cfg = trial_config(base, config["params"], config["budget"], corpus_tokens=config["corpus_tokens"],
                       flops_per_pos=config.get("flops_per_pos"), multi_epoch=config.get("multi_epoch", False),
                       name=f"trial-{trial}")
    cfg = replace(cfg, checkpoint={"storage_path": config["trials_dir"]})
    preflight(cfg)
    t0 = time.perf_counter()
    result = build_trainer(cfg, callbacks=[TuneReportCallback()]).fit()
    if result.error is not None:
        raise find_input_error(result.error) or result.error
    if (result.return_value or {}).get("error"):
        raise InputError(result.return_value["error"])
    storage.write_text(storage.join(config["trials_dir"], cfg.checkpoint.name, "trial.json"), json.dumps(
        {"params": config["params"], "config": cfg.to_dict(), "wall_s": time.perf_counter() - t0,
         "state": (result.return_value or {}).get("state"), "final": (result.return_value or {}).get("final")}))


def trial_lines() -> Any:
    """A Tune callback on the driver: one terminal line when a trial starts, reports, finishes or fails."""
    from ray import tune

    from raypatch.console import say

    def params(trial: Any) -> str:
        return " ".join(f"{k.split('.')[-1]}={v:.3g}" if isinstance(v, float) else f"{k.split('.')[-1]}={v}"
                        for k, v in (trial.config.get("params") or {}).items())

    class TrialLines(tune.Callback):
        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            say(f"trial {trial.trial_id} ({params(trial)}) started; {len(trials)} trials so far")

        def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
            loss = f", val loss {result['val/loss']:.4f} at step {result.get('eval/step')}" \
                if "val/loss" in result else ""
            say(f"trial {trial.trial_id} ({params(trial)}): step {result.get('step')} ({result.get('phase')} "
                f"phase){loss}")

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            done = sum(t.status == "TERMINATED" for t in trials)
            say(f"trial {trial.trial_id} ({params(trial)}) finished; {done}/{len(trials)} done")

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            say(f"trial {trial.trial_id} ({params(trial)}) failed (details in the log file)")

    return TrialLines()


def max_concurrent(cfg: Config) -> int:
    """Trials that fit the cluster at once, leaving a CPU for Ray Data and the Tune/Train drivers."""
    import ray

    res = ray.cluster_resources()
    if cfg.scale.use_gpu:
        return max(1, int(res.get("GPU", 0) // cfg.scale.num_workers))
    per_trial = cfg.scale.num_workers * cfg.scale.cpus_per_worker
    return max(1, int((res.get("CPU", 1) - 1) // per_trial))


def run_search(base: Config, *, budget: float, space: dict[str, Any] | None = None, name: str, storage: str,
               search: str = "grid", num_samples: int = 8, flops_per_pos: float | None = None,
               multi_epoch: bool = False, concurrency: int = 0,
               points: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """One Tune experiment at one budget; resumes it (Tuner.restore) when it exists. Returns the trial rows.

    `space` is parsed by parse_space; `points` gives the grid's points directly (successive halving).
    """
    from ray import tune

    from raypatch.shards import load_manifest

    corpus = load_manifest(base.data.shards)["splits"]["train"]["tokens"]
    # Reports carry the latest val/loss, but a checkpoint saved before a trial's first evaluation has none;
    # Tune's strict check would end the whole search on it. Trials are ranked on their final report.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    from raypatch import storage as store

    # The experiment (Tune's state, each trial's checkpoints and trial.json) lives under the storage path: a local
    # directory, or a URI such as s3://bucket/prefix?endpoint_override=... (its query stays last).
    storage = storage if store.is_uri(storage) else str(Path(storage).expanduser().resolve())
    exp_dir, trials_dir = store.join(storage, name), store.join(storage, name, "trials")
    common = {"base": base.to_dict(), "budget": budget, "corpus_tokens": corpus, "flops_per_pos": flops_per_pos,
              "multi_epoch": multi_epoch, "trials_dir": str(trials_dir)}
    if search == "grid":
        points = points if points is not None else grid_points(space or {})
        for p in points:  # fail fast, before any trial starts, on a budget a trial cannot use
            trial_config(base, p, budget, corpus_tokens=corpus, flops_per_pos=flops_per_pos, multi_epoch=multi_epoch)
        param_space = {**common, "params": tune.grid_search(points)}
        samples, search_alg = 1, None
    else:
        dom = {k: tune.choice(v) if isinstance(v, list) else
               (tune.loguniform if v[0] == "loguniform" else tune.uniform)(v[1], v[2])
               for k, v in (space or {}).items()}
        param_space = {**common, "params": dom}
        samples, search_alg = num_samples, None
        if search == "optuna":
            try:
                from ray.tune.search.optuna import OptunaSearch
            except ImportError as e:
                raise ValueError("--search optuna needs optuna installed (pip install 'raypatch[tune]')") from e
            search_alg = OptunaSearch(metric="val/loss", mode="min")
        elif search != "random":
            raise ValueError(f"--search {search!r}: expected grid, random or optuna")
    # The trial driver only waits on its TorchTrainer. On a cluster whose head carries the custom resource
    # "driver" (cluster.yaml), drivers stay on that on-demand node, never on a spot worker.
    import ray

    resources = {"CPU": 0.01} | ({"driver": 0.01} if ray.cluster_resources().get("driver") else {})
    trainable = tune.with_resources(train_driver, resources)
    if not store.is_uri(storage):
        Path(storage).mkdir(parents=True, exist_ok=True)
    if tune.Tuner.can_restore(exp_dir):
        tuner = tune.Tuner.restore(exp_dir, trainable=trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable, param_space=param_space,
            tune_config=tune.TuneConfig(metric="val/loss", mode="min", num_samples=samples, search_alg=search_alg,
                                        max_concurrent_trials=concurrency or max_concurrent(base)),
            run_config=tune.RunConfig(name=name, storage_path=storage, callbacks=[trial_lines()],
                                      verbose=0))
    grid = tuner.fit()
    rows = []
    for r in grid:
        if r.error is not None or not r.metrics:
            rows.append({"trial": r.path and Path(r.path).name, "error": str(r.error).splitlines()[0]
                         if r.error else "no result"})
            continue
        trial_id = r.metrics.get("trial_id")
        info = json.loads(store.read_text(store.join(trials_dir, f"trial-{trial_id}", "trial.json")) or "{}")
        cfg = info.get("config") or {}
        st = TrainState.from_dict(info.get("state") or {})
        tok = st.tokens
        rows.append({
            "trial": f"trial-{trial_id}", **{f"param:{k}": v for k, v in r.config["params"].items()},
            "K": cfg.get("patch", {}).get("k"), "lam": round(cfg.get("patch", {}).get("lam", 0.0), 4),
            "D": tok.get("patch", 0) + tok.get("token", 0), "patch_tokens": tok.get("patch"),
            "token_tokens": tok.get("token"), "positions": sum(st.positions.values()),
            "flops": st.flops, "val_loss": r.metrics.get("val/loss"), "val_ppl": r.metrics.get("val/ppl"),
            "wikitext_ppl": r.metrics.get("wikitext/ppl"), "wall_s": round(info.get("wall_s", 0.0), 1),
            "config": cfg})
    return rows


def successive_halving(base: Config, *, budget: float, space: dict[str, Any], name: str, storage: str,
                       rungs: int = 3, eta: int = 2, **kw: Any) -> list[dict[str, Any]]:
    """Rung r trains the best 1/η^r of the grid on η^r × budget; every comparison is between finished runs."""
    points = grid_points(space)
    all_rows: list[dict[str, Any]] = []
    for r in range(rungs):
        rows = run_search(base, budget=budget * eta**r, points=points, name=f"{name}-rung{r}", storage=storage,
                          search="grid", **kw)
        for row in rows:
            row["rung"], row["budget"] = r, budget * eta**r
        all_rows += rows
        done = sorted((x for x in rows if x.get("val_loss") is not None), key=lambda x: x["val_loss"])
        points = [{k.removeprefix("param:"): v for k, v in x.items() if k.startswith("param:")}
                  for x in done[:max(1, len(done) // eta)]]
        if not points:
            break
    return all_rows


def write_outputs(rows: list[dict[str, Any]], out_dir: str | Path, *, budget: float, wall_s: float,
                  note: str | None = None) -> dict[str, Path]:
    """results.csv, results.md, heatmap.png (K × λ of final val loss) and best.yaml; `note` (ladder.transfer_note)
    goes beside the winner."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cols = ["trial", "K", "lam", "D", "patch_tokens", "token_tokens", "positions", "flops", "val_loss", "val_ppl",
            "wikitext_ppl", "wall_s"]
    if any("rung" in r for r in rows):
        cols = ["rung", "budget", *cols]
    ok = [r for r in rows if r.get("val_loss") is not None]
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(sorted(ok, key=lambda r: r["val_loss"]))
    md = [f"Budget: {budget:,.0f} positions per trial; wall-clock of the search: {wall_s:.0f} s.", "",
          "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in sorted(ok, key=lambda r: r["val_loss"]):
        md.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
    for r in rows:
        if r.get("val_loss") is None:
            md.append(f"\nfailed: {r.get('trial')}: {r.get('error')}")
    if ok:
        best = min(ok, key=lambda r: r["val_loss"])
        md += ["", f"Winner: {best['trial']} (K={best.get('K')}, λ={_fmt(best.get('lam'))}), final val loss "
                   f"{best['val_loss']:.4f}." + (f" {note}" if note else "")]
    (out / "results.md").write_text("\n".join(md) + "\n")
    paths = {"csv": out / "results.csv", "md": out / "results.md"}
    if ok:
        best = min(ok, key=lambda r: r["val_loss"])
        cfg = Config.from_dict(best["config"])
        cfg = replace(cfg, checkpoint={"name": f"best-of-{out.name}"})
        head = f"# best trial {best['trial']}: final val loss {best['val_loss']:.4f}; run it with raypatch train\n"
        (out / "best.yaml").write_text(head + to_yaml(cfg))
        paths["best"] = out / "best.yaml"
        paths["heatmap"] = heatmap(ok, out / "heatmap.png")
    return paths


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, int):
        return f"{v:,}"
    return "" if v is None else str(v)


def heatmap(rows: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    # Columns are the requested λ: the trained λ differs slightly per K after rounding to whole steps.
    lam_of = lambda r: round(float(r.get("param:patch.lam", r["lam"])), 4) if r["K"] > 1 else 0.0  # noqa: E731
    ks = sorted({r["K"] for r in rows})
    lams = sorted({lam_of(r) for r in rows})
    grid = np.full((len(ks), len(lams)), np.nan)
    for r in rows:  # the last rung wins where successive halving ran a point more than once
        grid[ks.index(r["K"]), lams.index(lam_of(r))] = r["val_loss"]
    fig, ax = plt.subplots(figsize=(1.2 * len(lams) + 2.5, 0.8 * len(ks) + 2))
    im = ax.imshow(grid, cmap="viridis_r", aspect="auto")
    ax.set_xticks(range(len(lams)), [f"{x:.3g}" for x in lams])
    ax.set_yticks(range(len(ks)), [str(k) for k in ks])
    ax.set_xlabel("λ requested (patch share of the data)")
    ax.set_ylabel("K (patch size)")
    for i, j in itertools.product(range(len(ks)), range(len(lams))):
        if not np.isnan(grid[i, j]):
            ax.text(j, i, f"{grid[i, j]:.3f}", ha="center", va="center", color="w", fontsize=8)
    fig.colorbar(im, label="final token-level val loss")
    ax.set_title("fixed compute: final validation loss")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --- planning ---------------------------------------------------------------------------------------------


def plan_table(budget: float, corpus_tokens: int, *, ks: list[int], lams: list[float], tokens_per_step: int,
               results: list[dict[str, Any]] | None = None) -> str:
    """(K, λ, D) options for a compute budget: exactly what `raypatch tune` would train (budget_split), with
    measured losses when given."""
    measured = {(int(r["K"]), round(float(r["lam"]), 2)): r for r in (results or [])}
    lines = ["| K | λ requested | λ trained | relative cost | D (tokens) | patch tokens | token tokens "
             "| epochs of the corpus | fits |" + (" val loss |" if results else ""),
             "|---|---|---|---|---|---|---|---|---|" + ("---|" if results else "")]
    for k in ks:
        for lam in ([0.0] if k == 1 else lams):
            try:
                b = budget_split(budget, k, lam, tokens_per_step=tokens_per_step)
            except ValueError as e:
                lines.append(f"| {k} | {lam:.3g} | - | - | - | - | - | - | no: {e} |" + (" - |" if results else ""))
                continue
            epochs = b.data_tokens / corpus_tokens
            m = measured.get((k, round(b.lam, 2)))
            lines.append(f"| {k} | {lam:.3g} | {b.lam:.4f} | {b.relative_cost:.3f} | {b.data_tokens:,} "
                         f"| {b.patch_tokens:,} | {b.token_tokens:,} | {epochs:.3g} "
                         f"| {'yes' if epochs <= 1 else 'multi-epoch'} |"
                         + (f" {m['val_loss']:.4f} |" if m else (" - |" if results else "")))
    return "\n".join(lines)


def model_flops_per_position(cfg: Config) -> float:
    """6·N + attention per position for cfg.model, counted on the meta device (no weights allocated)."""
    from raypatch.model import count_params
    from raypatch.patching import flops_per_position

    return flops_per_position(num_params=count_params(cfg.model), num_layers=cfg.model.num_layers,
                              hidden_size=cfg.model.hidden_size, seq_len=cfg.data.seq_len)


def read_results(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a finished search's results.csv (for `raypatch plan --experiment`)."""
    p = Path(path)
    p = p / "results.csv" if p.is_dir() else p
    if not p.exists():
        raise ValueError(f"--experiment {path}: no results.csv (run `raypatch tune` first)")
    with open(p) as f:
        return [{k: v for k, v in r.items()} for r in csv.DictReader(f)]
