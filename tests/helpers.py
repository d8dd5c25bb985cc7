"""Helpers shared by the tests and the drill script: block audits and Ray Train's registered checkpoints."""

from __future__ import annotations

import json
from pathlib import Path


def blocks_by_step(run: Path) -> dict[str, list[int]]:
    """'phase:step' -> the blocks trained at that step by the last attempt (worker group) that ran it."""
    latest: dict[str, tuple[float, int]] = {}
    rows = records(run)
    for r in rows:
        key = f"{r['phase']}:{r['step']}"
        if key not in latest or r["t"] > latest[key][0]:
            latest[key] = (r["t"], r["attempt"])
    out: dict[str, list[int]] = {}
    for r in rows:
        key = f"{r['phase']}:{r['step']}"
        if r["attempt"] == latest[key][1]:
            out.setdefault(key, []).extend(r["blocks"])
    return {k: sorted(v) for k, v in sorted(out.items())}


def redone_steps(rows: list[dict]) -> list[int]:
    """Global steps that more than one attempt (worker group) trained: work a fault made the run do twice."""
    seen: dict[int, set[int]] = {}
    for r in rows:
        if r["rank"] == 0:
            seen.setdefault(r["global_step"], set()).add(r["attempt"])
    return sorted(s for s, attempts in seen.items() if len(attempts) > 1)


def records(run: Path) -> list[dict]:
    rows = []
    for f in sorted(run.glob("blocks-rank*.jsonl")):
        rows += [json.loads(x) for x in f.read_text().splitlines()]
    return rows


def registered(run: Path) -> list[tuple[int, int]]:
    """(global step, writing worker count) of the checkpoints Ray Train has registered (its manager snapshot)."""
    snap = run / "checkpoint_manager_snapshot.json"
    try:
        names = [c["checkpoint_dir_name"] for c in json.loads(snap.read_text()).get("checkpoint_results", [])]
    except (FileNotFoundError, json.JSONDecodeError):  # not written yet, or caught mid-write
        return []
    out = []
    for n in names:
        try:
            out.append((int(n.split("-")[1]), json.loads((run / n / "meta.json").read_text())["world_size"]))
        except FileNotFoundError:  # deleted by retention since
            pass
    return out


def step_losses(run_dir: Path) -> dict[int, float]:
    """Global step -> training loss logged at it (metrics.jsonl; log_every=1 logs every step)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "train/loss" in r:
            out[r["step"]] = r["train/loss"]
    return out


def styled_tokenizer(base_dir: str, out_dir: Path, style: str) -> str:
    """A copy of the byte-level BPE at `base_dir` with <s> and </s> added, whose post-processor adds BOS
    ("bos", as Llama-2's does), EOS ("eos"), both ("both") or nothing ("none", as GPT-2's); the "bos" one is
    saved as a LlamaTokenizer without `add_bos_token`, the way transformers 5 saves Llama-2's."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_file(str(Path(base_dir) / "tokenizer.json"))
    tok.add_special_tokens(["<s>", "</s>"])
    ids = {t: tok.token_to_id(t) for t in ("<s>", "</s>")}
    single = {"bos": "<s> $A", "eos": "$A </s>", "both": "<s> $A </s>", "none": "$A"}[style]
    tok.post_processor = processors.TemplateProcessing(single=single, special_tokens=list(ids.items()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(out_dir)
    if style == "bos":
        f = out_dir / "tokenizer_config.json"
        cfg = json.loads(f.read_text())
        cfg.pop("add_bos_token", None)
        f.write_text(json.dumps({**cfg, "tokenizer_class": "LlamaTokenizer"}))
    return str(out_dir)


def killed_then_resumed(cfg, monkeypatch, at_step: int, rank: int = 1) -> dict:
    """Train `cfg` (checkpoint.max_failures=0) with worker `rank` killed after global step `at_step`: the run
    fails; the same config trained again resumes from its last checkpoint. Returns the resumed run's summary."""
    import pytest

    from raypatch.driver import fit

    monkeypatch.setenv("RAYPATCH_KILL_AT_STEPS", str(at_step))
    monkeypatch.setenv("RAYPATCH_KILL_RANK", str(rank))
    with pytest.raises(Exception):  # noqa: B017 - Ray's worker-death error type varies by version
        fit(cfg)
    monkeypatch.delenv("RAYPATCH_KILL_AT_STEPS")
    return fit(cfg)
