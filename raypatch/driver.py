"""The driver: everything that runs before and after the Ray Train workers.

`preflight` checks config, data, storage and any checkpoint to resume before a worker starts; `build_trainer`
is the one TorchTrainer that `raypatch train`, the jobs and every Tune trial fit; `fit` runs it, exports the
model and writes the summary; `train_and_compare` is `raypatch train` (the run, and with compare_baseline the
token-only run on the same data); `default_data` tokenizes the embedded corpus when no shards are given.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from raypatch import storage
from raypatch.checkpoint import (
    TrainState,
    check_checkpoint,
    check_compatible,
    commit_callback,
    export_hf,
    find_latest,
    incomplete_after,
)
from raypatch.config import Config, replace
from raypatch.console import relay, say
from raypatch.data import PhasePlan, plan_dicts, plan_from_config
from raypatch.metrics import plot_runs
from raypatch.optim import grad_accum_steps
from raypatch.patching import relative_cost
from raypatch.presets import _flatten
from raypatch.safety import InputError, find_input_error
from raypatch.shards import check_vocab, load_manifest, shards_id

CORPUS_DIR = Path(__file__).parent / "corpus"
DEFAULT_CORPUS = CORPUS_DIR / "python-docs-sample.jsonl.gz"
DEFAULT_WIKITEXT = CORPUS_DIR / "wikitext103-test-sample.jsonl.gz"


def default_data(cfg: Config, *, prepare_now: bool = True) -> Config:
    """With no data.shards, tokenize the embedded corpus once (a BPE of model.vocab_size) and use it.

    With prepare_now=False only the paths are filled in (to recognise a finished run without starting Ray).
    """
    from raypatch.prepare import prepare, train_tokenizer
    from raypatch.shards import file_sha256

    if not cfg.eval.wikitext and DEFAULT_WIKITEXT.exists():
        cfg = replace(cfg, eval={"wikitext": str(DEFAULT_WIKITEXT)})
    if not cfg.data.shards:
        out = Path(cfg.checkpoint.storage_path).expanduser().resolve() / "data" / f"default-v{cfg.model.vocab_size}"
        fresh = False
        try:
            m = load_manifest(str(out))
            fresh = m["sources"][0]["sha256"] == file_sha256(DEFAULT_CORPUS) and m.get("shuffle_seed") == 0
        except (ValueError, KeyError, IndexError):
            fresh = False
        if not fresh and prepare_now:
            from raypatch.cluster import init_ray

            say(f"preparing the embedded corpus {DEFAULT_CORPUS.name} -> {out} (once; cached)")
            init_ray()
            tok = train_tokenizer([str(DEFAULT_CORPUS)], str(out.parent / f"tokenizer-v{cfg.model.vocab_size}"),
                                  vocab_size=cfg.model.vocab_size, overwrite=True)
            # Shuffled: the sample lists documents in path order (FAQ, HOWTOs, reference, tutorial, library a-o),
            # so in order the patch and token phases would read different parts of the documentation.
            prepare([str(DEFAULT_CORPUS)], tok, str(out), overwrite=True, val_every=20, shuffle_seed=0)
        cfg = replace(cfg, data={"shards": str(out)})
    return cfg


def planned_runs(cfg: Config) -> list[tuple[str, Config]]:
    """`raypatch train`'s runs: with compare_baseline, the token-only run on the same data first."""
    runs = []
    if cfg.compare_baseline and (cfg.patch.lam > 0 or cfg.phases.schedule):
        base = replace(cfg, patch={"lam": 0.0}, phases={"schedule": ""},
                       checkpoint={"name": f"{cfg.checkpoint.name}-token-only"})
        runs.append(("token-only", base))
    runs.append((cfg.run_label() if cfg.phases.schedule else f"patch K={cfg.patch.k} λ={cfg.patch.lam:.3g}", cfg))
    return runs


