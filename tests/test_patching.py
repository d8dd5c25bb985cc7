"""Exactness of the patch math (no Ray). Run: pytest tests/test_patching.py"""

import math

import pytest
import torch
import torch.nn.functional as F

from raypatch.patching import bag_weights, budget_split, next_patch_loss, patch_embeddings, relative_cost


def hand_loss(logits: torch.Tensor, ids: torch.Tensor, k: int) -> torch.Tensor:
    """The definition, one index at a time: mean over k of mean_{b,j} -log p_j(token (j+1)K+k)."""
    b, t, _ = logits.shape
    logp = torch.log_softmax(logits.double(), -1)
    per_k = []
    for kk in range(k):
        terms = [-logp[bb, j, ids[bb, (j + 1) * k + kk]] for bb in range(b) for j in range(t - 1)]
        per_k.append(torch.stack(terms).mean())
    return torch.stack(per_k).mean()


def test_k1_equals_shifted_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(3, 17, 50)
    ids = torch.randint(0, 50, (3, 17))
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 50), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(next_patch_loss(logits, ids, 1), ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("k", [2, 4])
def test_matches_hand_indexed_reference(k):
    torch.manual_seed(k)
    t, v = 6, 23
    logits = torch.randn(2, t, v)
    ids = torch.randint(0, v, (2, t * k))
    torch.testing.assert_close(next_patch_loss(logits, ids, k).double(), hand_loss(logits, ids, k),
                               atol=1e-5, rtol=0)


def test_reference_form_k_separate_nll_losses():
    # The reference code's form: (1/K) Σ_k nll_loss(logp, labels[:, K:].reshape(-1, K)[:, k]).
    torch.manual_seed(1)
    k, t, v = 4, 5, 31
    logits = torch.randn(2, t, v)
    ids = torch.randint(0, v, (2, k * t))
    logp = torch.log_softmax(logits[:, :-1].reshape(-1, v), -1)
    labels = ids[:, k:].reshape(-1, k)
    ref = sum(F.nll_loss(logp, labels[:, i]) for i in range(k)) / k
    torch.testing.assert_close(next_patch_loss(logits, ids, k), ref, atol=1e-6, rtol=0)


def hand_weighted(logits: torch.Tensor, ids: torch.Tensor, k: int, alpha: float) -> torch.Tensor:
    """Σ_k w_k · mean_{b,j} −log p_j(token (j+1)K+k), w_k = (k+1)^−α / Σ_i (i+1)^−α, one index at a time."""
    b, t, _ = logits.shape
    logp = torch.log_softmax(logits.double(), -1)
    z = sum((i + 1) ** -alpha for i in range(k))
    total = 0.0
    for kk in range(k):
        terms = [-logp[bb, j, ids[bb, (j + 1) * k + kk]] for bb in range(b) for j in range(t - 1)]
        total = total + (kk + 1) ** -alpha / z * torch.stack(terms).mean()
    return total


@pytest.mark.parametrize("k,alpha", [(2, 1.0), (4, 0.5), (4, 2.0), (16, 1.0)])
def test_power_weighted_bag_matches_the_definition(k, alpha):
    torch.manual_seed(k)
    t, v = 5, 19
    logits = torch.randn(2, t, v)
    ids = torch.randint(0, v, (2, t * k))
    w = bag_weights(k, f"power:{alpha}")
    assert float(w.sum()) == pytest.approx(1.0) and bool((w[:-1] > w[1:]).all())  # nearer tokens count more
    torch.testing.assert_close(next_patch_loss(logits, ids, k, w).double(), hand_weighted(logits, ids, k, alpha),
                               atol=1e-5, rtol=0)


def test_uniform_is_the_papers_loss_bit_for_bit_and_k1_ignores_weights():
    torch.manual_seed(3)
    logits = torch.randn(2, 6, 29)
    ids = torch.randint(0, 29, (2, 24))
    assert bag_weights(4, "uniform") is None and bag_weights(4, "power:0") is not None
    assert torch.equal(next_patch_loss(logits, ids, 4, bag_weights(4, "uniform")), next_patch_loss(logits, ids, 4))
    torch.testing.assert_close(next_patch_loss(logits, ids, 4, bag_weights(4, "power:0")),
                               next_patch_loss(logits, ids, 4), atol=1e-6, rtol=0)  # α=0: uniform again
    flat = torch.randint(0, 29, (2, 6))
    assert bag_weights(1, "power:2") is None  # K=1 is the next-token loss for any weighting
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 29), flat[:, 1:].reshape(-1))
    torch.testing.assert_close(next_patch_loss(logits, flat, 1, bag_weights(1, "power:2")), ref, atol=1e-6, rtol=0)


