"""python -m vaelab.encode: new samples through a trained run's model and saved normaliser."""

import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import h5py
import mlflow
import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from vaelab.data.vitals_synthetic import generate_vitals
from vaelab.encode import encode
from vaelab.errors import ConfigError, DataError
from vaelab.train import train

CONF = Path(__file__).resolve().parents[1] / "conf"


def compose_encode(root, *overrides):
    """conf/encode.yaml with the store under `root`, as `python -m vaelab.encode` composes it."""
    with initialize_config_dir(config_dir=str(CONF)):
        return compose("encode", overrides=[f"paths.output_root={root}", *overrides])


def write_h5(path, values, masks=None, ids=None, channels=None):
    """An h5 file in the seed 001 layout; NaN where a mask says unobserved."""
    with h5py.File(path, "w") as f:
        if channels is not None:
            f.create_dataset("vital_index", data=channels, dtype=h5py.string_dtype())
        if masks is not None:
            values = np.where(masks > 0, values, np.nan).astype(np.float32)
            f.create_dataset("masks", data=masks)
        f.create_dataset("values", data=values)
        if ids is not None:
            f.create_dataset("patient_index", data=[str(i) for i in ids], dtype=h5py.string_dtype())
    return path


def read_latents(path):
    """ids -> (mu, logvar) rows of a latents.h5."""
    with h5py.File(path) as f:
        ids = [s.decode() for s in f["ids"][:]]
        return {i: (mu, lv) for i, mu, lv in zip(ids, f["mu"][:], f["logvar"][:], strict=True)}


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny):
    """One tiny MLP run recorded in a store, and its own data rewritten as a user's h5 file."""
    tmp = tmp_path_factory.mktemp("encode")
    root = tmp / "multirun"
    with initialize_config_dir(config_dir=str(CONF)):
        cfg = compose("train", overrides=[f"paths.output_root={root}", *tiny.mlp_run])
    train(cfg, tmp / "run")
    client = mlflow.MlflowClient(cfg.tracking.uri)
    (found,) = client.search_runs([e.experiment_id for e in client.search_experiments()])

    # The run's data regenerated with the run's own arguments, in shuffled order, with NaN at
    # unobserved entries: only the saved normaliser and the masks give back the run's latents.
    args = {k: cfg.dataset[k] for k in ("n_patients", "seq_len", "missing_rate", "seed")}
    samples = generate_vitals(**args)
    order = np.random.default_rng(1).permutation(len(samples))
    data = write_h5(
        tmp / "new.h5",
        samples.values[order],
        samples.masks[order],
        samples.ids[order],
        channels=samples.channel_names,
    )
    return SimpleNamespace(
        root=root,
        run_id=found.info.run_id,
        data=data,
        checkpoint=tmp / "run" / "checkpoints" / "model.pt",
        latents=read_latents(tmp / "run" / "latents.h5"),
    )


def assert_same_latents(path, expected):
    got = read_latents(path)
    assert len(got) == len(expected) == 24
    assert sorted(got) == sorted(expected)
    for sample_id, (mu, logvar) in got.items():
        np.testing.assert_allclose(mu, expected[sample_id][0], atol=1e-5, err_msg=sample_id)
        np.testing.assert_allclose(logvar, expected[sample_id][1], atol=1e-5, err_msg=sample_id)


@pytest.mark.slow
def test_encoding_a_runs_own_data_by_run_id_gives_back_its_latents(run, tmp_path):
    out = tmp_path / "sub" / "latents.h5"  # a folder that does not exist yet
    cfg = compose_encode(
        run.root,
        f"run_id={run.run_id}",
        "dataset=h5",
        f"dataset.path={run.data}",
        f"out={out}",
        "batch_size=5",
    )
    assert encode(cfg) == out
    assert_same_latents(out, run.latents)
    with h5py.File(out) as f:
        assert set(f) == {"mu", "logvar", "ids"} and f["mu"].shape == (24, 4)
        assert f.attrs["model"] == f"run {run.run_id}" and f.attrs["data"] == str(run.data)


@pytest.mark.slow
def test_encoding_by_checkpoint_path_gives_back_the_runs_latents(run, tmp_path):
    out = tmp_path / "latents.h5"
    cfg = compose_encode(
        tmp_path / "no_store",
        f"checkpoint={run.checkpoint}",
        f"dataset.path={run.data}",
        f"out={out}",
    )
    encode(cfg)
    assert_same_latents(out, run.latents)
    assert not (tmp_path / "no_store").exists()  # no MLflow store is touched


@pytest.mark.slow
def test_a_streamed_file_encodes_to_the_runs_latents(run, tmp_path):
    # 24 x 300 h x 7 vitals with masks are 0.4 MB; a 0.1 MB budget streams them in chunks
    # that a DataLoader worker reads ahead, checked (NaN where unobserved) and normalised.
    out = tmp_path / "latents.h5"
    cfg = compose_encode(
        tmp_path / "no_store",
        f"checkpoint={run.checkpoint}",
        f"dataset.path={run.data}",
        f"out={out}",
        "dataset.memory_budget_mb=0.1",
        "dataset.num_workers=1",
    )
    encode(cfg)
    assert_same_latents(out, run.latents)


