"""The VQ-VAE model (van den Oord et al. 2017): nearest codes, shapes, the straight-through
gradient, the EMA codebook and its dead-code restarts, and a checkpoint round trip.

Its loss (VQLoss) and its diagnostics are tested with the other losses.
"""

import math

import pytest
import torch

from vaelab.errors import DataError
from vaelab.models.vqvae import DETERMINISTIC_LOGVAR, VQVAE


def test_nearest_code_on_a_hand_built_codebook(tiny_vqvae) -> None:
    model = tiny_vqvae()
    model.codebook.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]))
    z_e = torch.tensor([[[0.9, 0.1], [0.1, 0.2]], [[-0.7, -0.6], [0.2, 0.7]]])
    assert model.nearest_codes(z_e).tolist() == [[1, 0], [3, 2]]
    torch.manual_seed(1)
    z_e = torch.randn(8, 2, 2)
    brute = torch.cdist(z_e.reshape(-1, 2), model.codebook).argmin(dim=1).view(8, 2)
    assert torch.equal(model.nearest_codes(z_e), brute)


@pytest.mark.parametrize("shape", [(745, 7), (40, 1)])
def test_vqvae_shapes(shape: tuple[int, int]) -> None:
    torch.manual_seed(0)
    model = VQVAE(shape, n_latents=8, code_dim=16, codebook_size=64)
    x = torch.randn(3, *shape)
    codebook = model.codebook.clone()  # the codebook the batch is coded with, before the EMA step
    out = model(x)
    assert model.latent_dim == 128
    assert out.recon.shape == (3, *shape)
    assert out.mu.shape == out.logvar.shape == out.z.shape == (3, 128)
    assert torch.all(out.logvar == DETERMINISTIC_LOGVAR)
    codes = out.extras["codes"]
    assert codes.shape == (3, 8) and codes.dtype == torch.long
    # Each code is the index of the nearest entry, by brute force over all 64 (an index in
    # [0, 64) alone would hold for any argmin).
    z_e = model.encode_continuous(x).detach().reshape(-1, 16)
    assert torch.equal(codes, torch.cdist(z_e, codebook).argmin(dim=1).view(3, 8))
    # mu is the quantised code: the codebook entries of `codes`, flattened (in eval mode, as
    # a training-mode pass moves the codebook after coding the batch)
    out = model.eval()(torch.randn(3, *shape))
    assert torch.equal(out.mu, model.codebook[out.extras["codes"]].flatten(1))
    assert torch.allclose(out.z, out.mu)  # z: the same value, with the straight-through gradient
    assert out.extras["kl"].item() == pytest.approx(8 * math.log(64))
    recon_z0, branches = model.decode(torch.zeros(1, model.latent_dim))
    assert recon_z0.shape == (1, *shape) and branches == {}


def test_straight_through_gradient_reaches_the_encoder(tiny_vqvae) -> None:
    model = tiny_vqvae()
    x = torch.randn(6, 40, 1)
    out = model(x)
    # Only the reconstruction: the quantiser's argmin has no gradient of its own, so the
    # encoder hears about it only through the straight-through copy of the decoder's gradient.
    ((out.recon - x) ** 2).mean().backward()
    for layer in (model.encoder[0][0], model.to_codes):
        assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0


def test_ema_update_by_hand(tiny_vqvae) -> None:
    model = tiny_vqvae(codebook_size=2, ema_decay=0.5, dead_code_threshold=0.0)
    model.codebook.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0]]))
    model.ema_sum.copy_(model.codebook)  # counts start at 1: sum = entry
    z_e = torch.tensor([[[0.2, 0.0], [0.4, 0.0], [1.0, 1.0]]])
    codes = model.nearest_codes(z_e)
    assert codes.tolist() == [[0, 0, 1]]
    model._update_codebook(z_e, codes)
    # count: .5 * 1 + .5 * (2, 1) = (1.5, 1); sum: .5 * e + .5 * (0.6, 0 | 1, 1)
    assert model.ema_count.tolist() == pytest.approx([1.5, 1.0])
    assert torch.allclose(model.codebook, torch.tensor([[0.2, 0.0], [1.0, 0.5]]))


def test_dead_codes_restart_on_batch_outputs(tiny_vqvae) -> None:
    model = tiny_vqvae(codebook_size=3, dead_code_threshold=1.0)
    model.codebook.copy_(torch.tensor([[0.0, 0.0], [50.0, 50.0], [-50.0, 50.0]]))
    model.ema_sum.copy_(model.codebook)
    z_e = torch.randn(1, 16, 2) * 0.1  # every vector is nearest to entry 0
    model._update_codebook(z_e, model.nearest_codes(z_e))
    assert model.ema_count[1:].tolist() == [1.0, 1.0]  # 0.99 < 1: restarted at the threshold
    for entry in model.codebook[1:]:  # each dead entry now sits on one of the batch's outputs
        assert (z_e[0] - entry).abs().sum(dim=1).min() == 0


def test_vqvae_state_dict_reloads_identically(tiny_vqvae) -> None:
    model = tiny_vqvae()
    model(torch.randn(8, 40, 1))  # one training-mode pass moves the EMA buffers
    clone = tiny_vqvae(dead_code_threshold=0.5)
    clone.load_state_dict(model.state_dict())  # the codebook travels with the checkpoint
    x = torch.randn(5, 40, 1)
    assert torch.equal(model.eval()(x).recon, clone.eval()(x).recon)


def test_wrong_batch_shape_is_the_shared_data_error(tiny_vqvae) -> None:
    # The same check and message as every Gaussian model's (vaelab.models.base).
    model = tiny_vqvae()
    with pytest.raises(DataError, match=r"^VQVAE: expected input of shape \(B, 40, 1\), got"):
        model(torch.zeros(2, 41, 1))
    with pytest.raises(DataError, match=r"\(B, 40, 1\), got \(40, 1\)$"):
        model.encode(torch.zeros(40, 1))
