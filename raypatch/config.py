"""The one typed config tree, its validation, dict round trip and dotted overrides.

Only the standard library is imported here (YAML is imported lazily), so drivers, Tune search spaces and
tests can build and check configs without torch, Ray or a GPU. Plain dicts exist only at the Ray boundary:
`cfg.to_dict()` goes in, `Config.from_dict(d)` comes out, and both reject unknown keys.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any

FAMILIES = ("llama", "qwen2", "gpt_neox")

NAME_RULE = "1-200 ASCII letters, digits, '.', '_' or '-', not starting with '.'"
"""What a run or experiment name may hold: it becomes a directory, a file name part and a Ray Train metric tag."""

# The allowed values of every int and float field, by dotted name: '> 0', '>= 1' or an interval such as
# '[0, 1)'. Every value must also be finite, and every int fit in 64 bits (numpy, torch and DeepSpeed's JSON
# take them). A numeric field missing here fails the first config built (tests/test_config.py walks them all).
# CPU amounts start at 0.0001, the finest fraction Ray schedules; time intervals end at a day, well inside
# what timers and sleeps accept.
RANGES: dict[str, str] = {
    "model.vocab_size": ">= 1",
    "model.hidden_size": ">= 1",
    "model.intermediate_size": ">= 1",
    "model.num_layers": ">= 1",
    "model.num_heads": ">= 1",
    "model.num_kv_heads": ">= 0",
    "model.max_position_embeddings": ">= 1",
    "model.rope_theta": "> 0",
    "model.init_std": "> 0",
    "patch.k": ">= 1",
    "patch.lam": "[0, 1)",
    "data.seq_len": ">= 2",  # the loss scores position t+1 from position t: a row needs two
    "data.max_tokens": ">= 0",
    "data.patch_tokens": ">= 0",
    "data.epochs": ">= 1",
    "data.read_cpus": ">= 0.0001",
    "data.prefetch_batches": ">= 0",
    "data.cache_gb": "> 0",
    "optim.lr": "> 0",
    "optim.min_lr": ">= 0",
    "optim.beta1": "[0, 1)",
    "optim.beta2": "[0, 1)",
    "optim.eps": "> 0",
    "optim.weight_decay": ">= 0",
    "optim.warmup_steps": ">= 0",
    "optim.grad_clip": ">= 0",
    "optim.tokens_per_step": ">= 1",
    "optim.micro_batch_size": ">= 1",
    "scale.num_workers": ">= 1",
    "scale.min_workers": ">= 0",
    "scale.resize_check_s": "(0, 86400]",
    "scale.cpus_per_worker": ">= 0.0001",
    "scale.zero_stage": "[0, 3]",
    "scale.zero3_persistence_threshold": ">= 0",
    "checkpoint.every_steps": ">= 0",
    "checkpoint.every_tokens": ">= 0",
    "checkpoint.every_minutes": ">= 0",
    "checkpoint.preemption_check_every": ">= 0",
    "checkpoint.preemption_check_seconds": "[0, 86400]",
    "checkpoint.sigterm_grace_s": "[0, 86400]",
    "checkpoint.keep": ">= 1",
    "checkpoint.max_failures": ">= -1",  # -1: no limit (Ray's FailureConfig)
    "eval.every_steps": ">= 0",
    "eval.max_rows": ">= 1",
    "seed": "[0, 2**32)",  # numpy's seed range
    "log_every": ">= 1",
    "gpu_hour_price": ">= 0",
}


def _fail(name: str, msg: str) -> None:
    raise ValueError(f"config field '{name}': {msg}")


def is_plain_name(value: str) -> bool:
    """True for a name NAME_RULE allows (also checked by safety.check_name for names given as flags)."""
    return len(value) <= 200 and re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]*", value) is not None


def range_bounds(spec: str) -> tuple[float, float, bool, bool]:
    """A RANGES entry as (low, high, low allowed, high allowed): '> 0' -> (0, inf, False, False)."""

    def num(s: str) -> float:
        base, _, exp = s.strip().partition("**")
        return int(base) ** int(exp) if exp else float(base)

    if spec[0] in "[(":
        lo, hi = spec[1:-1].split(",")
        return num(lo), num(hi), spec[0] == "[", spec[-1] == "]"
    op, value = spec.split()
    return num(value), math.inf, op == ">=", False


def _check_numbers(obj: Any, prefix: str) -> None:
    """Every int and float field of one section against RANGES, naming the dotted field."""
    for key, t in _field_types(type(obj)).items():
        if t not in (int, float):
            continue
        name, value = prefix + key, getattr(obj, key)
        spec = RANGES[name]  # every numeric field needs an entry
        allowed = spec if spec[0] in "<>" else f"in {spec}"
        if isinstance(value, int):
            if not -(2**63) <= value < 2**63:
                _fail(name, f"must be {allowed} and fit in 64 bits, got {value!r}")
        elif not isinstance(value, float) or not math.isfinite(value):
            _fail(name, f"must be a finite number {allowed}, got {value!r}")
        lo, hi, lo_in, hi_in = range_bounds(spec)
        if not ((lo <= value if lo_in else lo < value) and (value <= hi if hi_in else value < hi)):
            _fail(name, f"must be {allowed}, got {value!r}")


@dataclass(kw_only=True)
class ModelConfig:
    family: str = "llama"
    """Architecture built from scratch: llama, qwen2 or gpt_neox (with hf_config/init_from: that model's type)."""
    vocab_size: int = 8192
    """Rows of the embedding table; must be at least the tokenizer's vocabulary."""
    hidden_size: int = 256
    """Model width d."""
    intermediate_size: int = 688
    """FFN width (SwiGLU for llama and qwen2, GELU MLP for gpt_neox)."""
    num_layers: int = 4
    """Decoder layers."""
    num_heads: int = 4
    """Attention heads."""
    num_kv_heads: int = 0
    """Key/value heads for grouped-query attention; 0 means num_heads."""
    max_position_embeddings: int = 2048
    """Largest position id; patch and token phases both use positions 0..T-1."""
    rope_theta: float = 10000.0
    """RoPE base."""
    init_std: float = 0.02
    """Std of the normal weight init."""
    tie_embeddings: bool = False
    """Share the input embedding and LM head (the paper's Llama does not)."""
    hf_config: str = ""
    """A local HF model directory or config.json: train that architecture from scratch (shape fields from it)."""
    init_from: str = ""
    """A local HF model directory: continue pretraining from its weights (safetensors), architecture and tokenizer."""
    allow_pickle_weights: bool = False
    """Let init_from read pickled pytorch_model*.bin (torch.load weights_only=True) when it has no safetensors."""
    tokenizer_from_model: bool = True
    """With hf_config/init_from: refuse shards not prepared with that directory's tokenizer, if it has one."""

    @property
    def source(self) -> tuple[str, str] | None:
        """(field, path) of the HF model directory this model comes from, or None for a built-in family."""
        if self.init_from:
            return "model.init_from", self.init_from
        return ("model.hf_config", self.hf_config) if self.hf_config else None

    def __post_init__(self) -> None:
        if self.hf_config and self.init_from:
            _fail("model.init_from", "set either model.hf_config (a new model of that architecture) or "
                                     "model.init_from (its weights too), not both")
        if self.family not in FAMILIES and self.source is None:
            _fail("model.family", f"must be one of {FAMILIES}, got {self.family!r} (other architectures: "
                                  f"model.hf_config or model.init_from)")
        _check_numbers(self, "model.")
        if self.hidden_size % self.num_heads:
            _fail("model.hidden_size", f"{self.hidden_size} is not divisible by model.num_heads={self.num_heads}")
        kv = self.num_kv_heads or self.num_heads
        if self.num_heads % kv:
            _fail("model.num_kv_heads", f"{self.num_kv_heads} must divide model.num_heads={self.num_heads}")


@dataclass(kw_only=True)
class PatchConfig:
    k: int = 4
    """Patch size K: tokens averaged into one patch in the patch phase (1 = token-level only)."""
    lam: float = 2 / 3
    """Fraction λ of the data trained at patch level; the rest is trained at token level."""
    context: str = "patches"
    """'patches': a patch-phase row is K·T tokens read as T patches (the paper); 'tokens': T tokens as T/K."""
    weights: str = "uniform"
    """The K tokens of the next patch in the loss: 'uniform' (the paper's mean) or 'power:α', w_i ∝ (i+1)^-α."""

    def __post_init__(self) -> None:
        _check_numbers(self, "patch.")
        if self.context not in ("patches", "tokens"):
            _fail("patch.context", f"must be 'patches' or 'tokens', got {self.context!r}")
        kind, _, alpha = self.weights.partition(":")
        try:
            ok = self.weights == "uniform" or (kind == "power" and 0 <= float(alpha) <= 16)
        except ValueError:
            ok = False
        if not ok:
            _fail("patch.weights", f"must be 'uniform' or 'power:α' with 0 <= α <= 16 (e.g. power:1), "
                                   f"got {self.weights!r}")


@dataclass(kw_only=True)
class DataConfig:
    shards: str = ""
    """Shard set made by `raypatch prepare`: a directory, or a URI (s3://bucket/prefix?endpoint_override=...)."""
    seq_len: int = 2048
    """T: model positions per row, the same in both phases."""
    max_tokens: int = 0
    """D: train on the first D tokens of the stream; 0 = every token in the shards."""
    patch_tokens: int = 0
    """Tokens of the patch phase, exactly (raypatch tune sets it in whole steps); 0 = ⌊λ·D⌋ from patch.lam."""
    epochs: int = 1
    """Passes over the train stream allowed (multi-epoch mode when > 1: patch phase on the first λ of them)."""
    read_cpus: float = 0.25
    """Logical CPUs each Ray Data read task asks for (keep below what Train leaves free)."""
    prefetch_batches: int = 4
    """Micro-batches each worker's Ray Data iterator keeps ready ahead of the step."""
    record_blocks: bool = False
    """Append every trained block index to <run>/blocks-rank<r>.jsonl (audits and tests)."""
    cache_dir: str = ""
    """Local directory caching the shards of a set on a store (per node, keyed by the set's id); "" = off."""
    cache_gb: float = 50.0
    """Most GiB data.cache_dir may hold; the least recently used shards go first."""

    def __post_init__(self) -> None:
        _check_numbers(self, "data.")
        if "://" in self.cache_dir:
            _fail("data.cache_dir", f"must be a local directory, got {self.cache_dir}")
        if self.patch_tokens > self.max_tokens:
            _fail("data.patch_tokens", f"needs data.max_tokens (D) and at most D tokens, got {self.patch_tokens} "
                  f"with data.max_tokens={self.max_tokens}")


@dataclass(kw_only=True)
class OptimConfig:
    lr: float = 3e-4
    """Peak learning rate, the same in both phases."""
    min_lr: float = 0.0
    """Learning rate at the end of each phase's cosine decay."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.1
    """Decoupled weight decay on matrices and embeddings (not on norms and biases)."""
    warmup_steps: int = 2000
    """Linear warmup steps at the start of each phase (the LR schedule restarts at the switch)."""
    grad_clip: float = 1.0
    """Global gradient-norm clip; 0 disables."""
    tokens_per_step: int = 2**21
    """Global tokens per optimizer step, the same in both phases."""
    micro_batch_size: int = 4
    """Rows per worker per forward; gradient accumulation makes up the rest of tokens_per_step."""
    fused_adamw: bool = True
    """torch's fused AdamW kernel (CPU and CUDA); false: its per-tensor loop (slower per step)."""

    def __post_init__(self) -> None:
        _check_numbers(self, "optim.")
        if self.min_lr > self.lr:
            _fail("optim.min_lr", f"must be in [0, optim.lr={self.lr}], got {self.min_lr}")


@dataclass(kw_only=True)
class PhasesConfig:
    keep_optimizer: bool = False
    """Carry AdamW state and LR schedule across the switch (the paper resets both: False)."""
    patch_only: bool = False
    """Stop after the patch phase (λ of the data) and skip the token phase."""
    schedule: str = ""
    """Phases as K:share of the data, in order, ending with K=1 (e.g. 16:0.2,4:0.4,1:0.4); '' = patch.k, patch.lam."""

    def __post_init__(self) -> None:
        if self.schedule:
            parse_schedule(self.schedule)
            if self.patch_only:
                _fail("phases.patch_only", "applies to patch.k/patch.lam runs; a phases.schedule ends with K=1")


def parse_schedule(text: str) -> list[tuple[int, float]]:
    """'16:0.2,4:0.4,1:0.4' -> [(16, 0.2), (4, 0.4), (1, 0.4)], checked: at least two phases, shares in (0, 1]
    summing to 1, every K >= 2 but the last, which is 1."""
    out = []
    for item in text.split(","):
        k, _, share = item.strip().partition(":")
        try:
            out.append((int(k), float(share)))
        except ValueError:
            _fail("phases.schedule", f"expected K:share items separated by commas (e.g. 16:0.2,4:0.4,1:0.4), "
                                     f"got {item.strip()!r}")
    if len(out) < 2 or out[-1][0] != 1 or any(k < 2 for k, _ in out[:-1]):
        _fail("phases.schedule", f"needs patch phases (K >= 2) then one token phase (K=1) last, got {text!r}")
    if any(not 0 < x <= 1 for _, x in out) or abs(sum(x for _, x in out) - 1) > 1e-6:
        _fail("phases.schedule", f"shares must be in (0, 1] and sum to 1, got {text!r} (sum "
                                 f"{sum(x for _, x in out):.6g})")
    return out


@dataclass(kw_only=True)
class ScaleConfig:
    num_workers: int = 2
    """Ray Train workers (data-parallel ranks); the most workers when min_workers is set."""
    min_workers: int = 0
    """Elastic training: run on min_workers..num_workers as nodes come and go (0 = a fixed num_workers)."""
    resize_check_s: float = 60.0
    """Elastic training: how often Ray Train looks for room to grow the worker group."""
    use_gpu: bool = False
    """One GPU per worker (NCCL) instead of CPU workers (gloo)."""
    cpus_per_worker: float = 1.0
    """Logical CPUs each Train worker reserves; leave some for Ray Data."""
    worker_resources: str = ""
    """More resources each worker asks for, as name=amount pairs: 'trainslot=1' or 'spot_gpu=1,ssd=1'."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage 1, 2 or 3; 0 = chosen (fp32 up to 100M parameters: none; up to 1B: 1; else 2)."""
    precision: str = "bf16"
    """Training precision: bf16 or fp32 (fp16 is refused on CPU)."""
    zero3_persistence_threshold: int = 100_000
    """ZeRO-3 keeps parameters with fewer elements whole on every rank (0 partitions everything)."""
    overlap_allreduce: bool = True
    """Without ZeRO in fp32: all-reduce gradient buckets during the last backward (as torch DDP does)."""
    cpu_kernels: str = "avx2"
    """CPU workers: 'avx2' pins torch's and MKL's kernels to their AVX2 code (the same losses, bit for bit, on
    any x86 CPU with AVX2); 'native' takes the fastest this CPU has (AVX-512 ones round differently)."""

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):  # before the range check, for its wording
            _fail("scale.zero_stage", f"must be 0 (from the model size), 1, 2 or 3, got {self.zero_stage}")
        _check_numbers(self, "scale.")
        if self.min_workers > self.num_workers:
            _fail("scale.min_workers", f"must be in [0, scale.num_workers={self.num_workers}], got {self.min_workers}")
        for item in filter(None, self.worker_resources.split(",")):
            name, _, amount = item.partition("=")
            try:
                ok = bool(name.strip()) and 0.0001 <= float(amount) < math.inf  # Ray's finest fraction
            except ValueError:
                ok = False
            if not ok:
                _fail("scale.worker_resources", f"expected name=amount pairs separated by commas, amounts "
                      f"finite and >= 0.0001, got {item!r}")
        if self.precision not in ("bf16", "fp32"):
            _fail("scale.precision", f"must be 'bf16' or 'fp32', got {self.precision!r}")
        if self.cpu_kernels not in ("avx2", "native"):
            _fail("scale.cpu_kernels", f"must be 'avx2' or 'native', got {self.cpu_kernels!r}")


