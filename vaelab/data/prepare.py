"""From a `SampleSet` to training tensors: patient-level split, train-only normalisation."""

import logging
from dataclasses import dataclass

import numpy as np
import torch

from vaelab.data.base import SampleSet
from vaelab.errors import DataError

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
STD_FLOOR = 1e-6


def _group_count(fraction: float, n_groups: int) -> int:
    """Groups for a split: fraction x n_groups rounded half up, at least 1 if fraction > 0."""
    if fraction <= 0:
        return 0
    # Half up, not Python's round-half-to-even, so 2.5 and 3.5 groups both round up.
    # At least one group, so a small data set never silently trains without validation.
    return max(1, int(np.floor(fraction * n_groups + 0.5)))


def split_by_group(
    groups: np.ndarray, val_fraction: float, test_fraction: float, seed: int
) -> np.ndarray:
    """Assign each sample to "train", "val" or "test" so that no group is in two splits."""
    groups = np.asarray(groups)
    asked = f"val_fraction={val_fraction}, test_fraction={test_fraction}"
    if groups.ndim != 1:
        raise DataError(f"split: groups: expected shape (N,), found shape {groups.shape}")
    # np.unique sorts, so the permutation below depends only on the set of groups and the seed,
    # not on the order of the samples in the file.
    unique, inverse = np.unique(groups, return_inverse=True)
    n_groups = len(unique)
    if not (0.0 <= val_fraction and 0.0 <= test_fraction and val_fraction + test_fraction < 1.0):
        raise DataError(
            f"split: {n_groups} groups: expected fractions >= 0 with val_fraction + "
            f"test_fraction < 1 (train needs the rest), found {asked}"
        )
    n_val = _group_count(val_fraction, n_groups)
    n_test = _group_count(test_fraction, n_groups)
    if n_val + n_test >= n_groups:
        raise DataError(
            f"split: {n_groups} groups cannot fill train, val and test with {asked} "
            f"({n_val} val + {n_test} test groups leave {n_groups - n_val - n_test} for train)"
        )
    order = np.random.default_rng(seed).permutation(n_groups)
    group_split = np.full(n_groups, "train", dtype="<U5")
    group_split[order[:n_val]] = "val"
    group_split[order[n_val : n_val + n_test]] = "test"
    return group_split[inverse.reshape(-1)]


