"""Group splits, the train-fitted normaliser and `prepare`, on data with known statistics.

Every input here is constructed so the right answer is known in advance.
"""

import numpy as np
import pytest
import torch

from vaelab.data.base import SampleSet
from vaelab.data.prepare import Normaliser, PreparedData, prepare, split_by_group
from vaelab.data.volumes import MODALITIES
from vaelab.errors import DataError

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


def test_prepare_rejects_unknown_unnormalised_channel() -> None:
    s = channel_first_set()
    s.unnormalised_channels = ("t1c", "flair")
    with pytest.raises(DataError, match=r"^channel_first: unnormalised_channels:.*\['flair'\]"):
        prepare(s, 0.2, 0.2, seed=0)
