"""storage.py against a real S3 endpoint (moto's server on 127.0.0.1) and a fault proxy in front of it: paths and
URIs, retries with backoff that say so, the one-line errors for a missing bucket, bad credentials and denied
access, and the local shard cache. No Ray. Run: pytest tests/test_storage.py
"""

from __future__ import annotations

import pytest

from raypatch import storage
from raypatch.safety import InputError
from tests.s3util import BUCKET, FaultProxy, S3Server, iam_user, uri


@pytest.fixture(scope="module")
def s3():
    server = S3Server().start()
    server.client().create_bucket(Bucket=BUCKET)
    proxy = FaultProxy(server.endpoint)
    yield server, proxy
    proxy.close()
    server.stop()


def test_paths_and_uris_are_joined_and_compared_alike(tmp_path):
    u = "s3://b/pre/fix?endpoint_override=127.0.0.1:9&scheme=http"
    assert storage.join(u, "shards", "manifest.json") == "s3://b/pre/fix/shards/manifest.json?endpoint_override=" \
        "127.0.0.1:9&scheme=http"
    assert storage.display(u) == "s3://b/pre/fix"
    assert storage.same_place("s3://b/pre", "s3://b/pre/fix/x.jsonl?scheme=http") == "contains"
    assert storage.same_place("s3://b/pre/fix/out", u) == "lies inside"
    assert storage.same_place("s3://b/pre/fixed", u) is None  # a prefix of the name, not a parent
    assert storage.same_place(str(tmp_path / "a"), "s3://b/a") is None
    assert storage.same_place(str(tmp_path), str(tmp_path / "x")) == "contains"
    with pytest.raises(InputError, match="carries credentials"):
        storage.info("s3://b/k?secret_key=abc&endpoint_override=127.0.0.1:9")
    with pytest.raises(InputError, match="unknown URI option"):
        storage.info("s3://b/k?endpoint=127.0.0.1:9")


def test_local_and_store_go_through_the_same_calls(s3, tmp_path):
    server, _ = s3
    for base in (str(tmp_path / "d"), uri(server.endpoint, "same")):
        storage.write_text(storage.join(base, "a", "x.jsonl"), "one")
        storage.write_bytes(storage.join(base, "a", "y.jsonl.gz"), b"\x1f\x8b")
        storage.write_text(storage.join(base, "b.txt"), "two")
        assert storage.list_files(base) == {"a/x.jsonl": 3, "a/y.jsonl.gz": 2, "b.txt": 3}
        assert [storage.display(p).rsplit("/", 2)[-2:] for p in storage.glob(storage.join(base, "a", "*.jsonl*"))] \
            == [["a", "x.jsonl"], ["a", "y.jsonl.gz"]]
        assert storage.glob(storage.join(base, "*.txt")) == [storage.join(base, "b.txt")]
        assert storage.read_text(storage.join(base, "b.txt")) == "two"
        assert storage.read_text(storage.join(base, "none.txt")) is None
        assert storage.open_input(storage.join(base, "a", "x.jsonl")).read_at(2, 1) == b"ne"
        storage.delete_file(storage.join(base, "b.txt"))
        storage.delete_file(storage.join(base, "b.txt"))  # already gone: nothing happens
        assert "b.txt" not in storage.list_files(base)
    assert not list(tmp_path.rglob(".*tmp*"))  # atomic local writes leave no temporary file


