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
import time
from pathlib import Path
from typing import Any

for _k, _v in {"RAY_USAGE_STATS_ENABLED": "0", "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0",
               "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1", "TOKENIZERS_PARALLELISM": "false",
               "DS_ACCELERATOR": "cpu"}.items():
    os.environ.setdefault(_k, _v)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SHARED = ROOT.parent / "shared" / "data"
EMBEDDED = ROOT / "raypatch" / "corpus"
# The full corpora beside the repository when there (this project's machines); else the samples every clone has.
PY_DOCS = next(p for p in (SHARED / "python-3.11-docs.jsonl.gz", EMBEDDED / "python-docs-sample.jsonl.gz")
               if p.exists() or p.parent == EMBEDDED)
WIKITEXT = next(p for p in (SHARED / "wikitext103-test-docs.jsonl.gz", EMBEDDED / "wikitext103-test-sample.jsonl.gz")
                if p.exists() or p.parent == EMBEDDED)
# Shards are cached outside the repository (nothing to add to .gitignore); delete the folder to rebuild.
CACHE = Path(os.environ.get("RAYPATCH_BENCH_CACHE", Path(tempfile.gettempdir()) / "raypatch-bench-cache"))

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


def loadavg() -> float:
    """The host's 1-minute load average (processes wanting a CPU; this box has 2): how contended a run was."""
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return float("nan")


class LoadTracker:
    """Samples the load average at marks; `summary()` says how busy the box was while a script ran."""

    def __init__(self) -> None:
        self.samples: list[tuple[str, float]] = [("start", loadavg())]

    def mark(self, label: str) -> float:
        v = loadavg()
        self.samples.append((label, v))
        return v

    def summary(self) -> str:
        vals = [v for _, v in self.samples]
        marks = ", ".join(f"{lb} {v:.1f}" for lb, v in self.samples)
        return f"1-minute load average {min(vals):.1f}–{max(vals):.1f} ({marks})"


class CpuSampler:
    """Where the machine's CPU time goes while a run trains: every second, each process's CPU seconds, split into
    the trainers (processes whose command line contains `trainer`) and everything else. Only seconds in which the
    trainers used at least 3/4 of the cores count (start-up and shut-down are left out). `shares()` gives both
    as fractions of the machine's CPU time in those seconds."""

    def __init__(self, trainer: str, period_s: float = 1.0) -> None:
        import threading

        self.trainer, self.period = trainer, period_s
        self.intervals: list[tuple[float, float, float]] = []  # (seconds, trainers' CPU s, others' CPU s)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> CpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _snap(self) -> dict[int, tuple[bool, float]]:
        import psutil

        out = {}
        for p in psutil.process_iter():
            try:
                t = p.cpu_times()
                out[p.pid] = (self.trainer in " ".join(p.cmdline()), t.user + t.system)
            except (psutil.Error, OSError):
                pass
        return out

    def _run(self) -> None:
        prev, t_prev = self._snap(), time.perf_counter()
        while not self._stop.wait(self.period):
            cur, t = self._snap(), time.perf_counter()
            d = {pid: (tr, c - prev[pid][1]) for pid, (tr, c) in cur.items() if pid in prev}
            self.intervals.append((t - t_prev, sum(c for tr, c in d.values() if tr),
                                   sum(c for tr, c in d.values() if not tr)))
            prev, t_prev = cur, t

    def shares(self) -> dict[str, float]:
        cores = os.cpu_count() or 1
        busy = [iv for iv in self.intervals if iv[1] >= 0.75 * cores * iv[0]]
        total = sum(iv[0] for iv in busy) * cores
        if not total:
            return {"trainers": float("nan"), "others": float("nan"), "seconds": 0.0}
        return {"trainers": sum(iv[1] for iv in busy) / total, "others": sum(iv[2] for iv in busy) / total,
                "seconds": sum(iv[0] for iv in busy)}


def command_line() -> str:
    """The exact command that produced a result file, as one shell line."""
    args = [shlex.quote(a) for a in sys.argv[1:]]
    script = os.path.relpath(sys.argv[0], os.getcwd()) if os.path.isabs(sys.argv[0]) else sys.argv[0]
    return " ".join(["python", script, *args])


def start_ray(num_cpus: int = 4) -> bool:
    """One private local Ray cluster (raypatch.cluster.start_local_ray: its own dashboard port, never attached to
    anyone else's); False when this process already has one (a caller that started Ray itself, e.g. a test
    fixture, keeps it). End it with ray.shutdown() if True."""
    import ray

    from raypatch.cluster import start_local_ray

    if ray.is_initialized():
        return False
    for attempt in range(3):
        try:
            start_local_ray(num_cpus, log_to_driver=False)
            break
        except Exception as e:  # "node timed out during startup" when the shared box is overloaded
            ray.shutdown()
            if attempt == 2:
                raise
            print(f"ray.init failed ({str(e).splitlines()[0][:120]}); retrying in 10 s", flush=True)
            time.sleep(10)
    ray.data.DataContext.get_current().enable_progress_bars = False
    return True


def fake_s3_env() -> None:
    """Fake credentials for the local S3 server (it takes any key), set before Ray starts so its workers have them
    too: no real credential from the environment ever goes to it."""
    os.environ |= {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
                   "AWS_EC2_METADATA_DISABLED": "true"}
    for k in ("AWS_SESSION_TOKEN", "AWS_PROFILE"):
        os.environ.pop(k, None)