def test_patch_weights_config_is_checked():
    from raypatch.config import PatchConfig

    assert PatchConfig(weights="power:1.5").weights == "power:1.5"
    for bad in ("power", "power:x", "power:-1", "linear:1", "power:inf"):
        with pytest.raises(ValueError, match="patch.weights"):
            PatchConfig(weights=bad)


def test_patch_embeddings_is_mean_of_k_consecutive():
    x = torch.arange(2 * 8 * 3, dtype=torch.float32).view(2, 8, 3)
    p = patch_embeddings(x, 4)
    assert p.shape == (2, 2, 3)
    torch.testing.assert_close(p[1, 1], x[1, 4:8].mean(0))
    assert patch_embeddings(x, 1) is x


def test_permuting_tokens_inside_patches_changes_nothing():
    torch.manual_seed(2)
    k, t, v, d = 4, 6, 40, 8
    ids = torch.randint(0, v, (2, k * t))
    perm = torch.stack([torch.randperm(k) for _ in range(t)])  # (T, K): one permutation per patch
    idx = (torch.arange(t).unsqueeze(1) * k + perm).reshape(-1)
    ids_perm = ids[:, idx]
    assert not torch.equal(ids, ids_perm)
    table = torch.randn(v, d)
    torch.testing.assert_close(patch_embeddings(table[ids], k), patch_embeddings(table[ids_perm], k))
    logits = torch.randn(2, t, v)
    torch.testing.assert_close(next_patch_loss(logits, ids, k), next_patch_loss(logits, ids_perm, k))


def test_gradients_reach_the_embedding_table():
    torch.manual_seed(3)
    k, t, v, d = 2, 5, 30, 8
    emb = torch.nn.Embedding(v, d)
    head = torch.nn.Linear(d, v)
    ids = torch.randint(0, v, (2, k * t))
    loss = next_patch_loss(head(patch_embeddings(emb(ids), k)), ids, k)
    loss.backward()
    used = ids[:, : k * (t - 1)].unique()  # the last patch's embedding feeds a discarded prediction
    assert emb.weight.grad[used].abs().sum(-1).gt(0).all()


@pytest.mark.parametrize("n,k", [(10, 4), (7, 2)])
def test_length_not_divisible_by_k_raises(n, k):
    with pytest.raises(ValueError, match="not divisible by patch size K"):
        patch_embeddings(torch.zeros(1, n, 3), k)
    with pytest.raises(ValueError, match="not divisible by patch size K"):
        next_patch_loss(torch.zeros(1, n // k, 5), torch.zeros(1, n, dtype=torch.long), k)


def test_relative_cost_and_budget():
    assert relative_cost(4, 2 / 3) == pytest.approx(0.5)
    assert relative_cost(4, 0.5) == pytest.approx(0.625)
    assert relative_cost(4, 0.8) == pytest.approx(0.4)
    assert relative_cost(1, 0.7) == pytest.approx(1.0)
    b = budget_split(1_000_000, 4, 2 / 3)
    assert b.data_tokens == 1_999_999 and b.patch_tokens + b.token_tokens == b.data_tokens
    assert 1_000_000 - 1 < b.positions <= 1_000_000
    s = budget_split(1_000_000, 4, 2 / 3, tokens_per_step=4096)  # whole steps in both phases
    assert s.patch_tokens % 4096 == 0 and s.token_tokens % 4096 == 0 and 1_000_000 - 4096 < s.positions <= 1e6
    # FLOPs budgets: 6·N per position.
    f = budget_split(6 * 1000 * 1_000_000, 4, 0.5, flops_per_pos=6 * 1000)
    assert f.data_tokens == 1_600_000 and f.patch_tokens == 800_000
    assert math.isclose(f.relative_cost, 0.625)
    with pytest.raises(ValueError):
        budget_split(0, 4, 0.5)


def test_the_training_module_applies_patch_weights():
    from raypatch import presets
    from raypatch.model import PatchLM, build_model, patch_logits

    torch.manual_seed(0)
    hf = build_model(presets.tiny().model, seed=0)
    ids = torch.randint(0, 512, (2, 32))
    uniform, power = PatchLM(hf)(ids, 4), PatchLM(hf, weights="power:2")(ids, 4)
    torch.testing.assert_close(power, next_patch_loss(patch_logits(hf, ids, 4), ids, 4, bag_weights(4, "power:2")))
    assert not torch.equal(uniform, power)
    assert torch.equal(PatchLM(hf, weights="power:2")(ids, 1), PatchLM(hf)(ids, 1))  # token phase: unchanged
