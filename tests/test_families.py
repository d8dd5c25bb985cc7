"""Bring your own model (issue 13): any HF causal LM from a local config or checkpoint, patch mode exact per family,
continued pretraining, and the one-line refusals. Tiny configs are written here; nothing comes from a hub.
Run: pytest tests/test_families.py. The Ray Train runs of the five families beyond two are a drill, out of CI for
time (pytest -m drill tests/test_families.py; last run: 5 passed, 18.7-20.9 s each); every family's patch and token
forward stays exact in the default tier."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from raypatch.presets import load_config
from tests.test_safety import assert_kept, refused, snapshot

SMALL = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64, pad_token_id=None, bos_token_id=None, eos_token_id=None)
# Each family's tiny config, with what makes it differ: GQA, sliding windows, Gemma's √d embedding scale and
# soft-capping, tied embeddings, Phi-3's fused projections, OLMo-2's norms, GPT-NeoX's partial rotary.
FAMILIES = {
    "llama": dict(num_key_value_heads=2),
    "mistral": dict(num_key_value_heads=2, sliding_window=8),
    "qwen2": dict(num_key_value_heads=2, tie_word_embeddings=True),
    "phi3": dict(num_key_value_heads=4),
    "gemma2": dict(num_key_value_heads=2, head_dim=16, sliding_window=8, tie_word_embeddings=True),
    "olmo2": dict(num_key_value_heads=4),
    "gpt_neox": dict(),
}


def write_config(d: Path, family: str, **over) -> Path:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    CONFIG_MAPPING[family](**{**SMALL, **FAMILIES.get(family, {}), **over}).save_pretrained(d)
    return d


def save_model(d: Path, family: str, seed: int = 0, tokenizer: str | None = None) -> Path:
    """A tiny randomly initialised model saved as safetensors (a stand-in for a user's checkpoint)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    write_config(d, family)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(d)).save_pretrained(d, safe_serialization=True)
    if tokenizer:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(tokenizer).save_pretrained(d)
    return d


@pytest.mark.parametrize("family", list(FAMILIES))
def test_patch_mode_is_exact_per_family(family, tmp_path):
    """The averaged embeddings go through the family's own input path: K copies of a token average to that
    token, so patch mode on repeated tokens equals the family's own forward; the next-patch loss equals an explicit
    reference built with the family's embedding layer; K=1 equals the family's own `labels` loss."""
    from raypatch.model import build_model, lm_loss, patch_logits

    cfg = load_config("tiny", [f"model.hf_config={write_config(tmp_path, family)}"])
    assert cfg.model.family == family and cfg.model.hidden_size == 64 and cfg.model.vocab_size == 512
    model = build_model(cfg.model, seed=0).eval()
    assert type(model).__name__.lower().startswith(family.replace("_", "")[:5])
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 512, (2, 12), generator=g)  # (B, T)
    k = 4
    with torch.no_grad():
        own = model(input_ids=ids).logits  # (B, T, V): embedding scale, positions, windows as the family does them
        torch.testing.assert_close(patch_logits(model, ids.repeat_interleave(k, dim=1), k), own, atol=2e-5, rtol=1e-4)

        x = torch.randint(0, 512, (2, 12 * k), generator=g)  # (B, K·T)
        emb = model.get_input_embeddings()(x).view(2, 12, k, -1).mean(2)  # (B, T, D)
        logits = model(inputs_embeds=emb, position_ids=torch.arange(12).expand(2, 12)).logits  # (B, T, V)
        logp = torch.log_softmax(logits[:, :-1].float(), -1)  # patch j predicts the K tokens of patch j+1
        target = x.view(2, 12, k)[:, 1:]  # (B, T-1, K)
        reference = -logp.gather(-1, target).mean()
        torch.testing.assert_close(lm_loss(model, x, k), reference, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lm_loss(model, ids, 1), model(input_ids=ids, labels=ids).loss, atol=1e-5,
                                   rtol=1e-5)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_init_from_loads_each_family_exactly(family, tmp_path):
    """model.init_from passes the weight check and builds the checkpoint's own model, weight for weight."""
    from transformers import AutoModelForCausalLM

    from raypatch.model import build_model

    src = save_model(tmp_path, family, seed=5)
    cfg = load_config("tiny", [f"model.init_from={src}"])
    ours, theirs = build_model(cfg.model, seed=0), AutoModelForCausalLM.from_pretrained(src)
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _fit_and_export(family: str, shards: str, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from raypatch.driver import fit

    cfg = load_config("tiny", [f"model.hf_config={write_config(tmp_path / 'cfg', family)}", f"data.shards={shards}",
                               f"checkpoint.storage_path={tmp_path / 'runs'}", f"checkpoint.name={family}",
                               "checkpoint.every_steps=0", "data.max_tokens=4096"])
    s = fit(cfg)
    losses = [r["train/loss"] for r in map(json.loads, (Path(s["run_dir"]) / "metrics.jsonl").open())
              if "train/loss" in r]
    assert len(losses) >= 2 and all(torch.isfinite(torch.tensor(losses)))
    hf = AutoModelForCausalLM.from_pretrained(s["export"])
    assert hf.config.model_type == family and hf.config.hidden_size == 64
    with torch.no_grad():
        out = hf(input_ids=torch.arange(16).unsqueeze(0)).logits
    assert out.shape == (1, 16, 512) and torch.isfinite(out).all()


@pytest.mark.parametrize("family", ["gemma2", "mistral"])
def test_family_trains_through_ray_and_deepspeed(family, shards, tmp_path):
    _fit_and_export(family, shards, tmp_path)


@pytest.mark.slow
@pytest.mark.drill
@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3", "olmo2", "gpt_neox"])
def test_family_trains_through_ray_and_deepspeed_slow(family, shards, tmp_path):
    _fit_and_export(family, shards, tmp_path)


def test_continued_pretraining_starts_exactly_from_the_checkpoint(shards, tokenizer_dir, tmp_path):
    """init_from: the evaluation before any step equals plain transformers' loss of the checkpoint on the same
    rows; both phases train; the export loads with the original architecture and tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raypatch.data import TokenStream, val_rows
    from raypatch.driver import fit

    src = save_model(tmp_path / "mistral", "mistral", seed=3, tokenizer=tokenizer_dir)
    cfg = load_config("tiny", [f"model.init_from={src}", f"data.shards={shards}", "checkpoint.every_steps=0",
                               f"checkpoint.storage_path={tmp_path / 'runs'}", "data.max_tokens=4096"])
    assert cfg.model.family == "mistral" and cfg.model.num_kv_heads == 2
    s = fit(cfg)
    evals = [r for r in map(json.loads, (Path(s["run_dir"]) / "metrics.jsonl").open()) if r.get("event") == "eval"]
    assert evals[0]["eval/step"] == 0 and evals[-1]["eval/step"] == s["state"]["global_step"] > 0

    rows = val_rows(TokenStream(shards, "val"), cfg.data.seq_len, cfg.eval.max_rows)
    rows = rows[: len(rows) - len(rows) % cfg.scale.num_workers]
    plain = AutoModelForCausalLM.from_pretrained(src).eval()
    with torch.no_grad():
        before = sum(float(plain(input_ids=torch.as_tensor(r[None]).long(), labels=torch.as_tensor(r[None]).long())
                           .loss) for r in rows) / len(rows)
    assert evals[0]["val/loss"] == pytest.approx(before, abs=1e-4)
    assert evals[-1]["val/loss"] < before  # it trained
    out = AutoModelForCausalLM.from_pretrained(s["export"])
    assert type(out) is type(plain) and out.config.sliding_window == plain.config.sliding_window
    assert AutoTokenizer.from_pretrained(s["export"])("a b")["input_ids"] == \
        AutoTokenizer.from_pretrained(src)("a b")["input_ids"]
    assert not torch.equal(out.model.embed_tokens.weight, plain.model.embed_tokens.weight)


def test_bad_model_directories_are_refused_before_anything_starts(tmp_path, tokenizer_dir, capsys):
    """Each bad directory: one line naming what is wrong, exit 2, no Ray, nothing written."""
    storage = tmp_path / "runs"
    storage.mkdir()
    shards_dir = tmp_path / "shards"  # never reached: every refusal comes first
    shards_dir.mkdir()

    def train(*sets: str) -> list[str]:
        return ["train", "--config", "tiny", "--set", f"data.shards={shards_dir}",
                f"checkpoint.storage_path={storage}", *sets]

    empty = tmp_path / "empty"
    empty.mkdir()
    good = save_model(tmp_path / "good", "llama")
    mismatched = save_model(tmp_path / "mismatched", "llama")
    write_config(mismatched, "llama", intermediate_size=96)  # config.json no longer matches the weights
    pickled = tmp_path / "pickled"
    shutil.copytree(good, pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    big_tok = save_model(tmp_path / "bigtok", "llama", tokenizer=tokenizer_dir)  # 512 tokens
    write_config(big_tok, "llama", vocab_size=256)
    (big_tok / "model.safetensors").unlink()
    t5 = tmp_path / "t5"
    from transformers import CpmAntConfig, T5Config

    T5Config(vocab_size=512, d_model=64).save_pretrained(t5)
    cpmant = tmp_path / "cpmant"
    CpmAntConfig(vocab_size=512, hidden_size=64).save_pretrained(cpmant)
    before = snapshot(tmp_path)
    cases = [
        (["model.hf_config=" + str(empty)], "has no config.json"),
        (["model.init_from=" + str(mismatched)], "weights do not match config.json"),
        (["model.init_from=" + str(pickled)], "holds only pickled weights"),
        (["model.hf_config=" + str(big_tok)], "more than the model's embedding table"),
        (["model.hf_config=" + str(t5)], "not a decoder-only causal LM"),
        (["model.hf_config=" + str(cpmant)], "takes no inputs_embeds"),
        (["model.init_from=" + str(good), "model.hidden_size=128"], "128 conflicts with hidden_size=64"),
        (["model.init_from=" + str(good), "model.hf_config=" + str(good)], "not both"),
    ]
    import ray

    had_ray = ray.is_initialized()  # the session's cluster, when Ray tests ran before this one
    for sets, pattern in cases:
        line = refused(capsys, train(*sets), pattern)
        assert "model." in line, line  # names the field
    assert ray.is_initialized() == had_ray  # refused before any cluster was started
    assert_kept(before)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["runs", "shards", "empty", "good", "mismatched", "pickled", "bigtok", "t5", "cpmant"])
    assert not any(storage.iterdir())


def test_shards_of_another_tokenizer_are_refused_with_the_fix(shards, tokenizer_dir, tmp_path, capsys):
    from tests.helpers import styled_tokenizer

    other = styled_tokenizer(tokenizer_dir, tmp_path / "tok", "bos")  # same vocabulary, other separator
    src = save_model(tmp_path / "m", "llama", tokenizer=other)
    write_config(src, "llama", vocab_size=514)
    (src / "model.safetensors").unlink()
    line = refused(capsys, ["train", "--config", "tiny", "--set", f"data.shards={shards}",
                            f"checkpoint.storage_path={tmp_path / 'runs'}", f"model.hf_config={src}"],
                   "prepared with another tokenizer")
    assert f"raypatch prepare --tokenizer {src}" in line and "model.tokenizer_from_model=false" in line
