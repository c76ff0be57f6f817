"""Priors of Gaussian models (vaelab.models.priors): N(0, I), mixture of Gaussians, VampPrior."""

import math
from functools import partial

import mlflow
import pytest
import torch
from torch import nn

from vaelab.artifacts import load_checkpoint
from vaelab.diagnostics import diagnose
from vaelab.errors import ConfigError
from vaelab.losses import ElboLoss, gaussian_kl_per_dim
from vaelab.models.base import GaussianVAE, VAEOutput, reparameterize
from vaelab.models.mlp import MLPVAE
from vaelab.models.priors import (
    MixtureOfGaussians,
    StandardNormal,
    VampPrior,
    mixture_log_prob,
)
from vaelab.train import train

pytestmark = pytest.mark.usefixtures("one_thread")

D = 3
N_MC = 40_000  # z samples per x for the Monte-Carlo checks: standard errors of ~0.01 nats


class PosteriorIsInput(GaussianVAE):
    """A model whose posterior is its input, x = (mu, logvar): any posterior on demand, and a
    pseudo-input of zeros has the posterior N(0, I)."""

    def __init__(self, input_shape=(2 * D,), latent_dim=D, prior=None):
        super().__init__(input_shape, latent_dim, None, input_rank=1, prior=prior)
        self.out = nn.Linear(latent_dim, 2 * latent_dim)

    def posterior(self, x):
        return x[:, :D], x[:, D:]

    def decode(self, z):
        return self.out(z), {}


def posteriors() -> tuple[torch.Tensor, torch.Tensor]:
    """Four posteriors, from the prior itself to far off it (mu, logvar), each (4, D)."""
    mu = torch.tensor([[0.0, 0.0, 0.0], [0.5, -1.0, 2.0], [-2.0, 0.3, 0.0], [1.0, 1.0, 1.0]])
    logvar = torch.tensor([[0.0, 0.0, 0.0], [-1.0, 0.5, -2.0], [0.3, -0.3, 1.0], [-4.0, 0.0, 0]])
    return mu, logvar


def closed_form_kl(mu, logvar):
    return gaussian_kl_per_dim(mu, logvar).sum(dim=1)


def monte_carlo_standard_error(mu, logvar, prior, encode) -> torch.Tensor:
    """The standard error of an N_MC-sample estimate of the KL, per x, from draws of its own."""
    eps = torch.randn(N_MC, *mu.shape, generator=torch.Generator().manual_seed(1))
    z = mu + eps * torch.exp(0.5 * logvar)
    log_q = -0.5 * (eps.pow(2) + math.log(2 * math.pi) + logvar).sum(dim=-1)
    return (log_q - prior.log_prob(z, encode)).std(dim=0) / math.sqrt(N_MC)


def test_mixture_at_the_origin_is_the_standard_normal_density_exactly():
    z = torch.randn(5, 7, D)
    one = mixture_log_prob(z, torch.zeros(1, D), torch.zeros(1, D), torch.zeros(1))
    expected = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(dim=-1)
    torch.testing.assert_close(one, expected, rtol=0, atol=1e-5)
    # Two equal components of weight 1/2 each: the same density.
    two = mixture_log_prob(z, torch.zeros(2, D), torch.zeros(2, D), torch.full((2,), -math.log(2)))
    torch.testing.assert_close(two, expected, rtol=0, atol=1e-5)


def test_mixture_log_prob_matches_torch_distributions():
    torch.manual_seed(0)
    means, logvars = torch.randn(4, D), torch.randn(4, D)
    logits = torch.randn(4)
    mixture = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(logits=logits),
        torch.distributions.Independent(
            torch.distributions.Normal(means, (0.5 * logvars).exp()), 1
        ),
    )
    z = torch.randn(10, D) * 2
    got = mixture_log_prob(z, means, logvars, torch.log_softmax(logits, 0))
    torch.testing.assert_close(got, mixture.log_prob(z), rtol=1e-5, atol=1e-5)


