"""Shapes, exact decoder lengths, the logvar floor and one training step for every model."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vaelab.errors import DataError
from vaelab.models.mlp import MLPVAE
from vaelab.models.multiscale_conv1d import BRANCHES, Dropout, MultiScaleConv1DVAE

BRANCH_NAMES = ["local", "hourly", "daily", "multiday"]
# Both models on the same (T, C) = (300, 3) input: a short sequence and a flattened one.
BOTH_MODELS = [lambda: _small_conv(300, 3), lambda: MLPVAE([300, 3])]


def _small_conv(n_steps: int = 745, n_channels: int = 7) -> MultiScaleConv1DVAE:
    """The seed 000 kernels and strides with narrow channels, to stay fast on a CPU."""
    return MultiScaleConv1DVAE(input_shape=[n_steps, n_channels], base_channels=8)


def test_multiscale_seed001_shapes() -> None:
    torch.manual_seed(0)
    model = MultiScaleConv1DVAE(input_shape=(745, 7))  # seed 001 sizes: latent 32, 64 channels
    out = model(torch.randn(4, 745, 7))
    assert out.mu.shape == (4, 32) and out.logvar.shape == (4, 32) and out.z.shape == (4, 32)
    assert out.recon.shape == (4, 745, 7)
    assert list(out.branches) == BRANCH_NAMES  # names and order
    for name, branch in out.branches.items():
        assert branch.shape == (4, 745, 7), name
    assert model.latent_dim == 32 and model.input_shape == (745, 7)


def test_multiscale_encoder_branches_and_seed000_lengths() -> None:
    torch.manual_seed(0)
    model = _small_conv()
    x = torch.randn(2, 7, 745)  # channels first, as the branches see it
    # Seed 000's deepest lengths with padding k // 2: 94, 47, 12 and 47 steps.
    expected = {"local": 94, "hourly": 47, "daily": 12, "multiday": 47}
    for name in BRANCH_NAMES:
        branch = getattr(model, f"branch_{name}")
        assert isinstance(branch, nn.Module)
        assert branch(x).shape == (2, 8, expected[name]), name
    assert [name for name, _ in BRANCHES] == BRANCH_NAMES


@pytest.mark.parametrize("n_steps", [745, 512, 300, 1000])
def test_multiscale_decoder_lengths_exact_from_layers_alone(n_steps: int) -> None:
    torch.manual_seed(0)
    model = _small_conv(n_steps, 3)
    for name in BRANCH_NAMES:
        # Measure the encoder's lengths by running its layers, not from the model's formula.
        h = torch.randn(2, 3, n_steps)
        lengths = [n_steps]
        for block in getattr(model, f"branch_{name}"):
            h = block(h)
            lengths.append(h.shape[-1])
        # Run the transposed convolutions one by one: each must land on the input length of the
        # encoder layer it mirrors, with nothing after it that could pad or crop.
        for block, target in zip(model.decoder_branches[name], lengths[-2::-1], strict=True):
            deconv = block[0]
            assert isinstance(deconv, nn.ConvTranspose1d)
            assert 0 <= deconv.output_padding[0] < deconv.stride[0]
            h = block(h)
            assert h.shape[-1] == target, (name, n_steps)
        assert h.shape == (2, 4, n_steps), name  # c/2 channels at exactly T
    model.eval()
    out = model(torch.randn(2, n_steps, 3))
    assert out.recon.shape == (2, n_steps, 3)
    assert all(b.shape == (2, n_steps, 3) for b in out.branches.values())


@pytest.mark.parametrize("n_steps", [745, 512, 300, 1000])
def test_multiscale_decoder_polyphase_equals_conv_transpose1d(n_steps: int) -> None:
    # The decoder computes each ConvTranspose1d as interleaved stride-1 convolutions (for
    # speed): output and gradients must be those of F.conv_transpose1d with the same weights.
    torch.manual_seed(0)
    model = _small_conv(n_steps, 3)
    for name in BRANCH_NAMES:
        input_lengths = model.lengths[name][:0:-1]  # deepest first, as the decoder runs
        for block, length in zip(model.decoder_branches[name], input_lengths, strict=True):
            deconv = block[0]
            x = torch.randn(2, deconv.in_channels, length, requires_grad=True)
            expected = F.conv_transpose1d(
                x,
                deconv.weight,
                deconv.bias,
                deconv.stride,
                deconv.padding,
                deconv.output_padding,
            )
            got = deconv(x)
            assert got.shape == expected.shape, name
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
            grad = torch.randn_like(expected)
            inputs = (x, deconv.weight, deconv.bias)
            for g, e in zip(
                torch.autograd.grad(got, inputs, grad),
                torch.autograd.grad(expected, inputs, grad),
                strict=True,
            ):
                torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dropout_draws_the_masks_of_nn_dropout(dtype) -> None:
    # The faster CPU dropout must give nn.Dropout's outputs bit for bit, from the same seed,
    # and leave the generator where nn.Dropout leaves it.
    x = torch.randn(4, 8, 745, dtype=dtype)
    torch.manual_seed(3)
    expected, expected_next = nn.Dropout(0.2)(x), torch.rand(5)
    torch.manual_seed(3)
    got, got_next = Dropout(0.2)(x), torch.rand(5)
    assert torch.equal(got, expected) and torch.equal(got_next, expected_next)
    assert torch.equal(Dropout(0.2).eval()(x), x)


def test_multiscale_other_channels_and_default_width() -> None:
    torch.manual_seed(0)
    model = MultiScaleConv1DVAE(input_shape=[512, 3], latent_dim=16)
    out = model(torch.randn(3, 512, 3))
    assert out.recon.shape == (3, 512, 3) and out.mu.shape == (3, 16)
    assert {k: tuple(v.shape) for k, v in out.branches.items()} == {
        k: (3, 512, 3) for k in BRANCH_NAMES
    }


@pytest.mark.parametrize("make", BOTH_MODELS, ids=["multiscale", "mlp"])
def test_logvar_floor_holds(make) -> None:
    torch.manual_seed(0)
    model = make()
    # Push the raw log-variance far below the floor, so the clamp must act, not just be allowed.
    with torch.no_grad():
        model.fc_logvar.bias.fill_(-50.0)
    x = 1e3 * torch.randn(4, 300, 3)
    logvar = model(x).logvar
    assert logvar.min().item() >= -6.0
    assert (logvar == -6.0).any()
    model.posterior_logvar_min = None
    assert model(x).logvar.min().item() < -6.0


@pytest.mark.parametrize("make", BOTH_MODELS, ids=["multiscale", "mlp"])
def test_eval_mode_is_deterministic(make) -> None:
    torch.manual_seed(0)
    model = make()
    x = torch.randn(4, 300, 3)
    model.train()
    train_out = model(x)
    assert not torch.equal(train_out.z, train_out.mu)  # training samples z
    model.eval()
    first, second = model(x), model(x)
    assert torch.equal(first.z, first.mu)
    assert torch.equal(first.recon, second.recon)


@pytest.mark.parametrize("make", BOTH_MODELS, ids=["multiscale", "mlp"])
def test_one_adam_step_changes_every_parameter(make) -> None:
    torch.manual_seed(0)
    model = make()
    x = torch.randn(8, 300, 3)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    out = model(x)
    # Seed 000 loss shape: merged and per-branch MSE, plus the closed-form Gaussian KL
    # (Kingma & Welling 2014, appendix B).
    recon = F.mse_loss(out.recon, x) + sum(F.mse_loss(b, x) for b in out.branches.values())
    kl = -0.5 * (1 + out.logvar - out.mu.pow(2) - out.logvar.exp()).sum(1).mean()
    (recon + kl).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert no_grad == []  # every branch and head is wired into the loss
    optimizer.step()
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p, before[n])]
    assert unchanged == []


def test_mlp_vector_and_sequence_inputs() -> None:
    torch.manual_seed(0)
    vector = MLPVAE(input_shape=[20], latent_dim=4, hidden_dims=[16, 8])
    out = vector(torch.randn(5, 20))
    assert out.recon.shape == (5, 20) and out.mu.shape == (5, 4) and out.branches == {}
    sequence = MLPVAE(input_shape=(10, 3), latent_dim=4, hidden_dims=[16])
    out = sequence(torch.randn(5, 10, 3))
    assert out.recon.shape == (5, 10, 3) and out.logvar.shape == (5, 4)
    assert sequence.encoder[0][0].in_features == 30  # flattened T * C
    with pytest.raises(DataError, match="expected input"):
        sequence(torch.randn(5, 30))


def test_multiscale_rejects_short_or_flat_input() -> None:
    # T=200 is shorter than the multiday branch's first kernel (255); T=300 is accepted above.
    with pytest.raises(DataError, match=r"'multiday' \(kernel=255\)"):
        MultiScaleConv1DVAE(input_shape=[200, 7])
    with pytest.raises(DataError, match="input_shape must be"):
        MultiScaleConv1DVAE(input_shape=[745])
    model = _small_conv(300, 3)
    with pytest.raises(DataError, match="expected input"):
        model(torch.randn(2, 301, 3))  # output paddings are fixed for T=300


def test_mlp_seed002_parameter_counts() -> None:
    # Seed 002: input 2772 -> 1024 -> 512 -> latent 256 and back. Its Keras summary counts four
    # numbers per BatchNormalization unit (gamma, beta, moving mean, moving variance); PyTorch
    # keeps the last two as buffers (running_mean, running_var), so they are added here.
    model = MLPVAE(input_shape=[2772], latent_dim=256, hidden_dims=[1024, 512])

    def keras_count(*modules: nn.Module) -> tuple[int, int]:
        params = sum(p.numel() for m in modules for p in m.parameters())
        stats = sum(
            b.numel()
            for m in modules
            for name, b in m.named_buffers()
            if name.endswith(("running_mean", "running_var"))
        )
        return params + stats, params

    encoder_total, encoder_trainable = keras_count(model.encoder, model.fc_mu, model.fc_logvar)
    decoder_total, decoder_trainable = keras_count(model.decoder)
    assert encoder_total == 3_633_152
    assert decoder_total == 3_504_340
    # Trainable weights: the seed's totals minus 2 * (1024 + 512) moving statistics each.
    assert encoder_trainable == 3_633_152 - 3_072
    assert decoder_trainable == 3_504_340 - 3_072
