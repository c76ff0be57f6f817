"""3D multi-modal MRI from NIfTI files (seed 004): one folder per subject, one file per modality.

Layout: `<root>/<subject>/<subject>_<modality>.nii.gz` (or `.nii`), one folder per subject
directly under root (folders whose name starts with "." are skipped), `pattern` giving the
path of a file relative to root with `{subject}` and `{modality}` to fill in, without the
extension. BraTS 2020 names its modalities t1, t1ce, t2, flair (the default); BraTS 2023 and
seed 004 name them t1c, t1n, t2f, t2w.

The result is the `SampleSet` of `vaelab.data.volumes`: values (N, C, D, H, W) float32,
channel-first, channels in the order of `modalities`, ids = groups = the subject folders'
names (sorted), no masks, no labels, each subject's channels z-scored over all their voxels
(seed 004 makes per-subject, per-channel z-scoring mandatory; it is the volumes reader's own
code). Voxel arrays are taken as stored: nothing is reoriented or resampled, so the subjects
must already share one grid (BraTS files do, 240 x 240 x 155 at 1 mm). `crop` cuts the centre
(D, H, W) of every volume as it is read, for a model that needs sides a power of two divides
(seed 004 trains on 128³).

Every problem stops with one `DataError` naming the file (or folder) and what was expected:
no subject folders, a modality missing (named by subject and modality), a file that nibabel
cannot read, a volume that is not 3D, shapes that differ between the modalities of a subject
or between subjects, a crop larger than the volumes, NaN or inf voxels. Headers are all
checked before any voxel is read, so a wrong data set is refused quickly.

The volumes are read whole into memory (500 subjects of 4 x 128³ float32 are 16 GB); for
larger sets write them into the HDF5 layout of `vaelab.data.volumes`, which it can stream.
"""

import logging
import os
import zlib
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError

from vaelab.data.base import SampleSet
from vaelab.data.h5 import first_index

# The volumes reader's per-subject z-score: one code path for both formats (seed 004).
from vaelab.data.volumes import CHANNEL_AXIS, MIN_SIZE, _zscore_per_subject
from vaelab.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

MODALITIES = ("t1", "t1ce", "t2", "flair")  # BraTS 2020 names
PATTERN = "{subject}/{subject}_{modality}"
EXTENSIONS = (".nii.gz", ".nii")
# What nibabel and the decompressors raise for a file they cannot read: not NIfTI
# (ImageFileError), not gzip or truncated (OSError, EOFError, zlib.error), a header whose
# sizes do not match the data (ValueError).
READ_ERRORS = (ImageFileError, OSError, EOFError, ValueError, zlib.error)


def _check_arguments(modalities: Sequence[str], pattern: str, crop: Sequence[int] | None) -> None:
    """ConfigError naming the dataset key unless the arguments can describe a data set."""
    if isinstance(modalities, str) or not modalities:
        raise ConfigError(f"dataset.modalities: expected a list of names, found {modalities!r}")
    names = [str(m) for m in modalities]
    if len(set(names)) != len(names):
        raise ConfigError(f"dataset.modalities: expected distinct names, found {names}")
    if "{modality}" not in pattern or "{subject}" not in pattern:
        raise ConfigError(
            f"dataset.pattern: expected both {{subject}} and {{modality}}, found {pattern!r}"
        )
    try:
        pattern.format(subject="s", modality="m")
    except (KeyError, IndexError, ValueError) as err:
        raise ConfigError(
            f"dataset.pattern: expected only the fields {{subject}} and {{modality}}, "
            f"found {pattern!r} ({err!r})"
        ) from err
    integer = (int, np.integer)
    if crop is not None and (
        len(crop) != 3 or any(isinstance(s, bool) or not isinstance(s, integer) for s in crop)
    ):
        raise ConfigError(f"dataset.crop: expected null or 3 integers [D, H, W], found {crop!r}")
    if crop is not None and min(crop) < MIN_SIZE:
        raise ConfigError(f"dataset.crop: expected every side >= {MIN_SIZE}, found {list(crop)}")


def _subjects(root: Path) -> list[str]:
    """The subject folders directly under root, sorted; DataError when there are none."""
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "not found"
        raise DataError(f"{root}: {what} (expected a folder of subject folders)")
    subjects = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not subjects:
        raise DataError(
            f"{root}: no subject folders found (expected <root>/<subject>/ holding "
            f"{PATTERN.split('/')[-1]}.nii.gz files, one per modality)"
        )
    return subjects


def _find_files(root: Path, subjects: list[str], modalities: list[str], pattern: str) -> list:
    """The file of every subject and modality, [subject][modality]; DataError naming the
    first missing (or doubled) one and how many more are missing."""
    files, missing = [], []
    for subject in subjects:
        row = []
        for modality in modalities:
            stem = root / pattern.format(subject=subject, modality=modality)
            found = [Path(f"{stem}{ext}") for ext in EXTENSIONS if Path(f"{stem}{ext}").is_file()]
            if len(found) > 1:
                raise DataError(
                    f"{found[0]} and {found[1]}: subject '{subject}', modality '{modality}': "
                    f"expected one file, found both; keep one"
                )
            if not found:
                missing.append((subject, modality, stem))
            row.append(found[0] if found else None)
        files.append(row)
    if missing:
        subject, modality, stem = missing[0]
        more = f"; {len(missing) - 1} more files missing" if len(missing) > 1 else ""
        raise DataError(
            f"{root}: subject '{subject}': modality '{modality}' not found (expected "
            f"{stem}{EXTENSIONS[0]} or {EXTENSIONS[1]}){more}"
        )
    return files