def test_mog_with_one_component_at_the_origin_estimates_the_closed_form_kl():
    """MoG, K = 1, mean 0, log-variance 0: N(0, I). The Monte-Carlo KL of N_MC samples lies
    within 4 standard errors (≤ 0.05 nats here) of the closed form, for each posterior."""
    prior = MixtureOfGaussians(D, (2 * D,), n_components=1, eval_kl_samples=N_MC)
    with torch.no_grad():
        prior.means.zero_()
    mu, logvar = posteriors()
    with torch.no_grad():
        estimate = prior.kl(mu, logvar, None, encode=None)
        error = monte_carlo_standard_error(mu, logvar, prior, None)
    expected = closed_form_kl(mu, logvar)
    assert error.max() < 0.02
    assert ((estimate - expected).abs() <= 4 * error + 1e-6).all(), (estimate, expected, error)
    # The posterior that is the prior: log q - log p = 0 at every sample, exactly 0 KL.
    assert estimate[0].abs() < 1e-5
    # The estimate is no mere closeness to the standard normal's: a mixture off the origin
    # gives another KL.
    with torch.no_grad():
        prior.means.fill_(1.0)
        shifted = prior.kl(mu, logvar, None, encode=None)
    assert (shifted - expected).abs().max() > 0.5


def test_vamp_prior_with_one_pseudo_input_of_posterior_n01_estimates_the_closed_form_kl():
    """VampPrior, K = 1, the pseudo-input's posterior forced to N(0, I): through the model's
    own forward (eval mode) the KL it hands the loss is the closed form, within 4 SE."""
    vamp = partial(VampPrior, n_components=1, init="random", eval_kl_samples=N_MC)
    model = PosteriorIsInput(prior=vamp).eval()
    with torch.no_grad():
        model.prior.pseudo_inputs.zero_()  # posterior (mu, logvar) = (0, 0): N(0, I)
    mu, logvar = posteriors()
    with torch.no_grad():
        out = model(torch.cat([mu, logvar], dim=1))
        error = monte_carlo_standard_error(mu, logvar, model.prior, model.encode_in_eval_mode)
        z = torch.randn(6, D)
        log_prior = model.log_prior(z)
    expected = closed_form_kl(mu, logvar)
    assert ((out.kl - expected).abs() <= 4 * error + 1e-6).all(), (out.kl, expected, error)
    torch.testing.assert_close(log_prior, StandardNormal(D, ()).log_prob(z, None))
    # and the loss takes this estimate as its raw KL
    kl_raw, kl_constrained = ElboLoss().kl(out)
    assert float(kl_raw) == pytest.approx(float(out.kl.mean())) and kl_constrained == kl_raw


def test_the_standard_prior_leaves_the_closed_form_and_the_numbers_unchanged():
    torch.manual_seed(0)
    model = MLPVAE((20,), latent_dim=4, hidden_dims=[16, 8])
    assert isinstance(model.prior, StandardNormal) and model.prior.kl_estimator == "closed_form"
    assert not [k for k in model.state_dict() if k.startswith("prior.")]
    x = torch.randn(8, 20)
    model.train()
    torch.manual_seed(1)
    out = model(x)
    assert out.kl is None
    torch.manual_seed(1)
    mu, logvar = model.encode(x)
    # the same draw as reparameterize, so a run without a prior trains on the same numbers
    torch.testing.assert_close(out.z, reparameterize(mu, logvar), rtol=0, atol=0)


def test_eval_mode_kl_repeats_exactly_and_leaves_the_random_stream_alone():
    torch.manual_seed(0)
    model = MLPVAE(
        (20,), latent_dim=4, hidden_dims=[16, 8], prior=partial(VampPrior, init="random")
    )
    model.eval()
    x = torch.randn(6, 20)
    state = torch.get_rng_state()
    with torch.no_grad():
        first, second = model(x).kl, model(x).kl
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(first, second) and first.shape == (6,)


