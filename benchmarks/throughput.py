"""Training throughput in one run on one small Llama (the demo preset's model, T=128): patch phase against token
phase, the data pipeline's share of step time, and raypatch against a plain PyTorch loop and the HF Trainer.

1. Plain single-process PyTorch loop (raypatch.model.lm_loss + AdamW, fwd+bwd+clip+step, fp32, micro-batches of
   the preset's size with gradient accumulation, the same tokens per optimizer step in every phase), on token
   blocks read from real shards: tokens/s of the token phase and of the patch phase for K in {2, 4, 8}. The
   configurations are timed round-robin (each round runs every K once) so that load from other processes hits
   them alike; the ratio is the median of the per-round ratios. Target: patch ÷ token >= 0.95·K.
2. Data wait through the real packer: raypatch.data.worker_dataset(...).iter_batches feeding the same plain loop;
   time blocked in next() ÷ step time, per phase, after the first steps (pipeline start reported apart).
   Target <= 2%. The trainer's own perf/data_wait from (3) is listed too.
3. raypatch.driver.fit with one worker (Ray Train + DeepSpeed at the default stage, fp32: no ZeRO; patch phase
   K=4 then token phase), its perf/tokens_per_s from metrics.jsonl without each phase's first log window; against
   the Hugging Face Trainer (same model config, batch, data, AdamW, clip and schedule; no eval, no saving,
   report_to=[], use_cpu=True) in the token phase (target raypatch ÷ HF >= 1.0), and against the plain loop in
   both phases (target >= 0.9).
   The plain loop is measured before and after (3) and its mean is the reference, bracketing drift in load.

Threads: a Ray Train worker with 1 CPU runs torch with 1 thread (Ray sets OMP_NUM_THREADS), so the plain loop and
the HF Trainer run with the same --threads (default 1) and the raypatch worker asks for --threads CPUs.

A second, diagnostic fit with ZeRO-1 (--no-zero1 skips it) shows how much of raypatch's one-worker overhead is
ZeRO's per-step gradient and weight copies. [4] repeats the before/after arms interleaved (ABBA): "before" is the
trainer as issue 14 found it (ZeRO-2, a preemption check every step, per-tensor AdamW), "after" the defaults now
(no ZeRO in fp32) and ZeRO-1 beside them.

Run: python benchmarks/throughput.py        (about 4 minutes; writes benchmarks/results/throughput.json|md)
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ks", default="2,4,8", help="patch sizes for the plain-loop phase comparison")
    ap.add_argument("--rounds", type=int, default=5, help="round-robin rounds of the plain loop (before the fit)")
    ap.add_argument("--rounds-after", type=int, default=2, help="plain-loop rounds after the fit and HF (K=1, 4)")
    ap.add_argument("--base-steps", type=int, default=3,
                    help="token-phase steps per round; K-patch configs run K times as many (same time per round)")
    ap.add_argument("--warmup-steps", type=int, default=2, help="untimed steps per configuration before round 1")
    ap.add_argument("--wait-steps", type=int, default=12, help="token-phase steps of the data-wait measurement "
                                                                "(the patch phase runs 4x as many)")
    ap.add_argument("--fit-steps", type=int, default=40, help="steps per phase of the raypatch fit and of HF")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (plain loop, HF) = CPUs of the Ray worker")
    ap.add_argument("--vocab-size", type=int, default=0, help="0: the demo model's vocabulary")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--skip-fit", action="store_true")
    ap.add_argument("--abba", type=int, default=3,
                    help="[4] repeats of every before/after arm and the HF Trainer, interleaved (0: skip)")
    ap.add_argument("--abba-workers", default="1,2", help="[4] worker counts of the raypatch arms")
    ap.add_argument("--no-zero1", action="store_true",
                    help="skip the diagnostic second fit with ZeRO-1 (where raypatch's 1-worker overhead comes from)")
    ap.add_argument("--out", default=str(C.RESULTS / "throughput"), help="output stem (.json and .md are added)")
    return ap.parse_args(argv)


# --- the plain loop --------------------------------------------------------------------------------------


class PlainLoop:
    """One model + AdamW training on blocks of K·T tokens with lm_loss, as raypatch's step does, minus Ray/DS."""

    def __init__(self, cfg: Any, k: int, tokens: Any, seed: int = 0) -> None:
        import torch

        from raypatch.model import build_model
        from raypatch.optim import param_groups

        o = cfg.optim
        self.k, self.tps, self.mb = k, o.tokens_per_step, o.micro_batch_size
        self.block = k * cfg.data.seq_len
        self.rows = self.tps // self.block
        self.ga = self.rows // self.mb
        assert self.rows % self.mb == 0 and self.ga >= 1, (self.rows, self.mb)
        self.model = build_model(cfg.model, seed=seed)
        self.opt = torch.optim.AdamW(param_groups(self.model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2),
                                     eps=o.eps)
        n = len(tokens) // self.block
        self.blocks = torch.from_numpy(tokens[: n * self.block].reshape(n, self.block).astype("int64"))
        self.pos = 0
        self.clip = o.grad_clip
        self.opt_s: list[float] = []  # seconds of clip + AdamW + zero_grad per timed step
    def next_micro(self) -> Any:
        if self.pos + self.mb > len(self.blocks):
            self.pos = 0
        ids = self.blocks[self.pos:self.pos + self.mb]
        self.pos += self.mb
        return ids

    def micro(self, ids: Any) -> None:
        from raypatch.model import lm_loss

        loss = lm_loss(self.model, ids, self.k)
        (loss / self.ga).backward()

    def finish_step(self) -> None:
        import torch

        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def steps(self, n: int) -> float:
        """n optimizer steps on in-memory blocks; returns seconds."""
        t = time.perf_counter()
        for _ in range(n):
            for _ in range(self.ga):
                self.micro(self.next_micro())
            t_opt = time.perf_counter()
            self.finish_step()
            self.opt_s.append(time.perf_counter() - t_opt)
        return time.perf_counter() - t


