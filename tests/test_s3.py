"""Data, checkpoints and Tune on real S3 semantics: a local S3-compatible server (moto's standalone server, as Ray's
own storage tests use), started and stopped here on 127.0.0.1 with the fake credentials conftest.py sets (none
from the environment reach it). The fault drills (resets, 503s, a server restart, a worker killed while
streaming) are in tests/test_s3_faults.py (slow). Run: pytest tests/test_s3.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from raypatch.safety import InputError
from tests.helpers import step_losses
from tests.s3util import BUCKET, S3Server, keys
from tests.s3util import uri as s3_uri
from tests.test_train import reference, tiny, trained_steps  # noqa: F401 - reference is a fixture

pytestmark = pytest.mark.ray
SHARD_ARGS = {"shard_tokens": 40_000, "row_group_tokens": 3_000, "val_every": 10, "progress": False}
"""The `shards` fixture's settings (conftest.py): a set prepared here with them must be that set."""


@pytest.fixture(scope="module")
def s3_server():
    """(endpoint, boto3 client) of a moto server with one empty bucket; stopped after the module."""
    server = S3Server().start()
    client = server.client()
    client.create_bucket(Bucket=BUCKET)
    yield server.endpoint, client
    server.stop()


@pytest.fixture(scope="module")
def s3_shards(s3_server, corpus, tokenizer_dir, shards):
    """The `shards` set prepared straight to the bucket from the local corpus (local -> S3)."""
    from raypatch.prepare import prepare

    endpoint, _ = s3_server
    out = s3_uri(endpoint, "sets/from-local")
    prepare([str(corpus)], tokenizer_dir, out, **SHARD_ARGS)
    return out


def test_prepare_to_and_from_s3_gives_the_local_shard_set(s3_server, s3_shards, corpus, tokenizer_dir, shards,
                                                          tmp_path):
    """local -> S3 and S3 -> S3 (a glob on the bucket) make the shard set that local -> local makes: the same
    shard set id and the same token stream in both splits; the manifest comes last and the marker goes."""
    from raypatch.data import TokenStream
    from raypatch.prepare import prepare
    from raypatch.shards import load_manifest

    endpoint, client = s3_server
    client.upload_file(str(corpus), BUCKET, "raw/docs.jsonl.gz")
    s3_in = s3_uri(endpoint, "sets/from-s3")
    m = prepare([s3_uri(endpoint, "raw/*.jsonl.gz")], tokenizer_dir, s3_in, **SHARD_ARGS)
    local = load_manifest(shards)
    assert m["shards_id"] == load_manifest(s3_shards, verify="full")["shards_id"] == local["shards_id"]
    assert m["sources"][0]["sha256"] == local["sources"][0]["sha256"]
    for split in ("train", "val"):
        a, b, c = (TokenStream(x, split) for x in (shards, s3_shards, s3_in))
        assert a.total_tokens == b.total_tokens == c.total_tokens > 0
        ref = a.read(0, a.total_tokens)
        assert np.array_equal(ref, b.read(0, b.total_tokens)) and np.array_equal(ref, c.read(0, c.total_tokens))
    stored = [k.split("/", 2)[2] for k in keys(client, "sets/from-s3/") if not k.endswith("/")]
    assert sorted(stored) == sorted(m["files"])  # the set, its manifest, no marker, nothing else
    # The optional local cache: shards copied once, checked, read from disk; same stream.
    cached = TokenStream(s3_in, cache_dir=str(tmp_path / "cache"), cache_bytes=1 << 30)
    assert np.array_equal(cached.read(0, cached.total_tokens), TokenStream(shards).read(0, cached.total_tokens))
    assert sorted(f.name for f in (tmp_path / "cache").rglob("*.parquet")) == \
        sorted(s["file"] for s in m["splits"]["train"]["shards"])


