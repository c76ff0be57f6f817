"""Synthetic hourly ICU vitals with known per-patient generative factors.

Every patient's series is built from factors drawn from one seeded generator and returned in
`SampleSet.factors`, so a trained encoder can be checked against the truth (does a latent
unit track `hr_baseline`? does any latent separate `deterioration`?).

Model of one patient (t in hours from admission, c(t) = cos(2*pi*(t - circadian_phase) / 24)):
    level(t)  = baseline * (1 + trend * t / 100)              HR, SBP, RR
    rhythm    = level(t) * (1 + amplitude * c(t))              HR, SBP; RR at half the amplitude
    TEMP      = temp_baseline + 5 * amplitude * c(t)           0.1 to 0.5 degC daily swing
    event     = ramp from 0 to 1 over 24 h after the onset:    HR +30, RR +8, SBP -30,
                                                               SpO2 -6, TEMP +1.0 (septic picture)
    noise     = AR(1), phi = 0.85, scaled by noise_level, plus white measurement noise
    DBP       = 0.55 * SBP + 12 + own noise                    DBP follows SBP
    MAP       = DBP + (SBP - DBP) / 3                          the clinical estimate
"""

import logging

import numpy as np

from vaelab.data.base import SampleSet
from vaelab.data.noise import ar1
from vaelab.errors import DataError

logger = logging.getLogger(__name__)

CHANNELS = ["HR", "SBP", "DBP", "MAP", "RR", "SpO2", "TEMP"]
HR, SBP, DBP, MAP, RR, SPO2, TEMP = range(len(CHANNELS))

# Population distributions of the baselines (adult ICU, roughly): mean, sd, clip range.
_BASELINES = {
    "hr_baseline": (80.0, 12.0, 50.0, 120.0),
    "sbp_baseline": (122.0, 15.0, 85.0, 175.0),
    "rr_baseline": (16.0, 3.0, 10.0, 26.0),
    "spo2_baseline": (97.0, 1.3, 92.0, 99.5),
    "temp_baseline": (36.9, 0.3, 36.0, 38.0),
}
DETERIORATION_PREVALENCE = 0.3
DETERIORATION_RAMP_HOURS = 24.0
# Effect of a fully developed deterioration on each channel (DBP and MAP follow SBP).
_EVENT_EFFECT = {HR: 30.0, SBP: -30.0, RR: 8.0, SPO2: -6.0, TEMP: 1.0}
# Stationary sd of the AR(1) noise at noise_level = 1, in each channel's unit.
_AR_SD = {HR: 3.0, SBP: 5.0, DBP: 3.0, RR: 1.2, SPO2: 0.7, TEMP: 0.12}
_AR_PHI = 0.85
# Physiological clip ranges, so no noise draw produces an impossible reading.
_RANGES = {
    HR: (30.0, 220.0),
    SBP: (60.0, 230.0),
    DBP: (30.0, 140.0),
    RR: (4.0, 60.0),
    SPO2: (60.0, 100.0),
    TEMP: (33.0, 42.0),
}
# Share of the missing entries that come as whole-monitor dropout blocks (all channels, 4-24 h);
# the rest are single missed readings, where SBP, DBP and MAP go missing together (one cuff).
_BLOCK_SHARE = 0.4
_BLOCK_HOURS = (4, 24)


def _check_arguments(source: str, n_patients: int, seq_len: int, missing_rate: float) -> None:
    """Stop with one DataError naming the generator, the argument and what was expected."""
    if isinstance(n_patients, bool) or not isinstance(n_patients, int | np.integer):
        raise DataError(f"{source}: n_patients: expected an integer >= 1, found {n_patients!r}")
    if n_patients < 1:
        raise DataError(f"{source}: n_patients: expected an integer >= 1, found {n_patients}")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int | np.integer) or seq_len < 2:
        raise DataError(f"{source}: seq_len: expected an integer >= 2, found {seq_len!r}")
    if not 0.0 <= float(missing_rate) < 1.0:
        raise DataError(
            f"{source}: missing_rate: expected 0 <= missing_rate < 1, found {missing_rate}"
        )


