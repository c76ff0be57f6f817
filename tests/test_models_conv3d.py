"""The 3D convolutional VAE (seed 004): shapes, the compact grid, the spatial broadcast decoder."""

import pytest
import torch
from hydra.utils import execution_whitelist, instantiate
from torch import nn

from vaelab.errors import ConfigError, DataError
from vaelab.models.conv3d import Conv3DVAE

pytestmark = pytest.mark.usefixtures("one_thread")

VOLUME = (4, 32, 32, 32)  # seed 004's four modalities, shrunk from 128³ for the CPU


def _small_conv3d(use_sbd: bool) -> Conv3DVAE:
    """A 3D VAE on 32³ volumes with 4 base channels, fast on the CPU."""
    return Conv3DVAE(input_shape=list(VOLUME), latent_dim=8, base_channels=4, use_sbd=use_sbd)


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
    # model.norm_groups reaches every norm (GroupNorm itself refuses groups that do not divide).
    assert {m.num_groups for m in norms} == {4}


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


def test_conv3d_yaml_switches_to_sbd(compose_config) -> None:
    cfg = compose_config(["model=conv3d", "model.use_sbd=true", "model.latent_dim=7"])
    with execution_whitelist(["vaelab.*"]):
        model = instantiate(cfg.model, input_shape=VOLUME)
    assert model.use_sbd and model.coords.shape == (1, 3, 4, 4, 4)
    assert model.decoder_input[0].in_channels == 7 + 3
