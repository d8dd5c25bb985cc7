"""Checkpoints: DeepSpeed ZeRO shards plus meta.json, resume checks, and export to a Hugging Face directory.

Layout of one checkpoint directory (Ray merges the ranks' files into one directory in storage):

    ds/                      DeepSpeed save_checkpoint(tag="ds"): model states and every rank's ZeRO shard
    rng-<rank>.json          each rank's torch RNG state
    meta.json                written by rank 0, last: the training state below and the config
    committed.json           written by the Train controller once every rank's upload is done: the commit

meta.json: {"version", "state": {phase, step_in_phase, global_step, cursor, tokens, positions, seconds, flops},
"config", "model", "tokenizer_fingerprint", "plan", "world_size"}. `cursor` is the number of blocks of the
current phase already trained; the packer recomputes every worker's share from it.

A checkpoint is first written to a fresh local temporary directory (the only part training waits for) and then
handed to `ray.train.report`, which uploads it, by default in the background (checkpoint.upload=async), and
registers it once every rank's upload is done. The commit rule: a checkpoint counts only once registered, and
registration writes committed.json into it (`CommitCallback`, on the controller); resume, rerun and export skip
or refuse a directory without it, however complete it looks, so a crash mid-upload never replaces the previous
checkpoint. (Checkpoints of meta version 1, from before the marker, count with meta.json alone.)

Ray registers a report only when its controller next polls the workers, so a worker group that dies right after
uploading leaves an unregistered directory behind; the restarted group trains those steps again and would upload
into the same directory name, merging its shards with the stale ones (a 2-worker shard beside a 1-worker one after
a shrink). `clear_stale` removes such a directory before every save.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import pickle
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from raypatch import storage
from raypatch.safety import (
    InputError,
    building,
    check_replaceable,
    files_under,
    replace_dir,
    restricted_torch_load,
    unpickle_error,
)

META = "meta.json"
TAG = "ds"
MODEL_STATES = "mp_rank_00_model_states.pt"
VERSION = 2
COMMITTED = "committed.json"


@dataclass
class TrainState:
    """Where a run stands: the checkpoint's schema (meta.json "state"), the run's result and what tune,
    benchmarks and tests read back. Per-phase counters are keyed by phase name, "patch" and "token"."""

    phase: int = 0
    """Index of the current phase in the run's plans; len(plans) once the run is complete."""
    step_in_phase: int = 0
    """Optimizer steps done in the current phase."""
    global_step: int = 0
    """Optimizer steps done in the run."""
    cursor: int = 0
    """Blocks of the current phase already trained; the packer re-splits what follows over the workers."""
    tokens: dict[str, int] = field(default_factory=lambda: {"patch": 0, "token": 0})
    """Stream tokens trained per phase."""
    positions: dict[str, int] = field(default_factory=lambda: {"patch": 0, "token": 0})
    """Model positions run per phase (tokens / K): the compute."""
    seconds: dict[str, float] = field(default_factory=lambda: {"patch": 0.0, "token": 0.0})
    """Training wall-clock per phase (steps only)."""
    flops: float = 0.0
    """Training FLOPs so far."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainState:
        known = {f.name for f in fields(cls)}
        return cls(**{k: (dict(v) if isinstance(v, dict) else v) for k, v in d.items() if k in known})

    def advance(self, phase: str, k: int, tokens: int, flops: float, seconds: float, blocks_per_step: int) -> None:
        """After one optimizer step of `tokens` tokens in a phase of patch size k."""
        self.step_in_phase += 1
        self.global_step += 1
        self.cursor = self.step_in_phase * blocks_per_step
        self.tokens[phase] += tokens
        self.positions[phase] += tokens // k
        self.flops += flops
        self.seconds[phase] += seconds

    def next_phase(self, phase: int) -> None:
        """The switch: the checkpoint saved at it already points at step 0 of the next phase."""
        self.phase, self.step_in_phase, self.cursor = phase, 0, 0


def model_signature(model_cfg: dict[str, Any]) -> dict[str, Any]:
    """The fields that fix the weight shapes; a checkpoint only loads into the same signature."""
    keys = ("family", "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
            "tie_embeddings")
    return {k: model_cfg[k] for k in keys}


def upgrade_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """Bring meta.json written by older versions to the current layout (version 1 differs only in having no
    commit marker: `is_committed`)."""
    if meta.get("version", 1) > VERSION:
        raise InputError(f"checkpoint meta version {meta['version']} is newer than this raypatch ({VERSION})")
    return meta


def load_meta(ckpt_dir: str | Path) -> dict[str, Any]:
    p = Path(ckpt_dir) / META
    if not Path(ckpt_dir).is_dir():
        raise InputError(f"checkpoint {ckpt_dir}: no such directory")
    if not p.exists():
        raise InputError(f"checkpoint {ckpt_dir}: no {META} (not a raypatch checkpoint, or an incomplete one)")
    try:
        meta = json.loads(p.read_text())
        for key in ("state", "config", "plan", "tokenizer_fingerprint", "world_size"):
            meta[key]  # noqa: B018 - every reader needs these
        meta["state"]["global_step"]  # noqa: B018
    except (ValueError, KeyError, TypeError) as e:
        raise InputError(f"checkpoint {ckpt_dir}: {META} is damaged or incomplete ({type(e).__name__}: {e})") from None
    return upgrade_meta(meta)


TEMP_KINDS = ("ckpt", "resume", "download")


def temp_prefix(kind: str) -> str:
    """raypatch-<kind>-<pid>-: local checkpoint copies carry the writing process's id, so that what a killed
    process left behind can be told from what a live one is using (sweep_temp_copies)."""
    return f"raypatch-{kind}-{os.getpid()}-"


def sweep_temp_copies() -> list[Path]:
    """Remove the local checkpoint copies (raypatch-ckpt-, -resume-, -download-<pid>-*) in this node's temporary
    directory whose process is gone: a worker killed mid-save (Ctrl-C, a crash) cannot clean up after itself.
    Only directories named by temp_prefix are touched, and only when their process has ended."""
    import psutil

    removed = []
    pattern = re.compile(rf"raypatch-({'|'.join(TEMP_KINDS)})-(\d+)-\w+")
    for d in Path(tempfile.gettempdir()).glob("raypatch-*-*-*"):
        m = pattern.fullmatch(d.name)
        if m and d.is_dir() and not psutil.pid_exists(int(m.group(2))):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


def save_local(engine: Any, *, rank: int, meta: dict[str, Any]) -> Path:
    """Write this rank's part of a checkpoint to a new local temporary directory (collective call)."""
    import torch

    from raypatch.faults import maybe_kill_in_save

    name = f"checkpoint-{meta['state']['global_step']:07d}"
    d = Path(tempfile.mkdtemp(prefix=temp_prefix("ckpt")))
    maybe_kill_in_save("start", d, name, rank)
    # The universal-checkpoint marker lets DeepSpeed's ds_to_universal convert this checkpoint when a run
    # resumes at another data-parallel size (elastic training, or a cluster that lost nodes).
    engine.save_checkpoint(str(d), tag=TAG, save_latest=False,
                           client_state={"universal_checkpoint_info": {"universal_checkpoint_version": 0.2}})
    maybe_kill_in_save("local", d, name, rank)
    rng = base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()
    (d / f"rng-{rank}.json").write_text(json.dumps({"torch": rng}))
    if rank == 0:
        tmp = d / f".{META}.tmp"
        tmp.write_text(json.dumps(meta, indent=1))
        os.replace(tmp, d / META)
    maybe_kill_in_save("written", d, name, rank)
    return d


