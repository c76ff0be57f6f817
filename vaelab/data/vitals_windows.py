"""Windows of 1 s heart rate and SpO2 with sin/cos time of day (seed 003), from a CSV or generated.

CSV layout: one row per observation, with the columns `patient`, `timestamp`, `hr` (bpm) and
`spo2` (%), and optionally `label` (0/1, or "Low Risk"/"High Risk", one per patient). A file
with other header names is read through `columns`, a mapping from those keys to its names
(`{patient: subject_id, timestamp: charttime, hr: heart_rate}`; keys left out keep their own
name; a mapped `label` is required). Header names are matched ignoring case and surrounding
spaces. An empty `hr` or `spo2` cell (or NA,
NaN, null) means that vital was not observed at that time, so HR and SpO2 may be sampled at
different, irregular times. `timestamp` holds either seconds (counted from a midnight, e.g. Unix
time, whose time of day is then UTC) or ISO 8601 date-times (`2024-03-01T06:00:00`, with or
without one UTC offset shared by the whole file; the time of day is the wall clock as written).
The day of week (day_of_week=true) of ISO date-times is their date's; seconds are read as Unix
time for it (second 0 fell on Thursday 1970-01-01), so it means nothing for other seconds.

Processing of each patient:
  1. Each vital's observations, duplicates at one timestamp averaged.
  2. A 1 s grid from the later of the two first observations to the earlier of the two last
     ones: every grid point lies between two real observations of both vitals, so gaps are
     linearly interpolated and nothing is extrapolated. It holds L = floor(end - start) + 1
     samples. A patient with L < window is skipped (and counted in the log).
  3. Windows of `window` samples every step = round(window * (1 - overlap)) samples, i.e.
     floor((L - window) / step) + 1 windows; 50 % overlap of 256 gives a step of 128.
  4. Channels (T, C) = (window, 4): HR, SpO2, sin_time, cos_time, with the time of day of each
     step as the angle 2 pi (seconds since midnight) / 86400 (06:00 -> sin 1, cos 0); with
     day_of_week, (window, 6): then sin_day, cos_day (seed 003's optional weekly encoding), the
     angle 2 pi d / 7 of the step's day of week d, Monday 0 ... Sunday 6 (Monday -> sin 0,
     cos 1; Wednesday -> sin(4 pi / 7), cos(4 pi / 7)). Whole days: the time within the day is
     the time-of-day channels'.

The sin/cos channels are named in `SampleSet.unnormalised_channels`, so the train-fitted
normaliser z-scores HR and SpO2 only: sin/cos are already on [-1, 1] (seed 003), and z-scoring
them would make their scale depend on the hours the training patients happen to cover.

Synthetic patients (csv=None), each recorded for `hours` from a random time of day (and a
random day of week, which nothing in them depends on):
    HR(t)   = hr_baseline * (1 + circadian_amplitude * cos(2 pi (h(t) - circadian_phase) / 24))
              + 0.8 bpm per % of desaturation + AR(1) noise (phi 0.98, sd 3 bpm)
    SpO2(t) = spo2_baseline - desaturation(t) + AR(1) noise (phi 0.98, sd 0.4 %)
    desaturation(t): Poisson episodes, each a sin^2 dip 30-180 s long
    High Risk patients (label 1, prevalence 0.3): tachycardia (+25 bpm on average), SpO2
    baseline 1-3 % lower, 6 desaturations per hour 5-12 % deep (Low Risk: 0.5 per hour, 2-4 %).
    Observations: HR every 1-5 s, SpO2 every 10-60 s, both rounded to integers as monitors
    report them, and sensor-off gaps of 1-10 min (about 1.5 per hour) with no observation at all.
"""

import csv
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

import numpy as np

from vaelab.data.base import SampleSet
from vaelab.data.noise import ar1
from vaelab.errors import DataError

logger = logging.getLogger(__name__)

