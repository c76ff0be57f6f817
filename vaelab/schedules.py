"""β and learning-rate schedules: pure functions of training progress, like nanoGPT's `get_lr(it)`.

Each schedule is called with the epoch as a float, `epoch + step / steps_per_epoch`, so the
train loop can anneal per step while the schedule holds no counter (STYLE.md habit 6).
"""

import math

from vaelab.errors import ConfigError


class ConstantBeta:
    """β fixed for the whole run."""

    def __init__(self, beta: float = 1.0) -> None:
        self.beta = beta

    def __call__(self, epoch: float) -> float:
        return self.beta


class LinearBeta:
    """β rises linearly from 0 to `beta` over `warmup_epochs`, then holds (Bowman et al. 2016)."""

    def __init__(self, beta: float = 1.0, warmup_epochs: float = 10) -> None:
        if warmup_epochs < 0:
            raise ConfigError(f"schedule.warmup_epochs must be ≥ 0, got {warmup_epochs}")
        self.beta = beta
        self.warmup_epochs = warmup_epochs

    def __call__(self, epoch: float) -> float:
        if self.warmup_epochs == 0 or epoch >= self.warmup_epochs:
            return self.beta
        return self.beta * max(epoch, 0.0) / self.warmup_epochs


class CyclicalBeta:
    """Cyclical annealing (Fu et al. 2019, NAACL): restart at 0 every `cycle_epochs`, rise
    linearly over the first `ramp_ratio` of each cycle, then hold `beta` until the restart."""

    def __init__(
        self, beta: float = 1.0, cycle_epochs: float = 40, ramp_ratio: float = 0.5
    ) -> None:
        if cycle_epochs <= 0:
            raise ConfigError(f"schedule.cycle_epochs must be > 0, got {cycle_epochs}")
        if not 0.0 < ramp_ratio <= 1.0:
            raise ConfigError(f"schedule.ramp_ratio must lie in (0, 1], got {ramp_ratio}")
        self.beta = beta
        self.cycle_epochs = cycle_epochs
        self.ramp_ratio = ramp_ratio

    def __call__(self, epoch: float) -> float:
        position = (max(epoch, 0.0) % self.cycle_epochs) / self.cycle_epochs
        return self.beta * min(position / self.ramp_ratio, 1.0)


def cosine_lr(progress: float, lr: float, min_lr_ratio: float) -> float:
    """Cosine decay from lr to lr * min_lr_ratio as `progress` goes from 0 to 1 (Loshchilov &
    Hutter 2017, without restarts): a pure function, like nanoGPT's get_lr."""
    progress = min(max(progress, 0.0), 1.0)
    min_lr = lr * min_lr_ratio
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))
