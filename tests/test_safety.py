"""Bad input and safety: every case ends with exit code 2 and one line `raypatch: error: ...` naming the file,
field or checkpoint, with every pre-existing file byte-identical afterwards. Run: pytest tests/test_safety.py

Most cases call the CLI in this process (on the session's Ray cluster); the cases whose errors arise inside
Ray workers also run `raypatch` as a subprocess with its own cluster, to check the terminal shows no traceback.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raypatch.cli import main
from raypatch.prepare import split_long
from raypatch.shards import manifest_checksum, shards_id, tokens_hash

from .conftest import ROOT

# --- helpers ---------------------------------------------------------------------------------------


def snapshot(*roots: Path) -> dict[str, str]:
    """sha256 of every file under the roots (files and directories alike)."""
    out = {}
    for root in roots:
        root = Path(root)
        files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
        for p in files:
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def assert_kept(before: dict[str, str]) -> None:
    """Every file that existed before still exists with the same bytes."""
    after = snapshot(*{Path(p) for p in before})
    changed = [p for p, h in before.items() if after.get(p) != h]
    assert not changed, f"changed or removed: {changed[:5]}"


def refused(capsys, argv: list[str], pattern: str) -> str:
    """Run the CLI in-process: exit 2, one stderr line starting `raypatch: error:` that contains pattern."""
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if "raypatch: error:" in ln]
    # Progress bars may precede it on stderr; the error is one line, the last one, and nothing else says error.
    assert len(lines) == 1 and err.splitlines()[-1].startswith("raypatch: error: "), err
    assert "Traceback" not in err and "Error" not in err.replace(lines[0], ""), err
    assert "\x1b" not in err, "ANSI escape codes on the terminal: " + repr(err)
    assert pattern in lines[0], err
    return lines[0]


def tiny_args(shards: str, storage: Path, name: str, *extra: str) -> list[str]:
    return ["train", "--config", "tiny", "--set", f"data.shards={shards}", f"checkpoint.storage_path={storage}",
            f"checkpoint.name={name}", "data.max_tokens=2048", "eval.max_rows=4", *extra]


def reseal(d: Path) -> None:
    """Rewrite a shard set's manifest to match its shards exactly (what another tool could produce): the
    deeper checks, not the manifest checksum, must then catch what is wrong in the data."""
    m = json.loads((d / "manifest.json").read_text())
    for split in m["splits"].values():
        for s in split["shards"]:
            f = d / s["file"]
            pf = pq.ParquetFile(f)
            vals = [pf.read_row_group(g).column(0).combine_chunks().values.to_numpy(zero_copy_only=False)
                    for g in range(pf.num_row_groups)]
            s["row_group_tokens"] = [len(v) for v in vals]
            s["row_group_hashes"] = [tokens_hash(v) for v in vals]
            s["tokens"], s["bytes"] = sum(map(len, vals)), f.stat().st_size
            s["sha256"] = hashlib.sha256(f.read_bytes()).hexdigest()
        split["tokens"] = sum(s["tokens"] for s in split["shards"])
    m["shards_id"] = shards_id(m)
    m["checksum"] = manifest_checksum(m)
    (d / "manifest.json").write_text(json.dumps(m))


def rewrite_first_shard(d: Path, change) -> None:
    """Apply `change` to the token values of train-00000.parquet, keeping its rows and row groups."""
    f = d / "train-00000.parquet"
    pf = pq.ParquetFile(f)
    groups = [pf.read_row_group(g) for g in range(pf.num_row_groups)]
    with pq.ParquetWriter(f.with_suffix(".new"), groups[0].schema) as w:
        for i, t in enumerate(groups):
            col = t.column(0).combine_chunks()
            vals = col.values.to_numpy(zero_copy_only=False).copy()
            if i == 0:
                change(vals)
            w.write_table(pa.table({"input_ids": pa.ListArray.from_arrays(col.offsets, pa.array(vals))}))
    os.replace(f.with_suffix(".new"), f)


class Evil:
    """Unpickling this runs a shell command: what a crafted checkpoint file would hold."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def craft(ckpt: Path, marker: Path) -> None:
    import torch

    torch.save({"module": Evil(marker)}, ckpt / "ds" / "mp_rank_00_model_states.pt")


def clean_env() -> dict[str, str]:
    """For a subprocess with its own local cluster: nothing pointing at this session's cluster."""
    return {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}


LONE_SURROGATE = json.dumps({"text": "A fine first document."}) + "\n" + json.dumps({"text": "a \ud800 b"}) + "\n"
"""JSONL whose line 2 holds a lone surrogate (`"a \\ud800 b"`): valid JSON, not encodable as UTF-8."""

REMOTE_CODE_PROMPT = "Do you wish to run the custom code"