@dataclass(kw_only=True)
class CheckpointConfig:
    storage_path: str = "runs"
    """Ray Train storage path (local directory or s3:// URI); the run lives in <storage_path>/<name>."""
    name: str = "raypatch"
    """Run name; rerunning with the same name and storage path resumes the run."""
    every_steps: int = 0
    """Checkpoint every N optimizer steps (0 = only at the phase switch and at the end)."""
    every_tokens: int = 0
    """Also checkpoint whenever this many more tokens have been trained (0 = off)."""
    every_minutes: float = 0.0
    """Also checkpoint when this many minutes passed since the last checkpoint (0 = off); bounds spot losses."""
    preemption_check_every: int = 0
    """Ask Ray for a preemption notice every N steps (a barrier, 1-2 ms); 0 = every preemption_check_seconds."""
    preemption_check_seconds: float = 10.0
    """With preemption_check_every=0: ask about this often (steps agreed at each log line); 0 = never ask."""
    sigterm_grace_s: float = 0.0
    """> 0: a worker that gets SIGTERM saves a checkpoint at the next step and hands over within this time."""
    keep: int = 3
    """Checkpoints kept on storage."""
    upload: str = "async"
    """async: training waits only for the local snapshot, the upload to storage_path runs behind it; sync: waits."""
    max_failures: int = 0
    """Restarts from the last checkpoint allowed after a worker failure (-1: no limit, as in Ray's FailureConfig)."""

    def __post_init__(self) -> None:
        _check_numbers(self, "checkpoint.")
        # The run directory is <storage_path>/<name>: a name may never lead outside it. Ray Train also carries
        # it into metric tags, which take ASCII only.
        if not is_plain_name(self.name):
            _fail("checkpoint.name", f"must be one plain path component: {NAME_RULE}; got {self.name!r}")
        if not self.storage_path:
            _fail("checkpoint.storage_path", "empty (a local directory or an s3:// URI)")
        if self.upload not in ("async", "sync"):
            _fail("checkpoint.upload", f"must be 'async' or 'sync', got {self.upload!r}")


