"""HF models built from scratch in patch and token mode (no Ray). Run: pytest tests/test_model.py"""

import pytest
import torch
import torch.nn.functional as F

from raypatch import presets
from raypatch.model import build_model, check_token_ids, lm_loss, patch_logits


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt_neox"])
def test_families_train_in_both_modes(family):
    cfg = presets.tiny().model
    cfg.family = family
    model = build_model(cfg, seed=0)
    ids = torch.randint(0, cfg.vocab_size, (2, 64))
    for k, x in ((2, ids), (1, ids[:, :32])):
        model.zero_grad()
        loss = lm_loss(model, x, k)
        assert torch.isfinite(loss)
        loss.backward()
        assert model.get_input_embeddings().weight.grad.abs().sum() > 0


def test_token_mode_is_the_hf_loss():
    model = build_model(presets.tiny().model, seed=0)
    ids = torch.randint(0, 512, (2, 32))
    ref = model(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(lm_loss(model, ids, 1), ref, atol=1e-5, rtol=0)


def test_patch_mode_positions_and_causality():
    model = build_model(presets.tiny().model, seed=0).eval()
    k, t = 4, 8
    ids = torch.randint(0, 512, (1, k * t))
    with torch.no_grad():
        logits = patch_logits(model, ids, k)  # (1, T, V)
        # Same as feeding the averaged embeddings with explicit positions 0..T-1.
        emb = model.get_input_embeddings()(ids).view(1, t, k, -1).mean(2)
        ref = model(inputs_embeds=emb, position_ids=torch.arange(t)[None]).logits
        torch.testing.assert_close(logits, ref)
        # Causal over patches: changing patch 5 leaves the outputs at patches 0..4 unchanged.
        ids2 = ids.clone()
        ids2[0, 5 * k:6 * k] = (ids2[0, 5 * k:6 * k] + 1) % 512
        logits2 = patch_logits(model, ids2, k)
    torch.testing.assert_close(logits2[:, :5], logits[:, :5])
    assert not torch.allclose(logits2[:, 5], logits[:, 5])
    loss = lm_loss(model, ids, k)
    expect = sum(F.cross_entropy(logits[0, :-1], ids[0, k:].view(t - 1, k)[:, i]) for i in range(k)) / k
    torch.testing.assert_close(loss, expect, atol=1e-5, rtol=0)


def test_patch_model_is_a_plain_hf_model(tmp_path):
    from transformers import AutoModelForCausalLM

    model = build_model(presets.tiny().model, seed=0)
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = torch.randint(0, 512, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits)


def test_token_id_beyond_vocab_is_named():
    with pytest.raises(ValueError, match=r"token id 600 is outside the model's vocabulary \[0, 512\)"):
        check_token_ids(torch.tensor([[1, 600]]), 512, "shard-00000.parquet")
