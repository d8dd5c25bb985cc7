"""Checkpoints: DeepSpeed ZeRO shards plus meta.json, resume checks, and export to a Hugging Face directory.

Layout of one checkpoint directory (Ray merges the ranks' files into one directory in storage):

    ds/                      DeepSpeed save_checkpoint(tag="ds"): model states and every rank's ZeRO shard
    rng-<rank>.json          each rank's torch RNG state
    meta.json                written by rank 0, last: the training state below and the config

meta.json: {"version", "state": {phase, step_in_phase, global_step, cursor, tokens, positions, seconds, flops},
"config", "model", "tokenizer_fingerprint", "plan", "world_size"}. `cursor` is the number of blocks of the
current phase already trained; the packer recomputes every worker's share from it.

A checkpoint is first written to a fresh local temporary directory and only then handed to
`ray.train.report`, which uploads it and registers it once every rank has reported; a crash mid-save never
replaces the previous registered checkpoint. Ray registers a report only when its controller next polls the
workers, so a worker group that dies right after uploading leaves an unregistered directory behind; the
restarted group trains those steps again and would upload into the same directory name, merging its shards
with the stale ones (a 2-worker shard beside a 1-worker one after a shrink). `clear_stale` removes such a
directory before every save.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

META = "meta.json"
TAG = "ds"
VERSION = 1


def model_signature(model_cfg: dict[str, Any]) -> dict[str, Any]:
    """The fields that fix the weight shapes; a checkpoint only loads into the same signature."""
    keys = ("family", "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
            "tie_embeddings")
    return {k: model_cfg[k] for k in keys}


def upgrade_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """Bring meta.json written by older versions to the current layout (none yet: version 1)."""
    if meta.get("version", 1) > VERSION:
        raise ValueError(f"checkpoint meta version {meta['version']} is newer than this raypatch ({VERSION})")
    return meta


def load_meta(ckpt_dir: str | Path) -> dict[str, Any]:
    p = Path(ckpt_dir) / META
    if not p.exists():
        raise ValueError(f"checkpoint {ckpt_dir}: no {META} (not a raypatch checkpoint, or an incomplete one)")
    return upgrade_meta(json.loads(p.read_text()))


def save_local(engine: Any, *, rank: int, meta: dict[str, Any]) -> Path:
    """Write this rank's part of a checkpoint to a new local temporary directory (collective call)."""
    import torch

    d = Path(tempfile.mkdtemp(prefix="raypatch-ckpt-"))
    # The universal-checkpoint marker lets DeepSpeed's ds_to_universal convert this checkpoint when a run
    # resumes at another data-parallel size (elastic training, or a cluster that lost nodes).
    engine.save_checkpoint(str(d), tag=TAG, save_latest=False,
                           client_state={"universal_checkpoint_info": {"universal_checkpoint_version": 0.2}})
    rng = base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()
    (d / f"rng-{rank}.json").write_text(json.dumps({"torch": rng}))
    if rank == 0:
        tmp = d / f".{META}.tmp"
        tmp.write_text(json.dumps(meta, indent=1))
        os.replace(tmp, d / META)
    return d


def restore_rng(ckpt_dir: str | Path, rank: int) -> None:
    import numpy as np
    import torch

    p = Path(ckpt_dir) / f"rng-{rank}.json"
    if p.exists():
        raw = base64.b64decode(json.loads(p.read_text())["torch"])
        torch.set_rng_state(torch.from_numpy(np.frombuffer(raw, dtype=np.uint8).copy()))


def check_compatible(meta: dict[str, Any], *, config: dict[str, Any], tokenizer_fingerprint: str,
                     plan: list[dict[str, Any]], where: str) -> None:
    """Refuse to resume from a checkpoint made with another model shape, tokenizer or data plan."""
    old, new = model_signature(meta["config"]["model"]), model_signature(config["model"])
    diff = [f"model.{k}: {old[k]} -> {new[k]}" for k in old if old[k] != new[k]]
    if diff:
        raise ValueError(f"checkpoint {where} was made with another model shape ({'; '.join(diff)}); "
                         f"use a new checkpoint.name to start a new run")
    if meta["tokenizer_fingerprint"] != tokenizer_fingerprint:
        raise ValueError(f"checkpoint {where} was made with another tokenizer (fingerprint "
                         f"{meta['tokenizer_fingerprint'][:12]} != {tokenizer_fingerprint[:12]}); "
                         f"use a new checkpoint.name to start a new run")
    if meta["plan"] != plan:
        raise ValueError(f"checkpoint {where} was made with another data plan (patch.k, patch.lam, data.seq_len, "
                         f"data.max_tokens or optim.tokens_per_step changed); resuming would break the data cursor")


