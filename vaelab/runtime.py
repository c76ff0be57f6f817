"""Where and how a run executes: seeding, the device, and the CPU threads it may use."""

import logging
import os
import random
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


def resolve_device(name: str) -> torch.device:
    """`auto` means CUDA when this machine has it, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(
            f"device={name}: expected auto, cpu or a CUDA device such as cuda:0"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but this machine has no CUDA device")
    return device


def set_torch_threads(num_threads: int | None, n_parallel: int = 1) -> int:
    """Set torch's CPU threads and return the number in use.

    `num_threads` wins when given; otherwise trials running `n_parallel` at once on this
    machine share its cores, so each takes cores / n_parallel; otherwise torch keeps its own
    default (every core).
    """
    if num_threads is None and n_parallel > 1:
        num_threads = max(1, (os.cpu_count() or 1) // n_parallel)
    if num_threads:
        torch.set_num_threads(num_threads)
    return torch.get_num_threads()


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, or 'unknown': benchmark figures name their host."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"