@dataclass(kw_only=True)
class EvalConfig:
    every_steps: int = 0
    """Token-level (K=1) validation every N optimizer steps (0 = only at the switch and the end)."""
    max_rows: int = 64
    """Rows of T tokens scored per validation set."""
    wikitext: str = ""
    """JSONL(.gz) of WikiText-103 test documents for out-of-domain perplexity ('' = skip)."""

    def __post_init__(self) -> None:
        _check_numbers(self, "eval.")


@dataclass(kw_only=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The sequence model."""
    patch: PatchConfig = field(default_factory=PatchConfig)
    """Patch size K and patch fraction λ."""
    data: DataConfig = field(default_factory=DataConfig)
    """Token shards, context length and data budget."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """AdamW and the per-phase schedule."""
    phases: PhasesConfig = field(default_factory=PhasesConfig)
    """What crosses the patch→token switch."""
    scale: ScaleConfig = field(default_factory=ScaleConfig)
    """Workers, devices and ZeRO stage."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Where and how often to checkpoint."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Token-level validation."""
    seed: int = 0
    """Seed for weights and anything random in the loop (0 <= seed < 2**32, numpy's range)."""
    log_every: int = 10
    """One log line every N optimizer steps."""
    compare_baseline: bool = False
    """Also train the token-only baseline (λ=0) on the same data and print both side by side."""
    gpu_hour_price: float = 0.0
    """Price of one device-hour (GPU, or CPU worker) for the savings meter; 0 shows FLOPs and % only."""

    def __post_init__(self) -> None:
        _check_numbers(self, "")
        if self.data.seq_len > self.model.max_position_embeddings:
            _fail("data.seq_len", f"{self.data.seq_len} exceeds model.max_position_embeddings="
                  f"{self.model.max_position_embeddings}")
        # patch.context='tokens' reads a row of T tokens as T/K patches, and the next-patch loss scores patch
        # j+1 from patch j: K must divide T and leave at least two patches (patching.next_patch_loss).
        k, t = self.patch.k, self.data.seq_len
        if self.patch.context == "tokens" and t // k < 2:
            _fail("patch.k", f"K={k} leaves {t // k} patch{'' if t // k == 1 else 'es'} in a row of data.seq_len={t} "
                  f"tokens (patch.context='tokens'); a row needs at least 2 patches, so K <= {t // 2}")
        if self.patch.context == "tokens" and t % k:
            _fail("patch.k", f"K={k} does not divide the patch-phase block of "
                  f"data.seq_len={t} tokens (patch.context='tokens')")
        # Every phase's optimizer step is whole rows, at least one per worker. Rows that do not split evenly
        # across the workers (an elastic resize from 8 to 5, say) keep the step exact: optim.step_split.
        if self.phases.schedule and self.data.patch_tokens:
            _fail("data.patch_tokens", "sets the patch phase of patch.k/patch.lam runs; phases.schedule gives "
                                       "every phase its share")
        blocks = [("patch", self.patch_block_tokens), ("token", self.data.seq_len)]
        if self.phases.schedule:
            ks = [k for k, _ in self.schedule()]
            blocks = [("patch" if k > 1 else "token", self.block_tokens(k)) for k in ks]
            for k in ks:
                if self.patch.context == "tokens" and (t % k or t // k < 2):
                    _fail("phases.schedule", f"K={k} must divide data.seq_len={t} and leave 2 patches per row "
                                             f"(patch.context='tokens')")
        for name, block in blocks:
            if name == "patch" and self.patch.lam == 0 and not self.phases.schedule:
                continue
            rows, rem = divmod(self.optim.tokens_per_step, block)
            if rem:
                _fail("optim.tokens_per_step", f"{self.optim.tokens_per_step} is not a whole number of "
                      f"{name}-phase rows of {block} tokens (needs a multiple of {block})")
            if rows < self.scale.num_workers:
                _fail("optim.tokens_per_step", f"{self.optim.tokens_per_step} tokens make {rows} {name}-phase "
                      f"rows of {block} tokens per step, fewer than scale.num_workers={self.scale.num_workers} "
                      f"(needs at least {block * self.scale.num_workers})")

    @property
    def patch_block_tokens(self) -> int:
        """Tokens per patch-phase row: K·T (the paper) or T (patch.context='tokens')."""
        return self.block_tokens(self.patch.k)

    def block_tokens(self, k: int) -> int:
        """Tokens per row of a phase of patch size k."""
        return self.data.seq_len * (k if self.patch.context == "patches" else 1)

    def schedule(self) -> list[tuple[int, float]]:
        """The run's phases as (K, share of the data): phases.schedule, or patch.k and patch.lam."""
        if self.phases.schedule:
            return parse_schedule(self.phases.schedule)
        return [(self.patch.k, self.patch.lam), (1, 1 - self.patch.lam)] if self.patch.lam > 0 else [(1, 1.0)]

    def run_label(self) -> str:
        """How tables name this run: 'patch K=4 λ=0.667', 'schedule 16:0.2,4:0.4,1:0.4' or 'token-only'."""
        if self.phases.schedule:
            return f"schedule {self.phases.schedule}"
        return f"patch K={self.patch.k} λ={self.patch.lam:.3g}" if self.patch.lam > 0 else "token-only"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        return _build(cls, d, "")

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _build(cls: type, d: Any, prefix: str) -> Any:
    if not isinstance(d, dict):
        _fail(prefix.rstrip(".") or "<root>", f"expected a mapping, got {type(d).__name__}")
    hints = _field_types(cls)
    kwargs = {}
    for key, value in d.items():
        if key not in hints:
            _fail(prefix + key, f"unknown key (known: {', '.join(sorted(hints))})")
        t = hints[key]
        if dataclasses.is_dataclass(t):
            kwargs[key] = _build(t, value, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, t, prefix + key)
    return cls(**kwargs)


def _coerce(value: Any, t: Any, name: str) -> Any:
    """Check (and for strings from the command line, parse) a leaf value against its annotation."""
    if isinstance(t, types.UnionType):  # `int | None`
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        t = next(a for a in t.__args__ if a is not type(None))
    if t is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        _fail(name, f"expected a bool, got {value!r}")
    if t is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))  # exact, also past float precision
            except ValueError:
                pass
            try:
                f = float(value.replace("_", ""))
            except ValueError:
                f = None
            if f is not None and f.is_integer():
                return int(f)
            if value.startswith("2**") and value[3:].isdigit():
                return 2 ** int(value[3:])
        _fail(name, f"expected an int, got {value!r}")
    if t is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                if "/" in value:  # fractions such as lam=2/3
                    a, b = value.split("/")
                    return float(a) / float(b)
                return float(value)
            except (ValueError, ZeroDivisionError):
                pass
        _fail(name, f"expected a float, got {value!r}")
    if t is str:
        if isinstance(value, str):
            return value
        _fail(name, f"expected a string, got {value!r}")
    raise TypeError(f"unsupported annotation {t!r} for {name}")


def replace(cfg: Config, **sections: dict[str, Any]) -> Config:
    """A new validated config with typed field values replaced, section by section:
    `replace(cfg, data={"shards": path}, patch={"lam": 0.0})`. Library code edits configs with this; dotted
    string overrides are for the command line, YAML and Tune's parameter space."""
    kw: dict[str, Any] = {}
    for name, values in sections.items():
        current = getattr(cfg, name)
        kw[name] = dataclasses.replace(current, **values) if dataclasses.is_dataclass(current) else values
    return dataclasses.replace(cfg, **kw)


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Return a new validated config with dotted `key=value` overrides applied (unknown keys raise)."""
    d = cfg.to_dict()
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r}: expected key=value, for example optim.lr=3e-4")
        key, value = item.split("=", 1)
        node: Any = d
        parts = key.strip().split(".")
        for i, p in enumerate(parts):
            if not isinstance(node, dict) or p not in node:
                _fail(key, "unknown key")
            if i == len(parts) - 1:
                if isinstance(node[p], dict):
                    _fail(key, "is a section; set one of its fields")
                node[p] = value
            else:
                node = node[p]
    return Config.from_dict(d)


def set_dotted(d: dict[str, Any], key: str, value: Any) -> None:
    """Set `a.b.c` in a nested dict in place (used for Tune spaces over dotted keys)."""
    parts = key.split(".")
    for p in parts[:-1]:
        if p not in d or not isinstance(d[p], dict):
            _fail(key, "unknown key")
        d = d[p]
    if parts[-1] not in d:
        _fail(key, "unknown key")
    d[parts[-1]] = value


def to_yaml(cfg: Config) -> str:
    import yaml

    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
