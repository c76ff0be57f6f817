"""vitals_windows (seed 003), volumes (seed 004), digits and MNIST-1D, and the normaliser's
channel_axis / unnormalised channels they need.

Inputs are constructed so the right answer is known in advance (linear ramps, known times,
known per-channel statistics, lesions of known shape).
"""

import logging
import math
import random
import re
import socket
import urllib.request

import h5py
import numpy as np
import pytest
import requests
import torch
from conftest import CONF
from hydra.utils import execution_whitelist, instantiate

from vaelab.data.base import SampleSet
from vaelab.data.benchmarks import load_digits, load_mnist1d
from vaelab.data.prepare import Normaliser, prepare
from vaelab.data.vitals_windows import load_vitals_windows
from vaelab.data.volumes import MODALITIES, load_volumes
from vaelab.errors import DataError

# ----------------------------------------------------------------------------- helpers


def write_csv(path, rows, header="patient,timestamp,hr,spo2") -> str:
    """One CSV line per row (tuples are joined with commas); returns the path as str."""
    lines = [header] + [",".join(str(x) for x in row) for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def series_rows(patient, hr_times, spo2_times, hr=lambda t: 70, spo2=lambda t: 97, label=None):
    """Rows of one patient: HR and SpO2 on their own times (the other cell left empty)."""
    extra = () if label is None else (label,)
    rows = [(patient, t, hr(t), "", *extra) for t in hr_times]
    rows += [(patient, t, "", spo2(t), *extra) for t in spo2_times]
    return rows


@pytest.fixture(scope="module")
def small_vitals() -> SampleSet:
    """12 generated patients of 30 min: about 12 windows of 256 s each."""
    return load_vitals_windows(n_patients=12, hours=0.5, seed=0)


# ----------------------------------------------------------------------------- vitals_windows


@pytest.mark.parametrize(("window", "overlap", "step"), [(256, 0.5, 128), (100, 0.25, 75)])
def test_vitals_window_count_per_patient(tmp_path, window: int, overlap: float, step: int) -> None:
    # A: both vitals cover 0..1000 s -> L = 1001 samples. B: the later first observation is HR at
    # 10 s and the earlier last one HR at 700 s -> L = 691.
    rows = series_rows("A", range(0, 1001, 2), range(0, 1001, 50))
    rows += series_rows("B", range(10, 701, 3), range(0, 711, 10))
    s = load_vitals_windows(write_csv(tmp_path / "v.csv", rows), window=window, overlap=overlap)
    for patient, n_samples, first in (("A", 1001, 0), ("B", 691, 10)):
        expected = math.floor((n_samples - window) / step) + 1
        ids = [i for i in s.ids if i.startswith(f"{patient}:")]
        assert len(ids) == expected
        assert ids == [f"{patient}:{first + k * step}" for k in range(expected)]
    assert s.values.shape == (len(s.ids), window, 4)
    assert s.channel_names == ["HR", "SpO2", "sin_time", "cos_time"]
    assert s.unnormalised_channels == ("sin_time", "cos_time")
    assert s.labels is None and s.masks is None and s.channel_axis == -1


def test_vitals_interpolation_is_exact_on_a_ramp_and_never_extrapolates(tmp_path) -> None:
    # Irregular times with a 300 s gap; HR and SpO2 linear in t, so interpolation is exact.
    hr_times = [0, 7, 20, 21, 50, 99, 400, 401, 433, 600]
    spo2_times = [30, 90, 95, 380, 500]
    rows = series_rows(
        "R", hr_times, spo2_times, hr=lambda t: 60 + 0.1 * t, spo2=lambda t: 90 + 0.01 * t
    )
    s = load_vitals_windows(write_csv(tmp_path / "ramp.csv", rows), window=64, overlap=0.5)
    starts = np.array([int(i.split(":")[1]) for i in s.ids])
    assert starts[0] == 30  # the later of the two first observations (SpO2 at 30 s)
    assert starts[-1] + 63 <= 500  # the earlier of the two last observations (SpO2 at 500 s)
    assert len(starts) == math.floor((471 - 64) / 32) + 1
    t = starts[:, None] + np.arange(64)[None, :]
    np.testing.assert_allclose(s.values[..., 0], 60 + 0.1 * t, rtol=1e-6)
    np.testing.assert_allclose(s.values[..., 1], 90 + 0.01 * t, rtol=1e-6)


def test_vitals_sin_cos_time_of_day_iso_and_seconds(tmp_path) -> None:
    # ISO with a UTC offset: the wall clock as written counts, so 06:00 -> sin 1, cos 0.
    times = [f"2024-03-01T06:{m:02d}:{s:02d}+02:00" for m in range(5) for s in (0, 30)]
    rows = series_rows("Q", times, times)
    s = load_vitals_windows(write_csv(tmp_path / "iso.csv", rows), window=16, overlap=0.0)
    assert s.ids[0] == "Q:21600"  # seconds after midnight
    np.testing.assert_allclose(s.values[0, 0, 2:], [1.0, 0.0], atol=1e-6)
    k = np.arange(16)
    angle = 2 * np.pi * (21600 + 16 + k) / 86400  # second window, step 16
    np.testing.assert_allclose(s.values[1, :, 2], np.sin(angle), atol=1e-6)
    np.testing.assert_allclose(s.values[1, :, 3], np.cos(angle), atol=1e-6)
    # Seconds: t = 43200 is noon -> sin 0, cos -1; a day later the same.
    noon = [43200 + 86400 + k for k in range(0, 40, 5)]
    s = load_vitals_windows(write_csv(tmp_path / "sec.csv", series_rows("N", noon, noon)), 8)
    np.testing.assert_allclose(s.values[0, 0, 2:], [0.0, -1.0], atol=1e-6)


def test_vitals_labels_one_per_patient_from_text_or_numbers(tmp_path) -> None:
    header = "Patient, Timestamp, HR, SpO2, Label"  # names matched ignoring case and spaces
    rows = series_rows("H", range(0, 40, 4), range(0, 40, 4), label="High Risk")
    rows += series_rows("L", range(0, 40, 4), range(0, 40, 4), label="0")
    s = load_vitals_windows(write_csv(tmp_path / "l.csv", rows, header), window=20)
    assert s.labels.dtype == np.int64
    assert dict(zip(s.groups, s.labels, strict=True)) == {"H": 1, "L": 0}


def test_vitals_sin_cos_untouched_by_normaliser_hr_spo2_z_scored(small_vitals) -> None:
    data = prepare(small_vitals, 0.2, 0.2, seed=0)
    train = data.indices("train").numpy()
    out = data.values.numpy()
    # sin/cos pass through exactly; the fitted state says so too.
    np.testing.assert_array_equal(out[..., 2:], small_vitals.values[..., 2:])
    np.testing.assert_array_equal(data.normaliser.mean[2:], [0.0, 0.0])
    np.testing.assert_array_equal(data.normaliser.std[2:], [1.0, 1.0])
    for c in (0, 1):  # HR and SpO2: mean 0, std 1 over the training windows
        assert abs(out[train, :, c].mean()) < 1e-4
        assert abs(out[train, :, c].std() - 1.0) < 1e-4
    assert small_vitals.values[..., 0].mean() > 50  # they really were in bpm before


def test_vitals_prepare_keeps_each_patient_in_one_split(small_vitals) -> None:
    data = prepare(small_vitals, 0.2, 0.2, seed=1)
    groups = small_vitals.groups
    assert len(groups) > 5 * len(np.unique(groups))  # many windows per patient
    for g in np.unique(groups):
        assert len(set(data.split[groups == g])) == 1, g
        assert len(set(small_vitals.labels[groups == g])) == 1, g
    assert set(data.split) == {"train", "val", "test"}


def test_vitals_generator_is_deterministic_and_realistic(small_vitals) -> None:
    again = load_vitals_windows(n_patients=12, hours=0.5, seed=0)
    other = load_vitals_windows(n_patients=12, hours=0.5, seed=1)
    np.testing.assert_array_equal(again.values, small_vitals.values)
    assert not np.array_equal(other.values[:5], small_vitals.values[:5])
    f, v = small_vitals.factors, small_vitals.values
    n = len(small_vitals)
    assert all(factor.shape == (n,) for factor in f.values())
    assert np.array_equal(f["high_risk"].astype(np.int64), small_vitals.labels)
    assert 30 <= v[..., 0].min() and v[..., 0].max() <= 220
    assert 50 <= v[..., 1].min() and v[..., 1].max() <= 100
    # Windows with a desaturation episode have a lower minimum SpO2.
    desat = f["desaturation_fraction"] > 0.2
    assert desat.any() and (~desat).any()
    assert v[desat, :, 1].min(axis=1).mean() < v[~desat, :, 1].min(axis=1).mean() - 3
    # The time-of-day factor is the hour of each window's first step.
    angle = 2 * np.pi * f["time_of_day"] / 24
    np.testing.assert_allclose(v[:, 0, 2], np.sin(angle), atol=1e-5)


def test_vitals_short_patient_is_skipped_and_logged(tmp_path, caplog) -> None:
    rows = series_rows("LONG", range(0, 300, 2), range(0, 300, 20))
    rows += series_rows("SHORT", range(0, 100, 2), range(0, 100, 20))
    with caplog.at_level(logging.WARNING, logger="vaelab.data.vitals_windows"):
        s = load_vitals_windows(write_csv(tmp_path / "v.csv", rows), window=256)
    assert set(s.groups) == {"LONG"}
    assert "skipped 1 of 2 patients" in caplog.text and "SHORT" in caplog.text


BAD_CSV = {
    # name: (header, rows, load kwargs, pattern in the message)
    "missing_columns": (
        "patient,time,hr",
        [("A", 0, 70)],
        {},
        r"missing column\(s\) timestamp, spo2: expected columns patient, timestamp, hr, spo2",
    ),
    "hr_not_numeric": (
        None,
        [("A", 0, 70, 97), ("A", 1, "fast", 97)],
        {},
        r"line 3: column 'hr': expected a number.*'fast'",
    ),
    "spo2_infinite": (None, [("A", 0, 70, "inf")], {}, r"line 2: column 'spo2': expected a finite"),
    "timestamp_not_a_time": (
        None,
        [("A", "2024-03-01T06:00:00", 70, 97), ("A", "yesterday", 70, 97)],
        {},
        r"line 3: column 'timestamp': expected seconds or ISO 8601.*'yesterday'",
    ),
    "mixed_utc_offsets": (
        None,
        [("A", "2024-03-01T06:00:00+01:00", 70, 97), ("A", "2024-03-01T06:00:01+02:00", 70, 97)],
        {},
        r"expected one UTC offset",
    ),
    "every_patient_too_short": (
        None,
        [("A", t, 70, 97) for t in range(100)],
        {"window": 256},
        r"every one of the 1 patients is shorter than one window.*window=256 s.*found at most 100",
    ),
    "label_changes_within_patient": (
        "patient,timestamp,hr,spo2,label",
        [("A", 0, 70, 97, 0), ("A", 1, 70, 97, 1)],
        {},
        r"patient 'A': column 'label': expected one label per patient, found labels \[0, 1\]",
    ),
    "label_unknown": (
        "patient,timestamp,hr,spo2,label",
        [("A", 0, 70, 97, "sick")],
        {},
        r"line 2: column 'label': expected 0, 1, 'Low Risk' or 'High Risk'",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CSV))
def test_vitals_bad_csv_names_file_and_problem(tmp_path, case: str) -> None:
    header, rows, kwargs, pattern = BAD_CSV[case]
    path = write_csv(tmp_path / f"{case}.csv", rows, header or "patient,timestamp,hr,spo2")
    with pytest.raises(DataError) as info:
        load_vitals_windows(path, **{"window": 8, **kwargs})
    message = str(info.value)
    assert message.startswith(path)
    assert re.search(pattern, message), message


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"window": 1}, r"window: expected an integer >= 2"),
        ({"window": 0}, r"window: expected an integer >= 2"),
        ({"overlap": 1.0}, r"overlap: expected 0 <= overlap < 1, found 1.0"),
        ({"overlap": -0.1}, r"overlap: expected 0 <= overlap < 1"),
        ({"n_patients": 0}, r"n_patients: expected an integer >= 1"),
        ({"hours": 0.0}, r"hours: expected a number > 0"),
    ],
)
def test_vitals_bad_arguments(kwargs: dict, pattern: str) -> None:
    with pytest.raises(DataError, match=rf"^vitals_windows\(.*\): {pattern}"):
        load_vitals_windows(**kwargs)


