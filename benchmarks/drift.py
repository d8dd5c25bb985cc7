"""How far the main job's table moves, and why: `raypatch train` (the demo preset) under several CPU kernel sets.

The main job is bit-for-bit repeatable on one machine. What moves it between machines is the CPU's kernels: fp32
sums round differently in AVX-512, AVX2 and plain C code (softmax, attention and the fused AdamW in torch, the
matrix products in MKL), and 324 steps at this learning rate amplify a last-digit difference into percents of
perplexity. raypatch therefore pins a CPU run's kernels to AVX2 by default (scale.cpu_kernels=avx2), which every
x86 CPU of the last ten years runs. This script runs the whole main job (tokenizer, shards, both runs) with:

  avx2      the default (pinned), twice: the table and every step's loss must be the same bit for bit;
  native    scale.cpu_kernels=native: the fastest kernels this CPU has (AVX-512 here), as before the pin;
  plain     native plus ATEN_CPU_CAPABILITY=default and MKL_CBWR=COMPATIBLE: torch's and MKL's non-SIMD code,
            standing for a CPU whose kernels differ from both (another vendor's or an older one).

Every run logs every step (log_every=1, which changes no weight), so per-step losses are compared, not only the
table. The spread over the kernel sets is what the README states for a machine whose kernels differ from AVX2.

Run: python benchmarks/drift.py   (about 25 minutes: five main jobs; writes benchmarks/results/drift.json|md)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

VARIANTS = {  # name -> (--set overrides, extra environment of the driver, which the local cluster inherits)
    "avx2": ([], {}),
    "avx2 again": ([], {}),
    "native": (["scale.cpu_kernels=native"], {}),
    "plain": (["scale.cpu_kernels=native"], {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE"}),
}
RUNS = {"token-only": "demo-token-only", "patch K=4 λ=2/3": "demo"}


def main_job(root: Path, sets: list[str], env: dict[str, str], shards: Path | None) -> dict[str, Any]:
    """One `raypatch train` (the README's command) in its own storage; per-step losses and the table's figures."""
    cmd = [sys.executable, "-m", "raypatch.cli", "train", "--set", f"checkpoint.storage_path={root}", "log_every=1",
           *sets, *([f"data.shards={shards}"] if shards else [])]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=os.environ | env, cwd=C.ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    out: dict[str, Any] = {"wall_s": time.perf_counter() - t0}
    for label, name in RUNS.items():
        s = json.loads((root / name / "summary.json").read_text())
        rows = [json.loads(line) for line in (root / name / "metrics.jsonl").read_text().splitlines()]
        out[label] = {"val_ppl": s["val_ppl"], "wikitext_ppl": s["wikitext_ppl"], "kernels": s.get("kernels"),
                      "losses": [r["train/loss"] for r in rows if "train/loss" in r and not r.get("event")],
                      "train_s": sum(s["state"]["seconds"].values())}
    return out


def first_difference(a: list[float], b: list[float]) -> str:
    if len(a) != len(b):
        return f"{len(a)} against {len(b)} steps"
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"step {i + 1} ({x!r} against {y!r})"
    return "none"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default=",".join(VARIANTS), help="which kernel sets, comma-separated")
    ap.add_argument("--max-tokens", type=int, default=0, help="cut the main job's data (0: all of it, as the README)")
    args = ap.parse_args(argv)
    load, t0 = C.LoadTracker(), time.perf_counter()
    res: dict[str, Any] = {"machine": C.machine(), "variants": {}}
    with tempfile.TemporaryDirectory(prefix="raypatch-drift-") as tmp:
        shards = None
        for name in args.variants.split(","):
            sets, env = VARIANTS[name]
            sets = sets + ([f"data.max_tokens={args.max_tokens}"] if args.max_tokens else [])
            print(f"== {name}: {' '.join(sets) or '(defaults)'} {env or ''}", flush=True)
            root = Path(tmp) / name.replace(" ", "-")
            res["variants"][name] = main_job(root, sets, env, shards) | {"sets": sets, "env": env}
            shards = shards or root / "data" / "default-v4096"  # the first run prepares; the same shards after
            load.mark(name)
    v = res["variants"]
    rows, spread = [], []
    for label in RUNS:
        first = v[next(iter(v))][label]["losses"]
        for name, r in v.items():
            x = r[label]
            rows.append([label, name, x["kernels"], f"{x['val_ppl']:.2f}", f"{x['wikitext_ppl']:.2f}",
                         f"{x['losses'][-1]:.6f}", first_difference(first, x["losses"]), f"{x['train_s']:.1f}"])
        for key in ("val_ppl", "wikitext_ppl"):
            vals = [r[label][key] for r in v.values()]
            mid = sorted(vals)[len(vals) // 2]
            spread.append([label, key, f"{min(vals):.2f}", f"{max(vals):.2f}",
                           f"{(max(vals) - min(vals)) / mid:.1%}"])
    res |= {"load": load.summary(), "wall_s": time.perf_counter() - t0}
    tables = (C.md_table(["run", "kernel set", "kernels (worker)", "val ppl", "WikiText ppl", "last step's loss",
                          f"first step differing from '{next(iter(v))}'", "training s"], rows)
              + "\n\nSpread over the kernel sets (max − min, relative to the median):\n\n"
              + C.md_table(["run", "figure", "min", "max", "spread"], spread))
    print(tables)
    C.write_outputs(C.RESULTS / "drift", res, tables)


if __name__ == "__main__":
    main()
