"""The trainer: Ray Train + DeepSpeed ZeRO with the patch→token switch inside one run.

`train_loop_per_worker` is the whole loop, top to bottom. `fit` is the driver: it checks the config, data
and any checkpoint to resume before anything starts, runs the TorchTrainer, exports the final model and
writes the summary. Everything the loop needs is a function in this or another module.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raypatch.checkpoint import (
    check_checkpoint,
    check_compatible,
    check_shards,
    clear_stale,
    export_hf,
    find_latest,
    load_meta,
    restore_rng,
    save_local,
    to_universal,
)
from raypatch.config import Config
from raypatch.data import (
    PhasePlan,
    TokenStream,
    check_vocab,
    load_manifest,
    plan_from_config,
    text_rows,
    tokenizer_dir,
    val_rows,
    worker_dataset,
)
from raypatch.metrics import MetricsWriter, log_line, peak_flops, plot_runs
from raypatch.model import build_model, check_token_ids, lm_loss, num_params
from raypatch.patching import flops_per_position, relative_cost
from raypatch.prepare import shards_id
from raypatch.safety import (
    InputError,
    check_not_overlapping,
    find_input_error,
    restricted_torch_load,
    unpickle_error,
)
from raypatch.schedule import lr_at


class PatchLM(torch.nn.Module):
    """Wraps the HF model so that DeepSpeed's forward computes the phase's loss; weights stay under `hf.`."""

    def __init__(self, hf: torch.nn.Module) -> None:
        super().__init__()
        self.hf = hf

    def forward(self, input_ids: torch.Tensor, k: int) -> torch.Tensor:
        return lm_loss(self.hf, input_ids, k)


def quiet_worker_logs() -> None:
    """Keep the worker's output to our one line per log interval: Ray Data, Train and DeepSpeed say a lot."""
    import logging

    names = ["ray.data", "ray.train", "DeepSpeed", "deepspeed", "torch.distributed"]
    try:  # Train V2 logs every report at INFO under a logger named by its file path, not "ray.train"
        from ray.train.v2._internal.execution import context

        names.append(context.__file__)
    except ImportError:
        pass
    for name in names:
        logging.getLogger(name).setLevel(logging.WARNING)


def maybe_inject_fault(run_dir: Path, rank: int, global_step: int) -> None:
    """Fault injection for tests and drills: RAYPATCH_KILL_AT_STEPS="6,22" and RAYPATCH_KILL_RANK=1 make
    that rank SIGKILL itself once after each listed global step (a marker file keeps it to once)."""
    steps = os.environ.get("RAYPATCH_KILL_AT_STEPS", "")
    if not steps or rank != int(os.environ.get("RAYPATCH_KILL_RANK", "0")):
        return
    if str(global_step) in steps.split(","):
        marker = run_dir / f".killed-at-{global_step}"
        if not marker.exists():
            marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)


def deepspeed_config(cfg: Config, grad_accum: int, world: int) -> dict[str, Any]:
    o = cfg.optim
    zero: dict[str, Any] = {"stage": cfg.scale.zero_stage}
    if cfg.scale.zero_stage == 3:
        # Tiny models would otherwise stay whole on every rank (below DeepSpeed's 1e5-element default).
        zero["stage3_param_persistence_threshold"] = cfg.scale.zero3_persistence_threshold
    return {
        "train_micro_batch_size_per_gpu": o.micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": o.micro_batch_size * grad_accum * world,
        "gradient_clipping": o.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.scale.precision == "bf16"},
        # torch_adam avoids compiling DeepSpeed's fused Adam (40-70 s) and runs on CPU and GPU alike.
        "optimizer": {"type": "AdamW", "params": {"lr": o.lr, "betas": [o.beta1, o.beta2], "eps": o.eps,
                                                  "weight_decay": o.weight_decay, "torch_adam": True}},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices and embeddings; not norms and biases (as HF Trainer does in the reference)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def grad_accum_steps(plan: PhasePlan, world: int, micro_batch: int) -> int:
    per_worker, rem = divmod(plan.blocks_per_step, world * micro_batch)
    if rem or per_worker == 0:
        raise ValueError(f"optim.tokens_per_step: {plan.blocks_per_step} {plan.phase}-phase rows per step do not "
                         f"divide across {world} workers x {micro_batch} rows (optim.micro_batch_size)")
    return per_worker


