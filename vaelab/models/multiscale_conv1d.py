"""Multi-scale Conv1D VAE: four parallel branches at local to multi-day scales (seeds 000, 001)."""

from typing import NamedTuple

import torch
from torch import nn

from vaelab.errors import ConfigError, DataError
from vaelab.models.base import GaussianVAE
from vaelab.models.layers import (
    LeakyReLUDropout,
    PolyphaseConv1d,
    PolyphaseConvTranspose1d,
    conv_block,
    conv_out_length,
    transpose_output_padding,
)
from vaelab.models.priors import PriorFactory


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

# An encoder conv runs in the polyphase form (vaelab.models.layers.polyphase_conv1d) from this
# many taps per phase (kernel / stride) up: on the 2-core EPYC of issue 12, layer by layer on
# one core, it was faster from hourly's k=31, s=4 up and slower for the local branch's short
# kernels; a whole bf16 step on two cores gained 2-4% from it.
POLYPHASE_MIN_TAPS = 4


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


class MultiScaleConv1DVAE(GaussianVAE):
    """Conv1D VAE whose encoder and decoder each run four branches at different time scales."""

    def __init__(
        self,
        input_shape: tuple[int, ...],
        latent_dim: int = 32,
        base_channels: int = 64,
        dropout: float = 0.2,
        posterior_logvar_min: float | None = -6.0,
        stock_layers: bool = False,
        merge_width: int | None = None,
        decoder_branch_width: int | None = None,
        prior: PriorFactory | None = None,
    ) -> None:
        super().__init__(input_shape, latent_dim, posterior_logvar_min, input_rank=2, prior=prior)
        if base_channels < 2 or base_channels % 2:
            raise ConfigError(f"model.base_channels must be even and ≥ 2, got {base_channels}")
        n_steps, n_channels = self.input_shape
        c = int(base_channels)
        # The two widths where the seeds differ (conf/model/multiscale_conv1d.yaml). None keeps
        # vaelab's defaults: seed 001's FC(4c -> 2c) after pooling, and decoder branches ending at
        # c/2 feature maps. Seed 000's design is FC(4c -> c) and branches of c maps each.
        merge_width = 2 * c if merge_width is None else int(merge_width)
        branch_width = c // 2 if decoder_branch_width is None else int(decoder_branch_width)
        if merge_width < 1 or branch_width < 1:
            raise ConfigError(
                f"model.merge_width and model.decoder_branch_width must be ≥ 1, got "
                f"{merge_width} and {branch_width}"
            )
        # stock_layers builds the same model (same parameters and state-dict keys) from the
        # torch.nn classes that vaelab's faster CPU layers subclass (the polyphase convs) or
        # fuse (LeakyReLUDropout for LeakyReLU + Dropout): `make bench` times the two.
        self.stock_layers = bool(stock_layers)
        conv_transpose = nn.ConvTranspose1d if self.stock_layers else PolyphaseConvTranspose1d

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
                conv = self._conv_class(k, s)(widths[i], widths[i + 1], k, s, padding=k // 2)
                encoder.append(self._block(conv, widths[i + 1], dropout))
                # The decoder mirrors the branch: reversed kernels and strides, channels going
                # back down, but ending at branch_width feature maps rather than C so the merge
                # has features to mix.
                out = branch_width if i == 0 else widths[i]
                pad = transpose_output_padding(lengths[i + 1], lengths[i], k, s)
                deconv = conv_transpose(
                    widths[i + 1], out, k, s, padding=k // 2, output_padding=pad
                )
                decoder.insert(0, self._block(deconv, out, dropout))
            # Encoder attributes keep seed 001's names (branch_local, ...).
            setattr(self, f"branch_{name}", nn.Sequential(*encoder))
            self.decoder_branches[name] = nn.Sequential(*decoder)
            # Each branch reconstructs the series on its own, so the per-branch reconstruction
            # loss of seed 000 ("Per-branch recon loss, equal weights") can force every scale
            # into the latent code.
            self.decoder_heads[name] = nn.Conv1d(branch_width, n_channels, 3, padding=1)
            self.lengths[name] = lengths
            self._code_shapes.append((widths[-1], lengths[-1]))

        self.pool = nn.AdaptiveAvgPool1d(1)
        pooled_width = sum(channels for channels, _ in self._code_shapes)  # 4c
        self.fc_merge = nn.Sequential(nn.Linear(pooled_width, merge_width), nn.LeakyReLU(0.2))
        self.fc_mu = nn.Linear(merge_width, self.latent_dim)
        self.fc_logvar = nn.Linear(merge_width, self.latent_dim)

        # One projection sized to every branch's deepest encoder length. Seed 001 projected every
        # branch to length 8, so its decoders reached 512 or 1024 steps, not 745, and had to be
        # replicate-padded or cropped; here each branch upsamples to exactly T on its own.
        self._projection_sizes = [channels * length for channels, length in self._code_shapes]
        self.fc_decode = nn.Linear(self.latent_dim, sum(self._projection_sizes))
        self.merge = nn.Sequential(
            nn.Conv1d(len(BRANCHES) * branch_width, c, kernel_size=3, padding=1),
            nn.LeakyReLU(0.2),
            nn.Conv1d(c, n_channels, kernel_size=3, padding=1),
        )

    def _conv_class(self, kernel: int, stride: int) -> type[nn.Conv1d]:
        """The encoder's Conv1d: the polyphase form for long strided kernels (not stock)."""
        if self.stock_layers or kernel < POLYPHASE_MIN_TAPS * stride:
            return nn.Conv1d
        return PolyphaseConv1d

    def _block(self, conv: nn.Module, channels: int, dropout: float) -> nn.Sequential:
        """conv -> BatchNorm1d -> LeakyReLU(0.2) -> Dropout: seed 001's ConvBlock.

        vaelab's form fuses the last two into one product (LeakyReLUDropout); the stock form
        is torch.nn's four layers. Indices 0 and 1, and so the state-dict keys, are the same.
        """
        if self.stock_layers:
            return conv_block(conv, channels, nn.Dropout(dropout))
        return nn.Sequential(conv, nn.BatchNorm1d(channels), LeakyReLUDropout(0.2, dropout))

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The posterior mean and the raw log-variance, each (B, latent_dim)."""
        # (B, C, T): Conv1d wants channels first. One contiguous copy here, not one per branch.
        h = x.transpose(1, 2).contiguous()
        pooled = [self.pool(getattr(self, f"branch_{name}")(h)).squeeze(-1) for name, _ in BRANCHES]
        h = self.fc_merge(torch.cat(pooled, dim=1))
        return self.fc_mu(h), self.fc_logvar(h)

    def decode(self, z: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Return the merged reconstruction (B, T, C) and each branch's own reconstruction."""
        chunks = torch.split(self.fc_decode(z), self._projection_sizes, dim=1)
        features, branches = [], {}
        for (name, _), chunk, shape in zip(BRANCHES, chunks, self._code_shapes, strict=True):
            h = self.decoder_branches[name](chunk.view(z.shape[0], *shape))  # (B, width, T)
            features.append(h)
            branches[name] = self.decoder_heads[name](h).transpose(1, 2)
        recon = self.merge(torch.cat(features, dim=1)).transpose(1, 2)
        return recon, branches