def test_vitals_missing_file(tmp_path) -> None:
    path = str(tmp_path / "absent.csv")
    with pytest.raises(DataError, match=rf"^{re.escape(path)}: file not found.*patient, timestamp"):
        load_vitals_windows(path)


# ----------------------------------------------------------------------------- normaliser


def channel_first_set(n: int = 10) -> SampleSet:
    """(n, 4, 3, 3, 3) volumes, channel c ~ mean 10 c, std c + 1, NOT z-scored per subject."""
    rng = np.random.default_rng(0)
    mean = np.array([0.0, 10.0, 20.0, 30.0])[None, :, None, None, None]
    std = np.array([1.0, 2.0, 3.0, 4.0])[None, :, None, None, None]
    values = (mean + std * rng.standard_normal((n, 4, 3, 3, 3))).astype(np.float32)
    ids = np.array([f"S{i}" for i in range(n)])
    return SampleSet(
        values=values,
        masks=None,
        ids=ids,
        groups=ids.copy(),
        channel_names=list(MODALITIES),
        source="channel_first",
        channel_axis=1,
    )


def test_prepare_normalises_over_the_channel_axis_of_volumes(tmp_path) -> None:
    s = channel_first_set()
    data = prepare(s, 0.2, 0.2, seed=0)
    train = data.indices("train").numpy()
    raw = s.values[train].astype(np.float64)
    np.testing.assert_allclose(data.normaliser.mean, raw.mean(axis=(0, 2, 3, 4)), rtol=1e-5)
    np.testing.assert_allclose(data.normaliser.std, raw.std(axis=(0, 2, 3, 4)), rtol=1e-5)
    assert data.normaliser.mean[3] > 25 and data.normaliser.std[3] > 3  # axis 1, not the last
    out = data.values[train].numpy()
    np.testing.assert_allclose(out.mean(axis=(0, 2, 3, 4)), 0.0, atol=1e-5)
    np.testing.assert_allclose(out.std(axis=(0, 2, 3, 4)), 1.0, atol=1e-5)
    back = data.normaliser.inverse_transform(data.values)
    assert isinstance(back, torch.Tensor)
    np.testing.assert_allclose(back.numpy(), s.values, rtol=1e-4, atol=1e-4)
    # The state dict is tensors only and keeps the axis through torch.load(weights_only=True).
    torch.save({"normaliser": data.normaliser.state_dict()}, tmp_path / "ckpt.pt")
    loaded = torch.load(tmp_path / "ckpt.pt", weights_only=True)["normaliser"]
    assert all(isinstance(v, torch.Tensor) for v in loaded.values())
    again = Normaliser.from_state_dict(loaded)
    assert again.channel_axis == 1
    np.testing.assert_array_equal(again.transform(s.values), data.values.numpy())
    with pytest.raises(DataError, match=r"expected 4 channels on axis 1"):
        again.transform(np.zeros((2, 3, 3, 3, 4)))


