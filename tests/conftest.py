"""Shared fixtures: a real text sample, a BPE tokenizer trained on it, prepared shards and a local Ray cluster."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# tests/test_s3.py talks to a local S3 server: fake credentials, set before the session's Ray cluster starts so
# its workers have them too; whatever credentials the environment holds never reach a test.
os.environ |= {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_SESSION_TOKEN": "testing",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
os.environ.pop("AWS_PROFILE", None)

ROOT = Path(__file__).resolve().parents[1]
EMBEDDED = ROOT / "raypatch" / "corpus" / "python-docs-sample.jsonl.gz"
WIKITEXT = ROOT / "raypatch" / "corpus" / "wikitext103-test-sample.jsonl.gz"


def pytest_collection_modifyitems(items) -> None:
    """`ray` marks exactly the tests that start the session's Ray cluster (directly or through a fixture that
    does, such as `shards`), so `pytest -m "not ray and not slow"` is the seconds-long unit tier."""
    for item in items:
        if "ray_local" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ray)


@pytest.fixture(autouse=True)
def _unit_tests_start_no_ray(request):
    """A test not marked `ray` must not start a Ray cluster (it would also clash with the session's)."""
    import sys

    before = "ray" in sys.modules and sys.modules["ray"].is_initialized()
    yield
    if request.node.get_closest_marker("ray") is None and not before:
        assert not ("ray" in sys.modules and sys.modules["ray"].is_initialized()), \
            f"{request.node.nodeid} started Ray: give it the ray_local fixture"


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """60 documents of the embedded Python-docs sample (real text no one here wrote; it ships with the package,
    so a fresh clone runs every test): those ranked 80-139 by length (6-14 k characters, 0.57 M in all), in
    file order, as JSONL.gz."""
    docs = [json.loads(line)["text"] for line in gzip.open(EMBEDDED, "rt")]
    ranked = sorted(range(len(docs)), key=lambda i: (len(docs[i]), i))[80:140]
    out = tmp_path_factory.mktemp("corpus") / "docs.jsonl.gz"
    with gzip.open(out, "wt") as dst:
        for i in sorted(ranked):
            dst.write(json.dumps({"text": docs[i]}) + "\n")
    return out


@pytest.fixture(scope="session")
def tokenizer_dir(corpus, tmp_path_factory) -> str:
    from raypatch.prepare import train_tokenizer

    return train_tokenizer([str(corpus)], str(tmp_path_factory.mktemp("tok")), vocab_size=512)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray cluster for the session: 4 logical CPUs so Train workers leave room for Ray Data."""
    import ray

    from raypatch.cluster import start_local_ray

    start_local_ray(4, log_to_driver=False)  # its own dashboard port: safe beside other clusters on the host
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def shards(corpus, tokenizer_dir, ray_local, tmp_path_factory) -> str:
    """Prepared shards small enough that blocks cross row-group and shard boundaries."""
    from raypatch.prepare import prepare

    out = tmp_path_factory.mktemp("shards")
    prepare([str(corpus)], tokenizer_dir, str(out), shard_tokens=40_000, row_group_tokens=3_000, val_every=10,
            progress=False)
    return str(out)
