"""Synthetic ICU vitals: shapes, factors, missingness, and the factors' mark on the series.

Every input here is constructed so the right answer is known in advance.
"""

import numpy as np
import pytest
import torch

from vaelab.data.base import SampleSet
from vaelab.data.prepare import prepare
from vaelab.data.vitals_synthetic import generate_vitals
from vaelab.errors import DataError

CHANNELS = ["HR", "SBP", "DBP", "MAP", "RR", "SpO2", "TEMP"]


FACTORS = {
    "hr_baseline",
    "sbp_baseline",
    "rr_baseline",
    "spo2_baseline",
    "temp_baseline",
    "circadian_amplitude",
    "circadian_phase",
    "trend",
    "deterioration",
    "deterioration_onset",
    "noise_level",
}


HR, SBP, DBP, MAP, RR, SPO2, TEMP = range(7)


@pytest.fixture(scope="module")
def vitals() -> SampleSet:
    """The default cohort, generated once: 256 patients x 745 h x 7 vitals."""
    return generate_vitals(n_patients=256, seq_len=745, missing_rate=0.05, seed=0)


def test_generator_shapes_names_and_metadata(vitals: SampleSet) -> None:
    assert vitals.values.shape == (256, 745, 7)
    assert vitals.values.dtype == np.float32
    assert vitals.masks is not None and vitals.masks.shape == vitals.values.shape
    assert vitals.masks.dtype == np.float32
    assert vitals.channel_names == CHANNELS
    assert set(vitals.factors) == FACTORS
    for name, factor in vitals.factors.items():
        assert factor.shape == (256,), name
        assert np.issubdtype(factor.dtype, np.floating), name
        assert np.isfinite(factor).all(), name
    assert vitals.ids[0] == "P0000" and vitals.ids[255] == "P0255"
    assert np.array_equal(vitals.groups, vitals.ids)
    assert vitals.labels is not None and vitals.labels.dtype == np.int64
    assert np.array_equal(vitals.labels, vitals.factors["deterioration"].astype(np.int64))
    assert "n_patients=256" in vitals.source and "seed=0" in vitals.source


def test_generator_factor_ranges(vitals: SampleSet) -> None:
    f = vitals.factors
    assert ((f["circadian_phase"] >= 0) & (f["circadian_phase"] < 24)).all()
    assert set(np.unique(f["deterioration"])) == {0.0, 1.0}
    event = f["deterioration"] == 1
    assert (f["deterioration_onset"][~event] == -1).all()
    # Onsets between 30 % and 80 % of the stay, so every event has a before and an after.
    onset = f["deterioration_onset"][event]
    assert ((onset >= int(0.3 * 745)) & (onset < int(0.8 * 745))).all()
    assert 0.15 < event.mean() < 0.45  # prevalence 0.3


def test_generator_is_deterministic_in_seed() -> None:
    a = generate_vitals(n_patients=16, seq_len=96, seed=3)
    b = generate_vitals(n_patients=16, seq_len=96, seed=3)
    c = generate_vitals(n_patients=16, seq_len=96, seed=4)
    assert np.array_equal(a.values, b.values) and np.array_equal(a.masks, b.masks)
    assert all(np.array_equal(a.factors[k], b.factors[k]) for k in FACTORS)
    assert not np.allclose(a.values, c.values)
    assert not np.allclose(a.factors["hr_baseline"], c.factors["hr_baseline"])


def test_generator_values_finite_plausible_and_coupled(vitals: SampleSet) -> None:
    v = vitals.values
    assert np.isfinite(v).all()
    assert set(np.unique(vitals.masks)) == {0.0, 1.0}
    assert 30 <= v[..., HR].min() and v[..., HR].max() <= 220
    assert 60 <= v[..., SPO2].min() and v[..., SPO2].max() <= 100
    assert 33 <= v[..., TEMP].min() and v[..., TEMP].max() <= 42
    assert (v[..., DBP] < v[..., SBP]).all()
    # MAP = DBP + (SBP - DBP) / 3 holds at every entry, missing ones included (all forward-filled
    # together since SBP, DBP and MAP share one cuff mask).
    np.testing.assert_allclose(
        v[..., MAP], v[..., DBP] + (v[..., SBP] - v[..., DBP]) / 3, atol=1e-3
    )
    assert 70 < v[..., HR].mean() < 95 and 105 < v[..., SBP].mean() < 135


@pytest.mark.parametrize("rate", [0.0, 0.05, 0.3])
def test_generator_missing_fraction_near_rate(rate: float) -> None:
    s = generate_vitals(n_patients=64, seq_len=400, missing_rate=rate, seed=1)
    missing = 1.0 - float(s.masks.mean())
    assert abs(missing - rate) < 0.1 * rate + 1e-9


