"""Advice from measurements: where patch-level training pays off, fitted on measured ladders.

A ladder is a list of rungs, each a token-only run and a patch-level run of one (K, λ) compared at one scale:
the x of a rung is tokens per parameter of the token-only run, its y the difference Δ = final token-level
validation loss of the patch run − that of the token-only run (negative: patch-level training is better), one
value per seed. `setting` says how the two were matched: "E1" (equal data; the patch run spends λ/K + 1 − λ of
the compute) or "E2" (equal compute; the patch run reads 1 / (λ/K + 1 − λ) times the data).

The fit is Δ = a + b·log10(tokens/parameter) by least squares over every seed's point, with a prediction interval
from the residual spread (which carries the seed spread): the paper's Table 4 moves about linearly in log data.
It uses the ladder's falling branch, from the rung with the largest Δ on (falling_branch), when that has 3 rungs.
A ladder needs at least 3 distinct rungs for a fit; with fewer, `fit_ladder` says so instead of guessing.

File format (what benchmarks/regime.py writes, and what `raypatch plan --ladder FILE` reads):
    {"params": "total" or "non_embedding", "rungs": [{"k": 4, "lam": 0.667, "setting": "E2",
      "tokens_per_param": 30.0, "deltas": [0.012, 0.018]}, ...]}
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raypatch.safety import InputError

MIN_RUNGS = 3
# The ladder raypatch measured (benchmarks/regime.py; a copy ships with the package for `raypatch tune`).
DEFAULT_LADDER = Path(__file__).parent / "ladders" / "regime_ladder.json"
# The paper's crossover (Table 4: 370M, K=4, λ=2/3, equal data): patch behind at 243, ahead at 486 tokens/param.
PAPER_CROSSOVER = (243.0, 486.0)
T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23, 15: 2.13,
       20: 2.09, 30: 2.04}  # two-sided 95 % Student t quantiles by degrees of freedom


def tpp(x: float) -> str:
    """Tokens per parameter as people write them: 0.16, 3.5, 120, 3,000."""
    return f"{x:,.0f}" if x >= 10 else f"{x:.2g}"


def t95(dof: int) -> float:
    return next((T95[d] for d in sorted(T95) if d >= dof), 1.96)


@dataclass
class LadderFit:
    """Δ = a + b·log10(tokens/parameter), fitted on one (K, λ, setting)."""

    k: int
    lam: float
    setting: str
    a: float
    b: float
    resid_sd: float
    n: int
    rungs: int
    x_mean: float
    sxx: float
    x_min: float
    x_max: float

    @property
    def crossover(self) -> float | None:
        """Tokens per parameter where Δ reaches 0 (patch-level training starts to win), if Δ falls with data."""
        return 10 ** (-self.a / self.b) if self.b < 0 else None

    def predict(self, tokens_per_param: float) -> tuple[float, float, float, str]:
        """Predicted Δ, its 95 % prediction interval, and 'measured' (inside the ladder) or 'extrapolated'."""
        x = math.log10(tokens_per_param)
        mean = self.a + self.b * x
        half = t95(self.n - 2) * self.resid_sd * math.sqrt(1 + 1 / self.n + (x - self.x_mean) ** 2 / self.sxx)
        where = "measured" if self.x_min - 1e-9 <= x <= self.x_max + 1e-9 else "extrapolated"
        return mean, mean - half, mean + half, where


def falling_branch(rungs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rungs from the one with the largest mean Δ on, when they are at least MIN_RUNGS; else all of them.

    Small models at few tokens per parameter first fall behind more as data grows (the patch model has learned
    too little to transfer), then catch up; only the catching-up branch says where Δ reaches zero, so a fit
    that includes the rising rungs would put the crossover orders of magnitude too far (regime.md).
    """
    ordered = sorted(rungs, key=lambda r: r["tokens_per_param"])
    means = [sum(r["deltas"]) / len(r["deltas"]) for r in ordered]
    peak = max(range(len(ordered)), key=lambda i: means[i])
    tail = ordered[peak:]
    return tail if len({r["tokens_per_param"] for r in tail}) >= MIN_RUNGS else ordered


def fit_ladder(rungs: list[dict[str, Any]], *, branch: bool = True) -> LadderFit:
    """Least squares over every seed's point of rungs that share one (K, λ, setting); with `branch`, only over
    the falling branch (falling_branch), which `x_min` then starts."""
    keys = {(int(r["k"]), round(float(r["lam"]), 3), r["setting"]) for r in rungs}
    if len(keys) != 1:
        raise InputError(f"ladder: one fit per (K, λ, setting); got {sorted(keys)}")
    (k, lam, setting), = keys
    for r in rungs:
        if not r["tokens_per_param"] > 0:
            raise InputError(f"ladder: tokens_per_param must be > 0, got {r['tokens_per_param']}")
    xs, ys = [], []
    for r in falling_branch(rungs) if branch else rungs:
        for d in r["deltas"]:
            xs.append(math.log10(r["tokens_per_param"]))
            ys.append(float(d))
    distinct = len(set(xs))
    if distinct < MIN_RUNGS:
        raise InputError(f"ladder K={k} λ={lam:.3g} {setting}: {distinct} distinct rung(s); a fit needs at least "
                         f"{MIN_RUNGS}, so no prediction is made")
    n = len(xs)
    x_mean, y_mean = sum(xs) / n, sum(ys) / n
    sxx = sum((x - x_mean) ** 2 for x in xs)
    b = sum((x - x_mean) * (y - y_mean) for x, y in zip(xs, ys)) / sxx
    a = y_mean - b * x_mean
    sse = sum((y - a - b * x) ** 2 for x, y in zip(xs, ys))
    return LadderFit(k=k, lam=lam, setting=setting, a=a, b=b, resid_sd=math.sqrt(sse / max(1, n - 2)), n=n,
                     rungs=distinct, x_mean=x_mean, sxx=sxx, x_min=min(xs), x_max=max(xs))


