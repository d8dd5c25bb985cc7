"""What keeps a user's files safe: one-line input errors, output-path guards, atomic directory replacement
and a pickle-free loader for checkpoint files.

Rules every command follows (README "Safety"):
- An output is built in a temporary sibling (`.<name>.tmp-<pid>`) and renamed into place when complete.
- An output path that is, contains or lies inside one of the command's inputs is refused.
- An existing output is replaced only when the user asked for it (`--overwrite`) *and* it holds nothing but
  what raypatch itself writes there, each file proven by its name and its content (a list in a file anyone can
  edit proves nothing); anything else in it is named in the error and left alone.
- Checkpoint files are unpickled by torch's restricted unpickler (`weights_only=True`) with an allow-list of
  the few DeepSpeed types they carry, so a crafted checkpoint cannot run code.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any


class InputError(ValueError):
    """Bad user input: the message names the file, line, field or checkpoint. The CLI prints it on one line."""


def one_line(msg: str) -> str:
    """Collapse a message to one line (the CLI's `raypatch: error: ...` contract)."""
    return " | ".join(part.strip() for part in str(msg).strip().splitlines() if part.strip())


def check_name(value: str, field: str) -> str:
    """A run or experiment name must be one plain path component: it becomes a directory under storage, part of
    file names and a Ray Train/Tune tag (ASCII only). The rule is config.NAME_RULE, as for checkpoint.name."""
    from raypatch.config import NAME_RULE, is_plain_name

    if not is_plain_name(value):
        raise InputError(f"{field}: {value!r} is not a plain name (one path component: {NAME_RULE})")
    return value


def _resolve(p: str | Path) -> Path:
    return Path(p).expanduser().resolve()


def foreign_entries(d: Path, owned: set[str]) -> list[str]:
    """Paths under `d` (relative, '/'-separated) that are not in `owned` nor a directory leading to one:
    what raypatch did not write there. Symbolic links are never followed and never count as owned (raypatch
    writes none)."""
    parents = {p.as_posix() for o in owned for p in Path(o).parents}  # every folder on the way to an owned file
    out = []
    for root, dirs, files in os.walk(d, followlinks=False):
        base = Path(root).relative_to(d)
        for name in sorted(dirs):
            rel = (base / name).as_posix()
            if rel not in parents or (Path(root) / name).is_symlink():
                out.append(rel + "/")
        dirs[:] = [n for n in dirs if (base / n).as_posix() in parents and not (Path(root) / n).is_symlink()]
        out += [(base / n).as_posix() for n in sorted(files)
                if (base / n).as_posix() not in owned or (Path(root) / n).is_symlink()]
    return sorted(out)


def first_few(names: list[str], n: int = 3) -> str:
    """'a, b, c and 4 more': the first names of a list, for a one-line error."""
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def check_replaceable(out: str | Path, *, overwrite: bool, owned: Callable[[Path], set[str]], what: str,
                      flag: str = "--out") -> None:
    """An existing output may be replaced only with --overwrite, and only if everything in it is provably
    what raypatch wrote there: `owned(out)` lists those files, relative to `out`, each proven by its name
    *and* its content (a Parquet shard's footer mark, a JSON file's keys, a safetensors header that fits the
    config; see shards.shard_set_files, prepare.tokenizer_files, checkpoint.export_files), never by a list
    in a file that anyone can edit alone. What cannot be proven is named and nothing is changed."""
    o = Path(out)
    if not o.exists() and not o.is_symlink():
        return
    if not o.is_dir() or o.is_symlink():
        raise InputError(f"{flag} {out}: exists and is not a directory; choose a new path (nothing was changed)")
    if not any(o.iterdir()):
        return
    foreign = foreign_entries(o, owned(o))
    if foreign:
        raise InputError(f"{flag} {out}: holds {first_few(foreign)}, which raypatch did not write there (by name "
                         f"and content); choose a new or empty directory (nothing was changed)")
    if not overwrite:
        raise InputError(f"{flag} {out}: already holds {what} (pass --overwrite to replace it)")


def files_under(d: Path) -> list[str]:
    """Every file under `d`, relative and sorted (what an output records as its own)."""
    return sorted(Path(r, n).relative_to(d).as_posix() for r, _, fs in os.walk(d) for n in fs)


# --- proving a file is raypatch's own (check_replaceable's `owned`) --------------------------------------

def read_own(path: Path) -> bytes | None:
    """A regular file's bytes, or None for a symbolic link (raypatch writes none), a missing or unreadable
    file: what cannot be read cannot be proven raypatch's."""
    try:
        return None if path.is_symlink() or not path.is_file() else path.read_bytes()
    except OSError:
        return None


def json_object(data: bytes | None) -> dict[str, Any] | None:
    """The JSON object `data` holds, or None (absent, not UTF-8 JSON, or not an object)."""
    import json

    try:
        v = json.loads(data) if data is not None else None
    except ValueError:
        return None
    return v if isinstance(v, dict) else None


SPECIAL_TOKEN_KEYS = {"bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token",
                      "additional_special_tokens"}


def tokenizer_file_ok(name: str, data: bytes | None) -> bool:
    """Whether `data` is what a Hugging Face tokenizer directory holds under `name` (shards.TOKENIZER_FILES):
    tokenizer.json that the `tokenizers` library parses; JSON objects with the keys transformers writes; a
    SentencePiece model that parses as its protobuf; text files that decode as UTF-8 in their line format. A
    name this does not know is not proven."""
    if data is None:
        return False
    if name == "tokenizer.json":
        from tokenizers import Tokenizer

        try:
            Tokenizer.from_str(data.decode())
        except Exception:  # the Rust parser's errors carry no common type
            return False
        return True
    if name.endswith(".json"):
        obj = json_object(data)
        if obj is None:
            return False
        if name == "tokenizer_config.json":  # never remote code (auto_map): raypatch refuses to copy that
            return "auto_map" not in obj and bool({"tokenizer_class", "model_max_length", "added_tokens_decoder",
                                                   *SPECIAL_TOKEN_KEYS} & set(obj))
        if name == "special_tokens_map.json":
            return bool(obj) and set(obj) <= SPECIAL_TOKEN_KEYS
        if name.startswith("chat_template"):
            return isinstance(obj.get("chat_template"), (str, list))
        # added_tokens.json, vocab.json: token -> id
        return bool(obj) and all(isinstance(v, int) and not isinstance(v, bool) for v in obj.values())
    if name.endswith(".model"):
        return _sentencepiece_ok(data)
    try:
        text = data.decode()
    except UnicodeDecodeError:
        return False
    lines = [ln for ln in text.splitlines() if ln and not ln.startswith("#version")]
    if "\0" in text or not lines:
        return False
    if name == "merges.txt":  # "a b" pairs
        return all(len(ln.split(" ")) == 2 for ln in lines)
    if name.endswith(".tiktoken"):  # "<base64 token> <rank>"
        return all(re.fullmatch(r"[A-Za-z0-9+/=]+ \d+", ln) for ln in lines)
    return True  # vocab.txt and the like, a chat template (.jinja): UTF-8 text


def _varint(data: bytes, i: int) -> tuple[int, int]:
    v = shift = 0
    while True:
        if i >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        b = data[i]
        v |= (b & 0x7F) << shift
        i, shift = i + 1, shift + 7
        if b < 0x80:
            return v, i


def _protobuf_fields(data: bytes) -> list[tuple[int, int, bytes | int]]:
    """(field, wire type, value) of a protobuf message; ValueError unless it is well formed to its last byte."""
    out: list[tuple[int, int, bytes | int]] = []
    i = 0
    while i < len(data):
        key, i = _varint(data, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            v, i = _varint(data, i)
            out.append((field, wire, v))
        elif wire in (1, 5):
            n = 8 if wire == 1 else 4
            if i + n > len(data):
                raise ValueError("truncated")
            out.append((field, wire, data[i:i + n]))
            i += n
        elif wire == 2:
            n, i = _varint(data, i)
            if i + n > len(data):
                raise ValueError("truncated")
            out.append((field, wire, data[i:i + n]))
            i += n
        else:
            raise ValueError(f"wire type {wire}")
        if field == 0:
            raise ValueError("field 0")
    return out


def _sentencepiece_ok(data: bytes) -> bool:
    """A SentencePiece ModelProto (tokenizer.model, spiece.model): pieces (field 1), each a message whose
    field 1 is its UTF-8 piece, and the other fields of the format (2-5); well formed to the last byte."""
    try:
        fields = _protobuf_fields(data)
        pieces = [v for f, _, v in fields if f == 1 and isinstance(v, bytes)]
        if not pieces or any(f not in (1, 2, 3, 4, 5) or w != 2 for f, w, _ in fields):
            return False
        for p in pieces:
            text = [v for f, w, v in _protobuf_fields(p) if f == 1 and isinstance(v, bytes)]
            if len(text) != 1:
                return False
            text[0].decode()
    except (ValueError, UnicodeDecodeError):
        return False
    return True


SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                     "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


def safetensors_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]] | None:
    """{tensor name: (dtype, shape)} of a safetensors file whose header parses and whose tensors tile its data
    exactly (each the size its dtype and shape make, back to back to the last byte); None for anything else.
    Reads the header only."""
    import json

    try:
        if path.is_symlink() or not path.is_file():
            return None
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or n > min(size - 8, 100 << 20):
                return None
            header = json.loads(f.read(n))
    except (OSError, ValueError):
        return None
    if not isinstance(header, dict):
        return None
    out, spans = {}, []
    for name, t in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (a, b) = t["dtype"], tuple(int(x) for x in t["shape"]), t["data_offsets"]
            numel = 1
            for x in shape:
                numel *= x
            if b - a != numel * SAFETENSORS_BYTES[dtype] or min(shape, default=0) < 0:
                return None
        except (KeyError, TypeError, ValueError):
            return None
        out[name] = (dtype, shape)
        spans.append((a, b))
    spans.sort()
    end = 0
    for a, b in spans:
        if a != end:
            return None
        end = b
    return out if end == size - 8 - n else None


