"""Shared fixtures: compose the real configs, shrunk for the CPU."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

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


@pytest.fixture
def compose_config(tmp_path):
    """compose(overrides) -> the train config, writing under this test's tmp_path."""

    def _compose(overrides=(), output_root=None):
        root = output_root or tmp_path / "multirun"
        with initialize_config_dir(config_dir=str(CONF)):
            return compose("train", overrides=[f"paths.output_root={root}", *overrides])

    return _compose
