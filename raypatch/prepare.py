"""Raw text -> tokenized Parquet shards and manifest.json, tokenized in parallel with Ray Data.

Inputs are JSON Lines with a text field, plain .txt (one document per file) or Parquet with a text column,
each optionally gzip-compressed, given as paths or globs. Ray Data reads one file per task and tokenizes in
`map_batches` with a fast HF tokenizer; the driver receives documents in input order (preserve_order) and
writes the shards, so two runs on the same input give byte-identical shards.

Shard layout: one `input_ids` list<int32> column, one document per row, the tokenizer's document separator
included as the tokenizer itself adds it (BOS before, EOS after, or both: `separator` probes it; EOS after for a
tokenizer that adds nothing, as GPT-2's convention is). Each Parquet row
group holds about `row_group_tokens` tokens, and the manifest lists every row group's token count, so the
packer can read any token range of the stream by row group without scanning whole shards. The footer's key-value
metadata marks the file as raypatch's shard of that name (shards.shard_mark), deterministically.
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import io
import json
import os
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raypatch import storage
from raypatch.safety import (
    InputError,
    building,
    check_replaceable,
    find_input_error,
    first_few,
    replace_dir,
)
from raypatch.shards import (
    FORMAT,
    MANIFEST,
    OWN_NAMES,
    PREPARE_MARKER,
    SHARD_SCHEMA,
    TOKENIZER_FILES,
    file_sha256,
    manifest_checksum,
    shard_mark,
    shard_set_files,
    shards_id,
    tokens_hash,
)
from raypatch.tokenizer import check_tokenizer_dir, load_tokenizer, separate, tokenizer_info

SUFFIXES = (".jsonl", ".json", ".txt", ".parquet")
EOS = "<|endoftext|>"
PIECE_CHARS = 1 << 20
"""Documents longer than this are tokenized in pieces of about this many characters (bounded memory)."""
READ_CPUS = 0.1
"""What a file-reading task asks of Ray; a tokenizer actor asks the rest of a CPU."""
BLOCK_BYTES = 4 << 20
"""Ray Data's block size for the documents on their way to the tokenizer actors."""


# --- reading raw text ------------------------------------------------------------------------------


def _kind(path: str) -> str:
    head = storage.split(path)[0]
    name = head[:-3] if head.endswith(".gz") else head
    for s in SUFFIXES:
        if name.endswith(s):
            return ".jsonl" if s == ".json" else s
    raise InputError(f"input {storage.display(path)}: unsupported file type (expected {', '.join(SUFFIXES)}, "
                     f"optionally .gz)")


def resolve_inputs(patterns: list[str]) -> list[str]:
    """Expand paths and globs (local, or URIs such as s3://bucket/raw/*.jsonl.gz) into a sorted,
    de-duplicated list of readable files."""
    if not patterns:
        raise InputError("no input files given")
    files: list[str] = []
    for pat in patterns:
        uri = storage.is_uri(pat)
        matches = storage.glob(pat) if glob.has_magic(storage.split(pat)[0]) else [pat]
        if not matches:
            raise InputError(f"input {storage.display(pat)}: the pattern matches no file")
        for m in matches:
            if uri:
                fi = storage.info(m)
                if fi is None:
                    raise InputError(f"input {storage.display(m)}: no such object"
                                     + (" (a prefix: give a glob such as .../*.jsonl)" if storage.is_dir(m) else ""))
                if not storage.is_file(m):
                    raise InputError(f"input {storage.display(m)}: not a file (give a glob such as .../*.jsonl)")
                _kind(m)
                files.append(m)
                continue
            p = Path(m)
            if p.is_dir():
                raise InputError(f"input {m}: is a directory (give files or a glob such as {m}/*.jsonl)")
            if not p.exists():
                raise InputError(f"input {m}: no such file")
            try:
                with open(p, "rb") as f:
                    f.read(1)
            except OSError as e:
                raise InputError(f"input {m}: cannot be read ({e.strerror or e})") from None
            _kind(m)
            files.append(str(p.resolve()))
    return sorted(dict.fromkeys(files))


def _open_binary(path: str) -> Any:
    if not storage.is_uri(path):
        return open(path, "rb")
    return storage.open_stream(path)


def _open_text(path: str) -> io.TextIOBase:
    raw = _open_binary(path)
    if storage.split(path)[0].endswith(".gz"):
        raw = gzip.GzipFile(fileobj=raw, mode="rb")
    return io.TextIOWrapper(raw, encoding="utf-8", newline="")


