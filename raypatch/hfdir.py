"""Bring your own model: a local Hugging Face model directory as the architecture (model.hf_config, trained from
scratch) or as the starting weights (model.init_from, continued pretraining).

Everything is checked on the driver before a worker starts: the directory and its config.json; that the
architecture is a causal LM built into transformers whose forward takes `inputs_embeds` (patch mode feeds averaged
embeddings through the model's own input path, with position ids where the forward takes them, else positions are
the index); that the weights are safetensors and match the config; and that no shape field given on the command
line contradicts config.json. Nothing is downloaded and no remote code runs: every transformers load passes
trust_remote_code=False, and a directory whose config.json or tokenizer_config.json names code of its own
(`auto_map`) is refused up front (`check_no_remote_code`), as is a model_type transformers does not build.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from raypatch.config import Config, ModelConfig, replace
from raypatch.safety import InputError, check_no_remote_code

# raypatch's shape field -> the HF config attribute it mirrors.
SHAPE = {"vocab_size": "vocab_size", "hidden_size": "hidden_size", "intermediate_size": "intermediate_size",
         "num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
         "num_kv_heads": "num_key_value_heads", "max_position_embeddings": "max_position_embeddings",
         "rope_theta": "rope_theta", "tie_embeddings": "tie_word_embeddings", "init_std": "initializer_range"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def read_local_config(f: Path, label: str) -> dict[str, Any]:
    """config.json's fields, refusing a directory that names remote code or a model_type this transformers does
    not build (loading either would need code from outside transformers). `label` opens the error line."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    check_no_remote_code(f.parent, label)
    try:
        d = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InputError(f"{label}: {f} is not valid JSON ({e})") from None
    kind = d.get("model_type") if isinstance(d, dict) else None
    if kind not in CONFIG_MAPPING:
        raise InputError(f"{label}: {f} has model_type {kind!r}, which this transformers does not "
                         f"build (raypatch runs no remote code)")
    return d


def config_file(field: str, path: str) -> Path:
    p = Path(path).expanduser()
    f = p if p.is_file() else p / "config.json"
    if not f.is_file():
        raise InputError(f"config field '{field}': {path} has no config.json (expected a local Hugging Face model "
                         f"directory{' or its config.json' if field == 'model.hf_config' else ''})")
    return f


def load_hf_config(field: str, path: str) -> Any:
    """The PretrainedConfig of a local directory (or config.json), refusing what patch mode cannot drive."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    f = config_file(field, path)
    d = read_local_config(f, f"config field '{field}'")
    kind = d["model_type"]
    try:
        conf = CONFIG_MAPPING[kind].from_dict(d)
    except Exception as e:  # a config class rejecting its values
        raise InputError(f"config field '{field}': {f} is not a valid {kind} config "
                         f"({type(e).__name__}: {e})") from None
    if getattr(conf, "is_encoder_decoder", False) or kind not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise InputError(f"config field '{field}': {kind} is not a decoder-only causal LM (raypatch trains "
                         f"AutoModelForCausalLM architectures)")
    if "inputs_embeds" not in inspect.signature(causal_lm_class(conf).forward).parameters:
        raise InputError(f"config field '{field}': {kind}'s forward takes no inputs_embeds; patch mode feeds "
                         f"averaged embeddings through it")
    return conf


def causal_lm_class(conf: Any) -> type:
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[conf.model_type])


def shape_of(conf: Any) -> dict[str, Any]:
    """raypatch's shape fields as the HF config sets them (num_kv_heads 0 when it has no GQA field)."""
    out = {}
    for ours, theirs in SHAPE.items():
        v = getattr(conf, theirs, None)
        if ours == "rope_theta" and v is None:  # transformers 5 keeps it in rope_parameters
            v = (getattr(conf, "rope_parameters", None) or {}).get("rope_theta")
        if ours == "num_kv_heads" and v is None:
            v = 0
        if v is not None:
            out[ours] = type(getattr(ModelConfig, ours))(v)
    return out


def resolve(cfg: Config, given: Iterable[str] | None = None) -> Config:
    """`cfg` with the shape fields of its model directory, after every check (idempotent).

    `given`: the model fields the user set (raypatch's names); one that disagrees with config.json is an error
    naming both values. None (a config built in code): every field that differs from ModelConfig's default.
    """
    src = cfg.model.source
    if src is None:
        return cfg
    field, path = src
    conf = load_hf_config(field, path)
    shape = shape_of(conf)
    default = ModelConfig()
    if given is None:
        given = [k for k in shape if getattr(cfg.model, k) != getattr(default, k)]
    for k in given:
        if k in shape and getattr(cfg.model, k) != shape[k]:
            raise InputError(f"config field 'model.{k}': {getattr(cfg.model, k)} conflicts with "
                             f"{SHAPE[k]}={shape[k]} in {config_file(field, path)} ({field}); drop the override")
    out = replace(cfg, model={**shape, "family": conf.model_type})
    if cfg.model.init_from:
        check_weights(out.model, conf)
    check_tokenizer_fits(out.model)
    return out


