"""The streaming patch-packer: exact blocks, λ split, worker split, resume. Run: pytest tests/test_data.py"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raypatch.data import (
    TokenStream,
    iter_blocks,
    plan_phases,
    worker_dataset,
    worker_runs,
)
from raypatch.safety import InputError
from raypatch.shards import check_vocab, load_manifest, manifest_checksum

T = 32


def source_stream(shards: str) -> np.ndarray:
    """The reference: every row of every train shard, concatenated, read without the packer."""
    m = json.loads((Path(shards) / "manifest.json").read_text())
    rows = []
    for s in m["splits"]["train"]["shards"]:
        rows += pq.read_table(Path(shards) / s["file"]).column(0).to_pylist()
    return np.array([t for r in rows for t in r], dtype=np.int32)


def plans_for(stream_tokens: int, k: int = 4, lam: float = 2 / 3, tokens_per_step: int = 1024, **kw):
    return plan_phases(stream_tokens=stream_tokens, seq_len=T, k=k, lam=lam, tokens_per_step=tokens_per_step, **kw)


def ray_blocks(plan, shards, rank, world, start=0, end=None) -> list[tuple[int, np.ndarray]]:
    ds = worker_dataset(plan, shards, rank, world, start, end, tokens_per_task=4096)
    out = []
    for b in ds.iter_batches(batch_size=7, batch_format="numpy"):
        out += [(int(g), x) for g, x in zip(b["block"], b["input_ids"])]
    return out


def test_stream_reads_any_range(shards):
    ref = source_stream(shards)
    s = TokenStream(shards)
    assert s.total_tokens == len(ref)
    rng = np.random.default_rng(0)
    for _ in range(50):
        a, b = sorted(rng.integers(0, len(ref), 2))
        assert np.array_equal(s.read(a, b), ref[a:b])
    # Ranges that straddle shard boundaries.
    for start in s.starts[1:]:
        assert np.array_equal(s.read(start - 5, start + 5), ref[start - 5:start + 5])


@pytest.mark.parametrize("k,lam", [(4, 2 / 3), (2, 0.5), (1, 0.0)])
def test_two_workers_reproduce_the_stream_prefix(shards, k, lam):
    ref = source_stream(shards)
    plans = plans_for(len(ref), k=k, lam=lam)
    assert [p.phase for p in plans] == (["patch", "token"] if lam else ["token"])
    pos = 0
    for p in plans:
        got = dict(ray_blocks(p, shards, 0, 2) + ray_blocks(p, shards, 1, 2))
        assert sorted(got) == list(range(p.num_blocks)), "every block exactly once"
        cat = np.concatenate([got[g] for g in range(p.num_blocks)])
        assert p.start == pos and np.array_equal(cat, ref[pos:pos + len(cat)])
        assert 0 <= p.tail_tokens < p.block_tokens  # the documented tail: shorter than one block
        pos = p.start + p.token_budget
    assert pos == len(ref)
    if lam:
        assert plans[0].token_budget == int(lam * len(ref)) and plans[0].block_tokens == k * T


def test_workers_get_disjoint_contiguous_runs_per_step(shards):
    p = plans_for(TokenStream(shards).total_tokens)[0]  # patch: 1024 / 128 = 8 rows per step
    r0 = [g for g, _ in ray_blocks(p, shards, 0, 2, end=16)]
    r1 = [g for g, _ in ray_blocks(p, shards, 1, 2, end=16)]
    assert r0 == [0, 1, 2, 3, 8, 9, 10, 11] and r1 == [4, 5, 6, 7, 12, 13, 14, 15]


def test_one_and_two_workers_deliver_the_same_blocks(shards):
    for p in plans_for(TokenStream(shards).total_tokens):
        one = ray_blocks(p, shards, 0, 1)
        two = ray_blocks(p, shards, 0, 2) + ray_blocks(p, shards, 1, 2)
        assert Counter(g for g, _ in one) == Counter(g for g, _ in two)
        d1, d2 = dict(one), dict(two)
        assert all(np.array_equal(d1[g], d2[g]) for g in d1)


@pytest.mark.parametrize("world_before,world_after", [(2, 2), (2, 1), (1, 2)])
def test_resume_at_any_block_yields_exactly_the_rest(shards, world_before, world_after):
    stream = TokenStream(shards)
    for p in plans_for(stream.total_tokens):
        for cursor in (0, 1, 5, p.blocks_per_step, 3 * p.blocks_per_step + 2, p.num_blocks - 1, p.num_blocks):
            before = [g for r in range(world_before) for g, _ in iter_blocks(stream, p, r, world_before, 0, cursor)]
            after = [g for r in range(world_after) for g, _ in iter_blocks(stream, p, r, world_after, cursor)]
            assert sorted(before + after) == list(range(p.num_blocks)), (p.phase, cursor)
        # And through Ray Data, from a cursor at a step boundary with a changed worker count.
        cursor = 2 * p.blocks_per_step
        after = ray_blocks(p, shards, 0, world_after, cursor) + (
            ray_blocks(p, shards, 1, world_after, cursor) if world_after == 2 else [])
        assert sorted(g for g, _ in after) == list(range(cursor, p.num_blocks))


@pytest.mark.parametrize("world", [3, 5, 7, 8, 40])
def test_uneven_worker_counts_split_every_step_exactly(world):
    """8 -> 5 workers with 32 rows a step: each step's blocks go to the ranks in contiguous runs that differ by
    at most one; every block of every step is trained once, by one rank, at the step it belongs to."""
    p = plans_for(100_000)[0]
    b = p.blocks_per_step
    owner: dict[int, int] = {}
    for r in range(world):
        for first, count in worker_runs(p, r, world, start_block=5):
            for g in range(first, first + count):
                assert g not in owner
                owner[g] = r
    assert sorted(owner) == list(range(5, p.num_blocks))
    for s in range(1, p.num_blocks // b):
        counts = Counter(owner[g] for g in range(s * b, (s + 1) * b))
        assert max(counts.values()) - min(counts.get(r, 0) for r in range(world)) <= 1


# --- bad input ------------------------------------------------------------------------------------


def test_corpus_too_small_for_one_block():
    with pytest.raises(InputError, match="too small: the patch phase gets 100 tokens, less than one block of 128"):
        plans_for(150, k=4, lam=2 / 3)
    with pytest.raises(InputError, match="less than one optimizer step"):
        plans_for(2000, k=4, lam=0.5, tokens_per_step=4096)
    with pytest.raises(InputError, match="data.max_tokens=5,000 exceeds the 1,000 train tokens"):
        plans_for(1000, max_tokens=5000)


def _copy(shards: str, dst: Path) -> Path:
    shutil.copytree(shards, dst)
    return dst


def test_manifest_that_no_longer_matches_the_shards(shards, tmp_path):
    d = _copy(shards, tmp_path / "s")
    shard = d / "train-00001.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different bytes
    shard.write_bytes(bytes(data))
    load_manifest(str(d))  # the cheap check (sizes) passes; reading the damaged row group does not
    with pytest.raises(InputError, match=r"train-00001.parquet: row group \d+ (does not match its hash|cannot be "
                                         r"decoded|holds)"):
        stream = TokenStream(str(d))
        stream.read(0, stream.total_tokens)
    with pytest.raises(InputError, match="train-00001.parquet: sha256 differs from the manifest"):
        load_manifest(str(d), verify="full")
    shard.write_bytes(bytes(data) + b"x")
    with pytest.raises(InputError, match=r"train-00001.parquet: \d+ bytes on disk, the manifest says"):
        load_manifest(str(d))
    shard.unlink()
    with pytest.raises(InputError, match="train-00001.parquet: listed in the manifest but missing"):
        TokenStream(str(d))


def test_shard_column_not_a_list_of_integers(shards, tmp_path):
    d = _copy(shards, tmp_path / "s")
    m = json.loads((d / "manifest.json").read_text())
    entry = m["splits"]["train"]["shards"][0]
    pq.write_table(pa.table({"input_ids": pa.array([["a", "b"]] * entry["rows"])}), d / entry["file"],
                   row_group_size=entry["rows"])
    entry["bytes"] = (d / entry["file"]).stat().st_size
    entry["row_group_tokens"], entry["row_group_hashes"] = [entry["tokens"]], ["0" * 32]
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(InputError, match="manifest.json: edited after `raypatch prepare`"):
        TokenStream(str(d))
    m["checksum"] = manifest_checksum(m)  # a manifest rewritten to match: the shard's footer still tells
    (d / "manifest.json").write_text(json.dumps(m))
    for read in (lambda: TokenStream(str(d)).read(0, 10), lambda: load_manifest(str(d), verify="meta")):
        with pytest.raises(InputError) as e:
            read()
        assert "train-00000.parquet: column 'input_ids' has type list<element: string>, expected list<int32>" \
            in str(e.value) and "\n" not in str(e.value)


def test_token_ids_beyond_the_model_vocab(shards):
    m = load_manifest(shards)
    check_vocab(m, 512, "data.shards")
    with pytest.raises(InputError, match="the shards' tokenizer has 512 tokens, more than model.vocab_size=256"):
        check_vocab(m, 256, "data.shards")


def test_multi_epoch_plan_repeats_the_stream(shards):
    stream = TokenStream(shards)
    n = stream.total_tokens
    with pytest.raises(InputError, match="set data.epochs >= 3"):
        plans_for(n, max_tokens=2 * n + 1)
    plans = plans_for(n, lam=0.5, epochs=4)
    assert plans[0].token_budget == 2 * n and plans[1].start == 2 * n  # patch: epochs 1-2, token: 3-4
    ref = source_stream(shards)
    p = plans[1]
    got = np.concatenate([x for _, x in iter_blocks(stream, p, 0, 1, 0, 200)])
    assert np.array_equal(got, np.tile(ref, 4)[p.start:p.start + len(got)])


def test_patch_only_and_token_only_plans():
    assert [p.phase for p in plans_for(100_000, patch_only=True)] == ["patch"]
    base = plans_for(100_000, lam=0.0)
    assert [p.phase for p in base] == ["token"] and base[0].start == 0
