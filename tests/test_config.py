"""Config tree: presets, dict round trip, dotted overrides, one-line errors. Run: pytest tests/test_config.py"""

import pytest

from raypatch import presets
from raypatch.config import Config, apply_overrides
from raypatch.presets import load_config


@pytest.mark.parametrize("name", list(presets.PRESETS))
def test_every_preset_validates_and_round_trips(name):
    cfg = presets.get(name)
    assert Config.from_dict(cfg.to_dict()) == cfg


def test_paper_370m_recipe():
    c = presets.get("paper-370m")
    assert (c.model.hidden_size, c.model.intermediate_size, c.model.num_layers, c.model.num_heads) == (
        1024, 2752, 24, 16)
    assert c.model.vocab_size == 32000 and c.patch.k == 4 and c.patch.lam == pytest.approx(2 / 3)
    assert c.data.seq_len == 2048 and c.optim.tokens_per_step == 2**21
    assert (c.optim.lr, c.optim.beta1, c.optim.beta2, c.optim.weight_decay) == (3e-4, 0.9, 0.95, 0.1)
    assert c.optim.warmup_steps == 2000 and c.optim.grad_clip == 1.0


def test_overrides_are_typed():
    c = apply_overrides(presets.tiny(), ["optim.lr=1e-3", "patch.lam=2/3", "patch.k=4",
                                         "phases.keep_optimizer=true", "data.seq_len=16"])
    assert c.optim.lr == 1e-3 and c.patch.lam == pytest.approx(2 / 3) and c.patch.k == 4
    assert c.phases.keep_optimizer is True and c.data.seq_len == 16


@pytest.mark.parametrize("override,field", [
    ("optim.lrr=1", "optim.lrr"),
    ("nope.x=1", "nope.x"),
    ("optim=1", "optim"),
    ("patch.k=two", "patch.k"),
    ("patch.lam=1.0", "patch.lam"),
    ("patch.lam=-0.1", "patch.lam"),
    ("scale.zero_stage=4", "scale.zero_stage"),
    ("optim.tokens_per_step=100", "optim.tokens_per_step"),
    ("model.family=bert", "model.family"),
])
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ValueError, match=f"'{field}'") as e:
        apply_overrides(presets.tiny(), [override])
    assert "\n" not in str(e.value)


def test_k_must_divide_block_in_token_context():
    with pytest.raises(ValueError, match="'patch.k'.*does not divide"):
        apply_overrides(presets.tiny(), ["patch.context=tokens", "patch.k=3"])


def test_yaml_with_base_preset(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("preset: tiny\noptim:\n  lr: 1e-3\npatch:\n  k: 4\n")
    c = load_config(str(p), ["seed=7", "optim.tokens_per_step=512"])
    assert c.optim.lr == 1e-3 and c.patch.k == 4 and c.seed == 7 and c.model.hidden_size == 64
    p.write_text("preset: tiny\noptim:\n  learning_rate: 1e-3\n")
    with pytest.raises(ValueError, match="'optim.learning_rate': unknown key"):
        load_config(str(p))


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        load_config("huge")


def test_relative_paths_are_resolved_for_workers(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    c = load_config("tiny", ["data.shards=shards", "checkpoint.storage_path=runs", "eval.wikitext=w.jsonl"])
    assert c.data.shards == str(tmp_path / "shards") and c.checkpoint.storage_path == str(tmp_path / "runs")
    assert c.eval.wikitext == str(tmp_path / "w.jsonl")
    assert load_config("tiny", ["checkpoint.storage_path=s3://bucket/x"]).checkpoint.storage_path == "s3://bucket/x"
