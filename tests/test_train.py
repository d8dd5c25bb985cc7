"""The trainer on the real stack: local Ray, 2 CPU workers, DeepSpeed ZeRO-2, ZeRO-3 and none, both phases.

Run: pytest tests/test_train.py   (about 4 minutes on 2 cores)
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
import torch

from raypatch import presets
from raypatch.checkpoint import check_shards
from raypatch.config import Config, apply_overrides
from raypatch.data import TokenStream, plan_from_config, val_rows
from raypatch.shards import load_manifest

from .conftest import EMBEDDED, WIKITEXT
from .helpers import blocks_by_step as trained_steps
from .helpers import step_losses


def tiny(shards: str, storage: Path, name: str, *extra: str) -> Config:
    return apply_overrides(presets.tiny(), [f"data.shards={shards}", f"checkpoint.storage_path={storage}",
                                            f"checkpoint.name={name}", "data.record_blocks=true", "log_every=1",
                                            f"eval.wikitext={WIKITEXT}", *extra])


@pytest.fixture(scope="module")
def reference(shards, ray_local, tmp_path_factory):
    """A fault-free ZeRO-2 run of the tiny preset: 16 patch steps, then 16 token steps."""
    from raypatch.driver import fit

    cfg = tiny(shards, tmp_path_factory.mktemp("runs"), "ref")
    return cfg, fit(cfg)


GOLDEN = Path(__file__).parent / "golden" / "tiny_zero2.json"


def test_golden_run_is_unchanged(reference):
    """Per-step losses and trained blocks of the reference run against a file recorded before the trainer was
    reshaped (issue 10): behaviour must not change. RAYPATCH_RECORD_GOLDEN=1 records it anew."""
    _, summary = reference
    run = Path(summary["run_dir"])
    now = {"losses": {str(k): v for k, v in step_losses(run).items()}, "blocks": trained_steps(run),
           "final": {k: summary["final"][k] for k in ("val/loss", "wikitext/loss")}}
    if os.environ.get("RAYPATCH_RECORD_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(now, indent=1, sort_keys=True) + "\n")
    golden = json.loads(GOLDEN.read_text())
    assert now["blocks"] == golden["blocks"]
    assert now["losses"].keys() == golden["losses"].keys()
    for step, loss in golden["losses"].items():
        assert now["losses"][step] == pytest.approx(loss, rel=1e-6, abs=1e-6), step
    for k, v in golden["final"].items():
        assert now["final"][k] == pytest.approx(v, rel=1e-6, abs=1e-6), k


def test_two_phases_in_one_run(reference, shards):
    cfg, summary = reference
    run = Path(summary["run_dir"])
    plans = plan_from_config(cfg, load_manifest(shards)["splits"]["train"]["tokens"])
    st = summary["state"]
    assert st["global_step"] == sum(p.num_steps for p in plans) == 32
    # Same tokens per optimizer step in both phases; the patch phase runs K times fewer positions.
    assert st["tokens"] == {"patch": 16 * 256, "token": 16 * 256}
    assert st["positions"] == {"patch": 16 * 256 // 2, "token": 16 * 256}
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "train/loss" in r]
    assert {r["phase"] for r in train_rows} == {"patch", "token"}
    assert all(("train/patch_loss" in r) == (r["phase"] == "patch") for r in train_rows)
    assert [r["step"] for r in rows if r.get("event") == "switch"] == [16]
    # LR warmup restarts at the switch (fresh schedule, fresh optimizer).
    lr = {r["step"]: r["train/lr"] for r in train_rows}
    assert lr[17] == pytest.approx(lr[1]) and lr[1] < lr[3]
    # Token-level validation on both sets, at the switch and at the end.
    evals = [r for r in rows if r.get("event") == "eval"]
    assert {"val/loss", "wikitext/loss"} <= set(evals[-1]) and len(evals) >= 2
    assert evals[-1]["val/loss"] < evals[0]["val/loss"] or evals[-1]["wikitext/loss"] < evals[0]["wikitext/loss"]
    # Every block of both phases' full steps trained exactly once, split across the 2 workers.
    steps = trained_steps(run)
    for p in plans:
        got = [b for s in range(p.num_steps) for b in steps[f"{p.phase}:{s}"]]
        assert got == list(range(p.num_steps * p.blocks_per_step))
    # Checkpoints: only the last `keep` remain, each with meta.json.
    ckpts = sorted(run.glob("checkpoint-*"))
    assert len(ckpts) == cfg.checkpoint.keep and all((c / "meta.json").exists() for c in ckpts)
    assert (run / "val_loss_vs_compute.png").stat().st_size > 0 and (run / "summary.json").exists()
    assert summary["relative_cost"] == pytest.approx(0.75)


def test_export_loads_in_transformers_and_matches_final_eval(reference, shards):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg, summary = reference
    hf = AutoModelForCausalLM.from_pretrained(summary["export"])
    tok = AutoTokenizer.from_pretrained(summary["export"])
    rows = torch.from_numpy(val_rows(TokenStream(shards, "val"), cfg.data.seq_len, cfg.eval.max_rows)).long()
    rows = rows[: len(rows) - len(rows) % 2]
    with torch.no_grad():
        loss = torch.stack([hf(r[None], labels=r[None]).loss for r in rows]).mean()
    assert float(loss) == pytest.approx(summary["final"]["val/loss"], abs=1e-4)
    out = hf.generate(**tok("def ", return_tensors="pt"), max_new_tokens=5, do_sample=False)
    assert out.shape[1] > 1


def test_export_onto_a_full_disk_is_one_line_and_leaves_nothing(reference, tmp_path):
    from .test_metrics import on_full_disk

    _, ref = reference
    rc, err, left = on_full_disk(tmp_path, "128k", "export", "--checkpoint", ref["checkpoint"], "--out", "FULL/hf")
    lines = [ln for ln in err.splitlines() if ln.startswith("raypatch: error:")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert lines[0].startswith("raypatch: error: no space left on device") and str(tmp_path / "full") in lines[0]
    assert left == [], left  # the half-written export (a temporary sibling) is gone
    assert (Path(ref["checkpoint"]) / "committed.json").is_file()


def test_a_moved_shard_set_is_the_same_run(reference, shards, tmp_path, capsys):
    """Identity by content: the reference run's shard set copied to another path (the same bytes, so the same
    content id) is that run's set. The finished run is reported, not refused as "another config", and the
    pre-flight check says in one line that it continues on it."""
    import shutil

    from raypatch.driver import finished_summary, preflight

    cfg, ref = reference
    moved = tmp_path / "moved"
    shutil.copytree(shards, moved)
    again = apply_overrides(cfg, [f"data.shards={moved}"])
    assert finished_summary(again)["state"] == ref["state"]
    capsys.readouterr()
    preflight(again)
    said = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("data.shards=")]
    assert len(said) == 1 and f"data.shards={moved} is the run's shard set by content" in said[0], said
    assert f"made with at {shards}" in said[0]


def test_export_finds_a_moved_tokenizer_by_content(reference, shards, tmp_path, capsys):
    """The checkpoint names its tokenizer by path and fingerprint. When the path is gone (the shard set moved),
    export refuses in one line instead of writing a model without its tokenizer; --tokenizer gives the new
    place, which must hold the same tokenizer by content (another one is refused, naming both fingerprints)."""
    import shutil

    from raypatch.cli import main
    from raypatch.prepare import train_tokenizer

    _, ref = reference
    ckpt = tmp_path / "checkpoint"
    shutil.copytree(ref["checkpoint"], ckpt)
    meta = json.loads((ckpt / "meta.json").read_text())
    moved = tmp_path / "moved-shards"
    shutil.copytree(shards, moved)
    meta["tokenizer_dir"] = str(tmp_path / "gone" / "tokenizer")  # where the shard set was when it trained
    (ckpt / "meta.json").write_text(json.dumps(meta))
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "is not a directory (moved with the shard set?); give its place with --tokenizer DIR" in err, err
    assert not (tmp_path / "a").exists()

    other = tmp_path / "other-tok"
    train_tokenizer([str(EMBEDDED)], str(other), vocab_size=300)
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "b"), "--tokenizer", str(other)]) == 2
    assert "not the tokenizer checkpoint" in capsys.readouterr().err and not (tmp_path / "b").exists()

    tok = moved / load_manifest(str(moved))["tokenizer"].get("dir", "tokenizer")
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "c"), "--tokenizer", str(tok)]) == 0
    assert (tmp_path / "c" / "tokenizer.json").read_bytes() == (Path(ref["export"]) / "tokenizer.json").read_bytes()


def test_zero3_trains_both_phases_and_exports(shards, ray_local, tmp_path):
    from transformers import AutoModelForCausalLM

    from raypatch.driver import fit

    cfg = tiny(shards, tmp_path, "z3", "scale.zero_stage=3", "data.max_tokens=4096", "eval.wikitext=")
    summary = fit(cfg)
    assert summary["state"]["global_step"] == 16
    assert summary["final"]["val/loss"] < 6.3  # below ln(512) = 6.24 + noise: it learned something
    hf = AutoModelForCausalLM.from_pretrained(summary["export"])
    assert hf.model.embed_tokens.weight.shape == (512, 64)  # consolidated, not an empty ZeRO-3 partition


@pytest.mark.slow
def test_zero1_and_keep_optimizer(shards, ray_local, tmp_path):
    from raypatch.driver import fit

    cfg = tiny(shards, tmp_path, "z1", "scale.zero_stage=1", "data.max_tokens=4096", "phases.keep_optimizer=true")
    assert fit(cfg)["state"]["global_step"] == 16


def test_stopped_run_resumes_from_its_checkpoint(reference, shards, ray_local, tmp_path, monkeypatch):
    """A run killed with no retries left fails; rerunning the same name resumes and matches the reference."""
    from raypatch.driver import fit

    ref_cfg, ref = reference
    cfg = tiny(shards, tmp_path, "stopped", "checkpoint.max_failures=0")
    monkeypatch.setenv("RAYPATCH_KILL_AT_STEPS", "10")
    monkeypatch.setenv("RAYPATCH_KILL_RANK", "1")
    with pytest.raises(Exception):  # noqa: B017 - Ray's worker-death error type varies by version
        fit(cfg)
    monkeypatch.delenv("RAYPATCH_KILL_AT_STEPS")
    # An upload the dead attempt made but Ray never registered, under a name the resumed run will save again:
    # its stale shard must not end up mixed into the new checkpoint.
    stale = tmp_path / "stopped" / "checkpoint-0000032" / "ds"
    stale.mkdir(parents=True)
    (stale / "zero_pp_rank_5_mp_rank_00_optim_states.pt").write_bytes(b"stale")
    temp = Path(tempfile.gettempdir())
    copies = set(temp.glob("raypatch-*"))
    summary = fit(cfg)
    assert set(temp.glob("raypatch-*")) == copies, "the resume left a local copy of the checkpoint behind"
    run, ref_run = Path(summary["run_dir"]), Path(ref["run_dir"])
    assert not (stale / "zero_pp_rank_5_mp_rank_00_optim_states.pt").exists()
    check_shards(run / "checkpoint-0000032", 2)
    assert trained_steps(run) == trained_steps(ref_run)
    a, b = step_losses(run), step_losses(ref_run)
    assert a.keys() == b.keys()
    for s in a:
        assert a[s] == pytest.approx(b[s], rel=1e-4, abs=1e-5), s


def test_crash_mid_upload_leaves_the_previous_checkpoint_the_latest(reference, shards, ray_local, tmp_path,
                                                                    monkeypatch, capsys):
    """Rank 0 dies on its background upload thread with checkpoint-0000008 half in storage (meta.json and half
    of one state file). That directory is never committed: the rerun's checks and resume pass over it to the last
    committed checkpoint, and the finished run trained the reference's blocks to the reference's losses."""
    from raypatch.checkpoint import COMMITTED, find_latest
    from raypatch.driver import fit, preflight

    _, ref = reference
    cfg = tiny(shards, tmp_path, "torn", "checkpoint.max_failures=0")
    assert cfg.checkpoint.upload == "async"
    monkeypatch.setenv("RAYPATCH_KILL_IN_CHECKPOINT", "8:upload")
    monkeypatch.setenv("RAYPATCH_KILL_RANK", "0")
    with pytest.raises(Exception):  # noqa: B017 - Ray's worker-death error type varies by version
        fit(cfg)
    monkeypatch.delenv("RAYPATCH_KILL_IN_CHECKPOINT")
    run = tmp_path / "torn"
    torn = run / "checkpoint-0000008"
    assert (torn / "meta.json").is_file() and not (torn / COMMITTED).exists()
    latest = find_latest(run)
    assert latest is not None and latest.name < torn.name and (latest / COMMITTED).is_file()
    preflight(cfg)  # the torn directory is not the one checked, and the check says it passed over it
    said = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("passing over ")]
    assert len(said) == 1 and torn.name in said[0] and f"resumes from {latest.name}" in said[0], said
    summary = fit(cfg)
    assert trained_steps(run) == trained_steps(Path(ref["run_dir"]))
    a, b = step_losses(run), step_losses(Path(ref["run_dir"]))
    for s in a:
        assert a[s] == pytest.approx(b[s], rel=1e-4, abs=1e-5), s
    assert (Path(summary["checkpoint"]) / COMMITTED).is_file()
    stalls = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["checkpoint/upload"] for r in stalls if r.get("event") == "checkpoint"][-1] == "async"


def test_a_non_finite_loss_stops_the_run_before_its_step(shards, ray_local, tmp_path, monkeypatch):
    """Rank 1's loss turns NaN at step 6 (through the real backward: NaN gradients, spread to every rank by the
    all-reduce). The run stops at that step with one line, before the optimizer step; nothing after the last
    checkpoint is kept, no export is written, and that checkpoint's weights are finite."""
    from raypatch.checkpoint import export_hf, find_latest
    from raypatch.driver import fit
    from raypatch.safety import InputError

    cfg = tiny(shards, tmp_path, "nan", "data.max_tokens=4096", "eval.wikitext=", "checkpoint.max_failures=0")
    monkeypatch.setenv("RAYPATCH_NAN_LOSS_AT", "6")
    monkeypatch.setenv("RAYPATCH_KILL_RANK", "1")
    with pytest.raises(InputError, match=r"the training loss is not finite at step 6 \(patch phase, step 6/\d+, on "
                                         r"1 worker\(s\)\); the step was not applied") as e:
        fit(cfg)
    assert "\n" not in str(e.value)
    run = tmp_path / "nan"
    assert not (run / "hf").exists()
    assert max(step_losses(run)) == 5  # step 6 never logged: it stopped before the optimizer step
    assert find_latest(run).name == "checkpoint-0000004"
    export_hf(find_latest(run), tmp_path / "export")  # refuses NaN or inf weights: these are finite