def plant_remote_code(d: Path, marker: Path, where: str) -> Path:
    """Make `d` name code of its own, as a downloaded model repository can: evil.py writes `marker` when
    imported. where: "config.json" (an unknown model_type with AutoConfig/AutoModelForCausalLM in auto_map),
    "known-type" (the existing config.json, its built-in model_type kept, plus auto_map) or
    "tokenizer_config.json" (AutoTokenizer in auto_map, no built-in tokenizer_class to fall back on)."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n")
    if where == "config.json":
        (d / "config.json").write_text(json.dumps({"model_type": "evil", "auto_map": {
            "AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilForCausalLM"}}))
    elif where == "known-type":
        conf = json.loads((d / "config.json").read_text())
        conf["auto_map"] = {"AutoModelForCausalLM": "evil.EvilForCausalLM"}
        (d / "config.json").write_text(json.dumps(conf))
    else:
        (d / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": ["evil.EvilTokenizer",
                                                                                           None]}}))
    return d


# --- fixtures ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(shards, ray_local, tmp_path_factory):
    """A finished tiny run (4 patch + 4 token steps, 2 workers, ZeRO-2): its run dir and last checkpoint."""
    from raypatch.driver import fit
    from raypatch.presets import load_config

    storage = tmp_path_factory.mktemp("runs")
    cfg = load_config("tiny", tiny_args(shards, storage, "done")[4:])
    summary = fit(cfg)
    run_dir = Path(summary["run_dir"])
    ckpt = max(run_dir.glob("checkpoint-*"))
    return storage, run_dir, ckpt


@pytest.fixture(autouse=True)
def _ray_data_logs_to_this_tests_stderr():
    """Ray Data's console log handler keeps the sys.stderr of the test that first ran a dataset in this process
    (a capsys buffer, closed since): without this, every later in-process `prepare` prints a '--- Logging error
    ---' traceback on the current stderr. Point it at the current one (assigned: setStream would flush the
    closed buffer)."""
    import logging

    for h in logging.getLogger("ray.data").handlers:
        if type(h).__name__ == "PlainRayHandler":
            h.stream = sys.stderr
    yield


@pytest.fixture(scope="module")
def hf_model(tokenizer_dir, tmp_path_factory) -> Path:
    """A model directory as `raypatch export` writes it (the tiny preset's Llama, untrained, safetensors, the
    session's tokenizer, raypatch_meta.json with data.seq_len=32), made without Ray or training."""
    from raypatch.model import build_model
    from raypatch.presets import load_config

    cfg = load_config("tiny", [])
    d = tmp_path_factory.mktemp("hf")
    build_model(cfg.model, seed=0, pretrained=False).save_pretrained(d, safe_serialization=True)
    for f in Path(tokenizer_dir).iterdir():
        shutil.copy(f, d)
    (d / "raypatch_meta.json").write_text(json.dumps({"config": cfg.to_dict()}))
    return d


@pytest.fixture
def answer_yes(monkeypatch) -> list[str]:
    """Every terminal prompt in this process is recorded and answered 'y' (the answer that runs remote code);
    the test asserts that none came."""
    asked: list[str] = []

    def yes(prompt: str = "") -> str:
        asked.append(prompt)
        return "y"

    monkeypatch.setattr("builtins.input", yes)
    return asked


# --- export ------------------------------------------------------------------------------------------


def test_export_refuses_a_directory_with_other_files(run, tmp_path, capsys):
    _, _, ckpt = run
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    before = snapshot(out, ckpt)
    refused(capsys, ["export", "--checkpoint", str(ckpt), "--out", str(out)], "notes.txt, which raypatch did not")
    refused(capsys, ["export", "--checkpoint", str(ckpt), "--out", str(out), "--overwrite"], "did not write")
    assert_kept(before)


@pytest.mark.parametrize("where", ["checkpoint", "run", "inside", "parent"])
def test_export_refuses_outputs_overlapping_the_checkpoint(run, where, capsys):
    storage, run_dir, ckpt = run
    out = {"checkpoint": ckpt, "run": run_dir, "inside": ckpt / "hf", "parent": storage}[where]
    before = snapshot(storage)
    refused(capsys, ["export", "--checkpoint", str(ckpt), "--out", str(out), "--overwrite"],
            {"checkpoint": "is the checkpoint", "run": "contains the checkpoint", "inside": "lies inside the",
             "parent": "contains the checkpoint"}[where])
    assert_kept(before)
    assert not (ckpt / "hf").exists()


def test_export_to_dot_inside_the_run_is_refused(run, capsys, monkeypatch):
    storage, run_dir, ckpt = run
    before = snapshot(storage)
    monkeypatch.chdir(run_dir)
    refused(capsys, ["export", "--checkpoint", str(ckpt), "--out", "."], "contains the checkpoint")
    assert_kept(before)


def test_export_replaces_an_earlier_export_only_when_asked(run, tmp_path, capsys):
    _, _, ckpt = run
    out = tmp_path / "hf"
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(out)]) == 0
    before = snapshot(out)
    refused(capsys, ["export", "--checkpoint", str(ckpt), "--out", str(out)], "already holds an export")
    assert_kept(before)
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(out), "--overwrite"]) == 0
    assert not list(tmp_path.glob(".hf.*")), "no temporary or old copy left beside the output"


def _copy_ckpt(ckpt: Path, dst: Path) -> Path:
    shutil.copytree(ckpt, dst)
    return dst


