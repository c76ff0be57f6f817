"""Read a user's HDF5 file (the seed 001 layout) into a `SampleSet`, checking it on the way.

Layout: `values` (N, T, C) or (N, F); optional `masks` (same shape, 1 = observed); optional
`patient_index` or `ids` (N,), `vital_index` (C,) or (F,), `labels` (N,) and `groups` (N,).
String datasets may hold bytes or str. Every problem stops with one `DataError` that names the
file, the key and what was expected versus found.

A file whose samples are larger than `memory_budget_mb` (or any file with in_memory=false) is
streamed (`vaelab.data.streaming`): the shapes and the small datasets are checked here, and
`check_chunk` checks each chunk of `values` and `masks` as it is read, with the messages of
the in-memory reader and the sample's index in the file.

`read_numeric`, `read_1d` and `first_index` are the checked reads every HDF5 reader of vaelab
shares (this one and `vaelab.data.volumes`), so their messages read the same.
"""

import logging
import math
import os
from functools import partial

import h5py
import numpy as np

from vaelab.data.base import SampleSet
from vaelab.data.streaming import FLOAT32_BYTES, StreamedMasks, StreamedSamples, should_stream
from vaelab.errors import DataError

logger = logging.getLogger(__name__)

ID_KEYS = ("patient_index", "ids")
CHANNEL_KEY = "vital_index"


def _as_str(array: np.ndarray) -> np.ndarray:
    """Decode a dataset of bytes, str or numbers into a str array."""
    if array.dtype.kind == "U":
        return array
    items = [x.decode("utf-8") if isinstance(x, bytes) else str(x) for x in array.tolist()]
    return np.array(items, dtype=str)


def read_1d(
    path: str, file: h5py.File, key: str, length: int, what: str, strings: bool
) -> np.ndarray | None:
    """Read an optional (length,) dataset of `what`, or None when the key is absent.

    strings=True decodes it to str (ids, names); otherwise numbers stay numbers and only byte or
    object datasets are decoded. A group, another shape or invalid UTF-8 is a DataError naming
    `path` and `key`.
    """
    if key not in file:
        return None
    node = file[key]
    if not isinstance(node, h5py.Dataset):
        raise DataError(f"{path}: key '{key}': expected a dataset of {what}, found a group")
    array = node[()]
    array = np.asarray(array)
    if array.shape != (length,):
        raise DataError(
            f"{path}: key '{key}': expected {what}, shape ({length},), found shape {array.shape}"
        )
    if strings:
        try:
            return _as_str(array)
        except UnicodeDecodeError as err:
            raise DataError(f"{path}: key '{key}': expected UTF-8 text, found {err}") from err
    if array.dtype.kind in "SO":
        return _as_str(array)
    return array


def first_index(bad: np.ndarray) -> tuple[int, ...]:
    """Index of the first True entry of a boolean array, as plain ints for a message."""
    return tuple(int(i) for i in np.unravel_index(int(np.argmax(bad)), bad.shape))


def sample_index(idx: tuple[int, ...], rows: np.ndarray | None) -> tuple[int, ...]:
    """`idx` into a chunk holding the file's samples `rows` (None: the whole file) as an
    index into the whole file, for a message."""
    return idx if rows is None else (int(rows[idx[0]]), *idx[1:])


def chunk_note(rows: np.ndarray | None) -> str:
    """Where a streamed chunk lies in the file, for a message; "" for a whole file."""
    if rows is None:
        return ""
    if len(rows) == 1:
        return f" (in streamed sample {int(rows[0])})"
    return f" (in a streamed read of samples {int(rows.min())}-{int(rows.max())})"


def numeric_dataset(path: str, file: h5py.File, key: str) -> h5py.Dataset:
    """The numeric dataset `key`, unread; a group or a non-numeric dtype is a DataError."""
    node = file[key]
    if not isinstance(node, h5py.Dataset):
        raise DataError(f"{path}: key '{key}': expected a numeric dataset, found a group")
    if node.dtype.kind not in "biuf":
        raise DataError(f"{path}: key '{key}': expected numbers, found dtype {node.dtype}")
    return node


def read_numeric(path: str, file: h5py.File, key: str) -> np.ndarray:
    """Read a numeric dataset as float32; a group or a non-numeric dtype is a DataError."""
    return np.asarray(numeric_dataset(path, file, key)[()], dtype=np.float32)


def _check_masks(path: str, masks_key: str, masks: np.ndarray, rows: np.ndarray | None) -> None:
    """Masks hold only 0 and 1 (of the whole file, or of the streamed samples `rows`)."""
    not_binary = (masks != 0) & (masks != 1)  # NaN counts as not binary too
    if not_binary.any():
        idx = first_index(not_binary)
        raise DataError(
            f"{path}: key '{masks_key}': expected only 0 and 1, found "
            f"{int(not_binary.sum())} other entries, first {masks[idx]} at index "
            f"{sample_index(idx, rows)}{chunk_note(rows)}"
        )


def _check_finite(
    path: str,
    values_key: str,
    masks_key: str,
    values: np.ndarray,
    masks: np.ndarray | None,
    rows: np.ndarray | None,
) -> None:
    """NaN/inf where the masks say unobserved become 0.0 in place; anywhere else they are a
    DataError (of the whole file, or of the streamed samples `rows`)."""
    # Many files store missing entries as NaN: allowed where the mask says unobserved,
    # an error where the entry claims to be a real measurement.
    finite = np.isfinite(values)
    if finite.all():
        return
    bad = ~finite if masks is None else ~finite & (masks > 0)
    if bad.any():
        idx = first_index(bad)
        if masks is None:
            where = f"(there is no '{masks_key}', so every entry counts as observed)"
        else:
            where = f"where '{masks_key}' is 1"
        raise DataError(
            f"{path}: key '{values_key}': expected finite values {where}, found "
            f"{int(bad.sum())} NaN/inf entries, first {values[idx]} at index "
            f"{sample_index(idx, rows)}{chunk_note(rows)}"
        )
    values[~finite] = 0.0