def test_worker_killed_in_each_phase_recovers_exactly(reference, shards, ray_local, tmp_path, monkeypatch):
    """SIGKILL a worker once in the patch phase (step 6) and once in the token phase (step 22)."""
    from raypatch.driver import fit

    _, ref = reference
    monkeypatch.setenv("RAYPATCH_KILL_AT_STEPS", "6,22")
    monkeypatch.setenv("RAYPATCH_KILL_RANK", "1")
    cfg = tiny(shards, tmp_path, "faulty", "checkpoint.max_failures=2")
    summary = fit(cfg)
    run, ref_run = Path(summary["run_dir"]), Path(ref["run_dir"])
    assert (run / ".killed-at-6").exists() and (run / ".killed-at-22").exists()
    pids = {json.loads(x)["pid"] for x in (run / "blocks-rank1.jsonl").read_text().splitlines()}
    assert len(pids) == 3, "rank 1 ran in three processes: two were killed"
    assert trained_steps(run) == trained_steps(ref_run)  # none lost, none repeated in the final model
    a, b = step_losses(run), step_losses(ref_run)
    assert a.keys() == b.keys()
    for s in a:  # CPU, fixed seed, fp32: the resumed run follows the fault-free one
        assert a[s] == pytest.approx(b[s], rel=1e-4, abs=1e-5), s
    assert summary["final"]["val/loss"] == pytest.approx(ref["final"]["val/loss"], rel=1e-4)