@pytest.mark.parametrize("damage,pattern", [
    ("no-ds", "no ds/ directory"),
    ("no-meta", "no meta.json"),
    ("bad-meta", "meta.json is damaged"),
    ("missing-shard", "ZeRO shards of ranks [0]"),
    ("truncated", "cannot be read"),
    ("missing-dir", "no such directory"),
])
def test_export_of_a_damaged_checkpoint(run, tmp_path, capsys, damage, pattern):
    _, _, ckpt = run
    c = _copy_ckpt(ckpt, tmp_path / "ckpt")
    if damage == "no-ds":
        shutil.rmtree(c / "ds")
    elif damage == "no-meta":
        (c / "meta.json").unlink()
    elif damage == "bad-meta":
        (c / "meta.json").write_text('{"state": {')
    elif damage == "missing-shard":
        (c / "ds" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    elif damage == "truncated":
        f = c / "ds" / "mp_rank_00_model_states.pt"
        f.write_bytes(f.read_bytes()[:200])
    elif damage == "missing-dir":
        c = tmp_path / "nope"
    before = snapshot(tmp_path)
    refused(capsys, ["export", "--checkpoint", str(c), "--out", str(tmp_path / "out")], pattern)
    assert_kept(before)
    assert not (tmp_path / "out").exists()


def test_crafted_checkpoint_runs_no_code_on_export_or_resume(run, shards, tmp_path, capsys):
    storage, run_dir, ckpt = run
    marker = tmp_path / "PWNED"
    c = _copy_ckpt(ckpt, tmp_path / "evil" / "ckpt")
    craft(c, marker)
    before = snapshot(tmp_path)
    refused(capsys, ["export", "--checkpoint", str(c), "--out", str(tmp_path / "out")],
            "outside the tensor allow-list")
    # Resume: the same file in the newest checkpoint of a run that `raypatch train` would continue.
    evil_run = tmp_path / "runs" / "evil"
    shutil.copytree(run_dir, evil_run, ignore=shutil.ignore_patterns("hf"))
    craft(max(evil_run.glob("checkpoint-*")), marker)
    before |= snapshot(evil_run)
    refused(capsys, tiny_args(shards, tmp_path / "runs", "evil"), "outside the tensor allow-list")
    assert not marker.exists(), "unpickling ran the crafted command"
    assert_kept(before)


def test_resume_on_a_reprepared_shard_set_is_refused(run, shards, corpus, tokenizer_dir, tmp_path, capsys):
    from raypatch.prepare import prepare

    storage, run_dir, _ = run
    other = tmp_path / "reshuffled"
    prepare([str(corpus)], tokenizer_dir, str(other), shard_tokens=40_000, row_group_tokens=3_000, val_every=10,
            shuffle_seed=7, progress=False)
    before = snapshot(run_dir, other)
    err = refused(capsys, tiny_args(str(other), storage, "done"), "was made on another shard set")
    assert str(other) in err and str(shards) in err
    assert_kept(before)


def test_resume_from_an_incomplete_checkpoint_is_refused(run, shards, tmp_path, capsys):
    _, run_dir, _ = run
    broken = tmp_path / "runs" / "broken"
    shutil.copytree(run_dir, broken, ignore=shutil.ignore_patterns("hf"))
    (max(broken.glob("checkpoint-*")) / "ds" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    before = snapshot(broken)
    refused(capsys, tiny_args(shards, tmp_path / "runs", "broken"), "ZeRO shards of ranks [0]")
    assert_kept(before)


def test_evaluate_a_checkpoint_leaves_no_temporary_copy(run, shards, capsys):
    _, _, ckpt = run
    tmp = Path(tempfile.gettempdir())
    before = set(tmp.glob("raypatch-*"))
    assert main(["evaluate", "--model", str(ckpt), "--shards", shards, "--max-rows", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["val"]["rows"] == 2
    assert set(tmp.glob("raypatch-*")) == before


@pytest.mark.parametrize("argv,pattern", [
    (["--max-rows", "0"], "--max-rows must be >= 1"),
    (["--model", "/nonexistent/model"], "no such directory"),
])
def test_evaluate_bad_arguments(run, shards, capsys, argv, pattern):
    _, _, ckpt = run
    args = ["evaluate", "--model", str(ckpt), "--shards", shards, *argv]
    refused(capsys, args, pattern)


# --- prepare and tokenizer ---------------------------------------------------------------------------


def _prepare(corpus, tokenizer_dir, out, *extra) -> list[str]:
    return ["prepare", "--input", str(corpus), "--tokenizer", str(tokenizer_dir), "--out", str(out),
            "--shard-tokens", "40000", *extra]


def test_prepare_refuses_a_directory_with_other_files(corpus, tokenizer_dir, ray_local, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    before = snapshot(out)
    refused(capsys, _prepare(corpus, tokenizer_dir, out, "--overwrite"), "keep.txt, which raypatch did not")
    assert_kept(before)


def test_prepare_overwrite_keeps_foreign_files_in_the_tokenizer_copy(corpus, tokenizer_dir, shards, tmp_path,
                                                                     capsys):
    d = tmp_path / "set"
    shutil.copytree(shards, d)
    (d / "tokenizer" / "my-notes.md").write_text("mine")
    before = snapshot(d)
    refused(capsys, _prepare(corpus, tokenizer_dir, d, "--overwrite"), "tokenizer/my-notes.md")
    assert_kept(before)


def test_prepare_with_the_outputs_own_tokenizer_is_refused(corpus, shards, tmp_path, capsys):
    d = tmp_path / "set"
    shutil.copytree(shards, d)
    before = snapshot(d)
    refused(capsys, _prepare(corpus, d / "tokenizer", d, "--overwrite"), "contains the tokenizer")
    assert_kept(before)


def test_prepare_refuses_an_output_that_holds_the_input(corpus, tokenizer_dir, ray_local, tmp_path, capsys):
    src = tmp_path / "data"
    src.mkdir()
    shutil.copy(corpus, src / "docs.jsonl.gz")
    before = snapshot(src)
    refused(capsys, _prepare(src / "docs.jsonl.gz", tokenizer_dir, src), "contains the input")
    refused(capsys, _prepare(src / "docs.jsonl.gz", tokenizer_dir, src / "docs.jsonl.gz"), "is the input")
    assert_kept(before)


def test_prepare_overwrite_with_bad_input_keeps_the_old_set(shards, tokenizer_dir, tmp_path, capsys):
    d = tmp_path / "set"
    shutil.copytree(shards, d)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"body": "no text"}) + "\n")
    before = snapshot(d)
    refused(capsys, _prepare(bad, tokenizer_dir, d, "--overwrite"), f"{bad}:2: no 'text' field")
    assert_kept(before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "set"], "no temporary directory left"


def test_prepare_overwrite_replaces_its_own_set(corpus, tokenizer_dir, shards, tmp_path, capsys):
    d = tmp_path / "set"
    shutil.copytree(shards, d)
    assert main(_prepare(corpus, tokenizer_dir, d, "--overwrite", "--val-every", "5")) == 0
    m = json.loads((d / "manifest.json").read_text())
    assert m["val_every"] == 5 and sorted(p.name for p in tmp_path.iterdir()) == ["set"]


@pytest.mark.parametrize("case,pattern", [
    ("missing", "no such file"),
    ("no-match", "matches no file"),
    ("bad-gzip", "cannot be decoded"),
    ("bad-json", ":1: invalid JSON"),
    ("not-string", "field 'text' is int, expected a string"),
    ("empty", "the corpus is empty"),
    ("directory", "is a directory"),
    ("suffix", "unsupported file type"),
    ("surrogate", "x.jsonl:2: field 'text' holds a lone surrogate \\ud800 at character 2, which cannot be encoded "
                  "as UTF-8"),
])
def test_prepare_bad_inputs(tokenizer_dir, ray_local, tmp_path, capsys, case, pattern):
    f = tmp_path / {"missing": "nope.jsonl", "no-match": "*.jsonl", "bad-gzip": "x.jsonl.gz", "bad-json": "x.jsonl",
                    "not-string": "x.jsonl", "empty": "x.jsonl", "directory": "dir", "suffix": "x.csv",
                    "surrogate": "x.jsonl"}[case]
    if case == "bad-gzip":
        f.write_bytes(b"not gzip")
    elif case == "bad-json":
        f.write_text("{not json\n")
    elif case == "not-string":
        f.write_text(json.dumps({"text": 3}) + "\n")
    elif case == "empty":
        f.write_text(json.dumps({"text": ""}) + "\n")
    elif case == "directory":
        f.mkdir()
    elif case == "suffix":
        f.write_text("a,b\n")
    elif case == "surrogate":  # found in a Ray Data read task: it must travel out as data, not as a traceback
        f.write_text(LONE_SURROGATE)
    before = snapshot(tmp_path)
    refused(capsys, _prepare(f, tokenizer_dir, tmp_path / "out"), pattern)
    assert_kept(before)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case,pattern", [
    ("no-tokenizer", "not a local Hugging Face tokenizer directory"),
    ("broken-tokenizer", "cannot be loaded"),
    ("val-every", "--val-every must be >= 0"),
])
def test_prepare_bad_tokenizer_or_flags(corpus, tokenizer_dir, ray_local, tmp_path, capsys, case, pattern):
    tok, extra = Path(tokenizer_dir), []
    if case == "no-tokenizer":
        tok = tmp_path / "meta-llama"
    elif case == "broken-tokenizer":
        tok = tmp_path / "tok"
        shutil.copytree(tokenizer_dir, tok)
        (tok / "tokenizer.json").write_text("{broken")
    else:
        extra = ["--val-every", "-1"]
    before = snapshot(tmp_path)
    refused(capsys, _prepare(corpus, tok, tmp_path / "out", *extra), pattern)
    assert_kept(before)


