"""Stationary AR(1) noise: the one autocorrelated noise of vaelab's synthetic data sets."""

import math

import numpy as np
from scipy.signal import lfilter


def ar1(
    rng: np.random.Generator, n_steps: int, shape: tuple[int, ...], phi: float, sd: float
) -> np.ndarray:
    """Stationary AR(1) series x_t = phi x_(t-1) + e_t, float64 (n_steps, *shape), time on axis 0.

    Every series of `shape` is independent. The innovations e_t ~ N(0, sd² (1 - phi²)) and the
    value before t = 0 is drawn from the stationary law N(0, sd²), so every step has the
    stationary variance sd² (1 - phi²) / (1 - phi²) = sd² and the lag-k autocorrelation is
    phi^k: no burn-in, and no transient at the start of a record.
    """
    if not -1.0 < phi < 1.0:
        raise ValueError(f"ar1: phi must lie in (-1, 1) for a stationary series, got {phi}")
    innovations = rng.standard_normal((n_steps, *shape)) * (sd * math.sqrt(1.0 - phi**2))
    before_start = rng.standard_normal(shape) * sd
    # lfilter runs the recursion in C along time; zi is the filter state phi * x_(-1).
    out, _ = lfilter([1.0], [1.0, -phi], innovations, axis=0, zi=phi * before_start[None])
    return out
