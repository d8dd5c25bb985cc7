"""Peak memory of `raypatch prepare` on one huge single-line document (issue: 50 MB made it peak at 8.9 GB).

Builds a JSONL file holding one document of --mb megabytes (the embedded Python-docs sample, newlines turned
into spaces and repeated) plus a few ordinary documents, then runs `raypatch prepare` on it in a subprocess
and samples the resident memory of that process and all its descendants (the Ray cluster it starts) every
0.2 s. With --compare REV it also runs the code of git revision REV the same way, one after the other.

    python benchmarks/prepare_memory.py --mb 50 --kind text --compare <rev>
    python benchmarks/prepare_memory.py --mb 50 --kind nospace --compare <rev>

Writes benchmarks/results/prepare_memory_<kind>_<mb>mb.{json,md}.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "raypatch" / "corpus" / "python-docs-sample.jsonl.gz"


def make_input(path: Path, mb: int, kind: str) -> int:
    """kind 'text': prose with spaces, newlines turned into spaces; 'nospace': the same characters with every
    whitespace removed (one 50 MB "word": minified or base64-like content)."""
    docs = [json.loads(line)["text"] for line in gzip.open(CORPUS, "rt")]
    flat = " ".join(d.replace("\n", " ") for d in docs)
    if kind == "nospace":
        flat = "".join(flat.split())
    big = (flat * (mb * 2**20 // len(flat) + 1))[: mb * 2**20]
    with open(path, "w") as f:
        for d in docs[:20]:
            f.write(json.dumps({"text": d}) + "\n")
        f.write(json.dumps({"text": big}) + "\n")
    return len(big)


def run(cmd: list[str], env: dict[str, str]) -> dict[str, float]:
    """Peak RSS, summed and of the largest process, over every process started since the command began,
    sampled every 0.2 s. Not only the command's descendants: Ray's raylet, and with it the tokenizer actors,
    are not children of the driver. Run it on an otherwise quiet machine."""
    t0 = time.perf_counter()
    start = time.time() - 1.0
    # cwd: `python -m` puts the working directory first on sys.path, which would shadow PYTHONPATH's tree.
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=tempfile.gettempdir())
    peak_tree = peak_one = 0
    while proc.poll() is None:
        rss = []
        for p in psutil.process_iter(["create_time", "memory_info"]):
            info = p.info
            if info["create_time"] and info["create_time"] >= start and info["memory_info"] is not None:
                rss.append(info["memory_info"].rss)
        peak_tree, peak_one = max(peak_tree, sum(rss)), max(peak_one, max(rss, default=0))
        time.sleep(0.2)
    out = proc.stdout.read() if proc.stdout else ""
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-3000:]}")
    return {"peak_tree_gb": peak_tree / 2**30, "peak_process_gb": peak_one / 2**30,
            "wall_s": time.perf_counter() - t0, "output": out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=50)
    ap.add_argument("--kind", default="text", choices=["text", "nospace"])
    ap.add_argument("--compare", default="", help="a git revision to measure the same way (e.g. the one before)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="raypatch-bench-mem-"))
    src = work / "huge.jsonl"
    chars = make_input(src, args.mb, args.kind)
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", TOKENIZERS_PARALLELISM="false")
    tok = work / "tok"
    subprocess.run([sys.executable, "-m", "raypatch.cli", "tokenizer", "train", "--input", str(CORPUS), "--out",
                    str(tok), "--vocab-size", "2048"], check=True, env=env, capture_output=True)
    trees = {"this tree": ROOT}
    if args.compare:
        old = work / "old"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(old), args.compare], check=True,
                       capture_output=True)
        trees[f"git {args.compare}"] = old
    rows = {}
    try:
        for label, tree in trees.items():
            cmd = [sys.executable, "-m", "raypatch.cli", "prepare", "--input", str(src), "--tokenizer", str(tok),
                   "--out", str(work / f"out-{len(rows)}"), "--val-every", "0"]
            rows[label] = run(cmd, dict(env, PYTHONPATH=str(tree)))
            rows[label].pop("output")
            print(label, rows[label], flush=True)
    finally:
        if args.compare:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(work / "old")],
                           capture_output=True)
    load = os.getloadavg()
    result = {"document_chars": chars, "mb": args.mb, "kind": args.kind, "load_avg": load, "runs": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"prepare_memory_{args.kind}_{args.mb}mb"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"`python benchmarks/prepare_memory.py --mb {args.mb} --kind {args.kind}"
             + (f" --compare {args.compare}`" if args.compare else "`"),
             "", f"One JSONL document of {chars:,} characters ({args.kind}) on one line, plus 20 ordinary documents; "
             f"load average at the end {load[0]:.2f}.", "",
             "| code | peak RSS, all processes of the run (GB) | peak RSS, largest process (GB) | wall-clock (s) |",
             "|---|---|---|---|"]
    lines += [f"| {k} | {v['peak_tree_gb']:.2f} | {v['peak_process_gb']:.2f} | {v['wall_s']:.0f} |"
              for k, v in rows.items()]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
