"""Multi-scale Conv1D VAE: four parallel branches at local to multi-day scales (seeds 000, 001)."""

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from vaelab.errors import ConfigError, DataError
from vaelab.models.base import VAEOutput, checked_input_shape, floor_logvar, reparameterize


class ConvSpec(NamedTuple):
    """One encoder convolution: out channels = base_channels // divisor, kernel, stride."""

    divisor: int
    kernel: int
    stride: int


# Seed 000, "Encoder Design": kernels and strides of each branch. This tuple is the only place
# they are written; encoder, decoder and length checks all read it. Its order (local, hourly,
# daily, multiday) is the branch order everywhere: the pooled features, the decoder's split of
# the latent projection, the merge concatenation and the `branches` dict.
BRANCHES: tuple[tuple[str, tuple[ConvSpec, ...]], ...] = (
    ("local", (ConvSpec(2, 3, 2), ConvSpec(1, 5, 2), ConvSpec(1, 5, 2))),
    ("hourly", (ConvSpec(2, 15, 4), ConvSpec(1, 31, 4))),
    ("daily", (ConvSpec(2, 63, 8), ConvSpec(1, 127, 8))),
    ("multiday", (ConvSpec(1, 255, 16),)),
)


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


def branch_lengths(name: str, specs: tuple[ConvSpec, ...], length: int) -> tuple[int, ...]:
    """Sequence lengths through one encoder branch, input first; DataError if T is too short."""
    # With padding k // 2 a Conv1d output never drops below one step, so "too short" means the
    # branch's first kernel, which reads the raw series, is longer than the series: the branch's
    # time scale then exceeds the record and it sees mostly zero padding. Deeper layers are not
    # held to this, since the seed 000 design itself runs k=127 over the 94 steps of the daily
    # branch at T=745.
    first = specs[0].kernel
    if length < first:
        raise DataError(
            f"MultiScaleConv1DVAE: sequence length T={length} is shorter than the first kernel "
            f"of branch '{name}' (kernel={first}); this model needs T >= {first}"
        )
    lengths = [length]
    for spec in specs:
        lengths.append(conv_out_length(lengths[-1], spec.kernel, spec.stride))
    return tuple(lengths)


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
    the same state (tests/test_models.py checks both), at ~5 ns per element instead of ~9: the
    masks were a quarter of a seed 000 train step. Elsewhere (CUDA's fused kernel) and for
    p in {0, 1} this is nn.Dropout itself.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Zero each element with probability p and scale the rest by 1 / (1 - p)."""
        if not (self.training and x.device.type == "cpu" and 0.0 < self.p < 1.0) or self.inplace:
            return super().forward(x)
        keep = 1.0 - self.p
        uniform = torch.rand(x.shape, dtype=torch.float64, device=x.device)
        return x * (uniform < keep).to(x.dtype).div_(keep)


def conv_block(conv: nn.Module, channels: int, dropout: float) -> nn.Sequential:
    """conv -> BatchNorm1d -> LeakyReLU(0.2) -> Dropout: seed 001's ConvBlock, also the VQ-VAE's."""
    # LeakyReLU in place: BatchNorm's backward does not need its output, and LeakyReLU's own
    # backward reads the sign from its result (slope > 0), so gradients are unchanged while each
    # block allocates one activation fewer.
    return nn.Sequential(
        conv, nn.BatchNorm1d(channels), nn.LeakyReLU(0.2, inplace=True), Dropout(dropout)
    )


class MultiScaleConv1DVAE(nn.Module):
    """Conv1D VAE whose encoder and decoder each run four branches at different time scales."""

    def __init__(
        self,
        input_shape: tuple[int, ...],
        latent_dim: int = 32,
        base_channels: int = 64,
        dropout: float = 0.2,
        posterior_logvar_min: float | None = -6.0,
    ) -> None:
        super().__init__()
        self.input_shape = checked_input_shape("MultiScaleConv1DVAE", input_shape, rank=2)
        if base_channels < 2 or base_channels % 2:
            raise ConfigError(f"model.base_channels must be even and ≥ 2, got {base_channels}")
        n_steps, n_channels = self.input_shape
        c = int(base_channels)
        self.latent_dim = int(latent_dim)
        self.posterior_logvar_min = posterior_logvar_min

        # lengths[name] = (T, L_1, ..., L_b): the input length of every encoder layer, which is
        # also the exact output length of the decoder layer that mirrors it.
        self.lengths: dict[str, tuple[int, ...]] = {}
        # (channels, length) of each branch's deepest feature map, which the decoder starts from.
        self._code_shapes: list[tuple[int, int]] = []
        self.decoder_branches = nn.ModuleDict()
        self.decoder_heads = nn.ModuleDict()
        for name, specs in BRANCHES:
            lengths = branch_lengths(name, specs, n_steps)
            widths = [n_channels] + [c // spec.divisor for spec in specs]
            encoder, decoder = [], []
            for i, (_, k, s) in enumerate(specs):
                conv = nn.Conv1d(widths[i], widths[i + 1], k, s, padding=k // 2)
                encoder.append(conv_block(conv, widths[i + 1], dropout))
                # The decoder mirrors the branch: reversed kernels and strides, channels going
                # back down, but ending at c/2 feature maps rather than C so the merge has
                # features to mix.
                out = c // 2 if i == 0 else widths[i]
                pad = transpose_output_padding(lengths[i + 1], lengths[i], k, s)
                deconv = PolyphaseConvTranspose1d(
                    widths[i + 1], out, k, s, padding=k // 2, output_padding=pad
                )
                decoder.insert(0, conv_block(deconv, out, dropout))
            # Encoder attributes keep seed 001's names (branch_local, ...).
            setattr(self, f"branch_{name}", nn.Sequential(*encoder))
            self.decoder_branches[name] = nn.Sequential(*decoder)
            # Each branch reconstructs the series on its own, so the per-branch reconstruction
            # loss of seed 000 ("Per-branch recon loss, equal weights") can force every scale
            # into the latent code.
            self.decoder_heads[name] = nn.Conv1d(c // 2, n_channels, kernel_size=3, padding=1)
            self.lengths[name] = lengths
            self._code_shapes.append((widths[-1], lengths[-1]))

        self.pool = nn.AdaptiveAvgPool1d(1)
        pooled_width = sum(channels for channels, _ in self._code_shapes)  # 4c
        self.fc_merge = nn.Sequential(nn.Linear(pooled_width, 2 * c), nn.LeakyReLU(0.2))
        self.fc_mu = nn.Linear(2 * c, self.latent_dim)
        self.fc_logvar = nn.Linear(2 * c, self.latent_dim)

        # One projection sized to every branch's deepest encoder length. Seed 001 projected every
        # branch to length 8, so its decoders reached 512 or 1024 steps, not 745, and had to be
        # replicate-padded or cropped; here each branch upsamples to exactly T on its own.
        self._projection_sizes = [channels * length for channels, length in self._code_shapes]
        self.fc_decode = nn.Linear(self.latent_dim, sum(self._projection_sizes))
        self.merge = nn.Sequential(
            nn.Conv1d(len(BRANCHES) * (c // 2), c, kernel_size=3, padding=1),
            nn.LeakyReLU(0.2),
            nn.Conv1d(c, n_channels, kernel_size=3, padding=1),
        )

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the posterior mean and the floored log-variance, each (B, latent_dim)."""
        if tuple(x.shape[1:]) != self.input_shape:
            # The decoder's output paddings are fixed for one T, so another T cannot round-trip.
            raise DataError(
                f"MultiScaleConv1DVAE: expected input of shape (B, {self.input_shape}), "
                f"got {tuple(x.shape)}"
            )
        # (B, C, T): Conv1d wants channels first. One contiguous copy here, not one per branch.
        h = x.transpose(1, 2).contiguous()
        pooled = [self.pool(getattr(self, f"branch_{name}")(h)).squeeze(-1) for name, _ in BRANCHES]
        h = self.fc_merge(torch.cat(pooled, dim=1))
        return self.fc_mu(h), floor_logvar(self.fc_logvar(h), self.posterior_logvar_min)

    def decode(self, z: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Return the merged reconstruction (B, T, C) and each branch's own reconstruction."""
        chunks = torch.split(self.fc_decode(z), self._projection_sizes, dim=1)
        features, branches = [], {}
        for (name, _), chunk, shape in zip(BRANCHES, chunks, self._code_shapes, strict=True):
            h = self.decoder_branches[name](chunk.view(z.shape[0], *shape))  # (B, c/2, T)
            features.append(h)
            branches[name] = self.decoder_heads[name](h).transpose(1, 2)
        recon = self.merge(torch.cat(features, dim=1)).transpose(1, 2)
        return recon, branches

    def forward(self, x: torch.Tensor) -> VAEOutput:
        """Encode, sample z in training mode (z = mu in eval mode), decode."""
        mu, logvar = self.encode(x)
        z = reparameterize(mu, logvar) if self.training else mu
        recon, branches = self.decode(z)
        return VAEOutput(recon=recon, mu=mu, logvar=logvar, z=z, branches=branches)