def _draw_factors(rng: np.random.Generator, n: int, seq_len: int) -> dict[str, np.ndarray]:
    """Draw every per-patient generative factor, each an (n,) float64 array."""
    factors = {
        name: np.clip(rng.normal(mean, sd, n), lo, hi)
        for name, (mean, sd, lo, hi) in _BASELINES.items()
    }
    factors["circadian_amplitude"] = rng.uniform(0.02, 0.10, n)
    factors["circadian_phase"] = rng.uniform(0.0, 24.0, n)  # hour of the daily peak
    # Relative change per 100 h, clipped so a month-long stay drifts at most about 19 %.
    factors["trend"] = np.clip(rng.normal(0.0, 0.01, n), -0.025, 0.025)
    event = rng.random(n) < DETERIORATION_PREVALENCE
    # Onsets between 30 % and 80 % of the stay, so every event has a before and an after.
    lo = int(0.3 * seq_len)
    hi = max(lo + 1, int(0.8 * seq_len))
    onset = rng.integers(lo, hi, n)
    factors["deterioration"] = event.astype(np.float64)
    factors["deterioration_onset"] = np.where(event, onset, -1).astype(np.float64)
    factors["noise_level"] = rng.uniform(0.5, 1.5, n)
    return factors


def _draw_masks(rng: np.random.Generator, n: int, seq_len: int, missing_rate: float) -> np.ndarray:
    """Observation masks (n, seq_len, C), float32 1 = observed, missing at about missing_rate."""
    n_channels = len(CHANNELS)
    if missing_rate == 0.0:
        return np.ones((n, seq_len, n_channels), dtype=np.float32)
    t = np.arange(seq_len)
    mean_block = 0.5 * (_BLOCK_HOURS[0] + _BLOCK_HOURS[1])
    counts = rng.poisson(_BLOCK_SHARE * missing_rate * seq_len / mean_block, n)
    k = int(counts.max())
    in_block = np.zeros((n, seq_len), dtype=bool)
    if k > 0:
        starts = rng.integers(0, seq_len, (n, k))
        ends = starts + rng.integers(_BLOCK_HOURS[0], _BLOCK_HOURS[1] + 1, (n, k))
        valid = np.arange(k)[None, :] < counts[:, None]
        hit = (t >= starts[..., None]) & (t < ends[..., None]) & valid[..., None]
        in_block = hit.any(axis=1)
    # Single gaps fill the rest of the budget: 1 - rate = (1 - block fraction)(1 - p).
    block_fraction = float(in_block.mean())
    p = max(0.0, 1.0 - (1.0 - missing_rate) / (1.0 - block_fraction)) if block_fraction < 1 else 0.0
    gaps = rng.random((n, seq_len, n_channels)) < p
    gaps[:, :, DBP] = gaps[:, :, SBP]
    gaps[:, :, MAP] = gaps[:, :, SBP]
    return (~(in_block[..., None] | gaps)).astype(np.float32)


