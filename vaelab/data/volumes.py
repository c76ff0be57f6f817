"""3D multi-modal MRI volumes (seed 004): (N, 4, D, H, W), z-scored per subject and channel.

HDF5 layout: `volumes` (N, 4, D, H, W), numbers, channel-first, the 4 modalities in the order
t1c, t1n, t2f, t2w; optional `ids` (N,), `groups` (N,) (the subject of each scan, when one
subject has several scans, so that splits keep them together; default: the ids) and `labels`
(N,). Volumes must be cubes, D = H = W >= 8 (seed 004 uses 128^3): a 3D encoder-decoder that
halves and doubles every side gives back the input shape only when the sides agree, so crop or
pad other shapes first. Every problem stops with one `DataError` naming the file and the key.

A file larger than `memory_budget_mb` (or any file with in_memory=false) is streamed
(`vaelab.data.streaming`): 500 subjects of 4 x 128^3 float32 are 16 GB. Its layout is checked
here; each chunk read is checked for NaN (the error names the file, the key and the sample)
and z-scored per subject by `check_chunk`, the same code the in-memory reader runs.
`write_volumes` writes generated subjects to such a file, one HDF5 chunk per subject.

Each subject's channels are z-scored over all their voxels here, in the loader: seed 004 makes
per-subject, per-channel z-scoring mandatory, to remove scanner gain and offset. The train-fitted
normaliser of `prepare` then still runs (over axis 1, `SampleSet.channel_axis`) and finds
mean 0 and std 1, so it changes nothing but keeps one path for every data set.

Synthetic subjects (path=None), on a grid of voxel centres with coordinates in [-1, 1]
(voxel index i of `size` maps to (i + 0.5) / size * 2 - 1):
    brain   = an ellipsoid (semi-axes 0.78, 0.85, 0.70 times `brain_scale`) holding smooth tissue:
              per-modality base intensity, a centre-to-edge contrast (white/grey matter, bright
              in T1, dark in T2) and low-frequency noise (Gaussian-filtered, sigma = size / 8)
    lesion  = one ellipsoid inside the brain, added with a per-modality contrast times
              `lesion_intensity`: t1c +0.9 (enhancing), t1n -0.35, t2f +0.8 (FLAIR bright),
              t2w +0.6
    scanner = a per-subject, per-modality gain (0.6-1.6) and offset (+-0.2) plus white noise
              (sd 0.03), which the per-subject z-score removes
Factors, one value per subject: `lesion_volume` (voxels, 4/3 pi times the product of the three
semi-axes in voxels; the voxels whose centres fall inside the ellipsoid count this up to
discretisation), `centroid_d`, `centroid_h`, `centroid_w` (the lesion centre in the [-1, 1]
coordinates above), `lesion_radius_d/h/w` (semi-axes, voxels), `lesion_intensity`
(dimensionless contrast multiplier) and `brain_scale`.
"""

import logging
import math
import os
from functools import partial

import h5py
import numpy as np
from scipy.ndimage import gaussian_filter
from tqdm import tqdm

from vaelab.data.base import SampleSet
from vaelab.data.h5 import (
    chunk_note,
    first_index,
    numeric_dataset,
    open_h5,
    read_1d,
    read_numeric,
    sample_index,
)
from vaelab.data.streaming import FLOAT32_BYTES, StreamedSamples, should_stream
from vaelab.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

MODALITIES = ["t1c", "t1n", "t2f", "t2w"]
VALUES_KEY = "volumes"
CHANNEL_AXIS = 1  # (N, C, D, H, W): channel-first, as 3D convolutions take them
MIN_SIZE = 8
STD_FLOOR = 1e-6
LAYOUT = "(N, 4, D, H, W)"

# Synthetic anatomy, per modality in the order of MODALITIES.
_TISSUE_BASE = np.array([0.8, 0.7, 0.6, 0.9])
_TISSUE_CENTRE = np.array([0.2, 0.25, -0.1, -0.3])  # added at the brain centre, 0 at its edge
_LESION_CONTRAST = np.array([0.9, -0.35, 0.8, 0.6])
_TEXTURE_SD = 0.15
_NOISE_SD = 0.03
_BRAIN_AXES = np.array([0.78, 0.85, 0.70])
# Lesion centre within +-0.38 and semi-axes <= 0.22 (both in [-1, 1] units): with the brain
# scale >= 0.92 and its centre within +-0.02, every lesion lies inside the brain.
_LESION_CENTRE_MAX = 0.38
_LESION_RADIUS = (0.10, 0.22)
_BRAIN_SCALE = (0.92, 1.05)


