"""Data sets larger than memory: samples read from their HDF5 file when they are used.

`dataset.in_memory` (auto | true | false) and `dataset.memory_budget_mb` choose, in the readers
(`vaelab.data.h5`, `vaelab.data.volumes`), between loading a file whole and streaming it.
Streamed, three stand-ins take the place of the in-memory arrays, and nothing else of a run
changes (split by patient, normaliser, checkpoints, latents.h5):

- `StreamedSamples` is `SampleSet.values`: the file's shape, and the rows asked for, read in
  runs of consecutive rows and passed through the reader's own check of a chunk (NaN, masks,
  the per-subject z-score of volumes), so every check of the in-memory reader holds for every
  chunk read, and an error names the file, the key and the sample.
- `StreamedTensor` is `PreparedData.values` (and `.masks`): indexing it reads, checks and
  normalises those samples into a float32 tensor on its device. `take` is its lazy subset, for
  a pass over a whole split.
- `Reader` is a DataLoader over a plan of row chunks, with worker processes (persistent, so
  forked once a run) and pinned memory on CUDA, for every pass whose order is known ahead:
  the normaliser's fit, validation, the latents at the end, encoding. A streamed tensor's
  consecutive slices (`diagnose`, `encode_all`) are read ahead through it.

`vaelab.train` draws each step's batch indices as the step starts and indexes
values[batch], so a training batch is read in the training process when its step asks for
it: one HDF5 read per run of consecutive rows, from the page cache once the file has been
read. `EpochReads` reads an epoch's batches ahead instead, for a loop that hands it them.
"""

import ctypes
import ctypes.util
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any, Protocol

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from vaelab.errors import ConfigError, DataError, VaelabError

logger = logging.getLogger(__name__)

MB = 1 << 20
FLOAT32_BYTES = 4
# Chunks each worker has in flight (DataLoader's prefetch_factor).
PREFETCH_FACTOR = 2
# dataset.num_workers=auto where CUDA is: the GPU trains while the CPU's cores read ahead.
CUDA_WORKERS = 2
# Copies of a chunk alive while it is checked and normalised: the float32 read, the float64
# intermediate of the normaliser (two float32 sizes) and the float32 result.
CHUNK_COPIES = 4


def _find_malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None where the C library has none (macOS, musl)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim
    except (OSError, AttributeError, TypeError):
        return None


# glibc keeps freed blocks of a few MB in its heap rather than giving them back (its mmap
# threshold rises as large blocks are freed), and a streamed run frees a chunk of a few MB at
# every read. At the end of each pass (the check, validation, the latents) malloc_trim(0)
# hands the free blocks back: ~15 MB off the peak RSS of one epoch of a 300 MB file (make
# bench). Not after every read, which took 35 MB off but cost a small model 40% of its speed:
# the training step's own buffers then came back as fresh pages, faulted in every step.
MALLOC_TRIM = _find_malloc_trim()


class ChunkCheck(Protocol):
    """A reader's check of a chunk read from its file, as `vaelab.data.h5.check_chunk`."""

    def __call__(
        self, values: np.ndarray, masks: np.ndarray | None, rows: np.ndarray, report: bool
    ) -> np.ndarray:
        """Check values (and masks) of the file's samples `rows`; return the values as the
        in-memory reader would hold them. report=True logs what that reader logs once."""


def should_stream(
    in_memory: bool | str, data_bytes: int, memory_budget_mb: float, source: str
) -> bool:
    """Whether to stream `data_bytes` of samples: dataset.in_memory, or, for auto, whether they
    are larger than dataset.memory_budget_mb. A bad value is a ConfigError naming the key."""
    if not (isinstance(in_memory, bool) or in_memory == "auto"):
        raise ConfigError(f"dataset.in_memory: expected auto, true or false, found {in_memory!r}")
    if isinstance(memory_budget_mb, bool) or not (
        isinstance(memory_budget_mb, int | float) and memory_budget_mb > 0
    ):
        raise ConfigError(
            f"dataset.memory_budget_mb: expected a number of MB > 0, found {memory_budget_mb!r}"
        )
    stream = data_bytes > memory_budget_mb * MB if in_memory == "auto" else not in_memory
    if stream:
        logger.info(
            "%s: streaming %.0f MB of samples (dataset.in_memory=%s, memory_budget_mb=%g)",
            source,
            data_bytes / MB,
            str(in_memory).lower(),
            memory_budget_mb,
        )
    return stream


