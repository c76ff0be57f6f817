"""3D MRI volumes (seed 004): the per-subject z-score, lesions of known shape, the HDF5 reader."""

import re

import numpy as np
import pytest

from vaelab.data.prepare import prepare
from vaelab.data.volumes import load_volumes
from vaelab.errors import DataError


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


def test_volumes_h5_round_trip(tmp_path, write_h5) -> None:
    rng = np.random.default_rng(0)
    # Scanner-like gain and offset per subject and channel, which the loader must remove.
    raw = rng.normal(size=(3, 4, 8, 8, 8)) * rng.uniform(1, 50, (3, 4, 1, 1, 1)) + 100.0
    path = write_h5(
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
def test_volumes_bad_h5_names_file_key_and_expectation(tmp_path, write_h5, case: str) -> None:
    datasets, pattern = BAD_VOLUMES[case]
    path = write_h5(tmp_path / f"{case}.h5", **datasets)
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


def test_volumes_centroid_factors_are_the_centre_of_mass_of_each_lesion() -> None:
    # The targets of seed 004's z_loc: the centroid of the voxels the lesion brightens in
    # FLAIR (t2f) against the same subject without it, in [-1, 1] coordinates.
    size = 32
    s = load_volumes(n_subjects=3, size=size, seed=5)
    c = (np.arange(size) + 0.5) / size * 2 - 1
    grid = np.stack(np.meshgrid(c, c, c, indexing="ij"))
    for i in range(3):
        centre = np.array([s.factors[f"centroid_{a}"][i] for a in "dhw"])
        semi = np.array([s.factors[f"lesion_radius_{a}"][i] * 2 / size for a in "dhw"])
        offset = (grid - centre[:, None, None, None]) / semi[:, None, None, None]
        inside = (offset**2).sum(axis=0) <= 1
        centre_of_mass = grid[:, inside].mean(axis=1)
        # within half a voxel (1 / size in [-1, 1] units) of the factor on every axis
        assert np.abs(centre_of_mass - centre).max() < 1.0 / size
        assert inside.sum() > 0
