"""Active units, mutual information and the collapse verdict on latents whose answer is known."""

import math

import pytest
import torch

from vaelab.config import build
from vaelab.diagnostics import (
    CollapseCriteria,
    active_units,
    codebook_usage,
    codebook_verdict,
    collapse_verdict,
    diagnose,
    expected_kl_floor,
    mi_samples,
    mutual_information,
    sweep_constraints,
)
from vaelab.losses import ElboLoss, VQLoss, code_perplexity
from vaelab.models.base import VAEOutput


def output(recon, mu, logvar, branches=None):
    return VAEOutput(recon=recon, mu=mu, logvar=logvar, z=mu, branches=branches or {})


def test_active_units_counts_dimensions_whose_mean_varies():
    torch.manual_seed(0)
    mu = torch.zeros(500, 6)
    mu[:, 0] = torch.randn(500)  # variance ≈ 1: active
    mu[:, 1] = 0.3 * torch.randn(500)  # variance ≈ 0.09: active
    mu[:, 2] = 0.05 * torch.randn(500)  # variance ≈ 0.0025: below 0.01, inactive
    mu[:, 3] = 5.0  # constant: inactive
    mu[:, 4] = torch.where(torch.arange(500) % 2 == 0, 1.0, -1.0)  # variance 1: active
    assert active_units(mu) == 3


def test_active_units_threshold_is_inclusive():
    mu = torch.tensor([[0.1], [-0.1]])  # population variance exactly 0.01
    assert active_units(mu, threshold=0.01) == 1
    assert active_units(mu, threshold=0.0101) == 0


def test_mi_of_a_collapsed_posterior_is_zero():
    # Every x maps to the prior: q(z|x) = q(z), so I(x; z) = 0.
    mu, logvar = torch.zeros(200, 4), torch.zeros(200, 4)
    assert mutual_information(mu, logvar) == pytest.approx(0.0, abs=1e-6)


def test_mi_of_two_separated_clusters_is_log_2():
    # Half the data at -10, half at +10, tiny variance: z tells which half, nothing more.
    mu = torch.cat([torch.full((100, 1), -10.0), torch.full((100, 1), 10.0)])
    logvar = torch.full((200, 1), -2.0)
    assert mutual_information(mu, logvar) == pytest.approx(math.log(2), abs=0.01)


def test_mi_of_distinct_points_reaches_log_n():
    n = 64
    mu = torch.arange(n, dtype=torch.float32)[:, None] * 10
    logvar = torch.full((n, 1), -4.0)
    assert mutual_information(mu, logvar) == pytest.approx(math.log(n), abs=0.01)


def test_mi_matches_its_definition_term_by_term():
    # The estimate expands the squared distances into matrix products; this is the estimator
    # written out directly, sample by sample and posterior by posterior, on the same draws.
    torch.manual_seed(2)
    n, dim, n_samples = 30, 3, 4
    mu, logvar = 3 * torch.randn(n, dim), torch.randn(n, dim) - 2
    generator = torch.Generator().manual_seed(0)  # the estimate's own, drawn the same way
    eps = torch.randn((n_samples, n, dim), generator=generator, dtype=torch.float64)
    mu, logvar = mu.double(), logvar.double()
    std = torch.exp(0.5 * logvar)
    posteriors = torch.distributions.Normal(mu, std)  # (n, dim): one per x
    total = 0.0
    for s in range(n_samples):
        for i in range(n):
            z = mu[i] + eps[s, i] * std[i]
            log_q_z_given_x = posteriors.log_prob(z).sum(-1)[i]
            log_q_z = torch.logsumexp(posteriors.log_prob(z).sum(-1), 0) - math.log(n)
            total += float(log_q_z_given_x - log_q_z)
    expected = total / (n_samples * n)
    assert mutual_information(mu, logvar, seed=0, n_samples=n_samples) == pytest.approx(
        expected, rel=1e-9
    )


def test_mi_samples_shrink_with_the_split_to_bound_the_cost():
    assert mi_samples(40) == 8 and mi_samples(500) == 8
    assert mi_samples(1000) == 2 and mi_samples(5000) == 1


def test_mi_is_chunked_without_changing_the_answer():
    torch.manual_seed(1)
    mu, logvar = torch.randn(600, 3), torch.randn(600, 3) - 1
    full = mutual_information(mu, logvar)
    assert 0 < full <= math.log(600)
    assert mutual_information(mu, logvar) == full  # its own generator: repeatable


