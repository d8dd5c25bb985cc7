"""The shard-set format: manifest.json, its checks and the hashes that tie a set's content together.

`raypatch prepare` (the writer, prepare.py) and the packer (the reader, data.py) both import this module. A shard
set is a directory holding `train-NNNNN.parquet` and `val-NNNNN.parquet` (one `input_ids` list<int32> column, one
document per row), a copy of the tokenizer under `tokenizer/`, and `manifest.json`: per shard its rows, tokens,
bytes, SHA-256 and per row group its token count and hash; the tokenizer's vocabulary, fingerprint and document
separator; the source files; the list of files the set holds and the SHA-256 of its tokenizer copy; its content
id (`shards_id`); and a checksum of the manifest itself. Each shard's Parquet footer carries a mark naming the
file (`raypatch.shard`): what proves it raypatch's when `prepare --overwrite` replaces a set (shard_set_files).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raypatch import storage
from raypatch.safety import InputError, json_object, read_own, tokenizer_file_ok

MANIFEST = "manifest.json"


FORMAT = "raypatch-shards/2"
"""Version 2 adds a hash per row group, the list of files the set holds and a checksum of the manifest."""


OLD_FORMATS = ("raypatch-shards/1",)


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, local or at a URI."""
    return storage.sha256(path)


def tokens_hash(values: np.ndarray) -> str:
    """Hash of one row group's decoded token values (int32): checked each time the packer reads it, so a
    flipped bit anywhere in a shard stops training at the row group it hits, at the cost of one pass of
    BLAKE2 over data that is being read anyway (about 1 GB/s)."""
    return hashlib.blake2b(np.ascontiguousarray(values, dtype=np.int32).tobytes(), digest_size=16).hexdigest()


