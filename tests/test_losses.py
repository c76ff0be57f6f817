"""The ELBO terms against values computed by hand."""

import math

import pytest
import torch

from vaelab.errors import ConfigError
from vaelab.losses import ElboLoss, free_bits_kl, gaussian_kl_per_dim, masked_mse
from vaelab.models.base import VAEOutput


def output(recon, mu, logvar, branches=None):
    return VAEOutput(recon=recon, mu=mu, logvar=logvar, z=mu, branches=branches or {})


def test_kl_closed_form_matches_hand_values():
    mu = torch.tensor([[0.0, 1.0, 2.0]])
    logvar = torch.tensor([[0.0, 0.0, math.log(4.0)]])
    # 0.5 (mu² + σ² - 1 - log σ²): 0, 0.5, 0.5 (4 + 4 - 1 - ln 4)
    expected = torch.tensor([[0.0, 0.5, 0.5 * (7 - math.log(4.0))]])
    assert torch.allclose(gaussian_kl_per_dim(mu, logvar), expected)


def test_kl_matches_torch_distributions():
    torch.manual_seed(0)
    mu, logvar = torch.randn(5, 4), torch.randn(5, 4)
    q = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    p = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    assert torch.allclose(
        gaussian_kl_per_dim(mu, logvar), torch.distributions.kl_divergence(q, p), atol=1e-5
    )


def test_masked_mse_ignores_unobserved_entries():
    target = torch.zeros(1, 2, 2)
    recon = torch.tensor([[[1.0, 100.0], [3.0, 100.0]]])
    mask = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    assert masked_mse(recon, target, mask).item() == pytest.approx((1 + 9) / 2)


# Two samples, two dimensions, per-sample-and-dimension KL chosen by hand:
KL = torch.tensor([[0.1, 3.0], [0.5, 1.0]])


@pytest.mark.parametrize(
    ("mode", "free_bits", "expected"),
    [
        # sum_d max(λ, mean_b KL): means 0.3 and 2.0 -> max(1, .3) + max(1, 2) = 3
        ("per_dim", 1.0, 3.0),
        # max(λ D, mean_b sum_d KL): mean total 2.3 -> max(2, 2.3) = 2.3
        ("batch_mean", 1.0, 2.3),
        # mean_b sum_d max(λ, KL): (1 + 3 + 1 + 1) / 2 = 3
        ("per_sample", 1.0, 3.0),
        # with λ = 2 the three differ: per_dim 2 + 2 = 4; batch_mean max(4, 2.3) = 4;
        ("per_dim", 2.0, 4.0),
        ("batch_mean", 2.0, 4.0),
        # per_sample (2 + 3 + 2 + 2) / 2 = 4.5
        ("per_sample", 2.0, 4.5),
        # λ = 0.4: per_dim max(.4,.3)+2 = 2.4; batch_mean max(.8, 2.3) = 2.3;
        ("per_dim", 0.4, 2.4),
        ("batch_mean", 0.4, 2.3),
        # per_sample (.4 + 3 + .5 + 1) / 2 = 2.45
        ("per_sample", 0.4, 2.45),
        ("per_dim", 0.0, 2.3),
    ],
)
def test_free_bits_modes_against_hand_values(mode, free_bits, expected):
    assert free_bits_kl(KL, free_bits, mode).item() == pytest.approx(expected)


def test_free_bits_floor_stops_the_gradient_below_it():
    mu = torch.full((4, 3), 0.1, requires_grad=True)
    logvar = torch.zeros(4, 3, requires_grad=True)
    kl = free_bits_kl(gaussian_kl_per_dim(mu, logvar), 2.0, "per_dim")
    kl.backward()
    assert kl.item() == pytest.approx(6.0)  # 3 dims × 2 nats: every dim is under its floor
    assert mu.grad.abs().sum().item() == 0.0


def test_elbo_named_terms_with_branches_and_mask():
    target = torch.zeros(2, 3, 1)
    mask = torch.ones(2, 3, 1)
    recon = torch.full((2, 3, 1), 1.0)  # mse 1
    branches = {"a": torch.full((2, 3, 1), 2.0), "b": torch.full((2, 3, 1), 3.0)}  # mse 4, 9
    mu = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # KL 0.5 per sample
    logvar = torch.zeros(2, 2)
    loss = ElboLoss(free_bits=0.0, branch_weight=0.5)
    terms = loss(output(recon, mu, logvar, branches), target, mask, beta=2.0)
    assert terms.recon.item() == pytest.approx(1.0)
    assert terms.branch_recon["a"].item() == pytest.approx(4.0)
    assert terms.branch_recon["b"].item() == pytest.approx(9.0)
    assert terms.kl_raw.item() == pytest.approx(0.5)
    assert terms.kl_constrained.item() == pytest.approx(0.5)
    # 0.5 * 1 + 0.5 * mean(4, 9) + 2 * 0.5
    assert terms.total.item() == pytest.approx(0.5 + 3.25 + 1.0)


def test_elbo_free_bits_raise_constrained_not_raw_kl():
    x = torch.zeros(2, 4)
    terms = ElboLoss(free_bits=1.0)(
        output(x, torch.zeros(2, 3), torch.zeros(2, 3)), x, torch.ones_like(x), 1.0
    )
    assert terms.kl_raw.item() == pytest.approx(0.0)
    assert terms.kl_constrained.item() == pytest.approx(3.0)
    assert terms.total.item() == pytest.approx(3.0)


@pytest.mark.parametrize(
    "kwargs", [{"free_bits": -1.0}, {"branch_weight": 1.5}, {"free_bits_mode": "per_batch"}]
)
def test_bad_loss_settings_name_the_key(kwargs):
    key = next(iter(kwargs))
    with pytest.raises(ConfigError, match=f"loss.{key}"):
        ElboLoss(**kwargs)


def test_mean_kl_reduction_weighs_the_kl_per_dimension():
    x = torch.zeros(2, 4)
    mu = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])  # KL 0.5 nats per sample
    out = output(x, mu, torch.zeros(2, 4))
    summed = ElboLoss(kl_reduction="sum")(out, x, torch.ones_like(x), beta=2.0)
    averaged = ElboLoss(kl_reduction="mean")(out, x, torch.ones_like(x), beta=2.0)
    assert summed.total.item() == pytest.approx(2.0 * 0.5)
    assert averaged.total.item() == pytest.approx(2.0 * 0.5 / 4)
    assert averaged.kl_raw.item() == summed.kl_raw.item() == pytest.approx(0.5)  # logged alike