def test_tokenizer_train_keeps_existing_files(corpus, tmp_path, capsys):
    out = tmp_path / "tok"
    out.mkdir()
    (out / "README.md").write_text("mine")
    before = snapshot(out)
    args = ["tokenizer", "train", "--input", str(corpus), "--out", str(out), "--vocab-size", "300"]
    refused(capsys, args, "README.md, which raypatch did not")
    refused(capsys, [*args[:-1], "10"], "--vocab-size 10")
    assert_kept(before)


# --- --overwrite replaces only what raypatch provably wrote (by name and content) -------------------------
# Each output is made here as raypatch writes it, without Ray or training, then edited as a user (or the tester)
# could: the refusal must come before anything starts, name the file, and leave every byte in place.


def own_set(d: Path, tokenizer_dir: str) -> Path:
    """A small shard set as `raypatch prepare` writes it: ShardWriter's shards (random token ids), a copy of
    the tokenizer and the sealed manifest."""
    from raypatch.prepare import ShardWriter, seal_manifest
    from raypatch.shards import FORMAT

    (d / "tokenizer").mkdir(parents=True)
    tok_files = []
    for f in sorted(Path(tokenizer_dir).iterdir()):
        shutil.copyfile(f, d / "tokenizer" / f.name)
        tok_files.append(f"tokenizer/{f.name}")
    rng, splits = np.random.default_rng(0), {}
    for split, docs in (("train", 40), ("val", 5)):
        w = ShardWriter(d, split, shard_tokens=1_000, row_group_tokens=300)
        for _ in range(docs):
            w.add(rng.integers(0, 512, int(rng.integers(20, 80))).astype(np.int32))
        splits[split] = w.close()
    m = {"format": FORMAT, "tokenizer": {"vocab_size": 512, "fingerprint": "f" * 64, "dir": "tokenizer"},
         "splits": splits}
    seal_manifest(m, d, tok_files + [s["file"] for v in splits.values() for s in v["shards"]])
    (d / "manifest.json").write_text(json.dumps(m, indent=1))
    return d


def forge(d: Path, edit=lambda m: None) -> None:
    """What the tester did: edit the manifest, then make it agree with the files on disk (every shard entry's
    size, SHA-256 and, for a Parquet file with input_ids, its row groups; the tokenizer copy's hashes; the
    content id; the checksum), as anyone can: the manifest has no key."""
    m = json.loads((d / "manifest.json").read_text())
    edit(m)
    for split in m["splits"].values():
        for s in split["shards"]:
            f = d / s["file"]
            s["bytes"], s["sha256"] = f.stat().st_size, hashlib.sha256(f.read_bytes()).hexdigest()
            try:
                pf = pq.ParquetFile(f)
                vals = [pf.read_row_group(g).column("input_ids").combine_chunks().values.to_numpy()
                        for g in range(pf.num_row_groups)]
            except (pa.ArrowException, KeyError):
                continue
            s["row_group_tokens"], s["row_group_hashes"] = [len(v) for v in vals], [tokens_hash(v) for v in vals]
            s["tokens"], s["rows"] = sum(map(len, vals)), pf.metadata.num_rows
        split["tokens"] = sum(s["tokens"] for s in split["shards"])
    if "file_sha256" in m:
        m["file_sha256"] = {f: hashlib.sha256((d / f).read_bytes()).hexdigest() for f in m["file_sha256"]}
    m["shards_id"] = shards_id(m)
    m["checksum"] = manifest_checksum(m)
    (d / "manifest.json").write_text(json.dumps(m, indent=1))


def test_overwrite_proves_its_own_outputs_by_content(tokenizer_dir, tmp_path, monkeypatch):
    """A shard set, a set from before the footer mark, an export, an export from before its file list and a
    trained tokenizer: every file proven raypatch's, so each may be replaced (on a store too, file://)."""
    import raypatch.prepare as P
    from raypatch.checkpoint import export_files
    from raypatch.safety import check_replaceable, files_under
    from raypatch.shards import FORMAT, shard_set_files

    d = own_set(tmp_path / "set", tokenizer_dir)
    for f in d.glob("*.parquet"):  # the mark names the file; nothing else in it, so prepare stays reproducible
        assert pq.ParquetFile(f).metadata.metadata[b"raypatch.shard"] == \
            json.dumps({"file": f.name, "format": FORMAT}, sort_keys=True).encode()
    monkeypatch.setattr(P, "shard_mark", lambda name: {})  # ShardWriter as it was before the mark
    old = own_set(tmp_path / "old", tokenizer_dir)
    monkeypatch.undo()
    assert not any(b"raypatch.shard" in (pq.ParquetFile(f).metadata.metadata or {}) for f in old.glob("*.parquet"))
    forge(old, lambda m: m.pop("file_sha256"))  # nor the tokenizer copy's hashes
    exp, old_exp = own_export(tmp_path / "hf", tokenizer_dir), own_export(tmp_path / "hf-old", tokenizer_dir)
    meta = json.loads((old_exp / "raypatch_meta.json").read_text())
    (old_exp / "raypatch_meta.json").write_text(json.dumps({"state": meta["state"], "config": meta["config"]}))
    tok = tmp_path / "tok"
    shutil.copytree(tokenizer_dir, tok)
    for out, owned in [(d, shard_set_files), (old, shard_set_files), (exp, export_files), (old_exp, export_files),
                       (tok, P.tokenizer_files)]:
        assert owned(out) == set(files_under(out)), out
        check_replaceable(out, overwrite=True, owned=owned, what="it")
    for out in (d, old):
        P.StorePublisher(f"file://{out}", overwrite=True).pool.shutdown()