def coordinates(size: int) -> np.ndarray:
    """Voxel-centre coordinates in [-1, 1] along one side of `size` voxels."""
    return (np.arange(size) + 0.5) / size * 2.0 - 1.0


def ellipsoid(size: int, centre: np.ndarray, semi_axes: np.ndarray) -> np.ndarray:
    """Boolean (size, size, size): voxels whose centres lie in the ellipsoid ([-1, 1] units)."""
    c = coordinates(size)
    d, h, w = np.meshgrid(c, c, c, indexing="ij")
    r2 = (
        ((d - centre[0]) / semi_axes[0]) ** 2
        + ((h - centre[1]) / semi_axes[1]) ** 2
        + ((w - centre[2]) / semi_axes[2]) ** 2
    )
    return r2 <= 1.0


def _zscore_per_subject(values: np.ndarray, source: str, warn: bool = True) -> np.ndarray:
    """Z-score every subject's channel over its voxels, in place (seed 004). warn=False keeps
    quiet about constant channels (a streamed file warns in its checking pass, not on every
    read of every epoch)."""
    constant = 0
    if len(values) == 0:
        return values
    # One subject at a time, in two float64 buffers reused in place: a streamed file z-scores
    # every batch it reads, and this is the bulk of a read. The operations are numpy's own
    # mean and std (sum of the squared deviations from that mean, over n), step by step, so
    # the numbers are those of ((v - v.mean()) / v.std()).astype(float32).
    v = np.empty(values.shape[1:], dtype=np.float64)
    squares = np.empty_like(v)
    axes = (1, 2, 3)
    n = math.prod(values.shape[2:])
    for i in range(len(values)):
        np.copyto(v, values[i])
        v -= v.mean(axis=axes, keepdims=True)
        np.multiply(v, v, out=squares)
        std = np.sqrt(squares.sum(axis=axes, keepdims=True) / n)
        constant += int((std < STD_FLOOR).sum())
        # A constant channel (a modality stored as zeros, say) becomes 0 instead of NaN.
        v /= np.maximum(std, STD_FLOOR)
        np.copyto(values[i], v)  # float64 -> float32, rounded as astype rounds
    if constant and warn:
        logger.warning("%s: %d constant subject channels set to 0 by the z-score", source, constant)
    return values


# ----------------------------------------------------------------------------- reader


def _check_finite(where: str, values: np.ndarray, rows: np.ndarray | None) -> None:
    """Every voxel finite (of the whole file, or of the streamed subjects `rows`)."""
    finite = np.isfinite(values)
    if not finite.all():
        bad = ~finite
        idx = first_index(bad)
        raise DataError(
            f"{where}: expected finite values, found {int(bad.sum())} NaN/inf entries, "
            f"first {values[idx]} at index {sample_index(idx, rows)}{chunk_note(rows)}"
        )


def check_chunk(
    path: str, values: np.ndarray, masks: None, rows: np.ndarray, report: bool = False
) -> np.ndarray:
    """A streamed chunk of subjects `rows`: finite, then z-scored per subject and channel in
    place, as the in-memory reader does to the whole file. Volumes have no masks."""
    _check_finite(f"{path}: key '{VALUES_KEY}'", values, rows)
    return _zscore_per_subject(values, path, warn=report)


