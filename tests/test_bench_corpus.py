"""Benchmark studies pair runs only on the same corpus text: benchmarks/_common.py's corpus_identity and same_corpus,
which regime.py --append and schedules.py call before training anything."""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import _common as C  # noqa: E402

VERSIONS = {"linux-doc-6.1": "6.1.158-1", "perl-doc": "5.36.0-7+deb12u4"}


def corpus(d: Path, texts: list[str], mtime: int, versions: dict[str, str]) -> Path:
    d.mkdir()
    p = d / "corpus.jsonl.gz"
    with open(p, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=mtime) as gz:
        gz.write("".join(json.dumps({"text": t}) + "\n" for t in texts).encode())
    (d / "stats.json").write_text(json.dumps({"versions": versions}))
    return p


def test_identity_is_the_text_not_the_gzip_file(tmp_path):
    a = corpus(tmp_path / "a", ["one page", "two pages"], 1, VERSIONS)
    b = corpus(tmp_path / "b", ["one page", "two pages"], 2, VERSIONS)
    assert a.read_bytes() != b.read_bytes()  # the header's build time differs
    ia, ib = C.corpus_identity(a), C.corpus_identity(b)
    assert ia == ib and ia["debian_versions"] == VERSIONS
    assert ia["text_sha256"] != C.corpus_identity(corpus(tmp_path / "c", ["one page", "two pages!"], 1, VERSIONS))[
        "text_sha256"]


def test_same_corpus_names_what_differs(tmp_path):
    old = C.corpus_identity(corpus(tmp_path / "old", ["page"], 0, VERSIONS))
    moved = {**VERSIONS, "linux-doc-6.1": "6.1.192-3"}
    new = C.corpus_identity(corpus(tmp_path / "new", ["page, revised"], 0, moved))
    study = {"corpus_tokens": 1000, "corpus_identity": old}
    assert C.same_corpus(study, old, 1000) == ""
    why = C.same_corpus(study, new, 1000)
    assert "other text (sha256)" in why and "linux-doc-6.1 6.1.158-1 -> 6.1.192-3" in why and "perl-doc" not in why
    assert "1,000 train tokens there, 1,200 here" in C.same_corpus(study, new, 1200)
    # A study from before identities were recorded: only its token count can be compared, and the reason says so.
    legacy = {"corpus_tokens": 1000}
    assert C.same_corpus(legacy, new, 1000) == ""
    assert "recorded no package versions" in C.same_corpus(legacy, new, 999)
