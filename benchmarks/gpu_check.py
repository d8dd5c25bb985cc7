"""GPU checks for one lent H200 (called by benchmarks/gpu.sh; about 3-5 minutes):

(a) precision: raypatch.patching.next_patch_loss on bf16 against fp32 logits (K=1 and K=4), and a full forward of
    the paper-370m model through raypatch.model.lm_loss under bf16 autocast against fp32 (K=4 and K=1);
(b) DeepSpeed ZeRO-2 bf16 throughput and MFU of the paper-370m model (≈369M parameters, T=2048) in both phases,
    single GPU: a single-process DeepSpeed engine (torch.distributed, world size 1, NCCL) built with raypatch's own
    PatchLM / deepspeed_config / param_groups, lm_loss on random tokens, the same tokens per optimizer step in both
    phases, steps timed after warm-up; MFU = positions/s × flops_per_position ÷ 989e12 (H200 dense bf16, from
    raypatch.metrics' table by device name);
(c) the patch speedup: patch-phase tokens/s ÷ token-phase tokens/s at K=4 (ideal K).

--dry-run runs the same code on CPU with the tiny preset's model (gloo, a few steps) to check the plumbing and the
table writing; its numbers mean nothing. Results go to <out>/gpu_check.json and <out>/gpu_check.md, rewritten
after every section so that a run cut short still leaves what it measured.

Run: bash benchmarks/gpu.sh         (or python benchmarks/gpu_check.py --out DIR [--dry-run])
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # raypatch from this checkout, installed or not


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "benchmarks" / "results" / "gpu"))
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny model, gloo: check the plumbing only")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=0, help="T (default 2048; dry run 32)")
    ap.add_argument("--micro-batch", type=int, default=4, help="rows per forward in both phases")
    ap.add_argument("--token-micro-batches", type=int, default=8,
                    help="micro-batches per token-phase step (the patch phase takes K times fewer: same tokens/step)")
    ap.add_argument("--warmup-steps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10, help="timed optimizer steps per phase")
    ap.add_argument("--skip", default="", help="comma list of sections to skip: precision,throughput")
    return ap.parse_args(argv)


def trainer_parts() -> tuple[Any, Any, Any, str]:
    """The trainer's own PatchLM, deepspeed_config and param_groups (raypatch.model and raypatch.optim import
    neither Ray nor pyarrow)."""
    from raypatch.model import PatchLM
    from raypatch.optim import deepspeed_config, param_groups

    return PatchLM, deepspeed_config, param_groups, "raypatch.model + raypatch.optim"


# --- sections --------------------------------------------------------------------------------------------------


def precision(cfg: Any, device: Any, k: int, dry: bool) -> dict[str, Any]:
    import torch

    from raypatch.model import build_model, lm_loss
    from raypatch.patching import next_patch_loss

    out: dict[str, Any] = {"logits": [], "model": []}
    g = torch.Generator(device="cpu").manual_seed(0)
    t, v = cfg.data.seq_len, cfg.model.vocab_size
    b = 2 if dry else 4
    for kk in (1, k):
        logits = (3.0 * torch.randn(b, t, v, generator=g)).to(device)  # (B, T, V)
        ids = torch.randint(0, v, (b, kk * t), generator=g).to(device)  # (B, K·T)
        ref = next_patch_loss(logits, ids, kk).double().item()
        low = next_patch_loss(logits.bfloat16(), ids, kk).double().item()
        out["logits"].append({"k": kk, "fp32": ref, "bf16": low, "abs": abs(low - ref), "rel": abs(low - ref) / ref})
        del logits
    model = build_model(cfg.model, seed=0).to(device)
    model.eval()
    amp_dtype = torch.bfloat16
    for kk in (k, 1):
        ids = torch.randint(0, v, (1 if not dry else 2, kk * t), generator=g).to(device)
        with torch.no_grad():
            ref = lm_loss(model, ids, kk).double().item()
            with torch.autocast(device_type=device.type, dtype=amp_dtype):
                low = lm_loss(model, ids, kk).double().item()
        out["model"].append({"k": kk, "fp32": ref, "bf16_autocast": low, "abs": abs(low - ref),
                             "rel": abs(low - ref) / ref, "tokens": ids.numel()})
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def throughput(cfg: Any, device: Any, args: argparse.Namespace, peak: float) -> dict[str, Any]:
    import deepspeed
    import torch

    from raypatch.model import build_model, num_params
    from raypatch.patching import flops_per_position

    PatchLM, deepspeed_config, param_groups, source = trainer_parts()
    k, t, mb = args.k, cfg.data.seq_len, args.micro_batch
    ga_token = args.token_micro_batches
    if ga_token % k:
        raise ValueError(f"--token-micro-batches {ga_token} must be a multiple of K={k} (same tokens per step)")
    model = PatchLM(build_model(cfg.model, seed=0))
    n = num_params(model.hf)
    fpp = flops_per_position(num_params=n, num_layers=cfg.model.num_layers, hidden_size=cfg.model.hidden_size,
                             seq_len=t)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, cfg.optim.weight_decay),
                                      config=deepspeed_config(cfg, ga_token, 1, n))
    tokens_per_step = ga_token * mb * t
    g = torch.Generator(device="cpu").manual_seed(1)
    res: dict[str, Any] = {"params": n, "flops_per_position": fpp, "tokens_per_step": tokens_per_step,
                           "micro_batch": mb, "seq_len": t, "trainer_parts": source, "phases": {}}

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for phase, kk, ga in (("token", 1, ga_token), ("patch", k, ga_token // k)):
        engine.set_train_batch_size(mb * ga)  # as raypatch.optim.start_phase: the micro-batch stays, GA changes
        batches = [torch.randint(0, cfg.model.vocab_size, (mb, kk * t), generator=g).to(device) for _ in range(ga)]
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(args.warmup_steps + args.steps):
            sync()
            t0 = time.perf_counter()
            for i, ids in enumerate(batches):
                engine.set_gradient_accumulation_boundary(i == ga - 1)
                loss = engine(ids, kk)
                engine.backward(loss)
            engine.step()
            sync()
            times.append(time.perf_counter() - t0)
        timed = times[args.warmup_steps:]
        sec = sum(timed)
        tok_s = tokens_per_step * len(timed) / sec
        pos_s = tok_s / kk
        mfu = pos_s * fpp / peak if peak else float("nan")  # no datasheet peak on CPU (dry run)
        res["phases"][phase] = {"k": kk, "grad_accum": ga, "step_s": sec / len(timed), "tokens_per_s": tok_s,
                                "positions_per_s": pos_s, "mfu": mfu, "loss": float(loss.item()),
                                "max_memory_gib": torch.cuda.max_memory_allocated() / 2**30
                                if device.type == "cuda" else None,
                                "step_s_min": min(timed), "step_s_max": max(timed)}
        print(f"  {phase}: {tok_s:,.0f} tokens/s, {pos_s:,.0f} positions/s, MFU {mfu:.1%}",
              flush=True)
    res["speedup"] = res["phases"]["patch"]["tokens_per_s"] / res["phases"]["token"]["tokens_per_s"]
    del engine, model
    return res


# --- output ------------------------------------------------------------------------------------------------------


def report(r: dict[str, Any]) -> str:
    lines = [f"Device: {r['device']}. Versions: {r['versions']}.",
             ("**DRY RUN on CPU with the tiny model: checks the plumbing, the numbers mean nothing.**"
              if r["dry_run"] else "One NVIDIA H200 (lent machine), single process, world size 1 (NCCL)."), ""]
    if "precision" in r:
        p = r["precision"]
        lines += ["## (a) bf16 against fp32", "",
                  "next_patch_loss on the same random logits (scale 3, vocabulary "
                  f"{r['vocab_size']:,}, T={r['seq_len']}) rounded to bf16 (the loss itself upcasts to fp32):", "",
                  "| K | fp32 loss | bf16-logit loss | abs diff | rel diff |", "|---|---|---|---|---|"]
        lines += [f"| {x['k']} | {x['fp32']:.6f} | {x['bf16']:.6f} | {x['abs']:.2e} | {x['rel']:.2e} |"
                  for x in p["logits"]]
        lines += ["", f"Full forward of the {r['model_name']} model (random init, random tokens) through "
                  "raypatch.model.lm_loss, fp32 weights, under torch.autocast(bf16) against fp32:", "",
                  "| K | tokens | fp32 loss | bf16 autocast loss | abs diff | rel diff |", "|---|---|---|---|---|---|"]
        lines += [f"| {x['k']} | {x['tokens']:,} | {x['fp32']:.6f} | {x['bf16_autocast']:.6f} | {x['abs']:.2e} | "
                  f"{x['rel']:.2e} |" for x in p["model"]]
        lines.append("")
    if "throughput" in r:
        t = r["throughput"]
        lines += [f"## (b) DeepSpeed ZeRO-2 bf16 throughput and MFU ({t['params']:,} parameters, T={t['seq_len']}, "
                  f"micro-batch {t['micro_batch']} rows, {t['tokens_per_step']:,} tokens per optimizer step in both "
                  f"phases; {r['steps']} steps timed after {r['warmup_steps']} warm-up)", "",
                  f"MFU = positions/s × {t['flops_per_position']:.4g} FLOPs per position (6N + 6·L·T·d) ÷ "
                  f"{r['peak_flops']:.4g} FLOP/s. Engine parts: {t['trainer_parts']}.", "",
                  "| phase | K | grad accum | step s (min–max) | tokens/s | positions/s | MFU | peak memory GiB |",
                  "|---|---|---|---|---|---|---|---|"]
        for ph, x in t["phases"].items():
            mem = f"{x['max_memory_gib']:.1f}" if x["max_memory_gib"] is not None else "-"
            lines.append(f"| {ph} | {x['k']} | {x['grad_accum']} | {x['step_s']:.3f} ({x['step_s_min']:.3f}–"
                         f"{x['step_s_max']:.3f}) | {x['tokens_per_s']:,.0f} | {x['positions_per_s']:,.0f} | "
                         f"{x['mfu']:.1%} | {mem} |")
        lines += ["", f"patch tokens/s ÷ token tokens/s at K={r['k']}: {t['speedup']:.2f} (target ≥ 0.95·K)."]
    for name, err in r.get("errors", {}).items():
        lines += ["", f"Section {name} failed: `{err}`"]
    return "\n".join(lines)


def write(out: Path, r: dict[str, Any], cmd: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(r, indent=1, default=str) + "\n")
    (out / "gpu_check.md").write_text(f"Command: `{cmd}`\n\n{report(r)}\n")


def versions() -> str:
    parts = [f"python {platform.python_version()}"]
    for mod in ("torch", "transformers", "deepspeed"):
        try:
            parts.append(f"{mod} {__import__(mod).__version__}")
        except ImportError:
            parts.append(f"{mod} MISSING")
    return ", ".join(parts)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    cmd = os.environ.get("GPU_CHECK_COMMAND") or " ".join(["python", "benchmarks/gpu_check.py",
                                                           *map(shlex.quote, sys.argv[1:] if argv is None else argv)])
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if args.dry_run else "cuda")
    import torch
    import torch.distributed as dist

    from raypatch import presets
    from raypatch.config import apply_overrides

    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device visible (use --dry-run to check the plumbing on CPU)")
    device = torch.device("cpu") if args.dry_run else torch.device("cuda", 0)
    if device.type == "cuda":
        torch.cuda.set_device(0)
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 reference stays fp32 in (a)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if args.dry_run:
        t = args.seq_len or 32
        base = presets.tiny()
        over = [f"model.max_position_embeddings={max(t, base.model.max_position_embeddings)}"]
        model_name, peak = "tiny", None
    else:
        t = args.seq_len or 2048
        base = presets.paper_370m()
        over = ["scale.use_gpu=true", f"model.max_position_embeddings={max(t, base.model.max_position_embeddings)}"]
        model_name, peak = "paper-370m", None
    cfg = apply_overrides(base, [*over, f"data.seq_len={t}", f"patch.k={args.k}", "scale.num_workers=1",
                                 "scale.precision=bf16", "scale.zero_stage=2",
                                 f"optim.micro_batch_size={args.micro_batch}",
                                 f"optim.tokens_per_step={args.micro_batch * t * args.token_micro_batches}"])
    if peak is None:
        # GPUs: raypatch.metrics' table by device name (H200: 989e12 dense bf16); CPU (dry run): a measured rate.
        from raypatch.metrics import peak_flops

        peak = peak_flops(device)
    dev_name = torch.cuda.get_device_name(0) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    r: dict[str, Any] = {"device": dev_name, "versions": versions(), "dry_run": args.dry_run, "k": args.k,
                         "seq_len": t, "vocab_size": cfg.model.vocab_size, "model_name": model_name,
                         "peak_flops": peak, "steps": args.steps, "warmup_steps": args.warmup_steps, "errors": {}}
    out = Path(args.out)
    print(f"gpu_check: {dev_name}; {r['versions']}; model {model_name}, T={t}, K={args.k}", flush=True)
    t0 = time.perf_counter()
    if "precision" not in skip:
        print("(a) bf16 against fp32", flush=True)
        try:
            r["precision"] = precision(cfg, device, args.k, args.dry_run)
            for x in r["precision"]["logits"] + r["precision"]["model"]:
                print(f"  K={x['k']}: rel diff {x['rel']:.2e}", flush=True)
        except Exception as e:  # keep going: (b) and (c) are independent of (a)
            r["errors"]["precision"] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        write(out, r, cmd)
    if "throughput" not in skip:
        print("(b, c) ZeRO-2 bf16 throughput, both phases", flush=True)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                          LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        try:
            dist.init_process_group("gloo" if args.dry_run else "nccl", rank=0, world_size=1)
            r["throughput"] = throughput(cfg, device, args, peak)
        except Exception as e:
            r["errors"]["throughput"] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
        write(out, r, cmd)
    r["wall_s"] = time.perf_counter() - t0
    write(out, r, cmd)
    print("\n" + report(r), flush=True)
    print(f"\nwrote {out / 'gpu_check.md'} and {out / 'gpu_check.json'}", flush=True)
    if r["errors"]:
        raise SystemExit(1)
    return r


if __name__ == "__main__":
    main()