def read_ladders(paths: list[str]) -> tuple[list[dict[str, Any]], str]:
    """The rungs of every file ("builtin": raypatch's own), and how their parameters were counted (all files
    must agree)."""
    rungs: list[dict[str, Any]] = []
    counted = set()
    for p in paths:
        try:
            # "builtin": the ladder shipped inside the package, found wherever raypatch is installed.
            d = json.loads((DEFAULT_LADDER if p == "builtin" else Path(p)).read_text())
            rungs += [{**r, "source": p} for r in d["rungs"]]
            counted.add(d.get("params", "total"))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise InputError(f"--ladder {p}: not a ladder file ({type(e).__name__}: {e})") from None
    if len(counted) > 1:
        raise InputError(f"--ladder: the files count parameters differently ({sorted(counted)})")
    return rungs, counted.pop() if counted else "total"


def advice_table(rungs: list[dict[str, Any]], *, params: int, budget: float, setting: str = "E2") -> str:
    """For a model of `params` parameters and a compute budget of `budget` model positions: per measured
    (K, λ), the predicted Δ at equal compute with its interval and basis, then a recommendation."""
    x = budget / params  # token-only training spends one position per token: its tokens per parameter
    groups: dict[tuple[int, float], list[dict[str, Any]]] = {}
    for r in rungs:
        if r["setting"] == setting:
            groups.setdefault((int(r["k"]), round(float(r["lam"]), 3)), []).append(r)
    if not groups:
        return f"no {setting} (equal compute) rungs in the ladder files: nothing to predict from"
    lines = [f"Predicted Δ = patch − token-only final val loss at equal compute, at {tpp(x)} tokens/parameter "
             f"({budget:.3g} positions, {params:,} parameters):", "",
             "| K | λ | predicted Δ | 95 % interval | basis | rungs (seeds) | crossover (tokens/param) |",
             "|---|---|---|---|---|---|---|"]
    best = None
    for (k, lam), rs in sorted(groups.items()):
        try:
            f = fit_ladder(rs)
        except InputError as e:
            lines.append(f"| {k} | {lam:.3g} | - | - | {e} | {len(rs)} | - |")
            continue
        mean, lo, hi, where = f.predict(x)
        cross = tpp(f.crossover) if f.crossover else "none (Δ does not fall with data)"
        lines.append(f"| {k} | {lam:.3g} | {mean:+.4f} | [{lo:+.4f}, {hi:+.4f}] | {where} "
                     f"(fit on {tpp(10 ** f.x_min)}–{tpp(10 ** f.x_max)}) | {f.rungs} ({f.n}) | {cross} |")
        if hi < 0 and (best is None or mean < best[2]):
            best = (k, lam, mean, where)
    lines.append("")
    if best:
        k, lam, mean, where = best
        caveat = ": beyond the measured rungs, so a trend, not a measurement" if where == "extrapolated" else ""
        lines.append(f"Recommendation: K={k}, λ={lam:.3g} (predicted {mean:+.4f} nats, the whole interval below 0; "
                     f"{where}{caveat}).")
    else:
        lines.append("Recommendation: token-only training (λ=0): no measured (K, λ) is predicted better with 95 % "
                     "confidence at this scale.")
    return "\n".join(lines)


def transfer_note(tokens_per_param: float, rungs: list[dict[str, Any]], source: str = "") -> str | None:
    """A warning when a search ran well below (a third of) the scale where patch-level training starts to pay
    off: the crossover a ladder predicts at equal compute, or the paper's when the ladder has none. None when the
    search is near or past it. A small search then favours token-only training, and its answer may not transfer."""
    crossovers, reach = [], 0.0
    for key in sorted({(int(r["k"]), round(float(r["lam"]), 3)) for r in rungs if r["setting"] == "E2"}):
        group = [r for r in rungs if r["setting"] == "E2" and (int(r["k"]), round(float(r["lam"]), 3)) == key]
        reach = max(reach, *(r["tokens_per_param"] for r in group))
        try:
            f = fit_ladder(group)
        except InputError:
            continue
        if f.crossover:
            crossovers.append((f.crossover, f"K={f.k}, λ={f.lam:.3g}"))
    ladder = f"the measured ladder{f' {source}' if source else ''}"
    if crossovers:
        at, which = min(crossovers)
        basis = f"{ladder} predicts a crossover at {tpp(at)} ({which})"
    else:
        at = PAPER_CROSSOVER[0]
        paper = f"the paper finds the crossover at {tpp(PAPER_CROSSOVER[0])}–{tpp(PAPER_CROSSOVER[1])}"
        basis = f"{ladder} shows patch-level training behind up to {tpp(reach)}; {paper}" if reach else paper
    if tokens_per_param >= at / 3:
        return None
    return (f"Note: these trials train at {tpp(tokens_per_param)} tokens per parameter, well below where "
            f"patch-level training starts to pay off ({basis} tokens per parameter). At this budget a search "
            f"favours token-only training (small λ); its answer may not transfer to a larger budget. "
            f"`raypatch plan --ladder` predicts the gap at the scale you will train.")