def manifest_checksum(m: dict[str, Any]) -> str:
    """SHA-256 of the manifest without its own checksum: any edit of the file after prepare shows."""
    body = {k: v for k, v in m.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def shards_id(m: dict[str, Any]) -> str:
    """The identity of a shard set's content: its tokenizer and every shard's name and SHA-256, in order.
    Recorded in checkpoints, so that a run never resumes its data cursor on a different stream."""
    body = {"tokenizer": m["tokenizer"]["fingerprint"],
            "splits": {k: [[s["file"], s["sha256"]] for s in v["shards"]] for k, v in sorted(m["splits"].items())}}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


TOKENIZER_FILES = re.compile(r"tokenizer[^/]*|special_tokens_map\.json|added_tokens\.json|vocab\.[a-z]+|merges\.txt"
                             r"|chat_template[^/]*|spiece\.model|[^/]*\.tiktoken")
"""The files of an HF tokenizer directory that a shard set and `raypatch tokenizer train` carry."""
OWN_NAMES = re.compile(r"manifest\.json|(train|val)-\d{5}\.parquet|\.raypatch-prepare\.json|tokenizer/(?:"
                       + TOKENIZER_FILES.pattern + ")")
"""Every name `raypatch prepare` writes in a shard set: what it may ever replace or delete there (and then only
when its content proves it raypatch's: shard_set_files)."""
SHARD_SCHEMA = pa.schema([("input_ids", pa.list_(pa.int32()))])
"""A shard's one column: one document's token ids per row."""
SHARD_MARK = "raypatch.shard"
"""The key of the mark ShardWriter puts in each shard's Parquet footer (key-value metadata)."""
PREPARE_MARKER = ".raypatch-prepare.json"
"""On a store, written first and removed last by `raypatch prepare`: a prefix holding it and no manifest is
an interrupted prepare's output, which a rerun may continue over."""


def shard_mark(name: str) -> dict[str, str]:
    """The footer mark of the shard `name`: JSON naming the file and the format, nothing else, so that two
    prepares of the same input stay byte-identical. It is what makes a file provably raypatch's shard (the
    manifest, which anyone can edit and re-checksum, is not): a user's Parquet file carries no such mark, and a
    shard copied under another name carries one that names another file."""
    return {SHARD_MARK: json.dumps({"file": name, "format": FORMAT}, sort_keys=True)}


def shard_set_files(d: str | Path) -> set[str]:
    """What raypatch provably wrote in a shard set directory or at a URI prefix (check_replaceable's `owned`;
    StorePublisher's check on a store): of the files its manifest lists (or, under a store prefix with no
    manifest, the files of an interrupted prepare beside its marker), those whose name is one raypatch gives its
    outputs (OWN_NAMES) and whose content proves it:

    - manifest.json: a raypatch manifest whose checksum holds; .raypatch-prepare.json: raypatch's marker.
    - a shard: a Parquet footer carrying raypatch's mark naming this very file (a footer read, a range read on a
      store). A shard written before the mark (none carries one) counts only if it is exactly what raypatch's
      writer makes and the manifest describes: its size and SHA-256 match the manifest, its schema is
      `input_ids: list<int32>` alone, its footer holds no key-value metadata but Arrow's schema, it was written by
      Arrow's Parquet writer with zstd, no statistics and no dictionary, and its row groups hold the token counts
      the manifest records (one full read, for such sets only). A user's Parquet file written any other way, or
      any non-Parquet file, is not one.
    - a file of the tokenizer copy: it parses as that tokenizer file (safety.tokenizer_file_ok) and, where the
      manifest records its SHA-256 (file_sha256, sets since the mark), matches it.

    The manifest's word alone proves nothing: a file it lists that fails its proof is foreign."""
    d = str(d)
    sizes = storage.list_files(d)
    m = _own_manifest(d) if MANIFEST in sizes else None
    if m is not None:
        if isinstance(m.get("files"), list):
            names = set(map(str, m["files"]))
        else:  # format 1: its shards and whatever the tokenizer copy holds
            names = {s["file"] for v in m["splits"].values() for s in v["shards"]}
            names |= {n for n in sizes if n.startswith("tokenizer/")}
        names |= {MANIFEST, PREPARE_MARKER}  # a prepare on a store stopped between the two leaves both
    elif PREPARE_MARKER in sizes:
        names = set(sizes)
    else:
        return set()
    entries = {s["file"]: s for v in (m or {}).get("splits", {}).values() for s in v["shards"]}
    candidates = sorted(n for n in names & set(sizes) if OWN_NAMES.fullmatch(n))

    def proven(name: str) -> bool:
        path = storage.join(d, name)
        if name == MANIFEST:
            return m is not None
        if name == PREPARE_MARKER:
            mk = json_object(_read(path))
            return mk is not None and set(mk) == {"writer", "host", "pid", "started"} and \
                mk["writer"] == "raypatch prepare"
        if name.startswith("tokenizer/"):
            data = _read(path)
            recorded = (m or {}).get("file_sha256")
            if isinstance(recorded, dict) and (data is None or recorded.get(name) != hashlib.sha256(data).hexdigest()):
                return False
            return tokenizer_file_ok(name.removeprefix("tokenizer/"), data)
        return shard_is_own(path, name, entries.get(name), sizes.get(name))

    with ThreadPoolExecutor(8) as pool:  # footers on a store: one round trip each, overlapped
        return {n for n, ok in zip(candidates, pool.map(proven, candidates)) if ok}


def _read(path: str) -> bytes | None:
    """A small file's bytes (never through a local symbolic link), or None when it cannot be read."""
    return storage.read_bytes(path) if storage.is_uri(path) else read_own(Path(path))


def _own_manifest(d: str) -> dict[str, Any] | None:
    """The manifest of `d` if it is one raypatch wrote: a known format, its checksum (format 2), its shape."""
    m = json_object(_read(storage.join(d, MANIFEST)))
    if m is None or m.get("format") not in (FORMAT, *OLD_FORMATS):
        return None
    if m["format"] == FORMAT and m.get("checksum") != manifest_checksum(m):
        return None
    try:
        _check_manifest_shape(m)
    except (KeyError, TypeError, ValueError, AttributeError):
        return None
    return m


def _footer(path: str) -> pq.FileMetaData | None:
    """A Parquet file's footer (a range read on a store), or None when it is not a readable Parquet file."""
    try:
        if storage.is_uri(path):
            pf = storage.retrying(path, "read the footer of", lambda: pq.ParquetFile(storage.open_input(path)),
                                  own_errors=True)
        elif Path(path).is_symlink() or not Path(path).is_file():
            return None
        else:
            pf = pq.ParquetFile(path)
        with pf:
            return pf.metadata
    except (OSError, pa.ArrowException):
        return None


def shard_is_own(path: str, name: str, entry: dict[str, Any] | None, size: int | None) -> bool:
    """Whether the file at `path` is raypatch's shard `name` (shard_set_files says how it is proven);
    `entry` and `size` (its manifest entry and its size) are needed only for a shard without the mark."""
    md = _footer(path)
    if md is None:
        return False
    mark = (md.metadata or {}).get(SHARD_MARK.encode())
    if mark is not None:
        got = json_object(mark)
        return got is not None and got.get("file") == name and got.get("format") in (FORMAT, *OLD_FORMATS)
    if entry is None or size is None:
        return False
    try:
        rg = [int(x) for x in entry["row_group_tokens"]]
        if (size != int(entry["bytes"]) or not md.schema.to_arrow_schema().equals(SHARD_SCHEMA)
                or set(md.metadata or {}) - {b"ARROW:schema"} or not str(md.created_by).startswith("parquet-cpp-arrow")
                or md.num_columns != 1 or md.num_row_groups != len(rg)):
            return False
        for g, n in enumerate(rg):
            c = md.row_group(g).column(0)
            if c.num_values != n or c.compression != "ZSTD" or c.is_stats_set or c.has_dictionary_page:
                return False
    except (KeyError, TypeError, ValueError):
        return False
    return file_sha256(path) == entry["sha256"]


def load_manifest(shards_dir: str, *, verify: str = "size") -> dict[str, Any]:
    """Read manifest.json (a local directory or a URI prefix) and check it against the shards it lists.

    verify='size': the manifest's checksum and every shard's size, from one listing (cheap: the packer checks
    each row group's hash as it reads it). 'meta' adds each shard's Parquet footer (a range read on a store):
    the column type, the row groups and their token counts (the driver runs it once before any worker
    starts). 'full' also hashes every shard. A format-1 set (before row-group hashes) is hashed in full under
    'meta'.
    """
    where = storage.display(shards_dir)
    path = storage.join(shards_dir, MANIFEST)
    uri = storage.is_uri(shards_dir)
    if not uri and not Path(shards_dir).is_dir():
        raise InputError(f"data.shards={shards_dir}: no such directory (make one with `raypatch prepare`)")
    text = storage.read_text(path)
    if text is None:
        if uri:
            storage.list_files(shards_dir)  # a missing bucket or denied access says so, rather than "no manifest"
        hint = " (an interrupted prepare leaves none: rerun it)" if uri else ""
        raise InputError(f"data.shards={where}: no {MANIFEST} (make one with `raypatch prepare`){hint}")
    where_m = storage.display(path)
    try:
        m = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{where_m}: not valid JSON ({e.msg})") from None
    if not isinstance(m, dict) or m.get("format") not in (FORMAT, *OLD_FORMATS):
        got = m.get("format") if isinstance(m, dict) else type(m).__name__
        raise InputError(f"{where_m}: format {got!r}, expected {FORMAT!r} (rerun `raypatch prepare`)")
    if m["format"] == FORMAT and m.get("checksum") != manifest_checksum(m):
        raise InputError(f"{where_m}: edited after `raypatch prepare` (its checksum does not match its content); "
                         f"rerun prepare rather than editing the manifest")
    try:
        _check_manifest_shape(m)
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(f"{where_m}: malformed manifest ({type(e).__name__}: {e})") from None
    legacy = m["format"] != FORMAT
    sizes = storage.list_files(shards_dir)
    for split in m["splits"].values():
        for s in split["shards"]:
            f = storage.join(shards_dir, s["file"])
            if s["file"] not in sizes:
                raise InputError(f"shard {storage.display(f)}: listed in the manifest but missing "
                                 f"{'from the store' if uri else 'on disk'}")
            if sizes[s["file"]] != s["bytes"]:
                raise InputError(f"shard {storage.display(f)}: {sizes[s['file']]} bytes "
                                 f"{'in the store' if uri else 'on disk'}, the manifest says "
                                 f"{s['bytes']} (the shards changed since `raypatch prepare`; rerun it)")
            if verify == "meta":
                check_shard_footer(f, s)
            if (verify == "full" or (legacy and verify == "meta")) and file_sha256(f) != s["sha256"]:
                raise InputError(f"shard {storage.display(f)}: sha256 differs from the manifest (the shards changed "
                                 f"since `raypatch prepare`; rerun it)")
    return m


def _check_manifest_shape(m: dict[str, Any]) -> None:
    if "train" not in m["splits"]:
        raise KeyError("splits.train")
    int(m["tokenizer"]["vocab_size"])
    str(m["tokenizer"]["fingerprint"])
    for name, split in m["splits"].items():
        total = 0
        for s in split["shards"]:
            rg = [int(x) for x in s["row_group_tokens"]]
            if sum(rg) != int(s["tokens"]) or any(x <= 0 for x in rg):
                raise ValueError(f"shard {s['file']}: row_group_tokens do not add up to its {s['tokens']} tokens")
            if "row_group_hashes" in s and len(s["row_group_hashes"]) != len(rg):
                raise ValueError(f"shard {s['file']}: one hash per row group expected")
            if Path(s["file"]).name != s["file"]:
                raise ValueError(f"shard file {s['file']!r} is not a plain file name")
            total += int(s["tokens"])
        if total != int(split["tokens"]):
            raise ValueError(f"split {name}: its shards hold {total} tokens, the manifest says {split['tokens']}")


def check_shard_footer(path: str | Path, s: dict[str, Any]) -> pq.ParquetFile:
    """A shard's Parquet footer against its manifest entry: list<int32> ids, row groups and their token
    counts. Reads only the footer (range reads on a store); returns the open file."""
    try:
        pf = storage.retrying(str(path), "read the footer of", lambda: pq.ParquetFile(storage.open_input(path)),
                              own_errors=True)
    except (OSError, pa.ArrowException) as e:
        raise InputError(f"shard {storage.display(path)}: not a readable Parquet file ({e})") from None
    path = storage.display(path)
    schema = pf.schema_arrow
    if "input_ids" not in schema.names:
        raise InputError(f"shard {path}: no column 'input_ids' (columns: {', '.join(schema.names)})")
    t = schema.field("input_ids").type
    if t != pa.list_(pa.int32()):
        raise InputError(f"shard {path}: column 'input_ids' has type {t}, expected list<int32> token ids")
    if pf.num_row_groups != len(s["row_group_tokens"]):
        raise InputError(f"shard {path}: {pf.num_row_groups} row groups on disk, the manifest says "
                         f"{len(s['row_group_tokens'])} (rerun `raypatch prepare`)")
    col = schema.names.index("input_ids")
    for g, n in enumerate(s["row_group_tokens"]):
        have = pf.metadata.row_group(g).column(col).num_values
        if have != n:
            raise InputError(f"shard {path}: row group {g} holds {have} tokens, the manifest says {n} "
                             f"(rerun `raypatch prepare`)")
    return pf


def check_vocab(manifest: dict[str, Any], vocab_size: int, source: str) -> None:
    """The tokenizer behind the shards must fit the model's embedding table."""
    n = manifest["tokenizer"]["vocab_size"]
    if n > vocab_size:
        raise InputError(f"{source}: the shards' tokenizer has {n} tokens, more than model.vocab_size={vocab_size}"
                         f" (token ids >= {vocab_size} would index past the embedding table)")


def tokenizer_dir(shards_dir: str, manifest: dict[str, Any]) -> str:
    """The copy of the tokenizer that `raypatch prepare` stores beside the shards (a path or a URI)."""
    return storage.join(shards_dir, manifest["tokenizer"].get("dir", "tokenizer"))


def local_tokenizer(shards_dir: str, manifest: dict[str, Any]) -> str:
    """A local directory holding the shard set's tokenizer: the set's own copy on local disk, or a download."""
    return fetch_tokenizer(tokenizer_dir(shards_dir, manifest), manifest["tokenizer"]["fingerprint"])


def fetch_tokenizer(src: str, fingerprint: str | None) -> str:
    """`src` itself when local; a tokenizer directory at a URI downloaded to ~/.cache/raypatch/tokenizers/
    (RAYPATCH_CACHE), keyed by its fingerprint when known (any set with the same tokenizer reuses it) and
    checked against it before it counts."""
    if not storage.is_uri(src):
        return src
    from raypatch.tokenizer import tokenizer_info

    key = (fingerprint or hashlib.sha256(storage.display(src).encode()).hexdigest())[:32]
    dst = Path(os.environ.get("RAYPATCH_CACHE", "~/.cache/raypatch")).expanduser() / "tokenizers" / key
    if fingerprint and dst.is_dir():
        return str(dst)
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    for name in storage.list_files(src):
        if OWN_NAMES.fullmatch(f"tokenizer/{name}"):
            storage.download(storage.join(src, name), tmp / name)
    if not tmp.is_dir():
        raise InputError(f"{storage.display(src)}: no tokenizer files there")
    if fingerprint and tokenizer_info(str(tmp))["fingerprint"] != fingerprint:
        shutil.rmtree(tmp, ignore_errors=True)
        raise InputError(f"{storage.display(src)}: the tokenizer stored with the shards does not match the "
                         f"manifest's fingerprint (rerun `raypatch prepare`)")
    if dst.is_dir():
        shutil.rmtree(dst, ignore_errors=True)  # ours (the cache): a copy without a fingerprint to trust
    try:
        os.replace(tmp, dst)
    except OSError:  # another process got there first: its copy is the same content
        shutil.rmtree(tmp, ignore_errors=True)
    return str(dst)