def test_transient_faults_are_retried_with_one_line_each(s3, capfd, monkeypatch):
    """Connection resets and 503 SlowDown through the proxy: the operation succeeds, and says it retried once
    and recovered; a store that stays down ends in one error naming the object."""
    server, proxy = s3
    direct = uri(server.endpoint, "faults/obj.bin")
    storage.write_bytes(direct, b"x" * 1000)
    via = uri(proxy.endpoint, "faults/obj.bin")
    capfd.readouterr()
    proxy.resets = 3
    assert storage.read_bytes(via) == b"x" * 1000
    err = capfd.readouterr().err.splitlines()
    assert len([e for e in err if "retrying with backoff" in e]) == 1, err
    assert len([e for e in err if "recovered after 4 attempts" in e]) == 1, err
    assert all("s3://raypatch-test/faults/obj.bin" in e and "endpoint_override" not in e for e in err)
    proxy.slow_down(1.0)
    assert storage.open_input(via).read_at(10, 990) == b"x" * 10
    assert storage.list_files(uri(proxy.endpoint, "faults")) == {"obj.bin": 1000}
    assert "recovered" in capfd.readouterr().err
    monkeypatch.setattr(storage, "RETRY_SECONDS", 1.5)
    proxy.down = True
    try:
        with pytest.raises(InputError, match=r"storage s3://raypatch-test/faults/obj.bin: cannot read after \d+ "
                                             r"attempts over \d+ s \(.*NETWORK_CONNECTION"):
            storage.read_bytes(via)
    finally:
        proxy.down = False


def test_missing_bucket_and_object_are_one_line_each(s3):
    server, _ = s3
    with pytest.raises(InputError, match="the bucket 'no-such-bucket' does not exist"):
        storage.list_files(uri(server.endpoint, "x", bucket="no-such-bucket"))
    with pytest.raises(InputError, match=r"s3://raypatch-test/none/x.bin: no such object"):
        storage.read_bytes(uri(server.endpoint, "none/x.bin"))


def test_wrong_credentials_and_denied_access_are_named(monkeypatch):
    """A server that checks signatures: the right key reads, a wrong key and a user without permission get
    one line each that says so (and never prints a key)."""
    server = S3Server().start()
    try:
        server.client().create_bucket(Bucket=BUCKET)
        good, nothing = iam_user(server, "good", allow=True), iam_user(server, "nothing", allow=False)
        server.client().put_object(Bucket=BUCKET, Key="k/obj", Body=b"data")
        server.require_auth()
        base = uri(server.endpoint, "k")
        monkeypatch.setenv("AWS_SESSION_TOKEN", "")
        monkeypatch.delenv("AWS_SESSION_TOKEN")
        for k, v in good.items():
            monkeypatch.setenv(k, v)
        assert storage.list_files(base) == {"obj": 4}
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG0")
        with pytest.raises(InputError, match="rejects these credentials") as e:
            storage.list_files(base)
        assert "AKIAWRONG" not in str(e.value) and good["AWS_SECRET_ACCESS_KEY"] not in str(e.value)
        with pytest.raises(InputError, match="access denied"):
            storage.read_bytes(storage.join(base, "obj"))
        for k, v in nothing.items():
            monkeypatch.setenv(k, v)
        with pytest.raises(InputError, match="access denied while trying to list"):
            storage.list_files(base)
    finally:
        server.stop()


def test_the_cache_keeps_checked_copies_under_a_cap(s3, tmp_path):
    import hashlib

    server, _ = s3
    blobs = {f"c/{i}.bin": bytes([i]) * 400 for i in range(3)}
    for k, v in blobs.items():
        storage.write_bytes(uri(server.endpoint, k), v)
    cache = tmp_path / "cache"
    got = []
    for k, v in blobs.items():
        got.append(storage.cached(uri(server.endpoint, k), cache, "set1", size=len(v),
                                  sha=hashlib.sha256(v).hexdigest(), max_bytes=1000))
        assert got[-1] is not None and got[-1].read_bytes() == v
    assert sum(f.stat().st_size for f in cache.rglob("*") if f.is_file()) <= 1000  # the oldest one was evicted
    assert not got[0].exists() and got[2].exists()
    assert storage.cached(uri(server.endpoint, "c/0.bin"), cache, "set1", size=400, sha="0", max_bytes=100) is None
    with pytest.raises(InputError, match="sha256 differs"):
        storage.cached(uri(server.endpoint, "c/1.bin"), cache, "set2", size=400, sha="0" * 64, max_bytes=1000)
