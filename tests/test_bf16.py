"""bf16 on CPU: DeepSpeed's bf16 path (bf16 module weights, fp32 master copies in DeepSpeed's BF16 optimizer) under
ZeRO-1, 2 and 3, a stopped run's resume and the Hugging Face export, each against an fp32 run or an uninterrupted
bf16 run. Local Ray, 2 CPU workers over gloo, the tiny preset at data.max_tokens=4096 (8 patch steps, then 8 token
steps), no WikiText eval. Six fits in all: one fp32 reference, one bf16 run per stage, a killed run and its resume.

What runs on CPU (torch 2.13+cpu, DeepSpeed 0.19.8): bf16 with ZeRO-1, ZeRO-2 and ZeRO-3, checkpoint save and
resume, export. Not covered: bf16 without ZeRO. DeepSpeed itself accepts it on CPU (stage 0 + bf16 builds its
FP16_UnfusedOptimizer over bf16 weights and steps; checked in a one-process script), but raypatch has no way to ask
for it: scale.zero_stage=0 means "chosen from the model", and for bf16 that is ZeRO-1 (raypatch.optim.zero_stage:
ZeRO-1's fp32 master partition is what a bf16 run needs anyway). So there is no bf16 no-ZeRO path to test.
fp16 is refused on CPU by DeepSpeed ("Type fp16 is not supported on your device") and by the config.

Run: pytest tests/test_bf16.py   (slow tier; about 5 minutes on 2 cores: six fits of 35-50 s, mostly Ray Train
start and teardown)
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from raypatch import presets
from raypatch.config import Config, apply_overrides
from raypatch.data import TokenStream, val_rows

from .helpers import blocks_by_step, killed_then_resumed, step_losses

pytestmark = pytest.mark.slow

STAGES = (1, 2, 3)
BF16_REL = 2.0**-8
"""bf16's unit roundoff (8-bit significand, 7 bits stored: rounding to nearest moves a value by at most 2^-8 ≈
0.39 % of it); the bound for anything bf16 computes that fp32 also computes. Margins: test_bf16_losses_track_fp32."""


def tiny(shards: str, storage: Path, name: str, *extra: str) -> Config:
    return apply_overrides(presets.tiny(), [f"data.shards={shards}", f"checkpoint.storage_path={storage}",
                                            f"checkpoint.name={name}", "data.record_blocks=true", "log_every=1",
                                            "data.max_tokens=4096", "eval.wikitext=", *extra])


def bf16_cfg(shards: str, storage: Path, name: str, stage: int, *extra: str) -> Config:
    return tiny(shards, storage, name, "scale.precision=bf16", f"scale.zero_stage={stage}", *extra)


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bf16runs")


@pytest.fixture(scope="module")
def fp32(shards, ray_local, runs_dir) -> dict:
    """The fp32 reference: the tiny preset as it is (ZeRO-2, fp32), on the same data and seed."""
    from raypatch.driver import fit

    return fit(tiny(shards, runs_dir, "fp32"))


@pytest.fixture(scope="module")
def bf16(shards, ray_local, runs_dir):
    """stage -> the summary of a fault-free bf16 run at that ZeRO stage, run once on first use."""
    from raypatch.driver import fit

    done: dict[int, dict] = {}

    def run(stage: int) -> dict:
        if stage not in done:
            done[stage] = fit(bf16_cfg(shards, runs_dir, f"bf16-z{stage}", stage))
        return done[stage]

    return run


@pytest.mark.parametrize("stage", STAGES)
def test_bf16_losses_track_fp32(fp32, bf16, stage):
    """Every step's training loss of the bf16 run within rel 2^-8 (≈ 0.39 %) of the fp32 run's; same for the
    final validation loss. It really is bf16: the checkpoint's module weights are bf16 and the optimizer shards
    are those of DeepSpeed's BF16 optimizer (fp32 master weights), `bf16_zero_pp_rank_*`.

    Why 2^-8: a bf16 number carries 8 significant bits, so one rounding of the weights or activations moves a
    value by at most 2^-8 relative; the loss, a mean over 256 tokens per step, averages these roundings, and the
    fp32 master weights keep them from compounding across steps. Measured here (16 steps, 2 workers): max
    relative difference 3.8e-4 (ZeRO-1), 3.5e-4 (ZeRO-2), 3.4e-4 (ZeRO-3), i.e. at most 0.0021 absolute on
    losses near 6; final val loss 5.8087 / 5.8096 / 5.8080 against fp32's 5.8071 (rel ≤ 4.3e-4). 2^-8 leaves a
    ten-fold margin for another CPU's kernels, yet is about 20 times below the loss's drop over the run
    (6.24 -> 5.8), so a bf16 run that stops learning (updates lost to bf16 rounding, no master copy) fails it.
    """
    summary = bf16(stage)
    run, ref = Path(summary["run_dir"]), Path(fp32["run_dir"])
    assert summary["state"]["global_step"] == 16
    assert blocks_by_step(run) == blocks_by_step(ref)  # the same data, step for step
    a, b = step_losses(run), step_losses(ref)
    assert a.keys() == b.keys() and len(a) == 16
    for s in a:
        assert a[s] == pytest.approx(b[s], rel=BF16_REL), s
    assert a != b, "bit-identical to fp32: the bf16 path did not run"
    assert summary["final"]["val/loss"] == pytest.approx(fp32["final"]["val/loss"], rel=BF16_REL)
    ds = Path(summary["checkpoint"]) / "ds"
    assert sorted(f.name for f in ds.glob("bf16_zero_pp_rank_*_optim_states.pt")) == [
        f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)]
    states = torch.load(next(ds.glob("*model_states.pt")), map_location="cpu", weights_only=True)
    assert {t.dtype for t in states["module"].values()} == {torch.bfloat16}


@pytest.mark.parametrize("stage", [2])
def test_bf16_stopped_run_resumes_exactly(bf16, shards, ray_local, runs_dir, monkeypatch, stage):
    """A bf16 run killed at step 10 with no retries left fails; rerunning its name resumes from checkpoint 8
    and then trains the same blocks to exactly the same per-step losses (float ==) and final val loss as the
    uninterrupted bf16 run. Exact, not approximate: the checkpoint holds the fp32 master weights, AdamW's
    moments and the RNG and data cursor, the bf16 module weights are recomputed from the master copy as in the
    uninterrupted run, and on CPU with 2 ranks every kernel and the gloo sum are deterministic (measured: a
    difference of 0.0 on every step). Run here at ZeRO-2 only, to keep the file's time down: the same test at
    ZeRO-1 and ZeRO-3 (parametrize with [1, 3]) also passed, exactly, once (2 passed in 260 s)."""
    ref = bf16(stage)
    cfg = bf16_cfg(shards, runs_dir, f"bf16-z{stage}-stopped", stage, "checkpoint.max_failures=0")
    summary = killed_then_resumed(cfg, monkeypatch, 10)
    run, ref_run = Path(summary["run_dir"]), Path(ref["run_dir"])
    assert summary["state"]["global_step"] == 16
    assert blocks_by_step(run) == blocks_by_step(ref_run)
    assert step_losses(run) == step_losses(ref_run)
    assert summary["final"]["val/loss"] == ref["final"]["val/loss"]


@pytest.mark.parametrize("stage", STAGES)
def test_bf16_export_loads_in_transformers(bf16, shards, stage):
    """The export (DeepSpeed's fp32 master weights, consolidated) loads with torch_dtype=torch.bfloat16; its val
    loss on the run's validation rows is the run's final val loss within rel 2^-8 (measured: equal for ZeRO-1,
    within 5e-7 absolute for ZeRO-2 and 3, since casting the master copy to bf16 gives the run's own bf16
    weights), and greedy generation produces new tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    summary = bf16(stage)
    cfg = presets.tiny()
    hf = AutoModelForCausalLM.from_pretrained(summary["export"], torch_dtype=torch.bfloat16)
    tok = AutoTokenizer.from_pretrained(summary["export"])
    emb = hf.get_input_embeddings().weight
    assert emb.dtype == torch.bfloat16 and emb.shape == (512, 64)  # consolidated, even from ZeRO-3 partitions
    rows = torch.from_numpy(val_rows(TokenStream(shards, "val"), cfg.data.seq_len, cfg.eval.max_rows)).long()
    rows = rows[: len(rows) - len(rows) % 2]
    with torch.no_grad():
        loss = torch.stack([hf(r[None], labels=r[None]).loss.float() for r in rows]).mean()
    assert float(loss) == pytest.approx(summary["final"]["val/loss"], rel=BF16_REL)
    prompt = tok("def ", return_tensors="pt")
    out = hf.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > prompt["input_ids"].shape[1]
