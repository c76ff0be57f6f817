"""Canonical k-mer composition of DNA windows (k = 6..1), the input of the seed 002 k-mer VAE.

    python -m vaelab.data.kmers --fasta genome.fna.gz --window 5000 --out kmers.h5
    python -m vaelab.train dataset=kmers dataset.path=kmers.h5
    python -m vaelab.train dataset=kmers 'dataset.fasta=[a.fna.gz,b.fna]' dataset.window=5000

Features. A k-mer and its reverse complement are one feature, named by the canonical form, the
lexicographically smaller of the two. There are (4^k + 4^(k/2)) / 2 canonical k-mers for even k
(the 4^(k/2) reverse-complement palindromes are their own pair) and 4^k / 2 for odd k: 2,080,
512, 136, 32, 10 and 2 for k = 6..1, 2,772 columns in all, 6-mers first (the seed 002 layout,
`FEATURE_GROUPS`). Within one k the columns are in lexicographic order of the canonical k-mer
(AAAAAA, AAAAAC, ...; the 1-mers are A = A+T and C = C+G).

Windows. Each FASTA record is cut into windows of `window` bp starting every `step` bp (default
step = window: no overlap); a window is one sample with id `record:start-end` (0-based start,
end exclusive). The tail shorter than a window at the end of a record, and records shorter than
one window, are dropped and counted in the log. A k-mer counts in a window when it lies wholly
inside it, so a window of W bp holds W - k + 1 k-mer positions of each k.

Skipped k-mers. Lowercase (soft-masked) bases count as uppercase. A k-mer position that covers
any other letter (N, IUPAC codes such as R or Y, gaps) is skipped: the number skipped per window
(all k together) is returned as `factors["skipped_kmers"]` (float, as every factor), written to
the h5 file and logged. `factors["gc_content"]` is the G+C share of a window's valid bases (from
its 1-mer counts; NaN for a window without one), the main axis of k-mer composition, to check
latents against.

Values: centred log-ratio per k-mer size, clr(x)_i = log(x_i + 1e-6) - mean_j log(x_j + 1e-6)
over the columns of one k (`clr`). Seed 002 applied CLR with pseudocount 1e-6 "over the feature
vector"; we keep its pseudocount but centre each block on its own, because each k is its own
composition (its counts sum to the number of valid positions of that k). Centring all 2,772
columns together would subtract one geometric mean dominated by the 2,080 sparse 6-mers (many
zeros, log 1e-6 = -13.8), so the 1- to 5-mer values would move with 6-mer sparsity rather than
with their own composition (Aitchison 1986: CLR is defined on one composition).

Scale, `zscore_features`. Seed 002 trained on the CLR values themselves, with an MSE summed over
the 2,772 features; vaelab's training data otherwise pass through a per-feature z-score fitted on
the training split (vaelab.data.prepare). With zscore_features=false (the default, the seed's
recipe) every feature is left unnormalised (`SampleSet.unnormalised_channels`: mean 0, std 1),
so the model sees the CLR values exactly. Z-scoring would weigh every k-mer alike: the seed's
finding that the 6-mers carry ~95 % of the reconstruction error (its log at epoch ~100: 6-mer
MSE 1.56 against 1.21 over all features, so 2,080 x 1.56 of the 2,772 x 1.21 summed) would be
scaled away, and its KL weight 0.1 against the summed CLR error
(β = 0.1 / 2772 per feature, conf/experiment/kmer_mlp.yaml) would no longer weigh the same
terms. zscore_features=true gives each feature mean 0 and variance 1 on the training split.

Groups. The train/val/test split never puts one group in two splits (vaelab.data.prepare), so
the grouping decides what can leak between them. `group_by`:
- "record": every window of one FASTA record is one group, so neighbouring and overlapping
  windows of a contig never leak between train and test; the split needs at least 3 records.
- "block": the windows of each record, in order along it, are cut into contiguous blocks and
  each block is a group, named by the span of its windows, `record:start-end` (the window ids
  stay as they are). `n_blocks` blocks (default 20) are shared out among the records in
  proportion to their windows, rounded half up, at least one a record: one genome gives 20
  blocks, of which the default 15 %/15 % split puts exactly 3 in val and 3 in test; a record
  with less than half a block's share of the windows (a small plasmid) stays whole. With
  step < window, the first windows of a block that overlap a window of an earlier block are
  dropped, so that no base is in two groups: ceil(window / step) - 1 windows at each boundary
  inside a record without gaps, fewer where dropped windows (max_skipped_fraction) left a gap.
  The number dropped is logged. A record is cut into at most n // (g + 1) blocks (n windows, each
  overlapping at most g later ones), so that no block is dropped whole.
- "window": each window is its own group. With step < window overlapping windows share bases,
  and shared bases can then land in train and test: only step = window is free of leaks.
- "auto" (default): "record" when every record holds at most 15 % of the windows (at least 7
  records), else "block" (one genome; a chromosome with its plasmids). `AUTO_MAX_RECORD_SHARE`
  says why.
Records and shares are counted after max_skipped_fraction has dropped windows. The h5 file
stores each window's record as `groups` and the grouping is chosen when it is loaded, as for a
FASTA file, so a file and the h5 written from it give the same groups. An npy file has neither
records nor positions: each of its rows is its own group, whatever group_by says.

Sources (exactly one): FASTA files, plain or gzip (told apart by the gzip magic bytes 1f 8b,
not the file name); the h5 file the command above writes (`H5_KEYS`); or the seed's
`all_kmers.npy` (column 0 row index, 7-mers in columns 1-8192, unused, and the 2,772 features in
columns 8193-10964). The seed applied CLR in place after loading, so those columns are taken as
counts (any non-negative numbers) and CLR is applied here; the order of the k-mers inside each k
of that file is not recorded anywhere, so its features are named by position (`6mer_0000`)
rather than by a k-mer they may not be.
"""

