"""LR schedule table. Run: pytest tests/test_schedule.py"""

import pytest

from raypatch.optim import lr_at


@pytest.mark.parametrize("step,expected", [(0, 0.25), (3, 1.0), (4, 1.0), (8, 0.5), (12, 0.0), (20, 0.0)])
def test_warmup_then_cosine(step, expected):
    assert lr_at(step, 12, lr=1.0, warmup_steps=4) == pytest.approx(expected)


def test_min_lr_and_no_warmup():
    assert lr_at(0, 10, lr=1.0, warmup_steps=0, min_lr=0.1) == pytest.approx(1.0)
    assert lr_at(10, 10, lr=1.0, warmup_steps=0, min_lr=0.1) == pytest.approx(0.1)


def test_preemption_checks_go_by_time_with_the_same_steps_on_every_rank():
    """The interval comes only from the step and the all-reduced seconds, so every rank computes the same one."""
    from raypatch import presets
    from raypatch.config import apply_overrides
    from raypatch.train import Worker, agree_preemption_interval

    cfg = presets.tiny()
    assert cfg.checkpoint.preemption_check_every == 0 and cfg.checkpoint.preemption_check_seconds == 10.0
    ranks = [Worker(rank=r, world_size=2, device="cpu", log_at=(40, 1000.0 + r)) for r in range(2)]
    for w in ranks:  # 10 steps in 2.5 s (0.25 s a step): ask every 40 steps
        agree_preemption_interval(cfg, w, 50, 2.5)
    assert [w.preempt_every for w in ranks] == [40, 40] and ranks[0].log_at[0] == 50
    slow = apply_overrides(cfg, ["checkpoint.preemption_check_seconds=1"])
    agree_preemption_interval(slow, ranks[0], 60, 30.0)  # 3 s a step: every step, never 0
    assert ranks[0].preempt_every == 1


def test_zero_stage_from_precision_and_model_size():
    from raypatch import presets
    from raypatch.checkpoint import Resume, TrainState
    from raypatch.config import apply_overrides
    from raypatch.optim import deepspeed_config, zero_stage

    auto = presets.demo()  # fp32
    assert auto.scale.precision == "fp32" and auto.scale.zero_stage == 0
    assert zero_stage(auto, 1_840_256) == 0 and zero_stage(auto, 100_000_001) == 1
    assert zero_stage(auto, 7_000_000_000) == 2
    bf16 = apply_overrides(auto, ["scale.precision=bf16"])
    assert zero_stage(bf16, 1_840_256) == 1 and zero_stage(bf16, 7_000_000_000) == 2
    assert zero_stage(apply_overrides(auto, ["scale.zero_stage=3"]), 1000) == 3
    ds = deepspeed_config(auto, 2, 2, 1_840_256)
    assert ds["zero_optimization"]["stage"] == 0 and ds["optimizer"]["params"]["fused"] is True
    assert deepspeed_config(auto, 2, 2, 1_840_256, stage=2)["zero_optimization"]["stage"] == 2
    # A resumed run keeps the stage its checkpoint was written with; one that predates the record holds ZeRO
    # shards, so it never resumes without ZeRO.
    assert Resume(TrainState()).zero_stage(0) == 0
    assert Resume(TrainState(), stage=1).zero_stage(0) == 1 and Resume(TrainState(), stage=0).zero_stage(2) == 0
    assert Resume(TrainState(), stage=-1).zero_stage(0) == 1 and Resume(TrainState(), stage=-1).zero_stage(2) == 2
