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


def polyphase_conv1d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int, padding: int
) -> torch.Tensor:
    """F.conv1d(x, weight, bias, stride, padding) as a stride-1 conv on s phases of the input.

    The mirror of polyphase_conv_transpose1d: output t = Σ_j w[j] x[s t + j] sums, for each
    phase r = j mod s, taps j = s m + r over x[s (t + m) + r], an ordinary stride-1 conv with
    ceil(k / s) taps on the phase x[r::s]. Folding the s phases into channels (space to depth,
    C_in → s C_in) runs them as one conv. Same products (plus the zero taps padding k up to a
    multiple of s); oneDNN runs the long strided kernels of the encoder (k=255, s=16 reading 7
    channels) as fewer, wider GEMMs this way: under bf16 autocast the daily and multi-day
    branches' convs took half the time, forward and backward, on a 2-core EPYC (issue 12).
    """
    batch, c_in, length = x.shape
    c_out, _, kernel = weight.shape
    taps = -(-kernel // stride)
    out_length = (length + 2 * padding - kernel) // stride + 1
    # Pad to exactly the (out_length + taps - 1) * s steps the phases read.
    padded = F.pad(x, (padding, (out_length + taps - 1) * stride - length - padding))
    # phases[b, c * s + r, q] = padded[b, c, s q + r]; the weight folds the same way.
    phases = padded.view(batch, c_in, -1, stride).transpose(2, 3).reshape(batch, c_in * stride, -1)
    phase_weight = F.pad(weight, (0, taps * stride - kernel)).view(c_out, c_in, taps, stride)
    phase_weight = phase_weight.transpose(2, 3).reshape(c_out, c_in * stride, taps)
    return F.conv1d(phases, phase_weight, bias)


class PolyphaseConv1d(nn.Conv1d):
    """nn.Conv1d (same parameters and output) computed by polyphase_conv1d when strided on the
    CPU, where it was measured; elsewhere (cuDNN) torch's own strided kernels run."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The strided convolution; stride 1 and the general cases are nn.Conv1d's own."""
        plain = self.stride[0] == 1 or self.groups != 1 or self.dilation != (1,)
        plain = plain or x.device.type != "cpu" or x.dim() != 3
        if plain or self.padding_mode != "zeros" or isinstance(self.padding, str):
            return super().forward(x)
        return polyphase_conv1d(x, self.weight, self.bias, self.stride[0], self.padding[0])


# Dropout's keep decision compares a uniform 15-bit integer with a threshold: four decisions
# from each 64-bit draw of the generator (16 bits each, the lowest dropped), where F.dropout
# on the CPU draws one float64 per element (two 32-bit Mersenne Twister draws: 8 times the
# draws, ~20% of a seed 000 bf16 step on its own). Quantising 1 - p to a multiple of 1/32768
# moves p by < 1.6e-5.
KEEP_LEVELS = 1 << 15


def leaky_relu_dropout(
    y: torch.Tensor, negative_slope: float, p: float, training: bool
) -> torch.Tensor:
    """dropout(leaky_relu(y)) as one product y * factor, the factor drawn without autograd.

    leaky_relu(y) = y * (1 if y > 0 else slope), and dropout multiplies by kept / (1 - p), so
    the pair is y times one factor per element: autograd keeps that factor only (where the
    two layers kept an activation and a mask) and its backward is a single product. The
    scale is 1 / the quantised keep probability, so E[output] = leaky_relu(y) exactly. The
    masks are not nn.Dropout's (issue 12 drops that requirement); they come from the global
    torch generator, so a seeded run is reproducible. Elsewhere than the CPU, in eval mode,
    and under torch.compile (which fuses and draws its own masks), it is the two torch ops.
    """
    if not (training and 0.0 < p < 1.0):
        return F.leaky_relu(y, negative_slope)
    if y.device.type != "cpu" or torch.compiler.is_compiling():
        return F.dropout(F.leaky_relu(y, negative_slope), p, training=True)
    threshold = max(1, round((1.0 - p) * KEEP_LEVELS))
    scale = KEEP_LEVELS / threshold
    with torch.no_grad():
        words = torch.empty(-(-y.numel() // 4), dtype=torch.int64).random_(-(2**63), None)
        uniform = words.view(torch.int16)[: y.numel()].view(y.shape) >> 1  # in [-2^14, 2^14)
        # Integer arithmetic only: the CPU's bool kernels (a comparison, torch.where, a bool
        # cast to float) are not vectorised and cost more than the draws. u - t fits in int16,
        # and its sign bit, shifted down, is -1 where the element is kept, 0 where dropped.
        kept = (uniform - (threshold - KEEP_LEVELS // 2)).bitwise_right_shift_(15).to(y.dtype)
        # leaky_relu's slope as arithmetic on sign(y): (1 + s)/2 + (1 - s)/2 · sign(y) is 1
        # for y > 0 and s for y < 0 (at y = 0 the product is 0 either way); negated, as kept.
        slope = torch.sign(y).mul_(-(1 - negative_slope) / 2 * scale)
        factor = kept.mul_(slope.sub_((1 + negative_slope) / 2 * scale))
    return y * factor


class LeakyReLUDropout(nn.Module):
    """LeakyReLU(negative_slope) then Dropout(p), as leaky_relu_dropout computes them."""

    def __init__(self, negative_slope: float = 0.2, p: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
        self.negative_slope, self.p = float(negative_slope), float(p)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        """dropout(leaky_relu(y)) in training mode, leaky_relu(y) in eval mode."""
        return leaky_relu_dropout(y, self.negative_slope, self.p, self.training)

    def extra_repr(self) -> str:
        """Shown by print(model)."""
        return f"negative_slope={self.negative_slope}, p={self.p}"


def conv_block(conv: nn.Module, channels: int, dropout: nn.Module) -> nn.Sequential:
    """conv -> BatchNorm1d -> LeakyReLU(0.2) -> dropout: seed 001's ConvBlock, also the VQ-VAE's.

    The caller passes the dropout layer, so one model can build the block from vaelab's
    `Dropout` or from torch.nn's (MultiScaleConv1DVAE's stock_layers) with the same indices.
    """
    # LeakyReLU in place: BatchNorm's backward does not need its output, and LeakyReLU's own
    # backward reads the sign from its result (slope > 0), so gradients are unchanged while each
    # block allocates one activation fewer.
    return nn.Sequential(conv, nn.BatchNorm1d(channels), nn.LeakyReLU(0.2, inplace=True), dropout)
