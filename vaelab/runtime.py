"""Where and how a run executes: seeding, the device, and the CPU threads it may use.

Sweep workers on one host share it: each holds a slot (a file under WORKERS_DIR naming its
pid and how many trials it runs at once) for as long as it lives, whoever started it. A trial
takes cores / (trials at once on this host) threads, and `device=auto` on a host with several
GPUs takes the GPU of its worker's slot.
"""

import contextlib
import fcntl
import logging
import os
import random
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from vaelab.errors import ConfigError

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    """Seed every random stream once, at the top of the run (cleanrl habit)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds CUDA too


def resolve_device(name: str, worker_slot: int = 0) -> torch.device:
    """`auto` means CUDA when this machine has it (the GPU of this worker's slot when it has
    several), else the CPU."""
    if name == "auto":
        gpus = [f"cuda:{k}" for k in range(torch.cuda.device_count())]
        return torch.device(pick_device(gpus, worker_slot))
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(
            f"device={name}: expected auto, cpu or a CUDA device such as cuda:0"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but this machine has no CUDA device")
    return device


def pick_device(gpus: list[str], worker_slot: int) -> str:
    """One GPU per worker: slot k takes GPU k mod the number of GPUs; the CPU without any.
    A worker started with CUDA_VISIBLE_DEVICES=k sees one GPU, so it takes that one."""
    return gpus[worker_slot % len(gpus)] if gpus else "cpu"


def set_torch_threads(num_threads: int | None, n_parallel: int = 1) -> int:
    """Set the CPU threads of torch, BLAS and OpenMP (NumPy, scikit-learn) and return them.

    `num_threads` wins when given; otherwise trials running `n_parallel` at once on this
    machine share its cores, so each takes cores / n_parallel; otherwise torch keeps its own
    default (every core).
    """
    if num_threads is None and n_parallel > 1:
        num_threads = max(1, (os.cpu_count() or 1) // n_parallel)
    if num_threads:
        torch.set_num_threads(num_threads)
        # Imported here: threadpoolctl inspects every loaded library when imported.
        from threadpoolctl import threadpool_limits

        threadpool_limits(num_threads)
    return torch.get_num_threads()


def workers_dir() -> Path:
    """Where this host's sweep workers hold their slots (VAELAB_WORKERS_DIR overrides it)."""
    default = Path(tempfile.gettempdir()) / f"vaelab-workers-{os.getuid()}"
    return Path(os.environ.get("VAELAB_WORKERS_DIR", default))


@contextlib.contextmanager
def worker_slot(n_parallel: int) -> Iterator[int]:
    """Hold the lowest free slot on this host while the worker lives; yields its number.

    A slot is the file slot-<k> holding "<pid> <n_parallel>"; one whose pid is gone (a
    killed worker) is free again. Slots are taken under a lock on the folder, so two workers
    starting together never take the same one.
    """
    folder = workers_dir()
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        slot = 0
        while (holder := _slot_holder(folder / f"slot-{slot}")) and pid_alive(holder[0]):
            slot += 1
        path = folder / f"slot-{slot}"
        path.write_text(f"{os.getpid()} {n_parallel}")
    try:
        yield slot
    finally:
        if _slot_holder(path) == (os.getpid(), n_parallel):
            path.unlink(missing_ok=True)


def trials_on_this_host() -> int:
    """How many trials the live workers on this host run at once (at least 1)."""
    folder = workers_dir()
    holders = [_slot_holder(path) for path in folder.glob("slot-*")] if folder.exists() else []
    return max(1, sum(n for pid, n in filter(None, holders) if pid_alive(pid)))


def _slot_holder(path: Path) -> tuple[int, int] | None:
    """The pid and trials at once written in a slot file; None for no slot or a torn one."""
    try:
        pid, n_parallel = path.read_text().split()
        return int(pid), int(n_parallel)
    except (OSError, ValueError):
        return None


def pid_alive(pid: int | None) -> bool:
    """Whether a process with this id exists on this host."""
    if pid is None:
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, or 'unknown': benchmark figures name their host."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"