def start_phase(engine: Any, cfg: Config, plan: PhasePlan, world: int, *, reset_optimizer: bool) -> int:
    """Set gradient accumulation for the phase's block size; at the switch, reset AdamW's state.

    Tokens per step are fixed across phases, so the patch phase (K·T-token rows) needs K times fewer rows
    per step than the token phase: the micro-batch stays, gradient accumulation changes. The paper resets
    the optimizer at the switch and keeps only the weights: clearing AdamW's moments and step counts keeps
    DeepSpeed's fp32 master weights exactly, with no round trip through bf16 module weights.
    """
    ga = grad_accum_steps(plan, world, cfg.optim.micro_batch_size)
    engine.set_train_batch_size(cfg.optim.micro_batch_size * ga * world)
    if reset_optimizer:
        base = engine.optimizer.optimizer if hasattr(engine.optimizer, "optimizer") else engine.optimizer
        base.state.clear()
    return ga


def evaluate(engine: Any, rows: np.ndarray, *, rank: int, world: int, micro_batch: int, device: Any) -> float:
    """Token-level (K=1) mean loss over `rows`, split across ranks; every rank runs the same forwards."""
    import torch.distributed as dist

    n = len(rows) - len(rows) % world  # equal shares: under ZeRO-3 every forward is collective
    mine = rows[rank:n:world]
    total = torch.zeros(2, dtype=torch.float64, device=device)
    engine.eval()
    with torch.no_grad():
        for i in range(0, len(mine), micro_batch):
            ids = torch.from_numpy(mine[i:i + micro_batch]).long().to(device)
            total[0] += engine(ids, 1).double() * len(ids)
            total[1] += len(ids)
    engine.train()
    if hasattr(engine, "empty_partition_cache") and engine.zero_optimization_stage() == 3:
        engine.empty_partition_cache()
    dist.all_reduce(total)
    return float(total[0] / total[1]) if total[1] > 0 else float("nan")


def checkpoint_is_due(cfg: Config, since_t: float, device: Any) -> bool:
    """checkpoint.every_minutes, decided by rank 0's clock so that every rank saves at the same step."""
    import torch.distributed as dist

    if not cfg.checkpoint.every_minutes:
        return False
    flag = torch.tensor([float(time.monotonic() - since_t >= 60 * cfg.checkpoint.every_minutes)], device=device)
    dist.broadcast(flag, 0)
    return bool(flag.item())


def next_batch(batches: Any, plan: PhasePlan, micro_batch: int, vocab_size: int) -> tuple[np.ndarray, list[int], str]:
    """The next micro-batch (ids, block numbers, ''), or a zero batch and the reason when the data is bad.

    A bad batch (a damaged row group, a token id outside the vocabulary) is found on one rank only, while
    every rank must run the same collectives: that rank trains this step on zeros and the step ends with
    `first_error`, which every rank calls, so all of them stop together with the same one-line message
    before the optimizer step. Deterministic data errors are never retried by Ray.
    """
    zeros = np.zeros((micro_batch, plan.block_tokens), np.int32)
    try:
        batch = next(batches)
    except StopIteration:
        raise
    except Exception as e:
        err = find_input_error(e)
        if err is None:
            raise
        return zeros, [], str(err)
    try:
        check_token_ids(batch["input_ids"], vocab_size,
                        lambda: f"{plan.phase}-phase blocks {batch['block'].tolist()}")
    except ValueError as e:
        return zeros, batch["block"].tolist(), str(e)
    return batch["input_ids"], batch["block"].tolist(), ""


def first_error(error: str, device: Any) -> str:
    """Collective: '' when no rank saw a data error in this step, else the lowest failing rank's message."""
    import torch.distributed as dist

    flag = torch.tensor([1.0 if error else 0.0], device=device)
    dist.all_reduce(flag)
    if flag.item() == 0:
        return ""
    errors: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    return next(e for e in errors if e)


def plan_dicts(plans: list[PhasePlan]) -> list[dict[str, Any]]:
    return [p.to_dict() for p in plans]