def test_normaliser_state_without_channel_axis_loads_as_last_axis() -> None:
    state = {"mean": torch.tensor([1.0, 2.0], dtype=torch.float64), "std": torch.ones(2)}
    norm = Normaliser.from_state_dict(state)
    assert norm.channel_axis == -1
    np.testing.assert_allclose(norm.transform(np.array([[1.0, 2.0]])), [[0.0, 0.0]])


def test_normaliser_leaves_unnormalised_channels_alone() -> None:
    values = np.random.default_rng(0).normal(5.0, 3.0, (20, 6, 3))
    norm = Normaliser.fit(values, unnormalised=(1,))
    np.testing.assert_array_equal([norm.mean[1], norm.std[1]], [0.0, 1.0])
    np.testing.assert_allclose(norm.mean[[0, 2]], values[..., [0, 2]].mean(axis=(0, 1)))
    out = norm.transform(values)
    np.testing.assert_allclose(out[..., 1], values[..., 1], rtol=1e-6)
    with pytest.raises(DataError, match=r"unnormalised channels: expected indices in \[0, 3\)"):
        Normaliser.fit(values, unnormalised=(3,))


def test_prepare_rejects_unknown_unnormalised_channel() -> None:
    s = channel_first_set()
    s.unnormalised_channels = ("t1c", "flair")
    with pytest.raises(DataError, match=r"^channel_first: unnormalised_channels:.*\['flair'\]"):
        prepare(s, 0.2, 0.2, seed=0)


