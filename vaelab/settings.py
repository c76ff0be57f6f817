"""Run settings that are not a model, loss, schedule or data set: the trainer, the device,
seeding, and the targets a config may instantiate."""

import logging
import math
import random
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from vaelab.errors import ConfigError

log = logging.getLogger(__name__)

# Hydra 1.4's execution whitelist: configs and command-line overrides may instantiate only
# these targets. Anything else (os.system, subprocess.*, builtins...) is refused at compose
# time with a message naming the key.
TRUSTED_TARGETS: tuple[str, ...] = (
    "vaelab.*",
    "torch.optim.Adam",
    "torch.optim.AdamW",
    "torch.optim.SGD",
    "optuna.pruners.*",  # sweep.pruner
)


@dataclass
class TrainerSettings:
    """How to train: built from `conf/trainer/*.yaml`, so a misspelt key fails at instantiate."""

    optimizer: partial  # a torch.optim class with its settings, waiting for the parameters
    epochs: int = 20  # full passes over the training split
    batch_size: int = 64  # samples per optimiser step
    lr: float = 1e-3  # peak learning rate; cosine decay runs from it to lr * min_lr_ratio
    min_lr_ratio: float = 0.01  # the cosine floor as a fraction of lr
    patience: int | None = (
        10  # epochs without a better validation loss before stopping; None: never
    )
    grad_clip: float | None = 5.0  # max global gradient norm (seed 004 recommends 5.0); None: off
    device: str = "auto"  # "auto" picks CUDA when present, else CPU; or "cpu", "cuda", "cuda:1"
    num_threads: int | None = None  # torch CPU threads; None keeps torch's default

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"trainer.epochs must be ≥ 1, got {self.epochs}")
        if self.batch_size < 2:
            raise ConfigError(f"trainer.batch_size must be ≥ 2 (BatchNorm), got {self.batch_size}")


def resolve_device(name: str) -> torch.device:
    """`auto` means CUDA when this machine has it, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"trainer.device={name} but this machine has no CUDA device")
    return device


def seed_everything(seed: int) -> None:
    """Seed every random stream once, at the top of the run (cleanrl habit)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds CUDA too


def cosine_lr(progress: float, lr: float, min_lr_ratio: float) -> float:
    """Cosine decay from lr to lr * min_lr_ratio as `progress` goes from 0 to 1 (Loshchilov &
    Hutter 2017, without restarts): a pure function, like nanoGPT's get_lr."""
    progress = min(max(progress, 0.0), 1.0)
    min_lr = lr * min_lr_ratio
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))
