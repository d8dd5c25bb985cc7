"""Named configs as plain functions; each returns a validated Config."""

from __future__ import annotations

from collections.abc import Callable

from raypatch.config import (
    CheckpointConfig,
    Config,
    DataConfig,
    EvalConfig,
    ModelConfig,
    OptimConfig,
    PatchConfig,
    ScaleConfig,
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
        scale=ScaleConfig(num_workers=2, zero_stage=2, precision="fp32", cpus_per_worker=1.0),
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
        scale=ScaleConfig(num_workers=8, use_gpu=True, zero_stage=2, precision="bf16"),
        checkpoint=CheckpointConfig(name="paper-370m", every_steps=1000, max_failures=3),
        eval=EvalConfig(every_steps=1000, max_rows=256),
        log_every=10,
    )


PRESETS: dict[str, Callable[[], Config]] = {"tiny": tiny, "demo": demo, "paper-370m": paper_370m}


def get(name: str) -> Config:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})")
    return PRESETS[name]()
