"""Every config group option composes and builds; experiments carry the seeds' settings."""

import pytest
from conftest import CONF
from hydra.errors import ConfigCompositionException, InstantiationException
from hydra.utils import execution_whitelist, instantiate
from omegaconf.errors import MissingMandatoryValue

from vaelab.settings import TRUSTED_TARGETS


def options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def build(node, **kwargs):
    with execution_whitelist(list(TRUSTED_TARGETS)):
        return instantiate(node, **kwargs)


def test_every_group_has_options():
    for group in ("model", "loss", "schedule", "dataset", "trainer", "tracking", "experiment"):
        assert options(group), group


# One sample's shape for each model: sequences (T, C) unless the model says otherwise.
INPUT_SHAPES = {"conv3d": (4, 16, 16, 16)}


@pytest.mark.parametrize("option", options("model"))
def test_model_options_build(compose_config, option):
    cfg = compose_config([f"model={option}"])
    model = build(cfg.model, input_shape=INPUT_SHAPES.get(option, (300, 7)))
    assert model.latent_dim == cfg.model.get("latent_dim", model.latent_dim) > 0


@pytest.mark.parametrize("option", options("loss"))
def test_loss_options_build(compose_config, option):
    assert callable(build(compose_config([f"loss={option}"]).loss))


@pytest.mark.parametrize("option", options("schedule"))
def test_schedule_options_build(compose_config, option):
    schedule = build(compose_config([f"schedule={option}"]).schedule)
    assert 0.0 <= schedule(0.0) <= schedule.beta


def test_vitals_dataset_builds(compose_config):
    cfg = compose_config(["dataset=vitals_synthetic", "dataset.n_patients=3", "dataset.seq_len=20"])
    samples = build(cfg.dataset)
    assert samples.values.shape == (3, 20, 7)


def test_h5_dataset_demands_a_path(compose_config):
    cfg = compose_config(["dataset=h5"])
    with pytest.raises(MissingMandatoryValue, match="dataset.path"):
        build(cfg.dataset)


def test_trainer_and_tracking_build(compose_config, tmp_path):
    cfg = compose_config()
    trainer = build(cfg.trainer)
    assert (
        trainer.optimizer.func.__name__ == "AdamW"
        and trainer.optimizer.keywords["lr"] == trainer.lr
    )
    tracker = build(cfg.tracking)
    assert tracker.uri == f"sqlite:///{tmp_path}/multirun/mlflow.db"


def test_multiscale_vitals_is_the_seed_000_setup(compose_config):
    cfg = compose_config(["experiment=multiscale_vitals"])
    assert cfg.model._target_.endswith("MultiScaleConv1DVAE")
    assert (cfg.model.latent_dim, cfg.model.base_channels) == (32, 64)
    assert cfg.schedule.beta == 0.5 and cfg.schedule.cycle_epochs == 40
    assert cfg.schedule.cycle_epochs * cfg.schedule.ramp_ratio == 30  # warm-up 30 epochs
    assert cfg.loss.free_bits == 2.0
    assert (cfg.trainer.epochs, cfg.trainer.batch_size, cfg.trainer.patience) == (150, 64, 30)
    assert cfg.trainer.lr == 1e-3


def test_quick_experiment_is_small(compose_config):
    cfg = compose_config(["experiment=quick"])
    assert cfg.trainer.epochs <= 20 and cfg.dataset.n_patients <= 128  # a few seconds a run


def test_unknown_group_option_lists_the_choices(compose_config):
    with pytest.raises(ConfigCompositionException, match="multiscale_conv1d"):
        compose_config(["model=transformer"])


def test_misspelt_key_is_refused(compose_config):
    with pytest.raises(ConfigCompositionException, match="epochz"):
        compose_config(["trainer.epochz=3"])


def test_unknown_constructor_argument_is_refused(compose_config):
    cfg = compose_config(["+loss.free_bitz=1.0"])
    with pytest.raises(TypeError, match="free_bitz"):
        build(cfg.loss)


@pytest.mark.parametrize("target", ["os.system", "subprocess.run", "builtins.eval", "pathlib.Path"])
def test_targets_outside_the_whitelist_are_refused(compose_config, target, tmp_path):
    cfg = compose_config([f"dataset._target_={target}"])
    with pytest.raises(InstantiationException) as err:
        build(cfg.dataset)
    assert target in str(err.value)
