"""K-mer composition data set: canonical layout, counting, windows, CLR, sources and bad input.

Every expected value is derived here independently of vaelab.data.kmers: by enumerating k-mers
with string operations, counting by hand, or counting letters in the raw contig.
"""

import gzip
import itertools
import math
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import h5py
import numpy as np
import pytest
from hydra.errors import InstantiationException
from hydra.utils import execution_whitelist, instantiate

from vaelab.config import bundled_path
from vaelab.data.kmers import (
    FEATURE_GROUPS,
    FEATURE_NAMES,
    H5_KEYS,
    KS,
    N_FEATURES,
    NPY_COLUMNS,
    block_groups,
    choose_group_by,
    clr,
    count_fasta,
    count_windows,
    load_kmers,
    main,
    n_canonical,
)
from vaelab.data.prepare import SPLITS, prepare
from vaelab.errors import ConfigError, DataError

ECOLI = Path(bundled_path("ecoli_MIIJ01000039.fna.gz"))  # the real contig shipped with vaelab
SEED_GROUPS = {
    "6mer": (0, 2080),
    "5mer": (2080, 2592),
    "4mer": (2592, 2728),
    "3mer": (2728, 2760),
    "2mer": (2760, 2770),
    "1mer": (2770, 2772),
}
COMPLEMENT = str.maketrans("ACGTacgtN", "TGCAtgcaN")


def revcomp(seq: str) -> str:
    return seq.translate(COMPLEMENT)[::-1]


COLUMN = {name: i for i, name in enumerate(FEATURE_NAMES)}


def column(kmer: str) -> int:
    """Column of a k-mer (either strand) in the 2,772 layout."""
    return COLUMN[min(kmer.upper(), revcomp(kmer.upper()))]


def naive_counts(seq: str) -> tuple[np.ndarray, int]:
    """Reference counter: a Python loop over every k-mer string; (counts, skipped)."""
    counts, skipped = np.zeros(N_FEATURES, dtype=np.int64), 0
    seq = seq.upper()
    for k in KS:
        for i in range(len(seq) - k + 1):
            kmer = seq[i : i + k]
            if set(kmer) <= set("ACGT"):
                counts[column(kmer)] += 1
            else:
                skipped += 1
    return counts, skipped


def whole(seq: str) -> tuple[np.ndarray, int]:
    """Counts of one sequence as a single window."""
    _, counts, skipped = count_windows(seq, len(seq))
    return counts[0], int(skipped[0])


def write_fasta(path: Path, records: dict[str, str], gz: bool = False, width: int = 7) -> Path:
    lines = []
    for name, seq in records.items():
        lines.append(f">{name} some description")
        lines.extend(seq[i : i + width] for i in range(0, len(seq), width))
    data = ("\n".join(lines) + "\n").encode()
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def random_dna(n: int, seed: int, alphabet: str = "ACGT") -> str:
    rng = np.random.default_rng(seed)
    return "".join(rng.choice(list(alphabet), n))


# ----------------------------------------------------------------------------- layout


