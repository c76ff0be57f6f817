"""Seed 004's Exp3: latent dimensions regressed on known lesion volume and centroid, checked on
constructed posteriors whose errors are known, and trained for a few steps on generated volumes."""

import math
from functools import partial

import numpy as np
import pytest
import torch

from vaelab.config import build
from vaelab.data.prepare import prepare
from vaelab.data.volumes import load_volumes
from vaelab.diagnostics import supervised_correlations
from vaelab.errors import ConfigError, DataError
from vaelab.loop import TrainerSettings, Validation, train_step
from vaelab.losses import DipVaeLoss, SupervisedLatentLoss
from vaelab.models.base import VAEOutput
from vaelab.models.conv3d import Conv3DVAE
from vaelab.schedules import ConstantBeta

# Tiny models: one thread each (tests/conftest.py says why).
pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = ("lesion_volume", "centroid_d", "centroid_h", "centroid_w")
STEPS = 150  # optimiser steps of batches of 8 generated 16³ volumes


def output(mu, logvar=None):
    x = torch.zeros(len(mu), 3)
    logvar = torch.zeros_like(mu) if logvar is None else logvar
    return VAEOutput(recon=x, mu=mu, logvar=logvar, z=mu), x


def test_targets_are_the_log_volume_then_the_centroid_of_each_generated_lesion():
    samples = load_volumes(n_subjects=5, size=16, seed=2)
    targets = SupervisedLatentLoss().targets_from(samples.factors)
    f = samples.factors
    assert targets.dtype == torch.float32 and targets.shape == (5, 4)
    np.testing.assert_allclose(targets[:, 0], np.log(f["lesion_volume"]), rtol=1e-6)
    for k, axis in enumerate("dhw", start=1):
        np.testing.assert_allclose(targets[:, k], f[f"centroid_{axis}"], rtol=1e-6)
    # 4/3 π abc of semi-axes 0.8-1.76 voxels (0.10-0.22 of the half side at 16³)
    assert (targets[:, 0] > math.log(4 / 3 * math.pi * 0.8**3)).all()
    assert (targets[:, 0] < math.log(4 / 3 * math.pi * 1.76**3)).all()


def test_targets_name_a_missing_factor_and_refuse_a_volume_without_a_log():
    loss = SupervisedLatentLoss()
    with pytest.raises(DataError, match="needs the factors centroid_w; the data set has"):
        loss.targets_from({name: np.ones(3) for name in NAMES[:3]}, source="file.h5")
    factors = {name: np.ones(3) for name in NAMES}
    factors["lesion_volume"] = np.array([1.0, 0.0, 2.0])
    with pytest.raises(DataError, match="lesion_volume: expected finite volumes > 0"):
        loss.targets_from(factors)
    factors["lesion_volume"] = np.ones(3)
    factors["centroid_h"] = np.array([0.0, np.nan, 0.0])
    with pytest.raises(DataError, match="factors centroid_h: expected finite values"):
        loss.targets_from(factors)


def dip_settings():
    return dict(lambda_start_epoch=0.0, lambda_annealing_epochs=0.0, free_bits=0.1)


def test_the_supervised_terms_are_the_squared_errors_of_the_designated_dimensions():
    torch.manual_seed(0)
    mu = torch.randn(6, 10)
    targets = mu[:, :4].clone()
    targets[:, 0] -= 1.0  # z_vol off by 1: ||.||² = 1
    targets[:, 1:] += 0.5  # each z_loc dim off by 0.5: ||.||² = 3 x 0.25
    out, x = output(mu)
    mask = torch.ones_like(x)
    loss = SupervisedLatentLoss(volume_weight=2.0, location_weight=4.0, **dip_settings())
    terms = loss(out, x, mask, 1.0, 5.0, latent_targets=targets)
    dip = DipVaeLoss(**dip_settings())(out, x, mask, 1.0, 5.0)
    assert terms.extras["z_vol_mse"].item() == pytest.approx(1.0)
    assert terms.extras["z_loc_mse"].item() == pytest.approx(0.75)
    assert terms.extras["supervised_penalty"].item() == pytest.approx(2.0 * 1.0 + 4.0 * 0.75)
    assert terms.total.item() == pytest.approx(dip.total.item() + 5.0)
    assert terms.extras["cov_penalty"].item() == pytest.approx(dip.extras["cov_penalty"].item())
    exact = loss(out, x, mask, 1.0, 5.0, latent_targets=mu[:, :4])
    assert exact.extras["supervised_penalty"].item() == 0.0


