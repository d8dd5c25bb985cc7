"""Where data and checkpoints live: local paths and URIs (s3://, gs://, abfs://, ...) behind one set of functions.

prepare (its inputs and its shard set), the packer (range reads of row groups), the driver's pre-flight checks,
checkpoints and Tune call these, so that no other module branches on a URI. Everything goes through pyarrow's
filesystems: a local path through `LocalFileSystem`, `s3://bucket/key?endpoint_override=host:port&scheme=http
&region=r` through an `S3FileSystem` built here, any other scheme through `FileSystem.from_uri` (GCS and Azure
where pyarrow was built with them; only local disk and S3 are tested here).

- **Credentials** come only from the usual chain (environment, profile, instance or workload identity); a URI
  that carries keys is refused, so none ends up in a config, a manifest or a log.
- **Retries.** The S3 client's own silent retries are off; `retrying` retries transient failures (connection
  refused or reset, timeouts, HTTP 500/503, SlowDown) with exponential backoff for up to RETRY_SECONDS, says so
  in one line on stderr when it first retries an operation and when it recovers, and then raises an InputError
  naming the object. Missing buckets, denied access and bad credentials are not retried: one line each.
- **Atomic publish.** `write_bytes` on local disk writes a temporary sibling and renames it; on an object store
  one PUT is atomic (a reader sees the old object or the new one). A set of files is published by writing its
  index last (shards.MANIFEST for a shard set, meta.json for a checkpoint).
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import os
import random
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlsplit

from raypatch.safety import InputError

T = TypeVar("T")

RETRY_SECONDS = float(os.environ.get("RAYPATCH_STORAGE_RETRY_S", "120"))
"""How long a transient failure is retried before the operation fails (RAYPATCH_STORAGE_RETRY_S)."""
S3_OPTIONS = {"endpoint_override", "scheme", "region", "connect_timeout", "request_timeout"}
"""The query keys an s3:// URI may carry (the convention Ray Train's storage_path uses too)."""
CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE",
                  "GOOGLE_APPLICATION_CREDENTIALS", "AZURE_CLIENT_ID")
STREAM_BUFFER = 8 << 20
"""Bytes each sequential read of an object asks for at once (open_stream)."""
SECRET_KEYS = {"access_key", "secret_key", "session_token", "aws_access_key_id", "aws_secret_access_key",
               "aws_session_token", "account_key", "sas_token", "token", "password"}

# Substrings of pyarrow/AWS SDK messages that mark a failure worth retrying.
TRANSIENT = ("SLOW_DOWN", "SlowDown", "SERVICE_UNAVAILABLE", "ServiceUnavailable", "INTERNAL_FAILURE", "InternalError",
             "THROTTLING", "Throttling", "REQUEST_TIMEOUT", "RequestTimeout", "HTTP status 500", "HTTP status 502",
             "HTTP status 503", "HTTP status 504", "NETWORK_CONNECTION", "curlCode", "Could not connect",
             "Connection refused", "Connection reset", "connection reset", "Broken pipe", "timed out",
             "Timeout was reached", "Recv failure", "Send failure", "Empty reply")
DENIED = ("ACCESS_DENIED", "AccessDenied", "Access Denied", "HTTP status 403", "Forbidden")
BAD_KEYS = ("INVALID_ACCESS_KEY_ID", "InvalidAccessKeyId", "SIGNATURE_DOES_NOT_MATCH", "SignatureDoesNotMatch",
            "InvalidToken", "ExpiredToken", "UNRECOGNIZED_CLIENT")
NO_BUCKET = ("NO_SUCH_BUCKET", "NoSuchBucket", "Bucket does not exist", "bucket does not exist")
NO_CREDENTIALS = ("No credentials", "Unable to find credentials", "MISSING_AUTHENTICATION_TOKEN")


def is_uri(path: str | Path) -> bool:
    """True for `scheme://...` (file:// included), False for a plain local path."""
    return "://" in str(path)


