"""vitals_windows (seed 003): windows of 1 s HR and SpO2 from a CSV or generated patients.

Inputs are constructed so the right answer is known in advance (linear ramps, known times).
"""

import logging
import math
import re

import numpy as np
import pytest

from vaelab.data.base import SampleSet
from vaelab.data.prepare import prepare
from vaelab.data.vitals_windows import load_vitals_windows
from vaelab.errors import DataError


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


# --- day of week (seed 003's optional weekly encoding) ---------------------------------------


def test_vitals_day_of_week_of_a_monday_and_across_midnight(tmp_path) -> None:
    # 2024-03-04 was a Monday: d = 0 -> sin 0, cos 1. The window runs past midnight into
    # Tuesday (d = 1), where the angle jumps by 2 pi / 7.
    times = [f"2024-03-04T23:59:{s:02d}" for s in range(40, 60)]
    times += [f"2024-03-05T00:00:{s:02d}" for s in range(20)]
    s = load_vitals_windows(
        write_csv(tmp_path / "mon.csv", series_rows("M", times, times)),
        window=40,
        day_of_week=True,
    )
    assert s.channel_names == ["HR", "SpO2", "sin_time", "cos_time", "sin_day", "cos_day"]
    assert s.unnormalised_channels == ("sin_time", "cos_time", "sin_day", "cos_day")
    assert s.values.shape == (1, 40, 6)
    monday, tuesday = s.values[0, :20, 4:], s.values[0, 20:, 4:]
    np.testing.assert_allclose(monday, np.tile([0.0, 1.0], (20, 1)), atol=1e-6)
    angle = 2 * np.pi / 7
    np.testing.assert_allclose(tuesday, np.tile([np.sin(angle), np.cos(angle)], (20, 1)), atol=1e-6)
    # The time of day is unchanged by the option: 23:59:40 is 86380 s after midnight.
    np.testing.assert_allclose(s.values[0, 0, 2], np.sin(2 * np.pi * 86380 / 86400), atol=1e-6)


def test_vitals_day_of_week_of_unix_seconds(tmp_path) -> None:
    # Unix time 0 fell on Thursday 1970-01-01: 4 days later (345600 s) is Monday the 5th,
    # 6 days later Wednesday the 7th (d = 2).
    for start, day in ((345600 + 3600, 0), (6 * 86400 + 60, 2)):
        times = [start + k for k in range(0, 20, 2)]
        path = write_csv(tmp_path / f"{start}.csv", series_rows("U", times, times))
        s = load_vitals_windows(path, window=8, day_of_week=True)
        angle = 2 * np.pi * day / 7
        np.testing.assert_allclose(s.values[0, 0, 4:], [np.sin(angle), np.cos(angle)], atol=1e-6)


def test_vitals_day_of_week_leaves_the_other_channels_and_the_normaliser_alone() -> None:
    plain = load_vitals_windows(n_patients=6, hours=0.3, seed=2)
    weekly = load_vitals_windows(n_patients=6, hours=0.3, seed=2, day_of_week=True)
    np.testing.assert_array_equal(weekly.values[..., :4], plain.values)
    np.testing.assert_array_equal(weekly.ids, plain.ids)
    # Each value is one of the 7 days' points on the circle.
    days = np.round(
        np.mod(np.arctan2(weekly.values[..., 4], weekly.values[..., 5]), 2 * np.pi)
        / (2 * np.pi / 7),
        4,
    )
    assert set(np.unique(days)) <= set(map(float, range(7)))
    data = prepare(weekly, 0.2, 0.2, seed=0)
    np.testing.assert_array_equal(data.values.numpy()[..., 4:], weekly.values[..., 4:])


def test_vitals_day_of_week_must_be_a_boolean() -> None:
    with pytest.raises(DataError, match=r"day_of_week: expected true or false, found 'yes'"):
        load_vitals_windows(n_patients=2, hours=0.1, day_of_week="yes")


# --- a CSV with other column names -----------------------------------------------------------

MAPPING = {"patient": "subject_id", "timestamp": "charttime", "hr": "heart_rate", "label": "risk"}


def test_vitals_columns_map_other_header_names(tmp_path) -> None:
    rows = series_rows("A", range(0, 40, 2), range(0, 40, 5), hr=lambda t: 60 + t, label=1)
    standard = load_vitals_windows(
        write_csv(tmp_path / "std.csv", rows, "patient,timestamp,hr,spo2,label"), window=16
    )
    # Other names, another order of columns, spo2 keeping its own name (matched ignoring case).
    renamed = [(r[1], r[4], r[3], r[2], r[0]) for r in rows]
    header = "CHARTTIME, risk, SpO2, heart_rate, subject_id"
    mapped = load_vitals_windows(
        write_csv(tmp_path / "icu.csv", renamed, header), window=16, columns=MAPPING
    )
    np.testing.assert_array_equal(mapped.values, standard.values)
    np.testing.assert_array_equal(mapped.ids, standard.ids)
    assert mapped.labels.tolist() == [1] * len(mapped)


def test_vitals_a_missing_mapped_column_names_the_file_column_and_key(tmp_path) -> None:
    path = write_csv(tmp_path / "icu.csv", [("A", 0, 70, 97)], "subject_id,charttime,hr,spo2")
    with pytest.raises(DataError) as info:
        load_vitals_windows(path, window=8, columns=MAPPING)
    assert str(info.value).startswith(
        f"{path}: missing column(s) heart_rate (columns.hr), risk (columns.label): expected "
        "columns subject_id, charttime, heart_rate, spo2 (risk optional) through columns "
        "{patient: subject_id, timestamp: charttime, hr: heart_rate, label: risk}"
    )


def test_vitals_a_bad_cell_names_the_mapped_column(tmp_path) -> None:
    path = write_csv(
        tmp_path / "icu.csv", [("A", 0, "fast", 97)], "subject_id,charttime,heart_rate,spo2"
    )
    with pytest.raises(DataError, match=r"line 2: column 'heart_rate': expected a number"):
        load_vitals_windows(
            path,
            window=8,
            columns={"hr": "heart_rate", "patient": "subject_id", "timestamp": "charttime"},
        )


@pytest.mark.parametrize(
    ("columns", "pattern"),
    [
        ({"heartrate": "hr"}, r"columns: unknown key\(s\) heartrate: expected keys patient, "),
        ({"hr": ""}, r"columns.hr: expected a header name, found ''"),
        ({"hr": 3}, r"columns.hr: expected a header name, found 3"),
    ],
)
def test_vitals_bad_columns_mapping(tmp_path, columns: dict, pattern: str) -> None:
    path = write_csv(tmp_path / "v.csv", [("A", 0, 70, 97)])
    with pytest.raises(DataError, match=rf"^{re.escape(path)}: {pattern}"):
        load_vitals_windows(path, window=8, columns=columns)