def log_file(cfg: Config, command: str) -> Path:
    """Where a command's Ray, DeepSpeed and worker output goes: beside the run directories."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return run_dir_of(cfg).parent / "logs" / f"{command}-{cfg.checkpoint.name}-{stamp}.log"


def train_and_compare(cfg: Config) -> list[tuple[str, dict[str, Any]]]:
    """`raypatch train`: the run in cfg, and with compare_baseline the token-only run on the same data.

    Runs that already finished (their summary matches this config and their newest checkpoint) are reported,
    not retrained, and nothing is written: a rerun of a finished command prints its results and exits.
    """
    from raypatch.cluster import end_ray, init_ray
    from raypatch.console import capture

    runs = planned_runs(default_data(cfg, prepare_now=False))
    done = {label: finished_summary(c) for label, c in runs}
    if all(done.values()):
        say("already trained: reporting the finished run" + ("s" if len(runs) > 1 else "") + " (no file changes; "
            "use another checkpoint.name, or remove the run directory, to train again)")
        for label, c in runs:
            content = shards_id(load_manifest(c.data.shards, verify="meta"))
            if note := moved_shards_note(done[label].get("config") or {}, c, content):
                say(note)
        results = [(label, done[label]) for label, _ in runs]
        say("\n" + comparison_table(results))
        say(outputs(runs, results, cfg, None))
        return results
    check_storage(cfg)  # the log file goes beside the run directories: they must be possible first
    from raypatch.cluster import check_room

    check_room(cfg)  # before a local cluster starts: can it ever hold the run?
    with capture(log_file(cfg, "train"), stop=end_ray) as log:
        say(f"raypatch train: outputs go to {run_dir_of(cfg).parent}"
            + (f"; Ray, DeepSpeed and worker output to {log}" if log else ""))
        init_ray()
        cfg = default_data(cfg)
        runs = planned_runs(cfg)
        results = []
        for label, c in runs:
            say(f"\n=== {label}: run {run_dir_of(c)}")
            if done.get(label):
                say("finished earlier: not retrained")
                results.append((label, done[label]))
                continue
            results.append((label, fit(c)))
        say("\n" + comparison_table(results))
        if len(results) > 1:
            out = run_dir_of(cfg)
            plot_runs({label: Path(s["run_dir"]) / "metrics.jsonl" for label, s in results},
                      out / "comparison.png", title="token-level validation loss vs compute")
            (out / "comparison.md").write_text(comparison_table(results) + "\n")
        say(outputs(runs, results, cfg, log))
    return results


# Fields that change no trained weight, and a run's identity (a run directory may have been moved or copied).
# data.shards is a path: the shard set is compared by its content id instead (same_shards, check_compatible), so
# the same set reached through another path (moved, a cache, an s3:// URI) resumes, and another set is refused.
IGNORED = {"gpu_hour_price", "log_every", "compare_baseline", "checkpoint.name", "checkpoint.storage_path",
           "data.cache_dir", "data.cache_gb", "data.shards"}


# Fields added since runs were first written, with the value every run made before had in effect.
FIELDS_ADDED = {"scale.cpu_kernels": "native", "patch.weights": "uniform"}


def config_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The fields that shape training and differ between two config dicts, as 'key: old -> new'."""
    a, b = dict(_flatten(old, source="a run's config")), dict(_flatten(new, source="the config"))
    for k, before in FIELDS_ADDED.items():
        if a and k not in a:
            a[k] = before
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(a.keys() | b.keys())
            if a.get(k) != b.get(k) and k not in IGNORED]


def finished_summary(cfg: Config) -> dict[str, Any] | None:
    """The summary of a run that finished with this config, if its newest checkpoint is the one the summary
    describes; None when not started, interrupted, trained further since, or made with another config (then
    preflight says what is wrong)."""
    run_dir = run_dir_of(cfg)
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
        latest = None if storage.is_uri(cfg.checkpoint.storage_path) else find_latest(run_dir)
        if not summary.get("final") or latest is None or config_diff(summary.get("config") or {}, cfg.to_dict()):
            return None
        meta = json.loads((latest / "meta.json").read_text())
        step = meta["state"]["global_step"]
        if meta.get("shards_id") and meta["shards_id"] != shards_id(load_manifest(cfg.data.shards, verify="meta")):
            return None  # another shard set under that path: preflight refuses it, naming both
    except (OSError, ValueError, KeyError, TypeError, InputError):
        return None
    return summary if step == (summary.get("state") or {}).get("global_step") else None


