"""The Ray Train worker loop: DeepSpeed ZeRO with the patch→token switch inside one run.

`train_loop` reads top to bottom: setup (config, data plan, resume, engine, evaluation sets), then for each phase
its batches and steps. Each concern is a function it calls: the optimizer side in optim.py, checkpoints and
resume in checkpoint.py, throughput and the due-rules in metrics.py, audits and fault injection in faults.py.
The driver (preflight, the TorchTrainer, fit) is driver.py.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raypatch.checkpoint import (
    TAG,
    VERSION,
    Resume,
    TrainState,
    checkpoint_to_resume,
    save_and_report,
    sweep_temp_copies,
)
from raypatch.cluster import quiet_worker_logs
from raypatch.config import Config
from raypatch.data import PhasePlan, TokenStream, plan_dicts, plan_from_config, text_rows, val_rows, worker_dataset
from raypatch.faults import after_step, attempt_id, nan_loss_at
from raypatch.metrics import (
    MetricsWriter,
    ThroughputWindow,
    checkpoint_due,
    eval_due,
    log_due,
    log_line,
    peak_flops,
    savings,
)
from raypatch.model import PatchLM, build_model, check_token_ids, loss_sum, num_params
from raypatch.optim import (
    deepspeed_config,
    grad_accum_steps,
    lr_at,
    param_groups,
    restore_weight_decay,
    set_lr,
    split_note,
    stage_name,
    start_phase,
    step_split,
    zero_stage,
)
from raypatch.overlap import OverlappedAllReduce, deepspeed_clipping, overlapped
from raypatch.patching import flops_per_position
from raypatch.preemption import describe, hand_over, install_sigterm_hook, sigterm_received, training
from raypatch.safety import InputError, find_input_error
from raypatch.shards import load_manifest, local_tokenizer, shards_id, tokenizer_dir


@dataclass
class Worker:
    """This worker's place in the group and its one-line logger (rank 0 prints)."""

    rank: int
    world_size: int
    device: Any
    console: Any = None
    """The driver's queue to its terminal (raypatch.console.relay), or None: then stdout, which Ray forwards."""
    preempt_every: int = 1
    """Steps between preemption checks when they go by time: set at each log line, the same on every rank."""
    log_at: tuple[int, float] = (0, 0.0)
    """(global step, monotonic time) of the last log line."""

    def say(self, msg: str) -> None:
        if self.rank != 0:
            return
        if self.console is not None:
            try:
                self.console.put_nowait(msg)
                return
            except Exception:  # noqa: BLE001 - the driver is gone or busy: the line still reaches the worker log
                self.console = None
        # Straight to stdout: Train V2 patches print() into its logger, which repeats each line on the driver.
        sys.stdout.write(msg + "\n")
        sys.stdout.flush()


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """One Ray Train worker. Bad input found here (the same on every rank: a shard set or checkpoint that
    changed after the driver's checks) ends the run with its one-line message instead of a traceback that
    Ray would retry; `fit` raises it on the driver."""
    try:
        with training():  # SIGTERM during the loop hands over at the next step (raypatch.preemption)
            return train_loop(config)
    except InputError as e:
        return {"error": str(e)}


