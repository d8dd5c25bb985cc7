"""The local Ray cluster raypatch starts (or the one it joins), and keeping Ray's own output quiet."""

from __future__ import annotations

import os
import time

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
    from raypatch.console import say

    if os.environ.get("RAY_ADDRESS"):
        say(f"connecting to the Ray cluster at {os.environ['RAY_ADDRESS']}")
        ray.init(log_to_driver=True)
    else:
        n = num_cpus or max(4, (os.cpu_count() or 2) + 2)
        say(f"starting a local Ray cluster ({n} logical CPUs, 127.0.0.1 only)")
        start_local_ray(n, dashboard=dashboard)
    _started.append(True)


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
            from raypatch.console import say

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