CRITERIA = CollapseCriteria()


def verdict_of(kl=2.0, mu=None, logvar=None, mi=1.0, recon=0.5, recon_z0=1.0):
    """collapse_verdict of a healthy case, with one ingredient replaced."""
    torch.manual_seed(0)
    mu = torch.randn(100, 4) if mu is None else mu
    logvar = torch.full((100, 4), -1.0) if logvar is None else logvar
    return collapse_verdict(kl, mu, logvar, mi, recon, recon_z0, CRITERIA)


def test_a_healthy_latent_space_passes_every_check():
    healthy = verdict_of()
    assert healthy["verdict"] == "healthy" and healthy["failed"] == "none"
    assert healthy["active_units"] == 4 and healthy["z_gain"] == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("case", "failed"),
    [
        (dict(kl=0.001), "kl"),
        (dict(logvar=torch.full((100, 4), -7.0)), "logvar_mean"),
        (dict(mi=0.03), "mi"),
        (dict(recon=0.999, recon_z0=1.0), "decoder_uses_z"),
    ],
    ids=["kl", "logvar", "mi", "decoder"],
)
def test_each_failed_check_makes_the_run_collapsed_and_is_named(case, failed):
    verdict = verdict_of(**case)
    assert verdict["verdict"] == "collapsed" and verdict["failed"] == failed
    assert verdict[f"check_{failed}"] is False


def test_an_encoder_with_a_constant_non_zero_mean_is_collapsed():
    # Every sample gets the same mean vector, far from 0: the spread over all N x D entries is
    # large (seed 000's literal mu.std() = 1.1 > 0.1), the spread of each latent across samples
    # is zero, which is what the seed meant. Its KL is large, but z tells no sample apart.
    mu = torch.tensor([2.0, -1.0, 0.5, 0.0]).expand(100, 4).contiguous()
    assert float(mu.std()) > 0.1  # the old check passed this
    logvar = torch.zeros(100, 4)
    mi = mutual_information(mu, logvar)
    verdict = verdict_of(kl=2.6, mu=mu, logvar=logvar, mi=mi, recon=1.0, recon_z0=1.0)
    assert verdict["verdict"] == "collapsed" and verdict["active_units"] == 0
    assert verdict["mu_std_max"] == 0.0
    failed = verdict["failed"].split(", ")
    assert "active_units" in failed and "mi" in failed
    assert "0 dimensions whose mean varies" in verdict["why"]
    assert mi == pytest.approx(0.0, abs=1e-9)


class LookupVAE(torch.nn.Module):
    """A 'model' whose decoder either uses z (recon = z broadcast) or ignores it."""

    def __init__(self, uses_z: bool):
        super().__init__()
        self.latent_dim = 1
        self.uses_z = uses_z

    def encode(self, x):
        return x[:, :1], torch.zeros(len(x), 1)

    def decode(self, z):
        recon = z.expand(-1, 3) if self.uses_z else torch.zeros(len(z), 3)
        return recon, {}

    def forward(self, x):
        mu, logvar = self.encode(x)
        recon, branches = self.decode(mu)
        return VAEOutput(recon=recon, mu=mu, logvar=logvar, z=mu, branches=branches)


def test_recon_z0_separates_a_decoder_that_uses_z_from_one_that_ignores_it():
    x = torch.linspace(-2, 2, 40)[:, None].expand(-1, 3).contiguous()
    masks = torch.ones_like(x)
    args = dict(loss_fn=ElboLoss(), beta=1.0, batch_size=16, device=torch.device("cpu"))
    uses = diagnose(LookupVAE(uses_z=True), x, masks, **args)
    ignores = diagnose(LookupVAE(uses_z=False), x, masks, **args)
    assert uses.recon == pytest.approx(0.0, abs=1e-12)
    assert uses.recon_z0 == pytest.approx(float((x**2).mean()))
    assert ignores.recon == pytest.approx(ignores.recon_z0)  # collapse signature
    metrics = uses.metrics("val")
    assert metrics["val/active_units"] == 1
    assert metrics["val/kl"] == pytest.approx(float(0.5 * (x[:, 0] ** 2).mean()))