def train_loop(config: dict[str, Any]) -> dict[str, Any]:
    """Seed, data plan, resume, engine, evaluation sets; then both phases, step by step."""
    cfg = Config.from_dict(config["cfg"])
    run_dir = Path(config["run_dir"])
    w = start_worker(cfg, config.get("console"))
    # The data plan is a pure function of the manifest and the config: every worker computes the same.
    manifest = load_manifest(cfg.data.shards)
    plans = plan_from_config(cfg, manifest["splits"]["train"]["tokens"])
    identity = {"version": VERSION, "config": cfg.to_dict(), "plan": plan_dicts(plans),
                "tokenizer_fingerprint": manifest["tokenizer"]["fingerprint"],
                "tokenizer_dir": tokenizer_dir(cfg.data.shards, manifest), "shards_id": shards_id(manifest),
                "world_size": w.world_size}
    with checkpoint_to_resume(identity, w.world_size, w.say) as resume:  # the local copy goes on exit
        state = resume.state
        engine, n_params, stage = build_engine(cfg, plans[min(state.phase, len(plans) - 1)], w.world_size, resume)
        identity["zero_stage"] = stage  # meta.json: a resumed run keeps it (DeepSpeed loads a layout only into its own)
        if stage != zero_stage(cfg, n_params):
            w.say(f"resuming with DeepSpeed {stage_name(stage)}, as this run's checkpoint was written (the config "
                  f"asks for {stage_name(zero_stage(cfg, n_params))}; a new checkpoint.name starts a run with it)")
        resume.load_into(engine, w.rank)
        if resume.dir is not None and (fixed := restore_weight_decay(engine, cfg.optim.weight_decay)):
            w.say(f"restored the optimizer's weight decay after DeepSpeed's checkpoint load ({'; '.join(fixed)})")
        if resume.dir is not None:
            plan = plans[min(state.phase, len(plans) - 1)]
            w.say(f"resumed from {resume.where}: {plan.phase} phase, step {state.step_in_phase}/{plan.num_steps}")
    # Without ZeRO in fp32, the gradient all-reduce runs during the last backward (raypatch.overlap).
    overlap = (OverlappedAllReduce(engine, clip=cfg.optim.grad_clip) if overlapped(cfg, stage, w.world_size)
               else None)
    # The kernel set a CPU run computes with (scale.cpu_kernels): summary.json keeps it beside the figures.
    kernels = torch.backends.cpu.get_cpu_capability() if w.device.type == "cpu" else w.device.type
    w.say(f"{w.world_size} worker(s) ready: {n_params:,} parameters, DeepSpeed {stage_name(stage)} "
          f"{cfg.scale.precision} on {w.device.type}" + (f" ({kernels} kernels)" if w.device.type == "cpu" else "")
          + "; training")
    if w.device.type == "cpu" and cfg.scale.cpu_kernels == "avx2" and kernels != "AVX2":
        w.say("this CPU cannot run the AVX2 kernels scale.cpu_kernels=avx2 asks for: its losses can differ from "
              "an AVX2 machine's in the last digits, and after a few hundred steps in the table's")
    val_sets = evaluation_sets(cfg, manifest, w.world_size)
    writer = MetricsWriter(run_dir, enabled=w.rank == 0)
    flops_per_pos = flops_per_position(num_params=n_params, num_layers=cfg.model.num_layers,
                                       hidden_size=cfg.model.hidden_size, seq_len=cfg.data.seq_len)
    window = ThroughputWindow(peak_flops(w.device) * w.world_size, flops_per_pos)
    planned_tokens = sum(p.num_steps * cfg.optim.tokens_per_step for p in plans)
    attempt = attempt_id(w.device)
    # Loss sum and count since the last log line, and (filled in at the log line) the seconds they took.
    log_loss = torch.zeros(3, dtype=torch.float64, device=w.device)
    w.log_at = (state.global_step, time.monotonic())
    since_t, since_tokens = time.monotonic(), 0  # since the last checkpoint
    metrics: dict[str, Any] = {}
    last_eval: dict[str, float] = {}
    if cfg.model.init_from and state.global_step == 0:  # continued pretraining: the "before" of before/after
        last_eval = run_evaluation(engine, val_sets, cfg, state, plans[0], w) | {"eval/step": 0}
        writer.write(base_metrics(state, plans[0], planned_tokens) | last_eval | {"event": "eval"})
    jit_saved = False
    tps = cfg.optim.tokens_per_step

    for phase_index in range(state.phase, len(plans)):
        plan = plans[phase_index]
        micro = begin_phase(engine, cfg, plan, state, phase_index, w)
        rows = StepRows(phase_batches(cfg, plan, state.cursor, w), plan, cfg.model.vocab_size)
        window.reset()
        for step in range(state.step_in_phase, plan.num_steps):
            set_lr(engine, phase_lr(cfg, plans, plan, state, step))
            step_t = time.perf_counter()
            blocks, error, bad = forward_backward(engine, rows, plan, micro, cfg, w.device, window, log_loss,
                                                  overlap, poison=nan_loss_at(state.global_step + 1, w.rank))
            t_flags = time.perf_counter()
            # With the overlapped all-reduce the step's flags came with the gradient; else one all-reduce.
            error, term, nonfinite = step_flags(error, w.device, None if overlap is None else overlap.finish(), bad)
            if nonfinite and not error:
                error = nonfinite_error(state, plan, step, phase_lr(cfg, plans, plan, state, step), nonfinite)
            if error:  # before the optimizer step: the bad batch (or the diverged loss) never changes the weights
                writer.close()
                return {"error": error, "state": state.to_dict()}
            t_opt = time.perf_counter()
            engine.step()
            window.parts["flags"] += t_opt - t_flags
            window.parts["optimizer"] += time.perf_counter() - t_opt
            state.advance(plan.phase, plan.k, tps, flops_per_pos * tps / plan.k, time.perf_counter() - step_t,
                          plan.blocks_per_step)
            window.tokens += tps
            # A schedule's patch phases share the name 'patch': the record tells them apart by their number.
            after_step(run_dir, record=cfg.data.record_blocks,
                       phase=f"{plan.phase}{phase_index + 1}" if cfg.phases.schedule else plan.phase, step=step,
                       global_step=state.global_step, rank=w.rank, world_size=w.world_size, attempt=attempt,
                       blocks=blocks)

            last = step + 1 == plan.num_steps
            if log_due(cfg.log_every, state.global_step, last):
                m = log_metrics(state, plan, planned_tokens, log_loss, window, engine, cfg, w)
                w.say(log_line(m))
                writer.write(m)
            since_tokens += tps
            do_ckpt = (checkpoint_due(cfg, state.global_step, since_tokens, last)
                       or checkpoint_minutes_due(cfg, since_t, w.device))
            notice = None if jit_saved else preemption_noticed(cfg, state, plan, planned_tokens, writer, w)
            if term and not jit_saved:
                w.say(f"SIGTERM: saving a just-in-time checkpoint at step {state.global_step}")
                writer.write(base_metrics(state, plan, planned_tokens) | {"event": "sigterm"})
            if notice is not None or term:
                do_ckpt = jit_saved = True
            t_extra, c_extra = time.perf_counter(), time.thread_time()
            if eval_due(cfg.eval.every_steps, state.global_step, last):
                last_eval = run_evaluation(engine, val_sets, cfg, state, plan, w) | {"eval/step": state.global_step}
                writer.write(base_metrics(state, plan, planned_tokens) | last_eval | {"event": "eval"})
            # Every report carries the latest evaluation (eval/step says when): a checkpoint between evaluations
            # still shows Tune the metric it ranks trials by.
            metrics = base_metrics(state, plan, planned_tokens) | last_eval
            if last and phase_index + 1 < len(plans):
                state.next_phase(phase_index + 1)
                writer.write(base_metrics(state, plan, planned_tokens) | {"event": "switch"})
            if do_ckpt:
                since_t, since_tokens = time.monotonic(), 0
                stall = save_and_report(engine, rank=w.rank, meta={**identity, "state": state.to_dict()},
                                        metrics=metrics, say=w.say, upload=cfg.checkpoint.upload)
                writer.write(base_metrics(state, plan, planned_tokens) | {
                    "event": "checkpoint", "checkpoint/stall_s": stall, "checkpoint/upload": cfg.checkpoint.upload})
            window.exclude(t_extra, c_extra)  # throughput counts training, not eval or saving
            if (notice is not None or term) and not (last and phase_index + 1 == len(plans)):
                writer.close()
                hand_over(state.global_step, "SIGTERM" if term else describe(notice), w.say,
                          None if notice is None else notice.deadline_ms)
        if phase_index + 1 == len(plans):
            state.phase = len(plans)

    if not metrics:  # resumed from the run's last checkpoint (a rerun after a crash at the end): evaluate again
        last_eval = run_evaluation(engine, val_sets, cfg, state, plans[-1], w) | {"eval/step": state.global_step}
        metrics = base_metrics(state, plans[-1], planned_tokens) | last_eval
    writer.close()
    import torch.distributed as dist

    dist.barrier()
    return {"state": state.to_dict(), "params": n_params, "flops_per_position": flops_per_pos,
            "config": cfg.to_dict(), "plan": plan_dicts(plans), "final": {k: v for k, v in metrics.items() if "/" in k},
            "kernels": kernels}