def test_without_zero_a_run_resizes_and_matches_zero2(reference, shards, ray_local, tmp_path, monkeypatch):
    """fp32 with scale.zero_stage=0 trains without ZeRO (DeepSpeed's plain data-parallel engine). Killed on 2
    workers with no retries left and resumed on 1 (no universal conversion: one state file loads at any size),
    it trains the same blocks to the same losses as the ZeRO-2 reference, and its export matches its final eval."""
    from transformers import AutoModelForCausalLM

    from raypatch.checkpoint import check_checkpoint
    from raypatch.driver import fit

    ref_cfg, ref = reference
    cfg = tiny(shards, tmp_path, "nozero", "scale.zero_stage=0", "checkpoint.max_failures=0")
    monkeypatch.setenv("RAYPATCH_KILL_AT_STEPS", "10")
    monkeypatch.setenv("RAYPATCH_KILL_RANK", "1")
    with pytest.raises(Exception):  # noqa: B017 - Ray's worker-death error type varies by version
        fit(cfg)
    monkeypatch.delenv("RAYPATCH_KILL_AT_STEPS")
    run = tmp_path / "nozero"
    first = check_checkpoint(run / "checkpoint-0000008")
    assert first["zero_stage"] == 0 and first["world_size"] == 2
    assert not list((run / "checkpoint-0000008" / "ds").glob("*zero_pp_rank*"))
    summary = fit(apply_overrides(cfg, ["scale.num_workers=1"]))
    last = check_checkpoint(summary["checkpoint"])
    assert last["zero_stage"] == 0 and last["world_size"] == 1
    ref_run = Path(ref["run_dir"])
    assert trained_steps(run) == trained_steps(ref_run)
    a, b = step_losses(run), step_losses(ref_run)
    assert a.keys() == b.keys()
    for s in a:  # the same AdamW on the same gradients; only the order of float sums differs from ZeRO-2
        assert a[s] == pytest.approx(b[s], rel=1e-3, abs=1e-4), s
    assert summary["final"]["val/loss"] == pytest.approx(ref["final"]["val/loss"], rel=1e-3)
    hf = AutoModelForCausalLM.from_pretrained(summary["export"])
    rows = torch.from_numpy(val_rows(TokenStream(shards, "val"), cfg.data.seq_len, cfg.eval.max_rows)).long()
    with torch.no_grad():
        loss = torch.stack([hf(r[None], labels=r[None]).loss for r in rows]).mean()
    assert float(loss) == pytest.approx(summary["final"]["val/loss"], abs=1e-4)