# ----------------------------------------------------------------------------- volumes


def test_volumes_shapes_and_per_subject_channel_z_score() -> None:
    s = load_volumes(n_subjects=3, size=16, seed=0)
    assert s.values.shape == (3, 4, 16, 16, 16) and s.values.dtype == np.float32
    assert s.channel_names == ["t1c", "t1n", "t2f", "t2w"] and s.channel_axis == 1
    assert s.sample_shape == (4, 16, 16, 16)
    np.testing.assert_allclose(s.values.mean(axis=(2, 3, 4)), 0.0, atol=1e-5)
    np.testing.assert_allclose(s.values.std(axis=(2, 3, 4)), 1.0, atol=1e-4)
    assert list(s.ids) == ["S0000", "S0001", "S0002"] and np.array_equal(s.groups, s.ids)
    again = load_volumes(n_subjects=3, size=16, seed=0)
    np.testing.assert_array_equal(again.values, s.values)
    assert not np.allclose(load_volumes(n_subjects=3, size=16, seed=1).values, s.values)


def test_volumes_lesion_factors_match_the_voxels() -> None:
    size = 32
    s = load_volumes(n_subjects=4, size=size, seed=3)
    f = s.factors
    c = (np.arange(size) + 0.5) / size * 2 - 1  # voxel centres in [-1, 1]
    d, h, w = np.meshgrid(c, c, c, indexing="ij")
    for i in range(4):
        centre = [f[f"centroid_{a}"][i] for a in "dhw"]
        semi = [f[f"lesion_radius_{a}"][i] * 2 / size for a in "dhw"]  # voxels -> [-1, 1]
        r2 = sum(((x - m) / a) ** 2 for x, m, a in zip((d, h, w), centre, semi, strict=True))
        inside, shell = r2 <= 1.0, (r2 > 1.5**2) & (r2 <= 2.5**2)
        # Volume: the voxel count equals 4/3 pi abc up to discretisation (radii 1.6-3.5 voxels).
        assert abs(inside.sum() - f["lesion_volume"][i]) <= 0.15 * f["lesion_volume"][i]
        # The lesion is where the factors say: FLAIR-bright, T1-native-dark against its shell.
        t1n, t2f = s.values[i, 1], s.values[i, 2]
        assert t2f[inside].mean() > t2f[shell].mean() + 0.5
        assert t1n[inside].mean() < t1n[shell].mean()
    assert ((f["lesion_intensity"] >= 0.6) & (f["lesion_intensity"] <= 1.4)).all()
    assert (np.abs(np.stack([f[f"centroid_{a}"] for a in "dhw"])) <= 1).all()