def restore_rng(ckpt_dir: str | Path, rank: int) -> None:
    import numpy as np
    import torch

    p = Path(ckpt_dir) / f"rng-{rank}.json"
    if p.exists():
        raw = base64.b64decode(json.loads(p.read_text())["torch"])
        torch.set_rng_state(torch.from_numpy(np.frombuffer(raw, dtype=np.uint8).copy()))


def check_compatible(meta: dict[str, Any], *, config: dict[str, Any], tokenizer_fingerprint: str,
                     plan: list[dict[str, Any]], shards: str, where: str) -> None:
    """Refuse to resume from a checkpoint made with another model shape, tokenizer, shard set or data plan."""
    old, new = model_signature(meta["config"]["model"]), model_signature(config["model"])
    diff = [f"model.{k}: {old[k]} -> {new[k]}" for k in old if old[k] != new[k]]
    if diff:
        raise InputError(f"checkpoint {where} was made with another model shape ({'; '.join(diff)}); "
                         f"use a new checkpoint.name to start a new run")
    if meta["tokenizer_fingerprint"] != tokenizer_fingerprint:
        raise InputError(f"checkpoint {where} was made with another tokenizer (fingerprint "
                         f"{meta['tokenizer_fingerprint'][:12]} != {tokenizer_fingerprint[:12]}); "
                         f"use a new checkpoint.name to start a new run")
    old_shards = meta.get("shards_id")
    if old_shards is not None and old_shards != shards:
        raise InputError(f"checkpoint {where} was made on another shard set (data.shards="
                         f"{meta['config']['data']['shards']}, content {old_shards[:12]}) than data.shards="
                         f"{config['data']['shards']} (content {shards[:12]}); its data cursor would point into a "
                         f"different stream: use the original shards, or a new checkpoint.name to start a new run")
    if meta["plan"] != plan:
        raise InputError(f"checkpoint {where} was made with another data plan (patch.k, patch.lam, phases.schedule, "
                         f"data.seq_len, data.max_tokens or optim.tokens_per_step changed); resuming would break "
                         f"the data cursor")