# --- bad input: one line, and no existing checkpoint is touched -------------------------------------


def _snapshot(run: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime for p in run.rglob("*")}


def test_resume_with_another_model_shape_or_tokenizer_is_refused(reference, tokenizer_dir, corpus, tmp_path):
    from raypatch.driver import preflight
    from raypatch.prepare import prepare, train_tokenizer

    cfg, summary = reference
    run = Path(summary["run_dir"])
    before = _snapshot(run)
    with pytest.raises(ValueError, match=r"another model shape \(model.hidden_size: 64 -> 128\)") as e:
        preflight(apply_overrides(cfg, ["model.hidden_size=128"]))
    assert "\n" not in str(e.value)
    tok = train_tokenizer([str(corpus)], str(tmp_path / "tok"), vocab_size=400)
    import ray

    assert ray.is_initialized()
    other = prepare([str(corpus)], tok, str(tmp_path / "shards"), shard_tokens=40_000, progress=False)
    assert other["tokenizer"]["fingerprint"] != load_manifest(cfg.data.shards)["tokenizer"]["fingerprint"]
    with pytest.raises(ValueError, match="another tokenizer"):
        preflight(apply_overrides(cfg, [f"data.shards={tmp_path / 'shards'}"]))
    with pytest.raises(ValueError, match="another data plan"):
        preflight(apply_overrides(cfg, ["patch.lam=0.25"]))
    assert _snapshot(run) == before


