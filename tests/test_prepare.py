"""Raw text -> Parquet token shards with Ray Data, and its one-line errors. Run: pytest tests/test_prepare.py"""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raypatch.prepare import InputError, prepare, resolve_inputs, train_tokenizer
from raypatch.tokenizer import load_tokenizer


def test_shards_and_manifest(shards, corpus, tokenizer_dir):
    m = json.loads((Path(shards) / "manifest.json").read_text())
    tok = load_tokenizer(tokenizer_dir)
    assert m["tokenizer"]["vocab_size"] == len(tok) == 512
    assert m["tokenizer"]["separator"] == {"id": tok.eos_token_id, "token": "<|endoftext|>", "position": "eos",
                                            "bos": None, "eos": tok.eos_token_id}
    assert m["sources"][0]["path"] == str(corpus.resolve()) and len(m["sources"][0]["sha256"]) == 64
    docs = [json.loads(line)["text"] for line in gzip.open(corpus, "rt")]
    assert m["documents"] == len(docs) == 60
    train = m["splits"]["train"]
    assert len(train["shards"]) > 3, "the fixture should span several shards"
    rows = []
    for s in train["shards"]:
        t = pq.read_table(Path(shards) / s["file"])
        assert t.schema.field("input_ids").type == pa.list_(pa.int32())
        assert t.num_rows == s["rows"] and sum(len(r) for r in t.column(0).to_pylist()) == s["tokens"]
        assert pq.ParquetFile(Path(shards) / s["file"]).num_row_groups == len(s["row_group_tokens"])
        rows += t.column(0).to_pylist()
    # One document per row, in input order, every 10th held out; the separator ends each document.
    train_docs = [d for i, d in enumerate(docs) if i % 10 != 9]
    assert len(rows) == len(train_docs)
    for row, doc in zip(rows[:5], train_docs[:5]):
        assert row == tok(doc, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert m["splits"]["val"]["rows"] == 6


def test_two_runs_are_byte_identical(corpus, tokenizer_dir, shards, tmp_path):
    prepare([str(corpus)], tokenizer_dir, str(tmp_path), shard_tokens=40_000, row_group_tokens=3_000,
            val_every=10, progress=False)
    a = json.loads((Path(shards) / "manifest.json").read_text())
    b = json.loads((tmp_path / "manifest.json").read_text())
    assert a == b
    for s in a["splits"]["train"]["shards"]:
        assert (Path(shards) / s["file"]).read_bytes() == (tmp_path / s["file"]).read_bytes()


def rows_of(d: Path, split: str) -> list[list[int]]:
    m = json.loads((d / "manifest.json").read_text())
    return [r for s in m["splits"][split]["shards"] for r in pq.read_table(d / s["file"]).column(0).to_pylist()]


def test_shuffled_prepare_permutes_train_documents_deterministically(corpus, tokenizer_dir, shards, tmp_path):
    kw = dict(shard_tokens=40_000, row_group_tokens=3_000, val_every=10, progress=False)
    prepare([str(corpus)], tokenizer_dir, str(tmp_path / "a"), shuffle_seed=1, **kw)
    prepare([str(corpus)], tokenizer_dir, str(tmp_path / "b"), shuffle_seed=1, **kw)
    prepare([str(corpus)], tokenizer_dir, str(tmp_path / "c"), shuffle_seed=2, **kw)
    plain, a, b, c = (rows_of(Path(d), "train") for d in (shards, tmp_path / "a", tmp_path / "b", tmp_path / "c"))
    # The same documents, each once, in another order; the same seed gives the same order, another seed another.
    assert sorted(a) == sorted(plain) and a != plain
    assert a == b and c != a and sorted(c) == sorted(plain)
    assert rows_of(tmp_path / "a", "val") == rows_of(Path(shards), "val")  # held-out docs chosen by input position
    m = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert m["shuffle_seed"] == 1 and m["splits"]["train"]["tokens"] == sum(map(len, a))
    assert not (tmp_path / "a" / ".shuffle.tmp").exists()  # spill files removed


def test_doc_shuffler_is_a_seeded_permutation(tmp_path):
    from raypatch.prepare import DocShuffler

    docs = [np.arange(i % 7 + 1, dtype=np.int32) + 100 * i for i in range(500)]

    def run(seed: int) -> list[int]:
        sh = DocShuffler(tmp_path / f"s{seed}", seed, buckets=8)
        for d in docs:
            sh.add(d)
        out = [int(x[0]) // 100 for x in sh.drain()]
        sh.close()
        return out

    a = run(0)
    assert sorted(a) == list(range(500)) and a == run(0) and a != run(1)
    # Not a near-identity: documents move far from their input position on average.
    assert np.mean(np.abs(np.array(a) - np.arange(500))) > 100


def test_txt_parquet_and_globs(tokenizer_dir, ray_local, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("def f(x):\n    return x + 1\n")
    with gzip.open(src / "b.txt.gz", "wt") as f:
        f.write("import os\nprint(os.getcwd())\n")
    pq.write_table(pa.table({"text": ["class A:\n    pass\n", "x = [1, 2, 3]\n"]}), src / "c.parquet")
    m = prepare([str(src / "*.txt*"), str(src / "c.parquet")], tokenizer_dir, str(tmp_path / "out"),
                val_every=0, progress=False)
    assert m["documents"] == 4 and m["splits"]["train"]["rows"] == 4
    assert [Path(s["path"]).name for s in m["sources"]] == ["a.txt", "b.txt.gz", "c.parquet"]


def test_trained_tokenizer_round_trips(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    text = "for i in range(10):\n    print(i)  # ünïcode"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


# --- bad input: one line, naming the file or field --------------------------------------------------


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


def test_missing_input_file(tmp_path):
    with pytest.raises(InputError) as e:
        resolve_inputs([str(tmp_path / "nope.jsonl")])
    assert "nope.jsonl: no such file" in _one_line(e)
    with pytest.raises(InputError, match="matches no file"):
        resolve_inputs([str(tmp_path / "*.jsonl")])


def test_unreadable_input_file(tokenizer_dir, ray_local, tmp_path):
    bad = tmp_path / "broken.jsonl.gz"
    bad.write_bytes(b"this is not gzip data at all")
    with pytest.raises(InputError) as e:
        prepare([str(bad)], tokenizer_dir, str(tmp_path / "out"), progress=False)
    assert "broken.jsonl.gz: cannot be decoded" in _one_line(e)


def test_jsonl_line_without_text_field(tokenizer_dir, ray_local, tmp_path):
    f = tmp_path / "docs.jsonl"
    f.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "no text"}) + "\n")
    with pytest.raises(InputError) as e:
        prepare([str(f)], tokenizer_dir, str(tmp_path / "out"), progress=False)
    assert f"{f}:2: no 'text' field" in _one_line(e)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_empty_corpus(tokenizer_dir, ray_local, tmp_path):
    f = tmp_path / "empty.jsonl"
    f.write_text(json.dumps({"text": ""}) + "\n")
    with pytest.raises(InputError) as e:
        prepare([str(f)], tokenizer_dir, str(tmp_path / "out"), progress=False)
    assert "corpus is empty" in _one_line(e)


def test_existing_output_is_not_overwritten(shards, corpus, tokenizer_dir):
    before = (Path(shards) / "manifest.json").read_bytes()
    with pytest.raises(InputError, match="already holds a shard set .pass --overwrite"):
        prepare([str(corpus)], tokenizer_dir, shards, progress=False)
    assert (Path(shards) / "manifest.json").read_bytes() == before


def test_tokenizer_dir_must_be_local(tmp_path):
    with pytest.raises(InputError, match="not a local Hugging Face tokenizer directory"):
        load_tokenizer(str(tmp_path / "meta-llama/Llama-2-7b"))


def test_bad_arguments_are_refused_before_a_cluster_starts(corpus, tokenizer_dir, tmp_path):
    """`start` (the CLI's init_ray) runs only once inputs, output and tokenizer directory are checked."""
    started = []
    for inputs, tok, out in [([str(tmp_path / "nope.jsonl")], tokenizer_dir, tmp_path / "a"),
                             ([str(corpus)], str(tmp_path / "no-tokenizer"), tmp_path / "b"),
                             ([str(corpus)], tokenizer_dir, Path(corpus).parent)]:
        with pytest.raises(InputError):
            prepare(inputs, tok, str(out), start=lambda: started.append(1))
    assert started == [] and not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_train_tokenizer_is_deterministic(corpus, tmp_path):
    a = train_tokenizer([str(corpus)], str(tmp_path / "a"), vocab_size=300)
    b = train_tokenizer([str(corpus)], str(tmp_path / "b"), vocab_size=300)
    assert (Path(a) / "tokenizer.json").read_bytes() == (Path(b) / "tokenizer.json").read_bytes()
    assert np.all(np.array(load_tokenizer(a)("x = 1")["input_ids"]) < 300)


@pytest.mark.parametrize("style", ["bos", "eos", "both", "none"])
def test_separator_is_what_the_tokenizer_does(style, corpus, tokenizer_dir, tmp_path):
    """Documents are separated as the tokenizer itself separates them (a probe, not add_bos_token): a row is
    exactly the tokenizer's own encoding with special tokens, and EOS is appended for one that adds nothing."""
    from raypatch.prepare import _Tokenize
    from raypatch.tokenizer import separator, tokenizer_info
    from tests.helpers import styled_tokenizer

    d = styled_tokenizer(tokenizer_dir, tmp_path / style, style)
    tok = load_tokenizer(d)
    if style == "bos":
        assert not getattr(tok, "add_bos_token", False), "transformers 5 hides it: the probe must not rely on it"
    sep = separator(tok)
    assert sep["position"] == {"none": "eos"}.get(style, style)
    docs = [json.loads(line)["text"] for line in gzip.open(corpus, "rt")][:3]
    batch = pa.table({"text": docs, "part": [0] * 3, "last": [True] * 3, "file": [0] * 3, "doc": [0, 1, 2],
                      "error": [""] * 3})  # the Arrow batch Ray Data hands the actor
    rows = _Tokenize(d, tokenizer_info(d)["separator"])(batch)["input_ids"].to_pylist()
    for row, doc in zip(rows, docs):
        reference = tok(doc)["input_ids"]  # what the tokenizer's own users train on
        assert row == (reference + [tok.eos_token_id] if style == "none" else reference)
    # A long document split into pieces keeps one BOS at its start and one EOS at its end.
    parts = pa.table({"text": ["a b", "c d"], "part": [0, 1], "last": [False, True], "file": [0, 0], "doc": [0, 0],
                      "error": ["", ""]})
    a, b = _Tokenize(d, sep)(parts)["input_ids"].to_pylist()
    assert (a[0] == tok.bos_token_id) == (style in ("bos", "both")) and b[0] != tok.bos_token_id
    assert (b[-1] == tok.eos_token_id) == (style != "bos") and a[-1] != tok.eos_token_id
    # Another separator is another tokenizer identity (shards made with one are refused for the other).
    assert len({tokenizer_info(styled_tokenizer(tokenizer_dir, tmp_path / f"x{s}", s))["fingerprint"]
                for s in ("bos", "eos", "both")}) == 3


def test_batched_encoding_matches_one_document_at_a_time(corpus, tokenizer_dir, monkeypatch):
    """The tokenizer actors encode batches without offsets (encode_batch_fast), cut into calls of at most
    PIECE_CHARS characters: the ids must be exactly those of encoding each document alone, at every cut."""
    import raypatch.prepare as P

    tok = P._Tokenize(tokenizer_dir, {"bos": None, "eos": 0})
    docs = [json.loads(line)["text"] for line in gzip.open(corpus, "rt")][:40]
    alone = [tok.backend.encode(d, add_special_tokens=False).ids for d in docs]
    calls = []
    real = tok.backend

    class Counting:  # counts the texts per call to the real tokenizer
        def encode_batch_fast(self, texts, **kw):
            calls.append(sum(map(len, texts)) if len(texts) > 1 else 0)
            return real.encode_batch_fast(texts, **kw)

    tok.backend = Counting()
    limit = sorted(map(len, docs))[len(docs) // 2] * 3  # a few documents per call, some alone
    monkeypatch.setattr(P, "PIECE_CHARS", limit)
    assert list(tok.encode(docs)) == alone
    assert len(calls) > 3 and max(calls) <= limit  # cut into calls, none over the bound
    monkeypatch.undo()
    tok.backend = real
    assert list(tok.encode(docs)) == alone and list(tok.encode([])) == []


def test_a_shard_is_proven_raypatchs_by_its_footer(tmp_path, monkeypatch):
    """ShardWriter marks each shard's footer with its own name (deterministically: the same rows give the same
    bytes); shard_is_own takes the mark, never a name or a manifest entry alone. A shard from before the mark
    counts only as exactly what raypatch's writer makes and its entry describes."""
    import raypatch.prepare as P
    from raypatch.shards import shard_is_own

    docs = [np.arange(n, dtype=np.int32) for n in (30, 50, 20, 70, 40)]

    def write(d: Path) -> dict:
        d.mkdir()
        w = P.ShardWriter(d, "train", shard_tokens=1 << 20, row_group_tokens=60)
        for x in docs:
            w.add(x)
        return w.close()["shards"][0]

    entry = write(tmp_path / "a")
    write(tmp_path / "b")
    a, b = tmp_path / "a" / entry["file"], tmp_path / "b" / entry["file"]
    assert a.read_bytes() == b.read_bytes()
    assert shard_is_own(str(a), a.name, None, None)  # the mark alone proves it
    assert not shard_is_own(str(a), "train-00001.parquet", entry, entry["bytes"])  # it names another file
    monkeypatch.setattr(P, "shard_mark", lambda name: {})
    old = write(tmp_path / "old")
    monkeypatch.undo()
    f = tmp_path / "old" / old["file"]
    assert shard_is_own(str(f), f.name, old, old["bytes"])
    assert not shard_is_own(str(f), f.name, None, None)  # without the mark: only with the entry it matches
    assert not shard_is_own(str(f), f.name, {**old, "sha256": "0" * 64}, old["bytes"])
    assert not shard_is_own(str(f), f.name, {**old, "row_group_tokens": [sum(old["row_group_tokens"])]},
                            old["bytes"])
    # The same token rows written by pyarrow's defaults (snappy, statistics, dictionary), its entry "fixed":
    # not raypatch's writer, so not raypatch's file.
    mine = tmp_path / "mine.parquet"
    pq.write_table(pq.read_table(f), mine, row_group_size=2)
    m = pq.ParquetFile(mine).metadata
    forged = {**old, "bytes": mine.stat().st_size, "sha256": hashlib.sha256(mine.read_bytes()).hexdigest(),
              "row_group_tokens": [m.row_group(g).column(0).num_values for g in range(m.num_row_groups)]}
    assert not shard_is_own(str(mine), mine.name, forged, forged["bytes"])
    (tmp_path / "notes.parquet").write_bytes(b"PAR1 not really")
    assert not shard_is_own(str(tmp_path / "notes.parquet"), "notes.parquet", old, 15)