def split(uri: str) -> tuple[str, str]:
    """('s3://bucket/key', 'endpoint_override=...') of a URI; the query holds filesystem options."""
    head, _, query = str(uri).partition("?")
    return head, query


def join(base: str | Path, *parts: str) -> str:
    """A path under `base`: a local path, or a URI whose query (filesystem options) stays last."""
    if not is_uri(base):
        return str(Path(base, *parts))
    head, query = split(str(base))
    return "/".join([head.rstrip("/"), *(p.strip("/") for p in parts)]) + (f"?{query}" if query else "")


def display(path: str | Path) -> str:
    """A path for messages: a URI without its query (endpoint options are noise in an error line)."""
    return split(str(path))[0] if is_uri(path) else str(path)


def same_place(a: str | Path, b: str | Path) -> str | None:
    """How output `a` relates to input `b`: 'is', 'contains', 'lies inside' or None (local paths resolved,
    URIs compared by scheme, bucket and key; a local path and a URI never overlap)."""
    if is_uri(a) != is_uri(b):
        return None
    if is_uri(a):
        pa_, pb = (split(str(x))[0].rstrip("/") for x in (a, b))
        if pa_ == pb:
            return "is"
        if pb.startswith(pa_ + "/"):
            return "contains"
        if pa_.startswith(pb + "/"):
            return "lies inside"
        return None
    o, i = (Path(x).expanduser().resolve() for x in (a, b))
    return "is" if o == i else "contains" if i.is_relative_to(o) else "lies inside" if o.is_relative_to(i) else None


def check_not_overlapping(out: str | Path, inputs: Iterable[tuple[str, str | Path]], flag: str) -> None:
    """Refuse an output path that is, contains or lies inside an input (given as (description, path) pairs);
    local paths and URIs alike (same_place)."""
    for what, p in inputs:
        if not p:
            continue
        rel = same_place(out, p)
        if rel is not None:
            shown = display(p) if "://" in str(p) else Path(p).expanduser().resolve()
            raise InputError(f"{flag} {display(out)}: {rel} the {what} {shown}; choose an output path outside "
                             f"every input")


# --- filesystems --------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=32)
def _filesystem(scheme: str, netloc: str, query: str, identity: tuple[str, ...]) -> Any:
    """One filesystem per store, options and credential identity (`identity`: the environment variables that
    pick the credentials, so rotated keys get a new client)."""
    import pyarrow.fs as pafs

    opts = dict(parse_qsl(query, keep_blank_values=True))
    secret = sorted(SECRET_KEYS & {k.lower() for k in opts})
    if secret:
        raise InputError(f"storage {scheme}://{netloc}: the URI carries credentials ({', '.join(secret)}); give "
                         f"them through the environment, a profile or the node's identity, never in a path")
    if scheme == "s3":
        unknown = sorted(set(opts) - S3_OPTIONS)
        if unknown:
            raise InputError(f"storage s3://{netloc}: unknown URI option(s) {', '.join(unknown)} (known: "
                             f"{', '.join(sorted(S3_OPTIONS))})")
        kw: dict[str, Any] = {k: opts[k] for k in ("endpoint_override", "scheme", "region") if k in opts}
        kw["connect_timeout"] = float(opts.get("connect_timeout", 5))
        kw["request_timeout"] = float(opts.get("request_timeout", 30))
        # One attempt per call: `retrying` retries, with backoff and a line that says so, never silently.
        return pafs.S3FileSystem(retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=1), **kw)
    fs, _ = pafs.FileSystem.from_uri(f"{scheme}://{netloc}/" + (f"?{query}" if query else ""))
    return fs


def resolve(path: str | Path) -> tuple[Any, str]:
    """(pyarrow filesystem, path inside it) for a local path or a URI."""
    import pyarrow.fs as pafs

    p = str(path)
    if not is_uri(p):
        return pafs.LocalFileSystem(), str(Path(p).expanduser().resolve())
    head, query = split(p)
    u = urlsplit(head)
    if u.scheme == "file":
        return pafs.LocalFileSystem(), u.path
    try:
        fs = _filesystem(u.scheme, u.netloc, query, tuple(os.environ.get(k, "") for k in CREDENTIAL_ENV))
    except InputError:
        raise
    except (OSError, ValueError, TypeError) as e:
        raise InputError(f"storage {display(p)}: cannot open its filesystem ({_first_line(e)})") from None
    if u.scheme == "s3":
        return fs, f"{u.netloc}{u.path}".rstrip("/")
    _, inner = pafs.FileSystem.from_uri(head)
    return fs, inner