def clear_stale(fs: Any, path: str) -> bool:
    """Delete an existing directory at `path` on the pyarrow filesystem `fs` (local disk or s3://); True if
    one was there. Call it on one rank before any rank uploads the checkpoint of that name."""
    import pyarrow.fs

    if fs.get_file_info(path).type != pyarrow.fs.FileType.Directory:
        return False
    fs.delete_dir(path)
    return True


def check_shards(ckpt_dir: str | Path, world_size: int) -> None:
    """The ZeRO optimizer shards under ckpt_dir/ds must be exactly one per rank of the writing worker group."""
    import re

    # zero_pp_rank_<r>_mp_rank_00_optim_states.pt (bf16_zero_pp_rank_... under DeepSpeed's BF16 optimizer)
    pat = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt")
    ranks = sorted(int(m.group(1)) for f in (Path(ckpt_dir) / TAG).iterdir() if (m := pat.fullmatch(f.name)))
    if ranks != list(range(world_size)):
        raise ValueError(f"checkpoint {ckpt_dir}: meta.json says {world_size} workers wrote it, but {TAG}/ holds "
                         f"ZeRO shards of ranks {ranks}; it is incomplete or mixed with another run's files")


def to_universal(ckpt_dir: str | Path) -> str:
    """Convert the ZeRO shards under ckpt_dir/ds into a universal checkpoint (ckpt_dir/ds_universal) that
    loads at any data-parallel size; returns the tag to load. Idempotent."""
    import subprocess
    import sys

    out = Path(ckpt_dir) / f"{TAG}_universal"
    if not (out / "zero").is_dir():
        # Ranks on one node may share ckpt_dir: each converts into its own temporary folder, the first to
        # finish renames it into place and the others drop theirs.
        tmp = Path(ckpt_dir) / f".{TAG}_universal.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        proc = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                               str(Path(ckpt_dir) / TAG), "--output_folder", str(tmp), "--num_extract_workers",
                               "1", "--num_merge_workers", "1"], capture_output=True, text=True)
        if proc.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            raise RuntimeError(f"converting checkpoint {ckpt_dir} to a universal checkpoint failed "
                               f"(deepspeed.checkpoint.ds_to_universal exit {proc.returncode}): " + " | ".join(tail))
        try:
            os.rename(tmp, out)
        except OSError:
            if not (out / "zero").is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    return out.name


def find_latest(run_dir: str | Path) -> Path | None:
    """The newest complete raypatch checkpoint under a local run directory, if any."""
    best, best_step = None, -1
    for d in Path(run_dir).glob("checkpoint-*"):
        m = d / META
        if m.exists():
            step = json.loads(m.read_text())["state"]["global_step"]
            if step > best_step:
                best, best_step = d, step
    return best


def export_hf(ckpt_dir: str | Path, out_dir: str | Path, *, tokenizer_dir: str | None = None) -> Path:
    """Consolidate the ZeRO shards (any stage, any worker count) into an HF model directory (safetensors).

    The directory is built next to `out_dir` and renamed into place, so an interrupted export never leaves
    a half-written model under `out_dir`.
    """
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from raypatch.config import Config
    from raypatch.model import build_model

    meta = load_meta(ckpt_dir)
    cfg = Config.from_dict(meta["config"])
    state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=TAG)
    state = {k.removeprefix("hf."): v for k, v in state.items()}
    model = build_model(cfg.model)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight", "embed_out.weight"} if cfg.model.tie_embeddings else set()
    if unexpected or set(missing) - tied:
        raise ValueError(f"checkpoint {ckpt_dir}: weights do not match model ({missing=}, {unexpected=})")
    model.config.use_cache = True
    out = Path(out_dir)
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tok_dir = tokenizer_dir or meta.get("tokenizer_dir")
    if tok_dir and Path(tok_dir).is_dir():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
        tok.save_pretrained(tmp)
        for attr in ("eos_token_id", "bos_token_id", "pad_token_id"):
            setattr(model.config, attr, getattr(tok, attr))
            if model.generation_config is not None:
                setattr(model.generation_config, attr, getattr(tok, attr))
    model.to(torch.float32).save_pretrained(tmp, safe_serialization=True)
    (tmp / "raypatch_meta.json").write_text(json.dumps({"state": meta["state"], "config": meta["config"]}, indent=1))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out