def _open(path: Path) -> nib.spatialimages.SpatialImage:
    """The image at path, header read, voxels not yet; DataError when nibabel cannot read it."""
    try:
        return nib.load(path)
    except READ_ERRORS as err:
        raise DataError(f"{path}: cannot read as NIfTI: {err}") from err


def _shape(path: Path, image: nib.spatialimages.SpatialImage) -> tuple[int, ...]:
    """The image's 3D shape (trailing axes of length 1 dropped); DataError if it is not 3D."""
    shape = tuple(int(s) for s in image.shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3:
        raise DataError(f"{path}: expected a 3D volume (D, H, W), found shape {image.shape}")
    return shape


def _crop_slices(shape: tuple[int, ...], crop: Sequence[int] | None) -> tuple[slice, ...]:
    """The centre `crop` of a volume of `shape` (all of it when crop is None)."""
    if crop is None:
        return tuple(slice(0, s) for s in shape)
    return tuple(slice((s - c) // 2, (s - c) // 2 + c) for s, c in zip(shape, crop, strict=True))


def _read(path: Path, image: nib.spatialimages.SpatialImage, box: tuple[slice, ...]) -> np.ndarray:
    """The voxels of `box`, scaled by the header's slope and intercept, as float32; DataError
    when the file cannot be read or holds NaN/inf."""
    try:
        # Slicing the proxy reads only the box of an uncompressed file, and applies scl_slope.
        index = box + (0,) * (len(image.shape) - 3)
        voxels = np.asarray(image.dataobj[index], dtype=np.float32)
    except READ_ERRORS as err:
        raise DataError(f"{path}: cannot read the voxels as NIfTI: {err}") from err
    finite = np.isfinite(voxels)
    if not finite.all():
        bad = ~finite
        idx = first_index(bad)
        raise DataError(
            f"{path}: expected finite voxels, found {int(bad.sum())} NaN/inf, first "
            f"{voxels[idx]} at voxel {idx}"
        )
    return voxels


def load_nifti(
    root: str | os.PathLike,
    modalities: Sequence[str] = MODALITIES,
    pattern: str = PATTERN,
    crop: Sequence[int] | None = None,
) -> SampleSet:
    """Load and check a folder of subject folders of NIfTI volumes (see the module docstring).

    modalities: the channels, in order, as named in the file names. pattern: a file's path
    relative to root, without extension, with {subject} and {modality}. crop: null, or the
    centre [D, H, W] voxels to keep of every volume.
    """
    crop = None if crop is None else list(crop)  # a ListConfig from Hydra
    _check_arguments(modalities, pattern, crop)
    modalities = [str(m) for m in modalities]
    root = Path(root)
    subjects = _subjects(root)
    files = _find_files(root, subjects, modalities, pattern)

    # Every header first: shapes are checked before any voxel is read.
    images = [[_open(path) for path in row] for row in files]
    first_path, shape = files[0][0], _shape(files[0][0], images[0][0])
    for subject, paths, row in zip(subjects, files, images, strict=True):
        own = _shape(paths[0], row[0])  # the subject's first modality
        for modality, path, image in zip(modalities[1:], paths[1:], row[1:], strict=True):
            found = _shape(path, image)
            if found != own:
                raise DataError(
                    f"{path}: subject '{subject}', modality '{modality}': expected the shape "
                    f"of its modality '{modalities[0]}' ({paths[0]}), {own}, found {found}"
                )
        if own != shape:
            raise DataError(
                f"{paths[0]}: subject '{subject}': expected the shape of subject "
                f"'{subjects[0]}' ({first_path}), {shape}, found {own}"
            )
    if crop is not None and any(c > s for c, s in zip(crop, shape, strict=True)):
        raise DataError(
            f"{first_path}: dataset.crop {list(crop)} is larger than the volumes, shape {shape}"
        )
    box = _crop_slices(shape, crop)
    spatial = tuple(b.stop - b.start for b in box)
    if min(spatial) < MIN_SIZE:
        raise DataError(
            f"{first_path}: expected every side of (D, H, W) >= {MIN_SIZE}, found {spatial}"
        )

    values = np.empty((len(subjects), len(modalities), *spatial), dtype=np.float32)
    logger.info(
        "%s: reading %d subjects x %d modalities of %s voxels (%.1f MB of float32)",
        root,
        len(subjects),
        len(modalities),
        spatial,
        values.nbytes / 2**20,
    )
    for i, (paths, row) in enumerate(zip(files, images, strict=True)):
        for k, (path, image) in enumerate(zip(paths, row, strict=True)):
            values[i, k] = _read(path, image, box)
    _zscore_per_subject(values, str(root))
    ids = np.array(subjects, dtype=str)
    logger.info(
        "%s: %d volumes of shape %s (%s), z-scored per subject and channel",
        root,
        len(subjects),
        values.shape[1:],
        ", ".join(modalities),
    )
    return SampleSet(
        values=values,
        masks=None,
        ids=ids,
        groups=ids.copy(),
        channel_names=list(modalities),
        source=str(root),
        channel_axis=CHANNEL_AXIS,
    )