def test_vamp_pseudo_inputs_fill_from_the_first_training_samples_once():
    torch.manual_seed(0)
    model = MLPVAE(
        (20,), latent_dim=4, hidden_dims=[16, 8], prior=partial(VampPrior, n_components=5)
    )
    model.train()
    batches = [torch.randn(3, 20) for _ in range(3)]
    model(batches[0])
    torch.testing.assert_close(model.prior.pseudo_inputs[:3].detach(), batches[0])
    assert int(model.prior.filled) == 3
    model(batches[1])
    torch.testing.assert_close(model.prior.pseudo_inputs[3:].detach(), batches[1][:2])
    filled = model.prior.pseudo_inputs.detach().clone()
    model(batches[2])
    assert torch.equal(model.prior.pseudo_inputs.detach(), filled)
    model.eval()(torch.randn(4, 20))  # evaluation never fills
    # A model rebuilt from the state dict knows its pseudo-inputs are filled: no refill.
    again = MLPVAE(
        (20,), latent_dim=4, hidden_dims=[16, 8], prior=partial(VampPrior, n_components=5)
    )
    again.load_state_dict(model.state_dict())
    again.train()(batches[2])
    assert torch.equal(again.prior.pseudo_inputs.detach(), filled)


def test_vamp_components_come_from_the_encoder_in_eval_mode_without_moving_batchnorm():
    torch.manual_seed(0)
    model = MLPVAE(
        (20,), latent_dim=4, hidden_dims=[16, 8], prior=partial(VampPrior, n_components=1)
    )
    model.train()
    running = model.encoder[0][1].running_mean.clone()
    means, logvars, log_weights = model.prior.components(model.encode_in_eval_mode)
    assert model.training and all(m.training for m in model.modules())  # modes restored
    assert torch.equal(model.encoder[0][1].running_mean, running)  # K = 1 works, no BN update
    with torch.no_grad():
        expected = model.eval().encode(model.prior.pseudo_inputs)
    torch.testing.assert_close(means, expected[0])
    assert log_weights.tolist() == [0.0]


@pytest.mark.parametrize(
    "prior, name",
    [
        (partial(VampPrior, n_components=4, init="random"), "prior.pseudo_inputs"),
        (partial(MixtureOfGaussians, n_components=4, learn_weights=True), "prior.logits"),
    ],
)
def test_one_adam_step_moves_the_prior(prior, name):
    torch.manual_seed(0)
    model = MLPVAE((20,), latent_dim=4, hidden_dims=[16, 8], prior=prior).train()
    params = dict(model.named_parameters())
    assert name in params
    before = {k: p.detach().clone() for k, p in params.items() if k.startswith("prior.")}
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.randn(16, 20)
    terms = ElboLoss().forward(model(x), x, torch.ones_like(x), beta=1.0)
    terms.total.backward()
    optimiser.step()
    for key, value in before.items():
        assert not torch.equal(params[key].detach(), value), key


def test_uniform_mog_weights_are_a_buffer_not_trained():
    prior = MixtureOfGaussians(D, (), n_components=4)
    assert "logits" not in dict(prior.named_parameters())
    assert torch.equal(prior.components(None)[2].exp(), torch.full((4,), 0.25))


def test_mixture_moments_are_those_of_the_mixture():
    prior = MixtureOfGaussians(1, (), n_components=2)
    with torch.no_grad():
        prior.means.copy_(torch.tensor([[-1.0], [3.0]]))
        prior.logvars.copy_(torch.tensor([[0.0], [math.log(4.0)]]))
    mean, var = prior.moments(None)
    # E = (-1 + 3) / 2 = 1; E[z²] = ((1 + 1) + (4 + 9)) / 2 = 7.5; Var = 6.5
    assert mean.tolist() == pytest.approx([1.0]) and var.tolist() == pytest.approx([6.5])