def temp_sibling(out: str | Path) -> Path:
    """A fresh temporary directory next to `out`, on the same filesystem so that rename is atomic."""
    o = _resolve(out)
    o.parent.mkdir(parents=True, exist_ok=True)
    tmp = o.parent / f".{o.name}.tmp-{os.getpid()}"
    if tmp.exists():  # left by a crashed run of this same process id: ours by name
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def replace_dir(tmp: Path, out: str | Path) -> Path:
    """Move the finished `tmp` to `out`. An existing `out` (already checked by check_replaceable) is renamed
    aside first and removed only after the new one is in place."""
    o = _resolve(out)
    old = None
    if o.exists():
        if o.is_dir() and not any(o.iterdir()):
            o.rmdir()
        else:
            old = o.parent / f".{o.name}.old-{os.getpid()}"
            os.replace(o, old)
    os.replace(tmp, o)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return o


@contextlib.contextmanager
def building(out: str | Path) -> Iterator[Path]:
    """`with building(out) as tmp:` write into tmp; on error tmp is removed and `out` is untouched."""
    tmp = temp_sibling(out)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --- loading checkpoint files without running code -----------------------------------------------------

# What DeepSpeed 0.19 puts into its checkpoint files besides tensors and plain containers (found by loading
# ZeRO-1/2/3 fp32/bf16 checkpoints and their universal conversion with weights_only=True).
SAFE_GLOBALS: list[str] = [
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",  # the (static, 1.0) loss scaler's plain attributes
    "deepspeed.runtime.zero.config.ZeroStageEnum",  # an Enum
    "deepspeed.utils.tensor_fragment.fragment_address",  # a dataclass of two ints
]