def moved_shards_note(old_config: dict[str, Any], cfg: Config, content: str) -> str | None:
    """One line when a run continues on its shard set reached through another path (same content id)."""
    old = (old_config.get("data") or {}).get("shards")
    if not old or old == cfg.data.shards:
        return None
    return (f"data.shards={cfg.data.shards} is the run's shard set by content (id {content[:12]}), which it "
            f"was made with at {old}: continuing")


def outputs(runs: list[tuple[str, Config]], results: list[tuple[str, dict[str, Any]]], cfg: Config,
            log: Path | None) -> str:
    """Where everything went: one line per output, the last thing a run prints."""
    lines = ["", "outputs:"]
    for (label, c), (_, s) in zip(runs, results):
        d = run_dir_of(c)
        lines.append(f"  {label}: {d}  (metrics.jsonl, val_loss_vs_compute.png, summary.json, checkpoints)")
        if s.get("export"):
            lines.append(f"    Hugging Face model: {s['export']}  (AutoModelForCausalLM.from_pretrained)")
    if len(results) > 1:
        d = run_dir_of(cfg)
        lines.append(f"  comparison: {d / 'comparison.md'}, {d / 'comparison.png'}")
    lines.append(f"  TensorBoard: tensorboard --logdir {run_dir_of(cfg).parent}")
    if log:
        lines.append(f"  log (Ray, DeepSpeed, workers): {log}")
    return "\n".join(lines)


def local_root(cfg: Config) -> Path:
    """Where a run's local files go: the storage directory, or ~/raypatch-runs when storage is a URI."""
    if storage.is_uri(cfg.checkpoint.storage_path):
        return Path("~/raypatch-runs").expanduser()
    return Path(cfg.checkpoint.storage_path).expanduser().resolve()


def storage_uri(cfg: Config) -> str:
    """Where Ray Train keeps checkpoints: a local directory, or a URI such as s3://bucket/prefix."""
    p = cfg.checkpoint.storage_path
    return p if storage.is_uri(p) else str(Path(p).expanduser().resolve())


def run_dir_of(cfg: Config) -> Path:
    """The local run directory for metrics, TensorBoard, plots, summary and export.

    With local storage it is the run's own storage directory; with a URI (s3://...) checkpoints go there and
    these files stay on local disk under ~/raypatch-runs/<name> (rank 0's node for metrics, the driver's for
    the rest).
    """
    return local_root(cfg) / cfg.checkpoint.name


def preflight(cfg: Config) -> list[PhasePlan]:
    """Every check that can fail on bad input, before a worker starts or a checkpoint is touched."""
    if not cfg.data.shards:
        raise InputError("config field 'data.shards': empty (point it at a directory made by `raypatch prepare`)")
    manifest = load_manifest(cfg.data.shards, verify="meta")
    check_vocab(manifest, cfg.model.vocab_size, f"data.shards={cfg.data.shards}")
    if cfg.model.source is not None:
        from raypatch.hfdir import check_shards_tokenizer

        check_shards_tokenizer(cfg.model, manifest, cfg.data.shards)
    plans = plan_from_config(cfg, manifest["splits"]["train"]["tokens"])
    for p in plans:
        grad_accum_steps(p.blocks_per_step, p.phase, cfg.scale.num_workers, cfg.optim.micro_batch_size)
    if cfg.eval.wikitext and not storage.is_file(cfg.eval.wikitext):
        raise InputError(f"config field 'eval.wikitext': {cfg.eval.wikitext} is not a file")
    check_storage(cfg)
    latest = find_latest(run_dir_of(cfg))
    if skipped := incomplete_after(run_dir_of(cfg), latest):
        say(f"passing over {', '.join(skipped)} (never committed: cut short by a crash or a kill); the run "
            f"resumes from {latest.name if latest else 'the start'}")
    if latest is not None:
        meta = check_checkpoint(latest)
        check_compatible(meta, config=cfg.to_dict(), tokenizer_fingerprint=manifest["tokenizer"]["fingerprint"],
                         plan=plan_dicts(plans), shards=shards_id(manifest), where=str(latest))
        if note := moved_shards_note(meta["config"], cfg, shards_id(manifest)):
            say(note)
        st = TrainState.from_dict(meta["state"])
        diff = config_diff(meta["config"], cfg.to_dict())
        if diff and (st.phase >= len(plans) or (st.phase == len(plans) - 1
                                                 and st.step_in_phase >= plans[-1].num_steps)):
            # Resuming would train nothing and replace the run's results with empty ones.
            raise InputError(f"run {run_dir_of(cfg)} already finished with another config ({'; '.join(diff[:4])}"
                             f"{'; ...' if len(diff) > 4 else ''}); use a new checkpoint.name to train this one")
    return plans


