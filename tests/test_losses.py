"""Every loss against values computed by hand: the ELBO with free bits, capacity control,
DIP-VAE-II and the VQ-VAE objective; and their configs."""

import math
import re

import pytest
import torch

from vaelab.config import build
from vaelab.diagnostics import importance_weighted_log_px
from vaelab.errors import ConfigError
from vaelab.losses import (
    CapacityLoss,
    DipVaeLoss,
    ElboLoss,
    ReconstructionLoss,
    VQLoss,
    dip_covariance,
    dip_penalties,
    free_bits_kl,
    gaussian_kl_per_dim,
    masked_mse,
)
from vaelab.models.base import GaussianVAE, VAEOutput
from vaelab.models.vqvae import VQVAE

NEW_YAMLS = ["model/vqvae.yaml", "loss/capacity.yaml", "loss/dip_vae.yaml", "loss/vq.yaml"]


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


def test_kl_against_a_gaussian_of_given_mean_and_variance_matches_torch_distributions():
    torch.manual_seed(0)
    mu, logvar = torch.randn(5, 4), torch.randn(5, 4)
    mean, var = torch.randn(4), torch.rand(4) + 0.5
    q = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    p = torch.distributions.Normal(mean, var.sqrt())
    expected = torch.distributions.kl_divergence(q, p)
    assert torch.allclose(gaussian_kl_per_dim(mu, logvar, mean, var), expected, atol=1e-5)
    # N(0, 1) given explicitly: the closed form against the standard normal
    standard = gaussian_kl_per_dim(mu, logvar, torch.zeros(4), torch.ones(4))
    assert torch.allclose(standard, gaussian_kl_per_dim(mu, logvar), atol=1e-6)


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
    loss = ElboLoss(free_bits=0.0, branch_weight=0.5, reduction="mean")
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
    terms = ElboLoss(free_bits=1.0, reduction="mean")(
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
    summed = ElboLoss(kl_reduction="sum", reduction="mean")(out, x, torch.ones_like(x), beta=2.0)
    averaged = ElboLoss(kl_reduction="mean", reduction="mean")(out, x, torch.ones_like(x), beta=2.0)
    assert summed.total.item() == pytest.approx(2.0 * 0.5)
    assert averaged.total.item() == pytest.approx(2.0 * 0.5 / 4)
    assert averaged.kl_raw.item() == summed.kl_raw.item() == pytest.approx(0.5)  # logged alike


# --- capacity (Burgess et al. 2018) ----------------------------------------------------------


@pytest.mark.parametrize(
    ("epoch", "capacity"), [(0.0, 0.0), (0.5, 0.125), (50.0, 12.5), (100.0, 25.0), (150.0, 25.0)]
)
def test_capacity_rises_linearly_then_holds(epoch, capacity):
    loss = CapacityLoss(capacity_max=25.0, capacity_epochs=100.0)
    assert loss.capacity(epoch) == pytest.approx(capacity)


def test_capacity_without_ramp_is_the_maximum_at_once():
    assert CapacityLoss(capacity_max=7.0, capacity_epochs=0.0).capacity(0.0) == 7.0


def test_capacity_loss_on_a_constructed_kl():
    target, mask = torch.zeros(2, 3, 1), torch.ones(2, 3, 1)
    recon = torch.ones(2, 3, 1)  # MSE 1
    mu = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # KL 0.5 nats per sample
    out = output(recon, mu, torch.zeros(2, 2))
    loss = CapacityLoss(gamma=10.0, capacity_max=4.0, capacity_epochs=8.0)
    # epoch 4: C = 2 > KL: 1 + 10 |0.5 - 2| = 16
    terms = loss(out, target, mask, beta=1.0, epoch=4.0)
    assert terms.extras["capacity"].item() == pytest.approx(2.0)
    assert terms.extras["capacity_gap"].item() == pytest.approx(1.5)
    assert terms.kl_raw.item() == pytest.approx(0.5)
    assert terms.total.item() == pytest.approx(16.0)
    # epoch 0: C = 0 < KL: the gap now pushes the KL down, 1 + 10 * 0.5 = 6
    assert loss(out, target, mask, beta=1.0, epoch=0.0).total.item() == pytest.approx(6.0)
    # β is ignored: C(t) is the schedule
    assert loss(out, target, mask, beta=0.0, epoch=4.0).total.item() == pytest.approx(16.0)


def test_capacity_gap_uses_the_free_bits_kl():
    x = torch.zeros(2, 4)
    out = output(x, torch.zeros(2, 3), torch.zeros(2, 3))  # raw KL 0
    loss = CapacityLoss(gamma=1.0, capacity_max=1.0, capacity_epochs=0.0, free_bits=1.0)
    terms = loss(out, x, torch.ones_like(x), beta=1.0)
    assert terms.kl_raw.item() == 0.0
    assert terms.kl_constrained.item() == pytest.approx(3.0)  # 3 dims x 1 nat floor
    assert terms.extras["capacity_gap"].item() == pytest.approx(2.0)  # |3 - 1|


# --- DIP-VAE-II (Kumar et al. 2018, seed 004) -------------------------------------------------

# Columns a = (1, -1, 1, -1), b = (2, -2, 0, 0): means 0, Var a = 1, Var b = 2, Cov(a, b) = 1
# (population, 1/B). logvar = log 0.5 adds 0.5 to the diagonal.
MU = torch.tensor([[1.0, 2.0], [-1.0, -2.0], [1.0, 0.0], [-1.0, 0.0]])
LOGVAR = torch.full((4, 2), math.log(0.5))
COV = torch.tensor([[1.5, 1.0], [1.0, 2.5]])
OFFDIAG, DIAG = 1.0**2 + 1.0**2, 0.5**2 + 1.5**2  # 2 and 2.5
DIP_KL = 1.0 + math.log(2.0)  # 0.5 (1 + .5 - 1 + ln 2) + 0.5 (2 + .5 - 1 + ln 2)


def test_dip_covariance_of_a_known_batch():
    cov = dip_covariance(MU, LOGVAR)
    assert torch.allclose(cov, COV)
    assert torch.allclose(cov - 0.5 * torch.eye(2), torch.cov(MU.T, correction=0))


def test_dip_penalties_by_hand():
    off_diagonal, diagonal = dip_penalties(COV)
    assert off_diagonal.item() == pytest.approx(OFFDIAG)
    assert diagonal.item() == pytest.approx(DIAG)


@pytest.mark.parametrize(
    ("epoch", "lambdas"),
    [(0, (0.0, 0.0)), (20, (0.0, 0.0)), (40, (5.0, 2.5)), (60, (10.0, 5.0)), (100, (10.0, 5.0))],
)
def test_dip_lambda_schedule(epoch, lambdas):
    loss = DipVaeLoss(lambda_od=10, lambda_d=5, lambda_start_epoch=20, lambda_annealing_epochs=40)
    assert loss.lambdas(epoch) == pytest.approx(lambdas)


@pytest.mark.parametrize(
    ("epoch", "lambda_od", "lambda_d"), [(10, 0, 0), (40, 5, 2.5), (60, 10, 5)]
)
def test_dip_loss_is_the_elbo_plus_the_weighted_penalties(epoch, lambda_od, lambda_d):
    x = torch.zeros(4, 3)
    terms = DipVaeLoss()(output(x, MU, LOGVAR), x, torch.ones_like(x), beta=1.0, epoch=epoch)
    penalty = lambda_od * OFFDIAG + lambda_d * DIAG
    assert terms.kl_raw.item() == pytest.approx(DIP_KL)
    assert terms.total.item() == pytest.approx(DIP_KL + penalty, rel=1e-6)
    assert terms.extras["cov_offdiag"].item() == pytest.approx(OFFDIAG)
    assert terms.extras["cov_diag"].item() == pytest.approx(DIAG)
    assert terms.extras["lambda_od"].item() == lambda_od
    assert terms.extras["lambda_d"].item() == lambda_d
    assert terms.extras["cov_penalty"].item() == pytest.approx(penalty)


def test_dip_total_is_linear_in_beta_through_the_constrained_kl():
    # The train loop corrects val/loss to the target β with (target - β) * kl_constrained.
    x = torch.zeros(4, 3)
    loss = DipVaeLoss(free_bits=1.0)
    one, three = (loss(output(x, MU, LOGVAR), x, torch.ones_like(x), b, 60.0) for b in (1.0, 3.0))
    assert (three.total - one.total).item() == pytest.approx(2 * one.kl_constrained.item())


def test_dip_covariance_is_float32_for_half_inputs():
    torch.manual_seed(0)
    mu, logvar = torch.randn(64, 5), torch.randn(64, 5) * 0.3
    cov = dip_covariance(mu.half(), logvar.half())
    assert cov.dtype == torch.float32
    expected = dip_covariance(mu.half().float(), logvar.half().float())
    assert torch.allclose(cov, expected)  # exact float32 maths on the half-rounded inputs
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):  # matmul would go bf16
        under_autocast = dip_covariance(mu, logvar)
    assert torch.equal(under_autocast, dip_covariance(mu, logvar))  # bf16 would err by ~1e-2
    x = torch.zeros(64, 2)
    terms = DipVaeLoss()(output(x, mu.half(), logvar.half()), x, torch.ones_like(x), 1.0, 100.0)
    assert terms.extras["cov_penalty"].dtype == torch.float32


