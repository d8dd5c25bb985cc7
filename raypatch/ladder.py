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


def times(v: float) -> str:
    """A ratio to 3 significant digits as people write it: ×2.5, ×10, ×2,410."""
    return f"×{float(f'{v:.3g}'):,.0f}" if v >= 100 else f"×{v:.3g}"


def t95(dof: int) -> float:
    return next((T95[d] for d in sorted(T95) if d >= dof), 1.96)


@dataclass
class LadderFit:
    """Δ = a + b·log10(tokens/parameter) [+ c·log10(parameters)], fitted on one (K, λ, setting).

    With rungs of two or more model sizes the size term is fitted too (the same slope in data at every size,
    shifted by size: the fewest parameters a handful of rungs can carry); with one size, or rungs that do not say
    their size, it is left out and every prediction at another size is marked as extrapolated."""

    k: int
    lam: float
    setting: str
    coef: tuple[float, ...]
    cov: list[list[float]]  # (XᵀX)⁻¹: the coefficients' covariance up to the residual variance
    resid_sd: float
    n: int
    rungs: int  # distinct (size, tokens/param) points fitted
    x_min: float  # log10 tokens/param of the fitted rungs
    x_max: float
    sizes: tuple[float, ...] = ()  # the measured model sizes (parameters), smallest first; () when unknown

    @property
    def a(self) -> float:
        return self.coef[0]

    @property
    def b(self) -> float:
        return self.coef[1]

    @property
    def c(self) -> float:
        """Δ per decade of model size (0 when one size was measured)."""
        return self.coef[2] if len(self.coef) > 2 else 0.0

    def _row(self, x: float, params: float | None) -> list[float]:
        row = [1.0, x]
        if len(self.coef) > 2:
            # The size term is held at the nearest measured size: a slope fitted over a few sizes says nothing
            # about models orders of magnitude away (predict() marks such a prediction as extrapolated).
            size = min(max(params or self.sizes[-1], self.sizes[0]), self.sizes[-1])
            row.append(math.log10(size))
        return row

    def _band(self, row: list[float], *, new_point: bool) -> tuple[float, float]:
        mean = sum(c * v for c, v in zip(self.coef, row))
        quad = sum(row[i] * self.cov[i][j] * row[j] for i in range(len(row)) for j in range(len(row)))
        return mean, t95(self.n - len(self.coef)) * self.resid_sd * math.sqrt(max(0.0, quad + new_point))

    @property
    def crossover(self) -> float | None:
        """Tokens per parameter where Δ reaches 0 at the largest measured size, if Δ falls with data."""
        hit = self.crossover_at(None)
        return hit[0] if hit else None

    def crossover_at(self, params: float | None) -> tuple[float, float | None, float | None] | None:
        """(tokens/param where the fitted Δ reaches 0, and the range where its 95 % confidence band holds 0)
        at a model size (None: the largest measured); None if Δ does not fall with data. An end of the range
        beyond 10^8 tokens/param is None."""
        if self.b >= 0:
            return None
        size = self._row(0.0, params)[2] if len(self.coef) > 2 else 0.0
        at = -(self.a + self.c * size) / self.b
        grid = [i / 100 for i in range(-200, 801)]
        bands = [self._band(self._row(x, 10 ** size if len(self.coef) > 2 else None), new_point=False)
                 for x in grid]
        lo = next((x for x, (m, h) in zip(grid, bands) if m - h <= 0), None)
        hi = next((x for x, (m, h) in zip(grid, bands) if m + h < 0), None)
        return 10 ** at, None if lo is None else 10 ** lo, None if hi is None else 10 ** hi

    def predict(self, tokens_per_param: float, params: float | None = None) -> tuple[float, float, float, str]:
        """Predicted Δ, its 95 % prediction interval, and 'measured' (inside the fitted rungs and sizes) or
        'extrapolated (...)' saying how far beyond them."""
        x = math.log10(tokens_per_param)
        mean, half = self._band(self._row(x, params), new_point=True)
        beyond = []
        if x > self.x_max + 1e-9:
            beyond.append(f"{times(10 ** (x - self.x_max))} beyond the largest rung")
        elif x < self.x_min - 1e-9:
            beyond.append(f"{times(10 ** (self.x_min - x))} below the smallest rung")
        held = f": Δ as at {self.sizes[-1]:,.0f} parameters" if len(self.coef) > 2 else ""
        if params and self.sizes:
            if params > self.sizes[-1] * (1 + 1e-9):
                beyond.append(f"{times(params / self.sizes[-1])} beyond the largest measured size{held}")
            elif params < self.sizes[0] * (1 - 1e-9):
                held = f": Δ as at {self.sizes[0]:,.0f} parameters" if len(self.coef) > 2 else ""
                beyond.append(f"{times(self.sizes[0] / params)} below the smallest measured size{held}")
        elif params:
            beyond.append("the ladder does not record its model size")
        return mean, mean - half, mean + half, f"extrapolated ({'; '.join(beyond)})" if beyond else "measured"