@pytest.mark.parametrize("case,user", [
    ("listed-notes", "notes.txt"),  # the tester's attack: a manifest edited to list a user's file, re-checksummed
    ("listed-new-shard", "train-00009.parquet"),  # a user's file named like a shard, listed with an entry
    ("shard-not-parquet", "train-00000.parquet"),
    ("shard-other-parquet", "train-00000.parquet"),  # a real Parquet file with other columns
    ("shard-token-parquet", "train-00000.parquet"),  # the user's own token ids, as pyarrow writes them by default
    ("shard-of-another-name", "train-00000.parquet"),  # raypatch's train-00001 copied under another name
    ("tokenizer-file", "tokenizer/tokenizer.json"),
    ("symlink", "train-00000.parquet"),  # a link to a raypatch shard kept elsewhere: raypatch writes no links
])
def test_prepare_overwrite_deletes_nothing_it_cannot_prove_its_own(case, user, corpus, tokenizer_dir, tmp_path,
                                                                   capsys):
    from raypatch.prepare import StorePublisher
    from raypatch.safety import InputError

    d = own_set(tmp_path / "set", tokenizer_dir)
    f = d / user
    if case == "listed-notes":
        f.write_text("my notes")
        forge(d, lambda m: m["files"].append(user))
    elif case == "listed-new-shard":
        f.write_bytes(b"my data")
        entry = {**json.loads((d / "manifest.json").read_text())["splits"]["train"]["shards"][0], "file": user}
        forge(d, lambda m: (m["files"].append(user), m["splits"]["train"]["shards"].append(entry)))
    elif case == "shard-not-parquet":
        f.write_bytes(b"my data, not Parquet")
    elif case == "shard-other-parquet":
        pq.write_table(pa.table({"text": ["my document"] * 3}), f)
    elif case == "shard-token-parquet":
        pq.write_table(pa.table({"input_ids": pa.array([[1, 2, 3, 4]] * 50, pa.list_(pa.int32()))}), f)
    elif case == "shard-of-another-name":
        shutil.copyfile(d / "train-00001.parquet", f)
    elif case == "tokenizer-file":
        f.write_text('{"my": "notes"}')
    elif case == "symlink":
        kept = tmp_path / "kept.parquet"
        shutil.move(f, kept)
        f.symlink_to(kept)
    forge(d)
    before = snapshot(d, *([tmp_path / "kept.parquet"] if case == "symlink" else []))
    refused(capsys, _prepare(corpus, tokenizer_dir, d, "--overwrite"), f"holds {user}")
    assert_kept(before)
    if case != "symlink":  # the same proof on a store (here file://): refused before anything is written
        with pytest.raises(InputError, match=f"holds {user}, which raypatch did not write there"):
            StorePublisher(f"file://{d}", overwrite=True)
        assert_kept(before)


def own_export(d: Path, tokenizer_dir: str, hashes: bool = False) -> Path:
    """A directory as `raypatch export` writes it (the tiny preset's model in float32 safetensors, the
    tokenizer, raypatch_meta.json listing the files, and with `hashes` their SHA-256 as export_hf records them
    now), made without a checkpoint."""
    import hashlib

    from raypatch.model import build_model
    from raypatch.presets import load_config
    from raypatch.safety import files_under
    from raypatch.tokenizer import load_tokenizer

    cfg = load_config("tiny", [])
    d.mkdir()
    load_tokenizer(tokenizer_dir).save_pretrained(d)
    build_model(cfg.model, seed=0, pretrained=False).save_pretrained(d, safe_serialization=True)
    sums = {"sha256": {f: hashlib.sha256((d / f).read_bytes()).hexdigest() for f in files_under(d)}} if hashes \
        else {}
    (d / "raypatch_meta.json").write_text(json.dumps({"state": {"global_step": 8}, "config": cfg.to_dict(),
                                                      "files": [*files_under(d), "raypatch_meta.json"], **sums}))
    return d


@pytest.mark.parametrize("case,user", [
    ("listed-notes", "notes.txt"),  # raypatch_meta.json edited to list a user's file
    ("listed-weights", "model-00001-of-00002.safetensors"),  # a user's name fitting an export's, listed
    ("other-weights", "model.safetensors"),  # a user's safetensors of another model
    ("not-safetensors", "model.safetensors"),
    ("other-config", "config.json"),  # a user's config of another size
    ("tokenizer-file", "tokenizer.json"),
    ("hashed-other-model", "model.safetensors"),  # the same shapes, other weights: the recorded hash differs
])
def test_export_overwrite_deletes_nothing_it_cannot_prove_its_own(case, user, tokenizer_dir, tmp_path, capsys):
    from safetensors.numpy import save_file

    from raypatch.model import build_model
    from raypatch.presets import load_config

    d = own_export(tmp_path / "hf", tokenizer_dir, hashes=case.startswith("hashed"))
    f = d / user
    if case == "hashed-other-model":
        build_model(load_config("tiny", []).model, seed=1, pretrained=False).save_pretrained(
            tmp_path / "other", safe_serialization=True)
        shutil.copy(tmp_path / "other" / user, f)
    elif case.startswith("listed"):
        f.write_bytes(b"mine")
        meta = json.loads((d / "raypatch_meta.json").read_text())
        (d / "raypatch_meta.json").write_text(json.dumps({**meta, "files": [*meta["files"], user]}))
    elif case == "other-weights":
        save_file({"w": np.ones((4, 4), np.float32)}, str(f))
    elif case == "not-safetensors":
        f.write_bytes(b"my weights")
    elif case == "other-config":
        conf = json.loads(f.read_text())
        f.write_text(json.dumps({**conf, "hidden_size": 2 * conf["hidden_size"]}))
    elif case == "tokenizer-file":
        f.write_text("my notes")
    before = snapshot(d)
    refused(capsys, ["export", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(d), "--overwrite"],
            f"holds {user}")
    assert_kept(before)


@pytest.mark.parametrize("case,user", [
    ("other-tokenizer", "tokenizer.json"),  # a valid tokenizer that `tokenizer train` does not make
    ("other-config", "tokenizer_config.json"),
    ("not-json", "tokenizer.json"),
])
def test_tokenizer_train_overwrite_replaces_only_its_own_tokenizer(case, user, corpus, tokenizer_dir, tmp_path,
                                                                   capsys):
    from tokenizers import Tokenizer, models

    d = tmp_path / "tok"
    shutil.copytree(tokenizer_dir, d)
    args = ["tokenizer", "train", "--input", str(corpus), "--out", str(d), "--vocab-size", "300", "--overwrite"]
    if case == "other-tokenizer":
        (d / user).write_text(Tokenizer(models.WordLevel({"my": 0, "[UNK]": 1}, unk_token="[UNK]")).to_str())
    elif case == "other-config":
        (d / user).write_text(json.dumps({**json.loads((d / user).read_text()), "model_max_length": 2048}))
    else:
        (d / user).write_text("my notes")
    before = snapshot(d)
    refused(capsys, args, f"holds {user}")
    assert_kept(before)


def test_tokenizer_train_overwrite_replaces_its_own(corpus, tokenizer_dir, tmp_path):
    d = tmp_path / "tok"
    shutil.copytree(tokenizer_dir, d)
    args = ["tokenizer", "train", "--input", str(corpus), "--out", str(d), "--vocab-size", "300", "--overwrite"]
    assert main(args) == 0
    assert len(json.loads((d / "tokenizer.json").read_text())["model"]["vocab"]) == 300
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"]


def test_long_documents_tokenize_in_pieces_to_the_same_ids(tokenizer_dir):
    from raypatch.prepare import _Tokenize

    doc = " ".join(json.loads(line)["text"].replace("\n", " ") for line in gzip.open(
        ROOT / "raypatch" / "corpus" / "python-docs-sample.jsonl.gz", "rt"))[:300_000]
    pieces = list(split_long(doc, piece=20_000))
    assert len(pieces) >= 15 and "".join(pieces) == doc and max(map(len, pieces)) <= 20_000
    tok = _Tokenize(tokenizer_dir, {"bos": None, "eos": 0})
    whole = tok.backend.encode(doc, add_special_tokens=False).ids
    assert np.concatenate([tok.backend.encode(p, add_special_tokens=False).ids for p in pieces]).tolist() == whole
    assert list(split_long("short doc", piece=20_000)) == ["short doc"]
    assert "".join(split_long("x" * 50_000, piece=20_000)) == "x" * 50_000  # no space: cut at the limit