def _fill_missing(values: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Forward-fill unobserved entries along time; leading gaps take the first observed value."""
    observed = masks > 0
    t = np.arange(values.shape[1])[None, :, None]
    last = np.where(observed, t, -1)
    np.maximum.accumulate(last, axis=1, out=last)
    first = observed.argmax(axis=1)[:, None, :]
    last = np.where(last < 0, first, last)
    filled = np.take_along_axis(values, last, axis=1)
    # A series with no observation at all gets the cohort median of its channel: a population
    # constant, so the hidden true values of that patient do not leak into the inputs.
    never = ~observed.any(axis=1)
    if never.any():
        median = np.median(values, axis=(0, 1))
        filled = np.where(never[:, None, :], median[None, None, :], filled)
    return filled


def generate_vitals(
    n_patients: int = 256, seq_len: int = 745, missing_rate: float = 0.05, seed: int = 0
) -> SampleSet:
    """Generate N patients x seq_len hours x 7 vitals with known factors (see module docstring)."""
    source = (
        f"vitals_synthetic(n_patients={n_patients}, seq_len={seq_len}, "
        f"missing_rate={missing_rate}, seed={seed})"
    )
    _check_arguments(source, n_patients, seq_len, missing_rate)
    n, n_t = int(n_patients), int(seq_len)
    rng = np.random.default_rng(seed)
    f = _draw_factors(rng, n, n_t)

    t = np.arange(n_t, dtype=np.float64)[None, :]  # (1, T), broadcasts against (n, 1)
    col = {name: v[:, None] for name, v in f.items()}
    circadian = np.cos(2.0 * np.pi * (t - col["circadian_phase"]) / 24.0)
    drift = 1.0 + col["trend"] * t / 100.0
    ramp_hours = (t - col["deterioration_onset"]) / DETERIORATION_RAMP_HOURS
    event = col["deterioration"] * np.clip(ramp_hours, 0.0, 1.0)
    amp = col["circadian_amplitude"]

    ar_channels = list(_AR_SD)
    # Unit-variance AR(1) noise (T, n, k) -> (n, T, k), scaled per patient and channel below.
    unit_ar = ar1(rng, n_t, (n, len(ar_channels)), phi=_AR_PHI, sd=1.0).transpose(1, 0, 2)
    ar = unit_ar * col["noise_level"][..., None]
    noise = {ch: ar[:, :, i] * _AR_SD[ch] for i, ch in enumerate(ar_channels)}
    # White measurement noise on top, a third of the AR scale: readings are not smooth curves.
    white = rng.standard_normal((n, n_t, len(CHANNELS)))

    def measured(ch: int) -> np.ndarray:
        """AR(1) plus white noise of one channel, (n, T)."""
        return noise[ch] + white[:, :, ch] * _AR_SD[ch] / 3.0

    values = np.empty((n, n_t, len(CHANNELS)), dtype=np.float64)
    values[:, :, HR] = (
        col["hr_baseline"] * drift * (1 + amp * circadian) + _EVENT_EFFECT[HR] * event
    )
    values[:, :, SBP] = (
        col["sbp_baseline"] * drift * (1 + amp * circadian) + _EVENT_EFFECT[SBP] * event
    )
    values[:, :, RR] = (
        col["rr_baseline"] * drift * (1 + 0.5 * amp * circadian) + _EVENT_EFFECT[RR] * event
    )
    values[:, :, SPO2] = col["spo2_baseline"] + _EVENT_EFFECT[SPO2] * event
    values[:, :, TEMP] = col["temp_baseline"] + 5.0 * amp * circadian + _EVENT_EFFECT[TEMP] * event
    for ch in (HR, SBP, RR, SPO2, TEMP):
        values[:, :, ch] = np.clip(values[:, :, ch] + measured(ch), *_RANGES[ch])
    # DBP follows SBP (noise included: true pressure swings move both), with its own noise.
    dbp = 0.55 * values[:, :, SBP] + 12.0 + measured(DBP)
    values[:, :, DBP] = np.clip(np.minimum(dbp, values[:, :, SBP] - 10.0), *_RANGES[DBP])
    values[:, :, MAP] = values[:, :, DBP] + (values[:, :, SBP] - values[:, :, DBP]) / 3.0

    masks = _draw_masks(rng, n, n_t, float(missing_rate))
    values = _fill_missing(values, masks).astype(np.float32)
    ids = np.array([f"P{i:04d}" for i in range(n)])
    logger.info(
        "%s: %d patients x %d h x %d vitals, observed fraction %.3f, %d deteriorations",
        source,
        n,
        n_t,
        len(CHANNELS),
        masks.mean(),
        int(f["deterioration"].sum()),
    )
    return SampleSet(
        values=values,
        masks=masks,
        ids=ids,
        groups=ids.copy(),
        channel_names=list(CHANNELS),
        labels=f["deterioration"].astype(np.int64),
        factors=f,
        source=source,
    )