_SURROGATE = re.compile(r"[\ud800-\udfff]")


def check_encodable(text: str, where: str) -> None:
    """Refuse a string holding a lone UTF-16 surrogate (JSON's `"\\ud800"` decodes to one): no tokenizer can
    encode it, as it has no UTF-8 form."""
    m = _SURROGATE.search(text)
    if m is not None:
        raise InputError(f"{where} holds a lone surrogate {ascii(m.group())[1:-1]} at character {m.start()}, "
                         f"which cannot be encoded as UTF-8 (half of a UTF-16 pair; fix or drop this record)")


def iter_documents(path: str, text_field: str = "text") -> Iterator[str]:
    """Yield the documents of one input file; errors name the file and line."""
    kind = _kind(path)
    where = storage.display(path)
    try:
        if kind == ".txt":
            with _open_text(path) as f:
                yield f.read()
        elif kind == ".jsonl":
            with _open_text(path) as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise InputError(f"{where}:{lineno}: invalid JSON ({e.msg})") from None
                    if not isinstance(obj, dict) or text_field not in obj:
                        raise InputError(f"{where}:{lineno}: no '{text_field}' field in this JSON line")
                    if not isinstance(obj[text_field], str):
                        raise InputError(f"{where}:{lineno}: field '{text_field}' is "
                                         f"{type(obj[text_field]).__name__}, expected a string")
                    # A lone surrogate can only come from a \u escape (the file itself is strict UTF-8): look
                    # only then, so ordinary lines cost one substring test.
                    if "\\u" in line:
                        check_encodable(obj[text_field], f"{where}:{lineno}: field '{text_field}'")
                    yield obj[text_field]
        else:
            if storage.split(path)[0].endswith(".gz"):  # gzip has no random access: decompress it whole
                with _open_binary(path) as f:
                    source: Any = pa.BufferReader(gzip.decompress(f.read()))
            else:
                source = storage.open_input(path) if storage.is_uri(path) else path
            pf = pq.ParquetFile(source)
            if text_field not in pf.schema_arrow.names:
                raise InputError(f"{where}: no column '{text_field}' (columns: {', '.join(pf.schema_arrow.names)})")
            if not pa.types.is_string(pf.schema_arrow.field(text_field).type) and not pa.types.is_large_string(
                    pf.schema_arrow.field(text_field).type):
                raise InputError(f"{where}: column '{text_field}' has type "
                                 f"{pf.schema_arrow.field(text_field).type}, expected string")
            for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
                for t in batch.column(0).to_pylist():
                    yield t or ""
    except (UnicodeDecodeError, EOFError, gzip.BadGzipFile, pa.ArrowInvalid) as e:
        raise InputError(f"{storage.display(path)}: cannot be decoded ({type(e).__name__}: {e})") from None


def documents(path: str, text_field: str = "text") -> Iterator[str]:
    """iter_documents, resumed after a transient storage failure mid-file (a reset connection on a long GET):
    the file is reopened and the documents already given are skipped, with backoff and one line
    (storage.Backoff), so a flaky store neither loses nor repeats a document."""
    given = 0
    backoff = storage.Backoff(path, "read")
    while True:
        it = iter_documents(path, text_field)
        try:
            for _ in range(given):
                next(it)
            for doc in it:
                given += 1
                backoff.succeeded()
                yield doc
            return
        except OSError as e:
            backoff.failed(e)


# --- tokenizers ------------------------------------------------------------------------------------


