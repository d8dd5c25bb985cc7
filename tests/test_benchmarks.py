"""The paper's claims at toy scale, quick mode: every experiment of benchmarks/reproduce.py runs end to end.

A drill, not in CI (about 4 minutes): the benchmarks are measurements, not what a user runs; the main job's
exactness is tests/test_main_job.py's, in the default tier.

Run: pytest tests/test_benchmarks.py -m drill   (about 4 minutes on 2 cores)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from .conftest import EMBEDDED, ROOT, WIKITEXT

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.drill]


def test_reproduce_quick(tmp_path):
    script = ROOT / "benchmarks" / "reproduce.py"
    # The embedded samples every clone has; the benchmark's shard cache in tmp_path.
    cmd = [sys.executable, str(script), "--quick", "--out", str(tmp_path / "out"), "--corpus", str(EMBEDDED),
           "--wikitext", str(WIKITEXT)]
    env = {**os.environ, "RAYPATCH_BENCH_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    tmp_path = tmp_path / "out"
    results = list(tmp_path.glob("*.json"))
    assert results, list(tmp_path.iterdir())
    data = json.loads(results[0].read_text())
    text = json.dumps(data)
    for exp in ("E1", "E3", "E5", "E7"):
        assert exp in text, exp
    assert all("val_loss" in r for r in data["runs"].values()), [r.get("error") for r in data["runs"].values()]
    assert data["corpus"] == str(EMBEDDED)
    md = next(tmp_path.glob("*.md")).read_text()
    assert "QUICK MODE" in md and "| token-only |" in md
    assert list(tmp_path.glob("*.png")), "the plots"
