"""Data layer: synthetic vitals, the HDF5 reader, group splits and the normaliser.

Every input here is constructed so the right answer is known in advance.
"""

import re

import h5py
import numpy as np
import pytest
import torch

from vaelab.data.base import SampleSet
from vaelab.data.h5 import load_h5
from vaelab.data.prepare import Normaliser, PreparedData, prepare, split_by_group
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


# ----------------------------------------------------------------------------- generator


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
    assert ((f["deterioration_onset"][event] >= 0) & (f["deterioration_onset"][event] < 745)).all()
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


# ----------------------------------------------------------------------------- h5 reader


def write_h5(path, **datasets) -> str:
    """Write each keyword as one dataset; returns the path as str."""
    with h5py.File(path, "w") as f:
        for key, data in datasets.items():
            f.create_dataset(key, data=data)
    return str(path)


def seed001_file(path, n: int = 6, t: int = 5, c: int = 3, **overrides) -> str:
    """A valid file in the seed 001 layout, with any dataset replaced or removed (None)."""
    rng = np.random.default_rng(0)
    datasets = {
        "values": rng.normal(size=(n, t, c)).astype(np.float32),
        "masks": (rng.random((n, t, c)) > 0.2).astype(np.float32),
        "patient_index": np.array([f"P{i:04d}" for i in range(n)], dtype="S"),
        "vital_index": np.array(["HR", "SBP", "SPO2"][:c], dtype="S"),
        "labels": np.arange(n) % 2,
    }
    datasets.update(overrides)
    return write_h5(path, **{k: v for k, v in datasets.items() if v is not None})


def test_h5_round_trip_seed001_layout(tmp_path) -> None:
    path = seed001_file(tmp_path / "tensors.h5")
    with h5py.File(path) as f:
        values, masks = f["values"][()], f["masks"][()]
    s = load_h5(path)
    np.testing.assert_array_equal(s.values, values)
    np.testing.assert_array_equal(s.masks, masks)
    assert s.values.dtype == np.float32 and s.masks.dtype == np.float32
    assert list(s.ids) == [f"P{i:04d}" for i in range(6)]
    assert list(s.groups) == list(s.ids)
    assert s.channel_names == ["HR", "SBP", "SPO2"]
    assert s.labels.dtype == np.int64 and list(s.labels) == [0, 1, 0, 1, 0, 1]
    assert s.source == path and s.sample_shape == (5, 3)


def test_h5_str_ids_groups_and_float64_values(tmp_path) -> None:
    str_dtype = h5py.string_dtype()
    path = write_h5(
        tmp_path / "str.h5",
        values=np.arange(24, dtype=np.float64).reshape(4, 2, 3),
        ids=np.array(["a1", "a2", "b1", "c1"], dtype=object).astype(str_dtype),
        groups=np.array(["a", "a", "b", "c"], dtype=object).astype(str_dtype),
    )
    s = load_h5(path)
    assert s.values.dtype == np.float32 and s.values[3, 1, 2] == 23.0
    assert s.masks is None and s.labels is None
    assert list(s.ids) == ["a1", "a2", "b1", "c1"]
    assert list(s.groups) == ["a", "a", "b", "c"]
    assert s.channel_names == ["ch0", "ch1", "ch2"]


def test_h5_feature_vectors_get_defaults(tmp_path) -> None:
    path = write_h5(tmp_path / "features.h5", values=np.ones((3, 4), dtype=np.float32))
    s = load_h5(path)
    assert s.values.shape == (3, 4)
    assert list(s.ids) == ["S0000", "S0001", "S0002"]
    assert s.channel_names == ["f0", "f1", "f2", "f3"]


def test_h5_custom_keys(tmp_path) -> None:
    path = write_h5(
        tmp_path / "custom.h5", x=np.ones((2, 3, 1)), m=np.zeros((2, 3, 1)), values=np.zeros(1)
    )
    s = load_h5(path, values_key="x", masks_key="m")
    assert s.values.shape == (2, 3, 1) and s.masks.sum() == 0


def test_h5_nan_at_masked_position_is_zero_filled(tmp_path) -> None:
    values = np.ones((2, 3, 2), dtype=np.float32)
    masks = np.ones_like(values)
    values[1, 2, 0] = np.nan
    values[0, 0, 1] = np.inf
    masks[1, 2, 0] = masks[0, 0, 1] = 0
    s = load_h5(write_h5(tmp_path / "nan.h5", values=values, masks=masks))
    assert np.isfinite(s.values).all()
    assert s.values[1, 2, 0] == 0.0 and s.values[0, 0, 1] == 0.0
    assert s.values[0, 0, 0] == 1.0