# --- what the loop calls ------------------------------------------------------------------------------------


def start_worker(cfg: Config, console: Any = None) -> Worker:
    import ray.train
    import ray.train.torch

    quiet_worker_logs()
    sweep_temp_copies()  # what workers killed mid-save on this node left in its temporary directory
    install_sigterm_hook(cfg.checkpoint.sigterm_grace_s)
    ctx = ray.train.get_context()
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    return Worker(ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device(), console)


def build_engine(cfg: Config, plan: PhasePlan, world_size: int, resume: Resume) -> tuple[Any, int, int]:
    """The DeepSpeed engine around a fresh model (weights come from the checkpoint when resuming), its parameter
    count and its ZeRO stage (the config's for the model, or the checkpoint's: Resume.zero_stage)."""
    import deepspeed
    import deepspeed.ops

    # DeepSpeed's CPU shared-memory op serves only inference_all_reduce, never training, yet its backend
    # JIT-compiles it (about 2 minutes on a fresh machine) at the first initialize: not compatible = not built.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    model = PatchLM(build_model(cfg.model, seed=cfg.seed), weights=cfg.patch.weights)
    n_params = num_params(model.hf)
    stage = resume.zero_stage(zero_stage(cfg, n_params))
    grad_accum = grad_accum_steps(plan.blocks_per_step, plan.phase, world_size, cfg.optim.micro_batch_size)
    ds_config = deepspeed_config(cfg, grad_accum, world_size, n_params, stage)
    ds_config["gradient_clipping"] = deepspeed_clipping(cfg, stage, world_size)
    if resume.tag != TAG:
        ds_config["checkpoint"] = {"load_universal": True}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, cfg.optim.weight_decay),
                                      config=ds_config)
    return engine, n_params, stage


