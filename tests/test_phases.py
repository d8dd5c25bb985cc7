"""Phase schedules (phases.schedule, e.g. 16:0.2,4:0.4,1:0.4): the plan, the config checks, and a three-phase
run on the real stack, killed in its second patch phase and resumed exactly.

Run: pytest tests/test_phases.py   (about 2 minutes on 2 cores)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from raypatch import presets
from raypatch.config import apply_overrides
from raypatch.data import plan_from_config, plan_phases, plan_schedule

from .helpers import blocks_by_step, killed_then_resumed, step_losses


def test_a_schedule_splits_the_data_into_contiguous_disjoint_phases_at_constant_tokens_per_step():
    plans = plan_schedule(stream_tokens=100_000, schedule=[(16, 0.2), (4, 0.4), (1, 0.4)], tokens_per_step=4096,
                          block_tokens=lambda k: 64 * k, max_tokens=81_920)
    assert [(p.phase, p.k, p.block_tokens) for p in plans] == [("patch", 16, 1024), ("patch", 4, 256),
                                                               ("token", 1, 64)]
    assert [p.start for p in plans] == [0, 16_384, 49_152] and [p.token_budget for p in plans] == [16_384,
                                                                                                 32_768, 32_768]
    assert all(p.blocks_per_step * p.block_tokens == 4096 for p in plans)  # the same tokens per step
    assert [p.num_steps for p in plans] == [4, 8, 8]


def test_a_two_phase_schedule_is_the_patch_k_lam_plan():
    two = plan_schedule(stream_tokens=50_000, schedule=[(2, 0.5), (1, 0.5)], tokens_per_step=256,
                        block_tokens=lambda k: 32 * k, max_tokens=8192)
    assert two == plan_phases(stream_tokens=50_000, seq_len=32, k=2, lam=0.5, tokens_per_step=256, max_tokens=8192)


@pytest.mark.parametrize("bad,match", [
    ("4:0.5", "then one token phase"), ("4:0.5,2:0.5", "then one token phase"), ("1:0.5,4:0.5", "then one token"),
    ("4:0.5,1:0.4", "sum to 1"), ("4:0,1:1", "sum to 1"), ("4-0.5,1:0.5", "K:share items"), ("x:0.5,1:0.5", "K:share"),
])
def test_bad_schedules_are_refused_naming_the_field(bad, match):
    with pytest.raises(ValueError, match=f"phases.schedule.*{match}"):
        apply_overrides(presets.tiny(), [f"phases.schedule={bad}"])


def test_every_phase_needs_whole_rows_per_step_for_every_worker():
    # tiny: T=32, 256 tokens per step, 2 workers: K=16 makes rows of 512 tokens, not a whole number per step.
    with pytest.raises(ValueError, match="optim.tokens_per_step"):
        apply_overrides(presets.tiny(), ["phases.schedule=16:0.5,1:0.5"])
    cfg = apply_overrides(presets.tiny(), ["phases.schedule=4:0.25,2:0.25,1:0.5"])
    assert cfg.schedule() == [(4, 0.25), (2, 0.25), (1, 0.5)] and cfg.run_label() == "schedule 4:0.25,2:0.25,1:0.5"
    assert apply_overrides(presets.tiny(), []).schedule() == [(2, 0.5), (1, 0.5)]


@pytest.fixture(scope="module")
def three_phases(shards, ray_local, tmp_path_factory):
    """A fault-free run of 4:0.25,2:0.25,1:0.5 on 8,192 tokens: 8 steps at K=4, 8 at K=2, 16 at K=1."""
    from raypatch.driver import fit

    from .test_train import tiny

    cfg = tiny(shards, tmp_path_factory.mktemp("runs"), "three", "phases.schedule=4:0.25,2:0.25,1:0.5",
               "eval.wikitext=")
    return cfg, fit(cfg)


def test_three_phases_switch_twice_with_fresh_warmups_and_count_their_cost(three_phases, shards):
    from raypatch.shards import load_manifest

    cfg, s = three_phases
    plans = plan_from_config(cfg, load_manifest(shards)["splits"]["train"]["tokens"])
    assert [p.num_steps for p in plans] == [8, 8, 16]
    rows = [json.loads(x) for x in (Path(s["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "train/loss" in r and not r.get("event")]
    assert [r["patch/k"] for r in train] == [4] * 8 + [2] * 8 + [1] * 16
    assert sum(1 for r in rows if r.get("event") == "switch") == 2
    lr = {r["step"]: r["train/lr"] for r in train}
    assert lr[1] == lr[9] == lr[17] and lr[1] < lr[2]  # each phase warms up from the start again
    st = s["state"]
    assert st["tokens"] == {"patch": 4096, "token": 4096}
    assert st["positions"] == {"patch": 2048 // 4 + 2048 // 2, "token": 4096}
    assert s["relative_cost"] == pytest.approx(0.25 / 4 + 0.25 / 2 + 0.5)
    # Each phase trains each of its blocks once, step by step in order (blocks are counted from the phase's own
    # start in the stream, which plan_schedule makes contiguous and disjoint).
    blocks = blocks_by_step(Path(s["run_dir"]))
    for plan, name in zip(plans, ("patch1", "patch2", "token3")):
        steps = [blocks[f"{name}:{i}"] for i in range(plan.num_steps)]
        assert sum(steps, []) == list(range(plan.num_steps * plan.blocks_per_step)), name


@pytest.mark.slow
@pytest.mark.drill  # about 2.5 minutes, outside CI's time: `pytest -m drill tests/test_phases.py`
def test_a_kill_in_the_second_patch_phase_resumes_exactly(three_phases, shards, tmp_path, monkeypatch):
    from .test_train import tiny

    _, ref = three_phases
    cfg = tiny(shards, tmp_path, "killed", "phases.schedule=4:0.25,2:0.25,1:0.5", "eval.wikitext=",
               "checkpoint.max_failures=0")
    summary = killed_then_resumed(cfg, monkeypatch, 14)  # after the checkpoint at step 12, inside K=2
    run, ref_run = Path(summary["run_dir"]), Path(ref["run_dir"])
    assert blocks_by_step(run) == blocks_by_step(ref_run)
    a, b = step_losses(run), step_losses(ref_run)
    assert a.keys() == b.keys()
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-4, abs=1e-5), step


def test_a_schedule_trial_spends_the_budget_in_whole_steps_of_every_phase():
    from raypatch.patching import schedule_ends, schedule_split
    from raypatch.tune import parse_space, trial_config

    space = parse_space(["phases.schedule=4:0.667,1:0.333|16:0.2,4:0.4,1:0.4", "patch.weights=uniform,power:1"])
    assert space["phases.schedule"] == ["4:0.667,1:0.333", "16:0.2,4:0.4,1:0.4"]
    for budget in (8192, 20_000, 1e6):
        exact, d, tokens = schedule_split(budget, [(16, 0.2), (4, 0.4), (1, 0.4)], tokens_per_step=1024)
        assert all(t % 1024 == 0 and t > 0 for t in tokens) and sum(tokens) == d
        positions = tokens[0] / 16 + tokens[1] / 4 + tokens[2]
        assert budget - 1024 < positions <= budget  # equal compute, within one token step
        assert schedule_ends([(int(k), float(x)) for k, x in (i.split(":") for i in exact.split(","))], d) == \
            [tokens[0], tokens[0] + tokens[1], d]  # the plan's boundaries are the step boundaries
    base = apply_overrides(presets.tiny(), ["optim.tokens_per_step=1024"])
    cfg = trial_config(base, {"phases.schedule": "16:0.2,4:0.4,1:0.4", "patch.weights": "power:1"}, 1e6,
                       corpus_tokens=10**7)
    assert cfg.data.max_tokens == d and cfg.patch.weights == "power:1" and not cfg.compare_baseline
    plans = plan_from_config(cfg, 10**7)
    assert [p.token_budget for p in plans] == tokens and all(p.tail_tokens == 0 for p in plans)
    with pytest.raises(ValueError, match="too small for the schedule"):
        trial_config(base, {"phases.schedule": "16:0.2,4:0.4,1:0.4"}, 1200, corpus_tokens=10**7)


@pytest.mark.ray
def test_tune_searches_schedules_and_weights_at_equal_compute(shards, ray_local, tmp_path):
    from raypatch.tune import parse_space, run_search, write_outputs

    from .test_tune import BUDGET, base

    # Two points (a grid over both would be four trials: CI's time): two phases with the paper's loss against
    # three phases with the power weighting.
    points = [{"phases.schedule": "2:0.5,1:0.5", "patch.weights": "uniform"},
              {"phases.schedule": "4:0.25,2:0.25,1:0.5", "patch.weights": "power:1"}]
    assert parse_space(["phases.schedule=2:0.5,1:0.5|4:0.25,2:0.25,1:0.5"])["phases.schedule"] == \
        [p["phases.schedule"] for p in points]
    rows = run_search(base(shards, tmp_path), budget=BUDGET, points=points, name="sched", storage=str(tmp_path),
                      concurrency=2)
    ok = [r for r in rows if r.get("val_loss") is not None]
    assert len(ok) == 2, rows
    assert {(r["param:phases.schedule"], r["weights"]) for r in ok} == {
        (p["phases.schedule"], p["patch.weights"]) for p in points}
    for r in ok:
        assert BUDGET - 512 < r["positions"] <= BUDGET, r
    paths = write_outputs(rows, tmp_path / "sched", budget=BUDGET, wall_s=1.0)
    md = paths["md"].read_text()
    assert "| trial | schedule | weights |" in md and "Winner: trial-" in md and "(schedule " in md
    assert paths["heatmap"].stat().st_size > 0


@pytest.mark.slow
@pytest.mark.drill  # about 6 minutes, outside CI's time: `pytest -m drill tests/test_phases.py`
def test_elastic_resizes_across_a_schedule(shards, tmp_path):
    """tests/drills.py's elastic scenario (node B removed, then added back: 2 → 1 → 2 workers) on a three-phase
    schedule whose first switch falls between the two resizes: the shrunk group starts in the K=4 phase, trains
    through the switch to K=2 on one worker, and the regrown group resumes from its checkpoint after a switch.
    The finished run trained exactly a fault-free run's blocks, phase by phase."""
    from .test_operations import drill

    sched = "phases.schedule=4:0.0625,2:0.1875,1:0.75"  # 16 steps at K=4, 48 at K=2, 192 at K=1
    ref = drill("reference", shards, tmp_path, sched)
    r = drill("elastic", shards, tmp_path, sched)
    recs = sorted(r["records"], key=lambda x: x["t"])
    worlds = [x["world"] for x in recs]
    assert [w for i, w in enumerate(worlds) if i == 0 or w != worlds[i - 1]][:3] == [2, 1, 2]
    first1 = next(x for x in recs if x["world"] == 1)
    first2 = next(x for x in recs if x["world"] == 2 and x["t"] > first1["t"])
    # How far one worker trains before the regrown group takes over depends on the machine's speed: through the
    # first switch at least (measured: through both, the group of two resuming in the token phase).
    assert first1["phase"] == "patch1" and first2["phase"] in ("patch2", "token3"), (first1, first2, r["events"])
    assert {x["phase"] for x in recs if x["world"] == 1} >= {"patch1", "patch2"}
    assert r["blocks"] == ref["blocks"] and {k.split(":")[0] for k in ref["blocks"]} == {"patch1", "patch2", "token3"}
