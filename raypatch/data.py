"""The streaming patch-packer: token shards -> fixed blocks of K·T (patch phase) or T (token phase) tokens.

The train split of a shard set is one token stream: its documents concatenated across row and shard
boundaries in manifest order, with no padding. Every block has a number computed from the manifest alone, so
any worker can start at any block and nothing has to be replayed to resume:

- The patch phase reads blocks of K·T tokens from offset 0 up to λ·D; the token phase reads blocks of T
  tokens from λ·D up to D. The phases are disjoint. A token-only baseline (λ=0) reads the same stream from 0.
  What is left over at the end of a phase, shorter than one block, is not trained on (the documented tail).
- Optimizer step s of a phase takes the blocks [s·B, (s+1)·B), B = tokens_per_step / block_tokens. Within a
  step, worker r of N takes the contiguous run [s·B + r·B/N, s·B + (r+1)·B/N). The cursor is the number of
  blocks of the phase already trained, so resuming with any N (that divides B) re-splits the same blocks.

Ray Data has no resume of a stream mid-epoch (Ray issues 37633, 48224), and streaming_split drops tail rows
(issue 63285), so each Train worker builds its own ordered Ray Data pipeline over exactly its blocks.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raypatch import storage
from raypatch.patching import schedule_ends
from raypatch.safety import InputError
from raypatch.shards import check_shard_footer, load_manifest, shards_id, tokens_hash


class TokenStream:
    """One split of a shard set as a single concatenated token stream, readable at any [start, end).

    The set may live on local disk or at a URI (storage.py): a shard is opened once (its footer read and
    checked), then each row group is one range read, checked against the manifest's hash. With `cache_dir`,
    shards of a set on a store are first copied to that local cache (keyed by the set's content id, at most
    `cache_bytes` in all) and read from there: repeated epochs and Tune trials then read the store once.
    """

    def __init__(self, shards_dir: str, split: str = "train", *, verify: str = "size",
                 manifest: dict[str, Any] | None = None, cache_dir: str = "", cache_bytes: int = 0) -> None:
        self.dir = str(shards_dir)
        self.split = split
        self.manifest = manifest if manifest is not None else load_manifest(shards_dir, verify=verify)
        if split not in self.manifest["splits"]:
            raise InputError(f"shards {storage.display(shards_dir)}: no split {split!r}")
        self.shards = self.manifest["splits"][split]["shards"]
        self.cache = (cache_dir, cache_bytes) if cache_dir and storage.is_uri(shards_dir) else None
        self.starts: list[int] = []  # global token offset of each shard
        self.rg_starts: list[list[int]] = []  # shard-relative offset of each row group
        pos = 0
        for s in self.shards:
            self.starts.append(pos)
            rg = [0]
            for n in s["row_group_tokens"]:
                rg.append(rg[-1] + n)
            self.rg_starts.append(rg)
            pos += s["tokens"]
        self.total_tokens = pos
        self._files: dict[int, pq.ParquetFile] = {}
        self._cache: dict[tuple[int, int], np.ndarray] = {}

    def _path(self, i: int) -> str:
        return storage.join(self.dir, self.shards[i]["file"])

    def _file(self, i: int) -> pq.ParquetFile:
        if i not in self._files:
            path: str | Path = self._path(i)
            if self.cache is not None:
                s = self.shards[i]
                local = storage.cached(path, self.cache[0], shards_id(self.manifest)[:32], size=s["bytes"],
                                       sha=s["sha256"], max_bytes=self.cache[1])
                path = local if local is not None else path
            self._files[i] = check_shard_footer(path, self.shards[i])
        return self._files[i]

    def _row_group(self, i: int, g: int) -> np.ndarray:
        """Row group g of shard i as int32 tokens, checked against the manifest's count and hash."""
        key = (i, g)
        if key in self._cache:
            return self._cache[key]
        s = self.shards[i]
        path = storage.display(self._path(i))

        def read() -> Any:
            return self._file(i).read_row_group(g, columns=["input_ids"]).column(0)

        try:
            # A broken connection mid-read is retried on a freshly opened file (its footer read again).
            col = storage.retrying(self._path(i), f"read row group {g} of", read, own_errors=True,
                                   on_retry=lambda: self._files.pop(i, None))
            flat = pa.concat_arrays([c.flatten() for c in col.chunks]) if col.num_chunks else pa.array([], pa.int32())
            vals = flat.to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
        except (OSError, pa.ArrowException) as e:
            self._files.pop(i, None)
            raise InputError(f"shard {path}: row group {g} cannot be decoded ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}); the file is damaged, rerun "
                             f"`raypatch prepare`") from None
        if len(vals) != s["row_group_tokens"][g]:
            raise InputError(f"shard {path}: row group {g} holds {len(vals)} tokens, the manifest says "
                             f"{s['row_group_tokens'][g]} (rerun `raypatch prepare`)")
        hashes = s.get("row_group_hashes")
        if hashes is not None and tokens_hash(vals) != hashes[g]:
            raise InputError(f"shard {path}: row group {g} does not match its hash in the manifest (the file "
                             f"changed or is damaged since `raypatch prepare`; rerun it)")
        self._cache = {key: vals}  # blocks are read in order: the last row group is the one read again
        return vals

    def read_epochs(self, start: int, end: int) -> np.ndarray:
        """Like read, on the stream repeated end to end (multi-epoch plans address epoch e at e·total)."""
        if end <= self.total_tokens:
            return self.read(start, end)
        parts, pos = [], start
        while pos < end:
            s = pos % self.total_tokens
            n = min(self.total_tokens - s, end - pos)
            parts.append(self.read(s, s + n))
            pos += n
        return np.concatenate(parts)

    def read(self, start: int, end: int) -> np.ndarray:
        """Tokens [start, end) of the stream as int32, reading only the row groups that overlap it."""
        if not 0 <= start <= end <= self.total_tokens:
            raise ValueError(f"token range [{start}, {end}) outside the stream of {self.total_tokens} tokens")
        out = np.empty(end - start, dtype=np.int32)
        pos = start
        i = bisect.bisect_right(self.starts, start) - 1
        while pos < end:
            s0 = self.starts[i]
            lo, hi = pos - s0, min(end - s0, self.shards[i]["tokens"])
            rg = self.rg_starts[i]
            g0 = bisect.bisect_right(rg, lo) - 1
            g1 = bisect.bisect_left(rg, hi)  # row groups g0 .. g1-1 overlap [lo, hi)
            vals = np.concatenate([self._row_group(i, g) for g in range(g0, g1)]) if g1 - g0 > 1 \
                else self._row_group(i, g0)
            out[pos - start:pos - start + hi - lo] = vals[lo - rg[g0]:hi - rg[g0]]
            pos += hi - lo
            i += 1
        return out


