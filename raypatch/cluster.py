"""The local Ray cluster raypatch starts (or the one it joins), and keeping Ray's own output quiet."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from raypatch.console import say

START_ATTEMPTS = 3
RETRY_S = 10
_started: list[bool] = []  # init_ray connected this process: end_ray may shut it down


def quiet_env() -> None:
    for k, v in {"RAY_USAGE_STATS_ENABLED": "0", "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0",
                 "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1", "TOKENIZERS_PARALLELISM": "false"}.items():
        os.environ.setdefault(k, v)


def init_ray(num_cpus: int | None = None, *, dashboard: bool = True) -> None:
    """Attach to the cluster in RAY_ADDRESS (e.g. under `ray job submit`), else start a private local one.

    A local cluster gets more logical CPUs than Train workers take, so Ray Data's read tasks always have room
    (with every CPU held by Train workers, Ray Data waits forever). The dashboard binds to 127.0.0.1; a command
    that runs only Ray Data (`raypatch prepare`) goes without it: Train V2 and Tune need it, Ray Data does not,
    and its nine processes add to every start and stop.
    """
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        say(f"connecting to the Ray cluster at {os.environ['RAY_ADDRESS']}")
        ray.init(log_to_driver=True)
    else:
        n = num_cpus or local_cpus()
        say(f"starting a local Ray cluster ({n} logical CPUs, 127.0.0.1 only)")
        start_local_ray(n, dashboard=dashboard)
    _started.append(True)


def local_cpus() -> int:
    """The logical CPUs of the local cluster init_ray starts: two more than the cores, at least 4."""
    return max(4, (os.cpu_count() or 2) + 2)


def worker_resources(cfg: Any) -> dict[str, float]:
    """One Train worker's Ray resources (its GPU, with scale.use_gpu, comes on top)."""
    res = {"CPU": cfg.scale.cpus_per_worker}
    for item in filter(None, cfg.scale.worker_resources.split(",")):
        name, _, amount = item.partition("=")
        res[name.strip()] = float(amount)
    return res


def kernel_env(cfg: Any) -> dict[str, str]:
    """The environment that pins a CPU run's kernels (scale.cpu_kernels=avx2), for its Train workers.

    fp32 sums round differently in AVX-512 and AVX2 code (softmax, attention and the fused AdamW in torch, the
    matrix products in MKL), and a few hundred steps amplify a last-digit difference into percents of perplexity:
    unpinned, the same run gives another table on another CPU model. Both variables are read when a process first
    computes, so they go into the workers' environment at start. Only on x86: elsewhere torch knows no 'avx2'."""
    import platform

    if cfg.scale.use_gpu or cfg.scale.cpu_kernels == "native" or platform.machine().lower() not in ("x86_64", "amd64"):
        return {}
    # MKL's conditional numerical reproducibility: its AVX2 branch on every CPU (it picks AVX-512 on Intel's).
    return {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2"}


def room_needed(cfg: Any) -> dict[str, float]:
    """What a run holds at once: its fewest workers' resources, plus a read task's CPU for Ray Data (with every
    CPU held by Train workers, Ray Data's reads never get one and the run hangs)."""
    n = cfg.scale.min_workers or cfg.scale.num_workers
    need = {k: v * n for k, v in worker_resources(cfg).items()}
    if cfg.scale.use_gpu:
        need["GPU"] = need.get("GPU", 0.0) + n
    need["CPU"] += cfg.data.read_cpus
    return need


def check_room(cfg: Any) -> None:
    """Fail at once, naming what is missing, when the run can never start: on the local cluster raypatch
    starts (or started), which never grows. On a cluster it joined, an autoscaler may add nodes: one line says
    what the cluster lacks now (pending_lines follows up while the run waits)."""
    import ray

    from raypatch.safety import InputError

    joined = bool(os.environ.get("RAY_ADDRESS")) or (ray.is_initialized() and not _started)
    if ray.is_initialized():
        have = ray.cluster_resources()
    elif joined:
        return  # connecting is init_ray's; it calls nothing here
    else:  # before the local cluster starts: its CPUs are known, and it has no custom resources
        have = {"CPU": float(local_cpus())}
        if cfg.scale.use_gpu:
            import torch

            have["GPU"] = float(torch.cuda.device_count())
    need = room_needed(cfg)
    short = {k: v for k, v in need.items() if v > have.get(k, 0.0) + 1e-9}
    if not short:
        return
    n = cfg.scale.min_workers or cfg.scale.num_workers
    what = "; ".join(f"{k} {need[k]:g} (has {have.get(k, 0.0):g})" for k in short)
    parts = [f"{n} worker(s) x {worker_resources(cfg)}" + (" + 1 GPU each" if cfg.scale.use_gpu else "")]
    if "CPU" in short:
        parts.append(f"{cfg.data.read_cpus:g} CPU for Ray Data's reads (data.read_cpus)")
    if joined:
        say(f"the Ray cluster lacks {what} for {' + '.join(parts)} now; the run waits for an autoscaler to add "
            f"nodes (a fixed cluster never will: then lower scale.num_workers or set scale.min_workers)")
        return
    raise InputError(f"scale.num_workers={cfg.scale.num_workers}: the run needs {what} on this machine's local Ray "
                     f"cluster, for {' + '.join(parts)}; lower scale.num_workers or scale.cpus_per_worker, or run "
                     f"on a cluster (RAY_ADDRESS)")


@contextlib.contextmanager
def pending_lines(say: Callable[[str], None], every_s: float = 60.0, after_s: float = 30.0) -> Iterator[None]:
    """While the body runs, one line every `every_s` seconds once a placement group (a Train worker group asks
    for one) has waited `after_s` for resources: what it waits for, since when, and what is free."""
    import ray

    stop = threading.Event()
    first_seen: dict[str, float] = {}

    def watch() -> None:
        last = 0.0
        while not stop.wait(min(5.0, after_s)):
            try:
                table = ray.util.placement_group_table()
            except Exception:  # noqa: BLE001 - a cluster going down: the run reports that itself
                continue
            now = time.monotonic()
            pending = {k: v for k, v in table.items() if v.get("state") in ("PENDING", "RESCHEDULING")}
            for k in pending:
                first_seen.setdefault(k, now)
            waiting = [(now - first_seen[k], v) for k, v in pending.items() if now - first_seen[k] >= after_s]
            if waiting and now - last >= every_s:
                last = now
                age, pg = max(waiting, key=lambda x: x[0])
                bundles = list((pg.get("bundles") or {}).values())
                asked = f"{len(bundles)} x {bundles[0]}" if bundles else "resources"
                free = {k: round(v, 2) for k, v in ray.available_resources().items()
                        if k in ("CPU", "GPU") or k in (bundles[0] if bundles else {})}
                say(f"waiting {age:.0f} s for the cluster to place {asked} (free now: {free}); an autoscaling "
                    f"cluster adds nodes for it, a fixed one never will")

    t = threading.Thread(target=watch, daemon=True, name="raypatch-pending")
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join(timeout=10)


def start_local_ray(num_cpus: int, *, log_to_driver: bool = True, dashboard: bool = True) -> None:
    """Start a private local Ray cluster, its dashboard on 127.0.0.1 at a free port of its own.

    RAY_API_SERVER_ADDRESS (unless already set) points this cluster's processes, which inherit the driver's
    environment, at that dashboard. Without it, Ray Train V2's placement-group cleaner looks the Train controller
    up through the State API of whichever Ray instance it finds on the host; with a second cluster on the same
    machine it can ask the wrong one, take the controller for dead and remove a healthy run's placement group.
    The variable also overrides the address of any JobSubmissionClient or State API call made from this
    process, which then reach this cluster.
    """
    import socket

    # Every port of a private cluster on loopback: with ENABLE_RAY_CLUSTER off (Ray's own single-machine mode,
    # the default on macOS and Windows) the node IP is 127.0.0.1 and the GCS, raylet, workers, dashboard agent,
    # runtime-env agent and metrics servers all bind to it (tests/test_safety.py checks every listening socket
    # of the cluster). `_node_ip_address="127.0.0.1"` does not do it: Ray swaps a localhost value for the host's IP.
    # Ray reads the variable at import; the constant covers a process that imported ray already.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False
    port = None
    if dashboard and not os.environ.get("RAY_API_SERVER_ADDRESS"):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    for attempt in range(1, START_ATTEMPTS + 1):
        try:
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=dashboard, dashboard_host="127.0.0.1",
                     dashboard_port=port, log_to_driver=log_to_driver, logging_level="warning")
            return
        except Exception as e:  # noqa: BLE001 - "node timed out during startup" on a busy machine
            ray.shutdown()
            why = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
            if attempt == START_ATTEMPTS:
                from raypatch.safety import InputError

                raise InputError(f"the local Ray cluster did not start in {START_ATTEMPTS} attempts ({why}); "
                                 f"the machine may be overloaded: retry when it is quieter") from None
            say(f"raypatch: the local Ray cluster did not start ({why}); retrying in {RETRY_S} s "
                f"(attempt {attempt + 1}/{START_ATTEMPTS})", err=True)
            time.sleep(RETRY_S)