CHANNELS = ["HR", "SpO2", "sin_time", "cos_time"]
TIME_CHANNELS = ("sin_time", "cos_time")
DAY_CHANNELS = ("sin_day", "cos_day")  # with day_of_week=True, after TIME_CHANNELS
COLUMNS = ("patient", "timestamp", "hr", "spo2")  # required; "label" optional
COLUMN_KEYS = (*COLUMNS, "label")  # the keys of `columns`
DAY_S = 86400.0
UNIX_EPOCH_WEEKDAY = 3  # 1970-01-01 was a Thursday (Monday = 0)
_MISSING = {"", "na", "n/a", "nan", "null", "none"}
_LABEL_TEXT = {"low risk": 0, "high risk": 1}

# Synthetic cohort (adult monitoring, roughly).
HIGH_RISK_PREVALENCE = 0.3
_AR_PHI = 0.98  # per second: slow drifts of a few tens of seconds
_HR_NOISE_SD, _SPO2_NOISE_SD = 3.0, 0.4  # stationary sd, bpm and %
_HR_PER_DESAT = 0.8  # bpm of hypoxic tachycardia per % of desaturation
_HR_INTERVAL_S, _SPO2_INTERVAL_S = (1, 5), (10, 60)  # observation intervals, inclusive
_GAPS_PER_HOUR, _GAP_S = 1.5, (60, 600)  # sensor-off gaps
_DESATS_PER_HOUR = (0.5, 6.0)  # desaturation episodes per hour, Low Risk and High Risk


@dataclass
class _Recording:
    """One patient's observations: each vital on its own times (seconds on the file's axis)."""

    name: str
    hr_t: np.ndarray
    hr: np.ndarray
    spo2_t: np.ndarray
    spo2: np.ndarray
    label: int | None
    weekday0: int = 0  # day of week (Monday 0) of the day starting at second 0 of the axis


# ----------------------------------------------------------------------------- CSV reader


def _number(path: str, cell: str, column: str, line: int) -> float:
    """One vital cell as float; NaN when empty/NA; a DataError naming the line otherwise."""
    text = cell.strip()
    if text.lower() in _MISSING:
        return math.nan
    try:
        value = float(text)
    except ValueError:
        raise DataError(
            f"{path}: line {line}: column '{column}': expected a number (or an empty cell), "
            f"found {cell!r}"
        ) from None
    if not math.isfinite(value):
        raise DataError(
            f"{path}: line {line}: column '{column}': expected a finite number, found {cell!r}"
        )
    return value


def _parse_times(
    path: str, cells: list[str], lines: list[int], column: str = "timestamp"
) -> tuple[np.ndarray, int]:
    """Timestamps as float64 seconds, numbers as given, ISO date-times from the first midnight,
    and the day of week (Monday 0) of second 0: Unix time's for numbers, the first date's."""
    expected = "seconds or ISO 8601 date-times (2024-03-01T06:00:00)"
    try:
        float(cells[0])
        numeric = True
    except ValueError:
        numeric = False
    if numeric:
        seconds = np.empty(len(cells))
        for i, (cell, line) in enumerate(zip(cells, lines, strict=True)):
            try:
                seconds[i] = float(cell)
            except ValueError:
                raise DataError(
                    f"{path}: line {line}: column '{column}': expected seconds like the first "
                    f"row ({cells[0]!r}), found {cell!r}"
                ) from None
            if not math.isfinite(seconds[i]):
                raise DataError(
                    f"{path}: line {line}: column '{column}': expected finite seconds, "
                    f"found {cell!r}"
                )
        return seconds, UNIX_EPOCH_WEEKDAY
    stamps = []
    for cell, line in zip(cells, lines, strict=True):
        try:
            stamps.append(datetime.fromisoformat(cell.strip()))
        except ValueError:
            raise DataError(
                f"{path}: line {line}: column '{column}': expected {expected}, found {cell!r}"
            ) from None
    # The time of day is read from the wall clock as written, which is only one clock when
    # every timestamp carries the same UTC offset (or none).
    offsets = {s.utcoffset() for s in stamps}
    if len(offsets) > 1:
        found = sorted(str(o) for o in offsets)
        raise DataError(
            f"{path}: column '{column}': expected one UTC offset (or none) for the whole file, "
            f"found {found}"
        )
    wall = np.array([s.replace(tzinfo=None) for s in stamps], dtype="datetime64[us]")
    origin = wall.min().astype("datetime64[D]")
    return (wall - origin) / np.timedelta64(1, "s"), origin.item().weekday()