# --- the plan: which tokens each phase, step and worker gets -----------------------------------------


@dataclass(frozen=True)
class PhasePlan:
    """One phase's blocks: block g covers stream tokens [start + g·block_tokens, start + (g+1)·block_tokens)."""

    phase: str
    """'patch' or 'token'."""
    k: int
    """Patch size of the loss in this phase (1 in the token phase)."""
    block_tokens: int
    """Tokens per row: K·T in the patch phase, T in the token phase."""
    start: int
    """Stream token offset of block 0."""
    token_budget: int
    """Tokens of the stream given to this phase (λ·D or (1-λ)·D)."""
    blocks_per_step: int
    """Global rows per optimizer step (tokens_per_step / block_tokens)."""

    @property
    def num_blocks(self) -> int:
        return self.token_budget // self.block_tokens

    @property
    def num_steps(self) -> int:
        return self.num_blocks // self.blocks_per_step

    @property
    def tail_tokens(self) -> int:
        """Tokens of this phase's share that no full block covers (never delivered)."""
        return self.token_budget - self.num_blocks * self.block_tokens

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def data_tokens(stream_tokens: int, max_tokens: int, epochs: int, source: str) -> int:
    """D: data.max_tokens, or the whole stream over data.epochs passes; more than the stream holds is refused."""
    available = stream_tokens * epochs
    d = max_tokens or available
    if d > available:
        more = f"; set data.epochs >= {-(-d // stream_tokens)} to repeat it" if epochs == 1 else ""
        raise InputError(f"data.max_tokens={d:,} exceeds the {available:,} train tokens in {source}"
                         f"{' over ' + str(epochs) + ' epochs' if epochs > 1 else ''}{more}")
    return d


