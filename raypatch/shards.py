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
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raypatch.safety import InputError, files_under

MANIFEST = "manifest.json"


FORMAT = "raypatch-shards/2"
"""Version 2 adds a hash per row group, the list of files the set holds and a checksum of the manifest."""


OLD_FORMATS = ("raypatch-shards/1",)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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


def shard_set_files(d: Path) -> set[str]:
    """What a shard set directory holds that raypatch wrote: its manifest's file list (format 2), or for
    format 1 the manifest, its shards and the tokenizer copy."""
    try:
        m = json.loads((d / MANIFEST).read_text())
    except (OSError, ValueError):
        return set()
    if not isinstance(m, dict) or m.get("format") not in (FORMAT, *OLD_FORMATS):
        return set()
    if isinstance(m.get("files"), list):
        return {MANIFEST, *map(str, m["files"])}
    own = {MANIFEST} | {s["file"] for v in m.get("splits", {}).values() for s in v.get("shards", [])}
    return own | {f"tokenizer/{f}" for f in (files_under(d / "tokenizer") if (d / "tokenizer").is_dir() else [])}


def load_manifest(shards_dir: str, *, verify: str = "size") -> dict[str, Any]:
    """Read manifest.json and check it against the shards on disk.

    verify='size': the manifest's checksum and every shard's size (cheap: the packer checks each row group's
    hash as it reads it). 'meta' adds each shard's Parquet footer: the column type, the row groups and their
    token counts (the driver runs it once before any worker starts). 'full' also hashes every shard.
    A format-1 set (before row-group hashes) is hashed in full under 'meta'.
    """
    d = Path(shards_dir)
    path = d / MANIFEST
    if not d.is_dir():
        raise InputError(f"data.shards={shards_dir}: no such directory (make one with `raypatch prepare`)")
    if not path.exists():
        raise InputError(f"data.shards={shards_dir}: no {MANIFEST} (make one with `raypatch prepare`)")
    try:
        m = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not valid JSON ({getattr(e, 'msg', e)})") from None
    if not isinstance(m, dict) or m.get("format") not in (FORMAT, *OLD_FORMATS):
        got = m.get("format") if isinstance(m, dict) else type(m).__name__
        raise InputError(f"{path}: format {got!r}, expected {FORMAT!r} (rerun `raypatch prepare`)")
    if m["format"] == FORMAT and m.get("checksum") != manifest_checksum(m):
        raise InputError(f"{path}: edited after `raypatch prepare` (its checksum does not match its content); "
                         f"rerun prepare rather than editing the manifest")
    try:
        _check_manifest_shape(m)
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(f"{path}: malformed manifest ({type(e).__name__}: {e})") from None
    legacy = m["format"] != FORMAT
    for split in m["splits"].values():
        for s in split["shards"]:
            f = d / s["file"]
            if not f.is_file():
                raise InputError(f"shard {f}: listed in the manifest but missing on disk")
            size = f.stat().st_size
            if size != s["bytes"]:
                raise InputError(f"shard {f}: {size} bytes on disk, the manifest says {s['bytes']} "
                                 f"(the shards changed since `raypatch prepare`; rerun it)")
            if verify == "meta":
                check_shard_footer(f, s)
            if (verify == "full" or (legacy and verify == "meta")) and file_sha256(f) != s["sha256"]:
                raise InputError(f"shard {f}: sha256 differs from the manifest (the shards changed since "
                                 f"`raypatch prepare`; rerun it)")
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


def check_shard_footer(path: Path, s: dict[str, Any]) -> None:
    """A shard's Parquet footer against its manifest entry: list<int32> ids, row groups and their token
    counts. Reads only the footer."""
    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise InputError(f"shard {path}: not a readable Parquet file ({e})") from None
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


def check_vocab(manifest: dict[str, Any], vocab_size: int, source: str) -> None:
    """The tokenizer behind the shards must fit the model's embedding table."""
    n = manifest["tokenizer"]["vocab_size"]
    if n > vocab_size:
        raise InputError(f"{source}: the shards' tokenizer has {n} tokens, more than model.vocab_size={vocab_size}"
                         f" (token ids >= {vocab_size} would index past the embedding table)")


def tokenizer_dir(shards_dir: str, manifest: dict[str, Any]) -> str:
    """The copy of the tokenizer that `raypatch prepare` stores beside the shards."""
    return str(Path(shards_dir) / manifest["tokenizer"].get("dir", "tokenizer"))