def worker_count(num_workers: int | str) -> int:
    """dataset.num_workers as a number. auto: CUDA_WORKERS where CUDA is available, where the
    CPU's cores are free while the GPU trains; 0 on a CPU-only machine, where worker processes
    take cores from the training threads (make bench: on 2 cores, reading ahead in workers was
    slower than reading each batch in the training process), and each costs a fork of it."""
    if num_workers == "auto":
        return CUDA_WORKERS if torch.cuda.is_available() else 0
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ConfigError(
            f"dataset.num_workers: expected auto or an integer >= 0, found {num_workers!r}"
        )
    return num_workers


def runs(rows: np.ndarray) -> list[tuple[int, int, int]]:
    """Rows, in the order asked for, as runs of consecutive rows: (start, stop, at) puts the
    file's rows [start, stop) at position `at` of the result, one HDF5 read each."""
    if len(rows) == 0:
        return []
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [len(rows)]])
    return [
        (int(rows[a]), int(rows[b - 1]) + 1, int(a)) for a, b in zip(starts, stops, strict=True)
    ]


class StreamedSamples:
    """`SampleSet.values` of a streamed file: its shape, and its samples read on demand.

    Reads go through `check`, the reader's own check of a chunk, so what comes back is what
    the in-memory reader would hold for those rows. The HDF5 file is opened lazily in each
    process (a DataLoader worker opens its own: an HDF5 handle must not cross a fork), and
    `reads`, `bytes_read` and `largest_read` count this process's HDF5 reads of samples.
    """

    dtype = np.dtype(np.float32)

    def __init__(
        self,
        path: str,
        values_key: str,
        shape: tuple[int, ...],
        masks_key: str | None,
        check: ChunkCheck,
        memory_budget_mb: float,
        num_workers: int | str,
    ) -> None:
        self.path, self.values_key, self.masks_key = path, values_key, masks_key
        self.shape = tuple(int(s) for s in shape)
        self.check = check
        self.budget_bytes = int(memory_budget_mb * MB)
        self.num_workers = worker_count(num_workers)
        self.reads = 0
        self.bytes_read = 0
        self.largest_read = 0
        self._file: h5py.File | None = None
        self._datasets: dict[str, h5py.Dataset] = {}
        self._pid = -1
        # The masks of the rows read last: the loop asks masks[batch] right after values[batch].
        self._last: tuple[np.ndarray, np.ndarray | None] | None = None
        self._warned_over_budget = False

    @property
    def ndim(self) -> int:
        """Dimensions of the whole array, the sample axis included."""
        return len(self.shape)

    @property
    def has_masks(self) -> bool:
        """Whether the file holds masks (1 = observed) beside the values."""
        return self.masks_key is not None

    @property
    def sample_bytes(self) -> int:
        """Bytes one sample takes in memory as float32, its mask included."""
        return math.prod(self.shape[1:]) * FLOAT32_BYTES * (2 if self.has_masks else 1)

    def __len__(self) -> int:
        return self.shape[0]

    def chunk_rows(self, slots: int | None = None) -> int:
        """Samples per chunk of a pass that picks its own chunks (the normaliser's fit,
        encoding): `slots` chunks in flight, each held CHUNK_COPIES times, fill the budget."""
        if slots is None:
            slots = max(self.num_workers, 1) * PREFETCH_FACTOR + 1
        return max(1, self.budget_bytes // (CHUNK_COPIES * slots * self.sample_bytes))

    def __getstate__(self) -> dict[str, Any]:
        # Sent to a spawned DataLoader worker: the open file and the cached masks stay here.
        state = self.__dict__.copy()
        state.update(_file=None, _datasets={}, _pid=-1, _last=None)
        return state

    def close(self) -> None:
        """Close this process's handle (before forking workers); the next read reopens it."""
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file, self._datasets, self._pid = None, {}, -1

    def _dataset(self, key: str) -> h5py.Dataset:
        if self._pid != os.getpid():  # first read, or a forked worker: open our own handle
            self._file, self._pid, self._datasets = h5py.File(self.path, "r"), os.getpid(), {}
        if key not in self._datasets:  # looking a key up costs as much as a small read
            self._datasets[key] = self._file[key]
        return self._datasets[key]

    def _read_into(self, key: str, spans: list[tuple[int, int, int]], out: np.ndarray) -> None:
        """Rows [start, stop) of `key` into out[at:] for each span (start, stop, at)."""
        for start, stop, at in spans:
            try:
                dataset = self._dataset(key)
                if dataset.dtype == np.float32:  # straight into place, no copy
                    dataset.read_direct(out, np.s_[start:stop], np.s_[at : at + stop - start])
                else:  # converted by numpy, as the in-memory reader converts
                    out[at : at + stop - start] = dataset[start:stop]
            except (OSError, KeyError) as err:
                # The file changed or broke since it was opened: h5py says OSError or KeyError.
                raise DataError(
                    f"{self.path}: key '{key}': cannot read samples {start}-{stop - 1}: {err}"
                ) from err
            nbytes = out[at : at + stop - start].nbytes
            self.reads += 1
            self.bytes_read += nbytes
            self.largest_read = max(self.largest_read, nbytes)

    def read(
        self, rows: Sequence[int] | np.ndarray, report: bool = False
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Values and masks (None without masks) of `rows`, in that order, checked.

        Each run of consecutive rows is one HDF5 read straight into its place in the result,
        which the check and the normaliser then work on in place: a shuffled batch costs no
        copy to put back in order. report=True lets the check log what the in-memory reader
        logs once per file (the pass that checks every sample before training does).
        """
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        n = len(self)
        if len(rows) and (rows.min() < -n or rows.max() >= n):
            raise IndexError(f"{self.path}: rows out of range for {n} samples")
        rows = rows % max(n, 1)
        if len(rows) * self.sample_bytes > self.budget_bytes and not self._warned_over_budget:
            self._warned_over_budget = True
            logger.warning(
                "%s: reading %d samples (%.1f MB) at once, more than dataset.memory_budget_mb="
                "%g: a batch this large holds them all in memory",
                self.path,
                len(rows),
                len(rows) * self.sample_bytes / MB,
                self.budget_bytes / MB,
            )
        spans = runs(rows)
        values = np.empty((len(rows), *self.shape[1:]), dtype=np.float32)
        self._read_into(self.values_key, spans, values)
        masks = None
        if self.masks_key is not None:
            masks = np.empty_like(values)
            self._read_into(self.masks_key, spans, masks)
        values = self.check(values, masks, rows, report)
        self.keep_masks(rows, masks)
        return values, masks

    def keep_masks(self, rows: np.ndarray, masks: np.ndarray | None) -> None:
        """Remember the masks of `rows`, for the masks[rows] that follows values[rows]."""
        self._last = (rows, masks)

    def masks_of(self, rows: np.ndarray) -> np.ndarray | None:
        """The masks of `rows`, from the last read when it was of the same rows."""
        if self.masks_key is None:
            return None
        if self._last is not None and np.array_equal(self._last[0], rows):
            return self._last[1]
        return self.read(rows)[1]

    def __getitem__(self, index: Any) -> np.ndarray:
        """The checked values of `index` (int, slice, index or boolean array), as numpy."""
        rows = np.arange(len(self))[index]
        if np.ndim(rows) == 0:
            return self.read([int(rows)])[0][0]
        return self.read(rows)[0]


class StreamedMasks:
    """`SampleSet.masks` of a streamed file with masks: the masks of the rows asked for."""

    def __init__(self, samples: StreamedSamples) -> None:
        self.samples = samples

    @property
    def shape(self) -> tuple[int, ...]:
        """The values' shape: one mask entry per value."""
        return self.samples.shape

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: Any) -> np.ndarray:
        rows = np.arange(len(self.samples))[index]
        masks = self.samples.masks_of(np.atleast_1d(rows))
        return masks[0] if np.ndim(rows) == 0 else masks


def normalised_chunk(
    samples: StreamedSamples, normaliser: Any, rows: np.ndarray, report: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Values of `rows` checked and normalised (float32), and their masks (None if all
    observed): what the in-memory `PreparedData` holds for those rows."""
    values, masks = samples.read(rows, report)
    # Unobserved entries become 0.0, the channel mean, as `prepare` does in memory. In place:
    # the array read is this process's own.
    x = torch.from_numpy(normaliser.transform(values, masks, out=values))
    return x, None if masks is None else torch.from_numpy(np.ascontiguousarray(masks))


class _Failed:
    """A vaelab error raised in a worker, sent back as a value: DataLoader would re-raise it
    with the worker's traceback pasted into its message, which must stay one clear line."""

    def __init__(self, error: VaelabError) -> None:
        self.error = error


class _Rows(Dataset):
    """Item `rows` is fn(rows): the sampler hands a worker the rows themselves, so workers
    that outlive one pass serve every later pass, whatever its plan."""

    def __init__(self, fn: Callable[[np.ndarray], Any]) -> None:
        self.fn = fn

    def __getitem__(self, rows: np.ndarray) -> Any:
        # In a worker, whose only work is reading: the last chunk's freed buffers go back to
        # the system (see MALLOC_TRIM): ~15 MB less private memory a worker in make bench.
        release_freed_memory()
        try:
            return self.fn(rows)
        except VaelabError as err:
            return _Failed(err)


def _raising(items: Iterator[Any]) -> Iterator[Any]:
    """The items, raising a worker's vaelab error as itself where it comes."""
    for item in items:
        if isinstance(item, _Failed):
            error = item.error
            # The error's traceback holds this frame: without the loader's iterator in it, the
            # iterator ends now and stops its workers, rather than with the garbage collector,
            # after its queues, when a worker can no longer be told to stop (5 s each).
            del item, items
            raise error
        yield item
    release_freed_memory()


class _Plan(Sampler):
    """The chunks of rows of the current pass, in order; replaced at each pass."""

    def __init__(self) -> None:
        self.chunks: list[np.ndarray] = []

    def __iter__(self) -> Iterator[np.ndarray]:
        return iter(self.chunks)

    def __len__(self) -> int:
        return len(self.chunks)


class Reader:
    """fn(rows) for each chunk of a plan, in order, computed ahead by samples.num_workers
    DataLoader worker processes (in this process when 0).

    The workers are forked at the first pass and live as long as the reader (persistent):
    validation, the latents at the end and every epoch's batches then reuse them rather than
    forking a training process again at each pass. A pass that starts drops whatever the last
    one had not consumed; `generation` tells a pass's consumer whether it is still current.
    The loader has a generator of its own: DataLoader draws its workers' base seed from the
    global torch generator otherwise, and a streamed run would shuffle differently from the
    same run in memory. pin_memory (on CUDA) puts each chunk in page-locked memory, so that
    its copy to the GPU is asynchronous.
    """

    def __init__(
        self,
        samples: StreamedSamples,
        fn: Callable[[np.ndarray], Any],
        pin_memory: bool,
        persistent: bool = True,
    ) -> None:
        self.samples, self.fn, self.generation = samples, fn, 0
        self._plan = _Plan()
        self._loader = None
        if samples.num_workers > 0:
            self._loader = DataLoader(
                _Rows(fn),
                batch_size=None,  # an item is already a chunk
                sampler=self._plan,
                num_workers=samples.num_workers,
                pin_memory=pin_memory,
                generator=torch.Generator(),
                prefetch_factor=PREFETCH_FACTOR,
                persistent_workers=persistent,
            )

    def read(self, plan: Sequence[np.ndarray]) -> Iterator[Any]:
        """Start a pass over `plan`; its results, in order."""
        self.generation += 1
        # One chunk gains nothing from a worker: read it here (validation's check of the
        # objectives reads two samples).
        if self._loader is None or len(plan) < 2:
            return _raising(self.fn(rows) for rows in plan)
        self._plan.chunks = list(plan)
        self.samples.close()  # a forked worker must not inherit an open HDF5 file
        return _raising(iter(self._loader))


def stream(
    samples: StreamedSamples, fn: Callable[[np.ndarray], Any], plan: Sequence[np.ndarray]
) -> Iterator[Any]:
    """One pass of fn over `plan`, read ahead by workers of its own that end with it."""
    return Reader(samples, fn, pin_memory=False, persistent=False).read(plan)


def release_freed_memory() -> None:
    """Hand the C heap's free blocks back to the system (glibc; nothing elsewhere)."""
    if MALLOC_TRIM is not None:
        MALLOC_TRIM(0)


def contiguous_plan(start: int, stop: int, size: int) -> list[np.ndarray]:
    """Positions [start, stop) in chunks of `size` (the last one shorter)."""
    return [np.arange(a, min(a + size, stop)) for a in range(start, stop, size)]


class StreamedTensor:
    """`PreparedData.values` or `.masks` of a streamed file: a stand-in for the (N, ...)
    float32 tensor that reads, checks and normalises the samples asked for.

    It does what the training loop, the diagnostics and the artifacts do with that tensor:
    len, shape, ndim, dtype, device, `.to(device)`, and indexing by an int, a slice or an index
    tensor, which returns a real tensor on its device. `take(t, index)` is the lazy subset for
    a pass over a split. Consecutive slices (`diagnose`, `encode_all`, IWAE walk a split in
    order) are read ahead by the workers of the file's `Reader`. The masks of a file without
    masks are ones, made on the device without reading anything.
    """

    def __init__(
        self,
        samples: StreamedSamples,
        normaliser: Any,
        part: str = "values",
        device: torch.device | str = "cpu",
        rows: np.ndarray | None = None,
        readers: dict[bool, "Reader"] | None = None,
    ) -> None:
        if part not in ("values", "masks"):
            raise ValueError(f"part: expected 'values' or 'masks', found {part!r}")
        self.samples, self.normaliser, self.part = samples, normaliser, part
        self.device = torch.device(device)
        self.rows = np.arange(len(samples)) if rows is None else np.asarray(rows, dtype=np.int64)
        # One Reader per pinning, shared with every view made from this one (`to`, `subset`),
        # so that its workers serve every pass of a run. Held here, not by the samples: a
        # reader refers to its samples, and a DataLoader in a reference cycle is collected
        # after its queues, when its workers can no longer be told to stop (5 s each).
        self._readers = {} if readers is None else readers
        # The pass this view reads ahead: (reader, its generation, chunks, next start, size).
        self._ahead: tuple[Reader, int, Iterator[Any], int, int] | None = None

    dtype = torch.float32

    @property
    def shape(self) -> torch.Size:
        """(len(self), *sample shape), as the tensor would have."""
        return torch.Size((len(self.rows), *self.samples.shape[1:]))

    @property
    def ndim(self) -> int:
        """Dimensions, the sample axis included."""
        return len(self.shape)

    def __len__(self) -> int:
        return len(self.rows)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "StreamedTensor":
        """The same samples, read onto `device` (nothing is read now)."""
        return StreamedTensor(
            self.samples, self.normaliser, self.part, device, self.rows, self._readers
        )

    def subset(self, index: Any) -> "StreamedTensor":
        """The samples `index` (index tensor, array or slice), still unread."""
        rows = self.rows[_as_index(index)]
        return StreamedTensor(
            self.samples, self.normaliser, self.part, self.device, rows, self._readers
        )

    def reader(self) -> "Reader":
        """The Reader of these samples' normalised chunks onto this device."""
        pin = self.device.type == "cuda"
        if pin not in self._readers:
            fn = partial(normalised_chunk, self.samples, self.normaliser)
            self._readers[pin] = Reader(self.samples, fn, pin_memory=pin)
        return self._readers[pin]

    def _read(self, rows: np.ndarray) -> torch.Tensor:
        """The rows' values (normalised) or masks, as one float32 tensor on the device."""
        if self.part == "masks":
            masks = self.samples.masks_of(rows)
            if masks is None:  # one sample of ones, seen len(rows) times: nothing to allocate
                ones = torch.ones((1, *self.samples.shape[1:]), device=self.device)
                return ones.expand(len(rows), *self.samples.shape[1:])
            return _on(self.device, torch.from_numpy(np.ascontiguousarray(masks)))
        return _on(self.device, normalised_chunk(self.samples, self.normaliser, rows)[0])

    def _read_ahead(self, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of this view; a slice that continues the last one is taken from
        the chunks the workers have read ahead, any other starts a new read-ahead."""
        size = stop - start
        reader = self.reader()
        expected = (reader, reader.generation, start, size)
        if self._ahead is not None and self._ahead[:2] + self._ahead[3:] == expected:
            chunks = self._ahead[2]
        else:  # a new pass (or another pass took the reader over since)
            chunks = reader.read([self.rows[p] for p in contiguous_plan(start, len(self), size)])
        x, masks = next(chunks)
        self.samples.keep_masks(self.rows[start:stop], None if masks is None else masks.numpy())
        self._ahead = None
        if stop < len(self):
            self._ahead = (reader, reader.generation, chunks, stop, size)
        return _on(self.device, x)

    def __getitem__(self, index: Any) -> torch.Tensor:
        """The samples `index` (int, slice, index tensor or array) read as a tensor."""
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step == 1 and stop > start and self.part == "values":
                return self._read_ahead(start, stop)
        rows = self.rows[_as_index(index)]
        if np.ndim(rows) == 0:
            return self._read(np.array([rows]))[0]
        return self._read(rows)

    def numpy(self) -> np.ndarray:
        """Every sample at once, as numpy (the downstream report's PCA baseline asks for it)."""
        total = len(self) * math.prod(self.shape[1:]) * FLOAT32_BYTES
        if total > self.samples.budget_bytes:
            logger.warning(
                "%s: loading all %d streamed samples (%.0f MB) at once, more than "
                "dataset.memory_budget_mb; evaluation.downstream=false avoids it",
                self.samples.path,
                len(self),
                total / MB,
            )
        return self[:].cpu().numpy()


def _on(device: torch.device, x: torch.Tensor) -> torch.Tensor:
    """x on `device`; a pinned chunk (DataLoader's pin_memory) is copied asynchronously."""
    if device.type == "cpu":
        return x
    return x.to(device, non_blocking=x.is_pinned())


def _as_index(index: Any) -> Any:
    """An index for a numpy row array: tensors become arrays (bool stays bool)."""
    if isinstance(index, torch.Tensor):
        index = index.detach().cpu().numpy()
        return index.item() if index.ndim == 0 else index
    return index


class EpochReads:
    """(values[b], masks[b]) for each batch b of an epoch, in order: a streamed tensor's are
    read ahead by its DataLoader workers while the steps before them train, a tensor's are
    indexed as the loop indexes them.

    `vaelab.train` iterates it, so a streamed file's reads overlap training when
    dataset.num_workers > 0 (make bench: vaelab.bench_data).
    """

    def __init__(
        self,
        values: torch.Tensor | StreamedTensor,
        masks: torch.Tensor | StreamedTensor,
        batches: Sequence[torch.Tensor],
    ) -> None:
        self.values, self.masks, self.batches = values, masks, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        values, masks = self.values, self.masks
        if not isinstance(values, StreamedTensor):
            for batch in self.batches:
                yield values[batch], masks[batch]
            return
        device = values.device
        for x, m in values.reader().read([values.rows[_as_index(b)] for b in self.batches]):
            x = _on(device, x)
            yield x, torch.ones_like(x[:1]).expand_as(x) if m is None else _on(device, m)


def take(values: torch.Tensor | StreamedTensor, index: torch.Tensor) -> Any:
    """values[index]: a tensor for a tensor, an unread subset for a streamed tensor, so that a
    pass over a split (validation) holds one batch of it at a time, not the whole split."""
    if isinstance(values, StreamedTensor):
        return values.subset(index)
    return values[index]
