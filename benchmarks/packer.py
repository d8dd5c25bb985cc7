"""Prepare and packer throughput on the shared Python docs corpus.

Measures, in one run on this machine:
- prepare: raw JSONL.gz -> tokenized Parquet shards (Ray Data tokenization + shard writing), tokens/s;
- packer, plain pyarrow + numpy (TokenStream.read + iter_blocks, no Ray), tokens/s;
- packer through Ray Data (worker_dataset -> iter_batches), 1 and 2 workers' pipelines, tokens/s.

Run: python benchmarks/packer.py   (writes benchmarks/results/packer.json and .md)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "data" / "python-3.11-docs.jsonl.gz"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", default=str(CORPUS))
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "packer"))
    args = ap.parse_args()

    import ray

    from raypatch.data import TokenStream, iter_blocks, plan_phases, worker_dataset
    from raypatch.prepare import prepare, train_tokenizer

    ray.init(address="local", num_cpus=4, log_to_driver=False, include_dashboard=False, logging_level="warning")
    work = Path(tempfile.mkdtemp(prefix="raypatch-bench-"))
    rows = []

    t = time.perf_counter()
    tok = train_tokenizer([args.corpus], str(work / "tok"), vocab_size=args.vocab_size)
    tok_s = time.perf_counter() - t

    t = time.perf_counter()
    m = prepare([args.corpus], tok, str(work / "shards"), progress=False, shard_tokens=1 << 20)
    prep_s = time.perf_counter() - t
    n_tokens = m["splits"]["train"]["tokens"] + m["splits"]["val"]["tokens"]
    rows.append(("prepare (tokenize + write shards, Ray Data)", n_tokens, prep_s))

    # Reference point: the same tokenization in this one process, no Ray, no writing.
    from tokenizers import Tokenizer

    from raypatch.prepare import iter_documents

    docs = list(iter_documents(args.corpus))
    backend = Tokenizer.from_file(str(Path(tok) / "tokenizer.json"))
    t = time.perf_counter()
    n = sum(len(e.ids) + 1 for e in backend.encode_batch(docs, add_special_tokens=False))
    rows.append(("tokenize only, one process (encode_batch), no Ray, no writing", n, time.perf_counter() - t))

    stream = TokenStream(str(work / "shards"))
    plans = plan_phases(stream_tokens=stream.total_tokens, seq_len=args.seq_len, k=args.k, lam=2 / 3,
                        tokens_per_step=args.k * args.seq_len * 8)
    for p in plans:
        t = time.perf_counter()
        n = sum(len(x) for _, x in iter_blocks(stream, p))
        rows.append((f"packer {p.phase} phase, pyarrow+numpy, 1 reader", n, time.perf_counter() - t))
    for world in (1, 2):
        for p in plans:
            t = time.perf_counter()
            n = 0
            for r in range(world):
                for b in worker_dataset(p, str(work / "shards"), r, world).iter_batches(batch_size=8,
                                                                                       batch_format="numpy"):
                    n += b["input_ids"].size
            rows.append((f"packer {p.phase} phase, Ray Data, {world} worker pipeline(s), to driver", n,
                         time.perf_counter() - t))
    ray.shutdown()

    result = {"corpus": args.corpus, "tokens": n_tokens, "vocab_size": args.vocab_size, "seq_len": args.seq_len,
              "k": args.k, "tokenizer_train_s": tok_s, "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "rows": [{"what": w, "tokens": n, "seconds": s, "tokens_per_s": n / s} for w, n, s in rows]}
    md = ["| what | tokens | seconds | tokens/s |", "|---|---|---|---|"]
    md += [f"| {w} | {n:,} | {s:.2f} | {n / s:,.0f} |" for w, n, s in rows]
    table = "\n".join(md)
    print(table)
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(f"Command: `python benchmarks/packer.py` on {result['machine']}; corpus "
                                      f"{Path(args.corpus).name} ({n_tokens:,} tokens, vocab {args.vocab_size}).\n\n"
                                      + table + "\n")


if __name__ == "__main__":
    main()
