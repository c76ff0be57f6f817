"""The LSTM, Conv1D+LSTM and 3D conv VAEs: shapes, exact lengths, SBD coordinates, one step."""

import inspect

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import execution_whitelist, instantiate
from omegaconf import OmegaConf
from torch import nn

from vaelab.errors import ConfigError, DataError
from vaelab.models.conv3d import Conv3DVAE
from vaelab.models.conv_lstm import ConvLSTMVAE
from vaelab.models.lstm import LSTMVAE

VOLUME = (4, 32, 32, 32)  # seed 004's four modalities, shrunk from 128³ for the CPU


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Run this module's tiny models on one thread, then restore the count.

    On the shared 2-core machine, OpenMP's second thread mostly waits at barriers for a core
    another process holds: a step of a 40-step LSTM took 1-5 s on two threads, 0.01 s on one.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _small_lstm() -> LSTMVAE:
    return LSTMVAE(input_shape=[40, 3], latent_dim=4, hidden_dim=16)


def _small_conv_lstm() -> ConvLSTMVAE:
    return ConvLSTMVAE(input_shape=[40, 3], latent_dim=4, lstm_hidden=16)


def _small_conv3d(use_sbd: bool) -> Conv3DVAE:
    return Conv3DVAE(input_shape=list(VOLUME), latent_dim=8, base_channels=4, use_sbd=use_sbd)


# Each factory with the input shape of one sample.
MODELS = {
    "lstm": (_small_lstm, (40, 3)),
    "conv_lstm": (_small_conv_lstm, (40, 3)),
    "conv3d": (lambda: _small_conv3d(False), VOLUME),
    "conv3d_sbd": (lambda: _small_conv3d(True), VOLUME),
}


