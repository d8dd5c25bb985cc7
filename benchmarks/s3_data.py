"""Shards on object storage against shards on local disk, in one run: training and prepare.

A local S3 server (moto's, on 127.0.0.1, as the tests use) holds a copy of the shard set. The same run (the demo
preset's model, data.max_tokens cut, 2 CPU workers) trains from the local directory, from the bucket, and from
the bucket behind a proxy that adds a first-byte delay to every request (a remote store's latency, which
loopback does not have), in ABBA order over the repeats. Per phase: tokens/s and the data-wait share of step
time (rank 0's log rows, mean over the phase), and the peak resident memory of the Train worker processes and
of the read-task processes. Then `raypatch prepare` local -> local against S3 -> S3 (the corpus uploaded to the
bucket, the shard set written there), alternating, tokens/s.

Goals (issue 22): data-wait <= 2 % of step time with shards on S3; tokens/s >= 0.97x local; prepare S3 -> S3
>= 0.9x local -> local.

Run: python benchmarks/s3_data.py   (about 8 minutes; writes benchmarks/results/s3_data.json|md)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

sys.path.insert(0, str(C.ROOT))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-tokens", type=int, default=393_216, help="data.max_tokens of each training run")
    ap.add_argument("--repeats", type=int, default=1, help="ABBA repeats of the training arms")
    ap.add_argument("--delay-ms", type=float, default=80.0, help="first-byte delay the latency arm adds per request")
    ap.add_argument("--prepare-repeats", type=int, default=2)
    ap.add_argument("--out", default=str(C.RESULTS / "s3_data"))
    return ap.parse_args(argv)


class MemorySampler:
    """Peak RSS per process of the Ray Train workers and the Ray Data read tasks, sampled every 0.2 s."""

    def __init__(self) -> None:
        self.peak: dict[str, dict[int, int]] = {"train_worker": {}, "read_task": {}}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop.is_set():
            for proc in Path("/proc").glob("[0-9]*"):
                try:  # Ray names its worker processes by what they run (ray::RayTrainWorker, ray::MapBatches...)
                    cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                    rss = next(int(ln.split()[1]) * 1024 for ln in (proc / "status").read_text().splitlines()
                               if ln.startswith("VmRSS:"))
                except (OSError, StopIteration, ValueError, IndexError):
                    continue
                kind = "train_worker" if "RayTrainWorker" in cmd else \
                    "read_task" if "_read_blocks" in cmd or "MapBatches" in cmd else None
                if kind:
                    d = self.peak[kind]
                    d[int(proc.name)] = max(d.get(int(proc.name), 0), rss)
            self.stop.wait(0.2)

    def __enter__(self) -> MemorySampler:
        self.thread.start()
        return self

    def __exit__(self, *a: Any) -> None:
        self.stop.set()
        self.thread.join()

    def summary(self) -> dict[str, float]:
        return {k: max(v.values()) / 2**20 if v else float("nan") for k, v in self.peak.items()}


def train(cfg: Any) -> dict[str, Any]:
    with MemorySampler() as mem:
        s, rows, wall = C.fit_run(cfg)
    rows = [r for r in rows if "perf/tokens_per_s" in r]
    out: dict[str, Any] = {"wall_s": wall, "final_val_loss": s["final"].get("val/loss"),
                           "peak_rss_mib": mem.summary()}
    for phase in ("patch", "token"):
        rs = [r for r in rows if r["phase"] == phase][1:]  # the first window holds the phase's start-up
        out[phase] = {"tokens_per_s": statistics.mean(r["perf/tokens_per_s"] for r in rs),
                      "data_wait": statistics.mean(r["perf/data_wait"] for r in rs), "log_rows": len(rs)}
    return out


def peak(runs: list[dict[str, Any]], kind: str) -> str:
    """The largest peak RSS sampled over an arm's runs; '-' when the sampler caught no such process."""
    vals = [r["peak_rss_mib"][kind] for r in runs if r["peak_rss_mib"][kind] == r["peak_rss_mib"][kind]]
    return f"{max(vals):,.0f}" if vals else "-"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from raypatch.config import apply_overrides
    from raypatch.prepare import prepare
    from raypatch.presets import PRESETS
    from raypatch.shards import load_manifest
    from tests.s3util import BUCKET, FaultProxy, S3Server, uri

    C.fake_s3_env()
    t0 = time.perf_counter()
    load = C.LoadTracker()
    C.start_ray()
    base = PRESETS["demo"]()
    local = C.shards(base.model.vocab_size)
    server = S3Server().start()
    client = server.client()
    client.create_bucket(Bucket=BUCKET)
    proxy = FaultProxy(server.endpoint)
    proxy.delay = args.delay_ms / 1000
    work = Path(tempfile.mkdtemp(prefix="s3-data-"))
    try:
        src = Path(local)
        for f in sorted(src.rglob("*")):
            if f.is_file():
                client.upload_file(str(f), BUCKET, f"shards/{f.relative_to(src).as_posix()}")
        arms = {"local disk": local, "S3 (loopback)": uri(server.endpoint, "shards"),
                f"S3 + {args.delay_ms:.0f} ms per request": uri(proxy.endpoint, "shards")}
        assert load_manifest(arms["S3 (loopback)"])["shards_id"] == load_manifest(local)["shards_id"]
        order = list(arms)
        runs: dict[str, list[dict[str, Any]]] = {a: [] for a in arms}
        for rep in range(args.repeats):
            for arm in (order if rep % 2 == 0 else order[::-1]):
                cfg = apply_overrides(base, [f"data.shards={arms[arm]}", f"data.max_tokens={args.max_tokens}",
                                             f"checkpoint.storage_path={work / 'runs'}",
                                             f"checkpoint.name=r{rep}-{order.index(arm)}", "compare_baseline=false",
                                             "eval.wikitext=", "checkpoint.keep=1"])
                print(f"[train] {arm}, repeat {rep + 1}", flush=True)
                runs[arm].append(train(cfg))
                load.mark(f"{arm} {rep + 1}")
        # prepare: local -> local against S3 -> S3 on the same corpus (uploaded to the bucket), alternating.
        corpus = C.corpus_subset(C.PY_DOCS, 0)
        client.upload_file(str(corpus), BUCKET, f"raw/{corpus.name}")
        tok = str(src / "tokenizer")
        prep: dict[str, list[float]] = {"local -> local": [], "S3 -> S3": []}
        tokens = 0
        for rep in range(args.prepare_repeats):
            for kind in (list(prep) if rep % 2 == 0 else list(prep)[::-1]):
                inp = str(corpus) if kind == "local -> local" else uri(server.endpoint, f"raw/{corpus.name}")
                out = str(work / f"p{rep}") if kind == "local -> local" else uri(server.endpoint, f"prep/{rep}")
                t = time.perf_counter()
                m = prepare([inp], tok, out, progress=False, shard_tokens=1 << 20)
                prep[kind].append(time.perf_counter() - t)
                tokens = m["splits"]["train"]["tokens"] + m["splits"]["val"]["tokens"]
                print(f"[prepare] {kind}: {prep[kind][-1]:.1f} s", flush=True)
                load.mark(f"prepare {kind}")
    finally:
        proxy.close()
        server.stop()
        import ray

        ray.shutdown()

    rows = []
    ref = {ph: statistics.mean(r[ph]["tokens_per_s"] for r in runs["local disk"]) for ph in ("patch", "token")}
    for arm, rs in runs.items():
        for ph in ("patch", "token"):
            tps = statistics.mean(r[ph]["tokens_per_s"] for r in rs)
            rows.append([arm, ph, f"{tps:,.0f}", f"{tps / ref[ph]:.3f}",
                         f"{100 * statistics.mean(r[ph]['data_wait'] for r in rs):.2f} %",
                         peak(rs, "train_worker"), peak(rs, "read_task")])
    best = {k: min(v) for k, v in prep.items()}
    prow = [[k, f"{min(v):.1f}", f"{statistics.median(v):.1f}", f"{tokens / min(v) / 1e6:.2f}",
             f"{best['local -> local'] / min(v):.3f}"] for k, v in prep.items()]
    tables = (f"Training: demo model, data.max_tokens={args.max_tokens:,}, 2 CPU workers, {args.repeats} repeat(s) "
              f"in ABBA order; rank 0's log rows, mean over each phase (its first row, start-up, left out)\n\n"
              + C.md_table(["shards", "phase", "tokens/s", "÷ local disk", "data-wait", "peak RSS Train worker (MiB)",
                            "peak RSS read task (MiB)"], rows)
              + f"\n\nprepare ({corpus.name}, {tokens:,} tokens), {args.prepare_repeats} runs each, alternating\n\n"
              + C.md_table(["prepare", "best (s)", "median (s)", "M tokens/s (best)", "÷ local -> local (best)"], prow))
    print("\n" + tables)
    result = {"machine": C.machine(), "load": load.summary(), "wall_s": time.perf_counter() - t0,
              "args": vars(args), "runs": runs, "prepare_s": prep, "prepare_tokens": tokens}
    C.write_outputs(Path(args.out), result, tables)


if __name__ == "__main__":
    main()
