"""The multi-scale Conv1D VAE: seed 000/001 shapes, exact decoder lengths, stock torch.nn layers."""

import pytest
import torch
from hydra.utils import execution_whitelist, instantiate
from torch import nn

from vaelab.errors import DataError
from vaelab.models.layers import Dropout, PolyphaseConvTranspose1d
from vaelab.models.multiscale_conv1d import BRANCHES, MultiScaleConv1DVAE

BRANCH_NAMES = ["local", "hourly", "daily", "multiday"]


def _small_conv(n_steps: int = 745, n_channels: int = 7, **kwargs) -> MultiScaleConv1DVAE:
    """The seed 000 kernels and strides with narrow channels, to stay fast on a CPU."""
    return MultiScaleConv1DVAE(input_shape=[n_steps, n_channels], base_channels=8, **kwargs)


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
    specs = dict(BRANCHES)
    for name in BRANCH_NAMES:
        branch = getattr(model, f"branch_{name}")
        # One conv block per ConvSpec, each conv with that spec's kernel and stride.
        convs = [block[0] for block in branch]
        assert [(c.kernel_size[0], c.stride[0]) for c in convs] == [
            (spec.kernel, spec.stride) for spec in specs[name]
        ], name
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


def test_multiscale_other_channels_and_default_width() -> None:
    torch.manual_seed(0)
    model = MultiScaleConv1DVAE(input_shape=[512, 3], latent_dim=16)
    out = model(torch.randn(3, 512, 3))
    assert out.recon.shape == (3, 512, 3) and out.mu.shape == (3, 16)
    assert {k: tuple(v.shape) for k, v in out.branches.items()} == {
        k: (3, 512, 3) for k in BRANCH_NAMES
    }


def test_multiscale_rejects_short_or_flat_input() -> None:
    # T=200 is shorter than the multiday branch's first kernel (255); T=300 is accepted above.
    with pytest.raises(DataError, match=r"'multiday' \(kernel=255\)"):
        MultiScaleConv1DVAE(input_shape=[200, 7])
    with pytest.raises(DataError, match="input_shape must be"):
        MultiScaleConv1DVAE(input_shape=[745])
    model = _small_conv(300, 3)
    with pytest.raises(DataError, match="expected input"):
        model(torch.randn(2, 301, 3))  # output paddings are fixed for T=300


def test_stock_layers_give_the_same_model_from_torch_nn() -> None:
    torch.manual_seed(0)
    fast = _small_conv(300, 3)
    stock = _small_conv(300, 3, stock_layers=True)
    # The same state-dict keys: a checkpoint of either form loads into the other.
    assert list(stock.state_dict()) == list(fast.state_dict())
    stock.load_state_dict(fast.state_dict())
    fast_kinds, stock_kinds = {type(m) for m in fast.modules()}, {type(m) for m in stock.modules()}
    assert {PolyphaseConvTranspose1d, Dropout} <= fast_kinds
    assert not {PolyphaseConvTranspose1d, Dropout} & stock_kinds
    assert {nn.ConvTranspose1d, nn.Dropout} <= stock_kinds
    # Every fast layer has its stock twin at the same place.
    names = dict(stock.named_modules())
    for name, module in fast.named_modules():
        if isinstance(module, PolyphaseConvTranspose1d | Dropout):
            assert type(names[name]) is type(module).__mro__[1], name
    x = torch.randn(3, 300, 3)
    fast.eval()
    stock.eval()
    with torch.no_grad():
        fast_out, stock_out = fast(x), stock(x)
    # Float32 rounding: the polyphase form only sums the same products in another order.
    torch.testing.assert_close(fast_out.mu, stock_out.mu, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast_out.recon, stock_out.recon, rtol=1e-4, atol=1e-5)
    for name in BRANCH_NAMES:
        torch.testing.assert_close(
            fast_out.branches[name], stock_out.branches[name], rtol=1e-4, atol=1e-5
        )


def test_stock_layers_from_the_config(compose_config) -> None:
    # The benchmark's like-for-like model: the same config with one override.
    cfg = compose_config(["model=multiscale_conv1d", "model.base_channels=8"])
    assert cfg.model.stock_layers is False
    stock_cfg = compose_config(
        ["model=multiscale_conv1d", "model.base_channels=8", "model.stock_layers=true"]
    )
    with execution_whitelist(["vaelab.*"]):
        fast = instantiate(cfg.model, input_shape=(300, 3))
        stock = instantiate(stock_cfg.model, input_shape=(300, 3))
    assert not fast.stock_layers and stock.stock_layers
    assert list(stock.state_dict()) == list(fast.state_dict())
    assert not any(isinstance(m, PolyphaseConvTranspose1d | Dropout) for m in stock.modules())