def test_a_decoder_that_ignores_z_is_judged_collapsed_whatever_its_kl():
    x = torch.linspace(-2, 2, 40)[:, None].expand(-1, 3).contiguous()
    args = dict(loss_fn=ElboLoss(), beta=1.0, batch_size=16, device=torch.device("cpu"))
    uses = diagnose(LookupVAE(uses_z=True), x, torch.ones_like(x), **args)
    ignores = diagnose(LookupVAE(uses_z=False), x, torch.ones_like(x), **args)
    # The same encoder (KL 0.7 nats, one active unit, MI ~0.5 nats) behind both decoders.
    assert uses.kl_raw == ignores.kl_raw > 0.5 and uses.mi == ignores.mi > 0.1
    assert uses.verdict(CRITERIA)["verdict"] == "healthy"
    verdict = ignores.verdict(CRITERIA)
    assert verdict["verdict"] == "collapsed"
    assert verdict["failed"] == "decoder_uses_z"
    assert verdict["why"] == "recon only 0.0 % below recon at z = 0, less than 2 %"


class ConstantEncoder(LookupVAE):
    """Every x gets the posterior N(c, I): far from the prior, the same for every sample."""

    def encode(self, x):
        return torch.full((len(x), 2), 1.5), torch.zeros(len(x), 2)

    def decode(self, z):
        return z[:, :1].expand(-1, 3), {}


def test_kl_of_an_off_prior_aggregate_posterior_without_information_is_infeasible():
    x = torch.randn(50, 3)
    val = diagnose(
        ConstantEncoder(uses_z=True),
        x,
        torch.ones_like(x),
        ElboLoss(),
        1.0,
        16,
        torch.device("cpu"),
    )
    metrics = val.metrics("val")
    # ELBO surgery: all of the KL (2 x 0.5 x 1.5² = 2.25 nats) is KL(q(z) || p(z)), none is I(x; z).
    assert metrics["val/kl"] == pytest.approx(2.25)
    assert metrics["val/mi"] == pytest.approx(0.0, abs=1e-9)
    assert metrics["val/kl_marginal"] == pytest.approx(2.25)
    final = {k.replace("val/", "final/"): v for k, v in metrics.items()}
    constraints = {c.name: c for c in sweep_constraints(final, 1.0, CRITERIA)}
    assert constraints["kl"].value < 0  # the KL clears the users' threshold of 1 nat ...
    assert constraints["mi"].value > 0  # ... and carries no information: infeasible
    assert constraints["mi"].meaning == "I(x; z) ≥ 0.1 nats"
    assert constraints["decoder_uses_z"].value >= 0  # z is the same for every x


def test_mi_of_an_informative_encoder_passes_the_constraint():
    x = torch.linspace(-2, 2, 40)[:, None].expand(-1, 3).contiguous()
    val = diagnose(
        LookupVAE(uses_z=True), x, torch.ones_like(x), ElboLoss(), 1.0, 16, torch.device("cpu")
    )
    final = {k.replace("val/", "final/"): v for k, v in val.metrics("val").items()}
    assert all(c.value <= 0 for c in sweep_constraints(final, 0.5, CRITERIA))


def test_loss_final_weights_is_the_loss_at_the_final_weights():
    # For the ELBO the loss is linear in β: the loss at the final β=2 equals the loss at β=0.5
    # plus 1.5 x the constrained KL.
    x = torch.linspace(-2, 2, 40)[:, None].expand(-1, 3).contiguous()
    args = dict(batch_size=16, device=torch.device("cpu"))
    model = LookupVAE(uses_z=False)  # KL 0.5 mu² > 0, reconstruction error > 0
    now = diagnose(model, x, torch.ones_like(x), ElboLoss(), 0.5, final_weights=(2.0, 9.0), **args)
    final = diagnose(model, x, torch.ones_like(x), ElboLoss(), 2.0, **args)
    assert now.loss_final_weights == pytest.approx(final.loss)
    assert now.loss_final_weights == pytest.approx(now.loss + 1.5 * now.kl_constrained)
    assert final.loss_final_weights is None
    assert now.metrics("val")["val/loss_final_weights"] == now.loss_final_weights
    assert "val/loss_final_weights" not in final.metrics("val")


