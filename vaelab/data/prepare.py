"""From a `SampleSet` to training tensors: patient-level split, train-only normalisation.

A streamed file (`vaelab.data.streaming`) takes the same path: the split is made from its ids
and groups, which are in memory; one pass over the file checks every sample before training,
as the in-memory reader does, and fits the normaliser on the training split as it goes
(per-chunk moments merged by Chan et al. 1979); the values and masks are `StreamedTensor`s
that read and normalise the samples a batch asks for.
"""

import logging
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from tqdm import tqdm

from vaelab.data.base import SampleSet
from vaelab.data.streaming import StreamedSamples, StreamedTensor, contiguous_plan, stream
from vaelab.errors import DataError

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
STD_FLOOR = 1e-6
# Entries `Normaliser.transform` works on at once, in float64: 256k = 2 MB.
TRANSFORM_BLOCK_ENTRIES = 1 << 18


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
        return cls.from_moments(*channel_moments(values, observed), channel_axis, tuple(keep))

    @classmethod
    def from_moments(
        cls,
        count: np.ndarray,
        mean: np.ndarray,
        m2: np.ndarray,
        channel_axis: int = -1,
        unnormalised: tuple[int, ...] = (),
    ) -> "Normaliser":
        """The normaliser of per-channel observed counts, means and sums of squared
        deviations (`channel_moments`, or their merge over the chunks of a streamed file)."""
        keep = sorted({int(i) for i in unnormalised})
        empty = [i for i in np.flatnonzero(count == 0).tolist() if i not in keep]
        if empty:
            raise DataError(
                f"normaliser: expected observed entries in every channel of the training split, "
                f"found none in channel(s) {empty}"
            )
        var = m2 / np.maximum(count, 1)  # only unnormalised channels can be empty here
        # A channel constant in the training split (the corner pixels of digits, say) is only
        # centred: dividing by a tiny std would turn any other value it takes in validation
        # or new data into a huge one.
        std = np.sqrt(var)
        std[std < STD_FLOOR] = 1.0
        mean = mean.copy()
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

    def transform(
        self, values: np.ndarray, masks: np.ndarray | None = None, out: np.ndarray | None = None
    ) -> np.ndarray:
        """Z-score values; unobserved entries become 0.0, the channel mean. `out`: a float32
        array of the values' shape to write into, `values` itself included."""
        values = np.asarray(values)
        shape = self._broadcast_shape(values)
        mean, std = self.mean.reshape(shape), self.std.reshape(shape)
        if out is None:
            out = np.empty(values.shape, dtype=np.float32)
        # A block of samples at a time, in place in float64: the numbers of
        # ((values - mean) / std).astype(float32), without float64 copies of the whole data
        # (twice its float32 size) nor a new array for every step. A streamed file normalises
        # every batch it reads, into the array it read: few, small allocations a step, which
        # the C allocator reuses, where large ones left a 300 MB run's heap 100 MB larger.
        sample_size = max(1, values[0].size if values.ndim > 1 and len(values) else 1)
        step = max(1, TRANSFORM_BLOCK_ENTRIES // sample_size)
        for start in range(0, len(values), step):
            block = values[start : start + step].astype(np.float64)
            block -= mean
            block /= std
            if masks is not None:
                block[~(np.asarray(masks[start : start + step]) > 0)] = 0.0
            out[start : start + step] = block
        return out

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


def channel_moments(
    values: np.ndarray, observed: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per channel (the last axis) of float64 values: observed count, mean and sum of squared
    deviations from the mean, over the entries where `observed` is True."""
    axes = tuple(range(values.ndim - 1))
    count = observed.sum(axis=axes)
    # np.where, not values * masks: unobserved entries may hold NaN or huge numbers.
    v = np.where(observed, values, 0.0)
    mean = v.sum(axis=axes) / np.maximum(count, 1)
    m2 = (np.where(observed, values - mean, 0.0) ** 2).sum(axis=axes)
    return count, mean, m2


def merge_moments(
    a: tuple[np.ndarray, np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray, np.ndarray]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The moments of two parts of the data from those of each part (Chan, Golub & LeVeque
    1979, the pairwise update): stable where a running sum of squares would cancel."""
    (na, ma, m2a), (nb, mb, m2b) = a, b
    n = na + nb
    safe = np.maximum(n, 1)  # a channel empty in both parts stays at 0
    delta = mb - ma
    # nb / n first: merging into nothing (na = 0) then gives the part's mean exactly.
    return n, ma + delta * (nb / safe), m2a + m2b + delta**2 * (na * nb / safe)


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
    """A data set ready for training: split names, fitted normaliser and normalised tensors
    (for a streamed file, `StreamedTensor`s that read the samples a batch asks for)."""

    sampleset: SampleSet
    split: np.ndarray  # (N,) "train" / "val" / "test"
    normaliser: Normaliser
    values: torch.Tensor | StreamedTensor  # (N, ...) float32, normalised, 0.0 where unobserved
    masks: torch.Tensor | StreamedTensor  # (N, ...) float32, all ones when the set had no masks

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
    streamed = isinstance(sampleset.values, StreamedSamples)
    try:
        split = split_by_group(sampleset.groups, val_fraction, test_fraction, seed)
        train = split == "train"
        unknown = [c for c in sampleset.unnormalised_channels if c not in sampleset.channel_names]
        if unknown:
            raise DataError(
                f"unnormalised_channels: expected names from channel_names "
                f"{list(sampleset.channel_names)}, found {unknown}"
            )
        keep = tuple(sampleset.channel_names.index(c) for c in sampleset.unnormalised_channels)
        if not streamed:
            masks = sampleset.masks
            if masks is None:
                masks = np.ones(sampleset.values.shape, dtype=np.float32)
            normaliser = Normaliser.fit(
                sampleset.values[train], masks[train], sampleset.channel_axis, unnormalised=keep
            )
    except DataError as err:
        # The split and the normaliser do not know where the data came from; the user does.
        raise DataError(f"{sampleset.source}: {err}") from err
    if streamed:
        # The pass reads every sample; a bad one stops it with the file, key and sample named.
        moments, observed = _scan(sampleset.values, train, sampleset.channel_axis)
        try:
            normaliser = Normaliser.from_moments(*moments, sampleset.channel_axis, keep)
        except DataError as err:
            raise DataError(f"{sampleset.source}: {err}") from err
        values = StreamedTensor(sampleset.values, normaliser, "values")
        masks_t = StreamedTensor(sampleset.values, normaliser, "masks")
    else:
        values = torch.from_numpy(normaliser.transform(sampleset.values, masks))
        masks_t = torch.from_numpy(np.ascontiguousarray(masks, dtype=np.float32))
        observed = float(masks_t.mean())
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
        observed,
    )
    return PreparedData(
        sampleset=sampleset, split=split, normaliser=normaliser, values=values, masks=masks_t
    )


def normalised(sampleset: SampleSet, normaliser: Normaliser) -> torch.Tensor | StreamedTensor:
    """The samples through a fitted normaliser (0.0 where unobserved): a tensor, or for a
    streamed file a `StreamedTensor` that normalises each chunk as it is read."""
    if isinstance(sampleset.values, StreamedSamples):
        return StreamedTensor(sampleset.values, normaliser, "values")
    return torch.from_numpy(normaliser.transform(sampleset.values, sampleset.masks))


def _chunk_moments(
    samples: StreamedSamples, train: np.ndarray, channel_axis: int, rows: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One chunk of the checking pass (in a DataLoader worker): read and check the rows, and
    return the moments of their training rows and the observed entries of all of them."""
    values, masks = samples.read(rows, report=True)
    n_observed = np.array([values.size if masks is None else float(masks.sum()), values.size])
    values = values[train[rows]]
    axis = _channel_axis(channel_axis, values.shape)
    if masks is not None:  # channels to the last axis, as Normaliser.fit does
        observed = np.moveaxis(masks[train[rows]] > 0, axis, -1)
        return (
            *channel_moments(np.moveaxis(values.astype(np.float64), axis, -1), observed),
            n_observed,
        )
    # Without masks every entry counts: one float64 copy, worked on in place, rather than
    # the masked path's several (a chunk of volumes is megabytes).
    axes = tuple(a for a in range(values.ndim) if a != axis)
    count = np.full(values.shape[axis], values.size // max(values.shape[axis], 1))
    shape = [1] * values.ndim
    shape[axis] = -1
    mean = values.sum(axis=axes, dtype=np.float64) / np.maximum(count, 1)
    deviations = values.astype(np.float64)
    deviations -= mean.reshape(shape)
    deviations *= deviations
    return count, mean, deviations.sum(axis=axes), n_observed


def _scan(
    samples: StreamedSamples, train: np.ndarray, channel_axis: int
) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], float]:
    """One pass over a streamed file before training: check every sample, as the in-memory
    reader does, and take the per-channel moments of the training split for the normaliser.
    Returns them and the observed fraction of all entries."""
    n_channels = samples.shape[channel_axis]
    moments = (np.zeros(n_channels), np.zeros(n_channels), np.zeros(n_channels))
    observed = np.zeros(2)
    plan = contiguous_plan(0, len(samples), samples.chunk_rows())
    chunks = stream(samples, partial(_chunk_moments, samples, train, channel_axis), plan)
    for chunk in tqdm(chunks, total=len(plan), desc="check + fit normaliser", disable=None):
        count, mean, m2, n_observed = (np.asarray(part, dtype=np.float64) for part in chunk)
        moments = merge_moments(moments, (count, mean, m2))
        observed += n_observed
    logger.info(
        "%s: checked %d samples in %d chunks, normaliser fitted on the %d of the training split",
        samples.path,
        len(samples),
        len(plan),
        int(train.sum()),
    )
    return moments, float(observed[0] / max(observed[1], 1))