def evaluation_sets(cfg: Config, manifest: dict[str, Any], world_size: int) -> dict[str, np.ndarray]:
    """The token-level validation rows: the shard set's val split, and the WikiText documents when given."""
    sets = {"val": val_rows(TokenStream(cfg.data.shards, "val", manifest=manifest), cfg.data.seq_len,
                            cfg.eval.max_rows)}
    if cfg.eval.wikitext:
        sets["wikitext"] = text_rows(cfg.eval.wikitext, local_tokenizer(cfg.data.shards, manifest), cfg.data.seq_len,
                                     cfg.eval.max_rows)
    return {k: v for k, v in sets.items() if len(v) >= world_size}


def begin_phase(engine: Any, cfg: Config, plan: PhasePlan, state: TrainState, phase_index: int,
                w: Worker) -> list[tuple[int, float]]:
    """Gradient accumulation for the phase's block size; at the switch, the fresh optimizer. Returns this
    rank's micro-batches of a step (optim.step_split)."""
    at_switch = phase_index > 0 and state.step_in_phase == 0
    mb = cfg.optim.micro_batch_size
    grad_accum = grad_accum_steps(plan.blocks_per_step, plan.phase, w.world_size, mb)
    start_phase(engine, mb, grad_accum, w.world_size, reset_optimizer=at_switch and not cfg.phases.keep_optimizer)
    note = split_note(plan.blocks_per_step, plan.phase, w.world_size, mb)
    if note:
        w.say(note)
    if at_switch:
        starts = "token phase starts" if plan.k == 1 else f"patch phase K={plan.k} starts"
        w.say(f"=== switch at step {state.global_step}: patch phase done, {starts} "
              f"({'kept optimizer' if cfg.phases.keep_optimizer else 'fresh optimizer, LR warmup restarts'})")
    return step_split(plan.blocks_per_step, w.world_size, mb, w.rank)