def tokenizer_files(d: Path) -> set[str]:
    """The files of a tokenizer directory that `raypatch tokenizer train` provably wrote (check_replaceable's
    `owned`): by name, and by content, what train_tokenizer makes and a tokenizer from elsewhere (GPT-2's,
    Llama's, one's own) does not: a byte-level BPE whose one added token is EOS with id 0, with no normalizer,
    and a tokenizer_config.json whose EOS and pad token are EOS and whose model_max_length is 2**30. Files of
    any other tokenizer, even valid ones, are left alone (a user's tokenizer is not raypatch's to replace)."""
    from raypatch.safety import json_object, read_own, tokenizer_file_ok

    own = set()
    for f in sorted(d.iterdir()):
        data = read_own(f)
        if not TOKENIZER_FILES.fullmatch(f.name) or not tokenizer_file_ok(f.name, data):
            continue
        obj = json_object(data)
        if f.name == "tokenizer.json" and obj is not None:
            model, pre, dec = (obj.get(k) if isinstance(obj.get(k), dict) else {} for k in
                               ("model", "pre_tokenizer", "decoder"))
            added = [(t.get("id"), t.get("content"), t.get("special")) for t in obj.get("added_tokens") or []
                     if isinstance(t, dict)]
            ok = (model.get("type") == "BPE" and pre.get("type") == "ByteLevel" and pre.get("add_prefix_space") is
                  False and dec.get("type") == "ByteLevel" and obj.get("normalizer") is None
                  and added == [(0, EOS, True)])
        elif f.name == "tokenizer_config.json" and obj is not None:
            ok = obj.get("model_max_length") == 1 << 30 and all(
                (v.get("content") if isinstance(v, dict) else v) == EOS
                for v in (obj.get("eos_token"), obj.get("pad_token")))
        elif f.name == "special_tokens_map.json" and obj is not None:  # written by transformers before 5
            ok = all((v.get("content") if isinstance(v, dict) else v) == EOS for v in obj.values())
        else:
            ok = False
        if ok:
            own.add(f.name)
    return own