def test_codebook_verdict():
    one_code = torch.zeros(50, 4, dtype=torch.long)
    assert codebook_verdict(one_code, 0.1, 1.0, CRITERIA)["verdict"] == "collapsed"
    many = torch.arange(200).reshape(50, 4) % 7
    assert codebook_verdict(many, 0.1, 1.0, CRITERIA)["verdict"] == "healthy"
    ignored = codebook_verdict(many, 0.99, 1.0, CRITERIA)
    assert ignored["verdict"] == "collapsed" and ignored["codebook_usage"] == 7


# --- quantising models: codebook usage instead of active units --------------------------------


def test_codebook_usage_and_perplexity_by_hand():
    uniform = torch.tensor([[0, 1], [2, 3]])
    assert codebook_usage(uniform) == 4
    assert code_perplexity(uniform).item() == pytest.approx(4.0)
    skewed = torch.tensor([[5, 5], [5, 9]])  # p = (3/4, 1/4)
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert codebook_usage(skewed) == 2
    assert code_perplexity(skewed).item() == pytest.approx(math.exp(entropy))
    assert code_perplexity(torch.zeros(3, 2, dtype=torch.long)).item() == pytest.approx(1.0)


def test_diagnose_reports_codebook_metrics_of_a_vqvae(tiny_vqvae):
    model = tiny_vqvae(codebook_size=8)
    values = torch.randn(30, 40, 1)
    masks = torch.ones_like(values)
    codebook = model.codebook.clone()
    result = diagnose(model, values, masks, VQLoss(), 1.0, 8, torch.device("cpu"))
    codes = model.nearest_codes(model.encode_continuous(values))  # model is in eval mode now
    assert torch.equal(result.codes, codes)
    assert torch.equal(model.codebook, codebook)
    metrics = result.metrics("val")
    assert metrics["val/codebook_usage"] == len(torch.unique(codes)) >= 1
    assert 1.0 <= metrics["val/codebook_perplexity"] <= metrics["val/codebook_usage"] + 1e-6
    assert metrics["val/kl"] == pytest.approx(2 * math.log(8))
    assert metrics["val/kl_constrained"] == 0.0
    assert {"val/commitment", "val/codebook_loss", "val/perplexity"} <= set(metrics)


def test_gaussian_diagnostics_have_no_codebook_metrics():
    class Identity(torch.nn.Module):
        latent_dim = 3

        def decode(self, z):
            return z, {}

        def forward(self, x):
            return output(x, x, torch.zeros_like(x))

    x = torch.randn(10, 3)
    result = diagnose(Identity(), x, torch.ones_like(x), ElboLoss(), 1.0, 4, torch.device("cpu"))
    assert result.codes is None
    assert not any("codebook" in name for name in result.metrics("val"))


# --- seed 004's further collapse diagnostics: z_std, recon_delta_mu_vs_sampled, KL floor ---------


class QuarterVarianceVAE(LookupVAE):
    """LookupVAE with posteriors N(x_0, 0.25): σ = 0.5 in every dimension."""

    def encode(self, x):
        return x[:, :1], torch.full((len(x), 1), math.log(0.25))


def test_z_std_is_the_mean_posterior_standard_deviation():
    x = torch.linspace(-2, 2, 40)[:, None].expand(-1, 3).contiguous()
    args = dict(loss_fn=ElboLoss(), beta=1.0, batch_size=16, device=torch.device("cpu"))
    quarter = diagnose(QuarterVarianceVAE(uses_z=True), x, torch.ones_like(x), **args)
    prior_like = diagnose(LookupVAE(uses_z=True), x, torch.ones_like(x), **args)
    assert quarter.metrics("val")["val/z_std"] == pytest.approx(0.5)
    assert prior_like.metrics("val")["val/z_std"] == pytest.approx(1.0)  # logvar 0: σ = 1


def test_recon_delta_is_zero_for_a_decoder_that_ignores_z():
    x = torch.linspace(-2, 2, 40)[:, None].expand(-1, 3).contiguous()
    args = dict(loss_fn=ElboLoss(), beta=1.0, batch_size=16, device=torch.device("cpu"))
    ignores = diagnose(QuarterVarianceVAE(uses_z=False), x, torch.ones_like(x), **args)
    assert ignores.recon_sampled == ignores.recon > 0  # the same constant recon either way
    assert ignores.metrics("val")["val/recon_delta_mu_vs_sampled"] == 0.0