def test_prepare_joins_the_pieces_of_a_long_document(tokenizer_dir, ray_local, tmp_path):
    from raypatch.prepare import PIECE_CHARS, _Tokenize, prepare
    from raypatch.tokenizer import load_tokenizer

    text = " ".join(json.loads(line)["text"] for line in gzip.open(
        ROOT / "raypatch" / "corpus" / "python-docs-sample.jsonl.gz", "rt"))
    long_doc = (text * 3)[: 2 * PIECE_CHARS + 12345]  # three pieces
    src = tmp_path / "docs.jsonl"
    src.write_text("\n".join(json.dumps({"text": t}) for t in ["short one", long_doc, "short two"]) + "\n")
    m = prepare([str(src)], tokenizer_dir, str(tmp_path / "out"), val_every=0, progress=False)
    rows = [r for s in m["splits"]["train"]["shards"]
            for r in pq.read_table(tmp_path / "out" / s["file"]).column(0).to_pylist()]
    eos = load_tokenizer(tokenizer_dir).eos_token_id
    backend = _Tokenize(tokenizer_dir, {"bos": None, "eos": eos}).backend
    assert m["documents"] == 3 and len(rows) == 3
    assert rows[1] == backend.encode(long_doc, add_special_tokens=False).ids + [eos]
    assert rows[2] == backend.encode("short two", add_special_tokens=False).ids + [eos]


# --- remote code, encodings, empty evaluations ---------------------------------------------------------


def _docs(tmp_path: Path) -> Path:
    """A JSONL of real text (the embedded WikiText sample's first documents): enough for evaluate's rows."""
    f = tmp_path / "docs.jsonl"
    with gzip.open(ROOT / "raypatch" / "corpus" / "wikitext103-test-sample.jsonl.gz", "rt") as src:
        f.write_text("".join(next(src) for _ in range(3)))
    return f


@pytest.mark.parametrize("where,pattern", [
    ("config.json", "config.json names remote code (auto_map: AutoConfig -> evil.EvilConfig"),
    ("known-type", "config.json names remote code (auto_map: AutoModelForCausalLM -> evil.EvilForCausalLM)"),
    ("tokenizer_config.json", "tokenizer_config.json names remote code (auto_map: AutoTokenizer"),
])
def test_model_directories_naming_remote_code_are_refused(hf_model, tmp_path, capsys, answer_yes, where, pattern):
    """evaluate --model, and train's model.init_from / model.hf_config on the same directory: one line naming
    the file; the directory's evil.py is never imported and nothing asks on the terminal."""
    marker = tmp_path / "RAN"
    d = tmp_path / "model"
    shutil.copytree(hf_model, d)
    plant_remote_code(d, marker, where)
    docs = _docs(tmp_path)
    before = snapshot(tmp_path)
    line = refused(capsys, ["evaluate", "--model", str(d), "--text", str(docs)], pattern)
    assert f"--model {d}: {d}/{'tokenizer_config' if 'tokenizer' in where else 'config'}.json" in line
    assert "trust_remote_code=False" in line
    assert ("its model_type 'llama' is built into transformers: remove auto_map" in line) == (where == "known-type")
    for field in ("init_from", "hf_config"):
        refused(capsys, ["train", "--config", "tiny", "--set", f"model.{field}={d}",
                         f"checkpoint.storage_path={tmp_path / 'runs'}"], f"'model.{field}': {d}/")
    assert not marker.exists() and not any(m.rsplit(".", 1)[-1] == "evil" for m in sys.modules), "code ran"
    assert not answer_yes, answer_yes
    assert_kept(before)
    assert not (tmp_path / "runs").exists()


def test_remote_code_is_refused_without_a_prompt_on_a_real_terminal(hf_model, tmp_path):
    """`raypatch evaluate` as a process, stdin closed: one line, exit 2, no prompt, no traceback, nothing run."""
    marker = tmp_path / "RAN"
    d = tmp_path / "model"
    shutil.copytree(hf_model, d)
    plant_remote_code(d, marker, "config.json")
    p = subprocess.run([sys.executable, "-m", "raypatch.cli", "evaluate", "--model", str(d), "--text",
                        str(_docs(tmp_path))], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                       env=clean_env(), timeout=300)
    both = p.stdout + p.stderr
    assert p.returncode == 2, both[-3000:]
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("raypatch: error:")]
    assert len(lines) == 1 and f"{d}/config.json names remote code" in lines[0], both[-3000:]
    assert REMOTE_CODE_PROMPT not in both and "Traceback" not in both and "\x1b" not in both, both[-3000:]
    assert not marker.exists() and p.stdout == ""


def test_every_transformers_load_refuses_remote_code_itself(hf_model, tokenizer_dir, tmp_path, monkeypatch,
                                                             answer_yes):
    """Behind the up-front check: with it switched off, each load raypatch makes (evaluate's model, the
    tokenizer, init_from's weights) passes trust_remote_code=False, so transformers refuses without asking."""
    import raypatch.hfdir as hfdir
    import raypatch.tokenizer
    from raypatch.cli import _load_causal_lm
    from raypatch.config import ModelConfig
    from raypatch.tokenizer import load_tokenizer

    for module in (hfdir, raypatch.tokenizer):  # each imported the check by name
        monkeypatch.setattr(module, "check_no_remote_code", lambda *a, **k: None)
    marker = tmp_path / "RAN"
    model = tmp_path / "model"
    shutil.copytree(hf_model, model)
    plant_remote_code(model, marker, "config.json")
    tok = tmp_path / "tok"
    shutil.copytree(tokenizer_dir, tok)
    plant_remote_code(tok, marker, "tokenizer_config.json")
    with pytest.raises(ValueError, match="custom code"):
        _load_causal_lm(model)
    with pytest.raises(ValueError, match="custom code"):
        hfdir.load_pretrained(ModelConfig(init_from=str(model)))
    with pytest.raises(ValueError, match="contains custom code"):
        load_tokenizer(str(tok))
    assert not answer_yes and not marker.exists()