def test_batch_that_is_not_whole_rows_or_too_small_for_the_workers():
    apply_overrides(presets.tiny(), ["scale.num_workers=3"])  # 8 and 4 rows over 3 workers: uneven, exact
    with pytest.raises(ValueError, match="'optim.tokens_per_step': 250 is not a whole number of patch-phase rows"):
        apply_overrides(presets.tiny(), ["optim.tokens_per_step=250"])
    with pytest.raises(ValueError, match="make 4 patch-phase rows of 64 tokens per step, fewer than scale.num_w"):
        apply_overrides(presets.tiny(), ["scale.num_workers=5"])


def test_cli_errors_are_one_line(capsys):
    from raypatch.cli import main

    assert main(["train", "--config", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("raypatch: error: unknown preset 'nope'") and "\n" not in err
    assert main(["train", "--config", "tiny", "--set", "scale.zero_stage=4"]) == 2
    assert "'scale.zero_stage': must be 0 (from the model size), 1, 2 or 3" in capsys.readouterr().err


def test_print_config(capsys):
    from raypatch.cli import main

    assert main(["train", "--config", "paper-370m", "--print-config"]) == 0
    assert "hidden_size: 1024" in capsys.readouterr().out
    assert os.environ.get("RAYPATCH_KILL_AT_STEPS") is None


def test_evaluate_command_matches_the_run(reference, shards):
    import argparse

    from raypatch.cli import evaluate_command

    cfg, summary = reference
    out = evaluate_command(argparse.Namespace(model=summary["export"], shards=shards, text="", seq_len=0,
                                              max_rows=cfg.eval.max_rows))
    assert out["seq_len"] == cfg.data.seq_len
    assert out["val"]["loss"] == pytest.approx(summary["final"]["val/loss"], abs=1e-4)
