"""Dataset configs: each composes, builds its SampleSet, and comments every key.

vitals_synthetic is composed by every tiny training run, kmers in tests/test_data_kmers.py;
h5 needs a user's file.
"""

import pytest
from hydra.utils import execution_whitelist, instantiate

from vaelab.data.base import SampleSet

# Each option with the overrides that shrink it for the CPU and the shape of one sample.
DATASETS = {
    "vitals_windows": (["dataset.n_patients=3", "dataset.hours=0.2"], (256, 4)),
    "volumes": (["dataset.n_subjects=2", "dataset.size=8"], (4, 8, 8, 8)),
    "digits": ([], (64,)),
    "mnist1d": (["dataset.n_samples=100"], (40, 1)),
}


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_dataset_configs_compose_and_build(compose_config, conf_dir, name: str) -> None:
    overrides, sample_shape = DATASETS[name]
    cfg = compose_config([f"dataset={name}", *overrides])
    with execution_whitelist(["vaelab.*"]):
        samples = instantiate(cfg.dataset)
    assert isinstance(samples, SampleSet) and samples.sample_shape == sample_shape
    # Every key but _target_ carries a comment (units, what it does).
    for line in (conf_dir / "dataset" / f"{name}.yaml").read_text().splitlines():
        if line and not line.startswith(("#", " ", "_target_")):
            assert "  # " in line, line