def end_ray() -> None:
    """Shut Ray down and end every process this command started (raylet, GCS, workers, the Train controller),
    also after Ctrl-C or an error: a worker busy in C++ can outlive its raylet and would be orphaned."""
    import ray

    if not _started or not ray.is_initialized():
        return  # a Ray session the caller owns (a test's fixture, a notebook) stays up
    _started.clear()
    try:
        import psutil

        ours = psutil.Process().children(recursive=True)
    except Exception:  # noqa: BLE001 - psutil comes with Ray; without it, ray.shutdown alone
        ours = []
    # Training workers first, at once: after Ctrl-C or an error, ray.shutdown takes seconds in which they would
    # go on training (and saving). What they leave is never counted: a checkpoint counts once committed.
    for p in ours:
        try:
            if "RayTrainWorker" in p.name() or any("RayTrainWorker" in a for a in p.cmdline()[:1]):
                p.kill()
        except psutil.Error:
            pass
    ray.shutdown()
    # What ray.shutdown left running (dashboard modules, idle workers) would exit on its own within seconds;
    # asking now saves those seconds at the end of every command.
    alive = [p for p in ours if p.is_running()]
    for p in alive:
        try:
            p.terminate()
        except psutil.Error:
            pass
    if alive:
        _, alive = psutil.wait_procs(alive, timeout=5)
        for p in alive:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(alive, timeout=5)
    from raypatch.checkpoint import sweep_temp_copies

    sweep_temp_copies()  # local checkpoint copies of the workers just ended


def quiet_worker_logs() -> None:
    """Keep the worker's output to our one line per log interval: Ray Data, Train and DeepSpeed say a lot."""
    import logging

    names = ["ray.data", "ray.train", "DeepSpeed", "deepspeed", "torch.distributed"]
    try:  # Train V2 logs every report at INFO under a logger named by its file path, not "ray.train"
        from ray.train.v2._internal.execution import context

        names.append(context.__file__)
    except ImportError:
        pass
    for name in names:
        logging.getLogger(name).setLevel(logging.WARNING)
    import warnings

    # torch.distributed's deprecation notices about APIs DeepSpeed calls: nothing a user can act on.
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