def save_and_report(engine: Any, *, rank: int, meta: dict[str, Any], metrics: dict[str, Any],
                    say: Callable[[str], None], upload: str = "async") -> float:
    """Collective: every rank writes its part to a local temporary directory, then `ray.train.report` uploads
    it as checkpoint-<global step>, registered (and committed: CommitCallback) once every rank's upload is
    done. With upload="async" the upload runs on Ray Train's upload thread while training goes on, and the
    local copy goes when it is done; "sync" waits for it. Returns the seconds training stood still."""
    import ray.train
    import torch.distributed as dist

    t0 = time.perf_counter()
    name = f"checkpoint-{meta['state']['global_step']:07d}"
    d = save_local(engine, rank=rank, meta=meta)
    background = False
    try:
        store = ray.train.get_context().get_storage()
        if rank == 0:  # an unregistered upload of an earlier attempt may hold this name (module docstring)
            if clear_stale(store.storage_filesystem, store.build_checkpoint_path_from_name(name)):
                say(f"removed {name} left unregistered by an earlier attempt; saving it anew")
        dist.barrier()  # nobody uploads before the stale directory is gone
        ckpt = ray.train.Checkpoint.from_directory(str(d))
        if upload == "async":
            ray.train.report({**metrics, "checkpoint": name}, checkpoint=ckpt, checkpoint_dir_name=name,
                             checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC,
                             checkpoint_upload_fn=upload_then_remove(store, d, rank))
            background = True
        else:
            ray.train.report({**metrics, "checkpoint": name}, checkpoint=ckpt, checkpoint_dir_name=name)
    finally:
        if not background:
            shutil.rmtree(d, ignore_errors=True)
    return time.perf_counter() - t0


def upload_then_remove(store: Any, local: Path, rank: int) -> Callable[[Any, str], Any]:
    """Ray Train's upload, run on its upload thread, then the local copy removed whatever happened (Ray's own
    deletion is skipped when the upload fails, which would leave a raypatch-ckpt-* copy per failure)."""
    from raypatch.faults import maybe_kill_in_upload

    def upload(ckpt: Any, name: str) -> Any:
        try:
            maybe_kill_in_upload(store, local, name, rank, done=False)
            persisted = store.persist_current_checkpoint(ckpt, name)
            maybe_kill_in_upload(store, local, name, rank, done=True)
            return persisted
        finally:
            shutil.rmtree(local, ignore_errors=True)

    return upload