def fit_run(cfg: Any) -> tuple[dict[str, Any], list[dict[str, Any]], float]:
    """raypatch.driver.fit(cfg) without export: its summary, the run's metrics.jsonl rows, the fit's seconds."""
    from raypatch.driver import fit
    from raypatch.metrics import read_metrics

    t = time.perf_counter()
    s = fit(cfg, export=False)
    wall = time.perf_counter() - t
    return s, read_metrics(Path(s["run_dir"]) / "metrics.jsonl"), wall


def corpus_subset(src: Path, num_docs: int, *, shuffle_seed: int | None = None) -> Path:
    """The first num_docs documents of src (0: all), or with shuffle_seed a seeded random sample of num_docs in
    shuffled order, as a JSONL.gz in the cache; src itself when nothing is to change.

    The Python docs file lists documents in path order (c-api/*, distutils/*, ... whatsnew/*), and raypatch streams
    shards in order, so without shuffling each phase of a run would read different topics.
    """
    if not num_docs and shuffle_seed is None:
        return src
    tag = (f"-shuffled{shuffle_seed}" if shuffle_seed is not None else "") + (f"-n{num_docs}" if num_docs else "")
    out = CACHE / f"{src.name.split('.')[0]}{tag}.jsonl.gz"
    if not out.exists():
        import random

        CACHE.mkdir(parents=True, exist_ok=True)
        with gzip.open(src, "rt") as f:
            docs = [json.loads(line)["text"] for line in f]
        if shuffle_seed is not None:
            random.Random(shuffle_seed).shuffle(docs)
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        with gzip.open(tmp, "wt") as g:
            for text in docs[: num_docs or len(docs)]:
                g.write(json.dumps({"text": text}) + "\n")
        os.replace(tmp, out)
    return out


def shards(vocab_size: int, *, num_docs: int = 0, val_every: int = 50, shuffle_seed: int | None = None,
           corpus: Path = PY_DOCS) -> str:
    """Tokenizer (byte-level BPE of vocab_size) + Parquet shards of the Python docs, built once and cached.

    Needs the Ray cluster to be up (prepare tokenizes with Ray Data).
    """
    from raypatch.prepare import prepare, train_tokenizer
    from raypatch.shards import file_sha256, load_manifest

    src = corpus_subset(corpus, num_docs, shuffle_seed=shuffle_seed)
    tag = f"{src.name.split('.')[0]}-v{vocab_size}" + (f"-val{val_every}" if val_every != 50 else "")
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
        prepare([str(src)], tok, str(work / "shards"), progress=False, shard_tokens=1 << 20, val_every=val_every)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(work / "shards", out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return str(out)


def corpus_identity(corpus: Path) -> dict[str, Any]:
    """What names a corpus file's text: the sha256 of its uncompressed bytes (a gzip header holds a build time), and
    the Debian package versions corpus_debian.py recorded beside it. A point release of a documentation package
    changes the text, so a study appended to, or paired with, on a rebuilt corpus checks this, not a token count."""
    import hashlib

    h = hashlib.sha256()
    with gzip.open(corpus, "rb") if corpus.suffix == ".gz" else open(corpus, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    stats = corpus.parent / "stats.json"
    versions = json.loads(stats.read_text()).get("versions", {}) if stats.exists() else {}
    return {"file": corpus.name, "text_sha256": h.hexdigest(), "debian_versions": versions}


def same_corpus(recorded: dict[str, Any], here: dict[str, Any], here_tokens: int) -> str:
    """'' when a study's corpus (its recorded identity and token count) is this one, else why not, in one line."""
    if recorded.get("corpus_tokens") != here_tokens:
        why = f"{recorded.get('corpus_tokens', 0):,} train tokens there, {here_tokens:,} here"
    elif "corpus_identity" in recorded and recorded["corpus_identity"]["text_sha256"] != here["text_sha256"]:
        why = "the same token count but other text (sha256)"
    else:
        return ""
    old = recorded.get("corpus_identity", {}).get("debian_versions", {})
    moved = [f"{p} {v} -> {here['debian_versions'].get(p, '?')}" for p, v in old.items()
             if here["debian_versions"].get(p) != v]
    return why + ("; packages that moved: " + ", ".join(moved) if moved else
                  "" if old else "; the study recorded no package versions (built before they were recorded)")


def write_outputs(out_stem: Path, result: dict[str, Any], tables: str, command: str | None = None) -> None:
    """<stem>.json (everything measured) and <stem>.md (the command, the machine, the load, then plain tables).

    Interpretation is not generated: it lives in the hand-written benchmarks/results/findings.md.
    """
    out_stem.parent.mkdir(parents=True, exist_ok=True)
    out_stem.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    head = [f"Command: `{command or command_line()}`", "",
            f"Machine: {result.get('machine', '-')}; {result.get('load', 'load not sampled')}; "
            f"wall-clock {result.get('wall_s', float('nan')):.0f} s.", ""]
    out_stem.with_suffix(".md").write_text("\n".join(head) + "\n" + tables.rstrip() + "\n")
    print(f"\nwrote {out_stem.with_suffix('.md')} and {out_stem.with_suffix('.json')}", flush=True)


def md_table(head: list[str], rows: list[list[Any]]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)