@pytest.mark.parametrize("k", KS)
def test_canonical_count_per_k_matches_enumeration_and_formula(k):
    kmers = ("".join(p) for p in itertools.product("ACGT", repeat=k))
    canonical = sorted({min(s, revcomp(s)) for s in kmers})
    formula = (4**k + 4 ** (k // 2)) // 2 if k % 2 == 0 else 4**k // 2
    assert len(canonical) == formula == n_canonical(k)
    lo, hi = FEATURE_GROUPS[f"{k}mer"]
    assert hi - lo == formula
    assert FEATURE_NAMES[lo:hi] == canonical  # lexicographic order within one k


def test_layout_is_the_seed_002_layout():
    assert [n_canonical(k) for k in KS] == [2080, 512, 136, 32, 10, 2]
    assert N_FEATURES == len(FEATURE_NAMES) == 2772
    assert FEATURE_GROUPS == SEED_GROUPS
    assert list(FEATURE_GROUPS) == [f"{k}mer" for k in KS]  # 6-mers first
    assert FEATURE_NAMES[2770:] == ["A", "C"]
    assert len(set(FEATURE_NAMES)) == N_FEATURES


# ----------------------------------------------------------------------------- counting


def test_hand_counted_acgtac():
    counts, skipped = whole("ACGTAC")
    expected = Counter(
        {
            # 1-mers A,C,G,T,A,C: A = A+T = 3, C = C+G = 3
            "A": 3,
            "C": 3,
            # AC, CG, GT(=AC), TA, AC
            "AC": 3,
            "CG": 1,
            "TA": 1,
            # ACG, CGT(=ACG), GTA, TAC(=GTA)
            "ACG": 2,
            "GTA": 2,
            # ACGT (palindrome), CGTA (= TACG, canonical CGTA), GTAC (palindrome)
            "ACGT": 1,
            "CGTA": 1,
            "GTAC": 1,
            # ACGTA (rc TACGT), CGTAC (rc GTACG)
            "ACGTA": 1,
            "CGTAC": 1,
            # ACGTAC (rc GTACGT)
            "ACGTAC": 1,
        }
    )
    assert skipped == 0
    assert {FEATURE_NAMES[i]: int(c) for i, c in enumerate(counts) if c} == dict(expected)


def test_reverse_complement_invariance():
    seq = random_dna(3000, seed=1, alphabet="ACGTACGTACGTN")
    counts, skipped = whole(seq)
    rc_counts, rc_skipped = whole(revcomp(seq))
    assert np.array_equal(counts, rc_counts) and skipped == rc_skipped
    assert counts.sum() > 0 and skipped > 0
    # A k-mer and its reverse complement land in the same column: AAAAAA with TTTTTT.
    a, _ = whole("AAAAAAAA")
    t, _ = whole("TTTTTTTT")
    assert np.array_equal(a, t) and a[column("AAAAAA")] == 3


def test_vectorised_windows_match_a_naive_counter():
    seq = random_dna(400, seed=2, alphabet="ACGTacgtNR")
    starts, counts, skipped = count_windows(seq, 60, 25)
    assert starts.tolist() == list(range(0, 400 - 60 + 1, 25))
    for start, row, skip in zip(starts, counts, skipped, strict=True):
        expected, expected_skip = naive_counts(seq[start : start + 60])
        assert np.array_equal(row, expected) and skip == expected_skip


def test_n_and_lowercase_handling():
    upper, skipped = whole("ACGTNACGT")
    lower, lower_skipped = whole("acgtNacgt")
    iupac, iupac_skipped = whole("ACGTRACGT")
    # Positions of each k that cover index 4 of 9: k = 1..6 -> 1, 2, 3, 4, 5, 4.
    assert skipped == lower_skipped == iupac_skipped == 19
    assert np.array_equal(upper, lower) and np.array_equal(upper, iupac)
    # 39 positions in all (9 + 8 + ... + 4), 20 valid: the two ACGT halves.
    assert upper.sum() == 20
    assert upper[column("A")] == 4 and upper[column("C")] == 4
    assert upper[column("ACGT")] == 2
    lo, hi = FEATURE_GROUPS["5mer"]
    assert upper[:hi].sum() == 0  # no 5- or 6-mer avoids the N
    # Lowercase is soft-masking: it counts, it is not skipped.
    soft, soft_skipped = whole("acgtac")
    assert soft_skipped == 0 and np.array_equal(soft, whole("ACGTAC")[0])


# ----------------------------------------------------------------------------- CLR


def test_clr_blocks_sum_to_zero_and_small_example():
    counts = np.zeros((2, N_FEATURES), dtype=np.int64)
    counts[0, 2770:] = [3, 1]  # 1-mers: A+T = 3, C+G = 1
    counts[1] = np.arange(N_FEATURES) % 7
    values = clr(counts)
    assert values.dtype == np.float32 and values.shape == (2, N_FEATURES)
    np.testing.assert_allclose(values[0, 2770:], [0.5 * math.log(3), -0.5 * math.log(3)], rtol=1e-5)
    for lo, hi in SEED_GROUPS.values():
        np.testing.assert_allclose(values[:, lo:hi].astype(np.float64).sum(axis=1), 0, atol=2e-3)
    # An all-zero block stays all zero, whatever the other blocks hold.
    assert np.all(values[0, :2770] == 0)
    # Per block, not over the whole vector: the 1-mers do not see the 6-mers.
    other = counts[:1].copy()
    other[0, :2080] = 50
    np.testing.assert_allclose(clr(other)[0, 2770:], values[0, 2770:])
    ones = np.log(1 + 1e-6) - np.log(1e-6)  # pseudocount 1e-6 (seed 002)
    single = np.zeros((1, N_FEATURES))
    single[0, 2760] = 1
    np.testing.assert_allclose(clr(single)[0, 2760], ones * 9 / 10, rtol=1e-5)


# ----------------------------------------------------------------------------- windows, files


def test_windows_ids_groups_and_dropped_bases(tmp_path, caplog):
    records = {
        "chr1": random_dna(23, seed=3),
        "plasmid": random_dna(12, seed=4),
        "tiny": random_dna(8, seed=5),
    }
    fasta = write_fasta(tmp_path / "g.fa", records)
    with caplog.at_level("INFO", logger="vaelab.data.kmers"):
        samples = load_kmers(fasta=str(fasta), window=10, group_by="record")
    assert samples.ids.tolist() == ["chr1:0-10", "chr1:10-20", "plasmid:0-10"]
    assert samples.groups.tolist() == ["chr1", "chr1", "plasmid"]
    # By default (auto) chr1 holds 2 of 3 windows, over 15 %: blocks, here one window each.
    blocks = load_kmers(fasta=str(fasta), window=10)
    assert blocks.ids.tolist() == samples.ids.tolist()
    assert blocks.groups.tolist() == ["chr1:0-10", "chr1:10-20", "plasmid:0-10"]
    assert samples.values.shape == (3, N_FEATURES) and samples.masks is None
    assert samples.channel_names == FEATURE_NAMES and samples.feature_groups == SEED_GROUPS
    assert np.array_equal(samples.factors["skipped_kmers"], [0, 0, 0])
    # Dropped: chr1 tail 3 bp, plasmid tail 2 bp, the whole 8 bp record.
    assert "3 windows of 10 bp" in caplog.text and "dropped 13 bp" in caplog.text
    assert "1 record(s) shorter than a window" in caplog.text
    table = count_fasta([str(fasta)], window=10, step=5)
    assert table.ids.tolist() == ["chr1:0-10", "chr1:5-15", "chr1:10-20", "plasmid:0-10"]
    expected, _ = naive_counts(records["chr1"][5:15])
    assert np.array_equal(table.counts[1], expected)
    by_window = load_kmers(fasta=str(fasta), window=10, group_by="window")
    assert np.array_equal(by_window.groups, by_window.ids)


def test_gzip_and_plain_give_identical_results(tmp_path):
    records = {"a": random_dna(5000, seed=6, alphabet="ACGTN"), "b": random_dna(3000, seed=7)}
    # Names that lie about the format: detection is by magic bytes, not by extension.
    plain = write_fasta(tmp_path / "plain.fna.gz", records)
    packed = write_fasta(tmp_path / "packed.fna", records, gz=True)
    assert packed.read_bytes()[:2] == b"\x1f\x8b"
    a = load_kmers(fasta=str(plain), window=1000)
    b = load_kmers(fasta=[str(packed)], window=1000)
    assert len(a) == 8
    assert np.array_equal(a.values, b.values) and np.array_equal(a.ids, b.ids)
    assert np.array_equal(a.factors["skipped_kmers"], b.factors["skipped_kmers"])
    # Two files together: the windows of both, in file order.
    other = write_fasta(tmp_path / "other.fa", {"c": random_dna(2000, seed=8)})
    both = load_kmers(fasta=[str(plain), str(other)], window=1000)
    assert both.ids.tolist()[-2:] == ["c:0-1000", "c:1000-2000"] and len(both) == 10


def test_cli_writes_h5_that_the_config_reads_back(tmp_path, compose_config):
    fasta = write_fasta(tmp_path / "g.fa.gz", {"x": random_dna(4500, 9, "ACGTN")}, gz=True)
    out = tmp_path / "kmers.h5"
    cmd = [sys.executable, "-m", "vaelab.data.kmers", "--fasta", str(fasta), "--window", "1000"]
    done = subprocess.run([*cmd, "--out", str(out)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "4 windows of 1000 bp" in done.stderr and done.stdout == ""
    with h5py.File(out, "r") as f:
        assert set(H5_KEYS) <= set(f.keys())
        counts = f["counts"][()]
        assert counts.shape == (4, N_FEATURES) and counts.dtype.kind == "i"
        assert f["values"].dtype == np.float32 and f["values"].shape == (4, N_FEATURES)
        assert f["ids"].asstr()[()].tolist() == [f"x:{i}-{i + 1000}" for i in range(0, 4000, 1000)]
        assert f["groups"].asstr()[()].tolist() == ["x"] * 4
        assert f["feature_names"].asstr()[()].tolist() == FEATURE_NAMES
        skipped = f["skipped_kmers"][()]
        assert skipped.shape == (4,) and skipped.sum() > 0
        # Every k-mer position is either counted or skipped: 6 * 1000 - 15 per window.
        assert np.array_equal(counts.sum(axis=1) + skipped, [5985] * 4)
        stored = f["values"][()]
    np.testing.assert_allclose(stored, clr(counts))
    cfg = compose_config(["dataset=kmers", f"dataset.path='{out}'", "dataset.group_by=window"])
    with execution_whitelist(["vaelab.*"]):
        samples = instantiate(cfg.dataset)
    assert np.array_equal(samples.values, stored)
    assert np.array_equal(samples.factors["skipped_kmers"], skipped)
    direct = load_kmers(fasta=str(fasta), window=1000)
    assert np.array_equal(direct.values, samples.values) and np.array_equal(direct.ids, samples.ids)


def test_cli_reports_bad_input_and_fails(tmp_path, caplog):
    missing = tmp_path / "absent.fa"
    with caplog.at_level("ERROR"), pytest.raises(SystemExit) as stop:
        main(["--fasta", str(missing), "--out", str(tmp_path / "o.h5")])
    assert stop.value.code == 1 and "absent.fa: file not found" in caplog.text
    assert not (tmp_path / "o.h5").exists()


def test_all_kmers_npy_layout(tmp_path):
    rng = np.random.default_rng(10)
    array = np.zeros((3, NPY_COLUMNS))
    array[:, 0] = [7, 8, 9]  # row index
    array[:, 1:8193] = -1e9  # 7-mers: unused, and they would break CLR if read
    counts = rng.integers(0, 20, (3, N_FEATURES))
    array[:, 8193:] = counts
    path = tmp_path / "all_kmers.npy"
    np.save(path, array)
    samples = load_kmers(npy=str(path))
    assert samples.values.shape == (3, N_FEATURES)
    np.testing.assert_allclose(samples.values, clr(counts))
    assert samples.ids.tolist() == ["row7", "row8", "row9"]
    assert np.array_equal(samples.groups, samples.ids)
    assert samples.feature_groups == SEED_GROUPS
    assert samples.channel_names[0] == "6mer_0000" and samples.channel_names[-1] == "1mer_0001"
    assert "skipped_kmers" not in samples.factors
    # No records, no positions: blocks cannot be cut, each row stays its own group.
    assert np.array_equal(load_kmers(npy=str(path), group_by="block").groups, samples.ids)


# ----------------------------------------------------------------------------- groups


def id_span(window_id: str) -> tuple[str, int, int]:
    """(record, start, end) of a window id `record:start-end`."""
    record, span = window_id.rsplit(":", 1)
    start, end = span.split("-")
    return record, int(start), int(end)


def group_spans(samples) -> dict[str, tuple[int, int]]:
    """First start and last end of the windows of each group, from the ids alone."""
    spans = {}
    for window_id, group in zip(samples.ids.tolist(), samples.groups.tolist(), strict=True):
        _, start, end = id_span(window_id)
        lo, hi = spans.get(group, (start, end))
        spans[group] = (min(lo, start), max(hi, end))
    return spans


def split_groups(samples, seed: int = 0) -> list[int]:
    """Groups in train, val and test under the default 15 %/15 % split."""
    split = prepare(samples, 0.15, 0.15, seed=seed).split
    return [len(set(samples.groups[split == name].tolist())) for name in SPLITS]


def test_one_record_fasta_loads_and_splits_three_ways_with_defaults(tmp_path):
    fasta = write_fasta(tmp_path / "genome.fna", {"chrom": random_dna(120_000, 11)}, width=80)
    samples = load_kmers(fasta=str(fasta))
    assert samples.ids.tolist() == [f"chrom:{a}-{a + 5000}" for a in range(0, 120_000, 5000)]
    # 24 windows of 5 kb in 20 blocks, as np.array_split cuts: 4 blocks of 2 windows, 16 of 1.
    assert sorted(Counter(samples.groups.tolist()).values()) == [1] * 16 + [2] * 4
    assert samples.groups[:3].tolist() == ["chrom:0-10000", "chrom:0-10000", "chrom:10000-20000"]
    split = prepare(samples, 0.15, 0.15, seed=0).split
    assert split_groups(samples) == [14, 3, 3]
    for a, b in itertools.combinations(SPLITS, 2):
        assert not set(samples.groups[split == a]) & set(samples.groups[split == b])


@pytest.mark.parametrize("window, step", [(1000, 300), (1000, 999), (600, 100)])
def test_blocks_share_no_base_when_windows_overlap(tmp_path, caplog, window, step):
    fasta = write_fasta(tmp_path / "g.fa", {"chrom": random_dna(40_000, 12)}, width=80)
    with caplog.at_level("WARNING", logger="vaelab.data.kmers"):
        every = load_kmers(fasta=str(fasta), window=window, step=step, group_by="window")
    assert "overlapping windows share bases" in caplog.text
    samples = load_kmers(fasta=str(fasta), window=window, step=step)
    spans = group_spans(samples)
    assert len(spans) == 20
    # Each group's windows lie inside its span and the spans do not overlap: no shared base.
    ordered = sorted(spans.values())
    assert all(hi <= next_lo for (_, hi), (next_lo, _) in itertools.pairwise(ordered))
    assert all(group == f"chrom:{lo}-{hi}" for group, (lo, hi) in spans.items())
    # ceil(window / step) - 1 windows dropped at each of the 19 boundaries, none elsewhere.
    assert len(every) - len(samples) == 19 * (math.ceil(window / step) - 1)
    assert set(samples.ids.tolist()) <= set(every.ids.tolist())
    assert split_groups(samples) == [14, 3, 3]


def test_block_counts_and_dropped_windows_by_hand(tmp_path, caplog):
    records = {"chrom": random_dna(1000, 13), "plasmid": random_dna(250, 14)}
    fasta = write_fasta(tmp_path / "g.fa", records)
    with caplog.at_level("INFO", logger="vaelab.data.kmers"):
        samples = load_kmers(fasta=str(fasta), window=100, step=50, n_blocks=4)
    # Windows every 50 bp: chrom 19 (starts 0-900), plasmid 4 (0-150), 23 in all. Blocks, by
    # share of the windows: chrom 4 x 19/23 = 3.3 -> 3, plasmid 4 x 4/23 = 0.7 -> 1 (whole).
    # chrom's windows cut 7/6/6: starts 0-300, 350-600, 650-900. A window overlaps only the
    # next one (ceil(100 / 50) - 1 = 1), so the first window of blocks 2 and 3 goes: 350, 650.
    expected = {
        "chrom:0-400": [0, 50, 100, 150, 200, 250, 300],
        "chrom:400-700": [400, 450, 500, 550, 600],
        "chrom:700-1000": [700, 750, 800, 850, 900],
        "plasmid:0-250": [0, 50, 100, 150],
    }
    ids = [f"{g.split(':')[0]}:{a}-{a + 100}" for g, starts in expected.items() for a in starts]
    assert samples.ids.tolist() == ids
    assert samples.groups.tolist() == [g for g, starts in expected.items() for _ in starts]
    assert "group_by=auto: the largest of 2 record(s) holds 82.6% of the windows" in caplog.text
    assert "4 blocks (n_blocks=4) over 2 record(s); dropped 2 windows" in caplog.text
    # The kept windows are the same samples as without blocks.
    every = load_kmers(fasta=str(fasta), window=100, step=50, group_by="window")
    rows = [every.ids.tolist().index(i) for i in ids]
    assert np.array_equal(samples.values, every.values[rows])
    assert np.array_equal(samples.factors["gc_content"], every.factors["gc_content"][rows])


def test_block_edges_a_gap_and_heavy_overlap():
    # A gap between the blocks (windows dropped for N): nothing overlaps, nothing is dropped.
    starts = np.array([0, 50, 100, 150, 600, 650, 700, 750])
    groups, keep = block_groups(np.array(["r"] * 8), starts, starts + 100, n_blocks=2)
    assert keep.all() and groups.tolist() == ["r:0-250"] * 4 + ["r:600-850"] * 4
    # The same windows without the gap: the first of block 2 (200) overlaps the last of block 1.
    starts = np.arange(8) * 50
    groups, keep = block_groups(np.array(["r"] * 8), starts, starts + 100, n_blocks=2)
    assert keep.tolist() == [True] * 4 + [False] + [True] * 3
    assert groups[keep].tolist() == ["r:0-250"] * 4 + ["r:250-450"] * 3
    # 21 windows of 100 bp every 10 bp: each overlaps the next 9, so at most 21 // 10 = 2
    # blocks (of 11 and 10 windows), whatever n_blocks asks; block 2 keeps its last window.
    starts = np.arange(21) * 10
    groups, keep = block_groups(np.array(["r"] * 21), starts, starts + 100, n_blocks=20)
    assert groups[keep].tolist() == ["r:0-200"] * 11 + ["r:200-300"]
    assert int((~keep).sum()) == 9


def test_auto_groups_many_records_by_record_and_a_genome_with_plasmids_by_block(tmp_path):
    contigs = {f"contig{i}": random_dna(2000, 20 + i) for i in range(8)}
    draft = write_fasta(tmp_path / "draft.fa", contigs, width=80)
    samples = load_kmers(fasta=str(draft), window=500)
    # 8 records of 4 windows, 12.5 % each (<= 15 %): whole records are the groups.
    assert samples.groups.tolist() == [name for name in contigs for _ in range(4)]
    assert split_groups(samples) == [6, 1, 1]
    # The threshold: 7 equal records hold 14.3 % each, 6 hold 16.7 %.
    assert choose_group_by(np.repeat(list("abcdefg"), 4)) == "record"
    assert choose_group_by(np.repeat(list("abcdef"), 4)) == "block"
    # A chromosome with two plasmids, 20 + 2 + 1 windows: blocks by share, 20 x 20/23 = 17.4
    # -> 17, 20 x 2/23 = 1.7 -> 2 and 20 x 1/23 = 0.9 -> 1.
    records = {
        "chrom": random_dna(10_000, 30),
        "p1": random_dna(1000, 31),
        "p2": random_dna(500, 32),
    }
    genome = write_fasta(tmp_path / "genome.fa", records, width=80)
    blocks = load_kmers(fasta=str(genome), window=500)
    assert Counter(id_span(g)[0] for g in set(blocks.groups.tolist())) == {
        "chrom": 17,
        "p1": 2,
        "p2": 1,
    }
    by_record = load_kmers(fasta=str(genome), window=500, group_by="record")
    assert set(by_record.groups.tolist()) == set(records)


def test_h5_written_from_a_fasta_gives_its_groups(tmp_path):
    fasta = write_fasta(tmp_path / "g.fa", {"chrom": random_dna(30_000, 15, "ACGTN")}, width=80)
    out = tmp_path / "kmers.h5"
    main(["--fasta", str(fasta), "--window", "1000", "--step", "400", "--out", str(out)])
    with h5py.File(out, "r") as f:
        # The file keeps the records; the grouping is chosen when it is loaded.
        assert set(f["groups"].asstr()[()].tolist()) == {"chrom"}
        n = len(f["ids"])
    for group_by in ("auto", "record", "block", "window"):
        from_h5 = load_kmers(path=str(out), group_by=group_by)
        direct = load_kmers(fasta=str(fasta), window=1000, step=400, group_by=group_by)
        assert np.array_equal(from_h5.ids, direct.ids), group_by
        assert np.array_equal(from_h5.groups, direct.groups), group_by
        assert np.array_equal(from_h5.values, direct.values), group_by
    assert len(set(load_kmers(path=str(out)).groups.tolist())) == 20
    # Blocks need positions: an h5 file whose ids are not record:start-end says so.
    with h5py.File(out, "r+") as f:
        del f["ids"]
        f.create_dataset("ids", data=[f"w{i}" for i in range(n)], dtype=h5py.string_dtype())
    with pytest.raises(DataError, match="kmers.h5: window id 'w0': expected record:start-end"):
        load_kmers(path=str(out))
    assert len(load_kmers(path=str(out), group_by="record")) == n


@pytest.mark.slow
def test_a_one_record_fasta_trains_with_defaults(compose_config, tmp_path, one_thread):
    # Imported here: MLflow and vaelab.train (Optuna) are slow imports no other test here needs.
    import mlflow

    from vaelab.train import train

    fasta = write_fasta(tmp_path / "genome.fna.gz", {"chrom": random_dna(120_000, 16)}, gz=True)
    cfg = compose_config(
        ["dataset=kmers", f"dataset.fasta='{fasta}'", "model=mlp", "model.hidden_dims=[32,16]"]
        + ["model.latent_dim=4", "trainer.epochs=1", "trainer.batch_size=8"]
        + ["trainer.patience=null", "trainer.device=cpu", "evaluation.downstream=false"]
    )
    assert cfg.dataset.group_by == "auto" and cfg.dataset.window == 5000
    objective = train(cfg, tmp_path / "run")
    client = mlflow.MlflowClient(cfg.tracking.uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [run.info.status for run in runs] == ["FINISHED"]
    assert objective == runs[0].data.metrics["final/active_units"]


def test_without_zscore_the_model_sees_the_clr_values_exactly(tmp_path):
    """zscore_features=false (seed 002): the prepared values equal clr(counts) bit for bit,
    counts taken by the naive counter; with true they are z-scored on the train split."""
    records = {f"r{i}": random_dna(1000, 40 + i) for i in range(10)}
    fasta = write_fasta(tmp_path / "draft.fa", records)
    expected = clr(np.stack([whole(seq)[0] for seq in records.values()]))
    plain = load_kmers(fasta=str(fasta), window=1000, group_by="record")
    assert plain.unnormalised_channels == tuple(FEATURE_NAMES)
    data = prepare(plain, 0.2, 0.2, seed=0)
    assert np.array_equal(data.values.numpy(), expected)  # exact, not close
    assert np.array_equal(data.normaliser.inverse_transform(data.values.numpy()), expected)

    scored = load_kmers(fasta=str(fasta), window=1000, group_by="record", zscore_features=True)
    assert scored.unnormalised_channels == ()
    data = prepare(scored, 0.2, 0.2, seed=0)
    train = data.split == "train"
    mean, std = expected[train].astype(np.float64).mean(0), expected[train].std(0)
    std[std < 1e-6] = 1.0  # a feature constant on train is only centred (prepare.STD_FLOOR)
    np.testing.assert_allclose(data.values.numpy(), (expected - mean) / std, atol=1e-5)
    values = data.values.numpy()[train]
    varying = expected[train].std(0) > 1e-6
    np.testing.assert_allclose(values.mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(values[:, varying].std(0), 1.0, atol=1e-4)
    with pytest.raises(DataError, match="zscore_features"):
        load_kmers(fasta=str(fasta), window=1000, zscore_features="no")


def test_the_kmers_config_and_kmer_mlp_leave_the_clr_values_unscaled(compose_config):
    assert compose_config(["dataset=kmers"]).dataset.zscore_features is False
    assert compose_config(["experiment=kmer_mlp"]).dataset.zscore_features is False


# ----------------------------------------------------------------------------- bad input


def test_exactly_one_source(tmp_path):
    with pytest.raises(DataError, match="exactly one source.*found none"):
        load_kmers()
    with pytest.raises(DataError, match=r"found \['fasta', 'npy'\]"):
        load_kmers(fasta="a.fa", npy="b.npy")
    with pytest.raises(DataError, match="at least one FASTA file"):
        load_kmers(fasta=[])


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "neither FASTA nor gzip FASTA.*found an empty file"),
        (b"ACGTACGT\n", "neither FASTA nor gzip FASTA.*expected a '>' header"),
        (b"\x89PNG\r\n\x1a\n\x00\x00", "neither FASTA nor gzip FASTA"),
        (gzip.compress(b"just text\n", mtime=0), "a gzip file, but its content is not FASTA"),
        (b"\x1f\x8b\x08\x00garbage", "gzip data is corrupt or truncated"),
        (b">a\n>b\nACGTACGT\n", "record 'a' has no sequence"),
        (b">a\nACGTACGT\n>b\n", "record 'b' has no sequence"),
        (b">\nACGTACGT\n", "record 1 has an empty '>' header"),
        (b">a\nACGTACGT\n>a x\nACGTACGT\n", "record id 'a' appears more than once"),
    ],
    # Readable ids, not the bytes: pytest-xdist's workers must collect the
    # same names, and a gzip header holds the time it was written.
    ids=[
        "empty",
        "no-header",
        "png",
        "gzip-of-text",
        "corrupt-gzip",
        "record-without-sequence",
        "last-record-without-sequence",
        "empty-header",
        "duplicate-id",
    ],
)
def test_bad_fasta_names_file_and_problem(tmp_path, content, message):
    path = tmp_path / "bad.fa"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message) as err:
        load_kmers(fasta=str(path), window=6)
    assert str(err.value).startswith(str(path))


def test_bad_windows_and_options(tmp_path):
    fasta = write_fasta(tmp_path / "g.fa", {"a": "ACGT" * 30, "b": "ACGT" * 50})
    with pytest.raises(DataError, match=r"window 500 bp is longer than every.*longest.*200 bp"):
        load_kmers(fasta=str(fasta), window=500)
    for window in (0, -5):
        with pytest.raises(DataError, match=f"g.fa: window: expected a positive integer.*{window}"):
            load_kmers(fasta=str(fasta), window=window)
    with pytest.raises(DataError, match="window: expected at least 6 bp"):
        load_kmers(fasta=str(fasta), window=5)
    with pytest.raises(DataError, match="step: expected a positive integer"):
        load_kmers(fasta=str(fasta), window=50, step=0)
    with pytest.raises(DataError, match="group_by: expected one of"):
        load_kmers(fasta=str(fasta), group_by="contig")
    with pytest.raises(DataError, match="max_skipped_fraction"):
        load_kmers(fasta=str(fasta), max_skipped_fraction=1.5)
    for n_blocks in (0, True, 2.5):
        with pytest.raises(DataError, match="n_blocks: expected a positive integer"):
            load_kmers(fasta=str(fasta), window=50, n_blocks=n_blocks)
    other = write_fasta(tmp_path / "h.fa", {"a": "ACGT" * 30})
    with pytest.raises(DataError, match="h.fa: record id 'a' also appears in .*g.fa"):
        load_kmers(fasta=[str(fasta), str(other)], window=50)


def test_missing_files_are_named(tmp_path):
    for key in ("fasta", "path", "npy"):
        missing = str(tmp_path / f"absent_{key}")
        with pytest.raises(DataError, match=f"absent_{key}: file not found"):
            load_kmers(**{key: missing})


def test_bad_h5_and_npy(tmp_path):
    h5 = tmp_path / "other.h5"
    with h5py.File(h5, "w") as f:
        f["values"] = np.zeros((2, N_FEATURES), dtype=np.float32)
    with pytest.raises(DataError, match=r"other.h5: expected datasets.*missing \['counts', 'ids'"):
        load_kmers(path=str(h5))
    not_h5 = tmp_path / "text.h5"
    not_h5.write_text("hello")
    with pytest.raises(DataError, match="text.h5: cannot open as HDF5"):
        load_kmers(path=str(not_h5))
    npy = tmp_path / "narrow.npy"
    np.save(npy, np.zeros((2, 2773)))
    with pytest.raises(DataError, match=r"narrow.npy: expected a 2-D array with 10965 columns.*"):
        load_kmers(npy=str(npy))
    clr_npy = tmp_path / "clr.npy"
    np.save(clr_npy, np.full((2, NPY_COLUMNS), -0.5))
    with pytest.raises(DataError, match="clr.npy: expected non-negative.*already CLR"):
        load_kmers(npy=str(clr_npy))


# ----------------------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def ecoli_text() -> str:
    lines = gzip.decompress(ECOLI.read_bytes()).decode().splitlines()
    assert lines[0].startswith(">")
    return "".join(lines[1:])


def test_real_ecoli_contig(ecoli_text, caplog):
    window = 5000
    started = time.perf_counter()
    with caplog.at_level("INFO", logger="vaelab.data.kmers"):
        samples = load_kmers(fasta=str(ECOLI), window=window, group_by="window")
    seconds = time.perf_counter() - started
    assert seconds < 3.0, f"counting the contig took {seconds:.2f} s"
    n = len(ecoli_text) // window
    assert len(samples) == n == 173
    assert samples.ids[0].endswith(":0-5000") and samples.ids[-1].endswith(
        f":{(n - 1) * window}-{n * window}"
    )

    # Independent per-window letter counts from the raw text.
    letters = np.frombuffer(ecoli_text[: n * window].encode(), dtype="S1").reshape(n, window)
    not_base = (~np.isin(letters, [b"A", b"C", b"G", b"T"])).sum(axis=1)
    table = count_fasta([str(ECOLI)], window)
    lo, hi = FEATURE_GROUPS["1mer"]
    assert np.array_equal(table.counts[:, lo:hi].sum(axis=1), window - not_base)
    # The contig carries one long run of N (about half of it): whole windows of N skip every
    # position of every k, windows without N skip none.
    all_n, clean = not_base == window, not_base == 0
    assert all_n.sum() > 50 and clean.sum() > 50
    assert np.all(table.skipped[all_n] == 6 * window - 15) and np.all(table.skipped[clean] == 0)
    assert np.array_equal(samples.factors["skipped_kmers"], table.skipped)

    gc = table.counts[:, hi - 1].sum() / table.counts[:, lo:hi].sum()
    text_gc = sum(ecoli_text.count(b) for b in "GC") / sum(ecoli_text.count(b) for b in "ACGT")
    assert 0.45 < gc < 0.55 and abs(gc - text_gc) < 0.005
    window_gc = samples.factors["gc_content"]
    assert np.all(np.isnan(window_gc[all_n])) and np.all(
        (window_gc[clean] > 0.35) & (window_gc[clean] < 0.65)
    )
    for lo_, hi_ in SEED_GROUPS.values():
        np.testing.assert_allclose(
            samples.values[:, lo_:hi_].sum(axis=1, dtype=np.float64), 0, atol=2e-3
        )

    # max_skipped_fraction=0.5 drops exactly the windows with more than half of the k-mers skipped.
    kept = load_kmers(fasta=str(ECOLI), window=window, max_skipped_fraction=0.5)
    fraction = table.skipped / (6 * window - 15)
    assert len(kept) == int((fraction <= 0.5).sum()) and len(kept) < n
    assert "WARNING" in caplog.text and "more than half of their k-mers skipped" in caplog.text


def test_hydra_composes_kmers_and_splits_a_single_genome(compose_config):
    cfg = compose_config(["dataset=kmers", f"dataset.fasta=['{ECOLI}']", "dataset.window=20000"])
    assert cfg.dataset.group_by == "auto" and cfg.dataset.n_blocks == 20
    assert cfg.dataset.step is None
    by_record = compose_config(
        ["dataset=kmers", f"dataset.fasta=['{ECOLI}']", "dataset.window=20000"]
        + ["dataset.group_by=record"]
    )
    with execution_whitelist(["vaelab.*"]):
        samples = instantiate(by_record.dataset)
        assert samples.values.shape == (869782 // 20000, N_FEATURES)
        assert samples.feature_groups == SEED_GROUPS
        # One contig is one group: no split is possible, and the error says why.
        with pytest.raises(DataError, match="1 groups cannot fill train, val and test"):
            prepare(samples, 0.15, 0.15, seed=0)
        # The default cuts the contig's 43 windows into 20 blocks (array_split: 3 of 3
        # windows, 17 of 2), which split 3/3/14 blocks.
        by_block = instantiate(cfg.dataset)
        assert np.array_equal(by_block.ids, samples.ids)
        assert sorted(Counter(by_block.groups.tolist()).values()) == [2] * 17 + [3] * 3
        blocks = prepare(by_block, 0.15, 0.15, seed=0)
        assert [len(set(by_block.groups[blocks.split == s])) for s in SPLITS] == [14, 3, 3]
        by_window = instantiate(
            compose_config(
                [
                    "dataset=kmers",
                    f"dataset.fasta='{ECOLI}'",
                    "dataset.window=20000",
                    "dataset.group_by=window",
                ]
            ).dataset
        )
    data = prepare(by_window, 0.15, 0.15, seed=0)
    assert len(data.indices("train")) + len(data.indices("val")) + len(data.indices("test")) == 43


def test_hydra_kmers_without_a_source_fails(compose_config):
    cfg = compose_config(["dataset=kmers"])
    # Hydra re-raises the target's error, or wraps it in an InstantiationException.
    with (
        execution_whitelist(["vaelab.*"]),
        pytest.raises((DataError, InstantiationException)) as err,
    ):
        instantiate(cfg.dataset)
    error = err.value if isinstance(err.value, DataError) else err.value.__cause__
    assert isinstance(error, DataError) and "expected exactly one source" in str(error)


def test_a_bundled_file_is_named_by_its_bare_name_only():
    with pytest.raises(ConfigError, match=r"no such bundled file; there are \['ecoli_MIIJ"):
        bundled_path("missing.fna.gz")
    with pytest.raises(ConfigError, match="no such bundled file"):
        bundled_path("../bundled.py")  # a path out of the bundled folder is refused