def test_export_of_a_checkpoint_whose_tokenizer_names_remote_code(run, tokenizer_dir, tmp_path, capsys,
                                                                   answer_yes):
    """meta.json's tokenizer_dir pointing at a directory that names remote code: export (and evaluate of the
    checkpoint) refuse it before consolidating anything; no output, nothing run, nothing asked."""
    from raypatch.checkpoint import META

    _, _, ckpt = run
    marker = tmp_path / "RAN"
    tok = tmp_path / "tok"
    shutil.copytree(tokenizer_dir, tok)
    plant_remote_code(tok, marker, "tokenizer_config.json")
    c = _copy_ckpt(ckpt, tmp_path / "ckpt")
    meta = json.loads((c / META).read_text())
    meta["tokenizer_dir"] = str(tok)
    (c / META).write_text(json.dumps(meta))
    docs = _docs(tmp_path)
    before = snapshot(tmp_path)
    pattern = f"tokenizer {tok}: {tok}/tokenizer_config.json names remote code"
    refused(capsys, ["export", "--checkpoint", str(c), "--out", str(tmp_path / "out")], pattern)
    refused(capsys, ["evaluate", "--model", str(c), "--text", str(docs)], pattern)
    assert not (tmp_path / "out").exists()
    assert not marker.exists() and not answer_yes
    assert_kept(before)


@pytest.mark.parametrize("command", ["tokenizer", "evaluate"])
def test_a_lone_surrogate_is_one_line_naming_file_and_line(hf_model, tmp_path, capsys, command):
    """`tokenizer train` and `evaluate --text` (prepare's case, inside Ray Data: test_prepare_bad_inputs)."""
    f = tmp_path / "docs.jsonl"
    f.write_text(LONE_SURROGATE)
    argv = {"tokenizer": ["tokenizer", "train", "--input", str(f), "--out", str(tmp_path / "tok"),
                          "--vocab-size", "300"],
            "evaluate": ["evaluate", "--model", str(hf_model), "--text", str(f)]}[command]
    before = snapshot(tmp_path)
    refused(capsys, argv, f"{f}:2: field 'text' holds a lone surrogate \\ud800 at character 2, which cannot be "
                          f"encoded as UTF-8")
    assert_kept(before)
    assert not (tmp_path / "tok").exists()