def test_generator_missing_shape_blocks_and_cuff() -> None:
    s = generate_vitals(n_patients=64, seq_len=400, missing_rate=0.2, seed=2)
    m = s.masks
    # One blood-pressure cuff: SBP, DBP and MAP are missing together.
    assert np.array_equal(m[..., SBP], m[..., DBP]) and np.array_equal(m[..., SBP], m[..., MAP])
    # HR and RR go missing independently of each other outside dropout blocks.
    assert not np.array_equal(m[..., HR], m[..., RR])
    # Dropout blocks: some runs of >= 4 hours with every channel missing.
    all_missing = (m == 0).all(axis=2).astype(int)  # (N, T)
    run4 = all_missing[:, :-3] & all_missing[:, 1:-2] & all_missing[:, 2:-1] & all_missing[:, 3:]
    assert run4.any(axis=1).sum() >= 10


def test_generator_forward_fills_missing_values(vitals: SampleSet) -> None:
    v, m = vitals.values, vitals.masks
    assert (m == 0).sum() > 1000
    # Forward fill: an unobserved entry repeats the entry before it.
    later_missing = m[:, 1:] == 0
    assert np.array_equal(v[:, 1:][later_missing], v[:, :-1][later_missing])
    # Leading gaps are back-filled from the first observation.
    first = m.argmax(axis=1)  # (N, C)
    n_idx, c_idx = np.nonzero(first > 0)
    assert len(n_idx) > 0
    for n, c in zip(n_idx[:20], c_idx[:20], strict=True):
        assert (v[n, : first[n, c], c] == v[n, first[n, c], c]).all()


def test_generator_hr_baseline_drives_hr(vitals: SampleSet) -> None:
    # First 48 h: before any deterioration onset (>= 30 % of the stay) and before much drift.
    early_hr = vitals.values[:, :48, HR].mean(axis=1)
    assert np.corrcoef(early_hr, vitals.factors["hr_baseline"])[0, 1] > 0.9
    early_temp = vitals.values[:, :48, TEMP].mean(axis=1)
    assert np.corrcoef(early_temp, vitals.factors["temp_baseline"])[0, 1] > 0.8


def test_generator_deterioration_raises_late_hr_and_lowers_spo2(vitals: SampleSet) -> None:
    event = vitals.factors["deterioration"] == 1
    v = vitals.values
    hr_change = v[:, -48:, HR].mean(axis=1) - v[:, :48, HR].mean(axis=1)
    spo2_change = v[:, -48:, SPO2].mean(axis=1) - v[:, :48, SPO2].mean(axis=1)
    assert hr_change[event].mean() > 20  # +30 bpm at full effect
    assert abs(hr_change[~event].mean()) < 5
    assert spo2_change[event].mean() < -4 < spo2_change[~event].mean()


def test_generator_circadian_phase_is_recoverable(vitals: SampleSet) -> None:
    # Least-squares fit of a 24 h cosine to each patient's HR; its peak hour is the phase.
    quiet = vitals.factors["deterioration"] == 0
    t = np.arange(745)
    w = 2 * np.pi * t / 24
    design = np.stack([np.ones_like(w), np.cos(w), np.sin(w), t / 745], axis=1)
    coef, *_ = np.linalg.lstsq(design, vitals.values[quiet, :, HR].T, rcond=None)
    peak_hour = (np.arctan2(coef[2], coef[1]) * 24 / (2 * np.pi)) % 24
    error = np.abs(peak_hour - vitals.factors["circadian_phase"][quiet])
    error = np.minimum(error, 24 - error)
    assert np.median(error) < 1.0


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"n_patients": 0}, "n_patients"),
        ({"seq_len": 1}, "seq_len"),
        ({"missing_rate": 1.0}, "missing_rate"),
        ({"missing_rate": -0.1}, "missing_rate"),
    ],
)
def test_generator_rejects_bad_arguments(kwargs: dict, key: str) -> None:
    with pytest.raises(DataError, match=rf"vitals_synthetic\(.*\): {key}: expected"):
        generate_vitals(**kwargs)


def test_generator_tiny_cohort_with_heavy_missingness_stays_finite() -> None:
    s = generate_vitals(n_patients=3, seq_len=2, missing_rate=0.9, seed=0)
    assert s.values.shape == (3, 2, 7) and np.isfinite(s.values).all()


def test_prepare_on_generated_vitals(vitals: SampleSet) -> None:
    data = prepare(vitals, 0.15, 0.15, seed=0)
    assert data.values.shape == (256, 745, 7)
    assert torch.isfinite(data.values).all()
    assert len(data.indices("val")) == round(0.15 * 256) == len(data.indices("test"))
