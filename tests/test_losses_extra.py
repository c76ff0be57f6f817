"""Capacity control, DIP-VAE-II and the VQ-VAE against values computed by hand."""

import math
import re

import hydra
import pytest
import torch
from conftest import CONF

from vaelab.diagnostics import codebook_usage, evaluate
from vaelab.errors import ConfigError
from vaelab.losses import (
    CapacityLoss,
    DipVaeLoss,
    ElboLoss,
    ReconstructionLoss,
    VQLoss,
    code_perplexity,
    dip_covariance,
    dip_penalties,
)
from vaelab.models.base import VAEOutput
from vaelab.models.vqvae import DETERMINISTIC_LOGVAR, VQVAE

NEW_YAMLS = ["model/vqvae.yaml", "loss/capacity.yaml", "loss/dip_vae.yaml", "loss/vq.yaml"]


def output(recon, mu, logvar, branches=None):
    return VAEOutput(recon=recon, mu=mu, logvar=logvar, z=mu, branches=branches or {})


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
KL = 1.0 + math.log(2.0)  # 0.5 (1 + .5 - 1 + ln 2) + 0.5 (2 + .5 - 1 + ln 2)


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
    assert terms.kl_raw.item() == pytest.approx(KL)
    assert terms.total.item() == pytest.approx(KL + penalty, rel=1e-6)
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


def tiny_vq(**kwargs) -> VQVAE:
    torch.manual_seed(0)
    settings = dict(n_latents=2, code_dim=2, codebook_size=4, channels=[4, 8]) | kwargs
    return VQVAE([40, 1], **settings)


def test_nearest_code_on_a_hand_built_codebook():
    model = tiny_vq()
    model.codebook.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]))
    z_e = torch.tensor([[[0.9, 0.1], [0.1, 0.2]], [[-0.7, -0.6], [0.2, 0.7]]])
    assert model.nearest_codes(z_e).tolist() == [[1, 0], [3, 2]]
    torch.manual_seed(1)
    z_e = torch.randn(8, 2, 2)
    brute = torch.cdist(z_e.reshape(-1, 2), model.codebook).argmin(dim=1).view(8, 2)
    assert torch.equal(model.nearest_codes(z_e), brute)


@pytest.mark.parametrize("shape", [(745, 7), (40, 1)])
def test_vqvae_shapes(shape):
    torch.manual_seed(0)
    model = VQVAE(shape, n_latents=8, code_dim=16, codebook_size=64)
    out = model(torch.randn(3, *shape))
    assert model.latent_dim == 128
    assert out.recon.shape == (3, *shape)
    assert out.mu.shape == out.logvar.shape == out.z.shape == (3, 128)
    assert torch.all(out.logvar == DETERMINISTIC_LOGVAR)
    codes = out.extras["codes"]
    assert codes.shape == (3, 8) and codes.dtype == torch.long
    assert 0 <= codes.min() and codes.max() < 64
    # mu is the quantised code: the codebook entries of `codes`, flattened (in eval mode, as
    # a training-mode pass moves the codebook after coding the batch)
    out = model.eval()(torch.randn(3, *shape))
    assert torch.equal(out.mu, model.codebook[out.extras["codes"]].flatten(1))
    assert torch.allclose(out.z, out.mu)  # z: the same value, with the straight-through gradient
    assert out.extras["kl"].item() == pytest.approx(8 * math.log(64))
    recon_z0, branches = model.decode(torch.zeros(1, model.latent_dim))
    assert recon_z0.shape == (1, *shape) and branches == {}


def test_straight_through_gradient_reaches_the_encoder():
    model = tiny_vq()
    x = torch.randn(6, 40, 1)
    out = model(x)
    # Only the reconstruction: the quantiser's argmin has no gradient of its own, so the
    # encoder hears about it only through the straight-through copy of the decoder's gradient.
    ((out.recon - x) ** 2).mean().backward()
    for layer in (model.encoder[0][0], model.to_codes):
        assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0


def test_vq_loss_terms_and_beta_is_ignored():
    model = tiny_vq()
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


def test_codebook_usage_and_perplexity_by_hand():
    uniform = torch.tensor([[0, 1], [2, 3]])
    assert codebook_usage(uniform) == 4
    assert code_perplexity(uniform).item() == pytest.approx(4.0)
    skewed = torch.tensor([[5, 5], [5, 9]])  # p = (3/4, 1/4)
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert codebook_usage(skewed) == 2
    assert code_perplexity(skewed).item() == pytest.approx(math.exp(entropy))
    assert code_perplexity(torch.zeros(3, 2, dtype=torch.long)).item() == pytest.approx(1.0)


