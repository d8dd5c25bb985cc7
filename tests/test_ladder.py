"""The planner's fit on measured ladders: synthetic ladders of known slope and crossover (no Ray)."""

from __future__ import annotations

import json
import math
import random

import pytest

from raypatch.cli import main
from raypatch.ladder import advice_table, fit_ladder, read_ladders
from raypatch.safety import InputError


def synthetic(a: float, b: float, xs: list[float], *, seeds: int = 2, noise: float = 0.0, setting: str = "E2",
              k: int = 4, lam: float = 0.667, seed: int = 0, size: float = 0, c: float = 0.0) -> list[dict]:
    """Rungs whose Δ = a + b·log10(x) [+ c·log10(size)], plus Gaussian noise per seed; `size` recorded if given."""
    rng = random.Random(seed)
    shift = c * math.log10(size) if size else 0.0
    return [{"k": k, "lam": lam, "setting": setting, "tokens_per_param": x, **({"model_params": size} if size else {}),
             "deltas": [a + shift + b * math.log10(x) + rng.gauss(0, noise) for _ in range(seeds)]} for x in xs]


def test_fit_recovers_slope_intercept_and_crossover():
    # Δ = 0.3 − 0.1·log10(x): zero at x = 1000 tokens/parameter.
    f = fit_ladder(synthetic(0.3, -0.1, [10, 30, 100, 300]))
    assert f.a == pytest.approx(0.3) and f.b == pytest.approx(-0.1)
    assert f.crossover == pytest.approx(1000.0)
    mean, lo, hi, where = f.predict(100)
    assert mean == pytest.approx(0.1) and lo == pytest.approx(hi) and where == "measured"
    assert f.predict(3000)[3] == "extrapolated (×10 beyond the largest rung)"
    assert f.predict(3000)[0] == pytest.approx(-0.0477, abs=1e-3)


def test_noisy_fit_brackets_the_truth_and_widens_when_extrapolating():
    f = fit_ladder(synthetic(0.3, -0.1, [10, 30, 100, 300], seeds=3, noise=0.01, seed=1))
    assert f.b == pytest.approx(-0.1, abs=0.02) and 500 < f.crossover < 2000
    inside = f.predict(100)
    outside = f.predict(10_000)
    assert inside[1] < 0.1 < inside[2]
    assert outside[2] - outside[1] > inside[2] - inside[1]  # farther from the data, a wider interval


def test_a_flat_or_rising_ladder_has_no_crossover():
    assert fit_ladder(synthetic(0.05, 0.02, [10, 30, 100])).crossover is None


def test_too_few_rungs_say_so_instead_of_guessing():
    with pytest.raises(InputError, match="2 distinct rung.*at least 3"):
        fit_ladder(synthetic(0.3, -0.1, [10, 30], seeds=5))
    table = advice_table(synthetic(0.3, -0.1, [10, 30]), params=1000, budget=1e6)
    assert "at least 3" in table and "Recommendation: token-only" in table


def test_advice_recommends_only_with_the_whole_interval_below_zero():
    rungs = synthetic(0.3, -0.1, [10, 30, 100, 300], seeds=2, noise=0.005, seed=2)
    low = advice_table(rungs, params=1000, budget=1000 * 50)  # 50 tokens/param: Δ ≈ +0.13
    assert "Recommendation: token-only" in low and "measured" in low
    high = advice_table(rungs, params=1000, budget=1000 * 30_000)  # Δ ≈ −0.15, beyond the ladder
    assert "Recommendation: K=4" in high and "extrapolated" in high


def test_plan_reads_ladder_files(tmp_path, capsys):
    f = tmp_path / "ladder.json"
    f.write_text(json.dumps({"params": "total", "rungs": synthetic(0.3, -0.1, [10, 30, 100, 300])}))
    rungs, counted = read_ladders([str(f)])
    assert counted == "total" and len(rungs) == 4
    assert main(["plan", "--config", "tiny", "--budget", "3e7", "--corpus-tokens", "100000000", "--ladder", str(f),
                 "--params", "10000"]) == 0
    out = capsys.readouterr().out
    assert "3,000 tokens/parameter" in out and "Recommendation: K=4" in out
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert main(["plan", "--config", "tiny", "--budget", "1e6", "--corpus-tokens", "1000000", "--ladder",
                 str(bad)]) == 2
    assert capsys.readouterr().err.startswith("raypatch: error: --ladder")


def test_tune_warns_when_its_search_runs_well_below_the_crossover():
    from raypatch.cli import transfer_note_for
    from raypatch.ladder import DEFAULT_LADDER, PAPER_CROSSOVER, transfer_note
    from raypatch.presets import get

    # Crossover at 10^(0.6/0.24) = 316 tokens/param: warn at 3 and 100, not at 200 (within a factor 3) or beyond.
    rungs = synthetic(0.6, -0.24, [3, 10, 30, 100])
    note = transfer_note(3.0, rungs, source="mine.json")
    assert note and "at 3 tokens per parameter" in note and "mine.json predicts a crossover at 316" in note
    assert transfer_note(100.0, rungs) and transfer_note(200.0, rungs) is None and transfer_note(5e3, rungs) is None
    # A ladder that never falls: the paper's crossover is the yardstick, and the note says how far it measured.
    flat = transfer_note(3.0, synthetic(0.5, 0.1, [3, 10, 30, 300]))
    assert "behind up to 300" in flat and f"{PAPER_CROSSOVER[0]:.0f}" in flat
    assert transfer_note(PAPER_CROSSOVER[0] / 2, []) is None
    # What `raypatch tune` says for the demo preset's small budgets, from the ladder shipped with the package.
    assert DEFAULT_LADDER.is_file()
    note = transfer_note_for(get("demo"), 4e5, [str(DEFAULT_LADDER)])
    assert note and "0.22 tokens per parameter" in note and "regime_ladder.json" in note
    # "builtin" names that file from any working directory (a pip install has no raypatch/ladders/ path).
    from raypatch.ladder import read_ladders
    builtin, shipped = read_ladders(["builtin"]), read_ladders([str(DEFAULT_LADDER)])
    assert builtin[1] == shipped[1] and len(builtin[0]) == len(shipped[0]) > 0
    assert [{**r, "source": 0} for r in builtin[0]] == [{**r, "source": 0} for r in shipped[0]]