@pytest.mark.parametrize("extra,pattern", [
    ([], "no row of 32 tokens (data.seq_len, the model's training context) could be made from --text "),
    (["--seq-len", "4096"], "no row of 4096 tokens (--seq-len) could be made from --text "),
])
def test_evaluate_on_too_little_text_is_refused(hf_model, tmp_path, capsys, extra, pattern):
    """Documents shorter than one row: an error, not `rows 0, loss 0.0, ppl 1.0`. Enough text scores."""
    short = tmp_path / "short.jsonl"
    short.write_text(json.dumps({"text": "Too short."}) + "\n" + json.dumps({"text": "Also short."}) + "\n")
    line = refused(capsys, ["evaluate", "--model", str(hf_model), "--text", str(short), *extra], pattern)
    assert line.endswith(f"--text {short}: fewer tokens than one row there (evaluate on more text, or give a "
                         f"smaller --seq-len)"), line
    assert main(["evaluate", "--model", str(hf_model), "--text", str(_docs(tmp_path)), "--max-rows", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["text"]["rows"] == 2


# --- config, names and the other commands ----------------------------------------------------------


@pytest.mark.parametrize("override,pattern", [
    ("checkpoint.name=..", "'checkpoint.name': must be one plain path component"),
    ("checkpoint.name=a/b", "'checkpoint.name': must be one plain path component"),
    ("checkpoint.name=.hidden", "'checkpoint.name': must be one plain path component"),
    ("eval.max_rows=-1", "'eval.max_rows': must be >= 1"),
    ("no.such.key=1", "'no.such.key': unknown key"),
    ("optim.lr=fast", "'optim.lr': expected a float"),
])
def test_bad_overrides(shards, tmp_path, capsys, override, pattern):
    before = snapshot(tmp_path)
    refused(capsys, tiny_args(shards, tmp_path, "x", override), pattern)
    assert_kept(before)
    assert not (tmp_path / "x").exists() and not (tmp_path.parent / "metrics.jsonl").exists()


def test_storage_path_that_is_a_file(shards, ray_local, tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("not a directory")
    before = snapshot(tmp_path)
    refused(capsys, tiny_args(shards, f, "x"), f"'checkpoint.storage_path': {f} is a file")
    refused(capsys, tiny_args(shards, f / "sub", "x"), f"'checkpoint.storage_path': {f} is a file")
    assert_kept(before)


def test_run_directory_over_the_shards_is_refused(shards, capsys):
    d = Path(shards)
    before = snapshot(d)
    refused(capsys, tiny_args(shards, d.parent, d.name), "is the shard set")
    refused(capsys, tiny_args(shards, d, "run"), "lies inside the shard set")
    assert_kept(before)


@pytest.mark.parametrize("text,pattern", [
    ("model: {hidden_size: 64\n", "not valid YAML at line"),
    ("preset: tiny\ndata:\n  shards: null\n", "'data.shards': empty (null)"),
    ("preset: tiny\ndata:\n  shards:\n", "'data.shards': empty (null)"),
    ("preset: nope\n", "unknown preset 'nope'"),
    ("- a\n- b\n", "expected a mapping at the top level"),
])
def test_bad_config_files(tmp_path, capsys, text, pattern):
    f = tmp_path / "run.yaml"
    f.write_text(text)
    refused(capsys, ["train", "--config", str(f)], pattern)
    assert f.read_text() == text


@pytest.mark.parametrize("argv,pattern", [
    (["--name", "../../escape"], "--name: '../../escape' is not a plain name"),
    (["--name", "x/y"], "--name: 'x/y' is not a plain name"),
    (["--search", "random", "--budget", "0"], "--budget 0: must be > 0"),
    (["--budget", "-5"], "--budget -5: must be > 0"),
])
def test_bad_tune_arguments(shards, tmp_path, capsys, argv, pattern):
    args = ["tune", "--config", "tiny", "--set", f"data.shards={shards}", f"checkpoint.storage_path={tmp_path}",
            "--budget", "4096", *argv]
    refused(capsys, args, pattern)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv,pattern", [
    (["--budget", "1e6", "--corpus-tokens", "0"], "--corpus-tokens must be > 0"),
    (["--budget", "0", "--corpus-tokens", "100"], "--budget and --corpus-tokens must be > 0"),
    (["--budget", "1e6", "--corpus-tokens", "100", "--k", "four"], "--k 'four': expected comma-separated int"),
    (["--budget", "1e6", "--corpus-tokens", "100", "--lam", "1.5"], "--lam values in [0, 1)"),
    (["--budget", "1e6", "--corpus-tokens", "100", "--experiment", "/nonexistent"], "no results.csv"),
    (["--budget", "1e6", "--corpus-tokens", "100", "--schedule", "4:0.5,2:0.5"], "--schedule '4:0.5,2:0.5': needs"),
    (["--budget", "1e6", "--corpus-tokens", "100", "--schedule", "4:0.5,1:0.6"], "shares must be in (0, 1] and sum"),
])
def test_bad_plan_arguments(capsys, argv, pattern):
    refused(capsys, ["plan", *argv], pattern)


# --- shard integrity ------------------------------------------------------------------------------------


@pytest.mark.parametrize("edit,pattern", [
    ("sha256", "edited after `raypatch prepare`"),
    ("tokens", "edited after `raypatch prepare`"),
    ("resealed-tokens", "malformed manifest"),
    ("float-column", "expected list<int32> token ids"),
    ("missing-shard", "listed in the manifest but missing on disk"),
    ("not-json", "not valid JSON"),
    ("truncated-row-group", "row group 0 holds"),
])
def test_damaged_shard_sets_are_refused_before_any_worker_starts(shards, tmp_path, capsys, edit, pattern):
    d = tmp_path / "set"
    shutil.copytree(shards, d)
    m = json.loads((d / "manifest.json").read_text())
    s0 = m["splits"]["train"]["shards"][0]
    if edit == "sha256":
        s0["sha256"] = "0" * 64
    elif edit in ("tokens", "resealed-tokens"):
        s0["tokens"] += 100
        m["splits"]["train"]["tokens"] += 100
        if edit == "resealed-tokens":
            m["checksum"] = manifest_checksum(m)
    elif edit == "float-column":
        pq.write_table(pa.table({"input_ids": pa.array([[1.5, 2.5]] * 4, pa.list_(pa.float32()))}), d / s0["file"])
    elif edit == "missing-shard":
        (d / s0["file"]).unlink()
    elif edit == "truncated-row-group":  # the file lost tokens; its size and sha256 were "fixed" in the manifest
        t = pq.read_table(d / s0["file"])
        pq.write_table(t.slice(1), d / s0["file"], row_group_size=t.num_rows)
        s0["bytes"] = (d / s0["file"]).stat().st_size
        s0["sha256"] = hashlib.sha256((d / s0["file"]).read_bytes()).hexdigest()
        s0["row_group_tokens"], s0["row_group_hashes"] = [s0["tokens"]], ["0" * 32]
        m["checksum"] = manifest_checksum(m)
    if edit == "not-json":
        (d / "manifest.json").write_text("{")
    else:
        (d / "manifest.json").write_text(json.dumps(m))
    if edit == "float-column":
        reseal(d)
    before = snapshot(d)
    refused(capsys, tiny_args(str(d), tmp_path / "runs", "x"), pattern)
    assert_kept(before)
    assert not (tmp_path / "runs" / "x").exists()


def test_flipped_bit_stops_training_with_one_line(shards, ray_local, tmp_path, capsys):
    d = tmp_path / "set"
    shutil.copytree(shards, d)
    f = d / "train-00000.parquet"
    chunk = pq.ParquetFile(f).metadata.row_group(0).column(0)  # the first row group: the run's first blocks
    data = bytearray(f.read_bytes())
    data[chunk.data_page_offset + chunk.total_compressed_size // 2] ^= 0x10  # same size: sizes cannot tell
    f.write_bytes(bytes(data))
    before = snapshot(d)
    err = refused(capsys, tiny_args(str(d), tmp_path / "runs", "flip"), "train-00000.parquet: row group")
    assert "hash" in err or "cannot be decoded" in err or "holds" in err
    assert_kept(before)
    assert not list((tmp_path / "runs" / "flip").glob("checkpoint-*")), "no checkpoint of a run on damaged data"


def test_token_ids_outside_the_vocab_stop_all_workers_without_retries(shards, ray_local, tmp_path, capsys):
    d = tmp_path / "set"
    shutil.copytree(shards, d)
    rewrite_first_shard(d, lambda v: v.__setitem__(5, 100_000))
    reseal(d)
    before = snapshot(d)
    refused(capsys, tiny_args(str(d), tmp_path / "runs", "vocab", "checkpoint.max_failures=3"),
            "token id 100000 is outside the model's vocabulary [0, 512)")
    assert_kept(before)
    d2 = tmp_path / "neg"
    shutil.copytree(shards, d2)
    rewrite_first_shard(d2, lambda v: v.__setitem__(700, -3))
    reseal(d2)
    refused(capsys, tiny_args(str(d2), tmp_path / "runs", "neg"), "token id -3 is outside")


# --- the terminal of a real `raypatch` process -----------------------------------------------------------


@pytest.mark.ray
def test_worker_errors_reach_the_terminal_as_one_line(shards, tokenizer_dir, tmp_path):
    """A subprocess with its own cluster (worker logs shown): bad ids inside the workers, and a bad line found
    inside a Ray Data task of prepare. stderr holds the one line; no traceback anywhere on the terminal."""
    d = tmp_path / "set"
    shutil.copytree(shards, d)
    rewrite_first_shard(d, lambda v: v.__setitem__(5, 100_000))
    reseal(d)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"body": "x"}) + "\n")
    surrogate = tmp_path / "surrogate.jsonl"
    surrogate.write_text(LONE_SURROGATE)
    cases = [(tiny_args(str(d), tmp_path / "runs", "vocab", "checkpoint.max_failures=2"), "token id 100000"),
             (_prepare(bad, tokenizer_dir, tmp_path / "out"), f"{bad}:2: no 'text' field"),
             (_prepare(surrogate, tokenizer_dir, tmp_path / "out"), f"{surrogate}:2: field 'text' holds a lone")]
    for argv, pattern in cases:
        p = subprocess.run([sys.executable, "-m", "raypatch.cli", *argv], capture_output=True, text=True,
                           env=clean_env(), timeout=600)
        assert p.returncode == 2, p.stderr[-3000:]
        lines = [ln for ln in p.stderr.splitlines() if ln.startswith("raypatch: error:")]
        assert len(lines) == 1 and pattern in lines[0], p.stderr[-3000:]
        assert "Traceback" not in p.stdout + p.stderr, (p.stdout + p.stderr)[-3000:]
        assert "\x1b" not in lines[0], lines[0]


def test_local_cluster_listens_on_loopback_only(ray_local):
    import psutil

    me = psutil.Process()
    names = {p.pid: p.name() for p in [me, *me.children(recursive=True)]}
    listening = [c for c in psutil.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN and c.pid in names]
    assert {"gcs_server", "raylet"} <= {names[c.pid] for c in listening}, "the cluster's servers are checked too"
    exposed = [(c.pid, c.laddr) for c in listening if c.laddr.ip not in ("127.0.0.1", "::ffff:127.0.0.1", "::1")]
    assert not exposed, exposed