def _read_volumes(
    path: str, in_memory: bool | str, memory_budget_mb: float, num_workers: int
) -> tuple[SampleSet, bool]:
    """Read and check the HDF5 layout of the module docstring (before the z-score), or, when
    it is to be streamed, check its layout and return its samples unread. Also returns
    whether the file is streamed."""
    with open_h5(path, f"an HDF5 file with key '{VALUES_KEY}' {LAYOUT}") as file:
        if VALUES_KEY not in file:
            raise DataError(
                f"{path}: key '{VALUES_KEY}' not found; the file has keys {sorted(file.keys())}"
            )
        node = file[VALUES_KEY]
        shape = tuple(node.shape) if isinstance(node, h5py.Dataset) else None
        where = f"{path}: key '{VALUES_KEY}'"
        # Shape checks before reading, so a wrong file is refused without loading it.
        if shape is not None and len(shape) != 5:
            raise DataError(f"{where}: expected {LAYOUT}, found shape {shape}")
        if shape is not None and shape[1] != len(MODALITIES):
            raise DataError(
                f"{where}: expected 4 channels ({', '.join(MODALITIES)}) on axis 1 of {LAYOUT}, "
                f"found shape {shape}"
            )
        if shape is not None and shape[0] == 0:
            raise DataError(f"{where}: expected at least one volume, found shape {shape}")
        if shape is not None and not shape[2] == shape[3] == shape[4]:
            raise DataError(
                f"{where}: expected cubes, D = H = W in {LAYOUT} (crop or pad first), "
                f"found shape {shape}"
            )
        if shape is not None and shape[2] < MIN_SIZE:
            raise DataError(
                f"{where}: expected D = H = W >= {MIN_SIZE} in {LAYOUT}, found shape {shape}"
            )
        shape = tuple(numeric_dataset(path, file, VALUES_KEY).shape)
        data_bytes = math.prod(shape) * FLOAT32_BYTES
        streamed = should_stream(in_memory, data_bytes, memory_budget_mb, path)
        if streamed:
            check = partial(check_chunk, path)
            values = StreamedSamples(
                path, VALUES_KEY, shape, None, check, memory_budget_mb, num_workers
            )
        else:
            values = read_numeric(path, file, VALUES_KEY)
        n = len(values)
        ids = read_1d(path, file, "ids", n, "one id per volume", strings=True)
        groups = read_1d(path, file, "groups", n, "one subject per volume", strings=True)
        labels = read_1d(path, file, "labels", n, "one label per volume", strings=False)

    if not streamed:  # a streamed file is checked chunk by chunk as it is read
        _check_finite(where, values, None)
    if ids is None:
        ids = np.array([f"S{i:04d}" for i in range(n)])
    if labels is not None and labels.dtype.kind in "iub":
        labels = labels.astype(np.int64)
    samples = SampleSet(
        values=values,
        masks=None,
        ids=ids,
        groups=ids.copy() if groups is None else groups,
        channel_names=list(MODALITIES),
        labels=labels,
        source=path,
        channel_axis=CHANNEL_AXIS,
    )
    return samples, streamed


# ----------------------------------------------------------------------------- generator


def _generate(n: int, size: int, seed: int, source: str) -> SampleSet:
    """Synthetic subjects with one lesion each (see the module docstring), before the z-score."""
    rng = np.random.default_rng(seed)
    c = coordinates(size)
    d, h, w = np.meshgrid(c, c, c, indexing="ij")
    factors = {
        "brain_scale": rng.uniform(*_BRAIN_SCALE, n),
        "lesion_intensity": rng.uniform(0.6, 1.4, n),
    }
    centres = rng.uniform(-_LESION_CENTRE_MAX, _LESION_CENTRE_MAX, (n, 3))
    radii = rng.uniform(*_LESION_RADIUS, (n, 3))  # [-1, 1] units: 1 = half the side
    radii_voxels = radii * size / 2.0
    for k, axis in enumerate("dhw"):
        factors[f"centroid_{axis}"] = centres[:, k]
        factors[f"lesion_radius_{axis}"] = radii_voxels[:, k]
    factors["lesion_volume"] = 4.0 / 3.0 * math.pi * radii_voxels.prod(axis=1)

    values = np.empty((n, len(MODALITIES), size, size, size), dtype=np.float32)
    sigma = (0.0, size / 8.0, size / 8.0, size / 8.0)
    for i in range(n):
        brain_centre = np.clip(rng.normal(0.0, 0.01, 3), -0.02, 0.02)
        axes = _BRAIN_AXES * factors["brain_scale"][i]
        # Radius within the brain ellipsoid: 0 at its centre, 1 on its surface.
        r = np.sqrt(
            ((d - brain_centre[0]) / axes[0]) ** 2
            + ((h - brain_centre[1]) / axes[1]) ** 2
            + ((w - brain_centre[2]) / axes[2]) ** 2
        )
        brain = r <= 1.0
        texture = gaussian_filter(rng.standard_normal(values.shape[1:]), sigma=sigma)
        texture *= _TEXTURE_SD / texture.std(axis=(1, 2, 3), keepdims=True)
        tissue = (
            _TISSUE_BASE[:, None, None, None]
            + _TISSUE_CENTRE[:, None, None, None] * (1.0 - r)[None]
            + texture
        )
        lesion = ellipsoid(size, centres[i], radii[i])
        tissue += (
            _LESION_CONTRAST[:, None, None, None] * factors["lesion_intensity"][i] * lesion[None]
        )
        image = np.where(brain[None], tissue, 0.0)
        gain = rng.uniform(0.6, 1.6, (len(MODALITIES), 1, 1, 1))
        offset = rng.uniform(-0.2, 0.2, (len(MODALITIES), 1, 1, 1))
        noise = rng.normal(0.0, _NOISE_SD, image.shape)
        values[i] = (gain * (image + noise) + offset).astype(np.float32)
    ids = np.array([f"S{i:04d}" for i in range(n)])
    return SampleSet(
        values=values,
        masks=None,
        ids=ids,
        groups=ids.copy(),
        channel_names=list(MODALITIES),
        factors=factors,
        source=source,
        channel_axis=CHANNEL_AXIS,
    )