def write_volumes(path, **datasets) -> str:
    """Write each keyword as one dataset; returns the path as str."""
    with h5py.File(path, "w") as f:
        for key, data in datasets.items():
            f.create_dataset(key, data=data)
    return str(path)


def test_volumes_h5_round_trip(tmp_path) -> None:
    rng = np.random.default_rng(0)
    # Scanner-like gain and offset per subject and channel, which the loader must remove.
    raw = rng.normal(size=(3, 4, 8, 8, 8)) * rng.uniform(1, 50, (3, 4, 1, 1, 1)) + 100.0
    path = write_volumes(
        tmp_path / "vol.h5",
        volumes=raw,
        ids=np.array([b"a1", b"a2", b"b1"]),
        groups=np.array([b"a", b"a", b"b"]),
        labels=np.array([0, 1, 1]),
    )
    s = load_volumes(path)
    expected = (raw - raw.mean(axis=(2, 3, 4), keepdims=True)) / raw.std(
        axis=(2, 3, 4), keepdims=True
    )
    np.testing.assert_allclose(s.values, expected, atol=1e-4)
    assert list(s.ids) == ["a1", "a2", "b1"] and list(s.groups) == ["a", "a", "b"]
    assert s.labels.dtype == np.int64 and list(s.labels) == [0, 1, 1]
    assert s.source == path and s.channel_axis == 1 and s.factors == {}
    data = prepare(s, 0.34, 0.0, seed=0)  # subject a's two scans stay together
    assert data.split[0] == data.split[1] != data.split[2]


def _nan_volumes() -> np.ndarray:
    v = np.ones((2, 4, 8, 8, 8))
    v[1, 2, 3, 4, 5] = np.nan
    return v


BAD_VOLUMES = {
    "wrong_rank": ({"volumes": np.ones((2, 4, 8, 8))}, r"expected \(N, 4, D, H, W\), found shape"),
    "wrong_channels": (
        {"volumes": np.ones((2, 3, 8, 8, 8))},
        r"expected 4 channels \(t1c, t1n, t2f, t2w\) on axis 1.*\(2, 3, 8, 8, 8\)",
    ),
    "not_finite": (
        {"volumes": _nan_volumes()},
        r"expected finite values, found 1 NaN/inf entries, first nan at index \(1, 2, 3, 4, 5\)",
    ),
    "not_a_cube": ({"volumes": np.ones((2, 4, 8, 8, 10))}, r"expected cubes, D = H = W"),
    "too_small": ({"volumes": np.ones((2, 4, 4, 4, 4))}, r"expected D = H = W >= 8"),
    "no_volumes": ({"values": np.ones((2, 4, 8, 8, 8))}, r"'volumes' not found.*\['values'\]"),
    "ids_length": (
        {"volumes": np.ones((2, 4, 8, 8, 8)), "ids": np.array([b"a"])},
        r"key 'ids': expected one id per volume, shape \(2,\)",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_VOLUMES))