def new_state() -> dict[str, Any]:
    return {"phase": 0, "step_in_phase": 0, "global_step": 0, "cursor": 0,
            "tokens": {"patch": 0, "token": 0}, "positions": {"patch": 0, "token": 0},
            "seconds": {"patch": 0.0, "token": 0.0}, "flops": 0.0}


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """One Ray Train worker. Bad input found here (the same on every rank: a shard set or checkpoint that
    changed after the driver's checks) ends the run with its one-line message instead of a traceback that
    Ray would retry; `fit` raises it on the driver."""
    try:
        return train_loop(config)
    except InputError as e:
        return {"error": str(e)}


def train_loop(config: dict[str, Any]) -> dict[str, Any]:
    """One Ray Train worker: seed, data plan, model, DeepSpeed engine, resume, then both phases."""
    import deepspeed
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    cfg = Config.from_dict(config["cfg"])
    run_dir = Path(config["run_dir"])
    quiet_worker_logs()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)

    def say(msg: str) -> None:
        # Straight to stdout: Train V2 patches print() into its logger, which repeats each line on the driver.
        if rank == 0:
            sys.stdout.write(msg + "\n")
            sys.stdout.flush()

    # The data plan is a pure function of the manifest and the config: every worker computes the same.
    manifest = load_manifest(cfg.data.shards)
    tok_dir = tokenizer_dir(cfg.data.shards, manifest)
    plans = plan_from_config(cfg, manifest["splits"]["train"]["tokens"])
    planned_tokens = sum(p.num_steps * cfg.optim.tokens_per_step for p in plans)

    # Resume: the state says which phase, which step and (through the cursor) which blocks come next.
    state = new_state()
    ckpt = ray.train.get_checkpoint()
    ckpt_dir, load_tag = None, "ds"
    if ckpt is not None:
        # A local copy, removed once loaded (below), also when loading fails.
        ckpt_dir = tempfile.mkdtemp(prefix="raypatch-resume-")
        ckpt.to_directory(ckpt_dir)
        meta = load_meta(ckpt_dir)
        check_compatible(meta, config=cfg.to_dict(), tokenizer_fingerprint=manifest["tokenizer"]["fingerprint"],
                         plan=plan_dicts(plans), shards=shards_id(manifest), where=str(ckpt.path))
        state = meta["state"]
        check_shards(ckpt_dir, meta["world_size"])
        if meta["world_size"] != world:
            # ZeRO shards only load at the data-parallel size that wrote them: convert to DeepSpeed's universal
            # checkpoint, which loads at any size. The data cursor needs nothing: it counts blocks, not ranks.
            load_tag = to_universal(ckpt_dir)
            say(f"resizing: checkpoint written by {meta['world_size']} workers, resuming on {world} "
                f"(universal checkpoint; gradient accumulation recomputed, tokens per step unchanged)")

    model = PatchLM(build_model(cfg.model, seed=cfg.seed))
    n_params = num_params(model.hf)
    plan = plans[state["phase"]] if state["phase"] < len(plans) else plans[-1]
    ga = grad_accum_steps(plan, world, cfg.optim.micro_batch_size)
    ds_config = deepspeed_config(cfg, ga, world)
    if load_tag != "ds":
        ds_config["checkpoint"] = {"load_universal": True}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, cfg.optim.weight_decay),
                                      config=ds_config)
    if ckpt_dir is not None:
        try:
            with restricted_torch_load():  # DeepSpeed unpickles with weights_only=False: never let it
                engine.load_checkpoint(ckpt_dir, tag=load_tag, load_optimizer_states=True,
                                       load_lr_scheduler_states=False)
            restore_rng(ckpt_dir, rank)
        except pickle.UnpicklingError as e:
            raise unpickle_error(e, str(ckpt.path)) from None
        finally:
            shutil.rmtree(ckpt_dir, ignore_errors=True)
        say(f"resumed from {ckpt.path}: {plan.phase} phase, step {state['step_in_phase']}/{plan.num_steps}")

    val_sets = {"val": val_rows(TokenStream(cfg.data.shards, "val", manifest=manifest), cfg.data.seq_len,
                                cfg.eval.max_rows)}
    if cfg.eval.wikitext:
        val_sets["wikitext"] = text_rows(cfg.eval.wikitext, tok_dir, cfg.data.seq_len, cfg.eval.max_rows)
    val_sets = {k: v for k, v in val_sets.items() if len(v) >= world}
    writer = MetricsWriter(run_dir, enabled=rank == 0)
    peak = peak_flops(device) * world
    fpp = flops_per_position(num_params=n_params, num_layers=cfg.model.num_layers,
                             hidden_size=cfg.model.hidden_size, seq_len=cfg.data.seq_len)

    def base_metrics(plan: PhasePlan) -> dict[str, Any]:
        return {"step": state["global_step"], "phase": plan.phase, "patch/k": plan.k,
                "phase_step": state["step_in_phase"], "phase_steps": plan.num_steps,
                "tokens/patch": state["tokens"]["patch"], "tokens/token": state["tokens"]["token"],
                "tokens/total": state["tokens"]["patch"] + state["tokens"]["token"], "tokens/planned": planned_tokens,
                "positions/total": state["positions"]["patch"] + state["positions"]["token"],
                "perf/flops_total": state["flops"]}

    def run_eval(plan: PhasePlan) -> dict[str, Any]:
        out = {}
        for name, rows in val_sets.items():
            loss = evaluate(engine, rows, rank=rank, world=world, micro_batch=cfg.optim.micro_batch_size,
                            device=device)
            out[f"{name}/loss"], out[f"{name}/ppl"] = loss, math.exp(min(loss, 50.0))
        say(f"[{plan.phase} K={plan.k}] step {state['global_step']:>6} eval (token-level, K=1): "
            + " ".join(f"{k} {v:.4f}" for k, v in out.items()))
        return out

    since = {"t": time.monotonic(), "tokens": 0}  # since the last checkpoint: time and tokens trained

    def checkpoint(plan: PhasePlan, metrics: dict[str, Any]) -> None:
        since.update(t=time.monotonic(), tokens=0)
        meta = {"version": 1, "state": state, "config": cfg.to_dict(), "plan": plan_dicts(plans),
                "tokenizer_fingerprint": manifest["tokenizer"]["fingerprint"], "tokenizer_dir": tok_dir,
                "shards_id": shards_id(manifest), "world_size": world}
        d = save_local(engine, rank=rank, meta=meta)
        try:
            name = f"checkpoint-{state['global_step']:07d}"
            if rank == 0:  # an unregistered upload of an earlier attempt may hold this name (checkpoint.py)
                storage = ray.train.get_context().get_storage()
                if clear_stale(storage.storage_filesystem, storage.build_checkpoint_path_from_name(name)):
                    say(f"removed {name} left unregistered by an earlier attempt; saving it anew")
            dist.barrier()  # nobody uploads before the stale directory is gone
            ray.train.report({**metrics, "checkpoint": name},
                             checkpoint=ray.train.Checkpoint.from_directory(str(d)), checkpoint_dir_name=name)
        finally:
            shutil.rmtree(d, ignore_errors=True)  # persisted by the synchronous report, or failed: free the copy

    # --- the two phases -------------------------------------------------------------------------------
    # One id per (re)start of the worker group, the same on every rank: rank 0's pid. Audits of trained
    # blocks take, for every step, the blocks of the last attempt that trained it.
    attempt_t = torch.tensor([os.getpid()], dtype=torch.int64, device=device)
    dist.broadcast(attempt_t, 0)
    attempt = int(attempt_t.item())
    log_loss = torch.zeros(2, dtype=torch.float64, device=device)
    metrics: dict[str, Any] = {}
    jit_saved = False
    for pi in range(state["phase"], len(plans)):
        plan = plans[pi]
        at_switch = pi > 0 and state["step_in_phase"] == 0
        ga = start_phase(engine, cfg, plan, world, reset_optimizer=at_switch and not cfg.phases.keep_optimizer)
        if at_switch:
            say(f"=== switch at step {state['global_step']}: patch phase done, token phase starts "
                f"({'kept optimizer' if cfg.phases.keep_optimizer else 'fresh optimizer, LR warmup restarts'})")
        mb = cfg.optim.micro_batch_size
        ds = worker_dataset(plan, cfg.data.shards, rank, world, start_block=state["cursor"],
                            end_block=plan.num_steps * plan.blocks_per_step, read_cpus=cfg.data.read_cpus)
        batches = iter(ds.iter_batches(batch_size=mb, batch_format="numpy", prefetch_batches=cfg.data.prefetch_batches))
        total_steps = sum(p.num_steps for p in plans) if cfg.phases.keep_optimizer else plan.num_steps
        window_t, window_wait, window_tokens, window_skip = time.perf_counter(), 0.0, 0, 0.0
        for step in range(state["step_in_phase"], plan.num_steps):
            sched_step = state["global_step"] if cfg.phases.keep_optimizer else step
            lr = lr_at(sched_step, total_steps, lr=cfg.optim.lr, warmup_steps=cfg.optim.warmup_steps,
                       min_lr=cfg.optim.min_lr)
            for group in engine.optimizer.param_groups:
                group["lr"] = lr
            step_t = time.perf_counter()
            trained_blocks: list[int] = []
            data_error = ""
            for micro in range(ga):
                t = time.perf_counter()
                if data_error:  # this rank's data already failed: zeros keep the collectives in step
                    rows = np.zeros((mb, plan.block_tokens), np.int32)
                else:
                    rows, blocks, data_error = next_batch(batches, plan, mb, cfg.model.vocab_size)
                    trained_blocks += blocks
                window_wait += time.perf_counter() - t
                ids = torch.from_numpy(rows.astype(np.int64)).to(device)  # (mb, block)
                engine.set_gradient_accumulation_boundary(micro == ga - 1)
                loss = engine(ids, plan.k)
                engine.backward(loss)
                log_loss[0] += loss.detach().double()
                log_loss[1] += 1
            data_error = first_error(data_error, device)
            if data_error:  # before the optimizer step: the bad batch never changes the weights
                writer.close()
                return {"error": data_error, "state": state}
            engine.step()
            state["step_in_phase"] = step + 1
            state["global_step"] += 1
            state["cursor"] = (step + 1) * plan.blocks_per_step
            state["tokens"][plan.phase] += cfg.optim.tokens_per_step
            state["positions"][plan.phase] += cfg.optim.tokens_per_step // plan.k
            state["flops"] += fpp * cfg.optim.tokens_per_step / plan.k
            state["seconds"][plan.phase] += time.perf_counter() - step_t
            window_tokens += cfg.optim.tokens_per_step
            if cfg.data.record_blocks:
                with open(run_dir / f"blocks-rank{rank}.jsonl", "a") as f:
                    f.write(json.dumps({"phase": plan.phase, "step": step, "global_step": state["global_step"],
                                        "rank": rank, "world": world, "pid": os.getpid(), "attempt": attempt,
                                        "t": time.time(), "blocks": trained_blocks}) + "\n")
            maybe_inject_fault(run_dir, rank, state["global_step"])

            last = step + 1 == plan.num_steps
            if state["global_step"] % cfg.log_every == 0 or last:
                dist.all_reduce(log_loss)
                dt = time.perf_counter() - window_t - window_skip
                m = base_metrics(plan) | {
                    "train/loss": float(log_loss[0] / log_loss[1]), "train/lr": lr,
                    "perf/tokens_per_s": window_tokens / dt, "perf/positions_per_s": window_tokens / plan.k / dt,
                    "perf/mfu": window_tokens / plan.k * fpp / dt / peak, "perf/data_wait": window_wait / dt}
                if plan.phase == "patch":  # never mixed with the token-level losses
                    m["train/patch_loss"] = m["train/loss"]
                log_loss.zero_()
                window_t, window_wait, window_tokens, window_skip = time.perf_counter(), 0.0, 0, 0.0
                say(log_line(m))
                if rank == 0:
                    writer.write(m)
            since["tokens"] += cfg.optim.tokens_per_step
            do_eval = last or (cfg.eval.every_steps and state["global_step"] % cfg.eval.every_steps == 0)
            do_ckpt = (last or (cfg.checkpoint.every_steps and state["global_step"] % cfg.checkpoint.every_steps == 0)
                       or (cfg.checkpoint.every_tokens and since["tokens"] >= cfg.checkpoint.every_tokens)
                       or checkpoint_is_due(cfg, since["t"], device))
            pce = cfg.checkpoint.preemption_check_every
            if pce and state["global_step"] % pce == 0 and not jit_saved:
                info = ray.train.get_preemption_info()  # a barrier: every rank asks at the same steps
                if info is not None:
                    say(f"preemption notice (ranks {info.preempted_ranks}, deadline {info.deadline_ms}): "
                        f"saving a just-in-time checkpoint at step {state['global_step']}")
                    do_ckpt = jit_saved = True
                    if rank == 0:
                        writer.write(base_metrics(plan) | {"event": "preemption", "ranks": info.preempted_ranks})
            metrics = base_metrics(plan)
            t_extra = time.perf_counter()
            if do_eval:
                metrics |= run_eval(plan)
                if rank == 0:
                    writer.write(metrics | {"event": "eval"})
            if last and pi + 1 < len(plans):
                # The switch checkpoint already points at the token phase: step 0, cursor 0.
                state.update(phase=pi + 1, step_in_phase=0, cursor=0)
                if rank == 0:
                    writer.write(base_metrics(plan) | {"event": "switch"})
            if do_ckpt:
                checkpoint(plan, metrics)
            window_skip += time.perf_counter() - t_extra  # throughput counts training, not eval or saving
        if pi + 1 == len(plans):
            state["phase"] = len(plans)

    writer.close()
    dist.barrier()
    summary = {"state": state, "params": n_params, "flops_per_position": fpp, "config": cfg.to_dict(),
               "plan": plan_dicts(plans), "final": {k: v for k, v in metrics.items() if "/" in k}}
    return summary