def test_prepare_on_a_store_keeps_what_it_did_not_write(s3_server, corpus, tokenizer_dir, tmp_path):
    """An interrupted prepare leaves shards and the marker but no manifest, which no reader takes for a set; a
    rerun goes over it without --overwrite and leaves no stale object. A set is replaced only with --overwrite;
    a prefix holding anything raypatch did not write, or an output inside an input, is refused untouched."""
    from raypatch.prepare import PREPARE_MARKER, prepare
    from raypatch.shards import load_manifest

    endpoint, client = s3_server
    bad = tmp_path / "z-bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": broken\n')
    out = s3_uri(endpoint, "sets/interrupted")
    # Batches of 8 documents: the bad file's error reaches the driver after shards were written and uploaded.
    args = {**SHARD_ARGS, "shard_tokens": 10_000, "row_group_tokens": 1_000, "val_every": 0, "batch_size": 8}
    with pytest.raises(InputError, match=r"z-bad.jsonl:2: invalid JSON"):
        prepare([str(corpus), str(bad)], tokenizer_dir, out, **args)
    left = [k.rsplit("/", 1)[1] for k in keys(client, "sets/interrupted/")]
    assert PREPARE_MARKER in left and "manifest.json" not in left and any(k.endswith(".parquet") for k in left)
    with pytest.raises(InputError, match="no manifest.json"):
        load_manifest(out)
    m = prepare([str(corpus)], tokenizer_dir, out, **{**args, "shard_tokens": 1 << 20})  # fewer, larger shards
    stored = [k.split("/", 2)[2] for k in keys(client, "sets/interrupted/") if not k.endswith("/")]
    assert sorted(stored) == sorted(m["files"]), "stale shards of the interrupted run were left"
    with pytest.raises(InputError, match="already holds a shard set"):
        prepare([str(corpus)], tokenizer_dir, out, **args)
    client.put_object(Bucket=BUCKET, Key="sets/interrupted/notes.txt", Body=b"mine")
    with pytest.raises(InputError, match="holds notes.txt, which raypatch did not write"):
        prepare([str(corpus)], tokenizer_dir, out, overwrite=True, **args)
    assert load_manifest(out)["shards_id"] == m["shards_id"]  # refused before anything changed
    assert client.get_object(Bucket=BUCKET, Key="sets/interrupted/notes.txt")["Body"].read() == b"mine"
    client.upload_file(str(corpus), BUCKET, "in/docs.jsonl.gz")
    with pytest.raises(InputError, match="contains the input s3://raypatch-test/in/docs.jsonl.gz"):
        prepare([s3_uri(endpoint, "in/docs.jsonl.gz")], tokenizer_dir, s3_uri(endpoint, "in"), **args)
    with pytest.raises(InputError, match="the pattern matches no file"):
        prepare([s3_uri(endpoint, "in/*.parquet")], tokenizer_dir, s3_uri(endpoint, "x"), **args)
    with pytest.raises(InputError, match="the bucket 'no-such-bucket' does not exist"):
        prepare([str(corpus)], tokenizer_dir, s3_uri(endpoint, "x", bucket="no-such-bucket"), **args)


def test_training_streams_its_shards_from_s3_as_from_disk(reference, s3_shards, tmp_path):  # noqa: F811
    """The tiny run with data.shards on S3 (row-group range reads, no download) trains exactly the blocks of
    the same run on local disk, with the same per-step losses, bit for bit."""
    from raypatch.driver import fit

    _, ref = reference
    summary = fit(tiny(s3_shards, tmp_path, "s3data"))
    run, ref_run = Path(summary["run_dir"]), Path(ref["run_dir"])
    assert trained_steps(run) == trained_steps(ref_run)
    assert step_losses(run) == step_losses(ref_run)
    assert summary["final"] == ref["final"]
    assert (run / "hf" / "tokenizer.json").is_file()  # the tokenizer stored with the shards, fetched and checked
    # `raypatch evaluate --shards s3://...` reads the val split from the bucket: the run's own final loss.
    import argparse

    from raypatch.cli import evaluate_command

    out = evaluate_command(argparse.Namespace(model=summary["export"], shards=s3_shards, text="", seq_len=0,
                                              max_rows=tiny(s3_shards, tmp_path, "x").eval.max_rows))
    assert out["val"]["loss"] == pytest.approx(summary["final"]["val/loss"], abs=1e-4)


def test_bad_data_on_s3_is_refused_before_any_worker_starts(s3_server, s3_shards, tmp_path):
    from raypatch.driver import preflight

    endpoint, client = s3_server
    for shards, match in [(s3_uri(endpoint, "sets/none"), r"data.shards=s3://raypatch-test/sets/none: no "
                                                             r"manifest.json"),
                          (s3_uri(endpoint, "x", bucket="no-such-bucket"), "the bucket 'no-such-bucket' does not"),
                          (s3_shards.replace("endpoint_override=", "secret_key=x&endpoint_override="),
                           "carries credentials")]:
        with pytest.raises(InputError, match=match):
            preflight(tiny(shards, tmp_path, "bad"))
    # A shard gone from the store since prepare: named, before any worker.
    for k in keys(client, "sets/from-local/"):
        client.copy_object(Bucket=BUCKET, Key=k.replace("from-local", "gone"), CopySource=f"{BUCKET}/{k}")
    client.delete_object(Bucket=BUCKET, Key="sets/gone/train-00001.parquet")
    with pytest.raises(InputError, match=r"shard s3://raypatch-test/sets/gone/train-00001.parquet: listed in the "
                                         r"manifest but missing from the store"):
        preflight(tiny(s3_uri(endpoint, "sets/gone"), tmp_path, "bad"))


def test_a_shard_replaced_on_the_store_stops_the_run_naming_it(s3_server, s3_shards, tmp_path):
    """Other bytes of the same size under a shard's name pass the size and footer checks; the row group's hash
    stops the run at the first block it feeds, with one line naming the object."""
    from raypatch.driver import fit

    endpoint, client = s3_server
    for k in keys(client, "sets/from-local/"):
        client.copy_object(Bucket=BUCKET, Key=k.replace("from-local", "replaced"), CopySource=f"{BUCKET}/{k}")
    key = "sets/replaced/train-00000.parquet"
    data = bytearray(client.get_object(Bucket=BUCKET, Key=key)["Body"].read())
    data[100:110] = bytes(10 - i for i in range(10))  # inside the first row group's data page
    client.put_object(Bucket=BUCKET, Key=key, Body=bytes(data))
    with pytest.raises(InputError, match=r"shard s3://raypatch-test/sets/replaced/train-00000.parquet: row group 0 "):
        fit(tiny(s3_uri(endpoint, "sets/replaced"), tmp_path, "replaced"))


