"""The shared 1-D layers: exact-length arithmetic, the polyphase transposed conv, fast dropout."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vaelab.models.layers import (
    Dropout,
    PolyphaseConvTranspose1d,
    conv_block,
    conv_out_length,
    transpose_output_padding,
)
from vaelab.models.multiscale_conv1d import MultiScaleConv1DVAE

BRANCH_NAMES = ["local", "hourly", "daily", "multiday"]
# (kernel, stride) of every strided conv vaelab builds: the seed 000 branches, the Conv1D + LSTM
# model's default and the VQ-VAE's default; plus an even kernel, which the VQ-VAE allows.
KERNELS_AND_STRIDES = [(3, 2), (5, 2), (15, 4), (31, 4), (63, 8), (127, 8), (255, 16), (9, 4)]
KERNELS_AND_STRIDES += [(4, 2)]


@pytest.mark.parametrize(("kernel", "stride"), KERNELS_AND_STRIDES)
def test_lengths_round_trip_exactly_through_torch_layers(kernel: int, stride: int) -> None:
    weight = torch.zeros(1, 1, kernel)
    for length in range(kernel, kernel + 3 * stride + 2):
        # conv_out_length is the length torch's Conv1d gives, measured, not recomputed.
        encoded = F.conv1d(torch.zeros(1, 1, length), weight, stride=stride, padding=kernel // 2)
        assert encoded.shape[-1] == conv_out_length(length, kernel, stride), length
        pad = transpose_output_padding(encoded.shape[-1], length, kernel, stride)
        assert 0 <= pad < stride, length  # what ConvTranspose1d accepts
        decoded = F.conv_transpose1d(
            encoded, weight, stride=stride, padding=kernel // 2, output_padding=pad
        )
        assert decoded.shape[-1] == length


@pytest.mark.parametrize("n_steps", [745, 512, 300, 1000])
def test_multiscale_decoder_polyphase_equals_conv_transpose1d(n_steps: int) -> None:
    # The decoder computes each ConvTranspose1d as interleaved stride-1 convolutions (for
    # speed): output and gradients must be those of F.conv_transpose1d with the same weights.
    torch.manual_seed(0)
    model = MultiScaleConv1DVAE(input_shape=[n_steps, 3], base_channels=8)
    for name in BRANCH_NAMES:
        input_lengths = model.lengths[name][:0:-1]  # deepest first, as the decoder runs
        for block, length in zip(model.decoder_branches[name], input_lengths, strict=True):
            deconv = block[0]
            assert isinstance(deconv, PolyphaseConvTranspose1d)  # else this compares torch to torch
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


def test_conv_block_keeps_the_given_dropout_layer() -> None:
    # The caller picks the dropout class; the block's indices (and so the state-dict keys) are
    # the same either way.
    conv = nn.Conv1d(3, 4, 5, 2, padding=2)
    fast, stock = conv_block(conv, 4, Dropout(0.3)), conv_block(conv, 4, nn.Dropout(0.3))
    assert [type(m) for m in fast] == [nn.Conv1d, nn.BatchNorm1d, nn.LeakyReLU, Dropout]
    assert type(stock[3]) is nn.Dropout and stock[3].p == 0.3
    assert list(fast.state_dict()) == list(stock.state_dict())