# --- errors and retries ---------------------------------------------------------------------------------


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return (lines[0] if lines else type(e).__name__)[:300]


def classify(e: BaseException) -> str:
    """'transient', 'no_bucket', 'denied', 'credentials', 'missing' or 'other' for an error from a filesystem."""
    msg = str(e)
    if isinstance(e, FileNotFoundError) or "NoSuchKey" in msg or "NO_SUCH_KEY" in msg or "Path does not exist" in msg:
        return "no_bucket" if any(s in msg for s in NO_BUCKET) else "missing"
    if any(s in msg for s in NO_BUCKET):
        return "no_bucket"
    if any(s in msg for s in BAD_KEYS) or any(s in msg for s in NO_CREDENTIALS):
        return "credentials"
    if any(s in msg for s in DENIED):
        return "denied"
    if isinstance(e, (ConnectionError, TimeoutError)) or any(s in msg for s in TRANSIENT):
        return "transient"
    return "other"


def storage_error(path: str, op: str, e: BaseException) -> InputError:
    """The one-line error for a failed storage operation on `path`."""
    where, kind = display(path), classify(e)
    if kind == "no_bucket":
        bucket = urlsplit(where).netloc if is_uri(where) else where
        return InputError(f"storage {where}: the bucket '{bucket}' does not exist (or this endpoint does not "
                          f"serve it)")
    if kind == "credentials":
        return InputError(f"storage {where}: the store rejects these credentials ({_first_line(e)}); raypatch "
                          f"takes them from the environment, the profile or the node's identity")
    if kind == "denied":
        return InputError(f"storage {where}: access denied while trying to {op} (the credentials in use are "
                          f"not accepted or lack the permission; raypatch takes them from the environment, the "
                          f"profile or the node's identity)")
    if kind == "missing":
        return InputError(f"storage {where}: no such object")
    return InputError(f"storage {where}: cannot {op} ({_first_line(e)})")


def _say(msg: str) -> None:
    sys.stderr.write(f"raypatch: storage: {msg}\n")
    sys.stderr.flush()


RETRIES = {"retried": 0, "recovered": 0}
"""Counts for this process (benchmarks and tests read them)."""


class Backoff:
    """The retry state of one operation: exponential backoff with jitter for up to RETRY_SECONDS, one line on
    stderr at the first retry and one at recovery, and the InputError naming the object at the end."""

    def __init__(self, path: str, op: str, deadline_s: float | None = None, own_errors: bool = False) -> None:
        self.path, self.op, self.own_errors = str(path), op, own_errors
        self.budget = RETRY_SECONDS if deadline_s is None else deadline_s
        self.t0 = time.monotonic()
        self.attempt = 0

    def failed(self, e: BaseException) -> None:
        """After a failed attempt: sleep before the next one, or raise (not transient, or out of time). With
        own_errors, a failure that is not about the store (a decoding error) is raised as it is."""
        kind = classify(e)
        if kind == "other" and self.own_errors:
            raise e
        if kind != "transient":
            raise storage_error(self.path, self.op, e) from None
        self.attempt += 1
        waited = time.monotonic() - self.t0
        if waited >= self.budget:
            raise InputError(f"storage {display(self.path)}: cannot {self.op} after {self.attempt} attempts over "
                             f"{waited:.0f} s ({_first_line(e)})") from None
        if self.attempt == 1:
            RETRIES["retried"] += 1
            _say(f"{self.op} {display(self.path)}: {_first_line(e)}; retrying with backoff for up to "
                 f"{self.budget:.0f} s")
        time.sleep(min(5.0, 0.1 * 2 ** min(self.attempt, 10)) * (0.5 + random.random() / 2))

    def succeeded(self) -> None:
        if self.attempt:
            RETRIES["recovered"] += 1
            _say(f"{self.op} {display(self.path)}: recovered after {self.attempt + 1} attempts "
                 f"({time.monotonic() - self.t0:.1f} s)")
            self.attempt = 0