def test_the_supervision_pulls_only_on_the_posterior_means_of_z_vol_and_z_loc():
    mu = torch.zeros(4, 8, requires_grad=True)
    logvar = torch.zeros(4, 8, requires_grad=True)
    out, x = output(mu, logvar)
    targets = torch.tensor([[1.0, 2.0, 3.0, 4.0]]).expand(4, -1)
    terms = SupervisedLatentLoss(location_weight=0.5)(
        out, x, torch.ones_like(x), 1.0, latent_targets=targets
    )
    penalty = terms.extras["supervised_penalty"]
    mu_grad, logvar_grad = torch.autograd.grad(penalty, (mu, logvar), allow_unused=True)
    # d/dmu of mean_b (mu_0 − 1)² is 2 (mu_0 − 1) / B; z_loc's with weight 0.5
    expected = torch.zeros(4, 8)
    expected[:, 0] = 2 * (0.0 - 1.0) / 4
    expected[:, 1:4] = 0.5 * 2 * (0.0 - targets[:, 1:]) / 4
    torch.testing.assert_close(mu_grad, expected)
    assert logvar_grad is None  # the mean is regressed, not the sample: σ is left alone


def test_without_targets_or_with_the_wrong_shape_the_loss_says_what_is_missing():
    loss = SupervisedLatentLoss()
    out, x = output(torch.zeros(3, 8))
    mask = torch.ones_like(x)
    with pytest.raises(ConfigError, match="needs each batch's latent targets"):
        loss(out, x, mask, 1.0)
    with pytest.raises(DataError, match=r"expected \(3, 4\) for lesion_volume, centroid_d"):
        loss(out, x, mask, 1.0, latent_targets=torch.zeros(3, 3))
    small, x = output(torch.zeros(3, 2))
    with pytest.raises(
        ConfigError, match="ties 4 latent dimensions to factors; model.latent_dim is 2"
    ):
        loss(small, x, torch.ones_like(x), 1.0, latent_targets=torch.zeros(3, 4))
    with pytest.raises(ConfigError, match="loss.volume_weight must be ≥ 0"):
        SupervisedLatentLoss(volume_weight=-1.0)


def test_mri3d_supervised_is_seed_004_exp3(compose_config):
    cfg = compose_config(["experiment=mri3d_supervised"])
    loss = build(cfg.loss)
    assert isinstance(loss, SupervisedLatentLoss)
    assert loss.target_names == NAMES
    assert (loss.volume_weight, loss.location_weight) == (1.0, 1.0)
    assert (loss.lambda_od, loss.lambda_d, loss.free_bits) == (10.0, 5.0, 0.2)
    assert (loss.lambda_start_epoch, loss.lambda_annealing_epochs) == (20, 40)
    assert cfg.model.latent_dim == 128 and cfg.model._target_.endswith("Conv3DVAE")
    assert cfg.dataset._target_.endswith("load_volumes")


def test_a_few_supervised_steps_make_z_vol_follow_the_log_volume():
    torch.manual_seed(0)
    data = prepare(load_volumes(n_subjects=16, size=16, seed=0), 0.0, 0.0, seed=0)
    model = Conv3DVAE(input_shape=(4, 16, 16, 16), latent_dim=6, base_channels=4)
    # the supervised ELBO alone (no DIP), under a free-bits floor the KL stays below (flat)
    loss = SupervisedLatentLoss(lambda_start_epoch=1e9, free_bits=3.0, free_bits_mode="batch_mean")
    targets = loss.targets_from(data.sampleset.factors)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(STEPS):
        batch = torch.randperm(len(targets))[:8]
        step_loss = partial(loss, latent_targets=targets[batch])
        terms = train_step(
            model, step_loss, optimizer, data.values[batch], data.masks[batch], 1.0, 0.0, 5.0
        )
        first = first if first is not None else terms.extras["z_vol_mse"].item()
    model.eval()
    with torch.no_grad():
        mu, _ = model.encode(data.values)
    assert first > 1.0  # log V ≈ 0.8-3.1 against an untrained z_vol near 0
    assert float(((mu[:, 0] - targets[:, 0]) ** 2).mean()) < 0.1 * first
    correlation = np.corrcoef(mu[:, 0].numpy(), targets[:, 0].numpy())[0, 1]
    assert correlation > 0.8


