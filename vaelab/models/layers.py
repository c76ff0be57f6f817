"""Layers and length arithmetic shared by the 1-D convolutional models.

The multi-scale Conv1D VAE, the Conv1D + LSTM VAE and the VQ-VAE all mirror strided Conv1d
encoders with transposed convolutions that land on exactly the encoder's lengths; the
multi-scale model and the VQ-VAE build their layers as seed 001's ConvBlock.
"""

import torch
import torch.nn.functional as F
from torch import nn


def conv_out_length(length: int, kernel: int, stride: int) -> int:
    """Length after Conv1d(kernel, stride, padding=kernel // 2) (PyTorch Conv1d shape formula)."""
    return (length + 2 * (kernel // 2) - kernel) // stride + 1


def transpose_output_padding(length_in: int, target: int, kernel: int, stride: int) -> int:
    """output_padding making ConvTranspose1d(kernel, stride, padding=kernel // 2) emit `target`."""
    # ConvTranspose1d emits (L_in - 1) * s - 2p + k + output_padding steps. When `target` is the
    # length the matching Conv1d read, the difference lies in [0, s - 1], so each decoder layer
    # lands exactly on its encoder layer's input length: seed 001 instead overshot or undershot
    # and then cropped or replicate-padded the branches to 745, which this replaces.
    return target - ((length_in - 1) * stride - 2 * (kernel // 2) + kernel)


def polyphase_conv_transpose1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: int,
    padding: int,
    output_padding: int,
) -> torch.Tensor:
    """F.conv_transpose1d(x, weight, bias, stride, padding, output_padding) as one stride-1 conv.

    A transposed convolution with stride s writes input step i to outputs s*i - padding + j,
    j < k. Output step u = s*q + r (before the crop by `padding`) therefore sums taps
    j = s*m + r over inputs q - m: for each phase r it is an ordinary stride-1 convolution with
    ceil(k / s) taps. The s phases run as one Conv1d with s * C_out output channels, and their
    outputs are interleaved and cropped to exactly the ConvTranspose1d length. Same weights and
    the same multiply-adds (plus ~3% on the zero taps padding k up to a multiple of s); only the
    order of the sums differs: results agree to float32 rounding (~1e-6 relative), and against
    a float64 reference its gradients were the more accurate. On the CPU oneDNN runs the long
    strided transposed kernels of the decoder (k=255, s=16; k=63, s=8) through im2col + GEMM;
    this form ran them about twice as fast on one 2-core Xeon host, backward included, but the
    gain depends on the host's oneDNN kernels (1.04-1.09x for a whole train step on another):
    `make bench` measures it against torch.nn's layers on the machine at hand.
    """
    batch, _, length = x.shape
    c_in, c_out, kernel = weight.shape
    taps = -(-kernel // stride)  # ceil(k / s) taps per phase
    out_length = (length - 1) * stride - 2 * padding + kernel + output_padding
    # Only the phase steps q that reach the cropped output are computed.
    q_first, q_last = padding // stride, (padding + out_length - 1) // stride
    # phase_weight[r * C_out + o, c, t] = weight[c, o, s * (taps - 1 - t) + r]: tap j = s*m + r,
    # flipped in m because Conv1d correlates where ConvTranspose1d scatters.
    phase_weight = F.pad(weight, (0, taps * stride - kernel)).view(c_in, c_out, taps, stride)
    phase_weight = phase_weight.flip(2).permute(3, 1, 0, 2).reshape(stride * c_out, c_in, taps)
    phase_bias = None if bias is None else bias.repeat(stride)
    # Padded so that output q of the stride-1 conv reads inputs q - taps + 1 ... q.
    padded = F.pad(x, (taps - 1 - q_first, q_last + 1 - length))
    phases = F.conv1d(padded, phase_weight, phase_bias)  # (B, s * C_out, q_last - q_first + 1)
    steps = phases.shape[-1]
    interleaved = phases.view(batch, stride, c_out, steps).permute(0, 2, 3, 1)
    start = padding - stride * q_first
    cropped = interleaved.reshape(batch, c_out, steps * stride)[:, :, start : start + out_length]
    return cropped.contiguous()  # BatchNorm next runs ~5% faster per step on a contiguous input


class PolyphaseConvTranspose1d(nn.ConvTranspose1d):
    """nn.ConvTranspose1d (same parameters and output) computed by polyphase_conv_transpose1d."""

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        """The transposed convolution; the general cases are left to nn.ConvTranspose1d."""
        if output_size is not None or self.groups != 1 or self.dilation != (1,) or x.dim() != 3:
            return super().forward(x, output_size)
        return polyphase_conv_transpose1d(
            x, self.weight, self.bias, self.stride[0], self.padding[0], self.output_padding[0]
        )


class Dropout(nn.Dropout):
    """nn.Dropout with the very same masks, drawn about twice as fast on the CPU.

    On the CPU, F.dropout draws its mask with `bernoulli_(1 - p)`, which takes one float64
    uniform u per element from the generator and keeps the element when u < 1 - p; it then
    scales the mask by 1 / (1 - p) and multiplies. Drawing the same uniforms with
    `torch.rand(float64)` and comparing gives bit-identical outputs and leaves the generator in
    the same state (tests/test_models_layers.py checks both), at ~5 ns per element instead of
    ~9: the masks were a quarter of a seed 000 train step. Elsewhere (CUDA's fused kernel) and
    for p in {0, 1} this is nn.Dropout itself.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Zero each element with probability p and scale the rest by 1 / (1 - p)."""
        if not (self.training and x.device.type == "cpu" and 0.0 < self.p < 1.0) or self.inplace:
            return super().forward(x)
        keep = 1.0 - self.p
        uniform = torch.rand(x.shape, dtype=torch.float64, device=x.device)
        return x * (uniform < keep).to(x.dtype).div_(keep)


def conv_block(conv: nn.Module, channels: int, dropout: nn.Module) -> nn.Sequential:
    """conv -> BatchNorm1d -> LeakyReLU(0.2) -> dropout: seed 001's ConvBlock, also the VQ-VAE's.

    The caller passes the dropout layer, so one model can build the block from vaelab's
    `Dropout` or from torch.nn's (MultiScaleConv1DVAE's stock_layers) with the same indices.
    """
    # LeakyReLU in place: BatchNorm's backward does not need its output, and LeakyReLU's own
    # backward reads the sign from its result (slope > 0), so gradients are unchanged while each
    # block allocates one activation fewer.
    return nn.Sequential(conv, nn.BatchNorm1d(channels), nn.LeakyReLU(0.2, inplace=True), dropout)