def retrying(path: str, op: str, fn: Callable[[], T], *, on_retry: Callable[[], None] | None = None,
             deadline_s: float | None = None, own_errors: bool = False) -> T:
    """fn(), retried while it fails transiently (Backoff). `on_retry` runs before each new attempt (reopen a
    file whose connection broke)."""
    backoff = Backoff(path, op, deadline_s, own_errors)
    while True:
        try:
            out = fn()
        except InputError:
            raise
        except (OSError, ValueError) as e:
            backoff.failed(e)
            if on_retry is not None:
                try:
                    on_retry()
                except (OSError, ValueError):
                    pass  # the next attempt fails the same way and is counted
            continue
        backoff.succeeded()
        return out


# --- operations -------------------------------------------------------------------------------------------


def info(path: str | Path) -> Any | None:
    """pyarrow FileInfo of `path`, or None when nothing is there (a missing bucket is an error)."""
    import pyarrow.fs as pafs

    fs, p = resolve(path)
    fi = retrying(str(path), "look up", lambda: fs.get_file_info(p))
    return None if fi.type == pafs.FileType.NotFound else fi


def is_file(path: str | Path) -> bool:
    import pyarrow.fs as pafs

    fi = info(path)
    return fi is not None and fi.type == pafs.FileType.File


def is_dir(path: str | Path) -> bool:
    """A local directory, or a URI prefix under which at least one object exists (object stores have no
    directories of their own)."""
    import pyarrow.fs as pafs

    if not is_uri(path):
        return Path(path).expanduser().is_dir()
    fi = info(path)
    if fi is not None:
        return fi.type == pafs.FileType.Directory
    return bool(list_files(path))


def list_files(path: str | Path) -> dict[str, int]:
    """Every file under `path` (relative name -> size in bytes), recursively, in one listing; {} when none."""
    import pyarrow.fs as pafs

    fs, p = resolve(path)

    def ls() -> list[Any]:
        try:  # allow_not_found would hide a missing bucket too
            return fs.get_file_info(pafs.FileSelector(p, recursive=True))
        except FileNotFoundError:
            return []

    out = {}
    for fi in retrying(str(path), "list", ls):
        if fi.type == pafs.FileType.File:
            out[fi.path[len(p):].lstrip("/")] = fi.size
    return dict(sorted(out.items()))


def glob(pattern: str) -> list[str]:
    """The files a glob matches: local (glob.glob) or a URI (the listing of the prefix before the first
    wildcard, filtered with fnmatch, where * does not cross '/'); sorted."""
    import glob as globmod

    if not is_uri(pattern):
        return sorted(globmod.glob(pattern))
    head, query = split(pattern)
    cut = min((i for i, c in enumerate(head) if c in "*?["), default=len(head))
    base = head[:head.rfind("/", 0, cut)]
    rest = head[len(base) + 1:]
    suffix = f"?{query}" if query else ""
    names = list_files(base + suffix)
    return [f"{base}/{n}{suffix}" for n in names
            if fnmatch.fnmatchcase(n, rest) and n.count("/") == rest.count("/")]


def read_bytes(path: str | Path) -> bytes:
    fs, p = resolve(path)

    def read() -> bytes:
        with fs.open_input_stream(p, compression=None) as f:
            return f.read()

    return retrying(str(path), "read", read)


def read_text(path: str | Path) -> str | None:
    """The text of a small file, or None when it does not exist."""
    if info(path) is None:
        return None
    return read_bytes(path).decode()