def test_the_fit_uses_the_falling_branch_of_a_rise_then_fall_ladder():
    """Δ rises to a peak at 30 tokens/param, then falls with slope −0.6 towards a crossover at 10^(1.8/0.6) = 1000:
    the fit starts at the peak and recovers it; a fit over every rung would not see a crossover in range."""
    rising = synthetic(0.2, 0.3, [3, 10])
    falling = synthetic(1.8, -0.6, [30, 100, 300])
    f = fit_ladder(rising + falling)
    assert f.rungs == 3 and 10 ** f.x_min == pytest.approx(30)
    assert f.b == pytest.approx(-0.6) and f.crossover == pytest.approx(1000, rel=1e-6)
    everything = fit_ladder(rising + falling, branch=False)
    assert everything.rungs == 5 and (everything.crossover is None or everything.crossover > 1e4)
    # Two falling rungs are too few for a branch: all rungs are fitted, and the table says which.
    short = synthetic(0.2, 0.3, [3, 10, 30, 100]) + synthetic(1.8, -0.6, [300])  # peak at 100: 2 rungs from it
    assert fit_ladder(short).rungs == 5
    assert "fit on 30–300" in advice_table(rising + falling, params=10**6, budget=5e8)


def test_two_sizes_fit_a_size_axis_and_a_crossover_per_size():
    """Δ = 1.0 − 0.2·log10(x) − 0.1·log10(N): at N=10^4 zero at x = 10^3, at N=10^5 at 10^2.5 (a larger model
    starts to gain sooner). Two measured sizes recover all three coefficients; a third, unmeasured size is
    marked as extrapolated with how far."""
    rungs = (synthetic(1.0, -0.2, [3, 10, 30, 100], size=1e4, c=-0.1)
             + synthetic(1.0, -0.2, [3, 10, 30], size=1e5, c=-0.1))
    f = fit_ladder(rungs)
    assert f.sizes == (1e4, 1e5) and f.rungs == 7
    assert (f.a, f.b, f.c) == pytest.approx((1.0, -0.2, -0.1))
    assert f.crossover_at(1e4)[0] == pytest.approx(1000) and f.crossover_at(1e5)[0] == pytest.approx(10 ** 2.5)
    assert f.predict(10, 3e4)[3] == "measured"
    where = f.predict(10, 2.4e8)[3]
    assert where == "extrapolated (×2,400 beyond the largest measured size: Δ as at 100,000 parameters)", where
    assert "×10 below the smallest measured size: Δ as at 10,000 parameters" in f.predict(10, 1e3)[3]
    # Beyond the measured sizes the size term is held, not extrapolated: a few sizes cannot carry a slope that far.
    assert f.predict(10, 2.4e8)[0] == pytest.approx(f.predict(10, 1e5)[0])
    table = advice_table(rungs, params=10**5, budget=10**5 * 10)
    assert "Crossover per measured size" in table and "10,000 parameters: crossover 1,000" in table
    assert "100,000 parameters: crossover 316" in table


def test_one_measured_size_marks_every_other_size_as_extrapolated():
    rungs = synthetic(0.3, -0.1, [10, 30, 100, 300], size=153_840)
    f = fit_ladder(rungs)
    assert len(f.coef) == 2 and f.sizes == (153_840,)
    assert f.predict(100, 153_840)[3] == "measured"
    assert f.predict(100, 370e6)[3] == "extrapolated (×2,410 beyond the largest measured size)"
    old = fit_ladder(synthetic(0.3, -0.1, [10, 30, 100, 300]))  # a ladder that does not record its size
    assert old.predict(100, 370e6)[3] == "extrapolated (the ladder does not record its model size)"


def test_a_size_still_rising_at_its_largest_rung_is_left_out_and_named():
    """A third size whose Δ still rises at its last rung says nothing about where Δ reaches 0: the fit is the two
    falling sizes' alone (the same coefficients as without it), and the table names the size left out."""
    falling = (synthetic(1.0, -0.2, [3, 10, 30, 100], size=1e4, c=-0.1)
               + synthetic(1.0, -0.2, [3, 10, 30], size=1e5, c=-0.1))
    rising = synthetic(0.1, 0.3, [1, 3, 10], size=1e6)
    f = fit_ladder(falling + rising)
    assert f.sizes == (1e4, 1e5) and (f.a, f.b, f.c) == pytest.approx(fit_ladder(falling).coef)
    table = advice_table(falling + rising, params=10**5, budget=10**6)
    assert ("1,000,000 parameters: not in the fit: Δ is largest at 10 tokens/param (+0.400) and has not fallen "
            "over 3 rungs up to 10") in table
    # With no size past its peak there is no branch to prefer: every rung is fitted, as before.
    assert fit_ladder(rising).rungs == 3
