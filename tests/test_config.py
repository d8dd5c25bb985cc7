"""Config tree: presets, dict round trip, dotted overrides, one-line errors. Run: pytest tests/test_config.py"""

import dataclasses
import math
import re
import typing

import pytest

from raypatch import presets
from raypatch.config import (
    RANGES,
    CheckpointConfig,
    Config,
    DataConfig,
    ModelConfig,
    OptimConfig,
    ScaleConfig,
    apply_overrides,
    range_bounds,
    replace,
)
from raypatch.presets import load_config
from raypatch.safety import InputError, check_name


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


# --- every number in range, names, config files ------------------------------------------------------


def numeric_fields(cls: type = Config, prefix: str = "") -> list[tuple[str, type]]:
    """(dotted name, int or float) of every numeric field of the tree, read from the dataclasses themselves."""
    out = []
    for name, t in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(t):
            out += numeric_fields(t, f"{prefix}{name}.")
        elif t in (int, float):
            out.append((f"{prefix}{name}", t))
    return out


def out_of_range(spec: str, t: type) -> list[int | float]:
    """Values just outside a RANGES entry (and, for ints, one past 64 bits)."""
    lo, hi, lo_in, hi_in = range_bounds(spec)
    values = [lo - 1 if lo_in else lo]
    if lo_in and lo > 0 and t is float:  # below the lower bound, still positive
        values.append(lo / 2)
    if hi != math.inf:
        values.append(hi + 1 if hi_in else hi)
    if t is int:
        values = [int(v) for v in values if v == int(v)] + [2**63]
    return values


def test_every_numeric_field_has_a_range():
    assert sorted(n for n, _ in numeric_fields()) == sorted(RANGES)


@pytest.mark.parametrize("name,t", numeric_fields(), ids=[n for n, _ in numeric_fields()])
def test_every_numeric_field_refuses_nan_inf_and_out_of_range(name, t):
    bad = ["nan", "inf", "-inf", *(repr(v) for v in out_of_range(RANGES[name], t))]
    for value in bad:
        with pytest.raises(ValueError, match=f"config field '{re.escape(name)}'") as e:
            apply_overrides(presets.tiny(), [f"{name}={value}"])
        assert "\n" not in str(e.value), value


@pytest.mark.parametrize("section,kw,field", [
    (OptimConfig, {"lr": math.inf}, "optim.lr"),
    (OptimConfig, {"lr": math.nan}, "optim.lr"),
    (OptimConfig, {"eps": -1e-8}, "optim.eps"),
    (OptimConfig, {"grad_clip": math.nan}, "optim.grad_clip"),
    (ModelConfig, {"rope_theta": math.inf}, "model.rope_theta"),
    (ModelConfig, {"init_std": math.nan}, "model.init_std"),
    (ScaleConfig, {"cpus_per_worker": math.inf}, "scale.cpus_per_worker"),
    (ScaleConfig, {"resize_check_s": -1.0}, "scale.resize_check_s"),
    (DataConfig, {"read_cpus": 1e-6}, "data.read_cpus"),
    (CheckpointConfig, {"sigterm_grace_s": math.inf}, "checkpoint.sigterm_grace_s"),
])
def test_the_reported_offenders_fail_in_the_dataclass_itself(section, kw, field):
    with pytest.raises(ValueError, match=f"'{field}': must be "):
        section(**kw)


def test_defaults_edges_and_worker_resources():
    c = apply_overrides(presets.tiny(), ["optim.grad_clip=0", "optim.weight_decay=0", "checkpoint.max_failures=-1",
                                         "data.read_cpus=0.0001", "patch.lam=0", "scale.worker_resources=a=0.5"])
    assert c.optim.grad_clip == 0 and c.checkpoint.max_failures == -1
    for resources in ("a=inf", "a=nan", "a=0.00001"):
        with pytest.raises(ValueError, match="'scale.worker_resources'"):
            apply_overrides(presets.tiny(), [f"scale.worker_resources={resources}"])


def test_seed_must_fit_numpy():
    assert apply_overrides(presets.tiny(), [f"seed={2**32 - 1}"]).seed == 2**32 - 1
    for seed in (2**32, -1, 10**30):
        with pytest.raises(ValueError, match=r"'seed': must be in \[0, 2\*\*32\)"):
            apply_overrides(presets.tiny(), [f"seed={seed}"])


def test_patch_k_must_leave_two_patches_in_token_context():
    # tiny: data.seq_len=32. A row of T tokens read as T/K patches needs two of them for a target.
    assert apply_overrides(presets.tiny(), ["patch.context=tokens", "patch.k=16"]).patch.k == 16
    for k, left in ((32, "1 patch"), (64, "0 patches")):
        with pytest.raises(ValueError, match=f"'patch.k': K={k} leaves {left} in a row of data.seq_len=32 tokens "
                                             r"\(patch.context='tokens'\).*K <= 16"):
            apply_overrides(presets.tiny(), ["patch.context=tokens", f"patch.k={k}"])
    # In the paper's context a row is K·T tokens, T patches, whatever K is.
    assert apply_overrides(presets.tiny(), ["patch.k=32", "optim.tokens_per_step=2048"]).patch.k == 32
    with pytest.raises(ValueError, match="'data.seq_len': must be >= 2"):
        apply_overrides(presets.tiny(), ["data.seq_len=1"])