def plan_phases(*, stream_tokens: int, seq_len: int, k: int, lam: float, tokens_per_step: int,
                max_tokens: int = 0, patch_tokens: int = 0, patch_block_tokens: int | None = None,
                patch_only: bool = False, epochs: int = 1, source: str = "the corpus") -> list[PhasePlan]:
    """Split the first D tokens of the stream: λ·D (or exactly `patch_tokens`, as `raypatch tune` gives it in
    whole steps from patching.budget_split) for the patch phase, the rest for the token phase.

    With epochs > 1 the stream repeats end to end (multi-epoch mode, the paper's Table 2 recipe): D may reach
    epochs × stream_tokens, and the patch phase takes the first λ of those passes, the token phase the rest.
    """
    d = data_tokens(stream_tokens, max_tokens, epochs, source)
    if patch_tokens > d:
        raise InputError(f"data.patch_tokens={patch_tokens:,} exceeds D={d:,} (data.max_tokens)")
    # The epsilon keeps float noise in a λ such as 2/3 from dropping a token.
    patch_end = patch_tokens if patch_tokens else math.floor(lam * d + 1e-6)
    pb = patch_block_tokens or k * seq_len
    plans = []
    if lam > 0 or patch_tokens:
        plans.append(PhasePlan("patch", k, pb, 0, patch_end, tokens_per_step // pb))
    if not patch_only:
        plans.append(PhasePlan("token", 1, seq_len, patch_end, d - patch_end, tokens_per_step // seq_len))
    for p in plans:
        if p.num_blocks == 0:
            raise InputError(f"{source} is too small: the {p.phase} phase gets {p.token_budget:,} tokens, "
                             f"less than one block of {p.block_tokens:,} tokens")
        if p.num_steps == 0:
            raise InputError(f"{source} is too small: the {p.phase} phase gets {p.num_blocks} blocks of "
                             f"{p.block_tokens} tokens, less than one optimizer step of {p.blocks_per_step} "
                             f"(optim.tokens_per_step={tokens_per_step:,})")
    return plans


def plan_schedule(*, stream_tokens: int, schedule: list[tuple[int, float]], tokens_per_step: int,
                  block_tokens: Any, max_tokens: int = 0, epochs: int = 1,
                  source: str = "the corpus") -> list[PhasePlan]:
    """Split the first D tokens of the stream into contiguous, disjoint phases, one per (K, share) of
    `schedule` in order (phases.schedule): phase i reads stream tokens [c_{i-1}·D, c_i·D), c_i the running sum
    of the shares, rounded to a token (patching.schedule_ends), the last phase up to D. Every phase has the same
    tokens per optimizer step; block_tokens(K) gives its row length."""
    d = data_tokens(stream_tokens, max_tokens, epochs, source)
    plans, start = [], 0
    for (k, _), end in zip(schedule, schedule_ends(schedule, d)):
        bt = block_tokens(k)
        plans.append(PhasePlan("patch" if k > 1 else "token", k, bt, start, end - start, tokens_per_step // bt))
        start = end
    for i, p in enumerate(plans):
        if p.num_steps == 0:
            raise InputError(f"{source} is too small: phase {i + 1} (K={p.k}) gets {p.token_budget:,} tokens, "
                             f"less than one optimizer step of {tokens_per_step:,} (optim.tokens_per_step)")
    return plans


def plan_from_config(cfg: Any, stream_tokens: int) -> list[PhasePlan]:
    """plan_phases (patch.k, patch.lam) or plan_schedule (phases.schedule) for a raypatch Config."""
    d = cfg.data
    if cfg.phases.schedule:
        return plan_schedule(stream_tokens=stream_tokens, schedule=cfg.schedule(),
                             tokens_per_step=cfg.optim.tokens_per_step, block_tokens=cfg.block_tokens,
                             max_tokens=d.max_tokens, epochs=d.epochs, source=f"data.shards={d.shards}")
    return plan_phases(stream_tokens=stream_tokens, seq_len=d.seq_len, k=cfg.patch.k, lam=cfg.patch.lam,
                       tokens_per_step=cfg.optim.tokens_per_step, max_tokens=d.max_tokens,
                       patch_tokens=d.patch_tokens, patch_block_tokens=cfg.patch_block_tokens,
                       patch_only=cfg.phases.patch_only, epochs=d.epochs, source=f"data.shards={d.shards}")


def worker_runs(plan: PhasePlan, rank: int, world_size: int, start_block: int = 0,
                end_block: int | None = None) -> Iterator[tuple[int, int]]:
    """(first block, count) runs that worker `rank` of `world_size` trains on, in order, from `start_block`."""
    b = plan.blocks_per_step
    # Each step's blocks in contiguous runs, as even as possible (optim.rows_per_counts): r·b//W to (r+1)·b//W.
    first, last = rank * b // world_size, (rank + 1) * b // world_size
    end = plan.num_blocks if end_block is None else min(end_block, plan.num_blocks)
    for s in range(start_block // b, -(-end // b)):
        lo = max(s * b + first, start_block)
        hi = min(s * b + last, end)
        if lo < hi:
            yield lo, hi - lo


def iter_blocks(stream: TokenStream, plan: PhasePlan, rank: int = 0, world_size: int = 1, start_block: int = 0,
                end_block: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """Without Ray: (block index, (block_tokens,) int32) for one worker, in order."""
    bt = plan.block_tokens
    for first, count in worker_runs(plan, rank, world_size, start_block, end_block):
        toks = stream.read_epochs(plan.start + first * bt, plan.start + (first + count) * bt).reshape(count, bt)
        for i in range(count):
            yield first + i, toks[i]


# --- the Ray Data pipeline ---------------------------------------------------------------------------

_STREAMS: dict[tuple[str, str, str, int], TokenStream] = {}


def _stream(shards_dir: str, split: str, cache_dir: str = "", cache_bytes: int = 0) -> TokenStream:
    # One open stream per Ray worker process: the manifest is read once, Parquet handles are reused.
    key = (shards_dir, split, cache_dir, cache_bytes)
    if key not in _STREAMS:
        _STREAMS[key] = TokenStream(shards_dir, split, cache_dir=cache_dir, cache_bytes=cache_bytes)
    return _STREAMS[key]


def _read_blocks(batch: dict[str, np.ndarray], *, shards_dir: str, split: str, plan: dict[str, Any], rank: int,
                 world_size: int, start_block: int, end_block: int | None, cache_dir: str = "",
                 cache_bytes: int = 0) -> dict[str, np.ndarray]:
    p = PhasePlan(**plan)
    stream = _stream(shards_dir, split, cache_dir, cache_bytes)
    blocks, rows = [], []
    for a, b in zip(batch["a"], batch["b"]):
        hi = int(b) if end_block is None else min(int(b), end_block)
        for first, count in worker_runs(p, rank, world_size, max(int(a), start_block), hi):
            toks = stream.read_epochs(p.start + first * p.block_tokens, p.start + (first + count) * p.block_tokens)
            rows.append(toks.reshape(count, p.block_tokens))  # (count, block_tokens)
            blocks.append(np.arange(first, first + count, dtype=np.int64))
    if not rows:
        return {"block": np.zeros(0, np.int64), "input_ids": np.zeros((0, p.block_tokens), np.int32)}
    return {"block": np.concatenate(blocks), "input_ids": np.concatenate(rows)}


def worker_dataset(plan: PhasePlan, shards_dir: str, rank: int, world_size: int, start_block: int = 0,
                   end_block: int | None = None, *, split: str = "train", read_cpus: float = 0.25,
                   tokens_per_task: int = 1 << 21, cache_dir: str = "", cache_bytes: int = 0) -> Any:
    """An ordered Ray Dataset of exactly worker `rank`'s blocks of `plan` from `start_block`.

    Rows: {'block': int64, 'input_ids': (block_tokens,) int32}. Each read task covers whole optimizer steps
    (about tokens_per_task tokens of this worker's share) and reads only the row groups it needs, from local
    disk or with range reads from a store; Ray Data runs the read tasks ahead of the step (the iterator's
    prefetch), which hides a store's first-byte latency behind training.
    """
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # blocks must reach the step in plan order
    ctx.enable_progress_bars = False  # the trainer logs data-wait itself; per-dataset bars are noise
    end = plan.num_blocks if end_block is None else min(end_block, plan.num_blocks)
    b = plan.blocks_per_step
    steps_per_task = max(1, tokens_per_task * world_size // (b * plan.block_tokens))
    tasks = []
    s = start_block // b
    while s * b < end:
        tasks.append({"a": s * b, "b": min((s + steps_per_task) * b, end)})
        s += steps_per_task
    if not tasks:
        tasks = [{"a": end, "b": end}]
    ds = ray.data.from_items(tasks, override_num_blocks=len(tasks))
    return ds.map_batches(
        _read_blocks, batch_size=1, batch_format="numpy", num_cpus=read_cpus,
        fn_kwargs={"shards_dir": str(shards_dir), "split": split, "plan": plan.to_dict(), "rank": rank,
                   "world_size": world_size, "start_block": start_block, "end_block": end, "cache_dir": cache_dir,
                   "cache_bytes": cache_bytes})


def val_rows(stream: TokenStream, seq_len: int, max_rows: int) -> np.ndarray:
    """Up to max_rows consecutive rows of T tokens from the start of a split: (N, T) int32."""
    n = min(max_rows, stream.total_tokens // seq_len)
    return stream.read(0, n * seq_len).reshape(n, seq_len)


def text_rows(path: str, tokenizer: str, seq_len: int, max_rows: int, text_field: str = "text") -> np.ndarray:
    """An evaluation set from raw documents (e.g. WikiText-103 test): tokenized with the run's tokenizer,
    separated as in training, concatenated and cut into up to max_rows rows of T tokens: (N, T) int32."""
    from raypatch.prepare import iter_documents
    from raypatch.tokenizer import load_tokenizer, separate, separator

    tok = load_tokenizer(tokenizer)
    sep = separator(tok)
    ids: list[int] = []
    for doc in iter_documents(path, text_field):
        ids += separate(tok.backend_tokenizer.encode(doc, add_special_tokens=False).ids, sep)
        if len(ids) >= max_rows * seq_len:
            break
    n = min(max_rows, len(ids) // seq_len)
    return np.asarray(ids[: n * seq_len], dtype=np.int32).reshape(n, seq_len)


def plan_dicts(plans: list[PhasePlan]) -> list[dict[str, Any]]:
    return [p.to_dict() for p in plans]