@pytest.mark.parametrize(
    ("cls", "key"),
    [
        (CapacityLoss, "gamma"),
        (CapacityLoss, "capacity_max"),
        (DipVaeLoss, "lambda_od"),
        (DipVaeLoss, "lambda_annealing_epochs"),
        (VQLoss, "commitment_cost"),
    ],
)
def test_bad_settings_name_the_key(cls, key):
    with pytest.raises(ConfigError, match=f"loss.{key}"):
        cls(**{key: -1.0})


def test_every_loss_shares_the_reconstruction_part():
    for cls in (ElboLoss, CapacityLoss, DipVaeLoss, VQLoss):
        assert issubclass(cls, ReconstructionLoss)
        with pytest.raises(ConfigError, match="loss.branch_weight"):
            cls(branch_weight=2.0)


# --- VQ-VAE (van den Oord et al. 2017) -------------------------------------------------------


def test_vq_loss_terms_and_beta_is_ignored(tiny_vqvae):
    model = tiny_vqvae()
    x = torch.randn(6, 40, 1)
    out = model(x)
    loss = VQLoss(commitment_cost=0.25)
    terms = loss(out, x, torch.ones_like(x), beta=1.0)
    commitment, codebook_term = out.extras["commitment"], out.extras["codebook_loss"]
    assert commitment.item() == pytest.approx(codebook_term.item())  # both ‖z_e − e‖²
    assert terms.total.item() == pytest.approx(
        (terms.recon + codebook_term + 0.25 * commitment).item()
    )
    assert terms.kl_constrained.item() == 0.0 and terms.kl_raw.item() == pytest.approx(
        2 * math.log(4)
    )
    assert loss(out, x, torch.ones_like(x), beta=7.0).total.item() == terms.total.item()
    assert set(terms.extras) == {"commitment", "codebook_loss", "perplexity"}
    with pytest.raises(ConfigError, match="model=vqvae"):
        loss(output(x, torch.zeros(6, 2), torch.zeros(6, 2)), x, torch.ones_like(x), 1.0)


