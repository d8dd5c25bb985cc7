"""Prepare at scale: `raypatch prepare` against what a user would pick instead, side by side in one run.

On the regime study's corpus (benchmarks/corpus_debian.py: 13,138 Debian documentation pages, 120 M characters,
one gzipped JSONL file, about 52.6 M tokens with its BPE of 1024), with the same fast tokenizer and the same
document separator (EOS after each document), each method in its own process tree:

1. raypatch: `raypatch prepare` (a fresh local Ray cluster, start-up included), run --repeats times; the shard
   files of every repeat must be byte-identical. Then once more as `raypatch.prepare.prepare()` on a cluster
   started before the clock (what a job submitted to a running cluster pays), with the same shards.
2. Hugging Face `datasets`: load_dataset("json") + `.map(batched=True, num_proc=2)` with the fast tokenizer, then
   `.to_parquet` (its Arrow cache in a temporary directory, so nothing is reused between runs).
3. One plain process: read the file, `tokenizers` encode_batch with TOKENIZERS_PARALLELISM=false (one core),
   write Parquet with pyarrow. Then the same with encode_batch_fast (no character offsets), the call raypatch's
   tokenizer actors make: the ratio against it shows what the parallel pipeline itself adds.

Reported: wall-clock, tokens/s, the ratios raypatch ÷ datasets and raypatch ÷ one process, and peak resident
memory (the sum over every process started during the run, sampled every 0.2 s, and the largest single process).
All three must produce the same token count, and the first documents' ids must agree.

With --copies N every method reads the corpus as N input files (N times the tokens), where fixed start-up
costs weigh less and raypatch reads the files in parallel.

Run: python benchmarks/corpus_debian.py && python benchmarks/prepare_scale.py   (about 4 minutes on 2 cores;
     --copies 3 about 10)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
from prepare_memory import run  # noqa: E402

DATASETS = textwrap.dedent('''
    import sys, tempfile
    from datasets import load_dataset
    from transformers import PreTrainedTokenizerFast
    src, tok_dir, out = sys.argv[1:4]
    tok = PreTrainedTokenizerFast.from_pretrained(tok_dir)
    eos = tok.eos_token_id
    cache = tempfile.mkdtemp(prefix="hf-datasets-")
    ds = load_dataset("json", data_files=src.split(","), split="train", cache_dir=cache)
    def encode(batch):
        ids = tok(batch["text"], add_special_tokens=False)["input_ids"]
        return {"input_ids": [x + [eos] for x in ids]}
    ds = ds.map(encode, batched=True, num_proc=2, remove_columns=ds.column_names)
    ds.to_parquet(out)
''')

PLAIN = textwrap.dedent('''
    import gzip, json, sys
    import pyarrow as pa, pyarrow.parquet as pq
    from tokenizers import Tokenizer
    src, tok_dir, out, how = sys.argv[1:5]
    tok = Tokenizer.from_file(tok_dir + "/tokenizer.json")
    encode_batch = tok.encode_batch_fast if how == "fast" else tok.encode_batch
    eos = json.load(open(tok_dir + "/tokenizer_config.json")).get("eos_token")
    eos = tok.token_to_id(eos if isinstance(eos, str) else eos["content"])
    writer, total, batch = None, 0, []
    def flush(batch):
        global writer, total
        ids = [e.ids + [eos] for e in encode_batch(batch, add_special_tokens=False)]
        total += sum(map(len, ids))
        table = pa.table({"input_ids": pa.array(ids, pa.list_(pa.int32()))})
        writer = writer or pq.ParquetWriter(out, table.schema)
        writer.write_table(table)
    for path in src.split(","):
        with gzip.open(path, "rt") as f:
            for line in f:
                batch.append(json.loads(line)["text"])
                if len(batch) == 256:
                    flush(batch); batch = []
    if batch:
        flush(batch)
    writer.close()
    print(total)
''')


RUNNING = textwrap.dedent('''
    # raypatch.prepare.prepare on a cluster that is already up (what `ray job submit` meets): the same local
    # cluster `raypatch prepare` starts, but started before the clock and left to the process's exit after it.
    import sys, time
    from raypatch.cluster import quiet_env, start_local_ray
    quiet_env()
    start_local_ray(4, log_to_driver=False, dashboard=False)
    from raypatch.prepare import prepare
    src, tok_dir, out = sys.argv[1:4]
    t = time.perf_counter()
    prepare(src.split(","), tok_dir, out, val_every=0, progress=False)
    print(f"PREPARE_S {time.perf_counter() - t}")
''')


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", default=str(C.CACHE / "debian-docs" / "corpus.jsonl.gz"))
    ap.add_argument("--tokenizer", default=str(C.CACHE / "shards-corpus-v1024" / "tokenizer"),
                    help="a fast HF tokenizer directory (default: the regime study's BPE of 1024)")
    ap.add_argument("--repeats", type=int, default=3, help="raypatch runs (their shards must be byte-identical)")
    ap.add_argument("--copies", type=int, default=1,
                    help="the corpus as this many input files (copies of it): every method reads them all")
    ap.add_argument("--out", default="", help="results name (default: prepare_scale, or prepare_scale_xN)")
    return ap.parse_args(argv)


def shard_hashes(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.glob("*.parquet"))}


def first_ids(path: Path, n: int = 20) -> list[list[int]]:
    import pyarrow.parquet as pq

    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    rows: list[list[int]] = []
    for f in files:
        rows += pq.read_table(f, columns=["input_ids"]).column(0).slice(0, n - len(rows)).to_pylist()
        if len(rows) >= n:
            break
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    corpus, tok = Path(args.corpus).resolve(), Path(args.tokenizer).resolve()
    if not corpus.exists() or not (tok / "tokenizer.json").exists():
        raise SystemExit(f"need {corpus} and {tok}: run benchmarks/corpus_debian.py and benchmarks/regime.py's "
                         f"shard preparation first (or pass --corpus/--tokenizer)")
    tmp = Path(tempfile.mkdtemp(prefix="raypatch-prepare-scale-"))
    inputs = [corpus]
    if args.copies > 1:
        (tmp / "in").mkdir()
        inputs = [tmp / "in" / f"corpus-{i}.jsonl.gz" for i in range(args.copies)]
        for copy in inputs:  # copies, not links: raypatch reads a file named twice once
            shutil.copyfile(corpus, copy)
    src = ",".join(map(str, inputs))
    env = os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[1]), "TOKENIZERS_PARALLELISM": "false",
                        "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    load = C.LoadTracker()
    runs: list[dict[str, Any]] = []
    try:
        for i in range(args.repeats):
            out = tmp / f"raypatch-{i}"
            # val_every 0: every document in train, as the other two write them (one separator per document).
            m = run([sys.executable, "-m", "raypatch.cli", "prepare", "--input", *map(str, inputs), "--tokenizer",
                     str(tok), "--out", str(out), "--val-every", "0"], env)
            m.pop("output")
            manifest = json.loads((out / "manifest.json").read_text())
            runs.append({"method": f"raypatch prepare (run {i + 1})", **m,
                         "tokens": manifest["splits"]["train"]["tokens"], "hashes": shard_hashes(out)})
            load.mark(f"raypatch {i + 1}")
        # The same pipeline on a cluster that is up already: the clock covers prepare() alone.
        (tmp / "running.py").write_text(RUNNING)
        out = tmp / "raypatch-running"
        m = run([sys.executable, str(tmp / "running.py"), src, str(tok), str(out)], env)
        m["wall_s"] = float(m.pop("output").split("PREPARE_S ")[1].split()[0])
        manifest = json.loads((out / "manifest.json").read_text())
        running = {"method": "raypatch prepare() on a running cluster (start and stop not timed)", **m,
                   "tokens": manifest["splits"]["train"]["tokens"],
                   "same_shards": shard_hashes(out) == runs[0]["hashes"]}
        load.mark("raypatch running")
        (tmp / "hf_datasets.py").write_text(DATASETS)
        m = run([sys.executable, str(tmp / "hf_datasets.py"), src, str(tok), str(tmp / "datasets.parquet")], env)
        m.pop("output")
        runs.append({"method": "HF datasets .map(batched, num_proc=2)", **m})
        load.mark("datasets")
        (tmp / "plain.py").write_text(PLAIN)
        for how, label in [("batch", "one plain process (tokenizers encode_batch, 1 thread)"),
                           ("fast", "one plain process (tokenizers encode_batch_fast, 1 thread)")]:
            m = run([sys.executable, str(tmp / "plain.py"), src, str(tok), str(tmp / f"plain-{how}.parquet"), how],
                    env)
            m.pop("output")
            runs.append({"method": label, **m})
            load.mark(f"plain {how}")
        import pyarrow.parquet as pq

        others = [tmp / "datasets.parquet", tmp / "plain-batch.parquet", tmp / "plain-fast.parquet"]
        for r, path in zip(runs[-3:], others):
            r["tokens"] = len(pq.read_table(path).column(0).combine_chunks().flatten())
        same_ids = all(first_ids(tmp / "raypatch-0") == first_ids(p) for p in others)
        identical = all(r["hashes"] == runs[0]["hashes"] for r in runs[: args.repeats])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    runs.insert(args.repeats, running)
    same_tokens = len({r["tokens"] for r in runs}) == 1
    identical = identical and running.pop("same_shards")
    for r in runs:
        r["tokens_per_s"] = r["tokens"] / r["wall_s"]
    cold = sorted(r["tokens_per_s"] for r in runs[: args.repeats])
    best, median = cold[-1], statistics.median(cold)
    hf, plain, fast = (r["tokens_per_s"] for r in runs[-3:])
    result = {"machine": C.machine(), "load": load.summary(), "corpus": str(corpus), "tokenizer": str(tok),
              "runs": [{k: v for k, v in r.items() if k != "hashes"} for r in runs],
              "same_token_count": same_tokens, "same_first_rows": same_ids, "raypatch_shards_identical": identical,
              "raypatch_vs_datasets": best / hf, "raypatch_vs_one_process": best / plain,
              "raypatch_vs_one_process_fast": best / fast,
              "median_raypatch_vs_datasets": median / hf, "median_raypatch_vs_one_process": median / plain,
              "median_raypatch_vs_one_process_fast": median / fast,
              "running_cluster_vs_datasets": running["tokens_per_s"] / hf,
              "running_cluster_vs_one_process": running["tokens_per_s"] / plain,
              "running_cluster_vs_one_process_fast": running["tokens_per_s"] / fast,
              "copies": args.copies,
              "wall_s": sum(r["wall_s"] for r in runs)}
    rows = [[r["method"], f"{r['tokens']:,}", f"{r['wall_s']:.1f}", f"{r['tokens_per_s'] / 1e6:.3f}",
             f"{r['peak_tree_gb']:.2f}", f"{r['peak_process_gb']:.2f}"] for r in runs]
    tables = (f"Corpus {corpus.name}" + (f" as {args.copies} input files" if args.copies > 1 else "") +
              f", tokenizer {tok}. raypatch ÷ datasets {result['raypatch_vs_datasets']:.2f}, "
              f"raypatch ÷ one process {result['raypatch_vs_one_process']:.2f} (encode_batch) and "
              f"{result['raypatch_vs_one_process_fast']:.2f} (encode_batch_fast) (best `raypatch prepare` run, "
              f"Ray's start and stop included); median of the {args.repeats} runs "
              f"{result['median_raypatch_vs_datasets']:.2f}, {result['median_raypatch_vs_one_process']:.2f} and "
              f"{result['median_raypatch_vs_one_process_fast']:.2f}; on a running cluster "
              f"{result['running_cluster_vs_datasets']:.2f}, "
              f"{result['running_cluster_vs_one_process']:.2f} and "
              f"{result['running_cluster_vs_one_process_fast']:.2f}. "
              f"Same token count: {same_tokens}; same first rows: {same_ids}; raypatch shards byte-identical across "
              f"runs: {identical}."
              "\n\n" + C.md_table(["method", "tokens", "wall s", "M tokens/s", "peak RSS, all processes (GB)",
                                   "peak RSS, largest process (GB)"], rows))
    name = args.out or str(C.RESULTS / ("prepare_scale" if args.copies == 1 else f"prepare_scale_x{args.copies}"))
    C.write_outputs(Path(name), result, tables)
    return result


if __name__ == "__main__":
    main()