def test_recon_delta_of_a_decoder_that_copies_z_is_the_sampling_noise():
    # recon(z) = z and mu = x exactly: decoding mu costs nothing, decoding mu + 0.5 eps costs
    # 0.25 eps² per entry; eps is diagnose's own stream (seed 0), drawn batch by batch.
    x = torch.linspace(-2, 2, 40)[:, None].expand(-1, 3).contiguous()
    args = dict(loss_fn=ElboLoss(), beta=1.0, batch_size=16, device=torch.device("cpu"))
    uses = diagnose(QuarterVarianceVAE(uses_z=True), x, torch.ones_like(x), **args)
    generator = torch.Generator().manual_seed(0)
    eps = torch.cat([torch.randn((n, 1), generator=generator) for n in (16, 16, 8)])
    expected = float((0.25 * eps**2).mean())
    assert uses.recon == pytest.approx(0.0, abs=1e-12)
    delta = uses.metrics("val")["val/recon_delta_mu_vs_sampled"]
    assert delta == pytest.approx(expected, rel=1e-5)
    assert 0.1 < delta < 0.5  # ≈ σ² = 0.25 over 40 draws
    # evaluating repeats exactly and leaves the global random stream where it was
    torch.manual_seed(7)
    next_draws = torch.randn(3)
    torch.manual_seed(7)
    again = diagnose(QuarterVarianceVAE(uses_z=True), x, torch.ones_like(x), **args)
    assert again.recon_sampled == uses.recon_sampled
    assert torch.equal(torch.randn(3), next_draws)


@pytest.mark.parametrize("mode", ["per_dim", "batch_mean", "per_sample"])
def test_expected_kl_floor_is_the_constrained_kl_of_a_collapsed_posterior(mode):
    # Seed 004: "128 dims x 0.2 = 25.6 nats floor", in every free-bits mode. A posterior at
    # the prior (raw KL 0) pays exactly that as its constrained KL.
    class Collapsed(torch.nn.Module):
        latent_dim = 128

        def decode(self, z):
            return torch.zeros(len(z), 3), {}

        def forward(self, x):
            mu = torch.zeros(len(x), self.latent_dim)
            return output(torch.zeros_like(x), mu, torch.zeros_like(mu))

    x = torch.randn(12, 3)
    loss = ElboLoss(free_bits=0.2, free_bits_mode=mode)
    result = diagnose(Collapsed(), x, torch.ones_like(x), loss, 1.0, 4, torch.device("cpu"))
    metrics = result.metrics("val")
    assert metrics["val/expected_kl_floor"] == pytest.approx(25.6)
    assert metrics["val/kl"] == 0.0
    assert metrics["val/kl_constrained"] == pytest.approx(metrics["val/expected_kl_floor"])
    assert metrics["val/recon_delta_mu_vs_sampled"] == 0.0 and metrics["val/z_std"] == 1.0


def test_kl_floor_is_zero_without_free_bits_and_absent_for_a_vqvae(tiny_vqvae):
    assert expected_kl_floor(ElboLoss(), 32) == 0.0
    assert expected_kl_floor(VQLoss(), 32) is None
    values = torch.randn(12, 40, 1)
    result = diagnose(
        tiny_vqvae(codebook_size=8),
        values,
        torch.ones_like(values),
        VQLoss(),
        1.0,
        4,
        torch.device("cpu"),
    )
    names = set(result.metrics("val"))
    assert not names & {"val/z_std", "val/recon_delta_mu_vs_sampled", "val/expected_kl_floor"}


@pytest.mark.parametrize("name", ["mri3d_baseline", "mri3d_dipvae", "mri3d_supervised"])
def test_mri3d_verdicts_ask_seed_004s_strict_au_above_10_and_kl_above_10(compose_config, name):
    criteria = build(compose_config([f"experiment={name}"]).verdict)

    def verdict(n_active, kl):
        mu = torch.zeros(100, 128)
        mu[:, :n_active] = torch.where(torch.arange(100) % 2 == 0, 1.0, -1.0)[:, None]
        return collapse_verdict(kl, mu, torch.zeros(100, 128), 1.0, 0.5, 1.0, criteria)

    assert verdict(11, 10.01)["verdict"] == "healthy"
    on_the_edge = verdict(10, 10.0)  # AU = 10 and KL = 10 nats are not "> 10"
    assert on_the_edge["verdict"] == "collapsed"
    assert on_the_edge["failed"] == "kl, active_units"