def test_one_step_changes_encoder_decoder_and_codebook_but_eval_does_not(tiny_vqvae):
    model = tiny_vqvae()
    x = torch.randn(8, 40, 1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    model(x)
    assert torch.equal(model.codebook, before["codebook"])  # evaluation never moves the EMA
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    terms = VQLoss()(model(x), x, torch.ones_like(x), beta=1.0)
    optimizer.zero_grad()
    terms.total.backward()
    optimizer.step()
    after = model.state_dict()
    for name in (
        "encoder.0.0.weight",
        "to_codes.weight",
        "from_codes.0.weight",
        "decoder.0.0.weight",
        "decoder.1.weight",
        "codebook",
        "ema_count",
    ):
        assert not torch.equal(before[name], after[name]), name
    assert "codebook" not in dict(model.named_parameters())  # EMA, not the optimiser


# --- configs -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "cls"), [("capacity", CapacityLoss), ("dip_vae", DipVaeLoss), ("vq", VQLoss)]
)
def test_new_loss_configs_build(compose_config, option, cls):
    cfg = compose_config([f"loss={option}"])
    loss = build(cfg.loss)
    assert type(loss) is cls
    for key, value in cfg.loss.items():
        if key == "sigma":  # kept as log σ, a buffer that moves with the loss to the device
            assert loss.log_sigma.exp().item() == pytest.approx(value), key
        elif key != "_target_":
            assert getattr(loss, key) == value, key