def _parse_label(path: str, cell: str, line: int, column: str = "label") -> int | None:
    """0/1 from 0, 1, "Low Risk" or "High Risk" (any case); None for an empty cell."""
    text = cell.strip().lower()
    if text in _MISSING:
        return None
    if text in _LABEL_TEXT:
        return _LABEL_TEXT[text]
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if value in (0.0, 1.0):
        return int(value)
    raise DataError(
        f"{path}: line {line}: column '{column}': expected 0, 1, 'Low Risk' or 'High Risk', "
        f"found {cell!r}"
    )


def column_names(source: str, columns: Mapping[str, str] | None) -> dict[str, str]:
    """The CSV header name of each key of COLUMN_KEYS: its own name unless `columns` maps it;
    a DataError names a key that is not one, or a name that is not text."""
    mapping = dict(columns or {})
    unknown = sorted(set(mapping) - set(COLUMN_KEYS))
    if unknown:
        raise DataError(
            f"{source}: columns: unknown key(s) {', '.join(map(str, unknown))}: expected keys "
            f"{', '.join(COLUMN_KEYS)}, each mapped to a header name of the CSV"
        )
    for key, name in mapping.items():
        if not isinstance(name, str) or not name.strip():
            raise DataError(f"{source}: columns.{key}: expected a header name, found {name!r}")
    return {key: mapping.get(key, key).strip() for key in COLUMN_KEYS}


def _expected(names: dict[str, str]) -> str:
    """What the header should hold, in the file's names."""
    required = ", ".join(names[c] for c in COLUMNS)
    renamed = [f"{key}: {names[key]}" for key in COLUMN_KEYS if names[key] != key]
    mapped = f" through columns {{{', '.join(renamed)}}}" if renamed else ""
    return f"columns {required} ({names['label']} optional){mapped}"


def _read_csv(path: str, names: dict[str, str], label_required: bool) -> list[_Recording]:
    """Read and check the CSV into one recording per patient, in order of first appearance.
    `names`: the header name of each key (`column_names`)."""
    expected = _expected(names)
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found (expected a CSV with {expected})")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: expected a UTF-8 CSV with {expected}, found {err}") from err
    if not rows:
        raise DataError(f"{path}: empty file (expected a header with {expected})")
    header = [h.strip().lower() for h in rows[0]]
    required = (*COLUMNS, "label") if label_required else COLUMNS
    missing = [key for key in required if names[key].lower() not in header]
    if missing:
        which = ", ".join(
            names[key] if names[key] == key else f"{names[key]} (columns.{key})" for key in missing
        )
        raise DataError(
            f"{path}: missing column(s) {which}: expected {expected}, found columns {rows[0]}"
        )
    col = {
        key: header.index(names[key].lower()) for key in COLUMN_KEYS if names[key].lower() in header
    }

    patients, stamps, lines, hr, spo2, labels = [], [], [], [], [], []
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue  # blank line
        if len(row) < len(header):
            raise DataError(
                f"{path}: line {line}: expected {len(header)} fields like the header, "
                f"found {len(row)}"
            )
        patient = row[col["patient"]].strip()
        if not patient:
            raise DataError(
                f"{path}: line {line}: column '{names['patient']}': expected a name, found ''"
            )
        if not row[col["timestamp"]].strip():
            raise DataError(
                f"{path}: line {line}: column '{names['timestamp']}': expected a time, found ''"
            )
        patients.append(patient)
        stamps.append(row[col["timestamp"]])
        lines.append(line)
        hr.append(_number(path, row[col["hr"]], names["hr"], line))
        spo2.append(_number(path, row[col["spo2"]], names["spo2"], line))
        if "label" in col:
            labels.append(_parse_label(path, row[col["label"]], line, names["label"]))
    if not patients:
        raise DataError(f"{path}: expected at least one observation row, found only the header")
    seconds, weekday0 = _parse_times(path, stamps, lines, names["timestamp"])

    hr_a, spo2_a, patients_a = np.array(hr), np.array(spo2), np.array(patients)
    recordings = []
    for name in dict.fromkeys(patients):  # first-appearance order
        rows_of = np.flatnonzero(patients_a == name)
        label = None
        if "label" in col:
            found = sorted({labels[i] for i in rows_of} - {None})
            if len(found) != 1:
                what = "only empty cells" if not found else f"labels {found}"
                raise DataError(
                    f"{path}: patient '{name}': column '{names['label']}': expected one label "
                    f"per patient, found {what}"
                )
            label = found[0]
        t = seconds[rows_of]
        hr_t, hr_v = _unique_times(t, hr_a[rows_of])
        spo2_t, spo2_v = _unique_times(t, spo2_a[rows_of])
        recordings.append(_Recording(name, hr_t, hr_v, spo2_t, spo2_v, label, weekday0))
    return recordings


