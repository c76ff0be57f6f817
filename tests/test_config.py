"""Every config group option composes and builds, a run's config is checked before it trains,
and only whitelisted targets are built."""

from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException
from omegaconf.errors import MissingMandatoryValue

from vaelab.config import build, check_run_config, objective_names
from vaelab.errors import ConfigError
from vaelab.losses import masked_mse

CONF = Path(__file__).resolve().parents[1] / "conf"


def options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


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


# The model each loss needs: the VQ loss reads a quantising model's codebook terms.
LOSS_MODELS = {"vq": ["model=vqvae", "model.channels=[8]"]}
# What a loss takes besides the batch: the supervised loss, its batch's latent targets (log V
# and a centroid per sample, seed 004 Exp3).
LOSS_INPUTS = {"supervised_latent": lambda: {"latent_targets": torch.randn(6, 4)}}


@pytest.mark.parametrize("option", options("loss"))
def test_loss_options_build_and_score_a_batch(compose_config, option):
    cfg = compose_config([f"loss={option}", *LOSS_MODELS.get(option, ["model=mlp"])])
    torch.manual_seed(0)
    model = build(cfg.model, input_shape=(40, 3))
    x, mask = torch.randn(6, 40, 3), (torch.rand(6, 40, 3) > 0.2).float()
    out = model(x)
    inputs = LOSS_INPUTS.get(option, dict)()
    terms = build(cfg.loss)(out, x, mask, 1.0, 50.0, **inputs)
    # Its reconstruction term is the masked MSE of this batch, and the total is finite and
    # at least that (every other term is a non-negative penalty or KL).
    assert terms.recon.item() == pytest.approx(masked_mse(out.recon, x, mask).item(), rel=1e-6)
    assert torch.isfinite(terms.total) and terms.total.item() >= terms.recon.item() * 0.2
    terms.total.backward()  # and it trains the model
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


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


def test_unknown_constructor_argument_is_refused_naming_the_key(compose_config):
    cfg = compose_config(["+loss.free_bitz=1.0"])
    with pytest.raises(ConfigError, match="free_bitz") as err:
        build(cfg.loss)
    assert "full_key: loss" in str(err.value)


@pytest.mark.parametrize("target", ["os.system", "subprocess.run", "builtins.eval", "pathlib.Path"])
def test_targets_outside_the_whitelist_are_refused(compose_config, target, tmp_path):
    cfg = compose_config([f"dataset._target_={target}"])
    with pytest.raises(ConfigError, match="execution whitelist") as err:
        build(cfg.dataset)
    assert target in str(err.value) and "full_key: dataset" in str(err.value)


# --- the check a run's config passes before anything trains ---------------------------------


def test_check_run_config_accepts_the_default_config_and_every_experiment(compose_config):
    for experiment in [None, *options("experiment")]:
        overrides = [] if experiment is None else [f"experiment={experiment}"]
        check_run_config(compose_config(overrides))  # raises if anything is wrong


def test_a_value_set_where_a_group_was_meant_names_the_right_spelling(compose_config):
    cfg = compose_config(["sweep.pruner=none"])
    with pytest.raises(ConfigError, match=r"sweep\.pruner='none'.*write sweep/pruner=none"):
        check_run_config(cfg)


def test_a_misspelt_argument_is_found_before_the_data_is_built(compose_config):
    # dataset=h5 without a path would fail when the data is read; the loss's typo comes first.
    cfg = compose_config(["+schedule.warmup=3", "dataset=vitals_synthetic"])
    with pytest.raises(ConfigError, match="warmup"):
        check_run_config(cfg)


def test_the_objective_must_be_a_validation_metric():
    assert objective_names("val/active_units") == ["val/active_units"]
    assert objective_names(["val/active_units", "val/recon"]) == ["val/active_units", "val/recon"]
    with pytest.raises(ConfigError, match="train/loss"):
        objective_names("train/loss")
    with pytest.raises(ConfigError, match="validation metrics"):
        objective_names([])


def test_a_misspelt_evaluation_plan_is_found_before_any_trial(compose_config):
    cfg = compose_config(["evaluation.in_sweep=later"])
    with pytest.raises(ConfigError, match="evaluation.in_sweep must be one of deferred, inline"):
        check_run_config(cfg)