def phase_batches(cfg: Config, plan: PhasePlan, cursor: int, w: Worker) -> Iterator[dict[str, np.ndarray]]:
    """This worker's blocks of the phase from block `cursor` on, in plan order (StepRows cuts them into steps)."""
    ds = worker_dataset(plan, cfg.data.shards, w.rank, w.world_size, start_block=cursor,
                        end_block=plan.num_steps * plan.blocks_per_step, read_cpus=cfg.data.read_cpus,
                        cache_dir=cfg.data.cache_dir, cache_bytes=int(cfg.data.cache_gb * 2**30))
    return iter(ds.iter_batches(batch_size=cfg.optim.micro_batch_size, batch_format="numpy",
                                prefetch_batches=cfg.data.prefetch_batches))


def phase_lr(cfg: Config, plans: list[PhasePlan], plan: PhasePlan, state: TrainState, step: int) -> float:
    """The paper restarts warmup and cosine at the switch; with phases.keep_optimizer one schedule spans both."""
    keep = cfg.phases.keep_optimizer
    total = sum(p.num_steps for p in plans) if keep else plan.num_steps
    return lr_at(state.global_step if keep else step, total, lr=cfg.optim.lr, warmup_steps=cfg.optim.warmup_steps,
                 min_lr=cfg.optim.min_lr)


def forward_backward(engine: Any, rows: StepRows, plan: PhasePlan, micro: list[tuple[int, float]], cfg: Config,
                     device: Any, window: ThroughputWindow, log_loss: torch.Tensor,
                     overlap: OverlappedAllReduce | None = None, poison: bool = False
                     ) -> tuple[list[int], str, torch.Tensor]:
    """One optimizer step: this rank's rows of the step through forward and backward, in the micro-batches
    `micro` lists ((rows, loss weight) each: optim.step_split); returns the blocks trained, this rank's
    data error ('' when none: see StepRows) and a flag tensor, 1 when one of its losses was not finite (left
    on the device: no synchronisation here)."""
    t = time.perf_counter()
    ids_all, blocks, error = rows.take(sum(m for m, _ in micro))
    t_data = time.perf_counter()
    window.wait += t_data - t
    mb = cfg.optim.micro_batch_size
    at = 0
    step_loss = torch.zeros((), dtype=torch.float64, device=device)  # NaN or inf once any loss was
    for i, (m, weight) in enumerate(micro):
        # A rank with no row left for this micro-batch (more workers than rows) runs one zero row at weight 0:
        # under ZeRO-3 every forward is a collective.
        batch = ids_all[at:at + m] if m else np.zeros((1, plan.block_tokens), np.int32)
        at += m
        ids = torch.from_numpy(batch.astype(np.int64)).to(device)  # (m, block_tokens)
        engine.set_gradient_accumulation_boundary(i == len(micro) - 1)
        loss = engine(ids, plan.k)
        if poison:  # faults.nan_loss_at: a diverged step, for tests (NaN gradients through the real backward)
            loss = loss * float("nan")
        step_loss = step_loss + loss.detach().double()
        if overlap is not None:  # armed after the forward, before the backward whose hooks send the gradients
            last = i == len(micro) - 1
            overlap.arm(last, local_flags(error, device, step_loss) if last else None)
        engine.backward(loss if weight == 1.0 else loss * weight)
        log_loss[0] += loss.detach().double() * (m / mb)  # a row-weighted mean; m / mb is 1.0 for full batches
        log_loss[1] += m / mb
    window.parts["forward_backward"] += time.perf_counter() - t_data
    return blocks, error, step_loss


