"""The shard-set format: manifest.json, its checks and the hashes that tie a set's content together.

`raypatch prepare` (the writer, prepare.py) and the packer (the reader, data.py) both import this module. A shard
set is a directory holding `train-NNNNN.parquet` and `val-NNNNN.parquet` (one `input_ids` list<int32> column, one
document per row), a copy of the tokenizer under `tokenizer/`, and `manifest.json`: per shard its rows, tokens,
bytes, SHA-256 and per row group its token count and hash; the tokenizer's vocabulary, fingerprint and document
separator; the source files; the list of files the set holds; its content id (`shards_id`); and a checksum of
the manifest itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raypatch import storage
from raypatch.safety import InputError, files_under

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


def shard_set_files(d: str | Path) -> set[str]:
    """What a shard set directory (or URI prefix) holds that raypatch wrote: its manifest's file list
    (format 2), or for format 1 the manifest, its shards and the tokenizer copy; only names raypatch gives
    its own outputs count (OWN_NAMES), whatever the manifest says."""
    try:
        m = json.loads(storage.read_bytes(storage.join(d, MANIFEST)))
    except (OSError, ValueError):
        return set()
    if not isinstance(m, dict) or m.get("format") not in (FORMAT, *OLD_FORMATS):
        return set()
    if isinstance(m.get("files"), list):
        return {MANIFEST, *(f for f in map(str, m["files"]) if OWN_NAMES.fullmatch(f))}
    own = {MANIFEST} | {s["file"] for v in m.get("splits", {}).values() for s in v.get("shards", [])}
    tok = Path(d) / "tokenizer"
    return own | {f"tokenizer/{f}" for f in (files_under(tok) if not storage.is_uri(d) and tok.is_dir() else [])}


TOKENIZER_FILES = re.compile(r"tokenizer[^/]*|special_tokens_map\.json|added_tokens\.json|vocab\.[a-z]+|merges\.txt"
                             r"|chat_template[^/]*|spiece\.model|[^/]*\.tiktoken")
"""The files of an HF tokenizer directory that a shard set and `raypatch tokenizer train` carry."""
OWN_NAMES = re.compile(r"manifest\.json|(train|val)-\d{5}\.parquet|\.raypatch-prepare\.json|tokenizer/(?:"
                       + TOKENIZER_FILES.pattern + ")")
"""Every name `raypatch prepare` writes in a shard set: what it may ever replace or delete there."""


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
    from raypatch.prepare import tokenizer_info

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
