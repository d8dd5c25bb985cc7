"""Every `raypatch` command in README.md and docs/*.md runs as written, in order, from a fresh directory.

The commands are taken from the ```bash blocks (lines that start with `raypatch `) and run by bash in a
temporary directory that holds only `raypatch/corpus` (what a fresh clone has), so each command finds what the
earlier ones wrote (tok/, shards/, runs/, hf/). Two size changes keep the run short, and nothing else changes:
`raypatch train --config demo` trains 49,152 tokens (data.max_tokens), and `raypatch tune` budgets are divided
by 10. `ray up` / `ray job submit` lines need a cluster and are not run here (tests/test_jobs.py submits the
pretrain job to a real local head).

Run: pytest tests/test_readme.py -m slow   (about 10 minutes on 2 cores)
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT

pytestmark = [pytest.mark.ray, pytest.mark.slow]

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def commands() -> list[str]:
    """The `raypatch ...` lines of every ```bash block, in document order (continuation lines joined)."""
    out = []
    for doc in DOCS:
        for block in re.findall(r"```bash\n(.*?)```", doc.read_text(), flags=re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.strip()
                if line.startswith("raypatch "):
                    out.append(line)
    return out


def small(cmd: str) -> str:
    """The two size changes named in the module docstring; every other word stays as written."""
    words = shlex.split(cmd, comments=True)
    if words[1] == "train" and "demo" in words:
        if "--set" in words:
            words.insert(words.index("--set") + 1, "data.max_tokens=49152")
        else:
            words += ["--set", "data.max_tokens=49152"]
    if words[1] == "tune" and "--budget" in words:
        i = words.index("--budget") + 1
        words[i] = f"{float(words[i]) / 10:g}"
    # Keep what bash expands ($(...), globs in quotes) for bash: re-quote every word but a $(...) one.
    return " ".join(w if w.startswith("$(") else shlex.quote(w) for w in words)


def test_the_documented_commands_are_found():
    cmds = commands()
    verbs = {c.split()[1] for c in cmds}
    assert {"tokenizer", "prepare", "train", "export", "evaluate", "plan", "tune"} <= verbs, cmds


def test_every_documented_command_runs_as_written(tmp_path):
    (tmp_path / "raypatch").mkdir()
    os.symlink(ROOT / "raypatch" / "corpus", tmp_path / "raypatch" / "corpus")
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    for cmd in commands():
        run = small(cmd)
        proc = subprocess.run(["bash", "-c", run], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=1200)
        assert proc.returncode == 0, f"{cmd}\n(ran: {run})\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
        # Only raypatch's own lines reach the terminal; Ray's and DeepSpeed's go to the log file.
        for line in (proc.stdout + proc.stderr).splitlines():
            assert not re.search(r"\(RayTrainWorker|core_worker\.cc|\[WARNING\]|FutureWarning|INFO ", line), \
                f"{cmd}: a line that is not raypatch's own: {line}"
