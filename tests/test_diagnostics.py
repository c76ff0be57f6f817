"""Active units, mutual information and the collapse verdict on latents whose answer is known."""

import math

import pytest
import torch

from vaelab.diagnostics import (
    active_units,
    codebook_usage,
    codebook_verdict,
    collapse_verdict,
    diagnose,
    mutual_information,
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


def test_mi_is_chunked_without_changing_the_answer():
    torch.manual_seed(1)
    mu, logvar = torch.randn(600, 3), torch.randn(600, 3) - 1
    full = mutual_information(mu, logvar)
    assert 0 < full <= math.log(600)
    assert mutual_information(mu, logvar) == full  # its own generator: repeatable


def test_verdict_flags_each_seed_000_criterion():
    torch.manual_seed(0)
    healthy = collapse_verdict(2.0, torch.randn(100, 4), torch.full((100, 4), -1.0))
    assert healthy["verdict"] == "healthy"
    low_kl = collapse_verdict(0.001, torch.randn(100, 4), torch.zeros(100, 4))
    assert low_kl["verdict"] == "collapsed" and not low_kl["kl_above_0.01"]
    constant_mu = collapse_verdict(2.0, torch.full((100, 4), 0.5), torch.zeros(100, 4))
    assert constant_mu["verdict"] == "collapsed" and not constant_mu["mu_std_above_0.1"]
    tiny_var = collapse_verdict(2.0, torch.randn(100, 4), torch.full((100, 4), -7.0))
    assert tiny_var["verdict"] == "collapsed" and not tiny_var["logvar_mean_above_-5"]


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
    assert codebook_verdict(one_code, recon=0.1, recon_z0=1.0)["verdict"] == "collapsed"
    many = torch.arange(200).reshape(50, 4) % 7
    assert codebook_verdict(many, recon=0.1, recon_z0=1.0)["verdict"] == "healthy"
    ignored = codebook_verdict(many, recon=0.99, recon_z0=1.0)
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