@dataclass
class Normaliser:
    """Per-channel z-score, fitted on observed training entries only.

    The channels lie on `channel_axis` of a batch (N, ...): the last axis of (N, T, C) and
    (N, F), axis 1 of channel-first volumes (N, C, D, H, W). Volumes keep this global
    normaliser, although their loader has already z-scored each subject and channel (seed 004),
    rather than a flag that skips it: on such data it fits a near-identity, and in exchange
    every data set gets the same path through training, checkpoints and `inverse_transform`,
    and a channel-first file that was not normalised beforehand is still handled.
    """

    mean: np.ndarray  # (C,) float64; 0 for channels fitted as unnormalised
    std: np.ndarray  # (C,) float64; 1 for channels constant in training or left unnormalised
    channel_axis: int = -1  # axis of a batch (N, ...) holding the channels

    @classmethod
    def fit(
        cls,
        values: np.ndarray,
        masks: np.ndarray | None = None,
        channel_axis: int = -1,
        unnormalised: tuple[int, ...] = (),
    ) -> "Normaliser":
        """Mean and population std of each channel over the entries where masks is 1.

        `unnormalised` lists channel indices left as they are (mean 0, std 1): channels that
        already sit on a fixed scale, such as sin/cos time of day (seed 003).
        """
        values = np.asarray(values, dtype=np.float64)
        axis = _channel_axis(channel_axis, values.shape)
        if axis == 0 and values.ndim > 1:
            raise DataError(
                f"normaliser: channel_axis {channel_axis}: expected an axis after the sample "
                f"axis, found shape {values.shape}"
            )
        observed = np.ones(values.shape, dtype=bool) if masks is None else np.asarray(masks) > 0
        # Channels to the last axis: the statistics below then reduce over all other axes.
        values = np.moveaxis(values, axis, -1)
        observed = np.moveaxis(observed, axis, -1)
        n_channels = values.shape[-1]
        keep = sorted({int(i) for i in unnormalised})
        if any(not 0 <= i < n_channels for i in keep):
            raise DataError(
                f"normaliser: unnormalised channels: expected indices in [0, {n_channels}), "
                f"found {keep}"
            )
        axes = tuple(range(values.ndim - 1))
        count = observed.sum(axis=axes)
        empty = [i for i in np.flatnonzero(count == 0).tolist() if i not in keep]
        if empty:
            raise DataError(
                f"normaliser: expected observed entries in every channel of the training split, "
                f"found none in channel(s) {empty}"
            )
        count = np.maximum(count, 1)  # only unnormalised channels can be empty here
        # np.where, not values * masks: unobserved entries may hold NaN or huge numbers.
        v = np.where(observed, values, 0.0)
        mean = v.sum(axis=axes) / count
        var = (np.where(observed, values - mean, 0.0) ** 2).sum(axis=axes) / count
        # A channel constant in the training split (the corner pixels of digits, say) is only
        # centred: dividing by a tiny std would turn any other value it takes in validation
        # or new data into a huge one.
        std = np.sqrt(var)
        std[std < STD_FLOOR] = 1.0
        mean[keep] = 0.0
        std[keep] = 1.0
        return cls(mean=mean, std=std, channel_axis=int(channel_axis))

    def _broadcast_shape(self, values: np.ndarray | torch.Tensor) -> tuple[int, ...]:
        """Shape that lines mean/std up with the channel axis; stops on a mismatch."""
        axis = _channel_axis(self.channel_axis, tuple(values.shape))
        if values.shape[axis] != len(self.mean):
            where = "the last axis" if self.channel_axis == -1 else f"axis {self.channel_axis}"
            raise DataError(
                f"normaliser: expected {len(self.mean)} channels on {where}, "
                f"found shape {tuple(values.shape)}"
            )
        shape = [1] * values.ndim
        shape[axis] = len(self.mean)
        return tuple(shape)

    def transform(self, values: np.ndarray, masks: np.ndarray | None = None) -> np.ndarray:
        """Z-score values; unobserved entries become 0.0, the channel mean."""
        shape = self._broadcast_shape(values)
        mean, std = self.mean.reshape(shape), self.std.reshape(shape)
        out = (np.asarray(values, dtype=np.float64) - mean) / std
        if masks is not None:
            out = np.where(np.asarray(masks) > 0, out, 0.0)
        return out.astype(np.float32)

    def inverse_transform(self, values: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """Back to the original units; a tensor in gives a tensor out (for reconstructions)."""
        shape = self._broadcast_shape(values)
        if isinstance(values, torch.Tensor):
            mean = torch.as_tensor(self.mean, dtype=values.dtype, device=values.device)
            std = torch.as_tensor(self.std, dtype=values.dtype, device=values.device)
            return values * std.reshape(shape) + mean.reshape(shape)
        out = np.asarray(values, dtype=np.float64) * self.std.reshape(shape)
        return (out + self.mean.reshape(shape)).astype(np.float32)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only, so a checkpoint loads with torch.load(weights_only=True)."""
        return {
            "mean": torch.from_numpy(self.mean.copy()),
            "std": torch.from_numpy(self.std.copy()),
            "channel_axis": torch.tensor(self.channel_axis, dtype=torch.int64),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> "Normaliser":
        """Rebuild from `state_dict()`; states saved before `channel_axis` existed mean -1."""
        axis = state.get("channel_axis")
        return cls(
            mean=state["mean"].detach().cpu().numpy().astype(np.float64),
            std=state["std"].detach().cpu().numpy().astype(np.float64),
            channel_axis=-1 if axis is None else int(axis),
        )


def _channel_axis(channel_axis: int, shape: tuple[int, ...]) -> int:
    """The non-negative channel axis of an array of this shape; stops if it has no such axis."""
    ndim = len(shape)
    if not -ndim <= channel_axis < ndim:
        raise DataError(
            f"normaliser: expected a channel axis {channel_axis} in the data, found shape {shape}"
        )
    return channel_axis % ndim


@dataclass
class PreparedData:
    """A data set ready for training: split names, fitted normaliser and normalised tensors."""

    sampleset: SampleSet
    split: np.ndarray  # (N,) "train" / "val" / "test"
    normaliser: Normaliser
    values: torch.Tensor  # (N, ...) float32, normalised, 0.0 where unobserved
    masks: torch.Tensor  # (N, ...) float32, all ones when the set had no masks

    def indices(self, split_name: str) -> torch.Tensor:
        """Sample indices (long) of one split; empty when that split was not asked for."""
        if split_name not in SPLITS:
            raise ValueError(f"split_name: expected one of {SPLITS}, found {split_name!r}")
        return torch.from_numpy(np.flatnonzero(self.split == split_name)).long()


def prepare(
    sampleset: SampleSet, val_fraction: float, test_fraction: float, seed: int
) -> PreparedData:
    """Split by group, fit the normaliser on train, normalise every sample into tensors."""
    n = len(sampleset)
    if len(sampleset.groups) != n:
        raise DataError(
            f"{sampleset.source}: groups: expected {n} entries (one per sample), "
            f"found {len(sampleset.groups)}"
        )
    try:
        split = split_by_group(sampleset.groups, val_fraction, test_fraction, seed)
        train = split == "train"
        masks = sampleset.masks
        if masks is None:
            masks = np.ones(sampleset.values.shape, dtype=np.float32)
        unknown = [c for c in sampleset.unnormalised_channels if c not in sampleset.channel_names]
        if unknown:
            raise DataError(
                f"unnormalised_channels: expected names from channel_names "
                f"{list(sampleset.channel_names)}, found {unknown}"
            )
        keep = tuple(sampleset.channel_names.index(c) for c in sampleset.unnormalised_channels)
        normaliser = Normaliser.fit(
            sampleset.values[train], masks[train], sampleset.channel_axis, unnormalised=keep
        )
    except DataError as err:
        # The split and the normaliser do not know where the data came from; the user does.
        raise DataError(f"{sampleset.source}: {err}") from err
    values = torch.from_numpy(normaliser.transform(sampleset.values, masks))
    masks_t = torch.from_numpy(np.ascontiguousarray(masks, dtype=np.float32))
    counts = {name: int((split == name).sum()) for name in SPLITS}
    groups = np.asarray(sampleset.groups)
    group_counts = {name: len(np.unique(groups[split == name])) for name in SPLITS}
    logger.info(
        "prepare %s: train/val/test = %d/%d/%d samples (%d/%d/%d groups), sample shape %s, "
        "observed fraction %.3f",
        sampleset.source,
        *counts.values(),
        *group_counts.values(),
        sampleset.sample_shape,
        float(masks_t.mean()),
    )
    return PreparedData(
        sampleset=sampleset, split=split, normaliser=normaliser, values=values, masks=masks_t
    )
