"""Data sets larger than memory (issue 12 part 4): a streamed file trains, splits, normalises and
writes latents as the same file in memory does, without ever reading it whole."""

import multiprocessing
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from vaelab.data.h5 import load_h5
from vaelab.data.prepare import prepare
from vaelab.data.streaming import MB, EpochReads, StreamedSamples, StreamedTensor, take
from vaelab.data.volumes import load_volumes, write_volumes
from vaelab.errors import ConfigError, DataError
from vaelab.train import train

CONF = Path(__file__).resolve().parents[1] / "conf"

# 24 subjects of 4 x 32³ float32 are 12 MB. The budget, 5 MB, holds a training batch (4
# subjects, 2 MB) and the final encoding pass's batches (8 subjects, 4 MB: diagnostics'
# EVAL_BATCH_ELEMENTS), not the file.
N_SUBJECTS, SIZE, BUDGET_MB = 24, 32, 5
SUBJECT_BYTES = 4 * SIZE**3 * 4


def tiny_volumes_run(path, *overrides):
    """A tiny MLP on the volumes of `path`: 2 epochs of batch 4, no downstream report."""
    return [
        "dataset=volumes",
        f"dataset.path={path}",
        "dataset.num_workers=0",  # every read in this process, where the test counts them
        "model=mlp",
        "model.hidden_dims=[8]",
        "model.latent_dim=3",
        "trainer.epochs=2",
        "trainer.batch_size=4",
        "trainer.patience=null",
        "trainer.device=cpu",
        "evaluation.downstream=false",
        "evaluation.iwae_samples=2",
        *overrides,
    ]


def read_latents(path):
    with h5py.File(path) as f:
        return {key: f[key][:] for key in ("mu", "logvar", "ids", "split")}


@pytest.fixture(scope="module")
def volumes_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("streaming") / "volumes.h5"
    write_volumes(path, N_SUBJECTS, size=SIZE, seed=0, block=8)
    return path


@pytest.fixture(scope="module")
def two_runs(volumes_file, tmp_path_factory):
    """The same tiny run on the same file, in memory and streamed under a 5 MB budget, with
    every HDF5 read of the volumes recorded (size in bytes) through a wrapper of h5py."""
    reads: list[int] = []
    getitem, read_direct = h5py.Dataset.__getitem__, h5py.Dataset.read_direct

    def counting_getitem(self, key):
        out = getitem(self, key)
        if self.name == "/volumes":
            reads.append(int(np.asarray(out).nbytes))
        return out

    def counting_read_direct(self, dest, source_sel=None, dest_sel=None):
        read_direct(self, dest, source_sel, dest_sel)
        if self.name == "/volumes":
            reads.append(int(dest[dest_sel].nbytes))

    runs = {}
    tmp = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(h5py.Dataset, "__getitem__", counting_getitem)
        patch.setattr(h5py.Dataset, "read_direct", counting_read_direct)
        for mode, memory in (("memory", "true"), ("streamed", "false")):
            overrides = [
                # One MLflow store for both runs: creating one costs seconds.
                f"paths.output_root={tmp / 'multirun'}",
                *tiny_volumes_run(volumes_file, f"dataset.in_memory={memory}"),
                f"dataset.memory_budget_mb={BUDGET_MB}",
            ]
            with initialize_config_dir(config_dir=str(CONF)):
                cfg = compose("train", overrides=overrides)
            reads.clear()
            train(cfg, tmp / mode)
            runs[mode] = SimpleNamespace(latents=read_latents(tmp / mode / "latents.h5"))
            runs[mode].reads = list(reads)
    return runs


