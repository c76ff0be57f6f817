"""The LSTM and Conv1D + LSTM VAEs (seeds 000, 003): shapes, exact lengths, bad settings."""

import pytest
import torch
from torch import nn

from vaelab.errors import ConfigError, DataError
from vaelab.models.conv_lstm import ConvLSTMVAE
from vaelab.models.lstm import LSTMVAE

pytestmark = pytest.mark.usefixtures("one_thread")


def _small_lstm() -> LSTMVAE:
    """A two-layer LSTM-VAE narrow enough for one CPU thread."""
    return LSTMVAE(input_shape=[40, 3], latent_dim=4, hidden_dim=16)


def _small_conv_lstm() -> ConvLSTMVAE:
    """The seed 003 Conv1D + LSTM layout with a narrow LSTM."""
    return ConvLSTMVAE(input_shape=[40, 3], latent_dim=4, lstm_hidden=16)


def test_lstm_shapes() -> None:
    torch.manual_seed(0)
    model = LSTMVAE(input_shape=(50, 7), latent_dim=6, hidden_dim=16, n_layers=2)
    x = torch.randn(3, 50, 7)
    mu, logvar = model.encode(x)
    assert mu.shape == (3, 6) and logvar.shape == (3, 6)
    recon, branches = model.decode(mu)
    assert recon.shape == (3, 50, 7) and branches == {}
    out = model(x)
    assert out.recon.shape == (3, 50, 7) and out.z.shape == (3, 6) and out.branches == {}
    assert model.latent_dim == 6 and model.input_shape == (50, 7)
    # Defaults are seed 000's LSTM: hidden 128, two layers.
    default = LSTMVAE(input_shape=(745, 7))
    assert (default.encoder.hidden_size, default.encoder.num_layers) == (128, 2)
    assert (default.decoder.hidden_size, default.decoder.num_layers) == (128, 2)


def test_lstm_decoder_depends_on_z_at_every_step() -> None:
    torch.manual_seed(0)
    model = _small_lstm().eval()
    z = torch.zeros(1, 4)
    other = z.clone()
    other[0, 0] = 3.0
    a, _ = model.decode(z)
    b, _ = model.decode(other)
    # z sets the initial state and is fed at each step, so even the last step must move.
    assert (a - b).abs().amax(dim=-1).min().item() > 1e-4


def test_lstm_bad_settings() -> None:
    with pytest.raises(DataError, match=r"input_shape must be \(T, C\)"):
        LSTMVAE(input_shape=[745])
    with pytest.raises(ConfigError, match="model.n_layers"):
        LSTMVAE(input_shape=[745, 7], n_layers=0)
    with pytest.raises(DataError, match="expected input"):
        _small_lstm()(torch.randn(2, 41, 3))


def test_conv_lstm_seed003_shape_flow() -> None:
    torch.manual_seed(0)
    model = ConvLSTMVAE(input_shape=(256, 4))  # seed 003: HR, SpO2, sin, cos over 256 steps
    x = torch.randn(2, 256, 4)
    features = model.encoder_conv(x.transpose(1, 2))
    assert features.shape == (2, 32, 64)  # seed 003: (B, 4, 256) -> Conv -> (B, 32, 64)
    lstm = model.encoder_lstm
    assert (lstm.input_size, lstm.hidden_size, lstm.num_layers) == (32, 64, 2)
    assert lstm.dropout == 0.5
    mu, logvar = model.encode(x)
    assert mu.shape == (2, 32) and logvar.shape == (2, 32)  # seed 003's 32-dim embedding
    recon, branches = model.decode(mu)
    assert recon.shape == (2, 256, 4) and branches == {}
    out = model(x)
    assert out.recon.shape == (2, 256, 4) and out.z.shape == (2, 32)


@pytest.mark.parametrize("n_steps", [256, 300, 97, 5])
def test_conv_lstm_reaches_exactly_t(n_steps: int) -> None:
    torch.manual_seed(0)
    model = ConvLSTMVAE(input_shape=(n_steps, 3), latent_dim=4, lstm_hidden=8)
    # Measure the encoder lengths by running its convs, not from the model's own formula.
    h = torch.randn(2, 3, n_steps)
    lengths = [n_steps]
    for layer in model.encoder_conv:
        h = layer(h)
        if isinstance(layer, nn.Conv1d):
            lengths.append(h.shape[-1])
    assert lengths[-1] < n_steps  # the convs do shorten the sequence
    # Each transposed conv must land on the length its mirrored conv read, nothing cropping.
    h = torch.randn(2, 32, lengths[-1])
    deconvs = [m for m in model.decoder_conv if isinstance(m, nn.ConvTranspose1d)]
    for deconv, target in zip(deconvs, lengths[-2::-1], strict=True):
        assert 0 <= deconv.output_padding[0] < deconv.stride[0]
        h = deconv(h)
        assert h.shape[-1] == target
    assert h.shape == (2, 3, n_steps)
    assert model.eval()(torch.randn(2, n_steps, 3)).recon.shape == (2, n_steps, 3)


def test_conv_lstm_bad_settings() -> None:
    with pytest.raises(DataError, match="model.kernel=7 is larger than the sequence length 5"):
        ConvLSTMVAE(input_shape=[5, 4], kernel=7)
    with pytest.raises(ConfigError, match="model.kernel must be odd"):
        ConvLSTMVAE(input_shape=[256, 4], kernel=4)
    with pytest.raises(ConfigError, match="model.conv_channels"):
        ConvLSTMVAE(input_shape=[256, 4], conv_channels=[])
    with pytest.raises(DataError, match=r"input_shape must be \(T, C\)"):
        ConvLSTMVAE(input_shape=[4, 32, 32, 32])
    with pytest.raises(DataError, match="expected input"):
        _small_conv_lstm()(torch.randn(2, 40, 4))


def test_conv_lstm_without_lstm_is_seed_003s_conv_only_variant() -> None:
    torch.manual_seed(0)
    model = ConvLSTMVAE(input_shape=(256, 4), use_lstm=False)
    assert not any(isinstance(m, nn.LSTM) for m in model.modules())
    # Seed 003 "Before": Conv1d(.->16) -> Conv1d(16->32) -> Flatten(2048) -> Linear(2048->32)
    assert (model.fc_mu.in_features, model.fc_mu.out_features) == (32 * 64, 32)
    assert (model.fc_decode.in_features, model.fc_decode.out_features) == (32, 32 * 64)
    x = torch.randn(3, 256, 4)
    out = model(x)
    assert out.recon.shape == (3, 256, 4) and out.mu.shape == out.z.shape == (3, 32)
    (out.recon.square().mean() + out.mu.square().mean() + out.logvar.mean()).backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    # The default keeps the LSTMs: the two variants share the conv layers' names and shapes.
    with_lstm = ConvLSTMVAE(input_shape=(256, 4))
    assert isinstance(with_lstm.encoder_lstm, nn.LSTM) and with_lstm.use_lstm
    conv = {k: v.shape for k, v in model.state_dict().items() if "_conv." in k}
    assert conv == {k: v.shape for k, v in with_lstm.state_dict().items() if "_conv." in k}


@pytest.mark.parametrize("n_steps", [97, 5])
def test_conv_only_variant_reaches_exactly_t(n_steps: int) -> None:
    model = ConvLSTMVAE(input_shape=(n_steps, 3), latent_dim=4, use_lstm=False)
    assert model.eval()(torch.randn(2, n_steps, 3)).recon.shape == (2, n_steps, 3)
