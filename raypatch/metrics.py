"""Accounting (tokens, positions, FLOPs, MFU), the per-run metrics files, the log line and the plots.

A patch-phase step reads K·T tokens per row but runs the model on only T positions, so throughput is
reported both as tokens/s (data consumed) and positions/s (model work), and FLOPs are counted per position.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger("raypatch")

# Dense bf16 peak per device, for MFU. The H200/H100 SXM figure is NVIDIA's dense (no sparsity) number.
GPU_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "A10G": 125e12, "L40S": 362e12}


def peak_flops(device: Any = None) -> float:
    """Datasheet peak FLOP/s of one worker's GPU (dense bf16), for MFU; 0.0 on CPU.

    A CPU has no comparable datasheet figure (a measured matmul rate gave "MFU" above 100 % once the training
    loop ran more threads than the probe), so MFU is not reported there.
    """
    import torch

    if device is not None and getattr(device, "type", "cpu") == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_PEAK_FLOPS.items():
            if key in name:
                return value
        return 312e12
    return 0.0


def savings(tokens: int, positions: int, flops: float, device_hours: float, price: float = 0.0) -> dict[str, float]:
    """Compute saved so far against token-only training on the same tokens.

    Token-only training runs one model position per token; patch-level training ran `positions` for `tokens`.
    FLOPs scale with positions; device-hours are extrapolated at this run's own time per position.
    """
    if not positions or tokens <= positions:
        return {"savings/fraction": 0.0, "savings/flops": 0.0, "savings/device_hours": 0.0} | (
            {"savings/cost": 0.0} if price else {})
    extra = tokens / positions - 1  # what token-only would have spent on top, per unit spent here
    out = {"savings/fraction": extra / (1 + extra), "savings/flops": flops * extra,
           "savings/device_hours": device_hours * extra}
    if price:
        out["savings/cost"] = out["savings/device_hours"] * price
    return out


def savings_text(m: dict[str, Any]) -> str:
    if "savings/fraction" not in m:
        return ""
    cost = f", {m['savings/cost']:,.2f} at the given price" if "savings/cost" in m else ""
    return (f"saved {m['savings/fraction']:.0%} vs token-only ({m['savings/flops']:.3g} FLOPs, "
            f"{m['savings/device_hours']:.3g} device-h{cost})")


class MetricsWriter:
    """metrics.jsonl (one JSON object per line) and TensorBoard events under a run directory (rank 0 only)."""

    def __init__(self, run_dir: str | Path, enabled: bool = True) -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # A run killed mid-write leaves a torn last line; the resumed run's first row must not be glued onto it.
        self._newline = _ends_torn(self.path)
        try:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        except ImportError:  # TensorBoard is optional; metrics.jsonl always exists
            self.tb = None

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(("\n" if self._newline else "") + json.dumps(row) + "\n")
        self._newline = False
        if self.tb is not None:
            step = row.get("step", 0)
            for k, v in row.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step" and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _ends_torn(path: Path) -> bool:
    """Whether `path` exists, is not empty and does not end with a newline."""
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            if f.tell() == 0:
                return False
            f.seek(-1, 2)
            return f.read(1) != b"\n"
    except FileNotFoundError:
        return False


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl. A line that is not a JSON object (torn by a kill mid-write, damaged) is
    skipped with one warning naming the file and line: the run's other rows still make its plot and summary."""
    p = Path(path)
    if not p.exists():
        return []
    rows, bad = [], []
    for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict):
            rows.append(row)
        else:
            bad.append(n)
    if bad:
        from raypatch.console import say

        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        say(f"raypatch: warning: {p}:{bad[0]}{more}: not a JSON row (torn by a kill mid-write?); skipped", err=True)
    return rows