def test_dip_vae_config_has_seed_004_recipe(compose_config):
    loss = compose_config(["loss=dip_vae"]).loss
    assert (loss.lambda_od, loss.lambda_d) == (10.0, 5.0)
    assert (loss.lambda_start_epoch, loss.lambda_annealing_epochs) == (20, 40)


@pytest.mark.parametrize("shape", [(745, 7), (40, 1)])
def test_vqvae_config_builds_and_trains_with_vq_loss(compose_config, shape):
    cfg = compose_config(["model=vqvae", "loss=vq"])
    model, loss = build(cfg.model, input_shape=shape), build(cfg.loss)
    assert isinstance(model, VQVAE) and model.latent_dim == cfg.model.n_latents * cfg.model.code_dim
    x = torch.randn(4, *shape)
    terms = loss(model(x), x, torch.ones_like(x), beta=1.0)
    assert torch.isfinite(terms.total)


@pytest.mark.parametrize("path", NEW_YAMLS)
def test_new_yamls_comment_every_key(conf_dir, path):
    lines = (conf_dir / path).read_text().splitlines()
    assert lines[0].startswith("#")  # the header naming the paper or seed
    for i, line in enumerate(lines):
        if re.match(r"^[a-z_]+:", line) and not line.startswith("_target_"):
            assert "#" in line or lines[i - 1].startswith("#"), line


# --- a β with one meaning: the Gaussian likelihood, against a linear Gaussian model ------------


class LinearGaussianVAE(GaussianVAE):
    """z ~ N(0, I), x | z ~ N(W z + b, σ² I), q(z | x) = N(A x + c, diag(exp(logvar))): every
    quantity of this model has a closed form (Tipping & Bishop 1999: p(x) = N(b, W Wᵀ + σ² I))."""

    def __init__(self, W, b, A, c, logvar):
        super().__init__((W.shape[0],), W.shape[1], None, input_rank=1)
        self.W, self.b, self.A, self.c, self.fixed_logvar = W, b, A, c, logvar

    def posterior(self, x):
        return x @ self.A.T + self.c, self.fixed_logvar.expand(len(x), -1)

    def decode(self, z):
        return z @ self.W.T + self.b, {}


def linear_gaussian(sigma=0.7, seed=0):
    generator = torch.Generator().manual_seed(seed)
    F, D = 5, 2
    W = torch.randn(F, D, generator=generator, dtype=torch.float64)
    b = torch.randn(F, generator=generator, dtype=torch.float64)
    # The exact posterior's mean map and variance, then perturbed: q is close to, not equal
    # to, the true posterior, so the ELBO is strictly below log p(x).
    precision = torch.eye(D, dtype=torch.float64) + W.T @ W / sigma**2
    covariance = torch.linalg.inv(precision)
    A = covariance @ W.T / sigma**2 * 0.8
    c = -A @ b
    logvar = torch.log(torch.diagonal(covariance)) + 0.3
    model = LinearGaussianVAE(W, b, A, c, logvar).double()
    x = torch.randn(8, F, generator=generator, dtype=torch.float64) * 2 + b
    exact = torch.distributions.MultivariateNormal(
        b, W @ W.T + sigma**2 * torch.eye(F, dtype=torch.float64)
    ).log_prob(x)
    return model, x, exact