# --- the driver ----------------------------------------------------------------------------------------


def is_uri(path: str) -> bool:
    return "://" in path


def storage_uri(cfg: Config) -> str:
    """Where Ray Train keeps checkpoints: a local directory, or a URI such as s3://bucket/prefix."""
    p = cfg.checkpoint.storage_path
    return p if is_uri(p) else str(Path(p).expanduser().resolve())


def run_dir_of(cfg: Config) -> Path:
    """The local run directory for metrics, TensorBoard, plots, summary and export.

    With local storage it is the run's own storage directory; with a URI (s3://...) checkpoints go there and
    these files stay on local disk under ~/raypatch-runs/<name> (rank 0's node for metrics, the driver's for
    the rest).
    """
    if is_uri(cfg.checkpoint.storage_path):
        return Path("~/raypatch-runs").expanduser() / cfg.checkpoint.name
    return Path(cfg.checkpoint.storage_path).expanduser().resolve() / cfg.checkpoint.name


def preflight(cfg: Config) -> list[PhasePlan]:
    """Every check that can fail on bad input, before a worker starts or a checkpoint is touched."""
    if not cfg.data.shards:
        raise InputError("config field 'data.shards': empty (point it at a directory made by `raypatch prepare`)")
    manifest = load_manifest(cfg.data.shards, verify="meta")
    check_vocab(manifest, cfg.model.vocab_size, f"data.shards={cfg.data.shards}")
    plans = plan_from_config(cfg, manifest["splits"]["train"]["tokens"])
    for p in plans:
        grad_accum_steps(p, cfg.scale.num_workers, cfg.optim.micro_batch_size)
    if cfg.eval.wikitext and not Path(cfg.eval.wikitext).is_file():
        raise InputError(f"config field 'eval.wikitext': {cfg.eval.wikitext} is not a file")
    check_storage(cfg)
    latest = find_latest(run_dir_of(cfg))
    if latest is not None:
        meta = check_checkpoint(latest)
        check_compatible(meta, config=cfg.to_dict(), tokenizer_fingerprint=manifest["tokenizer"]["fingerprint"],
                         plan=plan_dicts(plans), shards=shards_id(manifest), where=str(latest))
    return plans