@pytest.mark.slow
def test_channels_in_another_order_are_refused(run, tmp_path):
    with h5py.File(run.data) as f:
        values, masks = f["values"][:], f["masks"][:]
        names = [s.decode() for s in f["vital_index"][:]]
    order = [1, 0, 2, 3, 4, 5, 6]
    swapped = [names[i] for i in order]
    data = write_h5(
        tmp_path / "swapped.h5", values[..., order], masks[..., order], channels=swapped
    )
    cfg = compose_encode(
        run.root,
        f"checkpoint={run.checkpoint}",
        f"dataset.path={data}",
        f"out={tmp_path / 'latents.h5'}",
    )
    with pytest.raises(
        DataError, match=r"vital_index lists \['SBP', 'HR'.*trained on \['HR', 'SBP'"
    ):
        encode(cfg)


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(6, 200, 7), (6, 300, 5)], ids=["length", "channels"])
def test_samples_of_another_shape_are_refused_naming_both_shapes(run, tmp_path, shape):
    data = write_h5(tmp_path / "other.h5", np.zeros(shape, dtype=np.float32))
    out = tmp_path / "latents.h5"
    models = {
        f"run_id={run.run_id}": f"run {run.run_id}",
        f"checkpoint={run.checkpoint}": f"checkpoint {run.checkpoint}",
    }
    for model, origin in models.items():
        cfg = compose_encode(run.root, model, f"dataset.path={data}", f"out={out}")
        expected = (
            f"{data}: values have samples of shape {shape[1:]}, the model of {origin} "
            "was trained on (300, 7)"
        )
        with pytest.raises(DataError, match=f"^{re.escape(expected)}$"):
            encode(cfg)
    assert not out.exists()


@pytest.mark.parametrize(
    "overrides, found",
    [([], "found neither"), (["run_id=abc", "checkpoint=model.pt"], "found both")],
    ids=["neither", "both"],
)
def test_exactly_one_of_run_id_and_checkpoint(tmp_path, overrides, found):
    cfg = compose_encode(tmp_path, *overrides, "dataset.path=new.h5")
    with pytest.raises(ConfigError, match=f"exactly one of run_id=.* or checkpoint=.*{found}"):
        encode(cfg)


def test_a_missing_data_path_is_named_before_the_model_is_looked_for(tmp_path):
    cfg = compose_encode(tmp_path, f"checkpoint={tmp_path / 'gone.pt'}", "dataset=h5")
    with pytest.raises(
        ConfigError,
        match=r"^dataset\.path required: give dataset\.path=\.\.\. on the command line$",
    ):
        encode(cfg)


def test_a_missing_store_run_or_checkpoint_is_one_message(tmp_path):
    data = write_h5(tmp_path / "new.h5", np.zeros((3, 10, 2), dtype=np.float32))
    root = tmp_path / "multirun"
    uri = f"sqlite:///{root}/mlflow.db"

    def refused(*overrides):
        cfg = compose_encode(root, *overrides, f"dataset.path={data}", f"out={tmp_path / 'z.h5'}")
        with pytest.raises(ConfigError) as err:
            encode(cfg)
        return str(err.value)

    # No store at all: refused, and no empty store is created on the way.
    assert refused("run_id=0123abcd") == (
        f"run_id=0123abcd: no MLflow store at {uri} (set paths.output_root or tracking.uri to "
        "where the run was recorded)"
    )
    assert not root.exists()

    client = mlflow.MlflowClient(uri)
    empty_run = client.create_run(client.create_experiment("e")).info.run_id
    assert refused("run_id=0123abcd") == f"run_id=0123abcd: no such run in the MLflow store {uri}"
    assert refused(f"run_id={empty_run}") == (
        f"run_id={empty_run}: the run (RUNNING) in the MLflow store {uri} has no artifact "
        "checkpoints/model.pt"
    )
    assert refused(f"checkpoint={tmp_path / 'gone.pt'}") == (
        f"checkpoint={tmp_path / 'gone.pt'}: file not found"
    )
    assert not (tmp_path / "z.h5").exists()


def test_a_file_that_is_not_a_checkpoint_is_refused(tmp_path):
    bogus = tmp_path / "model.pt"
    bogus.write_bytes(b"not a checkpoint")
    cfg = compose_encode(tmp_path, f"checkpoint={bogus}", "dataset.path=new.h5")
    expected = f"checkpoint {bogus}: cannot load {bogus} as a vaelab checkpoint"
    with pytest.raises(DataError, match=f"^{re.escape(expected)}"):
        encode(cfg)


def run_cli(*overrides, cwd, root):
    """`python -m vaelab.encode` as a user runs it, with the store of the run under `root`."""
    return subprocess.run(
        [sys.executable, "-m", "vaelab.encode", f"paths.output_root={root}", *overrides],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.slow
def test_cli_writes_latents_and_reports_a_bad_file_without_a_traceback(run, tmp_path):
    result = run_cli(
        f"run_id={run.run_id}",
        "dataset=h5",
        f"dataset.path={run.data}",
        cwd=tmp_path,
        root=run.root,
    )
    assert result.returncode == 0, result.stderr
    assert_same_latents(tmp_path / "latents.h5", run.latents)  # out: relative to the cwd
    assert f"Wrote 24 samples x latent dim 4 (mu, logvar, ids) of {run.data}" in result.stderr
    assert list(run.root.glob("encode/*/*/encode.log"))  # Hydra's output under output_root

    short = write_h5(tmp_path / "short.h5", np.zeros((2, 200, 7), dtype=np.float32))
    result = run_cli(
        f"run_id={run.run_id}",
        f"dataset.path={short}",
        "out=short_latents.h5",
        cwd=tmp_path,
        root=run.root,
    )
    assert result.returncode == 1
    assert (
        f"{short}: values have samples of shape (200, 7), the model of run {run.run_id} "
        "was trained on (300, 7)"
    ) in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "short_latents.h5").exists()
