"""Named configs as plain functions (each returns a validated Config), and `load_config`: a preset or a YAML
file, then dotted overrides."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from raypatch.config import (
    CheckpointConfig,
    Config,
    DataConfig,
    EvalConfig,
    ModelConfig,
    OptimConfig,
    PatchConfig,
    ScaleConfig,
    _fail,
    apply_overrides,
    replace,
)


def tiny() -> Config:
    """Tests and smoke runs: a 2-layer d=64 Llama, T=32, K=2; a few steps per phase run in seconds on CPU."""
    return Config(
        model=ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
                          num_heads=4, max_position_embeddings=64),
        patch=PatchConfig(k=2, lam=0.5),
        data=DataConfig(seq_len=32, max_tokens=8192, prefetch_batches=2),
        optim=OptimConfig(lr=3e-3, warmup_steps=2, tokens_per_step=256, micro_batch_size=2),
        scale=ScaleConfig(num_workers=2, zero_stage=2, precision="fp32", cpus_per_worker=1.0,
                          zero3_persistence_threshold=0),
        checkpoint=CheckpointConfig(name="tiny", every_steps=4),
        eval=EvalConfig(max_rows=8),
        log_every=2,
    )


def demo() -> Config:
    """The README's main job on this 2-core machine: a ~3M-parameter Llama on the embedded corpus."""
    return Config(
        model=ModelConfig(vocab_size=4096, hidden_size=128, intermediate_size=344, num_layers=4,
                          num_heads=4, max_position_embeddings=128),
        patch=PatchConfig(k=4, lam=2 / 3),
        data=DataConfig(seq_len=128, max_tokens=0),
        optim=OptimConfig(lr=2e-3, warmup_steps=10, tokens_per_step=4096, micro_batch_size=4),
        scale=ScaleConfig(num_workers=2, precision="fp32", cpus_per_worker=1.0),
        checkpoint=CheckpointConfig(name="demo", every_steps=50),
        eval=EvalConfig(every_steps=50, max_rows=64),
        log_every=10,
        compare_baseline=True,
    )


def paper_370m() -> Config:
    """The paper's 370M recipe (Shao et al. 2025, §3.1; reference run_patch.sh) on 8 GPUs."""
    return Config(
        model=ModelConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2752, num_layers=24,
                          num_heads=16, max_position_embeddings=2048),
        patch=PatchConfig(k=4, lam=2 / 3),
        data=DataConfig(seq_len=2048),
        optim=OptimConfig(lr=3e-4, beta1=0.9, beta2=0.95, weight_decay=0.1, warmup_steps=2000,
                          grad_clip=1.0, tokens_per_step=2**21, micro_batch_size=4),
        scale=ScaleConfig(num_workers=8, use_gpu=True, precision="bf16"),
        checkpoint=CheckpointConfig(name="paper-370m", every_steps=1000, max_failures=3),
        eval=EvalConfig(every_steps=1000, max_rows=256),
        log_every=10,
    )


PRESETS: dict[str, Callable[[], Config]] = {"tiny": tiny, "demo": demo, "paper-370m": paper_370m}


def get(name: str) -> Config:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})")
    return PRESETS[name]()


def load_config(source: str, overrides: list[str] | None = None) -> Config:
    """A preset name or a YAML file (which may name a base `preset:`), then dotted overrides."""
    path = Path(source)
    flat: list[str] = []
    if source in PRESETS:
        cfg = get(source)
    elif path.suffix in (".yaml", ".yml", ".json") and path.exists():
        d = read_json(path) if path.suffix == ".json" else read_yaml(path)
        if not isinstance(d, dict):
            raise ValueError(f"config file {path}: expected a mapping at the top level")
        base = d.pop("preset", None)
        if base is not None and base not in PRESETS:
            raise ValueError(f"config file {path}: unknown preset {base!r} (known: {', '.join(PRESETS)})")
        cfg = get(base) if base else Config()
        flat = [f"{k}={v}" for k, v in _flatten(d, source=str(path))]
    elif path.suffix in (".yaml", ".yml", ".json"):
        raise ValueError(f"config file {source}: not found")
    else:
        raise ValueError(f"unknown preset {source!r} (known: {', '.join(PRESETS)}; or a .yaml file)")
    # File values and command-line overrides are applied together, so that the combination is validated
    # once (a file may set K while the command line fixes tokens_per_step to match).
    items = flat + list(overrides or [])
    cfg = absolute_paths(apply_overrides(cfg, items))
    if cfg.model.source is None:
        return cfg
    from raypatch.hfdir import resolve  # transformers only when a model directory is named

    given = {k.split("=", 1)[0].strip().removeprefix("model.") for k in items if k.strip().startswith("model.")}
    return resolve(cfg, given)


