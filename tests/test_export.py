"""python -m vaelab.export: a run in seed 000's file format, read by a reader of the seed's spec."""

import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from vaelab.errors import DataError
from vaelab.export import export_seed000
from vaelab.train import train

# Tiny models: one thread each (tests/conftest.py says why).
pytestmark = pytest.mark.usefixtures("one_thread")

CONF = Path(__file__).resolve().parents[1] / "conf"


def read_seed000(folder: Path) -> dict:
    """A reader written to seed 000's "Output artifacts" alone, knowing nothing of vaelab:
    vae_latents.h5 holds mu, logvar and patient_ids; vae_model.pt is a model checkpoint."""
    with h5py.File(folder / "vae_latents.h5", "r") as f:
        keys = sorted(f.keys())
        mu, logvar = f["mu"][:], f["logvar"][:]
        patient_ids = [p.decode() for p in f["patient_ids"][:]]
    checkpoint = torch.load(folder / "vae_model.pt", map_location="cpu", weights_only=True)
    return {
        "keys": keys,
        "mu": mu,
        "logvar": logvar,
        "patient_ids": patient_ids,
        "checkpoint": checkpoint,
    }


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny):
    """One tiny multi-scale run (it writes multiscale_components.h5 too)."""
    tmp = tmp_path_factory.mktemp("export")
    with initialize_config_dir(config_dir=str(CONF)):
        cfg = compose(
            "train",
            overrides=[
                f"paths.output_root={tmp / 'multirun'}",
                *tiny.multiscale_run,
                "evaluation.downstream=false",
            ],
        )
    train(cfg, tmp / "run")
    return tmp / "run"


@pytest.mark.slow
def test_a_seed_000_reader_gets_the_runs_latents_unchanged(run_dir, tmp_path):
    out = tmp_path / "seed000"
    written = export_seed000(run_dir, out)
    assert sorted(p.name for p in written) == [
        "vae_latents.h5",
        "vae_model.pt",
        "vae_multiscale_components.h5",
    ]
    got = read_seed000(out)
    assert got["keys"] == ["logvar", "mu", "patient_ids"]  # exactly the seed's, nothing else
    with h5py.File(run_dir / "latents.h5", "r") as f:
        mu, logvar = f["mu"][:], f["logvar"][:]
        ids = [s.decode() for s in f["ids"][:]]
    assert got["mu"].dtype == got["logvar"].dtype == np.float32
    assert got["mu"].shape == got["logvar"].shape == (24, 4)  # 24 patients, latent dim 4
    assert np.array_equal(got["mu"], mu) and np.array_equal(got["logvar"], logvar)
    assert got["patient_ids"] == ids and len(set(ids)) == 24
    # vae_model.pt is the best checkpoint: the model's weights load as tensors, no pickled code
    best = torch.load(run_dir / "checkpoints" / "model.pt", weights_only=True)
    assert got["checkpoint"].keys() == best.keys()
    for key, value in best["model"].items():
        assert torch.equal(got["checkpoint"]["model"][key], value), key
    assert (out / "vae_multiscale_components.h5").read_bytes() == (
        run_dir / "multiscale_components.h5"
    ).read_bytes()


@pytest.mark.slow
def test_the_command_line_exports_and_names_a_folder_that_is_no_run(run_dir, tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "vaelab.export", str(run_dir), str(tmp_path / "out")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert read_seed000(tmp_path / "out")["mu"].shape == (24, 4)
    failed = subprocess.run(
        [sys.executable, "-m", "vaelab.export", str(tmp_path), str(tmp_path / "out2")],
        capture_output=True,
        text=True,
    )
    assert failed.returncode == 1
    assert "not a finished vaelab run folder" in failed.stderr and "latents.h5" in failed.stderr


def test_export_refuses_a_folder_without_a_run(tmp_path):
    with pytest.raises(DataError, match="latents.h5"):
        export_seed000(tmp_path, tmp_path / "out")
