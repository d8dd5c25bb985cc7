"""Tokenizer directories: loading one safely, how it separates documents, and its identity (fingerprint).

`prepare` tokenizes with it, the packer and the pre-flight checks compare fingerprints, `export` copies it and
`hfdir` checks that a model directory's tokenizer is the one its shards were made with. A tokenizer is always a
local Hugging Face directory: nothing is fetched from a hub, and none of the directory's own code runs.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from raypatch.safety import InputError, check_no_remote_code


def check_tokenizer_dir(path: str) -> Path:
    """A local tokenizer directory that names no code of its own (`auto_map`: refused, naming the file)."""
    p = Path(path)
    if not p.is_dir() or not any(p.glob("tokenizer*.json")):
        raise InputError(f"tokenizer {path}: not a local Hugging Face tokenizer directory "
                         f"(make one with `raypatch tokenizer train`)")
    check_no_remote_code(p, f"tokenizer {path}")
    return p


def load_tokenizer(path: str) -> Any:
    """A local HF tokenizer directory (nothing is fetched from a hub, no code of the directory's own runs: one
    that names some, `auto_map`, is refused with one line)."""
    from transformers import AutoTokenizer

    p = check_tokenizer_dir(path)
    try:
        tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True, trust_remote_code=False)
    except Exception as e:  # a broken tokenizer.json or config: name the directory, not a traceback
        raise InputError(f"tokenizer {path}: cannot be loaded ({type(e).__name__}: "
                         f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None
    if not getattr(tok, "is_fast", False):
        raise InputError(f"tokenizer {path}: a fast (Rust) tokenizer is required")
    return tok


PROBE = "raypatch separator probe"


def separator(tok: Any) -> dict[str, Any]:
    """How the tokenizer separates documents, decided from what it does, not from its config flags.

    A probe is encoded with and without special tokens: BOS before it (Llama-2), EOS after it, or both are
    what training rows carry around each document. A tokenizer that adds neither (GPT-2) gets EOS appended,
    GPT-2's own convention. `add_bos_token` cannot be trusted: transformers 5 drops it from
    tokenizer_config.json when a tokenizer.json exists, while the tokenizer.json post-processor still adds BOS.
    Returns {"position": "bos" | "eos" | "both", "bos": id | None, "eos": id | None, "id", "token"} where
    id/token are the separator's first special token.
    """
    plain = list(tok(PROBE, add_special_tokens=False)["input_ids"])
    full = list(tok(PROBE, add_special_tokens=True)["input_ids"])
    at = next((i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain), None)
    if at is None:
        raise InputError("tokenizer: encoding with special tokens changes the text's own tokens; cannot tell "
                         "how it separates documents")
    bos = tok.bos_token_id is not None and tok.bos_token_id in full[:at]
    eos = tok.eos_token_id is not None and tok.eos_token_id in full[at + len(plain):]
    if not bos and not eos:  # adds nothing: EOS between documents, as GPT-2 does
        if tok.eos_token_id is None:
            raise InputError("tokenizer adds no special tokens and has no EOS token; cannot separate documents")
        eos = True
    position = "both" if bos and eos else "bos" if bos else "eos"
    first = "bos" if bos else "eos"
    return {"id": getattr(tok, f"{first}_token_id"), "token": getattr(tok, f"{first}_token"), "position": position,
            "bos": tok.bos_token_id if bos else None, "eos": tok.eos_token_id if eos else None}


def separate(enc: list[int], sep: dict[str, Any], *, first: bool = True, last: bool = True) -> list[int]:
    """A document's (or piece's) ids with the separator: BOS before its first piece, EOS after its last."""
    head = [sep["bos"]] if first and sep["bos"] is not None else []
    tail = [sep["eos"]] if last and sep["eos"] is not None else []
    return head + enc + tail


def tokenizer_info(path: str) -> dict[str, Any]:
    tok = load_tokenizer(path)
    sep = separator(tok)
    canonical = tok.backend_tokenizer.to_str().encode()
    # The separator is part of the identity: the same vocabulary separated otherwise makes other rows.
    mark = f"|{sep['id']}|{sep['position']}" + (f"|{sep['eos']}" if sep["position"] == "both" else "")
    return {
        "path": str(Path(path).resolve()),
        "name": Path(path).name,
        "vocab_size": len(tok),
        "fingerprint": hashlib.sha256(canonical + mark.encode()).hexdigest(),
        "separator": sep,
    }