def weight_files(m: ModelConfig) -> list[Path]:
    """init_from's weight files: safetensors, or pickled .bin only with allow_pickle_weights."""
    d = Path(m.init_from).expanduser()
    safe = sorted(d.glob("*.safetensors"))
    if safe:
        return safe
    pickled = sorted(d.glob("pytorch_model*.bin"))
    if pickled and not m.allow_pickle_weights:
        raise InputError(f"config field 'model.init_from': {d} holds only pickled weights ({pickled[0].name}); "
                         f"raypatch loads safetensors. Convert them, or set model.allow_pickle_weights=true to load "
                         f"them with torch.load(weights_only=True)")
    if not pickled:
        raise InputError(f"config field 'model.init_from': {d} has no weights (*.safetensors); to train this "
                         f"architecture from scratch use model.hf_config={d}")
    return pickled


def check_weights(m: ModelConfig, conf: Any) -> None:
    """Every tensor of the safetensors files has the name and shape the config's model expects."""
    import torch
    from safetensors import safe_open

    files = weight_files(m)
    if files[0].suffix != ".safetensors":
        return  # pickled weights are read only in the workers (transformers checks their shapes there)
    from transformers.conversion_mapping import WeightRenaming, get_model_conversion_mapping

    with torch.device("meta"):
        model = causal_lm_class(conf)(conf)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    # Checkpoints keep legacy names (GPT-NeoX saves lm_head as embed_out) that transformers renames on load.
    rules = get_model_conversion_mapping(model)
    found: dict[str, tuple[int, ...]] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as sf:
                found |= {rename(k, rules): tuple(sf.get_slice(k).get_shape()) for k in sf.keys()}
        except Exception as e:  # a truncated or foreign file
            raise InputError(f"config field 'model.init_from': {f} is not a readable safetensors file "
                             f"({type(e).__name__}: {e})") from None
    strict = all(type(r) is WeightRenaming for r in rules)  # else tensors are merged on load: shapes only
    for k, shape in found.items():
        if k in expected and expected[k] != shape:
            raise InputError(f"config field 'model.init_from': weights do not match config.json: {k} is "
                             f"{list(shape)} in {f.parent}, the config makes it {list(expected[k])}")
    if not strict:
        return
    tied = {"lm_head.weight", "embed_out.weight"} if m.tie_embeddings else set()
    missing = sorted(set(expected) - set(found) - tied)
    extra = sorted(k for k in set(found) - set(expected) if not k.endswith("inv_freq"))
    if missing or extra:
        what = f"missing {missing[0]}" if missing else f"unexpected {extra[0]}"
        raise InputError(f"config field 'model.init_from': weights do not match config.json ({what}; "
                         f"{len(missing)} missing, {len(extra)} unexpected tensors)")


def rename(key: str, rules: list[Any]) -> str:
    """A checkpoint tensor's name as the model calls it, after transformers' own renaming rules."""
    for r in rules:
        if hasattr(r, "rename_source_key"):
            key = r.rename_source_key(key)[0]
    return key


def tokenizer_of(m: ModelConfig) -> str | None:
    """The model directory when it holds a tokenizer (then it is the run's tokenizer), else None."""
    src = m.source
    if src is None:
        return None
    d = Path(src[1]).expanduser()
    d = d.parent if d.is_file() else d
    return str(d) if any((d / f).is_file() for f in TOKENIZER_FILES) else None


def check_tokenizer_fits(m: ModelConfig) -> None:
    tok = tokenizer_of(m)
    if tok is None:
        return
    from raypatch.tokenizer import load_tokenizer

    n = len(load_tokenizer(tok))
    if n > m.vocab_size:
        raise InputError(f"config field '{m.source[0]}': the tokenizer in {tok} has {n} tokens, more than the "
                         f"model's embedding table (vocab_size={m.vocab_size} in its config.json)")


def check_shards_tokenizer(m: ModelConfig, manifest: dict[str, Any], shards: str) -> None:
    """Shards prepared with another tokenizer than the model directory's are refused, with the fix."""
    tok = tokenizer_of(m)
    if tok is None or not m.tokenizer_from_model:
        return
    from raypatch.tokenizer import tokenizer_info

    want, have = tokenizer_info(tok)["fingerprint"], manifest["tokenizer"]["fingerprint"]
    if want != have:
        raise InputError(f"data.shards={shards} were prepared with another tokenizer than {m.source[0]}={tok} "
                         f"(fingerprint {have[:12]} != {want[:12]}): prepare them with `raypatch prepare "
                         f"--tokenizer {tok} ...`, or set model.tokenizer_from_model=false to keep the shards' own")


def load_pretrained(m: ModelConfig) -> Any:
    """init_from's model in fp32 (safetensors unless allow_pickle_weights; local files only)."""
    import torch
    from transformers import AutoModelForCausalLM

    files = weight_files(m)
    check_no_remote_code(Path(m.init_from), "config field 'model.init_from'")  # also when called in a worker
    return AutoModelForCausalLM.from_pretrained(str(Path(m.init_from).expanduser()), dtype=torch.float32,
                                                local_files_only=True, trust_remote_code=False,
                                                use_safetensors=files[0].suffix == ".safetensors")
