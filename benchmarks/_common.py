"""Shared helpers for the benchmark scripts: the local Ray cluster, cached shards, machine facts, outputs.

Not a test module and not part of the raypatch package: each script in benchmarks/ imports this file by path.
"""

from __future__ import annotations

import gzip
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

for _k, _v in {"RAY_USAGE_STATS_ENABLED": "0", "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0",
               "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1", "TOKENIZERS_PARALLELISM": "false",
               "DS_ACCELERATOR": "cpu"}.items():
    os.environ.setdefault(_k, _v)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SHARED = ROOT.parent / "shared" / "data"
PY_DOCS = SHARED / "python-3.11-docs.jsonl.gz"
WIKITEXT = SHARED / "wikitext103-test-docs.jsonl.gz"
# Shards are cached outside the repository (nothing to add to .gitignore); delete the folder to rebuild.
CACHE = Path(os.environ.get("RAYPATCH_BENCH_CACHE", Path(tempfile.gettempdir()) / "raypatch-bench-cache"))

SHARED_BOX = ("a shared 2-core CPU box (another engineer runs tests on it at the same time), so absolute timings "
              "are noisy; ratios are measured side by side in one run")


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical cores, torch {torch.__version__}"


def command_line() -> str:
    """The exact command that produced a result file, as one shell line."""
    args = [shlex.quote(a) for a in sys.argv[1:]]
    script = os.path.relpath(sys.argv[0], os.getcwd()) if os.path.isabs(sys.argv[0]) else sys.argv[0]
    return " ".join(["python", script, *args])


def start_ray(num_cpus: int = 4) -> None:
    """One private local Ray cluster (never attaches to anyone else's); end it with ray.shutdown()."""
    import ray

    ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
             log_to_driver=False, logging_level="warning")
    ray.data.DataContext.get_current().enable_progress_bars = False


def corpus_subset(src: Path, num_docs: int) -> Path:
    """The first num_docs documents of src as a JSONL.gz in the cache (num_docs=0: src itself)."""
    if not num_docs:
        return src
    out = CACHE / f"{src.name.split('.')[0]}-first{num_docs}.jsonl.gz"
    if not out.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        with gzip.open(src, "rt") as f, gzip.open(tmp, "wt") as g:
            for i, line in enumerate(f):
                if i == num_docs:
                    break
                g.write(json.dumps({"text": json.loads(line)["text"]}) + "\n")
        os.replace(tmp, out)
    return out


def shards(vocab_size: int, *, num_docs: int = 0, corpus: Path = PY_DOCS) -> str:
    """Tokenizer (byte-level BPE of vocab_size) + Parquet shards of the Python docs, built once and cached.

    Needs the Ray cluster to be up (prepare tokenizes with Ray Data).
    """
    from raypatch.data import load_manifest
    from raypatch.prepare import file_sha256, prepare, train_tokenizer

    src = corpus_subset(corpus, num_docs)
    tag = f"{src.name.split('.')[0]}-v{vocab_size}"
    out = CACHE / f"shards-{tag}"
    try:
        m = load_manifest(str(out))
        if m["sources"][0]["sha256"] == file_sha256(src):
            return str(out)
    except (ValueError, KeyError, IndexError):
        pass
    CACHE.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".build-{tag}-", dir=CACHE))
    try:
        print(f"preparing {src.name} at vocab {vocab_size} -> {out} (once; cached)", flush=True)
        tok = train_tokenizer([str(src)], str(work / "tokenizer"), vocab_size=vocab_size)
        prepare([str(src)], tok, str(work / "shards"), progress=False, shard_tokens=1 << 20)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(work / "shards", out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return str(out)


def write_outputs(out_stem: Path, result: dict[str, Any], md: str) -> None:
    """<stem>.json and <stem>.md; the .md starts with the exact command."""
    out_stem.parent.mkdir(parents=True, exist_ok=True)
    out_stem.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    out_stem.with_suffix(".md").write_text(f"Command: `{command_line()}`\n\n{md.rstrip()}\n")
    print(f"\nwrote {out_stem.with_suffix('.md')} and {out_stem.with_suffix('.json')}", flush=True)


def md_table(head: list[str], rows: list[list[Any]]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def verdict(ok: bool, target: str) -> str:
    return f"target {target}: {'met' if ok else 'missed'}"