def _check_arguments(source: str, n_subjects: int, size: int) -> None:
    """Stop with one DataError naming the generator argument and what was expected."""
    if isinstance(n_subjects, bool) or not isinstance(n_subjects, int | np.integer):
        raise DataError(f"{source}: n_subjects: expected an integer >= 1, found {n_subjects!r}")
    if n_subjects < 1:
        raise DataError(f"{source}: n_subjects: expected an integer >= 1, found {n_subjects}")
    if isinstance(size, bool) or not isinstance(size, int | np.integer) or size < MIN_SIZE:
        raise DataError(
            f"{source}: size: expected an integer >= {MIN_SIZE} (voxels per side), found {size!r}"
        )


def load_volumes(
    path: str | None = None,
    n_subjects: int = 24,
    size: int = 32,
    seed: int = 0,
    in_memory: bool | str = "auto",
    memory_budget_mb: float = 4096,
    num_workers: int | str = "auto",
) -> SampleSet:
    """Volumes (N, 4, size, size, size), z-scored per subject and channel; see the docstring.

    path: the HDF5 file to read, or None to generate `n_subjects` cubes of side `size` voxels
    from `seed` (those three are ignored when a file is read). in_memory: True loads the file
    whole, False streams it, "auto" streams it when its volumes (float32) are larger than
    memory_budget_mb. num_workers: DataLoader processes that read a streamed file ahead of a
    pass over it, or "auto" (`vaelab.data.streaming.worker_count`).
    """
    if path is None:
        if in_memory is False:
            raise ConfigError(
                "dataset.in_memory=false streams dataset.path, which is null: generated volumes "
                "are made in memory (write them to a file with vaelab.data.volumes.write_volumes)"
            )
        source = f"volumes(n_subjects={n_subjects}, size={size}, seed={seed})"
        _check_arguments(source, n_subjects, size)
        samples, streamed = _generate(int(n_subjects), int(size), seed, source), False
    else:
        samples, streamed = _read_volumes(os.fspath(path), in_memory, memory_budget_mb, num_workers)
    if not streamed:  # a streamed file is z-scored chunk by chunk as it is read
        _zscore_per_subject(samples.values, samples.source)
    logger.info(
        "%s: %d volumes of shape %s (%s), z-scored per subject and channel%s",
        samples.source,
        len(samples),
        samples.sample_shape,
        ", ".join(MODALITIES),
        " as they are read" if streamed else "",
    )
    return samples


def write_volumes(
    path: str | os.PathLike,
    n_subjects: int,
    size: int = 32,
    seed: int = 0,
    block: int = 32,
) -> None:
    """Write generated subjects (before the z-score) to an HDF5 file in the layout above,
    `block` subjects at a time, so that a file larger than memory can be made: block k comes
    from seed + k, ids run S0000, S0001, ... over the file. Each subject is one HDF5 chunk,
    which is what a streamed read of one subject wants."""
    source = f"write_volumes(n_subjects={n_subjects}, size={size}, seed={seed})"
    _check_arguments(source, n_subjects, size)
    shape = (n_subjects, len(MODALITIES), size, size, size)
    with h5py.File(path, "w") as file:
        volumes = file.create_dataset(
            VALUES_KEY, shape=shape, dtype=np.float32, chunks=(1, *shape[1:])
        )
        starts = range(0, n_subjects, block)
        for k, start in enumerate(tqdm(starts, desc="write volumes", disable=None)):
            stop = min(start + block, n_subjects)
            volumes[start:stop] = _generate(stop - start, size, seed + k, source).values
        ids = [f"S{i:04d}" for i in range(n_subjects)]
        file.create_dataset("ids", data=ids, dtype=h5py.string_dtype())
    logger.info("%s: wrote %d volumes of %d^3 voxels to %s", source, n_subjects, size, path)
