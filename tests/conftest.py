"""Shared fixtures: compose the real configs, shrunk for the CPU."""

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import h5py
import pytest
import torch
from hydra import compose, initialize_config_dir

from vaelab.models.vqvae import VQVAE

CONF = Path(__file__).resolve().parents[1] / "conf"

# A tiny run: 24 generated patients of 300 hours, two epochs, a narrow model.
TINY_TRAINER = [
    "trainer.epochs=2",
    "trainer.batch_size=8",
    "trainer.patience=null",
    "trainer.device=cpu",
]
TINY_VITALS = ["dataset=vitals_synthetic", "dataset.n_patients=24", "dataset.seq_len=300"]
MLP = ["model=mlp", "model.hidden_dims=[32,16]", "model.latent_dim=4"]
TINY_MULTISCALE = [
    *TINY_TRAINER,
    *TINY_VITALS,
    "model=multiscale_conv1d",
    "model.base_channels=8",
    "model.latent_dim=4",
]
TINY_MLP = [*TINY_TRAINER, *TINY_VITALS, *MLP]


@pytest.fixture(scope="session", autouse=True)
def own_worker_slots(tmp_path_factory):
    """Sweep workers started by this test process (and its subprocesses) hold their slots in
    a folder of its own: pytest's other process (make test runs two) has sweeps of its own,
    which would otherwise share this host's slots and change each trial's threads and slot."""
    os.environ["VAELAB_WORKERS_DIR"] = str(tmp_path_factory.mktemp("worker_slots"))


@pytest.fixture(scope="session")
def tiny() -> SimpleNamespace:
    """Override lists of a tiny run, to splice into compose_config or a command line.

    trainer: 2 epochs of batch 8 on the CPU; vitals: 24 generated patients of 300 hours;
    mlp: a narrow dense model; mlp_run and multiscale_run: complete tiny runs.
    """
    return SimpleNamespace(
        trainer=list(TINY_TRAINER),
        vitals=list(TINY_VITALS),
        mlp=list(MLP),
        mlp_run=list(TINY_MLP),
        multiscale_run=list(TINY_MULTISCALE),
    )


@pytest.fixture
def compose_config(tmp_path):
    """compose(overrides) -> the train config, writing under this test's tmp_path."""

    def _compose(overrides=(), output_root=None, return_hydra_config=False):
        root = output_root or tmp_path / "multirun"
        with initialize_config_dir(config_dir=str(CONF)):
            return compose(
                "train",
                overrides=[f"paths.output_root={root}", *overrides],
                return_hydra_config=return_hydra_config,
            )

    return _compose


@pytest.fixture
def conf_dir() -> Path:
    """The project's conf/ folder, for tests that read a YAML file as text."""
    return CONF


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tiny models on one thread, then restore the count.

    On the shared 2-core machine, OpenMP's second thread mostly waits at barriers for a core
    another process holds: a step of a 40-step LSTM took 1-5 s on two threads, 0.01 s on one.
    Use it with `pytestmark = pytest.mark.usefixtures("one_thread")`.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def write_h5():
    """write_h5(path, **datasets) -> str: one HDF5 dataset per keyword, the path as str."""

    def _write(path: Path, **datasets: object) -> str:
        with h5py.File(path, "w") as f:
            for key, data in datasets.items():
                f.create_dataset(key, data=data)
        return str(path)

    return _write


@pytest.fixture
def tiny_vqvae():
    """tiny_vqvae(**kwargs) -> a VQVAE on (40, 1) series, seeded: 2 latents of 2 dims, 4 codes."""

    def _make(**kwargs: object) -> VQVAE:
        torch.manual_seed(0)
        settings = dict(n_latents=2, code_dim=2, codebook_size=4, channels=[4, 8]) | kwargs
        return VQVAE([40, 1], **settings)

    return _make


@pytest.fixture(scope="session")
def tiny_sweep(tmp_path_factory, tiny) -> SimpleNamespace:
    """One tiny multi-scale sweep, run once per test session for the notebook and UI tests:
    `root` (its output root), `study` and `n_trials` (every trial feasible: kl_threshold 0)."""
    sweep = SimpleNamespace(root=None, study="notebooks", n_trials=3)
    base = tmp_path_factory.mktemp("tiny_sweep")
    sweep.root = base / "multirun"
    command = [
        sys.executable,
        "-m",
        "vaelab.train",
        "--multirun",
        "hparams_search=quick",
        *tiny.multiscale_run,
        f"paths.output_root={sweep.root}",
        f"hydra.sweeper.study_name={sweep.study}",
        f"hydra.sweeper.n_trials={sweep.n_trials}",
        "sweep/pruner=none",
        # Every trial feasible, so that the report shows a best trial: two tiny epochs learn too
        # little for the collapse constraints, whose floors are set far below any value here.
        "sweep.kl_threshold=0.0",
        "verdict.min_mi=-1e9",
        "verdict.min_z_gain=-1e9",
    ]
    result = subprocess.run(command, cwd=base, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return sweep


# A search space of the test's own: the tests name every swept setting on the command line,
# so a grid sampler can walk it (the shipped spaces set TPE-only sampler options).
GRID_SEARCH = """# @package _global_
defaults:
  - override /hydra/sweeper: vaelab
  - override /hydra/sweeper/sampler: grid
hydra:
  sweeper:
    direction: maximize
    max_failure_rate: 0.0
"""


@pytest.fixture
def sweeps(tmp_path, tiny) -> SimpleNamespace:
    """`command(study, *overrides)` and `run(study, *overrides)`: a sweep of tiny MLP trials
    (latent_dim left free: the search spaces sweep it) writing under tmp_path. The downstream
    report and a long log p(x) estimate are off: tests/test_evaluate.py covers them, and these
    tests are about the sweep machinery."""
    tiny_mlp = [o for o in tiny.mlp_run if not o.startswith("model.latent_dim")]
    searchpath = tmp_path / "conf"
    (searchpath / "hparams_search").mkdir(parents=True, exist_ok=True)
    (searchpath / "hparams_search" / "grid.yaml").write_text(GRID_SEARCH)

    def command(study, *overrides, search="quick"):
        return [
            sys.executable,
            "-m",
            "vaelab.train",
            "--multirun",
            f"hparams_search={search}",
            *tiny_mlp,
            "evaluation.downstream=false",
            "evaluation.iwae_samples=10",
            f"paths.output_root={tmp_path / 'multirun'}",
            f"hydra.sweeper.study_name={study}",  # journal: <output_root>/optuna/<study>.journal
            f"hydra.searchpath=[file://{searchpath}]",
            *overrides,
        ]

    def run(study, *overrides, check=True, search="quick"):
        result = subprocess.run(
            command(study, *overrides, search=search),
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if check:
            assert result.returncode == 0, result.stderr[-3000:]
        return result

    return SimpleNamespace(command=command, run=run)