def test_diagnostics_report_the_loss_kl_estimate_under_a_mixture_prior():
    torch.manual_seed(0)
    model = MLPVAE((20,), latent_dim=4, hidden_dims=[16, 8], prior=partial(MixtureOfGaussians))
    values, masks = torch.randn(10, 20), torch.ones(10, 20)
    loss = ElboLoss()
    found = diagnose(model, values, masks, loss, 1.0, 4, torch.device("cpu"))
    with torch.no_grad():
        expected = torch.cat([model.eval()(values[i : i + 4]).kl for i in range(0, 10, 4)])
    assert found.kl_raw == pytest.approx(float(expected.mean()), rel=1e-5)
    mean, var = model.prior.moments(None)
    per_dim = gaussian_kl_per_dim(found.mu, found.logvar, mean.detach(), var.detach()).mean(0)
    torch.testing.assert_close(found.kl_per_dim, per_dim)


def test_free_bits_floor_the_total_kl_under_a_mixture_prior():
    mu, logvar = torch.zeros(4, D), torch.zeros(4, D)
    out = VAEOutput(mu, mu, logvar, mu, kl=torch.tensor([0.1, 0.2, 0.3, 0.4]))
    kl_raw, kl_constrained = ElboLoss(free_bits=0.5, free_bits_mode="batch_mean").kl(out)
    assert float(kl_raw) == pytest.approx(0.25)
    assert float(kl_constrained) == pytest.approx(0.5 * D)  # max(λ·D, mean KL)
    _, above = ElboLoss(free_bits=0.01, free_bits_mode="batch_mean").kl(out)
    assert float(above) == pytest.approx(0.25)
    for mode in ("per_dim", "per_sample"):
        with pytest.raises(ConfigError, match="batch_mean"):
            ElboLoss(free_bits=0.5, free_bits_mode=mode).kl(out)
    # without free bits any mode is fine
    assert ElboLoss(free_bits=0.0, free_bits_mode="per_dim").kl(out)[1] == kl_raw


def test_bad_prior_settings_are_config_errors():
    with pytest.raises(ConfigError, match="n_components"):
        VampPrior(D, (4,), n_components=0)
    with pytest.raises(ConfigError, match="init"):
        VampPrior(D, (4,), init="zeros")
    with pytest.raises(ConfigError, match="_partial_"):
        MLPVAE((20,), prior="vamp")


@pytest.mark.slow
def test_tiny_vamp_run_trains_logs_val_kl_and_its_checkpoint_reloads_identically(
    compose_config, tiny, tmp_path
):
    prior = ["+model/prior=vamp", "model.prior.n_components=4", "model.prior.eval_kl_samples=8"]
    cfg = compose_config([*tiny.mlp_run, *prior, "tracking.experiment=vamp"])
    train(cfg, tmp_path / "run")
    client = mlflow.MlflowClient(cfg.tracking.uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FINISHED"
    assert run.data.params["model.prior._target_"] == "vaelab.models.priors.VampPrior"
    assert run.data.params["kl.estimator"] == "monte_carlo"  # val/kl is an estimate, and says so
    history = client.get_metric_history(run.info.run_id, "val/kl")
    assert [m.step for m in history] == [0, 1] and all(math.isfinite(m.value) for m in history)
    # The best epoch's checkpoint, rebuilt from its saved config: the same VampPrior, with its
    # trained pseudo-inputs, and the KL measured again is the one that epoch logged (the
    # evaluation samples are drawn from a fixed seed).
    path = tmp_path / "run" / "checkpoints" / "model.pt"
    state = torch.load(path, weights_only=True)
    loaded = load_checkpoint(path)
    assert isinstance(loaded.model.prior, VampPrior)
    assert int(loaded.model.prior.filled) == 4  # filled from training samples
    for key, value in state["model"].items():
        assert torch.equal(loaded.model.state_dict()[key], value), key
    best = state["epoch"]
    at_best = next(m.value for m in history if m.step == best)
    assert run.data.metrics["final/kl"] == pytest.approx(at_best, rel=1e-6)
