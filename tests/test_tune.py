"""Fixed-compute search over K and λ with Ray Tune (Train V2 driver pattern). Run: pytest tests/test_tune.py"""

from __future__ import annotations

import csv
import pickle
from pathlib import Path

import pytest

from raypatch import presets
from raypatch.config import apply_overrides
from raypatch.presets import load_config
from raypatch.safety import InputError
from raypatch.tune import grid_points, parse_space, plan_table, trial_budget, trial_config

BUDGET = 4096  # model positions per trial (tokens in the token phase + patches in the patch phase)


def base(shards: str, storage: Path):
    # 512 tokens per step: whole rows for K up to 4 at T=32 on 2 workers x 2 rows; half a CPU per worker
    # so that two trials run at once on the 4 logical CPUs of the test cluster. A checkpoint at step 3, before
    # any evaluation (only at phase ends): its report once ended the whole search on Tune's strict metric check.
    return apply_overrides(presets.tiny(), [f"data.shards={shards}", f"checkpoint.storage_path={storage}",
                                            "optim.tokens_per_step=512", "scale.cpus_per_worker=0.5",
                                            "checkpoint.every_steps=3", "eval.every_steps=0", "eval.wikitext="])


def test_budget_split_is_whole_steps_within_one_step_of_the_budget():
    cfg = apply_overrides(presets.tiny(), ["optim.tokens_per_step=512"])
    for k, lam in [(1, 0.0), (2, 0.5), (2, 0.75), (4, 0.5), (4, 0.75)]:
        b = trial_budget(apply_overrides(cfg, [f"patch.k={k}", f"patch.lam={lam}"]), BUDGET, corpus_tokens=10**6)
        assert b.patch_tokens % 512 == 0 and b.token_tokens % 512 == 0
        assert BUDGET - 512 < b.positions <= BUDGET
        assert b.lam == pytest.approx(lam, abs=0.1)
    with pytest.raises(ValueError, match="less than one optimizer step of 512 tokens"):
        trial_budget(cfg, 300, corpus_tokens=10**6)
    with pytest.raises(ValueError, match="pass --multi-epoch"):
        trial_budget(cfg, BUDGET, corpus_tokens=1000)
    assert trial_budget(cfg, BUDGET, corpus_tokens=1000, multi_epoch=True).epochs(1000) > 1


def test_space_parsing():
    pts = grid_points(parse_space(["patch.k=1,2,4", "patch.lam=0.5,0.75"]))
    assert len(pts) == 5 and {"patch.k": "1", "patch.lam": "0"} in pts  # K=1 collapses to the baseline
    with pytest.raises(ValueError, match="'patch.kk': unknown key"):
        parse_space(["patch.kk=1,2"])
    assert parse_space(["optim.lr=loguniform:1e-4:1e-2"])["optim.lr"] == ("loguniform", 1e-4, 1e-2)


def test_plan_prints_what_tune_trains():
    cfg = apply_overrides(presets.tiny(), ["optim.tokens_per_step=512"])
    table = plan_table(BUDGET, 6_000, ks=[1, 4], lams=[0.5, 0.75], tokens_per_step=512)
    for k, lam in [(4, 0.5), (4, 0.75)]:  # the plan's row is the trial's data plan, token for token
        b = trial_budget(apply_overrides(cfg, [f"patch.k={k}", f"patch.lam={lam}"]), BUDGET, corpus_tokens=10**6)
        trial = trial_config(cfg, {"patch.k": k, "patch.lam": lam}, BUDGET, corpus_tokens=10**6)
        assert (trial.data.max_tokens, trial.data.patch_tokens) == (b.data_tokens, b.patch_tokens)
        assert f"| {k} | {lam:.3g} | {b.lam:.4f} | {b.relative_cost:.3f} | {b.data_tokens:,} | {b.patch_tokens:,} |" \
            in table
    assert "multi-epoch" in table


def test_plan_prints_the_schedules_tune_trains():
    """A schedule's plan row is the trial's data plan, phase by phase; the two-phase schedule is the (K, λ) row;
    a search's measured losses land in the row of the schedule it trained, one per bag weighting."""
    budget = 40_960  # three phases of whole 2,048-token steps (K=16 takes rows of 16·T = 512 tokens)
    cfg = apply_overrides(presets.tiny(), ["optim.tokens_per_step=2048"])
    sched = "16:0.2,4:0.4,1:0.4"
    table = plan_table(budget, 10**6, ks=[4], lams=[0.667], tokens_per_step=2048, schedules=[sched, "4:0.667,1:0.333"])
    trial = trial_config(cfg, {"phases.schedule": sched}, budget, corpus_tokens=10**6)
    shares = ",".join(f"{k}:{x:.4f}" for k, x in trial.schedule())
    cost = sum(x / k for k, x in trial.schedule())
    assert f"| {sched} | {shares} | {cost:.3f} | {trial.data.max_tokens:,} |" in table, table
    assert budget - 2048 < trial.data.max_tokens * cost <= budget
    b = trial_budget(apply_overrides(cfg, ["patch.k=4", "patch.lam=0.667"]), budget, corpus_tokens=10**6)
    assert f"| {b.data_tokens:,} | {b.patch_tokens:,} / {b.token_tokens:,} |" in table.split("| 4:0.667,1:0.333 |")[1]
    rows = [{"K": 16, "lam": 0.2, "schedule": trial.phases.schedule, "weights": w, "val_loss": v}
            for w, v in (("uniform", 5.25), ("power:1", 5.125))]
    with_loss = plan_table(budget, 10**6, ks=[1], lams=[], tokens_per_step=2048, schedules=[sched], results=rows)
    assert f"| {sched} | {shares} |" in with_loss and "| 5.1250 (power:1), 5.2500 (uniform) |" in with_loss
    over = plan_table(budget, 10**6, ks=[1], lams=[], tokens_per_step=2048, schedules=["16:0.999,1:0.001"])
    assert "| 16:0.999,1:0.001 | - | - | - | - | - | no: compute budget" in over