def commit_callback() -> Any:
    """A Ray Train callback, run on the controller, that writes committed.json into every checkpoint it registers:
    the commit rule's marker (module docstring)."""
    import ray.train

    class CommitCallback(ray.train.UserCallback):
        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            if checkpoint is None:
                return
            body = json.dumps({"checkpoint": Path(checkpoint.path).name, "committed_at": time.time()}).encode()
            with checkpoint.filesystem.open_output_stream(f"{checkpoint.path}/{COMMITTED}") as f:
                f.write(body)

    return CommitCallback()


@dataclass
class Resume:
    """The checkpoint a (re)started worker group continues from, as a local copy."""

    state: TrainState
    dir: Path | None = None
    tag: str = TAG
    """'ds', or 'ds_universal' when the checkpoint was written at another data-parallel size."""
    where: str = ""
    stage: int | None = None
    """The ZeRO stage that wrote the checkpoint (0: none); -1 when it predates meta.json's zero_stage (ZeRO
    shards, stage 1-3). A run keeps the stage it started with: DeepSpeed loads each layout only into its own."""

    def zero_stage(self, chosen: int) -> int:
        """The stage to build the engine with: the checkpoint's, else `chosen` (the config's)."""
        if self.stage is None:  # a fresh run
            return chosen
        if self.stage == -1:  # ZeRO shards of an unrecorded stage: the config's, but never none
            return chosen or 1
        return self.stage

    def load_into(self, engine: Any, rank: int) -> None:
        """Load weights, optimizer and RNG through the restricted unpickler (DeepSpeed's own loader would
        unpickle with weights_only=False)."""
        if self.dir is None:
            return
        try:
            with restricted_torch_load():
                engine.load_checkpoint(str(self.dir), tag=self.tag, load_optimizer_states=True,
                                       load_lr_scheduler_states=False)
            restore_rng(self.dir, rank)
        except pickle.UnpicklingError as e:
            raise unpickle_error(e, self.where) from None


