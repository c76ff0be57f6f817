"""3D multi-modal MRI volumes (seed 004): (N, 4, D, H, W), z-scored per subject and channel.

HDF5 layout: `volumes` (N, 4, D, H, W), numbers, channel-first, the 4 modalities in the order
t1c, t1n, t2f, t2w; optional `ids` (N,), `groups` (N,) (the subject of each scan, when one
subject has several scans, so that splits keep them together; default: the ids) and `labels`
(N,). Volumes must be cubes, D = H = W >= 8 (seed 004 uses 128^3): a 3D encoder-decoder that
halves and doubles every side gives back the input shape only when the sides agree, so crop or
pad other shapes first. Every problem stops with one `DataError` naming the file and the key.

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

import h5py
import numpy as np
from scipy.ndimage import gaussian_filter

from vaelab.data.base import SampleSet
from vaelab.data.h5 import first_index, open_h5, read_1d, read_numeric
from vaelab.errors import DataError

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


def _zscore_per_subject(values: np.ndarray, source: str) -> np.ndarray:
    """Z-score every subject's channel over its voxels, in place (seed 004)."""
    constant = 0
    for i in range(len(values)):  # one subject at a time: float64 copies stay small
        v = values[i].astype(np.float64)
        mean = v.mean(axis=(1, 2, 3), keepdims=True)
        std = v.std(axis=(1, 2, 3), keepdims=True)
        constant += int((std < STD_FLOOR).sum())
        # A constant channel (a modality stored as zeros, say) becomes 0 instead of NaN.
        values[i] = ((v - mean) / np.maximum(std, STD_FLOOR)).astype(np.float32)
    if constant:
        logger.warning("%s: %d constant subject channels set to 0 by the z-score", source, constant)
    return values


# ----------------------------------------------------------------------------- reader


def _read_volumes(path: str) -> SampleSet:
    """Read and check the HDF5 layout of the module docstring (before the z-score)."""
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
        values = read_numeric(path, file, VALUES_KEY)
        n = len(values)
        ids = read_1d(path, file, "ids", n, "one id per volume", strings=True)
        groups = read_1d(path, file, "groups", n, "one subject per volume", strings=True)
        labels = read_1d(path, file, "labels", n, "one label per volume", strings=False)

    finite = np.isfinite(values)
    if not finite.all():
        bad = ~finite
        idx = first_index(bad)
        raise DataError(
            f"{where}: expected finite values, found {int(bad.sum())} NaN/inf entries, "
            f"first {values[idx]} at index {idx}"
        )
    if ids is None:
        ids = np.array([f"S{i:04d}" for i in range(n)])
    if labels is not None and labels.dtype.kind in "iub":
        labels = labels.astype(np.int64)
    return SampleSet(
        values=values,
        masks=None,
        ids=ids,
        groups=ids.copy() if groups is None else groups,
        channel_names=list(MODALITIES),
        labels=labels,
        source=path,
        channel_axis=CHANNEL_AXIS,
    )


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
    path: str | None = None, n_subjects: int = 24, size: int = 32, seed: int = 0
) -> SampleSet:
    """Volumes (N, 4, size, size, size), z-scored per subject and channel; see the docstring.

    path: the HDF5 file to read, or None to generate `n_subjects` cubes of side `size` voxels
    from `seed` (those three are ignored when a file is read).
    """
    if path is None:
        source = f"volumes(n_subjects={n_subjects}, size={size}, seed={seed})"
        _check_arguments(source, n_subjects, size)
        samples = _generate(int(n_subjects), int(size), seed, source)
    else:
        samples = _read_volumes(os.fspath(path))
    _zscore_per_subject(samples.values, samples.source)
    logger.info(
        "%s: %d volumes of shape %s (%s), z-scored per subject and channel",
        samples.source,
        len(samples),
        samples.sample_shape,
        ", ".join(MODALITIES),
    )
    return samples
