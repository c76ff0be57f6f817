"""The HDF5 reader (seed 001 layout): round trips, defaults, and one DataError per bad file.

Every input here is constructed so the right answer is known in advance.
"""

import re

import h5py
import numpy as np
import pytest

from vaelab.data.h5 import load_h5
from vaelab.errors import DataError


@pytest.fixture
def seed001_file(write_h5):
    """seed001_file(path, n, t, c, **overrides) -> str: a valid file in the seed 001 layout.

    Any dataset can be replaced by an override, or removed with None.
    """

    def _write(path, n: int = 6, t: int = 5, c: int = 3, **overrides) -> str:
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

    return _write


def test_h5_round_trip_seed001_layout(tmp_path, seed001_file) -> None:
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


def test_h5_str_ids_groups_and_float64_values(tmp_path, write_h5) -> None:
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


def test_h5_feature_vectors_get_defaults(tmp_path, write_h5) -> None:
    path = write_h5(tmp_path / "features.h5", values=np.ones((3, 4), dtype=np.float32))
    s = load_h5(path)
    assert s.values.shape == (3, 4)
    assert list(s.ids) == ["S0000", "S0001", "S0002"]
    assert s.channel_names == ["f0", "f1", "f2", "f3"]


def test_h5_custom_keys(tmp_path, write_h5) -> None:
    path = write_h5(
        tmp_path / "custom.h5", x=np.ones((2, 3, 1)), m=np.zeros((2, 3, 1)), values=np.zeros(1)
    )
    s = load_h5(path, values_key="x", masks_key="m")
    assert s.values.shape == (2, 3, 1) and s.masks.sum() == 0


def test_h5_nan_at_masked_position_is_zero_filled(tmp_path, write_h5) -> None:
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
def test_h5_bad_input_names_file_and_key(tmp_path, seed001_file, case: str) -> None:
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