@contextlib.contextmanager
def checkpoint_to_resume(identity: dict[str, Any], world_size: int, say: Callable[[str], None]) -> Iterator[Resume]:
    """Ray Train's latest checkpoint for this run, checked against the run's `identity` (the meta fields
    besides the state) and copied to a temporary directory that is removed on exit, also on error. A fresh
    run gets a Resume with a new TrainState and no directory."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        yield Resume(TrainState())
        return
    local = Path(tempfile.mkdtemp(prefix=temp_prefix("resume")))
    try:
        ckpt.to_directory(str(local))
        meta = load_meta(local)
        check_compatible(meta, config=identity["config"], tokenizer_fingerprint=identity["tokenizer_fingerprint"],
                         plan=identity["plan"], shards=identity["shards_id"], where=str(ckpt.path))
        stage = written_stage(meta, local)
        check_shards(local, meta["world_size"], stage)
        tag = TAG
        if meta["world_size"] != world_size:
            # ZeRO shards only load at the data-parallel size that wrote them: convert to DeepSpeed's universal
            # checkpoint, which loads at any size. Without ZeRO the one state file loads at any size as it is.
            # The data cursor needs nothing: it counts blocks, not ranks.
            if stage != 0:
                tag = to_universal(local)
            say(f"resizing: checkpoint written by {meta['world_size']} workers, resuming on {world_size} "
                f"({'universal checkpoint; ' if stage else ''}gradient accumulation recomputed, tokens per step "
                f"unchanged)")
        yield Resume(TrainState.from_dict(meta["state"]), local, tag, str(ckpt.path), stage)
    finally:
        shutil.rmtree(local, ignore_errors=True)


@contextlib.contextmanager
def local_copy(ckpt: str) -> Iterator[str]:
    """`ckpt` itself when local; a checkpoint at a URI (s3://bucket/run/checkpoint-N?endpoint_override=...)
    downloaded to a temporary directory that is removed on exit."""
    if not storage.is_uri(ckpt):
        yield ckpt
        return
    files = storage.list_files(ckpt)
    if META not in files:
        raise InputError(f"--checkpoint {storage.display(ckpt)}: no such checkpoint (no {META} under it)")
    local = Path(tempfile.mkdtemp(prefix=temp_prefix("download")))
    try:
        for name in files:
            storage.download(storage.join(ckpt, name), local / "ckpt" / name)
        yield str(local / "ckpt")
    finally:
        shutil.rmtree(local, ignore_errors=True)


def clear_stale(fs: Any, path: str) -> bool:
    """Delete an existing directory at `path` on the pyarrow filesystem `fs` (local disk or s3://); True if
    one was there. Call it on one rank before any rank uploads the checkpoint of that name."""
    import pyarrow.fs

    if fs.get_file_info(path).type != pyarrow.fs.FileType.Directory:
        return False
    fs.delete_dir(path)
    return True


def written_stage(meta: dict[str, Any], ckpt_dir: str | Path) -> int:
    """The ZeRO stage meta.json records (0: none); -1 for checkpoints written before it was recorded, which all
    hold ZeRO shards."""
    stage = meta.get("zero_stage", -1)
    if type(stage) is not int or stage not in (-1, 0, 1, 2, 3):
        raise InputError(f"checkpoint {ckpt_dir}: {META} field zero_stage must be 0, 1, 2 or 3, got {stage!r}")
    return stage


def check_shards(ckpt_dir: str | Path, world_size: int, stage: int = -1) -> None:
    """The ZeRO optimizer shards under ckpt_dir/ds must be exactly one per rank of the writing worker group;
    without ZeRO (stage 0) there are none, and the one model-states file holds weights and optimizer."""
    import re

    # zero_pp_rank_<r>_mp_rank_00_optim_states.pt (bf16_zero_pp_rank_... under DeepSpeed's BF16 optimizer)
    pat = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt")
    ds = Path(ckpt_dir) / TAG
    if not ds.is_dir():
        raise InputError(f"checkpoint {ckpt_dir}: no {TAG}/ directory with DeepSpeed states (an incomplete copy?)")
    ranks = sorted(int(m.group(1)) for f in ds.iterdir() if (m := pat.fullmatch(f.name)))
    if stage == 0:
        if ranks or not (ds / MODEL_STATES).is_file():
            raise InputError(f"checkpoint {ckpt_dir}: meta.json says it was written without ZeRO, but {TAG}/ holds "
                             f"{'ZeRO shards of ranks ' + str(ranks) if ranks else 'no ' + MODEL_STATES}; it is "
                             f"incomplete or mixed with another run's files")
        return
    if ranks != list(range(world_size)):
        raise InputError(f"checkpoint {ckpt_dir}: meta.json says {world_size} workers wrote it, but {TAG}/ holds "
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
        # The converter unpickles every shard: run it under the same restricted loader as every other load
        # (TORCH_FORCE_WEIGHTS_ONLY_LOAD overrides its weights_only=False; the allow-list is registered first).
        code = ("import runpy, sys, torch\nfrom raypatch.safety import _safe_globals\n"
                "torch.serialization.add_safe_globals(_safe_globals())\nsys.argv[0] = 'ds_to_universal'\n"
                "runpy.run_module('deepspeed.checkpoint.ds_to_universal', run_name='__main__', alter_sys=True)\n")
        proc = subprocess.run([sys.executable, "-c", code, "--input_folder", str(Path(ckpt_dir) / TAG),
                               "--output_folder", str(tmp), "--num_extract_workers", "1", "--num_merge_workers", "1"],
                              capture_output=True, text=True, env={**os.environ, "TORCH_FORCE_WEIGHTS_ONLY_LOAD": "1"})
        if proc.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            if "Unsupported global" in proc.stderr or "is blocked" in proc.stderr:
                raise InputError(f"checkpoint {ckpt_dir}: a file holds objects outside the tensor allow-list, "
                                 f"refusing to convert it (loading could run code)")
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


def is_committed(ckpt_dir: str | Path, meta: dict[str, Any]) -> bool:
    """The commit rule (module docstring): registered by Ray Train, or written before the rule existed."""
    return meta.get("version", 1) < 2 or (Path(ckpt_dir) / COMMITTED).is_file()


def find_latest(run_dir: str | Path) -> Path | None:
    """The newest committed raypatch checkpoint under a local run directory, if any. A directory that was never
    committed (its upload cut short, or never registered) is passed over: Ray Train resumes from the registered
    one before it, and the next save of that step replaces it."""
    best, best_step = None, -1
    for d in Path(run_dir).glob("checkpoint-*"):
        m = d / META
        if m.exists():
            try:
                meta = json.loads(m.read_text())
                step = meta["state"]["global_step"]
            except (ValueError, KeyError, TypeError) as e:
                if not (d / COMMITTED).is_file():
                    continue  # torn while it was written: never counted
                raise InputError(f"checkpoint {d}: {META} is damaged ({type(e).__name__}: {e}); move the "
                                 f"directory away to resume from the one before") from None
            if step > best_step and is_committed(d, meta):
                best, best_step = d, step
    return best


def incomplete_after(run_dir: str | Path, latest: Path | None) -> list[str]:
    """The checkpoint directories of a local run newer than `latest` (by their step) that were never committed:
    what a resume passes over. Left in place; the next save of that step replaces it."""
    def step(d: Path) -> int:
        try:
            return int(d.name.split("-", 1)[1])
        except (IndexError, ValueError):
            return -1

    floor = -1 if latest is None else step(latest)
    return sorted(d.name for d in Path(run_dir).glob("checkpoint-*")
                  if d.is_dir() and step(d) > floor and not (d / COMMITTED).is_file())


def scan_checkpoint(ckpt_dir: str | Path) -> None:
    """Unpickle every DeepSpeed file of a checkpoint with the restricted loader, without reading tensor data
    (mmap): a crafted file is refused here, before DeepSpeed or a worker sees it."""
    import torch

    d = Path(ckpt_dir)
    for f in sorted(d.rglob("*.pt")):
        try:
            with restricted_torch_load():
                torch.load(f, map_location="cpu", mmap=True)
        except pickle.UnpicklingError as e:
            raise unpickle_error(e, f"{ckpt_dir} ({f.relative_to(d)})") from None
        except (RuntimeError, OSError, EOFError) as e:
            raise InputError(f"checkpoint {ckpt_dir}: {f.relative_to(d)} cannot be read ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}); the checkpoint is damaged") from None


def check_checkpoint(ckpt_dir: str | Path) -> dict[str, Any]:
    """Everything that can be checked of a checkpoint before training or export: meta.json, one ZeRO shard
    per writing rank, and every file's pickle against the allow-list. Returns the meta."""
    meta = load_meta(ckpt_dir)
    if not is_committed(ckpt_dir, meta):
        raise InputError(f"checkpoint {ckpt_dir}: never committed (no {COMMITTED}: its upload was cut short, or "
                         f"Ray Train never registered it); use the checkpoint before it")
    check_shards(ckpt_dir, meta["world_size"], written_stage(meta, ckpt_dir))
    scan_checkpoint(ckpt_dir)
    return meta


def export_files(d: Path) -> set[str]:
    """The files of an export that raypatch provably wrote (check_replaceable's `owned`), each by its name and
    its content, never by the list alone: raypatch_meta.json as export_hf writes it (a config with its model
    section, no other keys), and of the files it lists (exports before that list: the files an HF export has)
    those with an export's name whose content is what export_hf writes there:

    - config.json: transformers' (transformers_version), a model_type it builds, naming no code (auto_map), its
      vocab_size, hidden_size and num_hidden_layers those of the meta's model;
    - the weights (model.safetensors, or the shards its index lists): float32 safetensors whose header parses
      and tiles the file, holding exactly the tensors, by name and shape, of the model config.json describes
      (the tied output embedding left out), built on the meta device;
    - generation_config.json: transformers' JSON; the tokenizer's files: as safety.tokenizer_file_ok reads them.

    Anything else, a name the meta lists included, is foreign: check_replaceable names it and changes nothing.
    Exports that record each file's SHA-256 (sha256) count a file only when it still has that hash.
    """
    from raypatch.safety import json_object, read_own

    meta = json_object(read_own(d / "raypatch_meta.json"))
    model = meta.get("config") if meta is not None else None
    model = model.get("model") if isinstance(model, dict) else None
    if meta is None or not isinstance(model, dict) or not set(meta) <= {"state", "config", "files", "sha256"}:
        return set()
    own = _export_files(d, meta, model)
    sums = meta.get("sha256")
    if isinstance(sums, dict):  # exports since the hashes: each listed file must also be the one written
        own = {"raypatch_meta.json"} | {f for f in own if f in sums and storage.sha256(d / f) == sums[f]}
    return own


def _export_files(d: Path, meta: dict[str, Any], model: dict[str, Any]) -> set[str]:
    """export_files' content checks (its docstring)."""
    import re

    import torch

    from raypatch.safety import json_object, read_own, safetensors_header, tokenizer_file_ok
    from raypatch.shards import TOKENIZER_FILES

    listed = meta["files"] if isinstance(meta.get("files"), list) else [f.name for f in d.iterdir()]
    weights = re.compile(r"model(-\d+-of-\d+)?\.safetensors")
    names = {n for n in map(str, listed) if weights.fullmatch(n) or TOKENIZER_FILES.fullmatch(n) or n in (
        "config.json", "generation_config.json", "model.safetensors.index.json")}
    own = {"raypatch_meta.json"} | {n for n in names if TOKENIZER_FILES.fullmatch(n)
                                    and tokenizer_file_ok(n, read_own(d / n))}
    conf = json_object(read_own(d / "config.json")) if "config.json" in names else None
    shape = {"vocab_size": "vocab_size", "hidden_size": "hidden_size", "num_layers": "num_hidden_layers"}
    if conf is None or "auto_map" in conf or "transformers_version" not in conf or any(
            conf.get(theirs) != model[ours] for ours, theirs in shape.items()
            if isinstance(model.get(ours), int) and model[ours] > 0):
        return own
    from transformers.conversion_mapping import WeightRenaming, get_model_conversion_mapping
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from raypatch.hfdir import causal_lm_class, rename

    try:
        hf = CONFIG_MAPPING[conf.get("model_type")].from_dict(conf)
        with torch.device("meta"):
            built = causal_lm_class(hf)(hf)
        rules = get_model_conversion_mapping(built)
    except Exception:  # a model_type transformers does not build, or a config its class refuses
        return own
    own.add("config.json")
    gen = json_object(read_own(d / "generation_config.json"))
    if "generation_config.json" in names and gen is not None and "transformers_version" in gen:
        own.add("generation_config.json")
    index = json_object(read_own(d / "model.safetensors.index.json")) if "model.safetensors.index.json" in names \
        else None
    weight_map = index.get("weight_map") if index is not None else None
    files = sorted(set(map(str, weight_map.values()))) if isinstance(weight_map, dict) else ["model.safetensors"]
    found: dict[str, tuple[str, tuple[int, ...]]] = {}
    for f in files:
        header = safetensors_header(d / f) if f in names and weights.fullmatch(f) else None
        if header is None or (isinstance(weight_map, dict) and any(weight_map.get(k) != f for k in header)):
            return own
        found |= {rename(k, rules): v for k, v in header.items()}
    expected = {k: tuple(v.shape) for k, v in built.state_dict().items()}
    tied = {"lm_head.weight", "embed_out.weight"} if getattr(hf, "tie_word_embeddings", False) else set()
    if (not all(type(r) is WeightRenaming for r in rules) or set(found) - set(expected)
            or set(expected) - set(found) - tied or any(v != ("F32", expected[k]) for k, v in found.items())):
        return own  # tensors merged on load (not provable by name), or not this config's model in float32
    return own | set(files) | ({"model.safetensors.index.json"} if isinstance(weight_map, dict) else set())


def export_hf(ckpt_dir: str | Path, out_dir: str | Path, *, tokenizer_dir: str | None = None,
              overwrite: bool = False) -> Path:
    """Consolidate the ZeRO shards (any stage, any worker count; or without ZeRO the model states) into an HF
    model directory (safetensors).

    The directory is built in a temporary sibling of `out_dir` and renamed into place, so an interrupted
    export never leaves a half-written model. `out_dir` may not be, hold or lie inside the checkpoint or its
    run directory; an existing `out_dir` is replaced only with `overwrite`, and only when it is an earlier
    export (everything in it listed in its raypatch_meta.json).
    """
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from raypatch.config import Config
    from raypatch.model import build_model

    ckpt = Path(ckpt_dir).expanduser().resolve()
    # Also refuses the run directory and any folder above it: they contain the checkpoint.
    storage.check_not_overlapping(out_dir, [("checkpoint", ckpt)], "--out")
    check_replaceable(out_dir, overwrite=overwrite, owned=export_files, what="an export")
    meta = check_checkpoint(ckpt)
    try:
        cfg = Config.from_dict(meta["config"])
    except ValueError as e:
        raise InputError(f"checkpoint {ckpt_dir}: {META} holds an invalid config ({e})") from None
    tok_dir = tokenizer_dir or meta.get("tokenizer_dir")
    want = meta.get("tokenizer_fingerprint")
    if tok_dir and storage.is_uri(tok_dir):  # the shards' tokenizer on a store: a checked local copy
        from raypatch.shards import fetch_tokenizer

        tok_dir = fetch_tokenizer(tok_dir, want)
    tok = None
    if tok_dir and not Path(tok_dir).is_dir():
        # The run's tokenizer is known by content (its fingerprint), not by where it was: a moved one is named.
        raise InputError(f"checkpoint {ckpt_dir}: its tokenizer {tok_dir} is not a directory (moved with the shard "
                         f"set?); give its place with --tokenizer DIR (fingerprint {str(want)[:12]})"
                         if not tokenizer_dir else f"--tokenizer {tok_dir}: not a directory")
    if tok_dir:  # loaded before any work: a directory naming remote code is refused
        from raypatch.tokenizer import load_tokenizer, tokenizer_info

        tok = load_tokenizer(tok_dir)
        if tokenizer_dir and want and (got := tokenizer_info(tok_dir)["fingerprint"]) != want:
            raise InputError(f"--tokenizer {tok_dir}: not the tokenizer checkpoint {ckpt_dir} was trained with "
                             f"(fingerprint {got[:12]}, the run's {want[:12]})")
    try:
        # zero_to_fp32 prints its progress to stdout, which is evaluate's JSON output: keep it off the terminal.
        with restricted_torch_load(), contextlib.redirect_stdout(io.StringIO()):
            if written_stage(meta, ckpt) == 0:  # no ZeRO: the model-states file holds the whole fp32 module
                state = torch.load(ckpt / TAG / MODEL_STATES, map_location="cpu")["module"]
            else:
                state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=TAG)
    except pickle.UnpicklingError as e:
        raise unpickle_error(e, str(ckpt_dir)) from None
    state = {k.removeprefix("hf."): v for k, v in state.items()}
    bad = [k for k, v in state.items() if torch.is_floating_point(v) and not bool(torch.isfinite(v).all())]
    if bad:  # an export is what users deploy: never one that holds NaN or inf
        raise InputError(f"checkpoint {ckpt_dir}: {len(bad)} weight tensor(s) hold NaN or inf ({', '.join(bad[:3])}"
                         f"{', ...' if len(bad) > 3 else ''}); the run had diverged by then: export an earlier "
                         f"checkpoint")
    model = build_model(cfg.model, pretrained=False)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight", "embed_out.weight"} if cfg.model.tie_embeddings else set()
    if unexpected or set(missing) - tied:
        raise InputError(f"checkpoint {ckpt_dir}: weights do not match model ({missing=}, {unexpected=})")
    model.config.use_cache = True
    with building(out_dir) as tmp:
        if tok is not None:
            tok.save_pretrained(tmp)
            for attr in ("eos_token_id", "bos_token_id", "pad_token_id"):
                setattr(model.config, attr, getattr(tok, attr))
                if model.generation_config is not None:
                    setattr(model.generation_config, attr, getattr(tok, attr))
        model.to(torch.float32).save_pretrained(tmp, safe_serialization=True)
        files = [*files_under(tmp), "raypatch_meta.json"]
        sums = {f: storage.sha256(tmp / f) for f in files_under(tmp)}  # what --overwrite may later replace
        (tmp / "raypatch_meta.json").write_text(json.dumps({"state": meta["state"], "config": meta["config"],
                                                            "files": files, "sha256": sums}, indent=1))
    return replace_dir(tmp, out_dir)