def read_json(path: Path) -> Any:
    """A JSON config file; a key given twice in one object is an error (json keeps the last silently)."""

    def no_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        d: dict[str, Any] = {}
        for k, v in pairs:
            if k in d:
                raise ValueError(f"config file {path}: key {k!r} given twice in one object")
            d[k] = v
        return d

    try:
        return json.loads(path.read_text(), object_pairs_hook=no_repeats)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"config file {path}: not valid JSON ({e})") from None


def read_yaml(path: Path) -> Any:
    """A YAML config file, read with safe_load's types plus three refusals, each one line naming the file:
    a key given twice in one mapping (YAML keeps the last silently), aliases (`*name`: config files do not need
    them, and they are how a self-referencing document loops forever or a small one expands to gigabytes, the
    "billion laughs"), and nesting too deep to read."""
    import yaml

    class Loader(yaml.SafeLoader):
        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                raise ValueError(f"config file {path}: line {event.start_mark.line + 1}: YAML alias "
                                 f"*{event.anchor}: aliases (*name, also in '<<: *name') are not allowed in config "
                                 f"files; write the values out")
            return super().compose_node(parent, index)

        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # not a plain key (SafeLoader refuses what it cannot hash), or `<<`
                key, line = self.construct_object(key_node), key_node.start_mark.line + 1
                if key in seen:
                    raise ValueError(f"config file {path}: line {line}: key {key!r} given twice in one mapping "
                                     f"(first at line {seen[key]})")
                seen[key] = line
            return super().construct_mapping(node, deep=deep)

    try:
        return yaml.load(path.read_text(), Loader=Loader) or {}  # a SafeLoader: plain data types only
    except UnicodeDecodeError as e:
        raise ValueError(f"config file {path}: not valid YAML ({e})") from None
    except RecursionError:
        raise ValueError(f"config file {path}: nested too deeply to read (a config is two levels)") from None
    except yaml.YAMLError as e:  # its message spans lines and points at the problem
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ValueError(f"config file {path}: not valid YAML{where} "
                         f"({getattr(e, 'problem', None) or type(e).__name__})") from None


def in_ray_job() -> bool:
    """True in the driver of a `ray job submit` (the job supervisor sets this variable)."""
    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ


def absolute_paths(cfg: Config) -> Config:
    """Resolve relative paths against the current directory: Ray workers and Tune trials run elsewhere.

    In a Ray job the current directory is Ray's temporary copy of the submitted working directory, deleted
    with the job's session, so a relative checkpoint.storage_path (outputs) is taken from the home directory
    instead: the default `runs` becomes ~/runs on the node that runs the job's driver.
    """

    def fix(value: str, base: Path | None = None) -> str:
        if value and "://" not in value and not Path(value).expanduser().is_absolute():
            return str(((base or Path.cwd()) / Path(value).expanduser()).resolve())
        return str(Path(value).expanduser()) if value.startswith("~") else value

    home = Path.home() if in_ray_job() else None
    return replace(cfg, data={"shards": fix(cfg.data.shards), "cache_dir": fix(cfg.data.cache_dir)},
                   eval={"wikitext": fix(cfg.eval.wikitext)},
                   model={"hf_config": fix(cfg.model.hf_config), "init_from": fix(cfg.model.init_from)},
                   checkpoint={"storage_path": fix(cfg.checkpoint.storage_path, home)})


def _flatten(d: dict[str, Any], prefix: str = "", *, source: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for k, v in d.items():
        if isinstance(v, dict):
            out += _flatten(v, f"{prefix}{k}.", source=source)
        elif v is None:  # YAML `key:` or `key: null` would otherwise become the string "None"
            _fail(f"{prefix}{k}", f"empty (null) in {source}; give a value or remove the line")
        elif isinstance(v, (list, tuple)):
            _fail(f"{prefix}{k}", f"a list in {source}; expected a single value")
        else:
            out.append((f"{prefix}{k}", v))
    return out