def _unique_times(t: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Observed (non-NaN) entries sorted by time, duplicates at one time averaged."""
    observed = np.isfinite(v)
    times, inverse = np.unique(t[observed], return_inverse=True)
    sums = np.bincount(inverse, weights=v[observed], minlength=len(times))
    return times, sums / np.bincount(inverse, minlength=len(times))


# ----------------------------------------------------------------------------- windows


@dataclass
class _Windows:
    """All windows of a cohort and where each came from."""

    values: np.ndarray  # (N, window, C) float32: C = 4, or 6 with the day of week
    patient: np.ndarray  # (N,) index into the recordings
    start: np.ndarray  # (N,) float64, time of the window's first step, seconds on the file axis


def _cut_windows(
    source: str, recordings: list[_Recording], window: int, step: int, day_of_week: bool = False
) -> _Windows:
    """Resample each recording to 1 s over the span both vitals cover, then slide windows."""
    parts, patient, start, skipped, longest = [], [], [], [], 0
    for p, rec in enumerate(recordings):
        n_grid = 0
        if len(rec.hr_t) and len(rec.spo2_t):
            first = max(rec.hr_t[0], rec.spo2_t[0])
            last = min(rec.hr_t[-1], rec.spo2_t[-1])
            n_grid = int(math.floor(last - first)) + 1 if last >= first else 0
        longest = max(longest, n_grid)
        if n_grid < window:
            skipped.append(rec.name)
            continue
        grid = first + np.arange(n_grid, dtype=np.float64)
        angle = 2.0 * np.pi * np.mod(grid, DAY_S) / DAY_S
        channels = [
            np.interp(grid, rec.hr_t, rec.hr),
            np.interp(grid, rec.spo2_t, rec.spo2),
            np.sin(angle),
            np.cos(angle),
        ]
        if day_of_week:  # whole days since second 0 of the axis, from that day's weekday
            weekday = np.mod(rec.weekday0 + np.floor(grid / DAY_S), 7.0)
            channels += [np.sin(2.0 * np.pi * weekday / 7.0), np.cos(2.0 * np.pi * weekday / 7.0)]
        series = np.stack(channels, axis=1)  # (L, C)
        # (n_windows, C, window) views every `step` samples, then (n_windows, window, C).
        windows = np.lib.stride_tricks.sliding_window_view(series, window, axis=0)[::step]
        parts.append(windows.transpose(0, 2, 1).astype(np.float32))
        patient.append(np.full(len(windows), p))
        start.append(grid[0] + step * np.arange(len(windows)))
    if skipped:
        logger.warning(
            "%s: skipped %d of %d patients with fewer than window=%d s of overlapping HR and "
            "SpO2 observations: %s%s",
            source,
            len(skipped),
            len(recordings),
            window,
            ", ".join(skipped[:10]),
            " ..." if len(skipped) > 10 else "",
        )
    if not parts:
        raise DataError(
            f"{source}: every one of the {len(recordings)} patients is shorter than one window: "
            f"expected at least window={window} s from the later first to the earlier last "
            f"observation of HR and SpO2, found at most {longest} s"
        )
    return _Windows(np.concatenate(parts), np.concatenate(patient), np.concatenate(start))


# ----------------------------------------------------------------------------- generator


def _observation_times(
    rng: np.random.Generator, n_s: int, interval: tuple[int, int], off: np.ndarray
) -> np.ndarray:
    """Integer seconds in [0, n_s) at irregular intervals, outside sensor-off gaps."""
    steps = rng.integers(interval[0], interval[1] + 1, n_s // interval[0] + 1)
    t = rng.integers(0, interval[1]) + np.cumsum(steps) - steps[0]
    t = t[t < n_s]
    return t[~off[t]]


def _synthetic_recordings(
    n: int, hours: float, seed: int
) -> tuple[list[_Recording], dict[str, np.ndarray], list[np.ndarray]]:
    """Generate n patients; returns recordings, patient factors and per-second desat flags."""
    rng = np.random.default_rng(seed)
    n_s = int(round(hours * 3600.0))
    high = rng.random(n) < HIGH_RISK_PREVALENCE
    factors = {
        "high_risk": high.astype(np.float64),
        # Resting HR including the tachycardia of High Risk patients, bpm.
        "hr_baseline": np.clip(rng.normal(72.0, 9.0, n), 50.0, 105.0)
        + high * np.clip(rng.normal(25.0, 5.0, n), 10.0, 40.0),
        "spo2_baseline": np.clip(rng.normal(97.5, 0.8, n), 95.0, 99.5)
        - high * rng.uniform(1.0, 3.0, n),  # %
        "circadian_amplitude": rng.uniform(0.03, 0.08, n),  # relative HR swing
        "circadian_phase": np.mod(rng.normal(16.0, 1.5, n), 24.0),  # hour of the HR peak
        "start_time": rng.integers(0, int(DAY_S), n).astype(np.float64),  # s after midnight
    }
    # The day of week of each patient's first day, from a stream of its own: the draws above
    # (and so every generated value) stay what they were before this option.
    weekday0 = np.random.default_rng([seed, 7]).integers(0, 7, n)
    recordings, desaturated = [], []
    t = np.arange(n_s, dtype=np.float64)
    for i in range(n):
        f = {k: v[i] for k, v in factors.items()}
        hour = np.mod(f["start_time"] + t, DAY_S) / 3600.0
        circadian = np.cos(2.0 * np.pi * (hour - f["circadian_phase"]) / 24.0)
        dip = np.zeros(n_s)
        rate = _DESATS_PER_HOUR[int(high[i])]
        for _ in range(rng.poisson(rate * hours)):
            onset, length = rng.integers(0, n_s), rng.integers(30, 181)
            depth = rng.uniform(5.0, 12.0) if high[i] else rng.uniform(2.0, 4.0)
            s = slice(onset, min(onset + length, n_s))
            dip[s] = np.maximum(dip[s], depth * np.sin(np.pi * (t[s] - onset) / length) ** 2)
        hr = f["hr_baseline"] * (1.0 + f["circadian_amplitude"] * circadian)
        hr += _HR_PER_DESAT * dip + ar1(rng, n_s, (), phi=_AR_PHI, sd=_HR_NOISE_SD)
        spo2 = f["spo2_baseline"] - dip + ar1(rng, n_s, (), phi=_AR_PHI, sd=_SPO2_NOISE_SD)

        off = np.zeros(n_s, dtype=bool)
        for _ in range(rng.poisson(_GAPS_PER_HOUR * hours)):
            onset = rng.integers(0, n_s)
            off[onset : onset + rng.integers(_GAP_S[0], _GAP_S[1] + 1)] = True
        hr_t = _observation_times(rng, n_s, _HR_INTERVAL_S, off)
        spo2_t = _observation_times(rng, n_s, _SPO2_INTERVAL_S, off)
        recordings.append(
            _Recording(
                name=f"P{i:04d}",
                hr_t=f["start_time"] + hr_t,
                hr=np.clip(np.round(hr[hr_t]), 30.0, 220.0),
                spo2_t=f["start_time"] + spo2_t,
                spo2=np.clip(np.round(spo2[spo2_t]), 50.0, 100.0),
                label=int(high[i]),
                weekday0=int(weekday0[i]),
            )
        )
        desaturated.append(dip > 0)
    return recordings, factors, desaturated


# ----------------------------------------------------------------------------- loader


def _check_arguments(
    source: str, window: int, overlap: float, n_patients: int, hours: float
) -> None:
    """Stop with one DataError naming the argument and what was expected."""
    if isinstance(window, bool) or not isinstance(window, int | np.integer) or window <= 1:
        raise DataError(f"{source}: window: expected an integer >= 2 (seconds), found {window!r}")
    if (
        isinstance(overlap, bool)
        or not isinstance(overlap, int | float)
        or not (0.0 <= overlap < 1.0)
    ):
        raise DataError(f"{source}: overlap: expected 0 <= overlap < 1, found {overlap!r}")
    if isinstance(n_patients, bool) or not isinstance(n_patients, int | np.integer):
        raise DataError(f"{source}: n_patients: expected an integer >= 1, found {n_patients!r}")
    if n_patients < 1:
        raise DataError(f"{source}: n_patients: expected an integer >= 1, found {n_patients}")
    if not isinstance(hours, int | float) or not hours > 0:
        raise DataError(f"{source}: hours: expected a number > 0, found {hours!r}")


def load_vitals_windows(
    csv: str | None = None,
    window: int = 256,
    overlap: float = 0.5,
    n_patients: int = 40,
    hours: float = 2.0,
    seed: int = 0,
    day_of_week: bool = False,
    columns: Mapping[str, str] | None = None,
) -> SampleSet:
    """Windows (N, window, C) of HR, SpO2, sin/cos time of day (C = 4), and sin/cos day of
    week with `day_of_week` (C = 6); see the module docstring.

    csv: the file to read, or None to generate `n_patients` patients of `hours` each from
    `seed` (those three are ignored when a file is read). columns: the file's header name of
    each of patient, timestamp, hr, spo2, label that is not named so (ignored when generating).
    """
    if csv is None:
        source = (
            f"vitals_windows(n_patients={n_patients}, hours={hours}, window={window}, "
            f"overlap={overlap}, seed={seed})"
        )
    else:
        source = os.fspath(csv)
    _check_arguments(source, window, overlap, n_patients, hours)
    if not isinstance(day_of_week, bool):
        raise DataError(f"{source}: day_of_week: expected true or false, found {day_of_week!r}")
    names = column_names(source, columns)
    window = int(window)
    # At least one sample: an overlap close to 1 would otherwise round the step to 0.
    step = max(1, int(round(window * (1.0 - float(overlap)))))

    factors: dict[str, np.ndarray] = {}
    if csv is None:
        recordings, patient_factors, desaturated = _synthetic_recordings(
            int(n_patients), float(hours), seed
        )
        cut = _cut_windows(source, recordings, window, step, day_of_week)
        factors = {k: v[cut.patient] for k, v in patient_factors.items() if k != "start_time"}
        # Window-level factors: share of the window's seconds inside a desaturation episode,
        # and the hour of day at its first step.
        offset = (cut.start - patient_factors["start_time"][cut.patient]).astype(np.int64)
        factors["desaturation_fraction"] = np.array(
            [
                desaturated[p][o : o + window].mean()
                for p, o in zip(cut.patient, offset, strict=True)
            ]
        )
        factors["time_of_day"] = np.mod(cut.start, DAY_S) / 3600.0
    else:
        recordings = _read_csv(source, names, label_required="label" in (columns or {}))
        cut = _cut_windows(source, recordings, window, step, day_of_week)

    names = np.array([r.name for r in recordings])
    groups = names[cut.patient]
    ids = np.array([f"{g}:{int(math.floor(s))}" for g, s in zip(groups, cut.start, strict=True)])
    labels = None
    if all(r.label is not None for r in recordings):
        labels = np.array([recordings[p].label for p in cut.patient], dtype=np.int64)
    n_used = len(np.unique(cut.patient))
    logger.info(
        "%s: %d windows of %d s (step %d s) from %d patients, %s",
        source,
        len(cut.values),
        window,
        step,
        n_used,
        "labels " + str(np.bincount(labels, minlength=2).tolist())
        if labels is not None
        else "no labels",
    )
    return SampleSet(
        values=cut.values,
        masks=None,
        ids=ids,
        groups=groups,
        channel_names=[*CHANNELS, *DAY_CHANNELS] if day_of_week else list(CHANNELS),
        labels=labels,
        factors=factors,
        source=source,
        # sin/cos already on [-1, 1] (seed 003: "time features are NOT normalized")
        unnormalised_channels=(*TIME_CHANNELS, *DAY_CHANNELS) if day_of_week else TIME_CHANNELS,
    )