def round_robin(loops: dict[int, PlainLoop], *, rounds: int, base_steps: int) -> dict[int, list[float]]:
    """tokens/s of every configuration in each round; round r runs every K once, in a rotating order."""
    rates: dict[int, list[float]] = {k: [] for k in loops}
    ks = list(loops)
    for r in range(rounds):
        order = ks[r % len(ks):] + ks[:r % len(ks)]
        for k in order:
            n = base_steps * k
            sec = loops[k].steps(n)
            rates[k].append(n * loops[k].tps / sec)
        print(f"  round {r + 1}/{rounds}: " + "  ".join(f"K={k} {rates[k][-1]:,.0f} tok/s" for k in ks), flush=True)
    return rates


# --- data wait through the packer ------------------------------------------------------------------------


def data_wait(loop: PlainLoop, plan: Any, shards: str, cfg: Any, steps: int, warm: int) -> dict[str, Any]:
    """Steps of the plain loop fed by worker_dataset(...).iter_batches; time blocked in next() per step."""
    import numpy as np
    import torch

    from raypatch.data import worker_dataset

    t0 = time.perf_counter()
    ds = worker_dataset(plan, shards, 0, 1, end_block=steps * plan.blocks_per_step, read_cpus=cfg.data.read_cpus)
    it = iter(ds.iter_batches(batch_size=loop.mb, batch_format="numpy", prefetch_batches=cfg.data.prefetch_batches))
    build_s = time.perf_counter() - t0
    step_s, wait_s = [], []
    for _ in range(steps):
        ts, w = time.perf_counter(), 0.0
        for _ in range(loop.ga):
            t = time.perf_counter()
            batch = next(it)
            w += time.perf_counter() - t
            loop.micro(torch.from_numpy(batch["input_ids"].astype(np.int64)))
        loop.finish_step()
        step_s.append(time.perf_counter() - ts)
        wait_s.append(w)
    steady = slice(warm, None)
    return {"phase": plan.phase, "k": plan.k, "steps": steps, "warm_steps": warm, "build_s": build_s,
            "first_step_wait_s": wait_s[0], "step_s_mean": statistics.mean(step_s[steady]),
            "wait_ms_per_step": 1e3 * statistics.mean(wait_s[steady]),
            "fraction_steady": sum(wait_s[steady]) / sum(step_s[steady]),
            "fraction_all": (sum(wait_s) + build_s) / (sum(step_s) + build_s)}