def test_the_two_patch_rule_is_the_loss_functions():
    torch = pytest.importorskip("torch")
    from raypatch.patching import next_patch_loss

    ids = torch.zeros(1, 32, dtype=torch.long)
    assert torch.isfinite(next_patch_loss(torch.zeros(1, 32 // 16, 8), ids, 16))
    with pytest.raises(ValueError, match="at least 2 patches"):
        next_patch_loss(torch.zeros(1, 1, 8), ids, 32)


@pytest.mark.parametrize("name", ["ränk", "a b", "x:y", "", ".hidden", "a/b", "tab\t", "x" * 201])
def test_names_are_plain_ascii(name):
    with pytest.raises(ValueError, match=r"'checkpoint.name': must be one plain path component: .*ASCII letters, "
                                         r"digits, '\.', '_' or '-'") as e:
        replace(presets.tiny(), checkpoint={"name": name})
    assert "\n" not in str(e.value)
    with pytest.raises(InputError, match="--name: .* is not a plain name .*ASCII letters"):
        check_name(name, "--name")


def test_plain_names_pass():
    for name in ("run-1.v2_final", "A", "-x", "x" * 200):
        assert replace(presets.tiny(), checkpoint={"name": name}).checkpoint.name == name
        assert check_name(name, "--name") == name


def test_yaml_key_given_twice(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("preset: tiny\noptim:\n  lr: 1e-3\n  eps: 1e-6\n  lr: 2e-3\n")
    with pytest.raises(ValueError, match=f"config file {re.escape(str(p))}: line 5: key 'lr' given twice in one "
                                         r"mapping \(first at line 3\)"):
        load_config(str(p))
    p.write_text("preset: tiny\noptim:\n  lr: 1e-3\npatch:\n  k: 2\noptim:\n  eps: 1e-6\n")
    with pytest.raises(ValueError, match="line 6: key 'optim' given twice"):
        load_config(str(p))
    j = tmp_path / "run.json"
    j.write_text('{"preset": "tiny", "seed": 1, "seed": 2}')
    with pytest.raises(ValueError, match=f"config file {re.escape(str(j))}: key 'seed' given twice"):
        load_config(str(j))


@pytest.mark.parametrize("text", [
    "preset: tiny\noptim: &o\n  lr: *o\n",  # refers to itself: looped forever (RecursionError)
    "a: &a [*a]\n",
    "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\nc: [*b, *b, *b, *b, *b]\n",
    "base: &b {lr: 1e-3}\noptim:\n  <<: *b\n",
])
def test_yaml_aliases_are_refused(tmp_path, text):
    p = tmp_path / "run.yaml"
    p.write_text(text)
    with pytest.raises(ValueError, match=f"config file {re.escape(str(p))}: line [0-9]+: YAML alias \\*[ab o]: "
                                         "aliases .* are not allowed in config files") as e:
        load_config(str(p))
    assert "\n" not in str(e.value)


def test_yaml_too_deep(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("a: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ValueError, match=f"config file {re.escape(str(p))}: nested too deeply"):
        load_config(str(p))


def test_yaml_non_finite_values_are_refused(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("preset: tiny\noptim:\n  lr: .inf\n")
    with pytest.raises(ValueError, match="'optim.lr': must be a finite number > 0, got inf"):
        load_config(str(p))


@pytest.mark.parametrize("argv,pattern", [
    (["--set", "optim.lr=inf"], "config field 'optim.lr': must be a finite number > 0, got inf"),
    (["--set", "optim.lr=nan"], "config field 'optim.lr': must be a finite number > 0, got nan"),
    (["--set", f"seed={2**32}"], "config field 'seed': must be in [0, 2**32)"),
    (["--set", "checkpoint.name=ränk"], "config field 'checkpoint.name': must be one plain path component"),
    (["--set", "patch.context=tokens", "patch.k=32"], "config field 'patch.k': K=32 leaves 1 patch"),
    (["--gpu-hour-price", "inf"], "config field 'gpu_hour_price': must be a finite number >= 0"),
])
def test_cli_bad_values_are_one_line_exit_2(capsys, argv, pattern):
    from raypatch.cli import main

    assert main(["train", "--config", "tiny", *argv]) == 2
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"raypatch: error: {pattern}"), out.err
    assert "Traceback" not in out.err + out.out


def test_cli_bad_config_file_is_one_line_exit_2(capsys, tmp_path):
    from raypatch.cli import main

    p = tmp_path / "run.yaml"
    p.write_text("preset: tiny\nseed: 1\nseed: 2\n")
    assert main(["train", "--config", str(p)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"raypatch: error: config file {p}: line 3: key 'seed' given twice")