def _nan_observed() -> np.ndarray:
    values = np.zeros((6, 5, 3), dtype=np.float32)
    values[1, 2, 0] = np.nan
    values[3, 0, 1] = np.nan
    return values


BAD_FILES = {
    # name: (overrides for seed001_file, key named in the message, other text in the message)
    "values_missing": ({"values": None, "data": np.zeros(3)}, "values", r"not found.*'data'"),
    "wrong_rank": ({"values": np.zeros(6), "masks": None}, "values", r"found 1 dims.*\(6,\)"),
    "zero_samples": (
        {"values": np.zeros((0, 5, 3)), "masks": None, "patient_index": None, "labels": None},
        "values",
        "at least one sample",
    ),
    "masks_shape": ({"masks": np.ones((6, 5, 2))}, "masks", r"\(6, 5, 3\), found \(6, 5, 2\)"),
    "masks_not_binary": ({"masks": np.full((6, 5, 3), 0.5)}, "masks", "only 0 and 1"),
    "ids_length": ({"patient_index": np.array([b"a", b"b"])}, "patient_index", r"\(6,\)"),
    "labels_length": ({"labels": np.zeros(5)}, "labels", r"found shape \(5,\)"),
    "vital_index_length": (
        {"vital_index": np.array([b"HR", b"SBP"])},
        "vital_index",
        r"expected one name per channel.*\(3,\)",
    ),
    "nan_observed": (
        {"values": _nan_observed(), "masks": np.ones((6, 5, 3))},
        "values",
        r"found 2 NaN/inf entries, first nan at index \(1, 2, 0\)",
    ),
    "inf_without_masks": (
        {"values": np.full((6, 5, 3), np.inf), "masks": None},
        "values",
        r"no 'masks'.*found 90 NaN/inf",
    ),
    "values_not_numeric": ({"values": np.array([b"x"] * 6)}, "values", "expected numbers"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_h5_bad_input_names_file_and_key(tmp_path, case: str) -> None:
    overrides, key, detail = BAD_FILES[case]
    path = seed001_file(tmp_path / f"{case}.h5", **overrides)
    with pytest.raises(DataError, match=rf"key '{key}'") as info:
        load_h5(path)
    message = str(info.value)
    assert message.startswith(path)
    assert re.search(detail, message), message


def test_h5_missing_file(tmp_path) -> None:
    path = str(tmp_path / "absent.h5")
    with pytest.raises(DataError, match=rf"^{re.escape(path)}: file not found.*'values'"):
        load_h5(path)


def test_h5_not_an_hdf5_file(tmp_path) -> None:
    path = tmp_path / "notes.h5"
    path.write_text("patient,hr\nP1,80\n")
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: cannot open as HDF5.*'values'"):
        load_h5(str(path))


# ----------------------------------------------------------------------------- splits


def _groups(n_groups: int, per_group: int) -> np.ndarray:
    return np.repeat([f"G{i:03d}" for i in range(n_groups)], per_group)


def test_split_keeps_each_group_in_one_split() -> None:
    groups = _groups(40, 3)
    split = split_by_group(groups, 0.2, 0.2, seed=0)
    assert split.shape == (120,)
    for g in np.unique(groups):
        assert len(set(split[groups == g])) == 1, g
    assert set(split) == {"train", "val", "test"}


def test_split_sizes_are_rounded_group_counts() -> None:
    groups = _groups(100, 2)
    split = split_by_group(groups, 0.2, 0.1, seed=5)
    n_groups = {name: len(np.unique(groups[split == name])) for name in ("train", "val", "test")}
    assert n_groups == {"train": 70, "val": 20, "test": 10}


def test_split_gives_at_least_one_group_to_a_small_fraction() -> None:
    split = split_by_group(_groups(10, 1), 0.01, 0.0, seed=0)
    assert (split == "val").sum() == 1 and (split == "test").sum() == 0


@pytest.mark.parametrize(("n_groups", "expected_val"), [(10, 3), (14, 4)])
def test_split_rounds_half_groups_up(n_groups: int, expected_val: int) -> None:
    # 0.25 x 10 = 2.5 and 0.25 x 14 = 3.5 both round up (Python's round would give 2 and 4).
    split = split_by_group(_groups(n_groups, 1), 0.25, 0.0, seed=0)
    assert (split == "val").sum() == expected_val


def test_split_is_deterministic_and_seed_dependent() -> None:
    groups = _groups(50, 2)
    a = split_by_group(groups, 0.2, 0.2, seed=1)
    assert np.array_equal(a, split_by_group(groups, 0.2, 0.2, seed=1))
    assert not np.array_equal(a, split_by_group(groups, 0.2, 0.2, seed=2))


def test_split_does_not_depend_on_sample_order() -> None:
    groups = _groups(30, 2)
    order = np.random.default_rng(0).permutation(len(groups))
    a = split_by_group(groups, 0.2, 0.2, seed=3)
    b = split_by_group(groups[order], 0.2, 0.2, seed=3)
    assert np.array_equal(a[order], b)


@pytest.mark.parametrize(
    ("n_groups", "val", "test"), [(2, 0.3, 0.3), (1, 0.1, 0.0), (5, 0.5, 0.5), (3, 0.0, 0.9)]
)
def test_split_that_would_empty_train_or_eval_raises(
    n_groups: int, val: float, test: float
) -> None:
    with pytest.raises(DataError, match=rf"{n_groups} groups.*val_fraction={val}"):
        split_by_group(_groups(n_groups, 2), val, test, seed=0)


# ----------------------------------------------------------------------------- normaliser


def known_stats_data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(N, T, C) values whose observed entries have exactly the given per-channel mean and std."""
    rng = np.random.default_rng(0)
    mean, std = np.array([80.0, -3.0, 0.5]), np.array([12.0, 0.1, 2.0])
    masks = (rng.random((10, 20, 3)) > 0.3).astype(np.float32)
    values = np.empty((10, 20, 3))
    for c in range(3):
        obs = masks[..., c] > 0
        z = rng.normal(size=obs.sum())
        z = (z - z.mean()) / z.std()
        values[..., c][obs] = mean[c] + std[c] * z
        # Unobserved entries are garbage that must not reach the statistics.
        values[..., c][~obs] = rng.choice([1e30, -1e30, np.nan], size=(~obs).sum())
    return values, masks, mean, std


def test_normaliser_fits_known_mean_and_std_ignoring_masked_entries() -> None:
    values, masks, mean, std = known_stats_data()
    norm = Normaliser.fit(values, masks)
    np.testing.assert_allclose(norm.mean, mean, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(norm.std, std, rtol=1e-10)
    out = norm.transform(values, masks)
    assert out.dtype == np.float32 and np.isfinite(out).all()
    assert (out[masks == 0] == 0.0).all()
    for c in range(3):
        observed = out[..., c][masks[..., c] > 0]
        assert abs(observed.mean()) < 1e-5 and abs(observed.std() - 1) < 1e-5


def test_normaliser_only_centres_a_channel_constant_in_training() -> None:
    values = np.stack([np.full((4, 5), 7.0), np.arange(20.0).reshape(4, 5)], axis=-1)
    norm = Normaliser.fit(values, None)
    assert norm.std[0] == 1.0 and norm.mean[0] == 7.0
    assert (norm.transform(values)[..., 0] == 0.0).all()
    # A value the channel never took in training stays on its own scale, not blown up.
    other = values.copy()
    other[0, 0, 0] = 9.0
    assert norm.transform(other)[0, 0, 0] == pytest.approx(2.0)


def test_normaliser_on_feature_vectors() -> None:
    values = np.array([[1.0, 10.0], [3.0, 30.0]])
    norm = Normaliser.fit(values)
    np.testing.assert_allclose(norm.mean, [2.0, 20.0])
    np.testing.assert_allclose(norm.std, [1.0, 10.0])
    np.testing.assert_allclose(norm.transform(values), [[-1, -1], [1, 1]])


def test_normaliser_inverse_transform_inverts() -> None:
    values, masks, _, _ = known_stats_data()
    norm = Normaliser.fit(values, masks)
    back = norm.inverse_transform(norm.transform(values, masks))
    observed = masks > 0
    np.testing.assert_allclose(back[observed], values[observed], rtol=1e-5)
    tensor_back = norm.inverse_transform(torch.from_numpy(norm.transform(values, masks)))
    assert isinstance(tensor_back, torch.Tensor)
    np.testing.assert_allclose(tensor_back.numpy()[observed], values[observed], rtol=1e-5)


def test_normaliser_state_dict_round_trips_weights_only(tmp_path) -> None:
    values, masks, _, _ = known_stats_data()
    norm = Normaliser.fit(values, masks)
    state = norm.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    torch.save({"normaliser": state}, tmp_path / "ckpt.pt")
    loaded = torch.load(tmp_path / "ckpt.pt", weights_only=True)["normaliser"]
    again = Normaliser.from_state_dict(loaded)
    np.testing.assert_array_equal(again.mean, norm.mean)
    np.testing.assert_array_equal(again.std, norm.std)
    np.testing.assert_array_equal(again.transform(values, masks), norm.transform(values, masks))


def test_normaliser_rejects_channel_mismatch_and_unobserved_channel() -> None:
    norm = Normaliser.fit(np.ones((2, 3, 2)))
    with pytest.raises(DataError, match="expected 2 channels"):
        norm.transform(np.ones((2, 3, 4)))
    masks = np.ones((2, 3, 2))
    masks[..., 1] = 0
    with pytest.raises(DataError, match=r"channel\(s\) \[1\]"):
        Normaliser.fit(np.ones((2, 3, 2)), masks)


# ----------------------------------------------------------------------------- prepare


def small_set(n_patients: int = 20, per_patient: int = 2, masks: bool = True) -> SampleSet:
    rng = np.random.default_rng(0)
    n = n_patients * per_patient
    groups = _groups(n_patients, per_patient)
    return SampleSet(
        values=rng.normal(5.0, 2.0, (n, 8, 3)).astype(np.float32),
        masks=(rng.random((n, 8, 3)) > 0.1).astype(np.float32) if masks else None,
        ids=np.array([f"S{i:04d}" for i in range(n)]),
        groups=groups,
        channel_names=["a", "b", "c"],
        source="small_set",
    )


def test_prepare_builds_tensors_and_disjoint_indices() -> None:
    data = prepare(small_set(), 0.2, 0.2, seed=0)
    assert isinstance(data, PreparedData)
    assert data.values.shape == (40, 8, 3) and data.values.dtype == torch.float32
    assert data.masks.shape == (40, 8, 3) and data.masks.dtype == torch.float32
    parts = [data.indices(name) for name in ("train", "val", "test")]
    assert all(p.dtype == torch.long for p in parts)
    assert sorted(torch.cat(parts).tolist()) == list(range(40))
    assert [len(p) for p in parts] == [24, 8, 8]  # 12 / 4 / 4 patients x 2 samples
    train = parts[0]
    observed = data.masks[train] > 0
    assert abs(float(data.values[train][observed].mean())) < 1e-5
    assert (data.values[data.masks == 0] == 0).all()


def test_prepare_without_masks_gives_all_ones() -> None:
    data = prepare(small_set(masks=False), 0.2, 0.0, seed=0)
    assert bool((data.masks == 1).all())
    assert len(data.indices("test")) == 0


def test_prepare_fits_normaliser_on_train_only() -> None:
    base = small_set()
    split = prepare(base, 0.2, 0.2, seed=0).split
    reference = prepare(base, 0.2, 0.2, seed=0).normaliser
    changed_eval = small_set()
    changed_eval.values[split != "train"] *= 1000.0
    after = prepare(changed_eval, 0.2, 0.2, seed=0).normaliser
    np.testing.assert_array_equal(after.mean, reference.mean)
    np.testing.assert_array_equal(after.std, reference.std)
    changed_train = small_set()
    changed_train.values[split == "train"] += 10.0
    moved = prepare(changed_train, 0.2, 0.2, seed=0).normaliser
    np.testing.assert_allclose(moved.mean, reference.mean + 10.0, rtol=1e-6)


def test_prepare_names_the_source_when_the_split_fails() -> None:
    with pytest.raises(DataError, match=r"^small_set: split: 2 groups"):
        prepare(small_set(n_patients=2), 0.3, 0.3, seed=0)


def test_prepare_on_generated_vitals(vitals: SampleSet) -> None:
    data = prepare(vitals, 0.15, 0.15, seed=0)
    assert data.values.shape == (256, 745, 7)
    assert torch.isfinite(data.values).all()
    assert len(data.indices("val")) == round(0.15 * 256) == len(data.indices("test"))