def test_without_a_free_bits_floor_the_kl_shrinks_z_vol_to_two_thirds_of_its_target():
    # d/dmu [(mu − t)² + β · mu² / 2] = 2 (mu − t) + mu = 0 at mu = 2t/3 (β = 1, unit weight):
    # the seed's unweighted term against the N(0, 1) prior does not reach log V. Under the
    # seed's free-bits floor (0.2 x 128 = 25.6 nats) the KL term is flat and mu reaches t.
    t = torch.tensor([[2.4, 0.3, -0.3, 0.1]])
    for free_bits, optimum in ((0.0, 2 * t / 3), (0.2, t)):
        mu = torch.zeros(1, 128)
        mu[:, :4] = optimum
        mu.requires_grad_(True)
        out, x = output(mu)
        loss = SupervisedLatentLoss(free_bits=free_bits, free_bits_mode="batch_mean")
        terms = loss(out, x, torch.ones_like(x), 1.0, latent_targets=t)
        (grad,) = torch.autograd.grad(terms.total, mu)
        torch.testing.assert_close(grad[:, :4], torch.zeros(1, 4), atol=1e-6, rtol=0)


def test_validation_scores_each_sample_against_its_own_targets():
    # The validation pass reads the split's samples in batches (3 here, not a multiple of its
    # size) and must hand the loss the targets of exactly those samples: val/z_vol_mse is then
    # the mean over the split of (mu_0 - log V)², computed here by hand.
    torch.manual_seed(0)
    data = prepare(load_volumes(n_subjects=20, size=16, seed=1), 0.4, 0.0, seed=0)
    model = Conv3DVAE(input_shape=(4, 16, 16, 16), latent_dim=6, base_channels=4).eval()
    loss = SupervisedLatentLoss(lambda_start_epoch=1e9)
    settings = TrainerSettings(optimizer=partial(torch.optim.Adam), epochs=2, batch_size=3)
    validate = Validation(model, data, data.values, data.masks, loss, ConstantBeta(1.0), settings)
    metrics = validate(1.0).metrics("val")
    index = data.indices("val")
    assert len(index) % 3 != 0
    targets = loss.targets_from(data.sampleset.factors)[index]
    with torch.no_grad():
        mu, _ = model.encode(data.values[index])
    by_hand = (mu[:, :4] - targets) ** 2
    assert metrics["val/z_vol_mse"] == pytest.approx(float(by_hand[:, 0].mean()), rel=1e-5)
    assert metrics["val/z_loc_mse"] == pytest.approx(float(by_hand[:, 1:].sum(1).mean()), rel=1e-5)
    # another loss gets no targets: the train loop's `latent_targets` is None
    assert (
        Validation(
            model, data, data.values, data.masks, DipVaeLoss(), ConstantBeta(1.0), settings
        ).latent_targets
        is None
    )


def test_supervised_correlations_are_pearsons_r_on_the_held_out_samples():
    # Dimension 0 a linear function of its target (r = 1), dimension 1 its negative (r = -1);
    # the rows outside `index` are scrambled and must not count.
    targets = torch.tensor([[1.0, 5.0], [2.0, 3.0], [4.0, 0.0], [7.0, -2.0], [9.0, 9.0]])
    mu = torch.stack([3 * targets[:, 0] + 1, -0.5 * targets[:, 1], torch.zeros(5)], dim=1)
    mu[4] = torch.tensor([-50.0, 50.0, 0.0])
    r = supervised_correlations(mu, targets, torch.tensor([0, 1, 2, 3]), ["volume", "centroid"])
    assert r["final/supervised_r/volume"] == pytest.approx(1.0)
    assert r["final/supervised_r/centroid"] == pytest.approx(-1.0)
    assert supervised_correlations(mu, targets, torch.tensor([0, 1]), ["volume"]) == {}