# --- raypatch's trainer, one worker -----------------------------------------------------------------------


def phase_rates(rows: list[dict[str, Any]], tps: int) -> dict[str, dict[str, Any]]:
    """Per phase: tokens/s and data-wait over the log windows after the first one of that phase."""
    out: dict[str, dict[str, Any]] = {}
    rows = [r for r in rows if "perf/tokens_per_s" in r]
    for phase in ("patch", "token"):
        win = [r for r in rows if r["phase"] == phase]
        used = win[1:]
        if not used:
            continue
        # A window covers the steps since the previous log row of the phase (the last one may be shorter).
        steps = [r["phase_step"] - p["phase_step"] for p, r in zip(win, used)]
        toks = [tps * n for n in steps]
        secs = [t / r["perf/tokens_per_s"] for t, r in zip(toks, used)]
        out[phase] = {"tokens_per_s": sum(toks) / sum(secs), "windows": len(used), "windows_dropped": 1,
                      "data_wait": sum(r["perf/data_wait"] * s for r, s in zip(used, secs)) / sum(secs),
                      "first_window_tokens_per_s": win[0]["perf/tokens_per_s"],
                      "first_window_data_wait": win[0]["perf/data_wait"],
                      "per_window_tokens_per_s": [r["perf/tokens_per_s"] for r in used]}
    return out


def run_raypatch(cfg: Any, steps: int, threads: int, tmp: Path, zero_stage: int = 0, workers: int = 1,
                 overrides: tuple[str, ...] = (), name: str = "") -> dict[str, Any]:
    from raypatch.config import apply_overrides

    tps = cfg.optim.tokens_per_step
    name = name or f"throughput-raypatch-{workers}w-zero{zero_stage}"
    fcfg = apply_overrides(cfg, [
        "patch.k=4", "patch.lam=0.5", f"data.max_tokens={2 * steps * tps}", f"scale.num_workers={workers}",
        f"scale.cpus_per_worker={threads}", "eval.every_steps=0", "eval.max_rows=8", "checkpoint.every_steps=0",
        "log_every=10", "compare_baseline=false", f"checkpoint.storage_path={tmp}", f"scale.zero_stage={zero_stage}",
        f"checkpoint.name={name}", *overrides])
    s, rows, wall = C.fit_run(fcfg)
    phases = phase_rates(rows, tps)
    shutil.rmtree(Path(s["run_dir"]), ignore_errors=True)  # the next arm reuses the name: start it fresh
    return {"wall_s": wall, "state": s["state"], "phases": phases}


# Issue 14: the per-step fixed costs raypatch removed. "before" restores each of them.
BEFORE = ("checkpoint.preemption_check_every=1", "optim.fused_adamw=false")


def abba(cfg: Any, args: argparse.Namespace, tokens: Any, tmp: Path, with_hf: bool) -> dict[str, Any]:
    """Every arm once per repeat, the order reversed on every other repeat (A B C ... C B A ...), so slow drift in
    the machine's load hits every arm alike; ratios are taken within a repeat, then summarised."""
    arms: list[tuple[str, Any]] = []
    for w in (int(x) for x in args.abba_workers.split(",")):
        arms.append((f"{w}w before (ZeRO-2, preemption check every step, per-tensor AdamW)",
                     lambda w=w: run_raypatch(cfg, args.fit_steps, args.threads, tmp, 2, w, BEFORE, "abba")))
        for z in (1, 0):
            arms.append((f"{w}w after, {'default (no ZeRO)' if z == 0 else 'ZeRO-1'}",
                         lambda w=w, z=z: run_raypatch(cfg, args.fit_steps, args.threads, tmp, z, w, (), "abba")))
    if with_hf:
        arms.append(("HF Trainer, 1 process", lambda: {"phases": {"token": run_hf(cfg, tokens, args.fit_steps, 10,
                                                                                   tmp)}}))
    reps: list[dict[str, Any]] = []
    for r in range(args.abba):
        order = arms if r % 2 == 0 else arms[::-1]
        rep = {}
        for label, fn in order:
            out = fn()
            rep[label] = {ph: v["tokens_per_s"] for ph, v in out["phases"].items()}
            print(f"  repeat {r + 1}/{args.abba} {label}: "
                  + ", ".join(f"{ph} {v:,.0f} tok/s" for ph, v in rep[label].items()), flush=True)
        reps.append(rep)
    return {"arms": [a for a, _ in arms], "repeats": reps}