def _safe_globals() -> list[Any]:
    import importlib

    out = []
    for name in SAFE_GLOBALS:
        mod, _, attr = name.rpartition(".")
        try:
            obj = importlib.import_module(mod)
            for part in attr.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError):
            continue
        out.append(obj)
    return out


@contextlib.contextmanager
def restricted_torch_load() -> Iterator[None]:
    """Inside this block every `torch.load` (DeepSpeed's too) uses torch's restricted unpickler with the
    allow-list above, whatever `weights_only` the caller passed: a crafted file raises UnpicklingError."""
    import torch

    original = torch.load

    def load(*args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        return original(*args, **kwargs)

    # The environment variable also reaches a `torch.load` bound at import time (torch reads it every call
    # and it overrides weights_only=False); the wrapper covers torch versions that do not read it.
    old_env = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    torch.load = load
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            yield
    finally:
        torch.load = original
        if old_env is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = old_env


def unpickle_error(e: BaseException, where: str) -> InputError:
    """The one-line refusal for a checkpoint file that holds more than tensors and plain containers."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    # torch's message opens with advice to load it anyway; the line naming the refused global is the one to show
    first = next((ln for ln in lines if "Unsupported global" in ln or "Unsupported operand" in ln),
                 lines[-1] if lines else type(e).__name__)
    return InputError(f"checkpoint {where}: a file holds objects outside the tensor allow-list, refusing to load "
                      f"it (loading could run code): {first[:200]}")


def _chain(e: BaseException) -> Iterator[BaseException]:
    """e and every exception behind it: causes, contexts and the `cause` Ray's wrappers carry."""
    seen = set()
    stack: list[BaseException | None] = [e]
    while stack:
        x = stack.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        yield x
        stack += [x.__cause__, x.__context__, getattr(x, "cause", None)]


def find_os_error(e: BaseException, errno_: int) -> OSError | None:
    """An OSError with this errno behind Ray's wrappers (the remote exception, or only its text in the remote
    traceback: then an OSError without a file name)."""
    for x in _chain(e):
        if isinstance(x, OSError) and x.errno == errno_:
            return x
    text = f"[Errno {errno_}] {os.strerror(errno_)}"
    if text in str(e):
        path = re.search(re.escape(text) + r": '([^']+)'", str(e))
        return OSError(errno_, os.strerror(errno_), path.group(1) if path else None)
    # Rust libraries (safetensors, tokenizers) raise their own types with the OS error in the text.
    if any(f"(os error {errno_})" in str(x) for x in _chain(e)):
        return OSError(errno_, os.strerror(errno_))
    return None


def free_space_note(paths: Iterable[tuple[str, str]]) -> str:
    """'free: 0 B at /data (checkpoint.storage_path), 12.3 GB at /tmp (temporary files)' for the local ones of
    (path, what) pairs, one per file system (the nearest existing folder of each path is measured)."""
    seen, parts = set(), []
    for path, what in paths:
        if not path or "://" in path:
            continue
        p = Path(path).expanduser().absolute()
        while not p.exists() and p != p.parent:
            p = p.parent
        try:
            dev = p.stat().st_dev
            free = shutil.disk_usage(p).free
        except OSError:
            continue
        if dev in seen:
            continue
        seen.add(dev)
        parts.append(f"{free / 2**30:.2f} GiB at {p} ({what})" if free >= 2**20 else f"{free:,} bytes at {p} ({what})")
    return "free: " + ", ".join(parts) if parts else ""


def find_input_error(e: BaseException) -> InputError | None:
    """Our InputError behind Ray's wrappers (RayTaskError duals carry the remote traceback in str())."""
    for x in _chain(e):
        if isinstance(x, InputError):
            lines = [ln for ln in str(x).splitlines() if "InputError: " in ln]
            return InputError(lines[-1].split("InputError: ", 1)[1] if lines else str(x))
    lines = [ln for ln in str(e).splitlines() if "InputError: " in ln]
    return InputError(lines[-1].split("InputError: ", 1)[1]) if lines else None


REMOTE_CODE_FILES = ("config.json", "tokenizer_config.json")
"""Where a Hugging Face directory names Python code of its own (`auto_map`) for the Auto classes to import."""


def check_no_remote_code(d: str | Path, label: str) -> None:
    """Refuse a directory whose config.json or tokenizer_config.json names code of its own (`auto_map`).

    transformers would import that code (a module file in the directory, or one from the Hub), asking on the
    terminal first when trust_remote_code is left unset. raypatch passes trust_remote_code=False everywhere;
    this check says so in one line naming the file, before anything is loaded. A file that is not valid JSON
    is left to the loader, which cannot read it either (so runs nothing from it)."""
    for name in REMOTE_CODE_FILES:
        f = Path(d).expanduser() / name
        try:
            data = json.loads(f.read_text(encoding="utf-8")) if f.is_file() else None
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("auto_map"):
            from transformers.models.auto.configuration_auto import CONFIG_MAPPING

            named = data["auto_map"]
            shown = ", ".join(f"{k} -> {v}" for k, v in named.items()) if isinstance(named, dict) else str(named)
            kind = data.get("model_type")
            # Some Hub repositories ship their own copy of an architecture transformers now builds (Phi-3's did).
            fix = (f"its model_type {kind!r} is built into transformers: remove auto_map from {name} to use that"
                   if name == "config.json" and isinstance(kind, str) and kind in CONFIG_MAPPING
                   else "use an architecture and tokenizer built into transformers")
            raise InputError(f"{label}: {f} names remote code (auto_map: {shown[:160]}); raypatch runs no code "
                             f"from model or tokenizer directories (trust_remote_code=False): {fix}")