def test_volumes_bad_h5_names_file_key_and_expectation(tmp_path, case: str) -> None:
    datasets, pattern = BAD_VOLUMES[case]
    path = write_volumes(tmp_path / f"{case}.h5", **datasets)
    with pytest.raises(DataError) as info:
        load_volumes(path)
    message = str(info.value)
    assert message.startswith(path) and re.search(pattern, message), message


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [({"n_subjects": 0}, "n_subjects: expected"), ({"size": 4}, r"size: expected .*>= 8")],
)
def test_volumes_bad_generator_arguments(kwargs: dict, pattern: str) -> None:
    with pytest.raises(DataError, match=rf"^volumes\(.*\): {pattern}"):
        load_volumes(**kwargs)


# ----------------------------------------------------------------------------- benchmarks


def test_digits_vectors_and_images() -> None:
    s = load_digits()
    assert s.values.shape == (1797, 64) and s.values.dtype == np.float32
    assert np.isfinite(s.values).all() and 0 <= s.values.min() and s.values.max() <= 16
    assert s.labels.dtype == np.int64 and set(s.labels.tolist()) == set(range(10))
    assert len(np.unique(s.groups)) == 1797 and s.factors == {}
    image = load_digits(as_image=True)
    assert image.values.shape == (1797, 8, 8) and len(image.channel_names) == 8
    np.testing.assert_array_equal(image.values.reshape(1797, 64), s.values)


def _no_network(*args, **kwargs):
    raise AssertionError("network access while loading MNIST-1D")


def test_mnist1d_generated_locally_deterministic_and_without_network(monkeypatch) -> None:
    monkeypatch.setattr(requests, "get", _no_network)
    monkeypatch.setattr(requests.Session, "request", _no_network)
    monkeypatch.setattr(urllib.request, "urlopen", _no_network)
    monkeypatch.setattr(socket.socket, "connect", _no_network)
    np.random.seed(123)
    random.seed(123)
    expected_numpy, expected_python = np.random.random(), random.random()
    np.random.seed(123)
    random.seed(123)
    s = load_mnist1d(n_samples=200, seed=0)
    # The generator seeds the global streams; the loader puts them back.
    assert np.random.random() == expected_numpy and random.random() == expected_python
    assert s.values.shape == (200, 40, 1) and s.values.dtype == np.float32
    assert np.isfinite(s.values).all()
    assert s.labels.dtype == np.int64 and np.bincount(s.labels).tolist() == [20] * 10
    assert len(np.unique(s.groups)) == 200
    again = load_mnist1d(n_samples=200, seed=0)
    np.testing.assert_array_equal(again.values, s.values)
    np.testing.assert_array_equal(again.labels, s.labels)
    assert not np.allclose(load_mnist1d(n_samples=200, seed=1).values, s.values)


def test_mnist1d_rejects_a_size_the_generator_would_shrink() -> None:
    with pytest.raises(DataError, match=r"^mnist1d\(n_samples=15, seed=0\): n_samples: expected"):
        load_mnist1d(n_samples=15)


# ----------------------------------------------------------------------------- configs

NEW_DATASETS = {
    "vitals_windows": (["dataset.n_patients=3", "dataset.hours=0.2"], (256, 4)),
    "volumes": (["dataset.n_subjects=2", "dataset.size=8"], (4, 8, 8, 8)),
    "digits": ([], (64,)),
    "mnist1d": (["dataset.n_samples=100"], (40, 1)),
}


@pytest.mark.parametrize("name", sorted(NEW_DATASETS))
def test_new_dataset_configs_compose_and_build(compose_config, name: str) -> None:
    overrides, sample_shape = NEW_DATASETS[name]
    cfg = compose_config([f"dataset={name}", *overrides])
    with execution_whitelist(["vaelab.*"]):
        samples = instantiate(cfg.dataset)
    assert isinstance(samples, SampleSet) and samples.sample_shape == sample_shape
    # Every key but _target_ carries a comment (units, what it does).
    for line in (CONF / "dataset" / f"{name}.yaml").read_text().splitlines():
        if line and not line.startswith(("#", " ", "_target_")):
            assert "  # " in line, line
