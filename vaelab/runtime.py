"""Where and how a run executes: seeding, the device, its precision, and the CPU threads.

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
from dataclasses import dataclass
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


def resolve_device(name: str, worker_slot: int = 0, local_rank: int | None = None) -> torch.device:
    """`auto` means CUDA when this machine has it (the GPU of this worker's slot when it has
    several), else the CPU.

    Under torchrun (`local_rank` given, vaelab.distributed.local_rank) each rank takes its own
    GPU, cuda:LOCAL_RANK, for `auto` and `cuda`; a fixed `cuda:k` would put every rank on one
    GPU, which NCCL refuses.
    """
    if local_rank is not None and name in ("auto", "cuda") and torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"torchrun started local rank {local_rank} on a host with "
                f"{torch.cuda.device_count()} GPU(s): use --nproc_per_node ≤ the GPUs"
            )
        return torch.device(f"cuda:{local_rank}")
    if local_rank is not None and name.startswith("cuda:"):
        raise ConfigError(
            f"trainer.device={name} under torchrun would put every rank on one GPU; use "
            "trainer.device=auto (each rank takes cuda:LOCAL_RANK)"
        )
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


# trainer.precision, in PyTorch Lightning's names (`32` and `32-true` are the same thing).
PRECISIONS = ("32", "bf16-mixed", "16-mixed")
PRECISION_CHOICES = ("auto", "32", "32-true", "bf16-mixed", "16-mixed")
# /proc/cpuinfo flags of a CPU that computes bfloat16 in hardware: AVX512-BF16 (Cooper Lake,
# Zen 4 and later) and AMX-BF16 (Sapphire Rapids) on x86, the BF16 extension (ARMv8.6) on
# Arm. Without them oneDNN emulates bf16 through float32 and mixed precision is slower.
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


@dataclass(frozen=True)
class Precision:
    """The precision a run trains in, the device type it autocasts on, and why it was chosen."""

    name: str  # one of PRECISIONS
    device_type: str  # "cpu" or "cuda": what torch.autocast is given
    reason: str  # one sentence: logged, and recorded as the MLflow param trainer.precision_reason

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The dtype the train step's forward pass autocasts to; None: float32 throughout."""
        return {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(self.name)

    def autocast(self) -> torch.autocast:
        """torch.autocast for the train step (a disabled one at precision 32)."""
        dtype = self.autocast_dtype
        return torch.autocast(self.device_type, dtype=dtype, enabled=dtype is not None)


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (x86 `flags`, Arm `Features`); empty if none."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        return set()
    for line in cpuinfo.read_text().splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def native_bf16(device: torch.device) -> tuple[bool, str]:
    """Whether `device` computes bfloat16 in hardware, and what says so."""
    if device.type == "cuda":
        # including_emulation=False: pre-Ampere GPUs emulate bf16, slower than float32.
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return True, f"{torch.cuda.get_device_name(device)} has native bf16"
        return False, f"{torch.cuda.get_device_name(device)} has no native bf16"
    native = sorted(set(NATIVE_BF16_FLAGS) & cpu_flags())
    capability = torch.backends.cpu.get_cpu_capability()  # the ATen kernels' ISA, e.g. AVX512
    if native:
        return True, f"the CPU has native bf16 ({', '.join(native)}; ATen {capability})"
    return False, f"the CPU has no native bf16 (no {'/'.join(NATIVE_BF16_FLAGS)} flag)"


def resolve_precision(name: str | int, device: torch.device) -> Precision:
    """trainer.precision on this device: `auto` takes bf16-mixed where the device computes bf16
    natively, else 32; 16-mixed needs CUDA. ConfigError for anything else."""
    name = str(name)
    if name not in PRECISION_CHOICES:
        raise ConfigError(
            f"trainer.precision={name}: expected one of {', '.join(PRECISION_CHOICES)}"
        )
    if name == "auto":
        native, why = native_bf16(device)
        # Never 16-mixed: float16 needs a gradient scaler and can overflow in the forward pass,
        # which a default must not risk; bf16 has float32's exponent range.
        if native:
            return Precision("bf16-mixed", device.type, f"auto: {why}")
        return Precision("32", device.type, f"auto: {why}, so float32")
    if name == "16-mixed" and device.type != "cuda":
        raise ConfigError(
            f"trainer.precision=16-mixed needs a CUDA device, and this run is on {device}: "
            "float16 autocast on the CPU is emulated and slower; use bf16-mixed or 32"
        )
    name = "32" if name == "32-true" else name
    if name == "bf16-mixed":
        native, why = native_bf16(device)
        # Asked for, it is honoured, but a host that would emulate it is worth a warning.
        if not native:
            log.warning("trainer.precision=bf16-mixed but %s: expect it slower than 32", why)
        return Precision(name, device.type, f"set in trainer.precision; {why}")
    return Precision(name, device.type, "set in trainer.precision")


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