def analytic_negative_elbo(model, x, sigma):
    """-E_q[log p(x | z)] + KL(q || p), per sample, in closed form for the linear model."""
    mu, logvar = model.encode(x)
    var = logvar.exp()
    residual = x - mu @ model.W.T - model.b
    expected_square = residual.pow(2).sum(1) + (var * model.W.pow(2).sum(0)).sum(1)
    F = x.shape[1]
    nll = 0.5 * expected_square / sigma**2 + F * math.log(sigma) + 0.5 * F * math.log(2 * math.pi)
    kl = 0.5 * (mu.pow(2) + var - 1 - logvar).sum(1)
    return nll + kl


def test_sum_nll_loss_at_beta_1_is_the_negative_elbo_of_a_linear_gaussian_model():
    sigma = 0.7
    model, x, _ = linear_gaussian(sigma)
    loss = ElboLoss(reduction="sum", sigma=sigma).double()
    torch.manual_seed(0)
    # One z sample per row: 200,000 copies of one x average the Monte Carlo loss to its mean.
    copies = x[:1].expand(200_000, -1)
    terms = loss(model.train()(copies), copies, torch.ones_like(copies), beta=1.0)
    expected = analytic_negative_elbo(model, x[:1], sigma).item()
    assert terms.total.item() == pytest.approx(expected, abs=0.02)
    assert terms.nll.item() == pytest.approx(expected - terms.kl_raw.item(), abs=0.02)
    # Unobserved entries drop out of the likelihood, constant terms included.
    half = torch.ones_like(copies)
    half[:, 3:] = 0.0
    masked = loss(model(copies), copies, half, beta=1.0)
    assert masked.nll.item() < terms.nll.item()


def test_the_same_beta_weighs_the_kl_alike_whatever_the_input_size():
    # With reduction=sum the reconstruction grows with the number of entries and the KL does
    # not: β = 1 stays the ELBO. The mean MSE instead shrinks the reconstruction by 1 / entries.
    mu, logvar = torch.ones(4, 2), torch.zeros(4, 2)
    for entries in (10, 1000):
        x = torch.zeros(4, entries)
        out = output(x + 1.0, mu, logvar)
        summed = ElboLoss(reduction="sum")(out, x, torch.ones_like(x), beta=1.0)
        assert summed.nll.item() == pytest.approx(entries * (0.5 + 0.5 * math.log(2 * math.pi)))
        mean = ElboLoss(reduction="mean")(out, x, torch.ones_like(x), beta=1.0)
        assert mean.total.item() == pytest.approx(1.0 + 1.0)  # MSE 1 + KL 2 x 0.5


def test_the_learned_sigma_optimum_is_the_channels_mean_squared_error():
    # σ-VAE (Rybkin et al. 2021): with σ learned per channel, -log p(x | z) is minimised at
    # σ_c² = the channel's MSE over the observed entries.
    torch.manual_seed(0)
    target = torch.zeros(64, 30, 3)
    recon = torch.randn(64, 30, 3) * torch.tensor([0.5, 1.0, 2.0])
    mask = (torch.rand(64, 30, 3) > 0.2).float()
    recon[..., 0] = torch.where(mask[..., 0] > 0, recon[..., 0], 100.0)  # unobserved: ignored
    mse = ((recon - target) ** 2 * mask).sum((0, 1)) / mask.sum((0, 1))
    loss = ElboLoss(sigma="learned", n_channels=3, channel_axis=-1)
    optimizer = torch.optim.Adam(loss.parameters(), lr=0.05)
    out = output(recon, torch.zeros(64, 2), torch.zeros(64, 2))
    for _ in range(600):
        optimizer.zero_grad()
        loss(out, target, mask, beta=1.0).nll.backward()
        optimizer.step()
    torch.testing.assert_close(loss.log_sigma.detach().exp() ** 2, mse, rtol=1e-3, atol=1e-5)


