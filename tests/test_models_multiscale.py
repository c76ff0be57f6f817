"""The multi-scale Conv1D VAE: seed 000/001 shapes, exact decoder lengths, stock torch.nn layers,
and its faster layers (polyphase strided conv, fused LeakyReLU + dropout)."""

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import execution_whitelist, instantiate
from torch import nn

from vaelab.errors import DataError
from vaelab.models.layers import (
    KEEP_LEVELS,
    LeakyReLUDropout,
    PolyphaseConv1d,
    PolyphaseConvTranspose1d,
    leaky_relu_dropout,
    polyphase_conv1d,
)
from vaelab.models.multiscale_conv1d import BRANCHES, POLYPHASE_MIN_TAPS, MultiScaleConv1DVAE

FAST_LAYERS = (PolyphaseConv1d, PolyphaseConvTranspose1d, LeakyReLUDropout)

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
    assert set(FAST_LAYERS) <= fast_kinds
    assert not set(FAST_LAYERS) & stock_kinds and nn.Dropout not in fast_kinds
    assert {nn.ConvTranspose1d, nn.Dropout, nn.LeakyReLU} <= stock_kinds
    # Every fast conv has its stock twin at the same place; the fused LeakyReLU + dropout
    # stands where the stock block has its LeakyReLU, its Dropout next.
    names = dict(stock.named_modules())
    for name, module in fast.named_modules():
        if isinstance(module, PolyphaseConv1d | PolyphaseConvTranspose1d):
            assert type(names[name]) is type(module).__mro__[1], name
        if isinstance(module, LeakyReLUDropout):
            block, index = name.rsplit(".", 1)
            assert type(names[name]) is nn.LeakyReLU, name
            assert names[f"{block}.{int(index) + 1}"].p == module.p, name
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
    assert not any(isinstance(m, FAST_LAYERS) for m in stock.modules())


@pytest.mark.parametrize(
    ("kernel", "stride"), [spec[1:] for _, specs in BRANCHES for spec in specs]
)
@pytest.mark.parametrize("length", [745, 300, 301])
def test_polyphase_conv1d_is_conv1d(kernel: int, stride: int, length: int) -> None:
    # The strided encoder conv as a stride-1 conv on the input's phases: the output and every
    # gradient of F.conv1d with the same weights, to float32 rounding.
    torch.manual_seed(0)
    x = torch.randn(2, 3, length, requires_grad=True)
    weight = torch.randn(5, 3, kernel, requires_grad=True)
    bias = torch.randn(5, requires_grad=True)
    expected = F.conv1d(x, weight, bias, stride, kernel // 2)
    got = polyphase_conv1d(x, weight, bias, stride, kernel // 2)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    grad = torch.randn_like(expected)
    inputs = (x, weight, bias)
    for g, e in zip(
        torch.autograd.grad(got, inputs, grad),
        torch.autograd.grad(expected, inputs, grad),
        strict=True,
    ):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-3)


def test_the_encoder_takes_the_polyphase_form_for_long_kernels_only() -> None:
    model = _small_conv()
    for name, specs in BRANCHES:
        for block, (_, kernel, stride) in zip(getattr(model, f"branch_{name}"), specs, strict=True):
            polyphase = kernel >= POLYPHASE_MIN_TAPS * stride
            assert isinstance(block[0], PolyphaseConv1d) == polyphase, (name, kernel)
            assert type(block[0]) in (nn.Conv1d, PolyphaseConv1d)


def test_leaky_relu_dropout_in_eval_mode_is_leaky_relu() -> None:
    y = torch.randn(4, 8, 50)
    layer = LeakyReLUDropout(0.2, 0.3).eval()
    assert torch.equal(layer(y), F.leaky_relu(y, 0.2))
    assert torch.equal(leaky_relu_dropout(y, 0.2, 0.0, training=True), F.leaky_relu(y, 0.2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_leaky_relu_dropout_keeps_1_minus_p_unbiased(dtype) -> None:
    # Each element is dropped (0) or kept as leaky_relu(y) / keep, keep = 1 - p quantised to a
    # multiple of 1/32768; over 10^6 elements the keep rate is within 5 standard errors.
    torch.manual_seed(0)
    p = 0.2
    y = torch.randn(1000, 1000).to(dtype)
    out = leaky_relu_dropout(y, 0.2, p, training=True)
    assert out.dtype == dtype
    keep = round((1 - p) * KEEP_LEVELS) / KEEP_LEVELS
    assert abs(keep - (1 - p)) < 1 / KEEP_LEVELS
    kept = out != 0
    rate = kept.double().mean().item()
    assert abs(rate - keep) < 5 * (keep * (1 - keep) / y.numel()) ** 0.5
    expected = (F.leaky_relu(y.float(), 0.2) / keep).to(dtype)
    torch.testing.assert_close(
        out[kept], expected[kept], rtol=1e-2 if dtype != torch.float32 else 1e-6, atol=0
    )
    # Unbiased: the mean output is the mean leaky_relu(y), within sampling noise.
    mean, target = out.double().mean().item(), F.leaky_relu(y.double(), 0.2).mean().item()
    assert abs(mean - target) < 5 * out.double().std().item() / y.numel() ** 0.5


def test_leaky_relu_dropout_gradient_is_its_factor_and_seeded_masks_repeat() -> None:
    y = torch.randn(3, 4, 200, requires_grad=True)
    torch.manual_seed(7)
    out = leaky_relu_dropout(y, 0.2, 0.5, training=True)
    (grad,) = torch.autograd.grad(out.sum(), y)
    # d out / d y is the factor out / y: 0 where dropped, 2 or 0.4 where kept (p = 0.5).
    torch.testing.assert_close(grad, out.detach() / y.detach())
    assert torch.unique(grad).tolist() == pytest.approx([0.0, 0.4, 2.0])
    torch.manual_seed(7)
    assert torch.equal(leaky_relu_dropout(y, 0.2, 0.5, training=True), out)
    # Masks differ across calls: the generator moves on.
    assert not torch.equal(leaky_relu_dropout(y, 0.2, 0.5, training=True), out)


def test_multiscale_vitals_builds_seed_000s_widths_not_seed_001s(compose_config) -> None:
    # Seed 000's design: FC(256 -> 64) after pooling; four decoder branches of 64 maps merged by
    # Conv1d(256 -> 64, k=3) -> Conv1d(64 -> 7, k=3). The model's defaults are seed 001's FC
    # (256 -> 128) and branches of 32 maps.
    seed_000 = compose_config(["experiment=multiscale_vitals"])
    with execution_whitelist(["vaelab.*"]):
        model = instantiate(seed_000.model, input_shape=(745, 7))
    merge_fc, first_merge, last_merge = model.fc_merge[0], model.merge[0], model.merge[2]
    assert (merge_fc.in_features, merge_fc.out_features) == (256, 64)
    assert (model.fc_mu.in_features, model.fc_logvar.in_features) == (64, 64)
    assert (first_merge.in_channels, first_merge.out_channels, first_merge.kernel_size) == (
        256,
        64,
        (3,),
    )
    assert (last_merge.in_channels, last_merge.out_channels, last_merge.kernel_size) == (
        64,
        7,
        (3,),
    )
    default = MultiScaleConv1DVAE(input_shape=(745, 7))
    assert default.fc_merge[0].out_features == 128 and default.merge[0].in_channels == 128
    out = model.eval()(torch.randn(2, 745, 7))
    assert out.recon.shape == (2, 745, 7)
    assert all(branch.shape == (2, 745, 7) for branch in out.branches.values())