import argparse
import gzip
import logging
import os
import sys
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import h5py
import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from tqdm import tqdm

from vaelab.data.base import SampleSet
from vaelab.data.h5 import open_h5
from vaelab.errors import DataError

logger = logging.getLogger(__name__)

KS = (6, 5, 4, 3, 2, 1)  # k-mer sizes in column order (seed 002)
PSEUDOCOUNT = 1e-6  # added to every count before the log (seed 002)
GZIP_MAGIC = b"\x1f\x8b"
H5_KEYS = ("counts", "values", "ids", "groups", "feature_names", "skipped_kmers")
GROUP_BY = ("auto", "record", "block", "window")
# group_by="auto" groups by record only when every record holds at most this share of the
# windows: the default split.val_fraction and test_fraction (conf/train.yaml), so that any record
# fits whole into any split. A larger record cannot: a chromosome with two plasmids grouped by
# record puts ~95 % of the windows into whichever split draws the chromosome, val or test two
# times in three. Such files, and single genomes, are grouped by block instead.
AUTO_MAX_RECORD_SHARE = 0.15
# all_kmers.npy (seed 002): column 0 row index, 8,192 7-mers, then the 2,772 features used.
NPY_COLUMNS = 10965
NPY_FIRST_FEATURE = 8193
# Windows per bincount chunk: bounds the temporary (windows x window) index array to ~4M entries.
_CHUNK_POSITIONS = 1 << 22