def _kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Closed-form Gaussian KL per sample (Kingma & Welling 2014, appendix B)."""
    return -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1).mean()


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


@pytest.mark.parametrize("use_sbd", [False, True], ids=["transposed", "sbd"])
def test_conv3d_shapes(use_sbd: bool) -> None:
    torch.manual_seed(0)
    model = Conv3DVAE(input_shape=VOLUME, use_sbd=use_sbd)
    assert model.n_down == 3 and model.grid == (4, 4, 4)  # 32³ -> 4³
    x = torch.randn(2, *VOLUME)
    assert model.encoder(x).shape == (2, 8 * 2**3, 4, 4, 4)
    mu, logvar = model.encode(x)
    assert mu.shape == (2, 32) and logvar.shape == (2, 32)
    recon, branches = model.decode(mu)
    assert recon.shape == (2, *VOLUME) and branches == {}
    out = model(x)
    assert out.recon.shape == (2, *VOLUME) and out.z.shape == (2, 32)
    assert model.input_shape == VOLUME and model.latent_dim == 32
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert norms and not any(isinstance(m, nn.BatchNorm3d) for m in model.modules())
    assert all(m.num_channels % m.num_groups == 0 for m in norms)


def test_conv3d_non_cubic_volume() -> None:
    torch.manual_seed(0)
    model = Conv3DVAE(input_shape=(2, 16, 32, 24), latent_dim=4, base_channels=4, use_sbd=True)
    assert model.n_down == 2 and model.grid == (4, 8, 6)  # 16 cannot halve a third time
    assert model(torch.randn(1, 2, 16, 32, 24)).recon.shape == (1, 2, 16, 32, 24)


def test_sbd_coordinate_channels_span_minus_one_to_one() -> None:
    torch.manual_seed(0)
    model = Conv3DVAE(input_shape=(1, 16, 32, 64), latent_dim=5, base_channels=4, use_sbd=True)
    assert model.grid == (4, 8, 16)
    seen: list[torch.Tensor] = []
    first_conv = model.decoder_input[0]
    handle = first_conv.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    z = torch.randn(2, 5)
    model.decode(z)
    handle.remove()
    (h,) = seen
    assert h.shape == (2, 5 + 3, 4, 8, 16)
    # The first channels are z itself, the same at every voxel.
    assert torch.equal(h[:, :5], z[:, :, None, None, None].expand(-1, -1, 4, 8, 16))
    coords = h[:, 5:]
    assert coords.min().item() == -1.0 and coords.max().item() == 1.0
    for axis in range(3):  # channel `axis` runs -1 -> 1 along that spatial axis only
        channel = coords[0, axis]
        line = channel.movedim(axis, 0)[:, 0, 0]
        assert line[0].item() == -1.0 and line[-1].item() == 1.0
        assert (line.diff() > 0).all()
        assert torch.equal(
            channel, line.view([-1 if a == axis else 1 for a in range(3)]).expand(4, 8, 16)
        )


@pytest.mark.parametrize("name", list(MODELS))
def test_eval_mode_is_deterministic(name: str) -> None:
    torch.manual_seed(0)
    make, shape = MODELS[name]
    model = make()
    x = torch.randn(2, *shape)
    train_out = model.train()(x)
    assert not torch.equal(train_out.z, train_out.mu)  # training samples z
    model.eval()
    first, second = model(x), model(x)
    assert torch.equal(first.z, first.mu)
    assert torch.equal(first.recon, second.recon)


@pytest.mark.parametrize("name", list(MODELS))
def test_logvar_floor_holds(name: str) -> None:
    torch.manual_seed(0)
    make, shape = MODELS[name]
    model = make()
    # Push the raw log-variance far below the floor, so the clamp must act, not just be allowed.
    with torch.no_grad():
        model.fc_logvar.bias.fill_(-50.0)
    x = torch.randn(2, *shape)
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
    x = torch.randn(2, *shape)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    out = model(x)
    (F.mse_loss(out.recon, x) + _kl(out.mu, out.logvar)).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert no_grad == []  # every layer is wired into the loss
    optimizer.step()
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p, before[n])]
    assert unchanged == []


def test_conv3d_128_cubed_builds_with_seed004_grid() -> None:
    model = Conv3DVAE(input_shape=(4, 128, 128, 128))
    assert model.n_down == 4 and model.grid == (8, 8, 8)  # seed 004: 128³ -> 8³
    assert model.fc_mu.in_features == 128 * 8**3  # 8 * 2**4 channels at 8³

    # The count by hand: stem, four residual blocks, two heads, the decoder's linear map, four
    # transposed convs, output conv. GroupNorm adds 2 per channel; only the Linears and the
    # output conv carry biases.
    def residual(c_in: int, c_out: int) -> int:
        return 27 * c_in * c_out + 27 * c_out**2 + c_in * c_out + 3 * 2 * c_out

    def up(c_in: int, c_out: int) -> int:
        return 64 * c_in * c_out + 2 * c_out

    flat = 128 * 8**3
    expected = (
        (27 * 4 * 8 + 2 * 8)
        + sum(residual(c, 2 * c) for c in (8, 16, 32, 64))
        + 2 * (flat * 32 + 32)
        + (32 * flat + flat)
        + sum(up(2 * c, c) for c in (8, 16, 32, 64))
        + (27 * 8 * 4 + 4)
    )
    assert sum(p.numel() for p in model.parameters()) == expected == 7_948_964
    # One forward at the seed's size, batch 1 (about 2 s on one core): it round-trips.
    with torch.no_grad():
        assert model.eval()(torch.zeros(1, 4, 128, 128, 128)).recon.shape == (1, 4, 128, 128, 128)
    sbd = Conv3DVAE(input_shape=(4, 128, 128, 128), use_sbd=True)
    assert sbd.coords.shape == (1, 3, 8, 8, 8)  # seed 004: z broadcast to an 8³ grid


def test_lstm_bad_settings() -> None:
    with pytest.raises(DataError, match=r"input_shape must be \(T, C\)"):
        LSTMVAE(input_shape=[745])
    with pytest.raises(ConfigError, match="model.n_layers"):
        LSTMVAE(input_shape=[745, 7], n_layers=0)
    with pytest.raises(DataError, match="expected input"):
        _small_lstm()(torch.randn(2, 41, 3))


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


def test_conv3d_bad_settings() -> None:
    with pytest.raises(DataError, match=r"\(4, 30, 32, 32\) must be divisible by 2\*\*model"):
        Conv3DVAE(input_shape=[4, 30, 32, 32], n_down=3)
    with pytest.raises(DataError, match=r"input_shape \(4, 6, 32, 32\) cannot be halved"):
        Conv3DVAE(input_shape=[4, 6, 32, 32])  # n_down null: 6 -> 3 is below the 4³ grid
    with pytest.raises(DataError, match=r"input_shape must be \(C, D, H, W\)"):
        Conv3DVAE(input_shape=[745, 7])
    with pytest.raises(ConfigError, match="model.norm_groups=3 must divide"):
        Conv3DVAE(input_shape=VOLUME, norm_groups=3)
    with pytest.raises(ConfigError, match="model.n_down must be"):
        Conv3DVAE(input_shape=VOLUME, n_down=0)
    with pytest.raises(DataError, match="expected input"):
        _small_conv3d(False)(torch.randn(1, 4, 16, 16, 16))


CONFIGS = {
    "lstm": (LSTMVAE, (40, 3)),
    "conv_lstm": (ConvLSTMVAE, (256, 4)),
    "conv3d": (Conv3DVAE, VOLUME),
}


@pytest.mark.parametrize("option", list(CONFIGS))
def test_yaml_composes_builds_and_matches_class_defaults(compose_config, option: str) -> None:
    torch.manual_seed(0)
    cls, shape = CONFIGS[option]
    cfg = compose_config([f"model={option}"])
    with execution_whitelist(["vaelab.*"]):
        model = instantiate(cfg.model, input_shape=shape)
    assert type(model) is cls and model.input_shape == shape
    # The YAML spells out every argument, with the class's own default, so that building from
    # code and from config give the same model.
    keys = OmegaConf.to_container(cfg.model)
    keys.pop("_target_")
    params = inspect.signature(cls).parameters
    assert set(keys) == set(params) - {"input_shape"}
    for key, value in keys.items():
        default = params[key].default
        assert value == (list(default) if isinstance(default, tuple) else default), key
    out = model.eval()(torch.randn(1, *shape))
    assert out.recon.shape == (1, *shape) and out.mu.shape == (1, model.latent_dim)


def test_conv3d_yaml_switches_to_sbd(compose_config) -> None:
    cfg = compose_config(["model=conv3d", "model.use_sbd=true", "model.latent_dim=7"])
    with execution_whitelist(["vaelab.*"]):
        model = instantiate(cfg.model, input_shape=VOLUME)
    assert model.use_sbd and model.coords.shape == (1, 3, 4, 4, 4)
    assert model.decoder_input[0].in_channels == 7 + 3
