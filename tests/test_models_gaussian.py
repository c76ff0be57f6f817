"""The contract every Gaussian VAE shares through GaussianVAE, checked on each of the five.

Eval mode is deterministic, the posterior log-variance floor holds, one Adam step reaches every
parameter, and a batch of the wrong shape stops with one DataError naming the model.
"""

import re

import pytest
import torch
import torch.nn.functional as F

from vaelab.errors import DataError
from vaelab.models.base import GaussianVAE
from vaelab.models.conv3d import Conv3DVAE
from vaelab.models.conv_lstm import ConvLSTMVAE
from vaelab.models.lstm import LSTMVAE
from vaelab.models.mlp import MLPVAE
from vaelab.models.multiscale_conv1d import MultiScaleConv1DVAE

pytestmark = pytest.mark.usefixtures("one_thread")

VOLUME = (4, 32, 32, 32)  # seed 004's four modalities, shrunk from 128³ for the CPU

# Each model small enough for the CPU, with the shape of one sample. The multi-scale model keeps
# the seed 000 kernels and strides with narrow channels; T = 300 is the shortest its multiday
# branch (first kernel 255) accepts with room to spare.
MODELS = {
    "mlp": (lambda: MLPVAE([300, 3]), (300, 3)),
    "multiscale": (lambda: MultiScaleConv1DVAE([300, 3], base_channels=8), (300, 3)),
    "lstm": (lambda: LSTMVAE(input_shape=[40, 3], latent_dim=4, hidden_dim=16), (40, 3)),
    "conv_lstm": (lambda: ConvLSTMVAE(input_shape=[40, 3], latent_dim=4, lstm_hidden=16), (40, 3)),
    "conv3d": (lambda: Conv3DVAE(list(VOLUME), latent_dim=8, base_channels=4), VOLUME),
    "conv3d_sbd": (
        lambda: Conv3DVAE(list(VOLUME), latent_dim=8, base_channels=4, use_sbd=True),
        VOLUME,
    ),
}
GAUSSIAN_CLASSES = [MLPVAE, MultiScaleConv1DVAE, LSTMVAE, ConvLSTMVAE, Conv3DVAE]


def _kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Closed-form Gaussian KL per sample (Kingma & Welling 2014, appendix B)."""
    return -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1).mean()


@pytest.mark.parametrize("cls", GAUSSIAN_CLASSES, ids=lambda cls: cls.__name__)
def test_models_inherit_the_one_forward_and_encode(cls: type) -> None:
    # A model writes only its posterior and its decoder; a copy of forward or of the batch
    # check in a subclass would drift from the others.
    assert issubclass(cls, GaussianVAE)
    assert {"forward", "encode"}.isdisjoint(vars(cls)), cls.__name__
    assert {"posterior", "decode"} <= set(vars(cls)), cls.__name__


@pytest.mark.parametrize("name", list(MODELS))
def test_eval_mode_is_deterministic(name: str) -> None:
    torch.manual_seed(0)
    make, shape = MODELS[name]
    model = make()
    x = torch.randn(4, *shape)
    train_out = model.train()(x)
    assert not torch.equal(train_out.z, train_out.mu)  # training samples z
    model.eval()
    first, second = model(x), model(x)
    assert torch.equal(first.z, first.mu)
    assert torch.equal(first.recon, second.recon)
    # forward is encode, then decode of the mean: the same numbers through either path.
    mu, logvar = model.encode(x)
    assert torch.equal(first.mu, mu) and torch.equal(first.logvar, logvar)
    assert torch.equal(first.recon, model.decode(mu)[0])


@pytest.mark.parametrize("name", list(MODELS))
def test_logvar_floor_holds(name: str) -> None:
    torch.manual_seed(0)
    make, shape = MODELS[name]
    model = make()
    # Push the raw log-variance far below the floor, so the clamp must act, not just be allowed.
    with torch.no_grad():
        model.fc_logvar.bias.fill_(-50.0)
    x = 1e3 * torch.randn(4, *shape)
    logvar = model(x).logvar
    assert logvar.min().item() >= -6.0
    assert (logvar == -6.0).any()
    model.posterior_logvar_min = None
    assert model(x).logvar.min().item() < -6.0


@pytest.mark.parametrize("name", list(MODELS))
def test_one_adam_step_changes_every_parameter(name: str) -> None:
    torch.manual_seed(0)
    make, shape = MODELS[name]
    model = make()
    x = torch.randn(4, *shape)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    out = model(x)
    # Seed 000 loss shape: merged and per-branch MSE (no branches but the multi-scale model's),
    # plus the closed-form Gaussian KL.
    recon = F.mse_loss(out.recon, x) + sum(F.mse_loss(b, x) for b in out.branches.values())
    (recon + _kl(out.mu, out.logvar)).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert no_grad == []  # every branch, head and layer is wired into the loss
    optimizer.step()
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p, before[n])]
    assert unchanged == []


@pytest.mark.parametrize("name", list(MODELS))
def test_wrong_batch_shape_names_the_model_and_both_shapes(name: str) -> None:
    make, shape = MODELS[name]
    model = make()
    wrong = (2, shape[0] + 1, *shape[1:])
    expected = ", ".join(str(s) for s in shape)
    message = rf"^{type(model).__name__}: expected input of shape \(B, {expected}\), got "
    with pytest.raises(DataError, match=message + re.escape(str(wrong))):
        model(torch.zeros(wrong))
    with pytest.raises(DataError, match=message):
        model.encode(torch.zeros(shape))  # one sample without its batch axis