def test_ema_update_by_hand():
    model = tiny_vq(codebook_size=2, ema_decay=0.5, dead_code_threshold=0.0)
    model.codebook.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0]]))
    model.ema_sum.copy_(model.codebook)  # counts start at 1: sum = entry
    z_e = torch.tensor([[[0.2, 0.0], [0.4, 0.0], [1.0, 1.0]]])
    codes = model.nearest_codes(z_e)
    assert codes.tolist() == [[0, 0, 1]]
    model._update_codebook(z_e, codes)
    # count: .5 * 1 + .5 * (2, 1) = (1.5, 1); sum: .5 * e + .5 * (0.6, 0 | 1, 1)
    assert model.ema_count.tolist() == pytest.approx([1.5, 1.0])
    assert torch.allclose(model.codebook, torch.tensor([[0.2, 0.0], [1.0, 0.5]]))


def test_dead_codes_restart_on_batch_outputs():
    model = tiny_vq(codebook_size=3, dead_code_threshold=1.0)
    model.codebook.copy_(torch.tensor([[0.0, 0.0], [50.0, 50.0], [-50.0, 50.0]]))
    model.ema_sum.copy_(model.codebook)
    z_e = torch.randn(1, 16, 2) * 0.1  # every vector is nearest to entry 0
    model._update_codebook(z_e, model.nearest_codes(z_e))
    assert model.ema_count[1:].tolist() == [1.0, 1.0]  # 0.99 < 1: restarted at the threshold
    for entry in model.codebook[1:]:  # each dead entry now sits on one of the batch's outputs
        assert (z_e[0] - entry).abs().sum(dim=1).min() == 0


def test_one_step_changes_encoder_decoder_and_codebook_but_eval_does_not():
    model = tiny_vq()
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


def test_evaluate_reports_codebook_metrics_of_a_vqvae():
    model = tiny_vq(codebook_size=8)
    values = torch.randn(30, 40, 1)
    masks = torch.ones_like(values)
    codebook = model.codebook.clone()
    result = evaluate(model, values, masks, VQLoss(), 1.0, 8, torch.device("cpu"))
    codes = model.nearest_codes(model.encode_continuous(values))  # model is in eval mode now
    assert torch.equal(result.codes, codes)
    assert torch.equal(model.codebook, codebook)
    metrics = result.metrics("val")
    assert metrics["val/codebook_usage"] == len(torch.unique(codes)) >= 1
    assert 1.0 <= metrics["val/codebook_perplexity"] <= metrics["val/codebook_usage"] + 1e-6
    assert metrics["val/kl"] == pytest.approx(2 * math.log(8))
    assert metrics["val/kl_constrained"] == 0.0
    assert {"val/commitment", "val/codebook_loss", "val/perplexity"} <= set(metrics)


def test_gaussian_evaluation_has_no_codebook_metrics():
    class Identity(torch.nn.Module):
        latent_dim = 3

        def decode(self, z):
            return z, {}

        def forward(self, x):
            return output(x, x, torch.zeros_like(x))

    x = torch.randn(10, 3)
    result = evaluate(Identity(), x, torch.ones_like(x), ElboLoss(), 1.0, 4, torch.device("cpu"))
    assert result.codes is None
    assert not any("codebook" in name for name in result.metrics("val"))


# --- configs -----------------------------------------------------------------------------------


def build(node, **kwargs):
    with hydra.utils.execution_whitelist(["vaelab.*"]):
        return hydra.utils.instantiate(node, **kwargs)


@pytest.mark.parametrize(
    ("option", "cls"), [("capacity", CapacityLoss), ("dip_vae", DipVaeLoss), ("vq", VQLoss)]
)
def test_new_loss_configs_build(compose_config, option, cls):
    cfg = compose_config([f"loss={option}"])
    loss = build(cfg.loss)
    assert type(loss) is cls
    for key, value in cfg.loss.items():
        if key != "_target_":
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
def test_new_yamls_comment_every_key(path):
    lines = (CONF / path).read_text().splitlines()
    assert lines[0].startswith("#")  # the header naming the paper or seed
    for i, line in enumerate(lines):
        if re.match(r"^[a-z_]+:", line) and not line.startswith("_target_"):
            assert "#" in line or lines[i - 1].startswith("#"), line


def test_vqvae_state_dict_reloads_identically():
    model = tiny_vq()
    model(torch.randn(8, 40, 1))  # one training-mode pass moves the EMA buffers
    clone = tiny_vq(dead_code_threshold=0.5)
    clone.load_state_dict(model.state_dict())  # the codebook travels with the checkpoint
    x = torch.randn(5, 40, 1)
    assert torch.equal(model.eval()(x).recon, clone.eval()(x).recon)