def test_a_learned_sigma_needs_the_nll_and_the_channels():
    with pytest.raises(ConfigError, match="reduction=sum"):
        ElboLoss(sigma="learned", reduction="mean", n_channels=3)
    with pytest.raises(ConfigError, match="number of channels"):
        ElboLoss(sigma="learned")
    with pytest.raises(ConfigError, match="loss.sigma"):
        ElboLoss(sigma=0.0)
    with pytest.raises(ConfigError, match="loss.reduction"):
        ElboLoss(reduction="max")


def test_iwae_is_tighter_than_the_elbo_and_reaches_the_exact_log_likelihood():
    sigma = 0.7
    model, x, exact = linear_gaussian(sigma)
    loss = ElboLoss(reduction="sum", sigma=sigma).double()
    masks = torch.ones_like(x)
    # IWAE with K = 5 is noisy (sd ~0.1 nats on these 8 samples): its mean over 100 seeds is
    # what tightens with K, ~0.04 nats below K = 5000 (4 standard errors).
    few = [
        importance_weighted_log_px(model, loss, x, masks, n_importance=5, batch_size=4096, seed=s)
        for s in range(100)
    ]
    few_iwae, few_elbo = (sum(getattr(f, name) for f in few) / 100 for name in ("iwae", "elbo"))
    many = importance_weighted_log_px(model, loss, x, masks, n_importance=5000, batch_size=4096)
    elbo = -analytic_negative_elbo(model, x, sigma).mean().item()
    # The ELBO is a strict lower bound here (q is not the true posterior); IWAE tightens with K.
    assert elbo < exact.mean().item() - 0.05
    assert many.elbo == pytest.approx(elbo, abs=0.05)  # the same bound, from K samples
    assert few_elbo < few_iwae < many.iwae
    assert many.iwae == pytest.approx(exact.mean().item(), abs=0.02)


def test_iwae_does_not_depend_on_how_the_samples_are_batched(monkeypatch):
    # Each x draws its own K x D noise, in order: two codes a call or all at once, the same.
    model, x, _ = linear_gaussian()
    loss = ElboLoss(reduction="sum", sigma=0.7).double()
    masks = torch.ones_like(x)
    together = importance_weighted_log_px(model, loss, x, masks, n_importance=7, batch_size=4096)
    monkeypatch.setattr("vaelab.diagnostics.EVAL_BATCH_ELEMENTS", 0)  # the batch size rules
    apart = importance_weighted_log_px(model, loss, x, masks, n_importance=7, batch_size=2)
    assert apart.iwae == pytest.approx(together.iwae, rel=1e-12)
    assert apart.elbo == pytest.approx(together.elbo, rel=1e-12)


def test_per_sample_free_bits_with_mean_kl_gives_seed_001s_gradients():
    # Seed 001's MultiScaleVAELoss: clamp(kl_bd - free_bits, min=0).mean() over batch and
    # dimensions, times β. vaelab's per_sample mode with kl_reduction=mean is that plus the
    # constant free_bits, so the same gradients: what experiment=multiscale_vitals relies on.
    torch.manual_seed(0)
    mu = torch.randn(6, 5, requires_grad=True)
    logvar = (torch.randn(6, 5) * 2).requires_grad_(True)
    x = torch.zeros(6, 4)
    beta, free_bits = 0.5, 2.0
    seed = (gaussian_kl_per_dim(mu, logvar) - free_bits).clamp(min=0).mean() * beta
    seed_grads = torch.autograd.grad(seed, (mu, logvar))
    loss = ElboLoss(free_bits=free_bits, free_bits_mode="per_sample", kl_reduction="mean")
    terms = loss(output(x, mu, logvar), x, torch.ones_like(x), beta=beta)
    ours = terms.total - terms.nll  # the reconstruction side is constant in mu and logvar
    vaelab_grads = torch.autograd.grad(ours, (mu, logvar))
    assert 0 < seed.item() and ours.item() == pytest.approx(seed.item() + beta * free_bits)
    for seed_grad, vaelab_grad in zip(seed_grads, vaelab_grads, strict=True):
        assert torch.allclose(seed_grad, vaelab_grad, atol=1e-6)