def check_storage(cfg: Config) -> None:
    """A local storage path must be a writable directory, and the run directory may not be, hold or lie
    inside the shard set or the evaluation file (a run writes metrics, checkpoints and exports there). On a
    store, one look-up of the run's prefix finds a missing bucket or denied access before any worker starts."""
    if storage.is_uri(cfg.checkpoint.storage_path):
        storage.info(storage.join(cfg.checkpoint.storage_path, cfg.checkpoint.name))
        return
    root = Path(cfg.checkpoint.storage_path).expanduser()
    for p in (root, *root.parents):
        if p.exists():
            if not p.is_dir():
                raise InputError(f"config field 'checkpoint.storage_path': {p} is a file, not a directory")
            if not os.access(p, os.W_OK):
                raise InputError(f"config field 'checkpoint.storage_path': {p} is not writable")
            break
    storage.check_not_overlapping(run_dir_of(cfg), [("shard set (data.shards)", cfg.data.shards),
                                            ("evaluation file (eval.wikitext)", cfg.eval.wikitext)],
                          "run directory (checkpoint.storage_path/checkpoint.name)")


def build_trainer(cfg: Config, *, callbacks: list | None = None, console: Any = None) -> Any:
    """The TorchTrainer for `cfg`: the same object for `raypatch train`, jobs and Tune trials."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from raypatch.cluster import kernel_env, worker_resources

    run_dir = run_dir_of(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    env = {"RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0", "TOKENIZERS_PARALLELISM": "false",
           "DS_ACCELERATOR": "cuda" if cfg.scale.use_gpu else "cpu"}
    env |= {k: v for k, v in os.environ.items() if k.startswith("RAYPATCH_")} | kernel_env(cfg)
    from raypatch.train import train_loop_per_worker

    return TorchTrainer(
        train_loop_per_worker,
        # console: a Ray queue that carries rank 0's lines to the driver's terminal (console.relay), or None
        train_loop_config={"cfg": cfg.to_dict(), "run_dir": str(run_dir), "console": console},
        scaling_config=ScalingConfig(
            num_workers=(cfg.scale.min_workers, cfg.scale.num_workers) if cfg.scale.min_workers
            else cfg.scale.num_workers,
            use_gpu=cfg.scale.use_gpu, resources_per_worker=worker_resources(cfg),
            elastic_resize_monitor_interval_s=cfg.scale.resize_check_s),
        run_config=RunConfig(
            name=cfg.checkpoint.name, storage_path=storage_uri(cfg),
            # Preemptions (spot reclaims, drained nodes) never use up max_failures, which is for real errors.
            failure_config=FailureConfig(max_failures=cfg.checkpoint.max_failures, max_preemption_failures=-1),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep),
            worker_runtime_env={"env_vars": env}, callbacks=[commit_callback(), *(callbacks or [])],
            logging_config=LoggingConfig(log_level="WARNING")),
    )


def fit(cfg: Config, *, export: bool = True) -> dict[str, Any]:
    """Train one run (resuming it if its run directory holds a checkpoint); returns the summary."""
    if cfg.model.source is not None:  # a config built in code: its shape fields from the model directory
        from raypatch.hfdir import resolve

        cfg = resolve(cfg)
    preflight(cfg)
    run_dir = run_dir_of(cfg)
    t0 = time.perf_counter()
    say(f"starting {cfg.scale.num_workers} Ray Train worker(s) (model, DeepSpeed engine, data pipeline)")
    from raypatch.cluster import check_room, pending_lines

    check_room(cfg)
    with relay() as console, pending_lines(say):
        result = off_main_thread(build_trainer(cfg, console=console).fit)
    if result.error is not None:
        raise find_input_error(result.error) or result.error
    summary = dict(result.return_value or {})
    if summary.get("error"):  # bad data met by the workers: every rank stopped with this message
        raise InputError(summary["error"])
    summary["wall_s"] = time.perf_counter() - t0
    summary["run_dir"] = str(run_dir)
    if result.checkpoint is not None:
        with result.checkpoint.as_directory() as d:
            summary["checkpoint"] = result.checkpoint.path
            if export:
                say(f"exporting the final model to {run_dir / 'hf'}")
                summary["export"] = str(export_hf(d, run_dir / "hf", overwrite=True))
    summary |= summarize(cfg, summary)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    plot_runs({cfg.checkpoint.name: run_dir / "metrics.jsonl"}, run_dir / "val_loss_vs_compute.png")
    return summary


def off_main_thread(fn: Callable[[], Any]) -> Any:
    """fn() on a worker thread, the main thread waiting. On the main thread Ray Train's fit() installs its own
    SIGINT handler (abort the run, then exit without a word, status 1); this way Ctrl-C reaches raypatch as
    KeyboardInterrupt, and the command ends every Ray process it started."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised on the main thread
            box["error"] = e

    t = threading.Thread(target=target, daemon=True, name="raypatch-fit")
    t.start()
    while t.is_alive():
        t.join(0.5)
    if "error" in box:
        raise box["error"]
    return box["value"]


