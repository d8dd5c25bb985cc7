"""What keeps a user's files safe: one-line input errors, output-path guards, atomic directory replacement
and a pickle-free loader for checkpoint files.

Rules every command follows (README "Safety"):
- An output is built in a temporary sibling (`.<name>.tmp-<pid>`) and renamed into place when complete.
- An output path that is, contains or lies inside one of the command's inputs is refused.
- An existing output is replaced only when the user asked for it (`--overwrite`) *and* it holds nothing but
  what raypatch itself writes there; anything else in it is named in the error and left alone.
- Checkpoint files are unpickled by torch's restricted unpickler (`weights_only=True`) with an allow-list of
  the few DeepSpeed types they carry, so a crafted checkpoint cannot run code.
"""

from __future__ import annotations

import contextlib
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


def check_not_overlapping(out: str | Path, inputs: Iterable[tuple[str, str | Path]], flag: str) -> None:
    """Refuse an output path that is, contains or lies inside an input (given as (description, path) pairs);
    local paths and URIs alike (storage.same_place)."""
    from raypatch.storage import display, same_place

    for what, p in inputs:
        if not p:
            continue
        rel = same_place(out, p)
        if rel is not None:
            raise InputError(f"{flag} {display(out)}: {rel} the {what} {display(p) if '://' in str(p) else _resolve(p)}"
                             f"; choose an output path outside every input")


def foreign_entries(d: Path, owned: set[str]) -> list[str]:
    """Paths under `d` (relative, '/'-separated) that are not in `owned` nor a directory leading to one:
    what raypatch did not write there. Symbolic links are never followed."""
    parents = {p.as_posix() for o in owned for p in Path(o).parents}  # every folder on the way to an owned file
    out = []
    for root, dirs, files in os.walk(d, followlinks=False):
        base = Path(root).relative_to(d)
        for name in sorted(dirs):
            rel = (base / name).as_posix()
            if rel not in parents and rel not in owned:
                out.append(rel + "/")
        dirs[:] = [n for n in dirs if (base / n).as_posix() in parents]
        out += [(base / n).as_posix() for n in sorted(files) if (base / n).as_posix() not in owned]
    return sorted(out)


def check_replaceable(out: str | Path, *, overwrite: bool, owned: Callable[[Path], set[str]], what: str,
                      flag: str = "--out") -> None:
    """An existing output may be replaced only with --overwrite, and only if everything in it is what
    raypatch wrote there (`owned(out)` lists those files, relative to `out`)."""
    o = Path(out)
    if not o.exists() and not o.is_symlink():
        return
    if not o.is_dir() or o.is_symlink():
        raise InputError(f"{flag} {out}: exists and is not a directory; choose a new path (nothing was changed)")
    if not any(o.iterdir()):
        return
    foreign = foreign_entries(o, owned(o))
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise InputError(f"{flag} {out}: holds {shown}, which raypatch did not write there; choose a new or "
                         f"empty directory (nothing was changed)")
    if not overwrite:
        raise InputError(f"{flag} {out}: already holds {what} (pass --overwrite to replace it)")


def files_under(d: Path) -> list[str]:
    """Every file under `d`, relative and sorted (what an output records as its own)."""
    return sorted(Path(r, n).relative_to(d).as_posix() for r, _, fs in os.walk(d) for n in fs)


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