def check_storage(cfg: Config) -> None:
    """A local storage path must be a writable directory, and the run directory may not be, hold or lie
    inside the shard set or the evaluation file (a run writes metrics, checkpoints and exports there)."""
    if is_uri(cfg.checkpoint.storage_path):
        return
    storage = Path(cfg.checkpoint.storage_path).expanduser()
    for p in (storage, *storage.parents):
        if p.exists():
            if not p.is_dir():
                raise InputError(f"config field 'checkpoint.storage_path': {p} is a file, not a directory")
            if not os.access(p, os.W_OK):
                raise InputError(f"config field 'checkpoint.storage_path': {p} is not writable")
            break
    check_not_overlapping(run_dir_of(cfg), [("shard set (data.shards)", cfg.data.shards),
                                            ("evaluation file (eval.wikitext)", cfg.eval.wikitext)],
                          "run directory (checkpoint.storage_path/checkpoint.name)")


def worker_resources(cfg: Config) -> dict[str, float]:
    res = {"CPU": cfg.scale.cpus_per_worker}
    for item in filter(None, cfg.scale.worker_resources.split(",")):
        name, _, amount = item.partition("=")
        res[name.strip()] = float(amount)
    return res


def build_trainer(cfg: Config, *, callbacks: list | None = None) -> Any:
    """The TorchTrainer for `cfg`: the same object for `raypatch train`, jobs and Tune trials."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    run_dir = run_dir_of(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    env = {"RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0", "TOKENIZERS_PARALLELISM": "false",
           "DS_ACCELERATOR": "cuda" if cfg.scale.use_gpu else "cpu"}
    env |= {k: v for k, v in os.environ.items() if k.startswith("RAYPATCH_")}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.to_dict(), "run_dir": str(run_dir)},
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
            worker_runtime_env={"env_vars": env}, callbacks=callbacks,
            logging_config=LoggingConfig(log_level="WARNING")),
    )


def fit(cfg: Config, *, export: bool = True) -> dict[str, Any]:
    """Train one run (resuming it if its run directory holds a checkpoint); returns the summary."""
    preflight(cfg)
    run_dir = run_dir_of(cfg)
    t0 = time.perf_counter()
    result = build_trainer(cfg).fit()
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
                summary["export"] = str(export_hf(d, run_dir / "hf", overwrite=True))
    summary |= summarize(cfg, summary)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    plot_runs({cfg.checkpoint.name: run_dir / "metrics.jsonl"}, run_dir / "val_loss_vs_compute.png")
    return summary


def summarize(cfg: Config, summary: dict[str, Any]) -> dict[str, Any]:
    st = summary.get("state", {})
    tokens = st.get("tokens", {})
    final = summary.get("final", {})
    lam_trained = tokens.get("patch", 0) / max(1, tokens.get("patch", 0) + tokens.get("token", 0))
    return {"relative_cost": relative_cost(cfg.patch.k if tokens.get("patch") else 1, lam_trained),
            "val_ppl": final.get("val/ppl"), "wikitext_ppl": final.get("wikitext/ppl")}


def comparison_table(rows: list[tuple[str, dict[str, Any]]]) -> str:
    """Markdown table of runs side by side: data, positions, FLOPs, cost, wall-clock, final perplexities."""
    head = ("| run | K | λ | tokens (patch + token) | positions | FLOPs | relative cost | wall-clock per phase (s) "
            "| val ppl | WikiText ppl |\n|---|---|---|---|---|---|---|---|---|---|")
    out = [head]
    for name, s in rows:
        st = s["state"]
        cfg = s["config"]
        tp, tt = st["tokens"]["patch"], st["tokens"]["token"]
        pos = st["positions"]["patch"] + st["positions"]["token"]
        wall = f"{st['seconds']['patch']:.0f} + {st['seconds']['token']:.0f}"
        fmt = lambda v: f"{v:.2f}" if isinstance(v, (int, float)) else "-"  # noqa: E731
        out.append(f"| {name} | {cfg['patch']['k'] if tp else 1} | {tp / (tp + tt):.3f} | {tp:,} + {tt:,} | {pos:,} "
                   f"| {st['flops']:.3g} | {s['relative_cost']:.3f} | {wall} | {fmt(s['val_ppl'])} "
                   f"| {fmt(s['wikitext_ppl'])} |")
    return "\n".join(out)