@pytest.mark.ray
def test_small_search_under_fixed_compute(shards, ray_local, tmp_path):
    from raypatch.tune import run_search, write_outputs

    cfg = base(shards, tmp_path)
    space = parse_space(["patch.k=1,4", "patch.lam=0.5,0.75"])  # K=1 collapses to one token-only point: 3 trials
    rows = run_search(cfg, budget=BUDGET, space=space, name="klam", storage=str(tmp_path), concurrency=2)
    ok = [r for r in rows if r.get("val_loss") is not None]
    assert len(ok) == 3, rows
    assert {(r["K"], r["lam"] > 0) for r in ok} == {(1, False), (4, True)}
    for r in ok:  # the same compute for every trial, within one optimizer step
        assert BUDGET - 512 < r["positions"] <= BUDGET, r
        assert r["D"] == r["patch_tokens"] + r["token_tokens"]
        assert r["trial"].startswith("trial-") and (tmp_path / "klam" / "trials" / r["trial"]).is_dir()
    d4 = next(r for r in ok if r["K"] == 4 and r["lam"] > 0.6)
    d1 = next(r for r in ok if r["K"] == 1)
    assert d4["D"] > 1.8 * d1["D"]  # K=4, λ≈0.75 affords about 1/(0.75/4 + 0.25) = 2.3x the data
    paths = write_outputs(rows, tmp_path / "klam", budget=BUDGET, wall_s=1.0, note="Note: well below.")
    winner = min(ok, key=lambda r: r["val_loss"])
    assert f"Winner: {winner['trial']} (K={winner['K']}" in paths["md"].read_text()
    assert paths["md"].read_text().rstrip().endswith("Note: well below.")
    assert {"csv", "md", "best", "heatmap"} <= set(paths) and paths["heatmap"].stat().st_size > 0
    with open(paths["csv"]) as f:
        assert len(list(csv.DictReader(f))) == 3
    best = load_config(str(paths["best"]))
    assert best.data.max_tokens == min(ok, key=lambda r: r["val_loss"])["D"]
    # Rerunning the same experiment name continues it from raypatch's JSON records. Every pickle in the
    # experiment directory is replaced by one that would create a marker file when loaded: none is loaded.
    exp, marker = tmp_path / "klam", tmp_path / "pwned"
    evil = pickle.dumps(Planted(str(marker)))
    planted = [exp / "tuner.pkl", *exp.rglob("*.pkl")]
    for f in planted:
        f.write_bytes(evil)
    redo = max(ok, key=lambda r: r["K"])["trial"]  # one trial's record lost: Tune runs it again, from its checkpoint
    (exp / "trials" / redo / "trial.json").unlink()
    runs_before = {d.name for d in exp.glob("tune-*")}
    again = run_search(cfg, budget=BUDGET, space=space, name="klam", storage=str(tmp_path), concurrency=2)
    assert not marker.exists(), "a planted pickle was loaded"
    assert len(planted) >= 2 and len({d.name for d in exp.glob("tune-*")} - runs_before) == 1
    by_name = {r["trial"]: r for r in again}
    assert sorted(by_name) == sorted(r["trial"] for r in ok)
    for r in ok:  # the rerun trial resumed from its last checkpoint: the same final loss, no step trained again
        assert by_name[r["trial"]]["val_loss"] == pytest.approx(r["val_loss"], rel=1e-6), r["trial"]
        assert by_name[r["trial"]]["positions"] == r["positions"]
    with pytest.raises(InputError, match=r"other settings \(budget: 4096 -> 8192"):
        run_search(cfg, budget=2 * BUDGET, space=space, name="klam", storage=str(tmp_path))
    # A search in which no trial finished leaves the earlier results as they were.
    before = {f: (exp / f).read_bytes() for f in ("results.md", "results.csv", "best.yaml")}
    with pytest.raises(InputError, match="no trial finished .* left as they were"):
        write_outputs([{"trial": "trial-x", "error": "boom"}], exp, budget=BUDGET, wall_s=1.0)
    assert {f: (exp / f).read_bytes() for f in before} == before


class Planted:
    """Unpickling it creates a file: the proof that something loaded a pickle it was handed."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_random_search_draws_the_same_points_from_the_seed():
    from raypatch.tune import sample_points, trial_name

    space = parse_space(["patch.k=2,4,8", "patch.lam=uniform:0.3:0.9", "optim.lr=loguniform:1e-4:3e-3"])
    a, b = sample_points(space, 6, seed=7), sample_points(space, 6, seed=7)
    assert a == b and sample_points(space, 6, seed=8) != a
    assert all(0.3 <= p["patch.lam"] <= 0.9 and 1e-4 <= p["optim.lr"] <= 3e-3 for p in a)
    assert len({trial_name(p) for p in a}) == len(a)
    assert trial_name({"patch.k": "4", "patch.lam": "0.5"}) == trial_name({"patch.lam": "0.5", "patch.k": "4"})