def write_bytes(path: str | Path, data: bytes) -> None:
    """Publish `data` at `path` atomically: a local temporary sibling renamed into place, or one PUT."""
    if not is_uri(path):
        p = Path(path).expanduser()
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, p)
        finally:
            tmp.unlink(missing_ok=True)
        return
    fs, p = resolve(path)

    def put() -> None:
        with fs.open_output_stream(p, compression=None) as f:
            f.write(data)

    retrying(str(path), "write", put)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode())


def open_input(path: str | Path) -> Any:
    """A random-access pyarrow file (range reads on an object store: a Parquet footer or one row group)."""
    fs, p = resolve(path)
    return retrying(str(path), "open", lambda: fs.open_input_file(p))


def open_stream(path: str | Path) -> Any:
    """A sequential pyarrow input stream, buffered: without a buffer each small read (a line, a gzip member's
    header) is its own ranged GET on an object store, 50x slower than local disk on loopback already."""
    fs, p = resolve(path)
    return retrying(str(path), "open", lambda: fs.open_input_stream(p, compression=None, buffer_size=STREAM_BUFFER))


def upload(local: str | Path, path: str | Path) -> None:
    """Copy a local file to `path` (one PUT, or pyarrow's multipart upload for a large file)."""
    import pyarrow.fs as pafs

    fs, p = resolve(path)
    retrying(str(path), "upload to", lambda: pafs.copy_files(str(Path(local).resolve()), p,
                                                               source_filesystem=pafs.LocalFileSystem(),
                                                               destination_filesystem=fs))


def download(path: str | Path, local: str | Path) -> None:
    """Copy the file at `path` to the local file `local` (written to a temporary sibling, then renamed)."""
    import pyarrow.fs as pafs

    fs, p = resolve(path)
    dst = Path(local)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    try:
        retrying(str(path), "download", lambda: pafs.copy_files(p, str(tmp), source_filesystem=fs,
                                                                destination_filesystem=pafs.LocalFileSystem()))
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def delete_file(path: str | Path) -> None:
    """Remove one file; nothing happens when it is already gone."""
    fs, p = resolve(path)

    def rm() -> None:
        try:
            fs.delete_file(p)
        except FileNotFoundError:
            pass

    retrying(str(path), "delete", rm)


def sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, streamed."""
    fs, p = resolve(path)

    def digest() -> str:
        h = hashlib.sha256()
        with fs.open_input_stream(p, compression=None) as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
        return h.hexdigest()

    return retrying(str(path), "read", digest)


def cached(path: str | Path, cache_dir: str | Path, key: str, *, size: int, sha: str, max_bytes: int) -> Path | None:
    """A local copy of the immutable file at `path` under `cache_dir/key/` (key: the content id of the set it
    belongs to, so another set never reads a stale copy), downloaded and checked against its SHA-256 on first
    use; None when it cannot fit under `max_bytes` even after evicting the least recently used copies.

    Every process of a node may share the cache: copies are written to temporary names and renamed into place,
    and only files under a `<key>/` directory this function wrote are ever evicted."""
    root = Path(cache_dir).expanduser()
    dst = root / key / Path(split(str(path))[0]).name
    if dst.is_file() and dst.stat().st_size == size:
        os.utime(dst)  # recently used
        return dst
    if size > max_bytes:
        return None
    _evict(root, max_bytes - size)
    download(path, dst)
    h = hashlib.sha256()
    with open(dst, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    if h.hexdigest() != sha:
        dst.unlink(missing_ok=True)
        raise InputError(f"shard {display(path)}: sha256 differs from the manifest (the object changed since "
                         f"`raypatch prepare`; rerun it)")
    return dst


def _evict(root: Path, keep_bytes: int) -> None:
    """Remove the least recently used cached copies until the cache holds at most keep_bytes."""
    files = [f for d in root.glob("*") if d.is_dir() and not d.name.startswith(".")
             for f in d.iterdir() if f.is_file() and not f.name.startswith(".")]
    total = sum(f.stat().st_size for f in files)
    for f in sorted(files, key=lambda f: f.stat().st_mtime):
        if total <= keep_bytes:
            break
        total -= f.stat().st_size
        f.unlink(missing_ok=True)
