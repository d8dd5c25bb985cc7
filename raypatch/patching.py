"""The patch math as pure torch functions (Shao, Meng, Zhou, ICLR 2025; reference shaochenze/PatchTrain).

Patch phase: every K consecutive token embeddings are averaged into one patch embedding; the unchanged
sequence model reads T patches at positions 0..T-1, and the one output distribution at patch j is scored
against all K tokens of patch j+1. With K=1 this is exactly the ordinary shifted next-token loss.

Also the cost model: patch-level training on a fraction λ of D tokens processes λ·D/K + (1-λ)·D positions,
so its cost relative to token-level training on the same D tokens is λ/K + 1 - λ.

Nothing here imports Ray, DeepSpeed or the config tree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def _check_divisible(length: int, k: int, what: str) -> None:
    if k < 1:
        raise ValueError(f"patch size K must be >= 1, got {k}")
    if length % k:
        raise ValueError(f"{what} length {length} is not divisible by patch size K={k}")


def patch_embeddings(embeds: torch.Tensor, k: int) -> torch.Tensor:
    """Average every K consecutive token embeddings: (B, K·T, D) -> (B, T, D)."""
    b, n, d = embeds.shape
    _check_divisible(n, k, "sequence")
    if k == 1:
        return embeds
    return embeds.view(b, n // k, k, d).mean(dim=2)  # (B, T, K, D) -> (B, T, D)


def bag_weights(k: int, spec: str) -> torch.Tensor | None:
    """The weights of the K tokens of the next patch in the loss (patch.weights): None for 'uniform' (the paper's
    plain mean); 'power:α' gives w_i ∝ (i+1)^(−α), i = 0..K−1, normalised to sum to 1 (Token Superposition
    Training's weighting inside a bag: the nearer tokens count more)."""
    if spec == "uniform" or k == 1:
        return None
    w = torch.arange(1, k + 1, dtype=torch.float64) ** -float(spec.split(":", 1)[1])
    return (w / w.sum()).float()


def next_patch_loss(logits: torch.Tensor, input_ids: torch.Tensor, k: int,
                    weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over k of the mean NLL of token (j+1)·K+k under the distribution at patch j, j = 0..T-2; with
    `weights` (K of them, summing to 1; bag_weights) their weighted sum over k instead of the mean.

    Args:
        logits: (B, T, V), one distribution per patch.
        input_ids: (B, K·T) token ids of the same rows.
        k: patch size K.
        weights: None (uniform, the paper's loss) or a (K,) tensor.
    """
    b, t, v = logits.shape
    _check_divisible(input_ids.shape[1], k, "input_ids")
    if input_ids.shape != (b, t * k):
        raise ValueError(f"input_ids shape {tuple(input_ids.shape)} does not match logits {tuple(logits.shape)} "
                         f"with K={k} (expected ({b}, {t * k}))")
    if t < 2:
        raise ValueError(f"need at least 2 patches per row to have a target, got T={t}")
    # Every target term has the same count (no padding), so the mean over k of per-k means equals one
    # mean over all (B, T-1, K) terms. One gather of all K targets is ~10% faster in the patch phase
    # than the reference's K separate nll_loss calls, with identical value (benchmarks/throughput.py measures
    # the patch step with this form: 3.84x the token step's tokens/s at K=4).
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, V)
    targets = input_ids[:, k:].reshape(b, t - 1, k)  # (B, T-1, K): tokens (j+1)K .. (j+1)K+K-1
    if weights is None:
        return -logp.gather(-1, targets).mean()
    per_k = -logp.gather(-1, targets).mean(dim=(0, 1))  # (K,): the mean NLL of each position in the bag
    return (per_k * weights.to(per_k.device)).sum()


# --- cost model --------------------------------------------------------------------------------------


def relative_cost(k: int, lam: float) -> float:
    """Compute of patch-level training relative to token-level training on the same data: λ/K + 1 - λ."""
    if k < 1:
        raise ValueError(f"patch size K must be >= 1, got {k}")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"λ must be in [0, 1], got {lam}")
    return lam / k + 1.0 - lam


def flops_per_position(num_params: int, *, num_layers: int = 0, hidden_size: int = 0, seq_len: int = 0) -> float:
    """Training FLOPs per sequence position: 6·N, plus attention 6·L·T·d when the shape is given.

    Patch context is T patches, like the token phase's T tokens, so attention cost per position is the same
    in both phases and the λ/K + 1 - λ ratio still holds with the attention term.
    """
    return 6.0 * num_params + 6.0 * num_layers * seq_len * hidden_size


@dataclass(frozen=True)
class PhaseBudget:
    """Tokens each phase consumes for a compute budget, in whole optimizer steps, and what they cost."""

    k: int
    lam_requested: float
    """λ asked for; the trained share `lam` differs by rounding both phases to whole steps."""
    data_tokens: int
    """D: total tokens of the stream read by both phases."""
    patch_tokens: int
    """Tokens read in the patch phase (a multiple of tokens_per_step)."""
    token_tokens: int
    """Tokens read in the token phase (a multiple of tokens_per_step)."""

    @property
    def lam(self) -> float:
        """The patch share actually trained: patch_tokens / D."""
        return self.patch_tokens / self.data_tokens if self.data_tokens else 0.0

    @property
    def positions(self) -> float:
        """Model positions processed: patch_tokens/K + token_tokens."""
        return self.patch_tokens / self.k + self.token_tokens

    @property
    def relative_cost(self) -> float:
        return relative_cost(self.k, self.lam)

    def epochs(self, corpus_tokens: int) -> int:
        """Passes over a corpus of corpus_tokens that D needs."""
        return max(1, -(-self.data_tokens // corpus_tokens))


def budget_split(budget: float, k: int, lam: float, *, tokens_per_step: int = 1, flops_per_pos: float | None = None,
                 patch_only: bool = False) -> PhaseBudget:
    """The one budget rule: from a compute budget to whole optimizer steps of each phase.

    D = C / (λ/K + 1 − λ); the patch phase takes round(λ·D) tokens in whole steps, the token phase whole steps of
    what compute is left, so the run spends C minus less than one token-phase step. `raypatch plan` prints it and
    `raypatch tune` trains it (data.max_tokens = D, data.patch_tokens = the patch phase's tokens).

    Args:
        budget: positions (tokens in the token phase plus patches in the patch phase), or FLOPs when
            flops_per_pos is given.
        k, lam: patch size and requested patch fraction (K=1 is token-only whatever λ says).
        tokens_per_step: the optimizer step both phases are rounded to.
    """
    positions = budget / flops_per_pos if flops_per_pos else budget
    tps = tokens_per_step
    if not positions >= tps:
        raise ValueError(f"compute budget {budget:g} affords {positions:,.0f} positions, less than one optimizer step "
                         f"of {tps:,} tokens (optim.tokens_per_step)")
    lam_eff = lam if k > 1 else 0.0
    d = positions / relative_cost(k, lam_eff)
    n_patch = round(lam_eff * d / tps)
    n_token = 0 if patch_only else math.floor((positions - n_patch * tps / k) / tps + 1e-9)
    if lam_eff > 0 and (n_patch == 0 or (n_token == 0 and not patch_only)):
        raise ValueError(f"compute budget {budget:g} is too small for K={k}, λ={lam:.3g}: it affords {n_patch} patch "
                         f"and {n_token} token steps of {tps:,} tokens; both phases need at least one")
    return PhaseBudget(k=k, lam_requested=lam, data_tokens=(n_patch + n_token) * tps, patch_tokens=n_patch * tps,
                       token_tokens=n_token * tps)


def schedule_ends(schedule: list[tuple[int, float]], d: int) -> list[int]:
    """Where each phase of a schedule ends in the first D tokens: c_i·D rounded to a token, for the running sum
    c_i of the shares, the last phase at D. Rounding (not flooring) keeps float noise in the shares that
    schedule_split made exact from moving a boundary off its step."""
    ends, cum = [], 0.0
    for _, share in schedule[:-1]:
        cum += share
        ends.append(round(cum * d))
    return [*ends, d]


def schedule_split(budget: float, schedule: list[tuple[int, float]], *, tokens_per_step: int,
                   flops_per_pos: float | None = None) -> tuple[str, int, list[int]]:
    """budget_split for a phase schedule: whole optimizer steps per phase that spend the budget.

    D = C / Σ share/K; every phase but the last (K=1) takes round(share·D) tokens in whole steps, the token phase
    whole steps of what compute is left (less than one of its steps unspent). Returns the schedule with the
    shares those steps make (exact: plan_schedule splits D at step boundaries), D, and each phase's tokens."""
    positions = budget / flops_per_pos if flops_per_pos else budget
    tps = tokens_per_step
    d = positions / sum(share / k for k, share in schedule)
    steps = [round(share * d / tps) for _, share in schedule[:-1]]
    steps.append(math.floor((positions - sum(n * tps / k for n, (k, _) in zip(steps, schedule))) / tps + 1e-9))
    if min(steps) < 1:
        raise ValueError(f"compute budget {budget:g} is too small for the schedule "
                         f"{','.join(f'{k}:{x:g}' for k, x in schedule)}: it affords {steps} steps of {tps:,} "
                         f"tokens per phase; every phase needs at least one")
    total = sum(steps)
    exact = ",".join(f"{k}:{n / total!r}" for (k, _), n in zip(schedule, steps))
    tokens = [n * tps for n in steps]
    parsed = [(int(k), float(x)) for k, x in (item.split(":") for item in exact.split(","))]
    if schedule_ends(parsed, total * tps) != [sum(tokens[: i + 1]) for i in range(len(tokens))]:
        raise ValueError(f"schedule {exact}: its phase boundaries do not fall on whole steps")  # a bug, not input
    return exact, total * tps, tokens
