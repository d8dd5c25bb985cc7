"""Hugging Face causal LMs built from scratch, and their patch-mode and token-mode losses.

The weights stay an unchanged HF model: patch mode only changes what is fed in (averaged K-token embeddings
through `inputs_embeds`, position ids 0..T-1) and how the output is scored, so a patch-trained model is an
ordinary HF model that `save_pretrained`, `from_pretrained` and `generate` handle as usual.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from raypatch.config import ModelConfig
from raypatch.patching import bag_weights, next_patch_loss, patch_embeddings


def hf_config(cfg: ModelConfig) -> PretrainedConfig:
    """The transformers config for `cfg` (no download: classes are built from local code): the model directory's
    for hf_config/init_from (hfdir.resolve has made the shape fields agree with it), else built from the fields."""
    if cfg.source is not None:
        from raypatch.hfdir import load_hf_config

        return load_hf_config(*cfg.source)
    kv = cfg.num_kv_heads or cfg.num_heads
    if cfg.family in ("llama", "qwen2"):
        if cfg.family == "llama":
            from transformers import LlamaConfig as C
        else:
            from transformers import Qwen2Config as C
        return C(
            vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=kv,
            max_position_embeddings=cfg.max_position_embeddings, rope_theta=cfg.rope_theta,
            initializer_range=cfg.init_std, tie_word_embeddings=cfg.tie_embeddings, rms_norm_eps=1e-6,
            use_cache=True, bos_token_id=None, eos_token_id=None, pad_token_id=None,
        )
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings, rotary_emb_base=cfg.rope_theta,
        initializer_range=cfg.init_std, tie_word_embeddings=cfg.tie_embeddings, use_cache=True,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )


def build_model(cfg: ModelConfig, *, seed: int | None = None, pretrained: bool = True) -> PreTrainedModel:
    """The causal LM `cfg` describes in fp32 (DeepSpeed casts for bf16): freshly initialised, or init_from's
    weights when `pretrained` (export and parameter counts only need the architecture)."""
    if seed is not None:
        torch.manual_seed(seed)
    if cfg.init_from and pretrained:
        from raypatch.hfdir import load_pretrained

        model = load_pretrained(cfg)
    else:
        model = AutoModelForCausalLM.from_config(hf_config(cfg), dtype=torch.float32, trust_remote_code=False)
    model.config.use_cache = False  # training never needs the KV cache; export turns it back on
    return model


def num_params(model: torch.nn.Module, *, exclude_embeddings: bool = False) -> int:
    """Parameters of `model`; with exclude_embeddings, without the input embeddings and an untied output
    embedding (the usual "non-embedding" count)."""
    n = sum(p.numel() for p in model.parameters())
    if exclude_embeddings:
        emb = model.get_input_embeddings().weight
        out = model.get_output_embeddings()
        n -= emb.numel() + (out.weight.numel() if out is not None and out.weight is not emb else 0)
    return n


def count_params(cfg: ModelConfig, *, exclude_embeddings: bool = False) -> int:
    """num_params of the model `cfg` describes, built on the meta device (no weights allocated)."""
    with torch.device("meta"):
        return num_params(build_model(cfg, pretrained=False), exclude_embeddings=exclude_embeddings)


def lm_loss(model: PreTrainedModel, input_ids: torch.Tensor, k: int, weights: str = "uniform") -> torch.Tensor:
    """Training loss of one batch of rows: next-patch loss for K>1, ordinary next-token loss for K=1.

    input_ids: (B, K·T) in the patch phase, (B, T) in the token phase. weights: patch.weights.
    """
    return next_patch_loss(patch_logits(model, input_ids, k), input_ids, k, bag_weights(k, weights))


def patch_logits(model: PreTrainedModel, input_ids: torch.Tensor, k: int) -> torch.Tensor:
    """One output distribution per patch: (B, K·T) ids -> (B, T, V) logits; K=1 is the ordinary forward."""
    if k == 1:
        return model(input_ids=input_ids).logits  # (B, T, V)
    embeds = model.get_input_embeddings()(input_ids)  # (B, K·T, D)
    patches = patch_embeddings(embeds, k)  # (B, T, D)
    b, t, _ = patches.shape
    if not takes_position_ids(type(model)):  # ALiBi (Bloom), state-space models: positions are the index
        return model(inputs_embeds=patches).logits  # (B, T, V)
    # Patch j sits at position j (not jK): both phases use positions 0..T-1, as in the paper's reference code.
    position_ids = torch.arange(t, device=input_ids.device).unsqueeze(0).expand(b, t)  # (B, T)
    return model(inputs_embeds=patches, position_ids=position_ids).logits  # (B, T, V)


@functools.cache
def takes_position_ids(cls: type) -> bool:
    return "position_ids" in inspect.signature(cls.forward).parameters


def check_token_ids(input_ids: Any, vocab_size: int, where: str | Callable[[], str]) -> None:
    """Raise a one-line ValueError when a token id falls outside the embedding table (tensor or ndarray).

    Call it on the host copy of a batch: on a GPU tensor the max() would force a device sync every step.
    """
    hi, lo = int(input_ids.max()), int(input_ids.min())
    if hi >= vocab_size or lo < 0:
        where = where() if callable(where) else where  # built only on error: this runs every micro-batch
        raise ValueError(f"{where}: token id {hi if hi >= vocab_size else lo} is outside the model's "
                         f"vocabulary [0, {vocab_size}) (model.vocab_size)")


class PatchLM(torch.nn.Module):
    """Wraps the HF model so that DeepSpeed's forward computes the phase's loss; weights stay under `hf.`."""

    def __init__(self, hf: torch.nn.Module, weights: str = "uniform") -> None:
        super().__init__()
        self.hf = hf
        self.weights = weights  # patch.weights: how the K tokens of the next patch count in the loss

    def forward(self, input_ids: torch.Tensor, k: int) -> torch.Tensor:
        return lm_loss(self.hf, input_ids, k, self.weights)


def loss_sum(forward: Callable[[torch.Tensor], torch.Tensor], rows: Any, micro_batch: int,
             device: Any = "cpu") -> tuple[float, int]:
    """Sum of per-row mean losses and the row count over `rows` ((N, T) token ids), `micro_batch` rows per
    forward; `forward(ids)` returns a batch's mean loss. The trainer's evaluation and `raypatch evaluate` both
    score through this."""
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(rows), micro_batch):
            ids = torch.as_tensor(rows[i:i + micro_batch]).long().to(device)
            total += float(forward(ids).double()) * len(ids)
            count += len(ids)
    return total, count