def train_tokenizer(inputs: list[str], out_dir: str, *, vocab_size: int = 8192, text_field: str = "text",
                    min_frequency: int = 2, overwrite: bool = False) -> str:
    """Train a byte-level BPE with the `tokenizers` library and save it as an HF tokenizer directory.

    Written to a temporary sibling and renamed into place; an existing `out_dir` is replaced only with
    `overwrite` and only when it holds nothing but tokenizer files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 257:
        raise InputError(f"--vocab-size {vocab_size}: a byte-level BPE needs at least 257 tokens (256 bytes + EOS)")
    files = resolve_inputs(inputs)
    storage.check_not_overlapping(out_dir, [("input", f) for f in files], "--out")
    check_replaceable(out_dir, overwrite=overwrite, owned=tokenizer_files, what="a tokenizer")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)

    def docs() -> Iterator[str]:
        for f in files:
            yield from iter_documents(f, text_field)

    tok.train_from_iterator(docs(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS,
                                   model_max_length=1 << 30)
    with building(out_dir) as tmp:
        fast.save_pretrained(str(tmp))
    replace_dir(tmp, out_dir)
    return out_dir


class _Tokenize:
    """Ray Data UDF: one fast tokenizer per actor; documents -> list<int32> with the separator added.

    It loads tokenizer.json with the `tokenizers` library directly: importing transformers in every actor
    costs seconds of start-up per actor, more than tokenizing a small corpus.
    """

    def __init__(self, path: str, sep: dict[str, Any]) -> None:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        f = Path(path) / "tokenizer.json"
        if f.exists():
            from tokenizers import Tokenizer

            self.backend = Tokenizer.from_file(str(f))
        else:
            self.backend = load_tokenizer(path).backend_tokenizer
        self.sep = sep

    def encode(self, texts: list[str]) -> Iterator[list[int]]:
        """The ids of each text, as `encode` gives them. `encode_batch_fast` skips the character offsets
        that `encode` and `encode_batch` compute per token (nobody here reads them): 1.56-1.61x the tokens/s per
        core (the two plain-process rows of benchmarks/results/prepare_scale*.md). One call gets at most
        PIECE_CHARS characters (or one longer text), so the encodings held at once stay about one piece's worth
        whatever the batch size."""
        i = 0
        while i < len(texts):
            j, chars = i + 1, len(texts[i])
            while j < len(texts) and chars + len(texts[j]) <= PIECE_CHARS:
                chars += len(texts[j])
                j += 1
            for enc in self.backend.encode_batch_fast(texts[i:j], add_special_tokens=False):
                yield enc.ids
            i = j

    def __call__(self, batch: pa.Table) -> pa.Table:
        # Rows are documents, or pieces of a long one (split_long): the separator goes before a document's
        # first piece (BOS) or after its last (EOS). Arrow in and out: a numpy batch would hold the texts as a
        # fixed-width unicode array, 4 bytes per character of the longest one, built and copied per batch.
        ids = []
        for enc, part, last in zip(self.encode(batch.column("text").to_pylist()), batch.column("part").to_pylist(),
                                   batch.column("last").to_pylist()):
            ids.append(np.asarray(separate(enc, self.sep, first=part == 0, last=last), dtype=np.int32))
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
        flat = np.concatenate(ids) if ids else np.zeros(0, np.int32)
        offsets = np.zeros(len(ids) + 1, dtype=np.int32)
        np.cumsum(lengths, out=offsets[1:])
        return pa.table({"file": batch.column("file"), "doc": batch.column("doc"), "last": batch.column("last"),
                         "error": batch.column("error"),
                         "input_ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat))})


_CUT = re.compile(r"(?<=\S) (?=\S)")


def split_long(text: str, piece: int = PIECE_CHARS) -> Iterator[str]:
    """Cut a long document into pieces of at most `piece` characters, each cut just before a single space
    that stands between two non-space characters. Byte-level BPE pre-tokenizers (GPT-2 style, as
    `raypatch tokenizer train` builds) always start a new pre-token there, so the pieces encode to exactly
    the ids of the whole document. Where the last 64 Ki characters before a cut hold no such space (one
    huge word, base64), the cut falls at the limit and only the tokens at that seam can differ; tokenizers
    that add a prefix to every input (SentencePiece-style Metaspace) may differ at each seam. Documents up
    to `piece` characters are never cut."""
    start = 0
    while len(text) - start > piece:
        end = start + piece
        window = max(start + 1, end - (1 << 16))
        last = None
        for m in _CUT.finditer(text, window, end):
            last = m.start()
        cut = last if last is not None else end
        yield text[start:cut]
        start = cut
    yield text[start:]


def _read_file(row: dict[str, Any], text_field: str) -> Iterator[dict[str, Any]]:
    """One row per document, or per piece of a document longer than PIECE_CHARS (split_long), so that no
    row downstream (blocks, tokenizer actors, encodings) is larger than a piece: only this task ever holds a
    long document whole. The driver joins the pieces of a document (`last` marks its final one)."""
    # Errors travel as data: an exception here would make Ray Data print the task's traceback before the
    # driver could turn it into the one-line message. The driver raises the first error row it meets.
    try:
        for i, text in enumerate(documents(row["path"], text_field)):
            if not text:  # an empty document would add only a separator
                continue
            pieces = split_long(text) if len(text) > PIECE_CHARS else iter([text])
            piece = next(pieces)
            part = 0
            for following in pieces:
                yield {"file": row["file"], "doc": i, "part": part, "last": False, "text": piece, "error": ""}
                piece, part = following, part + 1
            yield {"file": row["file"], "doc": i, "part": part, "last": True, "text": piece, "error": ""}
    except InputError as e:
        yield {"file": row["file"], "doc": -1, "part": 0, "last": True, "text": "", "error": str(e)}
    except OSError as e:
        yield {"file": row["file"], "doc": -1, "part": 0, "last": True, "text": "",
               "error": f"input {row['path']}: cannot be read ({e})"}


# --- writing shards --------------------------------------------------------------------------------


class ShardWriter:
    """Writes one split's rows into Parquet shards of ~shard_tokens, row groups of ~row_group_tokens.

    Each shard is written under a temporary name and renamed when complete, so a crash never leaves a
    truncated file under a shard's name; the manifest, written last, is what makes a shard set valid.
    """

    SCHEMA = SHARD_SCHEMA

    def __init__(self, out_dir: Path, split: str, shard_tokens: int, row_group_tokens: int,
                 on_shard: Callable[[Path], None] | None = None) -> None:
        self.out_dir, self.split, self.on_shard = out_dir, split, on_shard
        self.shard_tokens, self.row_group_tokens = shard_tokens, row_group_tokens
        self.shards: list[dict[str, Any]] = []
        self._pending: list[np.ndarray] = []
        self._pending_tokens = 0
        self._writer: pq.ParquetWriter | None = None
        self._cur: dict[str, Any] = {}

    def add(self, ids: np.ndarray) -> None:
        self._pending.append(ids)
        self._pending_tokens += len(ids)
        if self._pending_tokens >= self.row_group_tokens:
            self._flush_group()
            if self._cur["tokens"] >= self.shard_tokens:
                self._close_shard()

    def _flush_group(self) -> None:
        if not self._pending:
            return
        if self._writer is None:
            name = f"{self.split}-{len(self.shards):05d}.parquet"
            self._cur = {"file": name, "rows": 0, "tokens": 0, "row_group_tokens": [], "row_group_hashes": []}
            # No dictionary or statistics: token lists gain nothing from them and they cost write time.
            self._writer = pq.ParquetWriter(self.out_dir / f".{name}.tmp", self.SCHEMA, compression="zstd",
                                            use_dictionary=False, write_statistics=False)
        lengths = np.fromiter((len(x) for x in self._pending), dtype=np.int64, count=len(self._pending))
        offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
        np.cumsum(lengths, out=offsets[1:])
        values = np.concatenate(self._pending).astype(np.int32, copy=False)
        col = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))
        self._writer.write_table(pa.Table.from_arrays([col], schema=self.SCHEMA), row_group_size=len(lengths))
        self._cur["rows"] += len(lengths)
        self._cur["tokens"] += self._pending_tokens
        self._cur["row_group_tokens"].append(self._pending_tokens)
        self._cur["row_group_hashes"].append(tokens_hash(values))
        self._pending, self._pending_tokens = [], 0

    def _close_shard(self) -> None:
        assert self._writer is not None
        self._writer.add_key_value_metadata(shard_mark(self._cur["file"]))  # what proves the file raypatch's
        self._writer.close()
        self._writer = None
        name = self._cur["file"]
        os.replace(self.out_dir / f".{name}.tmp", self.out_dir / name)
        self._cur["bytes"] = (self.out_dir / name).stat().st_size
        self._cur["sha256"] = file_sha256(self.out_dir / name)
        self.shards.append(self._cur)
        if self.on_shard is not None:  # publish it (an upload to a store) while the next one is written
            self.on_shard(self.out_dir / name)

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.close()
            (self.out_dir / f".{self._cur['file']}.tmp").unlink(missing_ok=True)
        for s in self.shards:
            (self.out_dir / s["file"]).unlink(missing_ok=True)
        self._writer, self.shards = None, []

    def close(self) -> dict[str, Any]:
        self._flush_group()
        if self._writer is not None:
            self._close_shard()
        return {"shards": self.shards, "rows": sum(s["rows"] for s in self.shards),
                "tokens": sum(s["tokens"] for s in self.shards)}


class DocShuffler:
    """A seeded shuffle of documents in two passes with bounded memory (the classic bucket shuffle).

    Pass 1 (`add`) sends every document to one of `buckets` spill files under `tmp_dir`, drawn at random;
    pass 2 (`drain`) loads one bucket at a time, permutes it and yields its documents. Random buckets then a
    random order within each give a uniformly random permutation; memory holds one bucket, about the split's
    size / buckets. The same seed and input order give the same output.
    """

    def __init__(self, tmp_dir: Path, seed: int, buckets: int = 64) -> None:
        self.dir, self.seed, self.buckets = tmp_dir, seed, buckets
        self.dir.mkdir(parents=True, exist_ok=True)
        self._rng = np.random.default_rng(seed)
        self._ids = [open(self.dir / f"b{b:04d}.ids", "wb") for b in range(buckets)]  # noqa: SIM115
        self._lens = [open(self.dir / f"b{b:04d}.len", "wb") for b in range(buckets)]  # noqa: SIM115

    def add(self, ids: np.ndarray) -> None:
        b = int(self._rng.integers(self.buckets))
        self._ids[b].write(np.ascontiguousarray(ids, dtype=np.int32).tobytes())
        self._lens[b].write(np.int64(len(ids)).tobytes())

    def drain(self) -> Iterator[np.ndarray]:
        for f in self._ids + self._lens:
            f.close()
        for b in range(self.buckets):
            ids = np.fromfile(self.dir / f"b{b:04d}.ids", dtype=np.int32)
            lens = np.fromfile(self.dir / f"b{b:04d}.len", dtype=np.int64)
            offs = np.concatenate([[0], np.cumsum(lens)])
            for i in np.random.default_rng([self.seed, b]).permutation(len(lens)):
                yield ids[offs[i]:offs[i + 1]]
            (self.dir / f"b{b:04d}.ids").unlink()
            (self.dir / f"b{b:04d}.len").unlink()

    def close(self) -> None:
        for f in self._ids + self._lens:
            f.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def prepare(inputs: list[str], tokenizer: str, out_dir: str, *, text_field: str = "text", val_every: int = 50,
            shard_tokens: int = 1 << 24, row_group_tokens: int = 1 << 16, batch_size: int = 128,
            num_tokenizers: int = 0, overwrite: bool = False, progress: bool = True,
            shuffle_seed: int | None = None, start: Callable[[], None] | None = None) -> dict[str, Any]:
    """Tokenize `inputs` into Parquet shards under `out_dir` and write its manifest.json.

    Inputs and `out_dir` may be local paths or URIs (s3://bucket/prefix?endpoint_override=..., storage.py), in
    any mix. Every `val_every`-th document (0 = none) goes to the held-out `val` split, the rest to `train`,
    chosen by input position. With `shuffle_seed`, the train documents are written in a seeded random order
    (`DocShuffler`): raypatch streams shards in order, so a corpus sorted by source or topic would otherwise
    give the patch phase and the token phase different kinds of text. Needs a running Ray cluster, or `start`,
    which is called once the arguments are checked, while the tokenizer loads (`cluster.init_ray`: bad input is
    refused before a cluster starts, and transformers' import overlaps Ray's start).

    Local `out_dir`: the set is built in a temporary sibling and renamed into place when complete, so a failure
    leaves `out_dir` as it was. On a store (no rename there) the manifest is what makes a set: StorePublisher
    writes a marker, removes an old manifest first, uploads each shard as it is finished and the manifest last,
    so a reader never sees a half-written set. Either way an existing set is replaced only with `overwrite`, and
    only when it holds nothing but what raypatch wrote; an `out_dir` that is, holds or lies inside an input file
    or the tokenizer is refused.
    """
    import ray
    from tqdm import tqdm

    if val_every < 0 or shard_tokens <= 0 or row_group_tokens <= 0:
        raise InputError(f"prepare: --val-every must be >= 0 and --shard-tokens > 0 (got {val_every}, "
                         f"{shard_tokens})")
    files = resolve_inputs(inputs)
    storage.check_not_overlapping(out_dir, [("tokenizer", tokenizer), *(("input", f) for f in files)], "--out")
    remote = storage.is_uri(out_dir)
    publisher = StorePublisher(out_dir, overwrite) if remote else None
    if publisher is None:
        check_replaceable(out_dir, overwrite=overwrite, owned=shard_set_files, what="a shard set")
    check_tokenizer_dir(tokenizer)
    with ThreadPoolExecutor(1) as pool:
        loading = pool.submit(tokenizer_info, tokenizer)
        if start is not None:
            start()
        tok = loading.result()
    sources = [{"path": f, "bytes": storage.info(f).size, "sha256": file_sha256(f)} for f in files]
    staging = tempfile.TemporaryDirectory(prefix="raypatch-prepare-") if remote else contextlib.nullcontext()
    with staging as stage_dir, building(Path(stage_dir) / "set" if remote else out_dir) as out, \
            (publisher or contextlib.nullcontext()):
        if publisher is not None:
            publisher.begin()
        # A copy of the tokenizer travels with the shards, so a shard set is self-contained on any node.
        (out / "tokenizer").mkdir()
        tok_files = [f"tokenizer/{f.name}" for f in sorted(Path(tokenizer).iterdir())
                     if f.is_file() and TOKENIZER_FILES.fullmatch(f.name)]
        for name in tok_files:
            shutil.copyfile(Path(tokenizer) / Path(name).name, out / name)
            if publisher is not None:
                publisher.publish(out / name, name, keep=True)
        tok["dir"] = "tokenizer"
        splits, n_docs = _tokenize_into(out, files, tokenizer, tok, text_field=text_field, val_every=val_every,
                                        shard_tokens=shard_tokens, row_group_tokens=row_group_tokens,
                                        batch_size=batch_size, num_tokenizers=num_tokenizers, progress=progress,
                                        shuffle_seed=shuffle_seed, ray=ray, tqdm=tqdm,
                                        on_shard=None if publisher is None else publisher.publish)
        if splits["train"]["tokens"] == 0:
            raise InputError(f"input {', '.join(map(storage.display, inputs))}: the corpus is empty (no non-empty "
                             f"documents)")
        manifest = {"format": FORMAT, "tokenizer": tok, "text_field": text_field, "val_every": val_every,
                    "shuffle_seed": shuffle_seed, "documents": n_docs, "sources": sources, "splits": splits}
        shard_files = [s["file"] for v in splits.values() for s in v["shards"]]
        seal_manifest(manifest, out, tok_files + shard_files)
        text = json.dumps(manifest, indent=1)
        if publisher is not None:
            publisher.finish(manifest["files"], text)
        else:
            (out / MANIFEST).write_text(text)
    if publisher is None:
        replace_dir(out, out_dir)
    return manifest


def seal_manifest(manifest: dict[str, Any], out: Path, files: list[str]) -> dict[str, Any]:
    """Complete a manifest whose set is in `out`: the files it holds (`files` and the manifest), the SHA-256
    of the files that are not shards (the tokenizer copy: shards have theirs in their entries), its content
    id and its checksum."""
    manifest["files"] = [*sorted(files), MANIFEST]
    manifest["file_sha256"] = {f: file_sha256(out / f) for f in sorted(files) if not f.endswith(".parquet")}
    manifest["shards_id"] = shards_id(manifest)
    manifest["checksum"] = manifest_checksum(manifest)
    return manifest


class StorePublisher:
    """Publishes a shard set at a URI prefix, where nothing can be renamed into place.

    Checked first (`__init__`): every object under the prefix must carry a name raypatch writes there
    (shards.OWN_NAMES) and a content that proves it raypatch's (shards.shard_set_files: a shard's footer mark, a
    range read); a complete set (a manifest) is replaced only with overwrite; the leftovers of an interrupted
    prepare (the marker, no manifest) are continued over without it. Then `begin` writes the marker
    and removes an old manifest (from that moment the old set is gone as a whole, never mixed with the new
    one); `publish` uploads each finished file in the background, removing the local copy; `finish` waits
    for them, removes the leftovers it owns that the new set does not list, writes the manifest last and then
    removes the marker.
    """

    def __init__(self, out: str, overwrite: bool) -> None:
        self.out = out
        self.existing = storage.list_files(out)
        foreign = [n for n in self.existing if not OWN_NAMES.fullmatch(n)]
        where = storage.display(out)
        if foreign:  # by name: nothing under the prefix is read
            raise InputError(f"--out {where}: holds {first_few(foreign)}, which raypatch did not write there; "
                             f"choose a new or empty prefix (nothing was changed)")
        if self.existing and MANIFEST not in self.existing and PREPARE_MARKER not in self.existing:
            raise InputError(f"--out {where}: holds shard files without a manifest or raypatch's marker; choose "
                             f"a new or empty prefix (nothing was changed)")
        own = shard_set_files(out) if self.existing else set()
        unproven = [n for n in self.existing if n not in own]
        if unproven:
            raise InputError(f"--out {where}: holds {first_few(unproven)}, which raypatch did not write there (by "
                             f"name and content); choose a new or empty prefix (nothing was changed)")
        if MANIFEST in self.existing and not overwrite:
            raise InputError(f"--out {where}: already holds a shard set (pass --overwrite to replace it)")
        self.resumed = bool(self.existing) and MANIFEST not in self.existing
        self.pool = ThreadPoolExecutor(2, thread_name_prefix="raypatch-upload")
        self.pending: list[Any] = []

    def begin(self) -> None:
        import socket

        from raypatch.console import say

        storage.write_text(storage.join(self.out, PREPARE_MARKER), json.dumps(
            {"writer": "raypatch prepare", "host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}))
        if MANIFEST in self.existing:
            storage.delete_file(storage.join(self.out, MANIFEST))
        if self.resumed:
            say(f"prepare: {storage.display(self.out)} holds an interrupted prepare's output: starting over it")

    def __enter__(self) -> StorePublisher:
        return self

    def __exit__(self, *exc: Any) -> None:
        # On an error: no more uploads (what was uploaded stays, under the marker, for a rerun to go over).
        self.pool.shutdown(wait=True, cancel_futures=True)

    def publish(self, local: Path, name: str | None = None, keep: bool = False) -> None:
        name = name or local.name

        def up() -> None:
            storage.upload(local, storage.join(self.out, name))
            if not keep:
                local.unlink(missing_ok=True)

        self.pending.append(self.pool.submit(up))

    def finish(self, files: list[str], manifest: str) -> None:
        for f in self.pending:
            f.result()
        for stale in sorted(set(self.existing) - set(files) - {PREPARE_MARKER, MANIFEST}):
            storage.delete_file(storage.join(self.out, stale))
        storage.write_text(storage.join(self.out, MANIFEST), manifest)
        storage.delete_file(storage.join(self.out, PREPARE_MARKER))


def _tokenize_into(out: Path, files: list[str], tokenizer: str, tok: dict[str, Any], *, text_field: str,
                   val_every: int, shard_tokens: int, row_group_tokens: int, batch_size: int, num_tokenizers: int,
                   progress: bool, shuffle_seed: int | None, ray: Any, tqdm: Any,
                   on_shard: Callable[[Path], None] | None = None) -> tuple[dict[str, Any], int]:
    """The Ray Data pipeline (read files -> tokenizer actors -> ordered documents) and the shard writers."""
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # the driver must see documents in input order
    ctx.enable_progress_bars = False  # our own bar below counts documents and tokens
    # A corpus of one file gives the actor pool one input block at first; Ray Data warns about that each run.
    warnings.filterwarnings("ignore", message="The minimum number of concurrent actors", category=UserWarning)
    # Blocks of a few MiB: one file's documents must spread over every tokenizer actor, not arrive as one block,
    # yet each block and batch costs the driver and the actors a fixed overhead, so blocks of 4 MiB and batches of
    # 128 documents rather than 1 MiB and 32 (an ad-hoc profile found them faster; prepare_scale.py measures the
    # whole change, not this part alone).
    ctx.target_max_block_size = min(ctx.target_max_block_size or 1 << 30, BLOCK_BYTES)
    # One tokenizer actor per core: tokenizing is nearly all the work, reading (decompress, JSON) a small part of
    # it. Each actor asks for 0.9 CPU so that the reading tasks (0.1) always fit beside them (actors holding
    # every CPU would starve the readers forever). A local cluster raypatch starts advertises more logical CPUs
    # than the machine has cores (init_ray says why); more actors than cores only contend for them.
    cpus = int(ray.available_resources().get("CPU", 1)) if ray.is_initialized() else 1
    if not os.environ.get("RAY_ADDRESS"):
        cpus = min(cpus, os.cpu_count() or 1)
    n = num_tokenizers or max(1, cpus)
    ds = ray.data.from_items([{"file": i, "path": f} for i, f in enumerate(files)], override_num_blocks=len(files))
    ds = ds.flat_map(_read_file, fn_kwargs={"text_field": text_field}, num_cpus=READ_CPUS)
    ds = ds.map_batches(_Tokenize, batch_size=batch_size, fn_constructor_kwargs={"path": tokenizer,
                                                                                "sep": tok["separator"]},
                        compute=ray.data.ActorPoolStrategy(size=n), batch_format="pyarrow",
                        num_cpus=1 - READ_CPUS)

    writers = {"train": ShardWriter(out, "train", shard_tokens, row_group_tokens, on_shard),
               "val": ShardWriter(out, "val", shard_tokens, row_group_tokens, on_shard)}
    shuffler = DocShuffler(out / ".shuffle.tmp", shuffle_seed) if shuffle_seed is not None else None
    n_docs = n_tokens = 0
    pieces: list[np.ndarray] = []  # the pieces so far of a long document
    from raypatch.console import terminal

    term = terminal()
    # In a job log or a pipe every refresh is a new line: refresh rarely there.
    bar = tqdm(desc="prepare", unit=" docs", disable=not progress, file=term,
               mininterval=0.1 if term.isatty() else 10.0)
    try:
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            errors = [e for e in batch.column("error").to_pylist() if e]
            if errors:
                raise InputError(errors[0])
            col = batch.column("input_ids").combine_chunks()
            values = col.values.to_numpy()
            offs = col.offsets.to_numpy()
            lasts = batch.column("last").to_pylist()
            for i in range(len(col)):
                doc = values[offs[i]:offs[i + 1]]
                if not lasts[i]:  # a piece of a long document: its rest follows in order
                    pieces.append(doc.copy())
                    continue
                if pieces:
                    doc, pieces = np.concatenate([*pieces, doc]), []
                if val_every and n_docs % val_every == val_every - 1:
                    writers["val"].add(doc)
                elif shuffler is not None:
                    shuffler.add(doc)
                else:
                    writers["train"].add(doc)
                n_docs += 1
            n_tokens += int(offs[-1] - offs[0])
            bar.update(sum(lasts))
            bar.set_postfix(tokens=f"{n_tokens:,}")
        if shuffler is not None:
            for doc in shuffler.drain():
                writers["train"].add(doc)
    except Exception as e:
        for w in writers.values():
            w.abort()  # close open files; the temporary directory goes with them
        # Ray wraps errors raised in tasks; surface ours as the one-line message it is.
        cause = find_input_error(e)
        if cause is not None:
            raise cause from None
        raise
    finally:
        bar.close()
        if shuffler is not None:
            shuffler.close()
    return {name: w.close() for name, w in writers.items()}, n_docs