class StepRows:
    """This worker's rows, one optimizer step at a time, from the Ray Data iterator (whose batches ignore
    step bounds).

    Bad data (a damaged row group, a token id outside the vocabulary) is found on one rank only, while every
    rank must run the same collectives: that rank trains this step on zeros and the step ends with
    `first_error`, which every rank calls, so all of them stop together with the same one-line message before
    the optimizer step. Deterministic data errors are never retried by Ray.
    """

    def __init__(self, batches: Iterator[dict[str, np.ndarray]], plan: PhasePlan, vocab_size: int) -> None:
        self.batches, self.plan, self.vocab_size = batches, plan, vocab_size
        self.ids: list[np.ndarray] = []
        self.blocks: list[np.ndarray] = []
        self.held = 0

    def take(self, n: int) -> tuple[np.ndarray, list[int], str]:
        """The next n rows (ids, block numbers, ''), or zeros and the reason when the data is bad."""
        zeros = np.zeros((n, self.plan.block_tokens), np.int32)
        while self.held < n:
            try:
                batch = next(self.batches)
            except StopIteration:
                raise
            except Exception as e:
                err = find_input_error(e)
                if err is None:
                    raise
                return zeros, [], str(err)
            self.ids.append(batch["input_ids"])
            self.blocks.append(batch["block"])
            self.held += len(batch["block"])
        ids, blocks = np.concatenate(self.ids), np.concatenate(self.blocks)
        self.ids, self.blocks, self.held = [ids[n:]], [blocks[n:]], len(blocks) - n
        ids, trained = ids[:n], blocks[:n].tolist()
        try:
            check_token_ids(ids, self.vocab_size, lambda: f"{self.plan.phase}-phase blocks {trained}")
        except ValueError as e:
            return zeros, trained, str(e)
        return ids, trained, ""


def local_flags(error: str, device: Any, step_loss: torch.Tensor) -> torch.Tensor:
    """This rank's step flags: [a data error, SIGTERM received, a loss of the step not finite]."""
    head = torch.tensor([1.0 if error else 0.0, 1.0 if sigterm_received() else 0.0], device=device)
    return torch.cat([head, (~torch.isfinite(step_loss)).to(head.dtype).view(1)])


def step_flags(error: str, device: Any, summed: torch.Tensor | None, step_loss: torch.Tensor) -> tuple[str, bool, int]:
    """Collective, once a step: ('' when no rank saw a data error in this step, else the lowest failing rank's
    message; whether any rank got SIGTERM; how many ranks saw a loss that is not finite). One all-reduce
    carries the flags, unless `summed` is their sum already (the overlapped gradient all-reduce carried them)."""
    import torch.distributed as dist

    flag = summed
    if flag is None:
        flag = local_flags(error, device, step_loss)
        dist.all_reduce(flag)
    term, nonfinite = bool(flag[1].item()), int(flag[2].item())
    if flag[0].item() == 0:
        return "", term, nonfinite
    errors: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    return next(e for e in errors if e), term, nonfinite


def nonfinite_error(state: TrainState, plan: PhasePlan, step: int, lr: float, ranks: int) -> str:
    """The one line for a diverged step. A NaN or inf loss gives NaN gradients, which the all-reduce spreads to
    every rank: the run stops before the optimizer step, so no weight, checkpoint or export holds them."""
    return (f"the training loss is not finite at step {state.global_step + 1} ({plan.phase} phase, step "
            f"{step + 1}/{plan.num_steps}, on {ranks} worker(s)); the step was not applied and the run stops. "
            f"The learning rate was {lr:.3g}: lower optim.lr, or check the data; "
            f"rerunning resumes from the last checkpoint")


def base_metrics(state: TrainState, plan: PhasePlan, planned_tokens: int) -> dict[str, Any]:
    return {"step": state.global_step, "phase": plan.phase, "patch/k": plan.k,
            "phase_step": state.step_in_phase, "phase_steps": plan.num_steps,
            "tokens/patch": state.tokens["patch"], "tokens/token": state.tokens["token"],
            "tokens/total": state.tokens["patch"] + state.tokens["token"], "tokens/planned": planned_tokens,
            "positions/total": state.positions["patch"] + state.positions["token"], "perf/flops_total": state.flops}


def log_metrics(state: TrainState, plan: PhasePlan, planned_tokens: int, log_loss: torch.Tensor,
                window: ThroughputWindow, engine: Any, cfg: Config, w: Worker) -> dict[str, Any]:
    """The log line's metrics (collective: the loss is averaged over ranks), with the savings meter."""
    import torch.distributed as dist

    log_loss[2] = time.monotonic() - w.log_at[1]
    dist.all_reduce(log_loss)  # one collective: every rank gets the same loss and the same step time
    agree_preemption_interval(cfg, w, state.global_step, float(log_loss[2]) / w.world_size)
    device_hours = sum(state.seconds.values()) * w.world_size / 3600
    m = base_metrics(state, plan, planned_tokens) | {
        "train/loss": float(log_loss[0] / log_loss[1]), "train/lr": engine.optimizer.param_groups[0]["lr"],
        **window.rates(plan.k),
        **savings(sum(state.tokens.values()), sum(state.positions.values()), state.flops, device_hours,
                  cfg.gpu_hour_price)}
    if plan.phase == "patch":  # never mixed with the token-level losses
        m["train/patch_loss"] = m["train/loss"]
    log_loss.zero_()
    return m