def size_of(rung: dict[str, Any]) -> float | None:
    return float(rung["model_params"]) if rung.get("model_params") else None


def _branches(rungs: list[dict[str, Any]]) -> list[tuple[float, list[dict[str, Any]], list[dict[str, Any]]]]:
    """Per model size (0: not recorded): (size, its rungs by tokens/param, its rungs from the largest mean Δ on)."""
    out = []
    for size in sorted({size_of(r) or 0.0 for r in rungs}):
        ordered = sorted((r for r in rungs if (size_of(r) or 0.0) == size), key=lambda r: r["tokens_per_param"])
        means = [sum(r["deltas"]) / len(r["deltas"]) for r in ordered]
        out.append((size, ordered, ordered[max(range(len(ordered)), key=lambda i: means[i]):]))
    return out


def falling_branch(rungs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per model size (when the rungs say theirs), the rungs from the one with the largest mean Δ on, when they
    are at least MIN_RUNGS. A size whose Δ has not yet fallen over MIN_RUNGS rungs (still rising at its largest
    rung, say) is left out (not_falling names it) while another size has such a branch; when none has, every
    rung is fitted.

    Small models at few tokens per parameter first fall behind more as data grows (the patch model has learned
    too little to transfer), then catch up; only the catching-up branch says where Δ reaches zero, so a fit
    that includes the rising rungs would put the crossover orders of magnitude too far (regime.md).
    """
    falling = [tail for _, _, tail in _branches(rungs) if len({r["tokens_per_param"] for r in tail}) >= MIN_RUNGS]
    return sum(falling, []) if falling else list(rungs)


def not_falling(rungs: list[dict[str, Any]]) -> list[tuple[float, dict[str, Any]]]:
    """The sizes falling_branch leaves out, each with the rung of its largest mean Δ."""
    used = {id(r) for r in falling_branch(rungs)}
    return [(size, tail[0]) for size, ordered, tail in _branches(rungs) if not any(id(r) in used for r in ordered)]


def fit_ladder(rungs: list[dict[str, Any]], *, branch: bool = True) -> LadderFit:
    """Least squares over every seed's point of rungs that share one (K, λ, setting); with `branch`, only over
    each size's falling branch (falling_branch), which `x_min` then starts."""
    import numpy as np

    keys = {(int(r["k"]), round(float(r["lam"]), 3), r["setting"]) for r in rungs}
    if len(keys) != 1:
        raise InputError(f"ladder: one fit per (K, λ, setting); got {sorted(keys)}")
    (k, lam, setting), = keys
    for r in rungs:
        if not r["tokens_per_param"] > 0:
            raise InputError(f"ladder: tokens_per_param must be > 0, got {r['tokens_per_param']}")
    used = falling_branch(rungs) if branch else rungs
    sizes = sorted({s for r in used if (s := size_of(r))})
    if any(size_of(r) is None for r in used):
        sizes = []  # some rungs do not say their size: no size axis
    two_axes = len(sizes) >= 2
    rows, ys, points = [], [], set()
    for r in used:
        for d in r["deltas"]:
            x = math.log10(r["tokens_per_param"])
            rows.append([1.0, x, math.log10(size_of(r))] if two_axes else [1.0, x])
            ys.append(float(d))
            points.add((size_of(r), x))
    distinct = len({x for _, x in points}) if not two_axes else len(points)
    need = MIN_RUNGS + (1 if two_axes else 0)
    if distinct < need:
        raise InputError(f"ladder K={k} λ={lam:.3g} {setting}: {distinct} distinct rung(s); a fit needs at least "
                         f"{need}, so no prediction is made")
    X, y = np.array(rows), np.array(ys)
    cov = np.linalg.pinv(X.T @ X)
    coef = cov @ X.T @ y
    sse = float(((y - X @ coef) ** 2).sum())
    xs = [row[1] for row in rows]
    return LadderFit(k=k, lam=lam, setting=setting, coef=tuple(float(c) for c in coef), cov=cov.tolist(),
                     resid_sd=math.sqrt(sse / max(1, len(ys) - len(coef))), n=len(ys), rungs=distinct,
                     x_min=min(xs), x_max=max(xs), sizes=tuple(sizes))


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
    (K, λ), the predicted Δ at equal compute with its interval and basis, the crossover each measured size
    shows, then a recommendation."""
    x = budget / params  # token-only training spends one position per token: its tokens per parameter
    groups: dict[tuple[int, float], list[dict[str, Any]]] = {}
    for r in rungs:
        if r["setting"] == setting:
            groups.setdefault((int(r["k"]), round(float(r["lam"]), 3)), []).append(r)
    if not groups:
        return f"no {setting} (equal compute) rungs in the ladder files: nothing to predict from"
    lines = [f"Predicted Δ = patch − token-only final val loss at equal compute, at {tpp(x)} tokens/parameter "
             f"({budget:.3g} positions, {params:,} parameters):", "",
             "| K | λ | predicted Δ | 95 % interval | basis | rungs (seeds) | crossover at this size (tokens/param) |",
             "|---|---|---|---|---|---|---|"]
    best, per_size = None, []
    for (k, lam), rs in sorted(groups.items()):
        try:
            f = fit_ladder(rs)
        except InputError as e:
            lines.append(f"| {k} | {lam:.3g} | - | - | {e} | {len(rs)} | - |")
            continue
        mean, lo, hi, where = f.predict(x, params)
        cross = f.crossover_at(params)
        sizes = f" at {', '.join(f'{s:,.0f}' for s in f.sizes)} parameters" if f.sizes else ""
        lines.append(f"| {k} | {lam:.3g} | {mean:+.4f} | [{lo:+.4f}, {hi:+.4f}] | {where} (fit on "
                     f"{tpp(10 ** f.x_min)}–{tpp(10 ** f.x_max)} tokens/param{sizes}) | {f.rungs} ({f.n}) | "
                     f"{crossing(cross)} |")
        for size in f.sizes:
            per_size.append(f"- K={k}, λ={lam:.3g}, {size:,.0f} parameters: crossover {crossing(f.crossover_at(size))}"
                            f" tokens/param")
        for size, peak in not_falling(rs):
            last = max(r["tokens_per_param"] for r in rs if (size_of(r) or 0.0) == size)
            top = sum(peak["deltas"]) / len(peak["deltas"])
            per_size.append(f"- K={k}, λ={lam:.3g}, {size:,.0f} parameters: not in the fit: Δ is largest at "
                            f"{tpp(peak['tokens_per_param'])} tokens/param ({top:+.3f}) and has not fallen over "
                            f"{MIN_RUNGS} rungs up to {tpp(last)}, so its crossover, if any, lies beyond")
        if hi < 0 and (best is None or mean < best[2]):
            best = (k, lam, mean, where)
    if per_size:
        lines += ["", "Crossover per measured size (where the fit's Δ reaches 0; the range where its 95 % band "
                  "holds 0):", *per_size]
    lines.append("")
    if best:
        k, lam, mean, where = best
        caveat = ": beyond what was measured, so a trend, not a measurement" if where != "measured" else ""
        lines.append(f"Recommendation: K={k}, λ={lam:.3g} (predicted {mean:+.4f} nats, the whole interval below 0; "
                     f"{where}{caveat}).")
    else:
        lines.append("Recommendation: token-only training (λ=0): no measured (K, λ) is predicted better with 95 % "
                     "confidence at this scale.")
    return "\n".join(lines)


def crossing(hit: tuple[float, float | None, float | None] | None) -> str:
    if hit is None:
        return "none (Δ does not fall with data)"
    at, lo, hi = hit
    show = lambda v: tpp(v) if v <= 1e8 else "> 10^8"  # noqa: E731
    return f"{show(at)} [{show(lo) if lo else '-'}, {show(hi) if hi else '> 10^8'}]"


def transfer_note(tokens_per_param: float, rungs: list[dict[str, Any]], source: str = "",
                  params: float | None = None) -> str | None:
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
        if hit := f.crossover_at(params):
            crossovers.append((hit[0], f"K={f.k}, λ={f.lam:.3g}"))
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