def n_canonical(k: int) -> int:
    """Number of canonical k-mers: (4^k + 4^(k/2)) / 2 for even k, 4^k / 2 for odd k."""
    return (4**k + 4 ** (k // 2)) // 2 if k % 2 == 0 else 4**k // 2


def _canonical_layout(k: int) -> tuple[np.ndarray, np.ndarray]:
    """(sorted canonical codes, column of every one of the 4^k codes within the k block).

    A k-mer's code is its base-4 number with A, C, G, T = 0..3, so numeric order of codes is
    lexicographic order of the strings and the complement of base b is 3 - b.
    """
    codes = np.arange(4**k, dtype=np.int64)
    reverse_complement = np.zeros_like(codes)
    for j in range(k):  # last base first: its complement becomes the leading digit
        reverse_complement = reverse_complement * 4 + (3 - ((codes >> (2 * j)) & 3))
    canonical = np.minimum(codes, reverse_complement)
    unique = np.unique(canonical)
    return unique, np.searchsorted(unique, canonical)


def _decode(code: int, k: int) -> str:
    """The k-mer string of a code."""
    return "".join("ACGT"[(code >> (2 * (k - 1 - j))) & 3] for j in range(k))


def _build_layout() -> tuple[dict[int, np.ndarray], list[str], dict[str, tuple[int, int]]]:
    """Global column of every k-mer code per k, the feature names and the per-k ranges."""
    column_of, names, groups, offset = {}, [], {}, 0
    for k in KS:
        unique, column = _canonical_layout(k)
        column_of[k] = (column + offset).astype(np.int16)
        names.extend(_decode(int(c), k) for c in unique)
        groups[f"{k}mer"] = (offset, offset + len(unique))
        offset += len(unique)
    return column_of, names, groups


_COLUMN_OF, FEATURE_NAMES, FEATURE_GROUPS = _build_layout()
N_FEATURES = len(FEATURE_NAMES)  # 2,772
_SKIP = N_FEATURES  # extra bincount bin that collects skipped k-mers
# Byte -> base code: ACGT and acgt -> 0..3 (lowercase is soft-masking, not a different base),
# every other byte -> 4, "not a base".
_BASE_CODE = np.full(256, 4, dtype=np.uint8)
for _code, _letter in enumerate(b"ACGT"):
    _BASE_CODE[_letter] = _code
    _BASE_CODE[_letter + 32] = _code


def count_windows(
    sequence: bytes | str, window: int, step: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Canonical k-mer counts of the windows of one sequence.

    Returns (starts (n,), counts (n, 2772) int64, skipped (n,) int64): windows start every
    `step` bp (default `window`) and must fit wholly inside the sequence; `skipped` counts the
    k-mer positions of all k that cover a letter other than ACGT/acgt.
    """
    if isinstance(sequence, str):
        sequence = sequence.encode("ascii", errors="replace")
    step = window if step is None else step
    if window < max(KS) or step < 1:
        raise ValueError(f"expected window >= {max(KS)} and step >= 1, found {window}, {step}")
    codes = _BASE_CODE[np.frombuffer(sequence, dtype=np.uint8)]
    length = len(codes)
    n_windows = (length - window) // step + 1 if length >= window else 0
    starts = np.arange(n_windows, dtype=np.int64) * step
    counts = np.zeros((n_windows, N_FEATURES + 1), dtype=np.int64)
    if n_windows == 0:
        return starts, counts[:, :N_FEATURES], counts[:, _SKIP]
    invalid = codes == 4
    # invalid_before[i] = non-bases among the first i letters: a k-mer at i is skipped when
    # invalid_before[i + k] - invalid_before[i] > 0.
    invalid_before = np.concatenate(([0], np.cumsum(invalid, dtype=np.int64)))
    base = np.where(invalid, 0, codes).astype(np.int32)
    chunk = max(1, _CHUNK_POSITIONS // window)
    code = base
    for k in range(1, max(KS) + 1):
        if k > 1:  # rolling: code of the k-mer at i = 4 * code of the (k-1)-mer at i + base[i+k-1]
            code = code[:-1] * 4 + base[k - 1 :]
        skipped = invalid_before[k:] > invalid_before[:-k]
        column = np.where(skipped, _SKIP, _COLUMN_OF[k][code])
        # Row w holds the k-mer positions start_w .. start_w + window - k, a strided view.
        per_window = sliding_window_view(column, window - k + 1)[::step]
        for lo in range(0, n_windows, chunk):
            rows = per_window[lo : lo + chunk]
            flat = rows + (np.arange(len(rows), dtype=np.int64) * (N_FEATURES + 1))[:, None]
            counts[lo : lo + chunk] += np.bincount(
                flat.ravel(), minlength=len(rows) * (N_FEATURES + 1)
            ).reshape(len(rows), N_FEATURES + 1)
    return starts, counts[:, :N_FEATURES], counts[:, _SKIP]


def clr(counts: np.ndarray, pseudocount: float = PSEUDOCOUNT) -> np.ndarray:
    """Centred log-ratio of each k-mer size block on its own (see the module docstring), float32."""
    logs = np.log(np.asarray(counts, dtype=np.float64) + pseudocount)
    for lo, hi in FEATURE_GROUPS.values():
        logs[:, lo:hi] -= logs[:, lo:hi].mean(axis=1, keepdims=True)
    return logs.astype(np.float32)


def gc_content(counts: np.ndarray) -> np.ndarray:
    """G+C share of the valid bases per window from the 1-mer counts; NaN with no valid base."""
    lo, _ = FEATURE_GROUPS["1mer"]
    at, gc = counts[:, lo].astype(np.float64), counts[:, lo + 1].astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return gc / (at + gc)


# ----------------------------------------------------------------------------- FASTA


def read_fasta(path: str) -> list[tuple[str, bytes]]:
    """(record id, sequence) of every record of a plain or gzip FASTA file, in file order."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found (expected a FASTA file, plain or gzip)")
    with open(path, "rb") as handle:
        raw = handle.read()
    kind = "FASTA"
    if raw[:2] == GZIP_MAGIC:
        kind = "gzip FASTA"
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as err:
            raise DataError(f"{path}: gzip data is corrupt or truncated: {err}") from err
    text = raw.lstrip()
    if not text.startswith(b">"):
        found = repr(text[:20]) if text else "an empty file"
        if kind == "gzip FASTA":
            raise DataError(
                f"{path}: a gzip file, but its content is not FASTA: expected a '>' header line "
                f"at the start, found {found}"
            )
        raise DataError(
            f"{path}: neither FASTA nor gzip FASTA: expected a '>' header line at the start "
            f"(or gzip magic bytes 1f 8b), found {found}"
        )
    records, seen = [], set()
    for chunk in text[1:].split(b"\n>"):
        header, _, body = chunk.partition(b"\n")
        header = header.strip().decode("utf-8", errors="replace")
        record = header.split()[0] if header else ""
        sequence = body.translate(None, b" \t\r\n")
        if not record:
            raise DataError(f"{path}: {kind} record {len(records) + 1} has an empty '>' header")
        if not sequence:
            raise DataError(f"{path}: {kind} record '{record}' has no sequence")
        if record in seen:
            raise DataError(f"{path}: {kind} record id '{record}' appears more than once")
        seen.add(record)
        records.append((record, sequence))
    return records


@dataclass
class KmerTable:
    """Counted windows of one or more FASTA files, before CLR."""

    counts: np.ndarray  # (N, 2772) int64, canonical k-mer counts
    skipped: np.ndarray  # (N,) int64, k-mer positions (all k) covering a non-ACGT letter
    ids: np.ndarray  # (N,) str, record:start-end
    records: np.ndarray  # (N,) str, the record each window comes from


def count_fasta(
    files: Sequence[str], window: int, step: int | None = None, progress: bool = False
) -> KmerTable:
    """Count every window of every record of `files`; log windows, dropped bases and skips."""
    source = ", ".join(files)
    started = time.perf_counter()
    _check_window(source, window, step)
    step = window if step is None else step
    counts, skipped, ids, records = [], [], [], []
    longest, tail, short, n_records, owner = 0, 0, 0, 0, {}
    for path in files:
        fasta = read_fasta(path)
        for record, sequence in tqdm(fasta, desc=os.path.basename(path), disable=not progress):
            if record in owner:
                raise DataError(f"{path}: record id '{record}' also appears in {owner[record]}")
            owner[record] = path
            n_records += 1
            length = len(sequence)
            longest = max(longest, length)
            starts, c, s = count_windows(sequence, window, step)
            if len(starts) == 0:
                short += 1
                tail += length
                continue
            tail += length - int(starts[-1] + window)
            counts.append(c)
            skipped.append(s)
            ids.extend(f"{record}:{a}-{a + window}" for a in starts.tolist())
            records.extend([record] * len(starts))
    if not counts:
        raise DataError(
            f"{source}: window {window} bp is longer than every sequence (the longest of "
            f"{n_records} records is {longest} bp); set a smaller dataset.window"
        )
    table = KmerTable(
        counts=np.concatenate(counts),
        skipped=np.concatenate(skipped),
        ids=np.array(ids),
        records=np.array(records),
    )
    positions = int(table.counts.sum()) + int(table.skipped.sum())
    logger.info(
        "%s: %d windows of %d bp (step %d) from %d record(s) in %.2f s; dropped %d bp (record "
        "tails and %d record(s) shorter than a window); skipped %d of %d k-mers (%.2f%%) that "
        "cover a letter other than ACGT",
        source,
        len(table.ids),
        window,
        step,
        n_records,
        time.perf_counter() - started,
        tail,
        short,
        int(table.skipped.sum()),
        positions,
        100.0 * table.skipped.sum() / max(positions, 1),
    )
    return table


def _check_window(source: str, window: int, step: int | None) -> None:
    """Stop with one DataError naming the option when the window or step cannot work."""
    for name, value in (("window", window), ("step", step)):
        if value is None and name == "step":
            continue
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise DataError(f"{source}: {name}: expected a positive integer (bp), found {value!r}")
    if window < max(KS):
        raise DataError(
            f"{source}: window: expected at least {max(KS)} bp (the longest k-mer), found {window}"
        )


# ----------------------------------------------------------------------------- h5 and npy


def write_kmers_h5(out: str, table: KmerTable, attrs: dict[str, object]) -> None:
    """Write counts, CLR values, ids, records (as `groups`), feature names and skips (`H5_KEYS`).

    `groups` holds each window's record whatever the grouping: `load_kmers` applies group_by
    when it reads the file, from these records and the ids, exactly as for the FASTA files.
    """
    text = h5py.string_dtype("utf-8")
    with h5py.File(out, "w") as f:
        f.create_dataset("counts", data=table.counts.astype(np.int32), compression="gzip")
        f.create_dataset("values", data=clr(table.counts), compression="gzip")
        f.create_dataset("ids", data=table.ids.astype(object), dtype=text)
        f.create_dataset("groups", data=table.records.astype(object), dtype=text)
        f.create_dataset("feature_names", data=np.array(FEATURE_NAMES, dtype=object), dtype=text)
        f.create_dataset("skipped_kmers", data=table.skipped)
        f.attrs.update({**attrs, "pseudocount": PSEUDOCOUNT, "clr": "per k-mer size block"})


def _read_h5(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(counts, values, ids, groups, skipped) of a file written by `write_kmers_h5`, checked."""
    with open_h5(path, f"an h5 file with keys {list(H5_KEYS)}") as file:
        missing = [k for k in H5_KEYS if not isinstance(file.get(k), h5py.Dataset)]
        if missing:
            raise DataError(
                f"{path}: expected datasets {list(H5_KEYS)} (written by python -m "
                f"vaelab.data.kmers), missing {missing}; the file has keys {sorted(file.keys())}"
            )
        logger.info(
            "%s: windows of %s bp (step %s) from %s, as written; dataset.window and step are not "
            "used for an h5 file",
            path,
            file.attrs.get("window", "?"),
            file.attrs.get("step", "?"),
            file.attrs.get("fasta", "?"),
        )
        data = {}
        for key in H5_KEYS:
            node = file[key]
            data[key] = node.asstr()[()] if h5py.check_string_dtype(node.dtype) else node[()]
    n = len(data["values"]) if data["values"].ndim else 0
    for key, shape in (("counts", (n, N_FEATURES)), ("values", (n, N_FEATURES))):
        if data[key].shape != shape or data[key].dtype.kind not in "iuf":
            raise DataError(
                f"{path}: key '{key}': expected numbers of shape (N, {N_FEATURES}), found "
                f"{data[key].dtype} of shape {data[key].shape}"
            )
    for key in ("ids", "groups", "skipped_kmers"):
        if data[key].shape != (n,):
            raise DataError(f"{path}: key '{key}': expected shape ({n},), found {data[key].shape}")
    if list(data["feature_names"]) != FEATURE_NAMES:
        raise DataError(
            f"{path}: key 'feature_names': expected the {N_FEATURES} canonical 6- to 1-mers in "
            f"this module's order, found {len(data['feature_names'])} other names"
        )
    if n == 0 or not np.isfinite(data["values"]).all():
        raise DataError(f"{path}: key 'values': expected at least one row, all finite")
    ids, groups = (np.array(data[k].tolist(), dtype=str) for k in ("ids", "groups"))
    return data["counts"], data["values"].astype(np.float32), ids, groups, data["skipped_kmers"]


def _read_npy(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(counts as float64 (N, 2772), ids) from the seed's all_kmers.npy layout, checked."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found (expected all_kmers.npy, {NPY_COLUMNS} columns)")
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as err:
        raise DataError(f"{path}: cannot read as a .npy array: {err}") from err
    if array.ndim != 2 or array.shape[1] != NPY_COLUMNS or array.shape[0] == 0:
        raise DataError(
            f"{path}: expected a 2-D array with {NPY_COLUMNS} columns (row index, 8,192 "
            f"7-mers, {N_FEATURES} 6- to 1-mers) and at least one row, found shape {array.shape}"
        )
    if array.dtype.kind not in "iuf":
        raise DataError(f"{path}: expected numbers, found dtype {array.dtype}")
    # Only the used columns are copied out of the memory map (the 7-mers are 3/4 of the file).
    counts = np.array(array[:, NPY_FIRST_FEATURE:], dtype=np.float64)
    bad = ~np.isfinite(counts) | (counts < 0)
    if bad.any():
        row, col = (int(i) for i in np.argwhere(bad)[0])
        raise DataError(
            f"{path}: expected non-negative finite counts in columns {NPY_FIRST_FEATURE}-"
            f"{NPY_COLUMNS - 1} (CLR is applied here), found {counts[row, col]} at row {row}, "
            f"column {NPY_FIRST_FEATURE + col}; is the file already CLR-transformed?"
        )
    ids = np.array([f"row{int(i)}" for i in np.asarray(array[:, 0]).tolist()])
    return counts, ids


# ----------------------------------------------------------------------------- groups


def window_positions(source: str, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(start, end) in bp of every window id `record:start-end`; stops on an id of another form."""
    starts, ends = np.empty(len(ids), dtype=np.int64), np.empty(len(ids), dtype=np.int64)
    for i, window_id in enumerate(ids.tolist()):
        # rsplit: a record name may itself hold ':' or '-', the position part never does.
        span = window_id.rsplit(":", 1)[-1].split("-")
        if len(span) != 2 or not all(part.isdigit() for part in span):
            raise DataError(
                f"{source}: window id {window_id!r}: expected record:start-end (bp), as python -m "
                "vaelab.data.kmers writes, to place the window for group_by=block"
            )
        starts[i], ends[i] = int(span[0]), int(span[1])
    return starts, ends


def choose_group_by(records: np.ndarray) -> str:
    """group_by="auto": "record" if no record holds over `AUTO_MAX_RECORD_SHARE` of the windows."""
    _, windows = np.unique(records, return_counts=True)
    return "record" if windows.max() <= AUTO_MAX_RECORD_SHARE * windows.sum() else "block"


def block_groups(
    records: np.ndarray, starts: np.ndarray, ends: np.ndarray, n_blocks: int
) -> tuple[np.ndarray, np.ndarray]:
    """(group of every window, windows kept): contiguous blocks of each record's windows.

    Each record gets round_half_up(n_blocks x its share of the windows) blocks, at least one, at
    most n // (g + 1) for n windows each overlapping at most g later ones, cut as evenly as
    np.array_split cuts. Windows that overlap a kept window of an earlier block of their record
    are not kept; a group is named by the span of its kept windows, `record:start-end`.
    """
    names, inverse, windows = np.unique(records, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    order = np.lexsort((starts, inverse))  # by record, then along it
    bounds = np.concatenate([[0], np.cumsum(windows)])
    # Half up, as vaelab.data.prepare rounds its split, not Python's round-half-to-even.
    wanted = np.maximum(1, np.floor(n_blocks * windows / len(records) + 0.5).astype(np.int64))
    # A record in one block is one group, named by its span: no boundary, nothing dropped.
    first = np.minimum.reduceat(starts[order], bounds[:-1])
    last = np.maximum.reduceat(ends[order], bounds[:-1])
    whole = np.array([f"{r}:{a}-{b}" for r, a, b in zip(names, first, last, strict=True)])
    groups = whole[inverse].astype(object)
    keep = np.ones(len(records), dtype=bool)
    for record in np.flatnonzero(wanted > 1).tolist():
        rows = order[bounds[record] : bounds[record + 1]]
        record_starts, record_ends = starts[rows], ends[rows]
        # Window i overlaps the later windows that start before it ends: at most `most` of them,
        # so blocks of more than `most` windows each keep at least one.
        starting_before_end = np.searchsorted(record_starts, record_ends)
        most = max(0, int((starting_before_end - np.arange(1, len(rows) + 1)).max()))
        count = min(int(wanted[record]), max(1, len(rows) // (most + 1)))
        reached = np.iinfo(np.int64).min  # the end of the kept windows of earlier blocks
        for block in np.array_split(np.arange(len(rows)), count):
            overlapping = record_starts[block] < reached
            keep[rows[block[overlapping]]] = False
            kept = block[~overlapping]
            if kept.size:
                span_start, span_end = record_starts[kept].min(), record_ends[kept].max()
                groups[rows[kept]] = f"{names[record]}:{span_start}-{span_end}"
                reached = max(reached, int(span_end))
    return groups.astype(str), keep


# ----------------------------------------------------------------------------- loader


def load_kmers(
    fasta: Sequence[str] | str | None = None,
    path: str | None = None,
    npy: str | None = None,
    window: int = 5000,
    step: int | None = None,
    group_by: str = "auto",
    max_skipped_fraction: float = 1.0,
    n_blocks: int = 20,
    zscore_features: bool = False,
) -> SampleSet:
    """K-mer composition samples from exactly one of FASTA files, a kmers h5 file or all_kmers.npy.

    window, step: bp, for FASTA only (an h5 file keeps the windows it was written with).
    group_by: "record" keeps a record's windows in one split, "block" each contiguous block of
    them, "window" makes each window its own group; "auto" picks record or block (module
    docstring, Groups).
    max_skipped_fraction: drop windows whose share of skipped k-mer positions exceeds this
    (1.0 keeps every window; 0.5 drops windows that are mostly N). Not known for npy files.
    n_blocks: blocks (groups) over all records for group_by="block", shared out by windows.
    zscore_features: z-score each feature on the training split (vaelab.data.prepare); False
    leaves the CLR values as they are, seed 002's recipe (module docstring, Scale).
    """
    given = {k: v for k, v in (("fasta", fasta), ("path", path), ("npy", npy)) if v is not None}
    if len(given) != 1:
        raise DataError(
            "kmers: expected exactly one source, dataset.fasta (FASTA files), dataset.path "
            f"(an h5 file of python -m vaelab.data.kmers) or dataset.npy (all_kmers.npy), "
            f"found {sorted(given) or 'none'}"
        )
    if group_by not in GROUP_BY:
        raise DataError(f"kmers: group_by: expected one of {list(GROUP_BY)}, found {group_by!r}")
    if isinstance(n_blocks, bool) or not isinstance(n_blocks, int | np.integer) or n_blocks < 1:
        raise DataError(f"kmers: n_blocks: expected a positive integer, found {n_blocks!r}")
    if not isinstance(zscore_features, bool | np.bool_):
        raise DataError(
            f"kmers: zscore_features: expected true or false, found {zscore_features!r}"
        )
    if not 0.0 <= float(max_skipped_fraction) <= 1.0:
        raise DataError(
            f"kmers: max_skipped_fraction: expected 0 <= fraction <= 1, found "
            f"{max_skipped_fraction}"
        )
    skipped = None
    names = FEATURE_NAMES
    if fasta is not None:
        files = [os.fspath(fasta)] if isinstance(fasta, str | os.PathLike) else list(fasta)
        files = [os.fspath(f) for f in files]
        if not files:
            raise DataError("kmers: dataset.fasta: expected at least one FASTA file, found []")
        table = count_fasta(files, window, step)
        counts, skipped, ids, records = table.counts, table.skipped, table.ids, table.records
        values, source = clr(counts), ", ".join(files)
    elif path is not None:
        source = os.fspath(path)
        counts, values, ids, records, skipped = _read_h5(source)
    else:
        source = os.fspath(npy)
        counts, ids = _read_npy(source)
        values, records = clr(counts), ids.copy()
        names = [f"{k}mer_{i:04d}" for k in KS for i in range(n_canonical(k))]
        if group_by != "window":
            logger.info(
                "%s: all_kmers.npy has no records or positions (group_by=%s); each row is its "
                "own group",
                source,
                group_by,
            )
        group_by = "window"

    # GC content needs the 1-mer columns in known order (A, C), which an npy file does not state.
    factors = {} if npy is not None else {"gc_content": gc_content(counts)}
    if skipped is not None:
        skipped = np.asarray(skipped, dtype=np.int64)
        positions = counts.sum(axis=1) + skipped
        fraction = skipped / np.maximum(positions, 1)
        mostly = int((fraction > 0.5).sum())
        keep = fraction <= max_skipped_fraction
        if not keep.any():
            raise DataError(
                f"{source}: every window has more than max_skipped_fraction="
                f"{max_skipped_fraction} of its k-mers skipped (non-ACGT letters)"
            )
        if mostly and max_skipped_fraction > 0.5:
            logger.warning(
                "%s: %d of %d windows have more than half of their k-mers skipped (runs of N?); "
                "dataset.max_skipped_fraction=0.5 drops them",
                source,
                mostly,
                len(ids),
            )
        if not keep.all():
            logger.info(
                "%s: dropped %d windows with more than %.2f of their k-mers skipped",
                source,
                int((~keep).sum()),
                max_skipped_fraction,
            )
            values, ids, records, skipped = values[keep], ids[keep], records[keep], skipped[keep]
            factors = {name: factor[keep] for name, factor in factors.items()}
        factors["skipped_kmers"] = skipped.astype(np.float64)

    # Groups, from the windows kept above: an N run must not count towards a record's share.
    if group_by == "auto":
        group_by = choose_group_by(records)
        _, windows = np.unique(records, return_counts=True)
        logger.info(
            "%s: group_by=auto: the largest of %d record(s) holds %.1f%% of the windows, so "
            "group by %s (record only when every record holds at most %.0f%%)",
            source,
            len(windows),
            100.0 * windows.max() / windows.sum(),
            group_by,
            100.0 * AUTO_MAX_RECORD_SHARE,
        )
    groups = records
    if group_by == "window":
        groups = ids.copy()
        if fasta is not None and step is not None and step < window:
            logger.warning(
                "%s: group_by=window with step %d < window %d bp: overlapping windows share "
                "bases, which can then be in train and test; group_by=block keeps them apart",
                source,
                step,
                window,
            )
    elif group_by == "block":
        starts, ends = window_positions(source, ids)
        groups, keep = block_groups(records, starts, ends, n_blocks)
        logger.info(
            "%s: group_by=block: %d blocks (n_blocks=%d) over %d record(s); dropped %d windows "
            "that overlap a window of another block (step < window), so no base is in two groups",
            source,
            len(np.unique(groups[keep])),
            n_blocks,
            len(np.unique(records)),
            int((~keep).sum()),
        )
        if not keep.all():
            values, ids, groups = values[keep], ids[keep], groups[keep]
            factors = {name: factor[keep] for name, factor in factors.items()}
    n_groups = len(np.unique(groups))
    if n_groups < 3:
        logger.warning(
            "%s: only %d group(s) (group_by=%s); train/val/test splits need at least 3, so "
            "set dataset.group_by=auto or block for a single genome",
            source,
            n_groups,
            group_by,
        )
    logger.info(
        "%s: %d samples of %d k-mer features (CLR per k, %s), %d groups by %s",
        source,
        len(ids),
        N_FEATURES,
        "z-scored per feature on train" if zscore_features else "not z-scored",
        n_groups,
        group_by,
    )
    return SampleSet(
        values=values,
        masks=None,
        ids=ids,
        groups=groups,
        channel_names=list(names),
        factors=factors,
        source=source,
        feature_groups=dict(FEATURE_GROUPS),
        # Seed 002's scale: the normaliser leaves every feature as it is (mean 0, std 1).
        unnormalised_channels=() if zscore_features else tuple(names),
    )


# ----------------------------------------------------------------------------- command


def main(argv: Sequence[str] | None = None) -> None:
    """Count the windows of FASTA files once and write them to an h5 file (`H5_KEYS`)."""
    parser = argparse.ArgumentParser(
        prog="python -m vaelab.data.kmers",
        description="Canonical 6- to 1-mer counts and CLR values of FASTA windows, to h5.",
    )
    parser.add_argument("--fasta", nargs="+", required=True, help="FASTA files, plain or gzip")
    parser.add_argument("--window", type=int, default=5000, help="window length in bp")
    parser.add_argument("--step", type=int, default=None, help="bp between window starts")
    parser.add_argument("--out", required=True, help="h5 file to write")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        table = count_fasta(args.fasta, args.window, args.step, progress=sys.stderr.isatty())
        attrs = {"window": args.window, "step": args.step or args.window, "fasta": args.fasta}
        write_kmers_h5(args.out, table, attrs)
    except DataError as err:
        logger.error("%s", err)
        raise SystemExit(1) from None
    logger.info("%s: wrote %d windows x %d features", args.out, len(table.ids), N_FEATURES)


if __name__ == "__main__":
    main()