def log_line(m: dict[str, Any]) -> str:
    """One concise line: progress bar (tokens against the plan), phase, K, step, loss, lr, tokens/s,
    positions/s, FLOPs, MFU and data-wait."""
    done = m["tokens/total"] / max(1, m["tokens/planned"])
    bar = "#" * round(done * 20)
    mfu = f" MFU {m['perf/mfu']:.1%}" if "perf/mfu" in m else ""
    saved = f" | {savings_text(m)}" if m.get("savings/fraction") else ""
    return (f"[{bar:<20}] {done:4.0%} [{m['phase']} K={m['patch/k']}] "
            f"step {m['step']:>6} ({m['phase_step']}/{m['phase_steps']}) "
            f"loss {m['train/loss']:.4f} lr {m['train/lr']:.2e} | {m['perf/tokens_per_s']:,.0f} tok/s "
            f"{m['perf/positions_per_s']:,.0f} pos/s | {m['perf/flops_total']:.3g} FLOPs{mfu} "
            f"| data-wait {m['perf/data_wait']:.1%}{saved}")


def plot_runs(runs: dict[str, str | Path], out_png: str | Path, title: str = "") -> Path:
    """Token-level validation loss against cumulative training FLOPs, one line per run, switch marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, path in runs.items():
        rows = [r for r in read_metrics(path) if "val/loss" in r]
        if not rows:
            continue
        x = [r["perf/flops_total"] for r in rows]
        (line,) = ax.plot(x, [r["val/loss"] for r in rows], marker="o", ms=3, label=label)
        for r in read_metrics(path):
            if r.get("event") == "switch":  # labelled in the legend, not on the curves
                ax.axvline(r["perf/flops_total"], color=line.get_color(), ls="--", lw=1,
                           label=f"{label}: patch→token switch")
    ax.set_xlabel("cumulative training FLOPs")
    ax.set_ylabel("token-level validation loss (K=1)")
    ax.set_title(title or "validation loss vs compute")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out_png)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


class ThroughputWindow:
    """Tokens, data-wait and time since the last log line; time spent on evaluation and checkpoints is left
    out, so tokens/s and MFU count training only."""

    def __init__(self, peak_flops_total: float, flops_per_position: float) -> None:
        self.peak, self.flops_per_position = peak_flops_total, flops_per_position
        self.reset()

    def reset(self) -> None:
        self.t0, self.wait, self.tokens, self.excluded = time.perf_counter(), 0.0, 0, 0.0
        self.cpu0, self.excluded_cpu = time.thread_time(), 0.0
        # Host-side seconds of the step's parts (on a GPU, kernels still running are counted where the host waits).
        self.parts = {"forward_backward": 0.0, "flags": 0.0, "optimizer": 0.0}

    def exclude(self, wall_since: float, cpu_since: float) -> None:
        """Leave the time since perf_counter() = wall_since and thread_time() = cpu_since out of the window."""
        self.excluded += time.perf_counter() - wall_since
        self.excluded_cpu += time.thread_time() - cpu_since

    def rates(self, k: int) -> dict[str, float]:
        """perf/* metrics of the window for a phase of patch size k; then starts a new window."""
        dt = time.perf_counter() - self.t0 - self.excluded
        out = {"perf/tokens_per_s": self.tokens / dt, "perf/positions_per_s": self.tokens / k / dt,
               "perf/data_wait": self.wait / dt, **{f"perf/{part}": s / dt for part, s in self.parts.items()},
               # The training thread's CPU time over the window's: on a CPU run, well below 1 means other processes
               # or threads took this worker's core (on a GPU, the host also waits for kernels).
               "perf/cpu_share": (time.thread_time() - self.cpu0 - self.excluded_cpu) / dt}
        if self.peak:  # GPUs only: see peak_flops
            out["perf/mfu"] = self.tokens / k * self.flops_per_position / dt / self.peak
        self.reset()
        return out


def log_due(every: int, global_step: int, last: bool) -> bool:
    return global_step % every == 0 or last


def eval_due(every_steps: int, global_step: int, last: bool) -> bool:
    """Token-level validation: every `eval.every_steps` steps and at the end of each phase."""
    return last or bool(every_steps and global_step % every_steps == 0)


def checkpoint_due(cfg: Any, global_step: int, tokens_since: int, last: bool) -> bool:
    """At the end of each phase, every `checkpoint.every_steps` steps and every `checkpoint.every_tokens`
    tokens (the minutes rule needs rank 0's clock: train.checkpoint_minutes_due)."""
    c = cfg.checkpoint
    return (last or bool(c.every_steps and global_step % c.every_steps == 0)
            or bool(c.every_tokens and tokens_since >= c.every_tokens))