def test_streamed_and_in_memory_runs_give_the_same_latents(two_runs) -> None:
    memory, streamed = two_runs["memory"].latents, two_runs["streamed"].latents
    np.testing.assert_array_equal(streamed["ids"], memory["ids"])
    np.testing.assert_array_equal(streamed["split"], memory["split"])  # split by patient
    # Same seed, same batches, same normalised inputs: the same weights and latents. (The
    # normaliser's streamed fit merges chunk moments, equal to the in-memory fit to ~1e-16.)
    np.testing.assert_allclose(streamed["mu"], memory["mu"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(streamed["logvar"], memory["logvar"], rtol=0, atol=1e-6)


def test_a_file_larger_than_the_budget_trains_without_being_read_whole(two_runs) -> None:
    file_bytes = N_SUBJECTS * SUBJECT_BYTES
    assert file_bytes > 2 * BUDGET_MB * MB
    # In memory: one read of the whole file.
    assert max(two_runs["memory"].reads) == file_bytes
    # Streamed: many reads, none larger than the budget, of a few subjects each; the file is
    # read again every epoch (check pass, 2 training epochs, validation, final latents).
    reads = two_runs["streamed"].reads
    assert max(reads) <= BUDGET_MB * MB and max(reads) < file_bytes
    assert len(reads) > 2 * N_SUBJECTS
    assert sum(reads) >= 3 * file_bytes


def test_streamed_passes_and_epochs_read_ahead_by_a_worker_match_memory(
    volumes_file,
) -> None:
    in_memory = prepare(load_volumes(volumes_file, in_memory=True), 0.25, 0.25, seed=0)
    samples = load_volumes(volumes_file, in_memory=False, memory_budget_mb=1, num_workers=1)
    assert isinstance(samples.values, StreamedSamples)
    state = torch.get_rng_state()
    streamed = prepare(samples, 0.25, 0.25, seed=0)
    assert isinstance(streamed.values, StreamedTensor)
    np.testing.assert_array_equal(streamed.split, in_memory.split)
    np.testing.assert_allclose(streamed.normaliser.mean, in_memory.normaliser.mean, atol=1e-12)
    np.testing.assert_allclose(streamed.normaliser.std, in_memory.normaliser.std, rtol=1e-12)
    # A pass over the validation split, as diagnose walks it: read ahead by a worker.
    val = in_memory.indices("val")
    split = take(streamed.values, val)
    assert len(split) == len(val) and split.shape == in_memory.values[val].shape
    passed = torch.cat([split[i : i + 2] for i in range(0, len(split), 2)])
    torch.testing.assert_close(passed, in_memory.values[val], rtol=0, atol=1e-6)
    # A training batch, in any order; masks of a file without masks are ones.
    batch = torch.tensor([7, 2, 19])
    torch.testing.assert_close(streamed.values[batch], in_memory.values[batch], rtol=0, atol=1e-6)
    assert torch.equal(take(streamed.masks, val)[0:3], torch.ones(3, 4, SIZE, SIZE, SIZE))
    # An epoch's batches read ahead by the same (persistent) worker, twice; a pass the epoch
    # interrupted starts again where it was asked, with the right samples.
    split[0:2]
    batches = [torch.tensor([3, 11]), torch.tensor([20, 0, 5])]
    for _ in range(2):
        pairs = list(EpochReads(streamed.values, streamed.masks, batches))
        for (x, mask), batch in zip(pairs, batches, strict=True):
            torch.testing.assert_close(x, in_memory.values[batch], rtol=0, atol=1e-6)
            assert torch.equal(mask, in_memory.masks[batch])
    torch.testing.assert_close(split[2:4], in_memory.values[val[2:4]], rtol=0, atol=1e-6)
    # DataLoader seeds its workers from the global generator unless given its own.
    assert torch.equal(torch.get_rng_state(), state)


def seq_file(path, values, masks):
    with h5py.File(path, "w") as f:
        f.create_dataset("values", data=values, chunks=(1, *values.shape[1:]))
        f.create_dataset("masks", data=masks)
    return path


def test_streamed_h5_with_masks_matches_in_memory(tmp_path) -> None:
    rng = np.random.default_rng(0)
    values = rng.normal(5.0, 2.0, (30, 12, 3)).astype(np.float32)
    masks = (rng.random(values.shape) > 0.3).astype(np.float32)
    values[masks == 0] = np.nan  # NaN where unobserved is allowed, as in memory
    path = seq_file(tmp_path / "seq.h5", values, masks)
    in_memory = prepare(load_h5(path, in_memory=True), 0.2, 0.2, seed=1)
    streamed = prepare(load_h5(path, memory_budget_mb=0.001, num_workers=0), 0.2, 0.2, seed=1)
    assert isinstance(streamed.values, StreamedTensor)  # auto: 8.6 kB > 1 kB
    np.testing.assert_allclose(streamed.normaliser.mean, in_memory.normaliser.mean, rtol=1e-12)
    np.testing.assert_allclose(streamed.normaliser.std, in_memory.normaliser.std, rtol=1e-12)
    batch = torch.tensor([29, 0, 14, 15])
    torch.testing.assert_close(streamed.values[batch], in_memory.values[batch], rtol=0, atol=1e-6)
    assert torch.equal(streamed.masks[batch], in_memory.masks[batch])
    torch.testing.assert_close(streamed.values[:], in_memory.values, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(streamed.values.numpy(), streamed.values[:].numpy())


def test_nan_in_a_streamed_chunk_names_file_key_and_sample(tmp_path) -> None:
    values = np.ones((10, 6, 2), dtype=np.float32)
    masks = np.ones_like(values)
    values[7, 4, 1] = np.nan  # observed: an error
    path = seq_file(tmp_path / "nan.h5", values, masks)
    samples = load_h5(path, in_memory=False, num_workers=0)  # the file is opened, not read
    with pytest.raises(DataError) as info:
        prepare(samples, 0.2, 0.2, seed=0)  # the pass that checks every sample
    message = str(info.value)
    assert str(path) in message and "key 'values'" in message
    assert "first nan at index (7, 4, 1) (in a streamed read of samples 0-9)" in message
    assert message.count(str(path)) == 1  # named once, not prefixed again by prepare


@pytest.mark.parametrize("workers", [0, 1])
def test_nan_in_a_streamed_volume_names_the_subject(tmp_path, workers: int) -> None:
    path = tmp_path / "volumes.h5"
    write_volumes(path, 6, size=8, seed=0)
    with h5py.File(path, "r+") as f:
        f["volumes"][4, 2, 1, 1, 1] = np.inf
    samples = load_volumes(path, in_memory=False, memory_budget_mb=0.01, num_workers=workers)
    with pytest.raises(DataError) as info:
        prepare(samples, 0.2, 0.2, seed=0)
    # One line, the same from a DataLoader worker: not the worker's traceback.
    assert str(info.value) == (
        f"{path}: key 'volumes': expected finite values, found 1 NaN/inf entries, first inf at "
        "index (4, 2, 1, 1, 1) (in streamed sample 4)"
    )
    # The pass's worker stopped with the error, not later with the garbage collector.
    assert not multiprocessing.active_children()


def test_in_memory_auto_follows_the_budget_and_bad_values_name_the_key(volumes_file) -> None:
    assert isinstance(load_volumes(volumes_file).values, np.ndarray)  # 12 MB < 4096 MB
    assert isinstance(load_volumes(volumes_file, memory_budget_mb=10).values, StreamedSamples)
    assert isinstance(
        load_volumes(volumes_file, in_memory=True, memory_budget_mb=10).values, np.ndarray
    )
    with pytest.raises(ConfigError, match="dataset.in_memory: expected auto, true or false"):
        load_volumes(volumes_file, in_memory="sometimes")
    with pytest.raises(ConfigError, match="dataset.memory_budget_mb"):
        load_volumes(volumes_file, memory_budget_mb=0)
    with pytest.raises(ConfigError, match="dataset.num_workers"):
        load_volumes(volumes_file, in_memory=False, num_workers=-1)
    with pytest.raises(ConfigError, match="dataset.in_memory=false streams dataset.path"):
        load_volumes(None, in_memory=False)