def check_chunk(
    path: str,
    values_key: str,
    masks_key: str,
    values: np.ndarray,
    masks: np.ndarray | None,
    rows: np.ndarray,
    report: bool = False,
) -> np.ndarray:
    """The checks of `load_h5` on a streamed chunk, the file's samples `rows`: masks 0 or 1,
    values finite where observed (NaN where unobserved become 0.0). Returns the values."""
    if masks is not None:
        _check_masks(path, masks_key, masks, rows)
    _check_finite(path, values_key, masks_key, values, masks, rows)
    return values


def open_h5(path: str, expected: str) -> h5py.File:
    """The HDF5 file at `path`, open for reading; one DataError naming the file and what was
    `expected` of it ("an HDF5 file with key 'values'") when it is missing or not HDF5."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found (expected {expected})")
    try:
        return h5py.File(path, "r")
    except OSError as err:
        # h5py raises OSError for anything it cannot open: not HDF5, truncated, no permission.
        raise DataError(f"{path}: cannot open as HDF5 (expected {expected}): {err}") from err


def load_h5(
    path: str,
    values_key: str = "values",
    masks_key: str = "masks",
    in_memory: bool | str = "auto",
    memory_budget_mb: float = 4096,
    num_workers: int | str = "auto",
) -> SampleSet:
    """Load and check one HDF5 file of samples; see the module docstring for the layout.

    in_memory: True loads the file whole, False streams it, "auto" streams it when its
    samples (float32, masks included) are larger than memory_budget_mb. num_workers:
    DataLoader processes that read a streamed file ahead of a pass over it, or "auto"
    (`vaelab.data.streaming.worker_count`).
    """
    path = os.fspath(path)
    with open_h5(path, f"an HDF5 file with key '{values_key}'") as file:
        if values_key not in file:
            raise DataError(
                f"{path}: key '{values_key}' not found; the file has keys {sorted(file.keys())}"
            )
        # Shapes are checked before anything is read, so a wrong file is refused unread.
        shape = tuple(numeric_dataset(path, file, values_key).shape)
        if len(shape) not in (2, 3):
            raise DataError(
                f"{path}: key '{values_key}': expected 2 dims (N, F) or 3 dims (N, T, C), "
                f"found {len(shape)} dims with shape {shape}"
            )
        if shape[0] == 0:
            raise DataError(
                f"{path}: key '{values_key}': expected at least one sample, found shape {shape}"
            )
        if 0 in shape:
            raise DataError(
                f"{path}: key '{values_key}': expected every dimension > 0, found shape {shape}"
            )
        n = shape[0]
        n_channels = shape[-1]
        has_masks = masks_key in file
        if has_masks:
            masks_shape = tuple(numeric_dataset(path, file, masks_key).shape)
            if masks_shape != shape:
                raise DataError(
                    f"{path}: key '{masks_key}': expected the shape of '{values_key}' "
                    f"{shape}, found {masks_shape}"
                )
        data_bytes = math.prod(shape) * FLOAT32_BYTES * (2 if has_masks else 1)
        streamed = should_stream(in_memory, data_bytes, memory_budget_mb, path)

        masks = None
        if streamed:
            values = StreamedSamples(
                path,
                values_key,
                shape,
                masks_key if has_masks else None,
                partial(check_chunk, path, values_key, masks_key),
                memory_budget_mb,
                num_workers,
            )
            masks = StreamedMasks(values) if has_masks else None
        else:
            values = read_numeric(path, file, values_key)
            if has_masks:
                masks = read_numeric(path, file, masks_key)
                _check_masks(path, masks_key, masks, None)

        id_key = next((k for k in ID_KEYS if k in file), None)
        ids = None
        if id_key is not None:
            ids = read_1d(path, file, id_key, n, "one id per sample", strings=True)
        channel_names = read_1d(
            path, file, CHANNEL_KEY, n_channels, "one name per channel (last axis)", strings=True
        )
        labels = read_1d(path, file, "labels", n, "one label per sample", strings=False)
        groups = read_1d(path, file, "groups", n, "one group per sample", strings=True)

    if not streamed:  # a streamed file is checked chunk by chunk as it is read
        _check_finite(path, values_key, masks_key, values, masks, None)

    if ids is None:
        ids = np.array([f"S{i:04d}" for i in range(n)])
    channel_names_given = channel_names is not None
    if channel_names is None:
        prefix = "ch" if len(shape) == 3 else "f"
        channel_names = np.array([f"{prefix}{i}" for i in range(n_channels)])
    if groups is None:
        groups = ids.copy()
    if labels is not None and labels.dtype.kind in "iub":
        labels = labels.astype(np.int64)

    observed = "streamed" if streamed else f"{1.0 if masks is None else float(masks.mean()):.3f}"
    logger.info(
        "%s: %d samples of shape %s, %s, observed fraction %s",
        path,
        n,
        shape[1:],
        "with labels" if labels is not None else "no labels",
        observed,
    )
    return SampleSet(
        values=values,
        masks=masks,
        ids=ids,
        groups=groups,
        channel_names=[str(c) for c in channel_names],
        labels=labels,
        source=path,
        channel_names_given=channel_names_given,
    )