@pytest.fixture()
def home(tmp_path, monkeypatch):
    """Runs on S3 keep metrics, plots and exports under ~/raypatch-runs: a temporary home here."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_checkpoints_on_s3_survive_a_worker_kill_and_a_stopped_run(reference, shards, s3_server, home,  # noqa: F811
                                                                   tmp_path, monkeypatch):
    """A worker killed in the patch phase resumes from the S3 checkpoint; then the run is stopped with no retries
    left and run again: it resumes from S3 too. Blocks and losses equal the fault-free local run's."""
    from raypatch.config import replace
    from raypatch.driver import fit

    endpoint, client = s3_server
    _, ref = reference
    cfg = replace(tiny(shards, tmp_path, "s3run", "checkpoint.max_failures=1"),
                  checkpoint={"storage_path": s3_uri(endpoint, "runs")})
    # The kill at step 6 uses the one retry (the group restarts from the S3 checkpoint); the kill at 22 stops it.
    monkeypatch.setenv("RAYPATCH_KILL_RANK", "1")
    monkeypatch.setenv("RAYPATCH_KILL_AT_STEPS", "6,22")
    with pytest.raises(Exception):  # noqa: B017 - no retries left: the run stops
        fit(cfg)
    saved = sorted({k.split("/")[2] for k in keys(client, "runs/s3run/checkpoint-")})
    assert len(saved) >= 2, keys(client, "runs/s3run/")[:10]
    monkeypatch.delenv("RAYPATCH_KILL_AT_STEPS")
    summary = fit(cfg)  # the same name and storage: resumes from the newest checkpoint in the bucket
    run = Path(summary["run_dir"])
    assert run.is_relative_to(home)
    assert summary["checkpoint"].startswith(f"{BUCKET}/runs/s3run/checkpoint-")
    assert trained_steps(run) == trained_steps(Path(ref["run_dir"]))
    a, b = step_losses(run), step_losses(Path(ref["run_dir"]))
    assert a.keys() == b.keys()
    for s in a:
        assert a[s] == pytest.approx(b[s], rel=1e-4, abs=1e-5), s
    assert (run / "hf" / "model.safetensors").is_file() and (run / "metrics.jsonl").is_file()

    # `raypatch export` reads the checkpoint from the bucket; the same weights as the run's own export.
    from safetensors.torch import load_file

    from raypatch.cli import main

    name = summary["checkpoint"].rsplit("/", 1)[1]
    assert main(["export", "--checkpoint", s3_uri(endpoint, f"runs/s3run/{name}"), "--out", str(tmp_path / "x")]) == 0
    a, b = load_file(tmp_path / "x" / "model.safetensors"), load_file(run / "hf" / "model.safetensors")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    assert main(["export", "--checkpoint", s3_uri(endpoint, "runs/s3run/checkpoint-9999999"), "--out",
                 str(tmp_path / "y")]) == 2 and not (tmp_path / "y").exists()


def test_tune_stores_and_restores_its_experiment_on_s3(s3_shards, s3_server, home, tmp_path):
    """A search with its shards and its storage on S3: every trial streams the set from the bucket; raypatch's
    experiment record, Tune's run and every trial's checkpoints and trial.json land in the bucket; running the
    same name again continues it from those JSON records and retrains nothing (no new Tune run)."""
    from raypatch.tune import parse_space, run_search
    from tests.test_tune import BUDGET, base

    endpoint, client = s3_server
    cfg = base(s3_shards, tmp_path)
    storage = s3_uri(endpoint, "tune")
    space = parse_space(["patch.k=1,2"])
    rows = run_search(cfg, budget=BUDGET, space=space, name="s3search", storage=storage, concurrency=2)
    ok = sorted(r["trial"] for r in rows if r.get("val_loss") is not None)
    assert len(ok) == 2 and all(BUDGET - 512 < r["positions"] <= BUDGET for r in rows), rows
    stored = keys(client, "tune/s3search/")
    assert any(k.endswith("/trial.json") for k in stored) and any("/checkpoint-" in k for k in stored)
    assert "tune/s3search/experiment.json" in stored and any(k.startswith("tune/s3search/tune-") for k in stored)
    again = run_search(cfg, budget=BUDGET, space=space, name="s3search", storage=storage, concurrency=2)
    assert keys(client, "tune/s3search/") == stored  # nothing written: every trial was taken from its record
    assert sorted(r["trial"] for r in again) == ok
    assert [r["val_loss"] for r in sorted(again, key=lambda r: r["trial"])] == \
        [r["val_loss"] for r in sorted(rows, key=lambda r: r["trial"])]