def summarize(cfg: Config, summary: dict[str, Any]) -> dict[str, Any]:
    st = TrainState.from_dict(summary.get("state") or {})
    final = summary.get("final", {})
    patch, token = st.tokens["patch"], st.tokens["token"]
    lam_trained = patch / max(1, patch + token)
    # A schedule's cost is its positions per token (Σ share/K); two phases keep the paper's λ/K + 1 − λ.
    cost = (sum(st.positions.values()) / max(1, patch + token) if cfg.phases.schedule
            else relative_cost(cfg.patch.k if patch else 1, lam_trained))
    return {"relative_cost": cost,
            "val_ppl": final.get("val/ppl"), "wikitext_ppl": final.get("wikitext/ppl")}


def comparison_table(rows: list[tuple[str, dict[str, Any]]]) -> str:
    """Markdown table of runs side by side: data, positions, FLOPs, cost, savings, wall-clock, perplexities."""
    from raypatch.metrics import savings

    price = max((s["config"].get("gpu_hour_price", 0.0) for _, s in rows), default=0.0)
    head = ("| run | K | λ | tokens (patch + token) | positions | FLOPs | relative cost | saved vs token-only "
            "| wall-clock per phase (s) | val ppl | WikiText ppl |\n|---|---|---|---|---|---|---|---|---|---|---|")
    out = [head]
    for name, s in rows:
        st = TrainState.from_dict(s["state"])
        cfg = s["config"]
        tp, tt = st.tokens["patch"], st.tokens["token"]
        pos = st.positions["patch"] + st.positions["token"]
        hours = sum(st.seconds.values()) * cfg["scale"]["num_workers"] / 3600
        sv = savings(tp + tt, pos, st.flops, hours, price)
        saved = "-" if not sv["savings/fraction"] else (
            f"{sv['savings/fraction']:.0%}, {sv['savings/flops']:.3g} FLOPs, {sv['savings/device_hours']:.2g} "
            f"device-h" + (f", {sv['savings/cost']:,.2f}" if "savings/cost" in sv else ""))
        wall = f"{st.seconds['patch']:.1f} + {st.seconds['token']:.1f}"
        fmt = lambda v: f"{v:.2f}" if isinstance(v, (int, float)) else "-"  # noqa: E731
        ks = "→".join(k.split(":")[0] for k in sched.split(",")) if (sched := cfg.get("phases", {}).get("schedule")) \
            else cfg['patch']['k'] if tp else 1
        out.append(f"| {name} | {ks} | {tp / (tp + tt):.3f} | {tp:,} + {tt:,} | {pos:,} "
                   f"| {st.flops:.3g} | {s['relative_cost']:.3f} | {saved} | {wall} | {fmt(s['val_ppl'])} "
                   f"| {fmt(s['wikitext_ppl'])} |")
    return "\n".join(out)