# --- the Hugging Face Trainer ------------------------------------------------------------------------------


def ensure_accelerate() -> str | None:
    """transformers.Trainer needs accelerate, which raypatch does not depend on. Use the environment's, else a
    copy installed apart under the benchmark cache (kept out of the shared venv); None when it is importable."""
    try:
        import accelerate  # noqa: F401

        return None
    except ImportError:
        pass
    extra = C.CACHE / "pydeps"
    if (extra / "accelerate").is_dir():
        sys.path.append(str(extra))  # appended: the environment's own packages still win
        try:
            import accelerate  # noqa: F401, F811

            return None
        except ImportError:
            pass
    return (f"transformers.Trainer needs accelerate>=1.1.0, missing here: pip install 'accelerate>=1.1.0', or keep "
            f"it out of the venv with pip install --target {extra} --no-deps 'accelerate>=1.1.0'")


def run_hf(cfg: Any, tokens: Any, steps: int, warm: int, tmp: Path) -> dict[str, Any]:
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

    from raypatch.model import build_model

    o, T = cfg.optim, cfg.data.seq_len
    rows = o.tokens_per_step // T
    ga = rows // o.micro_batch_size
    n = len(tokens) // T
    blocks = torch.from_numpy(tokens[: n * T].reshape(n, T).astype("int64"))

    class Rows(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(blocks)

        def __getitem__(self, i: int) -> dict[str, Any]:
            return {"input_ids": blocks[i], "labels": blocks[i]}

    marks: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            marks.append(time.perf_counter())

    args = TrainingArguments(
        output_dir=str(tmp / "hf"), per_device_train_batch_size=o.micro_batch_size, gradient_accumulation_steps=ga,
        max_steps=steps, learning_rate=o.lr, weight_decay=o.weight_decay, adam_beta1=o.beta1, adam_beta2=o.beta2,
        adam_epsilon=o.eps, max_grad_norm=o.grad_clip, lr_scheduler_type="cosine", warmup_steps=o.warmup_steps,
        optim="adamw_torch", report_to=[], save_strategy="no", eval_strategy="no", logging_strategy="no",
        use_cpu=True, disable_tqdm=True, dataloader_num_workers=0, dataloader_pin_memory=False, seed=0)
    model = build_model(cfg.model, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=Rows(), data_collator=default_data_collator,
                      callbacks=[Clock()])
    t = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t
    # Steps warm+1 .. steps: the same windows as raypatch's (its first log window of `warm` steps is dropped).
    rate = (len(marks) - warm) * o.tokens_per_step / (marks[-1] - marks[warm - 1])
    return {"tokens_per_s": rate, "steps": len(marks), "warm_steps": warm, "wall_s": wall,
            "grad_accum": ga, "optim": "adamw_torch"}


# --- main --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    # Before transformers is imported: it decides once, at import, whether accelerate is there.
    missing = None if args.skip_hf else ensure_accelerate()
    import ray
    import torch

    from raypatch import presets
    from raypatch.config import apply_overrides
    from raypatch.data import TokenStream, plan_phases

    t_start = time.perf_counter()
    load = C.LoadTracker()
    torch.set_num_threads(args.threads)
    ks = [int(x) for x in args.ks.split(",")]
    base = presets.demo()
    vocab = args.vocab_size or base.model.vocab_size
    started = C.start_ray()
    tmp = Path(tempfile.mkdtemp(prefix="raypatch-throughput-"))
    result: dict[str, Any] = {"machine": C.machine(), "threads": args.threads}
    try:
        shards = C.shards(vocab)
        cfg = apply_overrides(base, [f"data.shards={shards}", f"model.vocab_size={vocab}"])
        T, tps = cfg.data.seq_len, cfg.optim.tokens_per_step
        stream = TokenStream(shards)
        tokens = stream.read(0, min(stream.total_tokens, 64 * tps))
        from raypatch.model import count_params

        n_params = count_params(cfg.model)
        result["setup"] = {"model": cfg.model.__dict__, "params": n_params, "seq_len": T, "tokens_per_step": tps,
                           "micro_batch_size": cfg.optim.micro_batch_size, "precision": "fp32",
                           "shards": shards, "stream_tokens": stream.total_tokens}
        print(f"model {n_params:,} params, T={T}, {tps} tokens/step, micro-batch {cfg.optim.micro_batch_size}, "
              f"{args.threads} thread(s)", flush=True)

        # 1. phase throughput, plain loop
        print("\n[1] plain PyTorch loop, round-robin over K", flush=True)
        loops = {k: PlainLoop(cfg, k, tokens) for k in [1, *ks]}
        for lp in loops.values():
            lp.steps(args.warmup_steps)
            lp.opt_s.clear()
        rates = round_robin(loops, rounds=args.rounds, base_steps=args.base_steps)
        load.mark("after [1]")
        phase_rows = []
        for k in ks:
            ratios = [p / t for p, t in zip(rates[k], rates[1])]
            r = statistics.median(ratios)
            phase_rows.append({"k": k, "opt_ms": 1e3 * statistics.median(loops[k].opt_s),
                               "step_ms": 1e3 * loops[k].tps / statistics.median(rates[k]),
                               "tokens_per_s": statistics.median(rates[k]), "min": min(rates[k]),
                               "max": max(rates[k]), "ratio": r, "ratio_min": min(ratios), "ratio_max": max(ratios),
                               "target": 0.95 * k})
        result["phases_plain"] = {"token_opt_ms": 1e3 * statistics.median(loops[1].opt_s),
                                  "token_step_ms": 1e3 * tps / statistics.median(rates[1]),
                                  "token_tokens_per_s": statistics.median(rates[1]), "token_min": min(rates[1]),
                                  "token_max": max(rates[1]), "rows": phase_rows, "rounds": args.rounds,
                                  "per_round": {str(k): v for k, v in rates.items()}}

        # 2. data wait through the real packer
        print("\n[2] data wait through raypatch.data.worker_dataset(...).iter_batches", flush=True)
        plans = plan_phases(stream_tokens=stream.total_tokens, seq_len=T, k=4, lam=0.5, tokens_per_step=tps,
                            max_tokens=2 * 4 * args.wait_steps * tps)
        waits = []
        for plan, steps in ((plans[1], args.wait_steps), (plans[0], 4 * args.wait_steps)):
            w = data_wait(loops.get(plan.k) or PlainLoop(cfg, plan.k, tokens), plan, shards, cfg, steps, warm=2)
            print(f"  {plan.phase} phase K={plan.k}: data-wait {w['fraction_steady']:.2%} of step time "
                  f"(steady), {w['fraction_all']:.2%} with the pipeline start", flush=True)
            waits.append(w)
        result["data_wait_plain"] = waits
        load.mark("after [2]")

        # 3. raypatch (1 worker) and the HF Trainer
        if not args.skip_fit:
            print("\n[3a] raypatch.driver.fit, 1 worker (Ray Train + DeepSpeed, default: no ZeRO), K=4 λ=1/2",
                  flush=True)
            result["raypatch"] = run_raypatch(cfg, args.fit_steps, args.threads, tmp)
            for ph, v in result["raypatch"]["phases"].items():
                print(f"  {ph}: {v['tokens_per_s']:,.0f} tok/s, data-wait {v['data_wait']:.2%}", flush=True)
            load.mark("after [3a]")
            if not args.no_zero1:
                print("\n[3a'] the same fit with ZeRO-1 (diagnostic)", flush=True)
                result["raypatch_zero1"] = run_raypatch(cfg, args.fit_steps, args.threads, tmp, zero_stage=1)
                for ph, v in result["raypatch_zero1"]["phases"].items():
                    print(f"  {ph}: {v['tokens_per_s']:,.0f} tok/s", flush=True)
        if missing:
            print(f"\n[3b] HF Trainer skipped: {missing}", flush=True)
            result["hf_skipped"] = missing
        elif not args.skip_hf:
            print("\n[3b] Hugging Face Trainer, token phase", flush=True)
            hf_tokens = stream.read(0, min(stream.total_tokens, args.fit_steps * tps))
            result["hf"] = run_hf(cfg, hf_tokens, args.fit_steps, warm=10, tmp=tmp)
            print(f"  {result['hf']['tokens_per_s']:,.0f} tok/s", flush=True)
            load.mark("after [3b]")
        if args.abba:
            print(f"\n[4] before/after, {args.abba} interleaved repeats (ABBA)", flush=True)
            hf_tokens = stream.read(0, min(stream.total_tokens, args.fit_steps * tps))
            result["abba"] = abba(cfg, args, hf_tokens, tmp, with_hf=not (missing or args.skip_hf))
            load.mark("after [4]")
        print("\n[3c] plain loop again (bracketing the fit and HF)", flush=True)
        after = round_robin({k: loops[k] for k in (1, 4) if k in loops}, rounds=args.rounds_after,
                            base_steps=args.base_steps)
        result["plain_after"] = {str(k): v for k, v in after.items()}
        load.mark("end")
    finally:
        if started:
            ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    result["wall_s"] = time.perf_counter() - t_start
    result["load"] = load.summary()
    md = tables(result)
    print("\n" + md)
    C.write_outputs(Path(args.out), result, md)
    return result


def tables(res: dict[str, Any]) -> str:
    """Three plain tables from the result dict alone: plain-loop phases, data wait, raypatch against references."""
    st, pp = res["setup"], res["phases_plain"]
    head = (f"Demo Llama, {st['params']:,} parameters, T={st['seq_len']}, {st['tokens_per_step']:,} tokens per step, "
            f"micro-batch {st['micro_batch_size']}, fp32, {res['threads']} thread(s).")
    phases = C.md_table(
        ["K", "tokens/s (median)", "range", "step ms (clip+AdamW ms)", "patch ÷ token", "per-round range", "target"],
        [[1, f"{pp['token_tokens_per_s']:,.0f}", f"{pp['token_min']:,.0f}–{pp['token_max']:,.0f}",
          f"{pp['token_step_ms']:.0f} ({pp['token_opt_ms']:.1f})", "1", "", ""]]
        + [[r["k"], f"{r['tokens_per_s']:,.0f}", f"{r['min']:,.0f}–{r['max']:,.0f}",
            f"{r['step_ms']:.0f} ({r['opt_ms']:.1f})", f"{r['ratio']:.2f}",
            f"{r['ratio_min']:.2f}–{r['ratio_max']:.2f}",
            f"≥ {r['target']:.2f}"] for r in pp["rows"]])
    waits = [[f"plain loop, {w['phase']} K={w['k']}", f"{w['wait_ms_per_step']:.2f}", f"{w['fraction_steady']:.2%}",
              f"{w['fraction_all']:.2%}"] for w in res["data_wait_plain"]]
    waits += [[f"raypatch fit, {ph}", "-", f"{v['data_wait']:.2%}", f"{v['first_window_data_wait']:.2%} (first window)"]
              for ph, v in (res.get("raypatch") or {}).get("phases", {}).items()]
    after = res.get("plain_after", {})
    plain = {"token": pp["token_tokens_per_s"], "patch": next(r["tokens_per_s"] for r in pp["rows"] if r["k"] == 4)}
    if after.get("1") and after.get("4"):  # bracket the fit: mean of the plain loop before and after it
        plain = {"token": (plain["token"] + statistics.median(after["1"])) / 2,
                 "patch": (plain["patch"] + statistics.median(after["4"])) / 2}
    systems = [[f"plain loop (before/after mean), {ph}", f"{plain[ph]:,.0f}", "1.000", ""] for ph in ("patch", "token")]
    targets = {"raypatch": {"patch": "≥ 0.95", "token": "≥ 0.95"}}
    for key, label in (("raypatch", "raypatch fit, 1 worker, default (no ZeRO)"),
                       ("raypatch_zero1", "raypatch fit, ZeRO-1")):
        for ph, v in (res.get(key) or {}).get("phases", {}).items():
            systems.append([f"{label}, {ph}", f"{v['tokens_per_s']:,.0f}", f"{v['tokens_per_s'] / plain[ph]:.3f}",
                            targets.get(key, {}).get(ph, "")])
    if "hf" in res:
        systems.append(["HF Trainer, token", f"{res['hf']['tokens_per_s']:,.0f}",
                        f"{res['hf']['tokens_per_s'] / plain['token']:.3f}", ""])
    elif res.get("hf_skipped"):
        systems.append(["HF Trainer, token", f"not run: {res['hf_skipped']}", "", ""])
    ratios = []
    rp = (res.get("raypatch") or {}).get("phases", {})
    if "patch" in rp and "token" in rp:
        speedup = rp["patch"]["tokens_per_s"] / rp["token"]["tokens_per_s"]
        ratios.append(["raypatch patch ÷ token (K=4)", f"{speedup:.3f}", "≥ 3.80"])
    if "token" in rp and "hf" in res:
        ratios.append(["raypatch ÷ HF Trainer, token phase",
                       f"{rp['token']['tokens_per_s'] / res['hf']['tokens_per_s']:.3f}", "≥ 1.0"])
    sections = abba_tables(res, plain) if "abba" in res else []
    return "\n\n".join([head, "## Plain PyTorch loop: patch vs token phase", phases,
                         "## Data wait (share of step time)", C.md_table(["where", "wait ms/step", "steady",
                                                                          "with pipeline start"], waits),
                         "## Against a plain loop and the HF Trainer (same model, batch, data)",
                         C.md_table(["system, phase", "tokens/s", "÷ plain loop", "target"], systems),
                         C.md_table(["ratio", "value", "target"], ratios), *sections])


def abba_tables(res: dict[str, Any], plain: dict[str, float]) -> list[str]:
    """[4]: each arm's tokens/s per phase over the repeats, then the ratios, each taken within one repeat."""
    ab = res["abba"]
    reps = ab["repeats"]

    def spread(xs: list[float], fmt: str = ",.0f") -> str:
        return f"{statistics.median(xs):{fmt}} ({min(xs):{fmt}}–{max(xs):{fmt}})"

    rows, ratios = [], []
    hf = "HF Trainer, 1 process"
    for arm in ab["arms"]:
        for ph in ("patch", "token"):
            xs = [r[arm][ph] for r in reps if ph in r.get(arm, {})]
            if xs:
                workers = int(arm[0]) if arm[0].isdigit() else 1
                rows.append([arm, ph, len(xs), spread(xs), f"{statistics.median(xs) / (workers * plain[ph]):.3f}"])
        if arm == hf:
            continue
        sp = [r[arm]["patch"] / r[arm]["token"] for r in reps if {"patch", "token"} <= set(r.get(arm, {}))]
        if sp:
            ratios.append([f"{arm}: patch ÷ token (K=4)", spread(sp, ".3f"), "≥ 3.80"])
        vs_hf = [r[arm]["token"] / r[hf]["token"] for r in reps if arm.startswith("1w") and hf in r]
        if vs_hf:
            ratios.append([f"{arm}: token phase ÷ HF Trainer", spread(vs_hf, ".3f"), "≥ 1.0"])
    note = (f"{len(reps)} repeats; every arm once per repeat, the order reversed on every other repeat. Median "
            f"(min–max). ÷ plain loop: tokens/s ÷ (workers × the one-process plain loop of the same phase, "
            f"{plain['patch']:,.0f} patch / {plain['token']:,.0f} token tok/s); target ≥ 0.95. \"before\" restores "
            f"the per-step costs issue 14 removed: {', '.join(BEFORE)}, ZeRO-2.")
    return ["## Before and after (issue 14): interleaved repeats", note,
            C.md_table(["arm", "phase", "repeats", "tokens/s median (range)", "÷ plain loop"], rows),
            C.md_table(["ratio (per repeat)", "median (range)", "target"], ratios)]


if __name__ == "__main__":
    main()
