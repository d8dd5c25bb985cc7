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
`raypatch train`, with `TuneReportCallback`. A trial's run is named by its parameters (trial_name), not by Tune's
trial id, so the same point of the same experiment is always the same run.

Rerunning an experiment never restores Tune's own state (`Tuner.restore` unpickles files of the experiment
directory, which on shared storage anyone may have written). raypatch keeps its own JSON record instead:
experiment.json (budget, points, base config: a rerun with others is refused) and each finished trial's
trial.json. A rerun takes the finished trials from their records and starts a fresh Tune run for the others,
which resume from their own checkpoints (checked like any `raypatch train` resume). Random search draws its
points from the config's seed, so a rerun continues the same sample.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import os
import time
from pathlib import Path
from typing import Any

from raypatch.checkpoint import TrainState
from raypatch.config import Config, apply_overrides, replace, set_dotted, to_yaml
from raypatch.patching import PhaseBudget, budget_split, schedule_split
from raypatch.safety import InputError, find_input_error

# --- the search space ------------------------------------------------------------------------------


SPACES = {
    # The paper's axes: patch size and patch share (K=1 is the token-only baseline).
    "k-lam": ["patch.k=1,2,4,8", "patch.lam=0.5,0.667,0.8"],
    "lam": ["patch.k=4", "patch.lam=0.25,0.5,0.667,0.75,0.875"],
    "k": ["patch.k=1,2,4,8,16", "patch.lam=0.5"],
    "k-lam-lr": ["patch.k=2,4,8", "patch.lam=uniform:0.3:0.9", "optim.lr=loguniform:1e-4:3e-3"],
    # Beyond one switch: two phases against coarse-to-fine schedules, each with the paper's loss and a power
    # weighting inside the bag (schedules are separated by '|': their own items use commas).
    "schedules": ["phases.schedule=4:0.667,1:0.333|16:0.2,4:0.4,1:0.4|8:0.333,4:0.333,1:0.334",
                  "patch.weights=uniform,power:1"],
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
        else:  # a schedule's own items use commas: schedules are separated by '|'
            space[key] = [v for v in spec.split("|" if key == "phases.schedule" else ",") if v]
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


def sample_points(space: dict[str, Any], num_samples: int, seed: int) -> list[dict[str, Any]]:
    """Random search's points, drawn from `seed` (the same sample on every rerun), duplicates dropped."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out, seen = [], set()
    for _ in range(num_samples):
        p: dict[str, Any] = {}
        for k, v in space.items():
            if isinstance(v, list):
                p[k] = v[int(rng.integers(len(v)))]
            else:
                kind, a, b = v
                x = rng.uniform(a, b) if kind == "uniform" else float(np.exp(rng.uniform(np.log(a), np.log(b))))
                p[k] = round(float(x), 6)
        if str(p.get("patch.k", "")) == "1" and "patch.lam" in p:
            p["patch.lam"] = "0"
        if trial_name(p) not in seen:
            seen.add(trial_name(p))
            out.append(p)
    return out


def trial_name(params: dict[str, Any]) -> str:
    """A trial's run name from its parameters: rerunning a point resumes its run instead of starting another."""
    blob = json.dumps({k: str(v) for k, v in params.items()}, sort_keys=True)
    return "trial-" + hashlib.sha256(blob.encode()).hexdigest()[:10]


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
    if cfg.phases.schedule:  # every phase in whole steps that spend the budget (patching.schedule_split)
        try:
            exact, d, _ = schedule_split(budget, cfg.schedule(), tokens_per_step=cfg.optim.tokens_per_step,
                                         flops_per_pos=flops_per_pos)
        except ValueError as e:
            raise ValueError(f"--budget: {e}") from None
        epochs = max(1, -(-d // corpus_tokens))
        if epochs > 1 and not multi_epoch:
            raise ValueError(f"the schedule {cfg.phases.schedule} needs D={d:,} tokens for this budget but the "
                             f"corpus holds {corpus_tokens:,}; pass --multi-epoch to repeat it ({epochs} epochs)")
        cfg = replace(cfg, phases={"schedule": exact}, compare_baseline=False,
                      data={"max_tokens": d, "patch_tokens": 0, "epochs": epochs})
        return replace(cfg, checkpoint={"name": name}) if name else cfg
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
    from ray.tune.integration.ray_train import TuneReportCallback

    from raypatch import storage
    from raypatch.driver import build_trainer, preflight

    base = Config.from_dict(config["base"])
    cfg = trial_config(base, config["params"], config["budget"], corpus_tokens=config["corpus_tokens"],
                       flops_per_pos=config.get("flops_per_pos"), multi_epoch=config.get("multi_epoch", False),
                       name=trial_name(config["params"]))
    cfg = replace(cfg, checkpoint={"storage_path": config["trials_dir"]})
    preflight(cfg)
    t0 = time.perf_counter()
    result = build_trainer(cfg, callbacks=[TuneReportCallback()]).fit()
    if result.error is not None:
        raise find_input_error(result.error) or result.error
    if (result.return_value or {}).get("error"):
        raise InputError(result.return_value["error"])
    storage.write_text(storage.join(config["trials_dir"], cfg.checkpoint.name, "trial.json"), json.dumps(
        {"version": 1, "params": config["params"], "config": cfg.to_dict(), "wall_s": time.perf_counter() - t0,
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


EXPERIMENT = "experiment.json"
TRIAL = "trial.json"


def experiment_record(base: Config, *, budget: float, search: str, points: list[dict[str, Any]] | None,
                      space: dict[str, Any] | None, num_samples: int, flops_per_pos: float | None,
                      multi_epoch: bool) -> dict[str, Any]:
    """What makes an experiment's trials comparable; a rerun under the same name must match it."""
    return {"version": 1, "budget": budget, "search": search, "points": points,
            "space": None if points is not None else {k: v if isinstance(v, list) else list(v)
                                                      for k, v in (space or {}).items()},
            "num_samples": num_samples, "flops_per_pos": flops_per_pos, "multi_epoch": multi_epoch,
            "base": base.to_dict()}


def check_experiment(exp_dir: str, record: dict[str, Any], name: str) -> None:
    """Write the experiment's record, or refuse a rerun whose budget, points or config differ from it."""
    from raypatch import storage as store
    from raypatch.driver import config_diff

    path = store.join(exp_dir, EXPERIMENT)
    text = store.read_text(path)
    if text is None:
        if store.is_file(store.join(exp_dir, "tuner.pkl")):
            raise InputError(f"experiment {store.display(exp_dir)} was made by an older raypatch that resumed "
                             f"through Tune's pickled state, which is never loaded now; use a new --name")
        store.write_text(path, json.dumps(record, indent=1))
        return
    try:
        old = json.loads(text)
        if not isinstance(old, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        raise InputError(f"{store.display(path)} is damaged ({e}); move the experiment away or use a new "
                         f"--name") from None
    diff = [f"{k}: {old.get(k)!r} -> {record[k]!r}" for k in ("budget", "search", "points", "space", "num_samples",
                                                                 "flops_per_pos", "multi_epoch")
            if old.get(k) != record[k]]
    diff += config_diff(old.get("base") or {}, record["base"])
    diff = [d for d in diff if not d.startswith("scale.")]  # the same trials on another cluster shape
    if diff:
        raise InputError(f"experiment {name} was run with other settings ({'; '.join(diff)[:400]}); rerun it "
                         f"with the same ones, or use a new --name")


def finished_trial(trials_dir: str, name: str) -> dict[str, Any] | None:
    """A finished trial's record (JSON only), or None when it has not finished."""
    from raypatch import storage as store

    path = store.join(trials_dir, name, TRIAL)
    text = store.read_text(path)
    if text is None:
        return None
    try:
        info = json.loads(text)
        if not isinstance(info, dict) or not isinstance(info.get("final"), dict):
            raise ValueError("no final metrics")
    except ValueError as e:
        raise InputError(f"{store.display(path)} is damaged ({e}); move it away to train that trial again") from None
    return info


def trial_row(name: str, info: dict[str, Any]) -> dict[str, Any]:
    cfg = info.get("config") or {}
    st = TrainState.from_dict(info.get("state") or {})
    tok, final = st.tokens, info["final"]
    return {"trial": name, **{f"param:{k}": v for k, v in (info.get("params") or {}).items()},
            "K": cfg.get("patch", {}).get("k"), "lam": round(cfg.get("patch", {}).get("lam", 0.0), 4),
            "schedule": (cfg.get("phases") or {}).get("schedule", ""),
            "weights": cfg.get("patch", {}).get("weights", "uniform"),
            "D": tok.get("patch", 0) + tok.get("token", 0), "patch_tokens": tok.get("patch"),
            "token_tokens": tok.get("token"), "positions": sum(st.positions.values()), "flops": st.flops,
            "val_loss": final.get("val/loss"), "val_ppl": final.get("val/ppl"),
            "wikitext_ppl": final.get("wikitext/ppl"), "wall_s": round(info.get("wall_s", 0.0), 1), "config": cfg}


def run_search(base: Config, *, budget: float, space: dict[str, Any] | None = None, name: str, storage: str,
               search: str = "grid", num_samples: int = 8, flops_per_pos: float | None = None,
               multi_epoch: bool = False, concurrency: int = 0,
               points: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """One experiment at one budget; continues it when it exists (module docstring: from raypatch's JSON
    records, never Tune's pickled state). Returns the trial rows.

    `space` is parsed by parse_space; `points` gives the grid's points directly (successive halving).
    """
    from raypatch.shards import load_manifest

    corpus = load_manifest(base.data.shards)["splits"]["train"]["tokens"]
    # Reports carry the latest val/loss, but a checkpoint saved before a trial's first evaluation has none;
    # Tune's strict check would end the whole search on it. Trials are ranked on their final record.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    from raypatch import storage as store

    # The experiment (raypatch's records, Tune's runs, each trial's checkpoints) lives under the storage path: a
    # local directory, or a URI such as s3://bucket/prefix?endpoint_override=... (its query stays last).
    storage = storage if store.is_uri(storage) else str(Path(storage).expanduser().resolve())
    exp_dir, trials_dir = store.join(storage, name), store.join(storage, name, "trials")
    from raypatch.cluster import check_room

    check_room(base)  # every trial runs base's workers: a local cluster that can hold none fails here
    if search not in ("grid", "random", "optuna"):
        raise ValueError(f"--search {search!r}: expected grid, random or optuna")
    if search == "grid":
        points = points if points is not None else grid_points(space or {})
    elif search == "random":
        points = sample_points(space or {}, num_samples, base.seed)
    for p in points or []:  # fail fast, before any trial starts, on a budget a trial cannot use
        trial_config(base, p, budget, corpus_tokens=corpus, flops_per_pos=flops_per_pos, multi_epoch=multi_epoch)
    if not store.is_uri(storage):
        Path(storage).mkdir(parents=True, exist_ok=True)
    check_experiment(exp_dir, experiment_record(base, budget=budget, search=search, points=points, space=space,
                                                num_samples=num_samples, flops_per_pos=flops_per_pos,
                                                multi_epoch=multi_epoch), name)
    done: dict[str, dict[str, Any]] = {}
    if points is not None:
        for p in points:
            if (info := finished_trial(trials_dir, trial_name(p))) is not None:
                done[trial_name(p)] = info
        todo = [p for p in points if trial_name(p) not in done]
    else:  # optuna: the points are chosen as it goes; the finished ones count towards num_samples
        for path in store.glob(store.join(trials_dir, "trial-*", TRIAL)):
            trial = Path(path.split("?")[0]).parent.name
            if (info := finished_trial(trials_dir, trial)) is not None:
                done[trial] = info
        todo = [{}] * max(0, num_samples - len(done))
    if done:
        from raypatch.console import say

        say(f"experiment {name}: {len(done)} trial(s) finished earlier (taken from their records), {len(todo)} "
            f"to run")
    errors = []
    if todo:
        errors = _tune(base, todo if points is not None else None, space=space, search=search, budget=budget,
                       corpus=corpus, flops_per_pos=flops_per_pos, multi_epoch=multi_epoch, exp_dir=exp_dir,
                       trials_dir=trials_dir, concurrency=concurrency, samples=len(todo))
    rows = []
    names = [trial_name(p) for p in points] if points is not None else []
    for p_name in names or sorted(done):
        info = done.get(p_name) or finished_trial(trials_dir, p_name)
        if info is not None:
            rows.append(trial_row(p_name, info))
    if points is None:  # optuna's new trials
        for path in store.glob(store.join(trials_dir, "trial-*", TRIAL)):
            trial = Path(path.split("?")[0]).parent.name
            if trial not in done and (info := finished_trial(trials_dir, trial)) is not None:
                rows.append(trial_row(trial, info))
    return rows + [e for e in errors if e["trial"] not in {r["trial"] for r in rows}]


def _tune(base: Config, points: list[dict[str, Any]] | None, *, space: dict[str, Any] | None, search: str,
          budget: float, corpus: int, flops_per_pos: float | None, multi_epoch: bool, exp_dir: str,
          trials_dir: str, concurrency: int, samples: int) -> list[dict[str, Any]]:
    """A fresh Tune run (named by its start time, under the experiment) over `points`, or `samples` Optuna
    suggestions; returns a row per failed trial."""
    import ray
    from ray import tune

    common = {"base": base.to_dict(), "budget": budget, "corpus_tokens": corpus, "flops_per_pos": flops_per_pos,
              "multi_epoch": multi_epoch, "trials_dir": str(trials_dir)}
    search_alg = None
    if points is not None:
        param_space = {**common, "params": tune.grid_search(points)}
        samples = 1
    else:
        try:
            from ray.tune.search.optuna import OptunaSearch
        except ImportError as e:
            raise ValueError("--search optuna needs optuna installed (pip install 'raypatch[tune]')") from e
        dom = {k: tune.choice(v) if isinstance(v, list) else
               (tune.loguniform if v[0] == "loguniform" else tune.uniform)(v[1], v[2])
               for k, v in (space or {}).items()}
        param_space = {**common, "params": dom}
        search_alg = OptunaSearch(metric="val/loss", mode="min", seed=base.seed)
    # The trial driver only waits on its TorchTrainer. On a cluster whose head carries the custom resource
    # "driver" (cluster.yaml), drivers stay on that on-demand node, never on a spot worker.
    resources = {"CPU": 0.01} | ({"driver": 0.01} if ray.cluster_resources().get("driver") else {})
    from raypatch.cluster import pending_lines
    from raypatch.console import say

    tuner = tune.Tuner(
        tune.with_resources(train_driver, resources), param_space=param_space,
        tune_config=tune.TuneConfig(metric="val/loss", mode="min", num_samples=samples, search_alg=search_alg,
                                    max_concurrent_trials=concurrency or max_concurrent(base)),
        run_config=tune.RunConfig(name=f"tune-{time.strftime('%Y%m%d-%H%M%S')}", storage_path=exp_dir,
                                  callbacks=[trial_lines()], verbose=0))
    errors = []
    with pending_lines(say):
        grid = tuner.fit()
    for r in grid:
        if r.error is not None or not r.metrics:
            params = (r.config or {}).get("params") or {}
            errors.append({"trial": trial_name(params) if params else (r.path and Path(r.path).name),
                           "error": str(r.error).splitlines()[0] if r.error else "no result"})
    return errors


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
    ok = [r for r in rows if r.get("val_loss") is not None]
    if not ok:
        first = next((f"{r.get('trial')}: {r.get('error')}" for r in rows if r.get("error")), "no trial ran")
        kept = f"; the earlier results in {out} are left as they were" if (out / "results.md").exists() else ""
        raise InputError(f"no trial finished ({len(rows)} failed; first: {first}){kept}")
    out.mkdir(parents=True, exist_ok=True)
    cols = ["trial", "K", "lam", "D", "patch_tokens", "token_tokens", "positions", "flops", "val_loss", "val_ppl",
            "wikitext_ppl", "wall_s"]
    if any(r.get("schedule") for r in ok):  # a search over schedules: each row's phases and weighting
        cols = ["trial", "schedule", "weights", *cols[3:]]
    elif any(r.get("weights", "uniform") != "uniform" for r in ok):
        cols = [*cols[:3], "weights", *cols[3:]]
    if any("rung" in r for r in rows):
        cols = ["rung", "budget", *cols]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    w.writerows(sorted(ok, key=lambda r: r["val_loss"]))
    md = [f"Budget: {budget:,.0f} positions per trial; wall-clock of the search: {wall_s:.0f} s.", "",
          "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in sorted(ok, key=lambda r: r["val_loss"]):
        md.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
    for r in rows:
        if r.get("val_loss") is None:
            md.append(f"\nfailed: {r.get('trial')}: {r.get('error')}")
    best = min(ok, key=lambda r: r["val_loss"])
    what = (f"schedule {best['schedule']}, weights {best.get('weights')}" if best.get("schedule")
            else f"K={best.get('K')}, λ={_fmt(best.get('lam'))}")
    md += ["", f"Winner: {best['trial']} ({what}), final val loss "
               f"{best['val_loss']:.4f}." + (f" {note}" if note else "")]
    cfg = replace(Config.from_dict(best["config"]), checkpoint={"name": f"best-of-{out.name}"})
    head = f"# best trial {best['trial']}: final val loss {best['val_loss']:.4f}; run it with raypatch train\n"
    paths = {"csv": out / "results.csv", "md": out / "results.md", "best": out / "best.yaml"}
    # Each file is written beside its place and renamed into it: a crash leaves the old one or the new one.
    for key, text in (("csv", buf.getvalue()), ("md", "\n".join(md) + "\n"), ("best", head + to_yaml(cfg))):
        tmp = paths[key].with_name(f".{paths[key].name}.tmp-{os.getpid()}")
        tmp.write_text(text)
        os.replace(tmp, paths[key])
    tmp = out / f".heatmap.tmp-{os.getpid()}.png"
    heatmap(ok, tmp)
    paths["heatmap"] = out / "heatmap.png"
    os.replace(tmp, paths["heatmap"])
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

    # Columns are the requested λ: the trained λ differs slightly per K after rounding to whole steps. A search
    # over schedules has the requested schedules as rows and the weightings as columns instead.
    sched = any(r.get("schedule") for r in rows)
    lam_of = lambda r: round(float(r.get("param:patch.lam", r["lam"])), 4) if r["K"] > 1 else 0.0  # noqa: E731
    row_of = (lambda r: r.get("param:phases.schedule", r["schedule"])) if sched else (lambda r: r["K"])  # noqa: E731
    col_of = (lambda r: r.get("weights", "uniform")) if sched else lam_of  # noqa: E731
    ks = sorted({row_of(r) for r in rows}, key=str)
    lams = sorted({col_of(r) for r in rows}, key=str)
    grid = np.full((len(ks), len(lams)), np.nan)
    for r in rows:  # the last rung wins where successive halving ran a point more than once
        grid[ks.index(row_of(r)), lams.index(col_of(r))] = r["val_loss"]
    fig, ax = plt.subplots(figsize=(1.2 * len(lams) + 2.5, 0.8 * len(ks) + 2))
    im = ax.imshow(grid, cmap="viridis_r", aspect="auto")
    ax.set_xticks(range(len(lams)), [str(x) if sched else f"{x:.3g}" for x in lams])
    ax.set_yticks(range(len(ks)), [str(k) for k in ks])
    ax.set_xlabel("patch.weights" if sched else "λ requested (patch share of the data)")
    ax.set_ylabel("phases.schedule (K:share)" if sched else "K (patch size)")
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
               results: list[dict[str, Any]] | None = None, schedules: list[str] | None = None) -> str:
    """(K, λ, D) options for a compute budget: exactly what `raypatch tune` would train (budget_split), with
    measured losses when given; then each phase schedule's (schedule_split) options."""
    two_phase = [r for r in (results or []) if not r.get("schedule")]
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
            m = [r for r in two_phase if int(r["K"]) == k and round(float(r["lam"]), 2) == round(b.lam, 2)]
            lines.append(f"| {k} | {lam:.3g} | {b.lam:.4f} | {b.relative_cost:.3f} | {b.data_tokens:,} "
                         f"| {b.patch_tokens:,} | {b.token_tokens:,} | {epochs:.3g} "
                         f"| {'yes' if epochs <= 1 else 'multi-epoch'} |" + (f" {measured(m)} |" if results else ""))
    return "\n".join(lines) + (schedule_table(budget, corpus_tokens, schedules, tokens_per_step=tokens_per_step,
                                               results=results) if schedules else "")


def schedule_table(budget: float, corpus_tokens: int, schedules: list[str], *, tokens_per_step: int,
                   results: list[dict[str, Any]] | None = None) -> str:
    """The plan's rows for phase schedules: the whole-step shares `raypatch tune` would train (schedule_split), the
    relative cost Σ share/K, D and each phase's tokens, with a search's measured losses for the same schedule."""
    from raypatch.config import parse_schedule

    lines = ["", "", "| schedule | shares trained | relative cost | D (tokens) | tokens per phase "
             "| epochs of the corpus | fits |" + (" val loss |" if results else ""),
             "|---|---|---|---|---|---|---|" + ("---|" if results else "")]
    for text in schedules:
        try:
            exact, d, tokens = schedule_split(budget, parse_schedule(text), tokens_per_step=tokens_per_step)
        except ValueError as e:
            lines.append(f"| {text} | - | - | - | - | - | no: {e} |" + (" - |" if results else ""))
            continue
        trained = parse_schedule(exact)
        epochs = d / corpus_tokens
        m = [r for r in results or [] if r.get("schedule") == exact]
        lines.append(f"| {text} | {','.join(f'{k}:{x:.4f}' for k, x in trained)} "
                     f"| {sum(x / k for k, x in trained):.3f} | {d:,} | {' / '.join(f'{t:,}' for t in tokens)} "
                     f"| {epochs:.3g} | {'yes' if epochs <= 1 else 'multi-epoch'} |"
                     + (f" {measured(m)} |" if results else ""))
    return "\n".join(lines)


def measured(rows: list[dict[str, Any]]) -> str:
    """A plan cell: the measured val loss of a point, one per bag weighting a search tried there."""
    got = [(r.get("weights") or "uniform", float(r["val_loss"])) for r in rows if r.get("val_loss") not in (None, "")]
    if not got:
        return "-"
    if all(w == "uniform" for w, _ in got) and len(got) == 1:
        return f"{got[0][1]:.4f}"
    return ", ".join(f"{v:.4f} ({w})" for w, v in sorted(got))


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