def run_evaluation(engine: Any, val_sets: dict[str, np.ndarray], cfg: Config, state: TrainState, plan: PhasePlan,
                   w: Worker) -> dict[str, float]:
    out = {}
    for name, rows in val_sets.items():
        loss = evaluate(engine, rows, rank=w.rank, world_size=w.world_size, micro_batch=cfg.optim.micro_batch_size,
                        device=w.device)
        out[f"{name}/loss"], out[f"{name}/ppl"] = loss, math.exp(min(loss, 50.0))
    w.say(f"[{plan.phase} K={plan.k}] step {state.global_step:>6} eval (token-level, K=1): "
          + " ".join(f"{k} {v:.4f}" for k, v in out.items()))
    return out


def evaluate(engine: Any, rows: np.ndarray, *, rank: int, world_size: int, micro_batch: int, device: Any) -> float:
    """Token-level (K=1) mean loss over `rows`, split across ranks; every rank runs the same forwards."""
    import torch.distributed as dist

    n = len(rows) - len(rows) % world_size  # equal shares: under ZeRO-3 every forward is collective
    engine.eval()
    loss, count = loss_sum(lambda ids: engine(ids, 1), rows[rank:n:world_size], micro_batch, device)
    engine.train()
    if hasattr(engine, "empty_partition_cache") and engine.zero_optimization_stage() == 3:
        engine.empty_partition_cache()
    total = torch.tensor([loss, count], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return float(total[0] / total[1]) if total[1] > 0 else float("nan")


def checkpoint_minutes_due(cfg: Config, since_t: float, device: Any) -> bool:
    """checkpoint.every_minutes, decided by rank 0's clock so that every rank saves at the same step."""
    import torch.distributed as dist

    if not cfg.checkpoint.every_minutes:
        return False
    flag = torch.tensor([float(time.monotonic() - since_t >= 60 * cfg.checkpoint.every_minutes)], device=device)
    dist.broadcast(flag, 0)
    return bool(flag.item())


def agree_preemption_interval(cfg: Config, w: Worker, global_step: int, seconds: float) -> None:
    """Steps between preemption checks for about checkpoint.preemption_check_seconds, from the step time every
    rank just received from the same all-reduce: the check is a barrier, so all ranks must ask at the same steps.
    Asking every step cost 1.1-2.4 ms a step (Ray's barrier, as issue 14's per-step probe measured it), a fixed
    cost that weighs K times more in a patch step."""
    steps = global_step - w.log_at[0]
    if steps > 0 and seconds > 0:
        w.preempt_every = max(1, int(cfg.checkpoint.preemption_check_seconds * steps / seconds))
    w.log_at = (global_step, time.monotonic())


def preemption_noticed(cfg: Config, state: TrainState, plan: PhasePlan, planned_tokens: int, writer: MetricsWriter,
                       w: Worker) -> Any:
    """Every checkpoint.preemption_check_every steps, ask Ray for a preemption notice (a barrier: every rank
    asks at the same steps); on one (returned; else None), the caller saves a just-in-time checkpoint at this
    step boundary and hands over (raypatch.preemption)."""
    import ray.train

    every = cfg.checkpoint.preemption_check_every or (w.preempt_every if cfg.checkpoint.preemption_check_seconds else 0)
    if not every or state.global_step % every:
        return None
    info = ray.train.get_preemption_info()
    if info is None:
        return None
    w.say(f"{describe(info)}: saving a just-in-time checkpoint at step {state.global_step}")
    writer.write(base_metrics(state, plan, planned_tokens) | {"event": "preemption", "ranks": info.preempted_ranks})
    return info

