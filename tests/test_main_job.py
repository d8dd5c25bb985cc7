"""The main job (`raypatch train`, the demo preset on the embedded corpus) is repeatable bit for bit.

Run twice from scratch in two storage directories, cut to 24,576 tokens (4 patch steps, then 2 token steps) and
without the token-only baseline: the same tokenizer file, the same shard bytes, every step's loss, the final
perplexities and the exported weights must be equal, not close. The workers must compute with AVX2 kernels
(scale.cpu_kernels=avx2, the default) where the CPU has them: that pin is what makes the figures the same on
another x86 machine (benchmarks/results/drift.md measures how far they move without it).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT
from .helpers import step_losses

pytestmark = pytest.mark.ray


def main_job(storage: Path) -> Path:
    env = os.environ.copy()
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "raypatch.cli", "train", "--set", "data.max_tokens=24576", "compare_baseline=false",
           "log_every=1", f"checkpoint.storage_path={storage}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return storage


def digests(d: Path, pattern: str) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.glob(pattern))}


def has_avx2() -> bool:
    try:
        return " avx2 " in Path("/proc/cpuinfo").read_text().replace("\n", " ")
    except OSError:
        return False


def test_the_main_job_twice_gives_the_same_bits(tmp_path):
    a, b = main_job(tmp_path / "a"), main_job(tmp_path / "b")
    assert digests(a / "data", "tokenizer-*/tokenizer.json") == digests(b / "data", "tokenizer-*/tokenizer.json")
    shards = digests(a / "data", "default-*/**/*.parquet")
    assert shards and shards == digests(b / "data", "default-*/**/*.parquet")
    losses = step_losses(a / "demo")
    assert sorted(losses) == list(range(1, 7)) and losses == step_losses(b / "demo")
    sa, sb = (json.loads((r / "demo" / "summary.json").read_text()) for r in (a, b))
    assert (sa["val_ppl"], sa["wikitext_ppl"]) == (sb["val_ppl"], sb["wikitext_ppl"])
    weights = digests(a / "demo" / "hf", "*.safetensors")
    assert weights and weights == digests(b / "demo" / "hf", "*.safetensors")
    if has_avx2() and os.uname().machine == "x86_64":
        assert sa["kernels"] == sb["kernels"] == "AVX2", sa["kernels"]
