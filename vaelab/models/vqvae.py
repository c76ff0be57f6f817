"""VQ-VAE for sequences (van den Oord et al. 2017): the seed 000 fallback, whose discrete
latent space "eliminates collapse by design".

A compact Conv1d encoder maps a (T, C) series to `n_latents` code vectors of `code_dim` each;
every vector is replaced by its nearest entry of a codebook of `codebook_size`, with the
straight-through gradient (section 3.2); a decoder that mirrors the encoder returns exactly T
steps. The codebook is not a parameter: it follows exponential moving averages of the
encoder outputs assigned to it (appendix A.1), and an entry that falls out of use is
restarted on a random encoder output of the batch (Dhariwal et al. 2020, Jukebox, section
2.2 "random restarts"), so no entry stays dead. Like BatchNorm's running statistics, the EMA
moves only in a training-mode forward pass; evaluation never changes it.

How it fits the VAEOutput interface the train loop and diagnostics read:
- `mu` = the quantised code vectors flattened, (B, n_latents * code_dim), exactly codebook
  entries and without gradient, so `latent_dim = n_latents * code_dim`: the posterior is a
  point mass on them. `z` is the same value carrying the straight-through gradient.
- `logvar` = DETERMINISTIC_LOGVAR everywhere: the smallest variance a vaelab posterior may
  have (seed 004's floor), so Gaussian diagnostics read the code as deterministic and the
  mutual-information estimate treats equal codes as one point.
- `decode(z)` takes any flat (B, latent_dim) tensor and does not quantise it, so the z = 0
  ablation (recon_z0) decodes the origin, which is not a codebook entry.
- `extras`: `codes` (B, n_latents) long indices; `commitment` ‖z_e − sg[e]‖² and
  `codebook_loss` ‖sg[z_e] − e‖² (means over latents and code dimensions; the latter has no
  gradient, the EMA updates the codebook); `kl` = n_latents · log(codebook_size) nats, the
  constant KL of a one-hot posterior against the uniform prior (section 3.1).
"""

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vaelab.errors import ConfigError
from vaelab.models.base import VAEOutput, check_batch_shape, checked_input_shape
from vaelab.models.layers import Dropout, conv_block, conv_out_length, transpose_output_padding

DETERMINISTIC_LOGVAR = -6.0  # log-variance reported for the point-mass posterior (seed 004 floor)


class VQVAE(nn.Module):
    """Conv1d VQ-VAE for (T, C) series with an EMA codebook and dead-code restarts."""

    def __init__(
        self,
        input_shape: tuple[int, ...],
        n_latents: int = 8,
        code_dim: int = 16,
        codebook_size: int = 64,
        channels: Sequence[int] = (32, 64, 64),
        kernel_size: int = 9,
        stride: int = 4,
        dropout: float = 0.0,
        ema_decay: float = 0.99,
        dead_code_threshold: float = 1.0,
    ) -> None:
        super().__init__()
        self.input_shape = checked_input_shape("VQVAE", input_shape, rank=2)
        widths = [int(c) for c in channels]
        for key, value in {
            "n_latents": n_latents,
            "code_dim": code_dim,
            "codebook_size": codebook_size,
            "kernel_size": kernel_size,
            "stride": stride,
        }.items():
            if value < 1:
                raise ConfigError(f"model.{key} must be ≥ 1, got {value}")
        if not widths or min(widths) < 1:
            raise ConfigError(f"model.channels must be a non-empty list of widths, got {widths}")
        if not 0.0 <= ema_decay < 1.0:
            raise ConfigError(f"model.ema_decay must lie in [0, 1), got {ema_decay}")
        if dead_code_threshold < 0:
            raise ConfigError(f"model.dead_code_threshold must be ≥ 0, got {dead_code_threshold}")
        n_steps, n_channels = self.input_shape
        self.n_latents, self.code_dim = int(n_latents), int(code_dim)
        self.codebook_size = int(codebook_size)
        self.latent_dim = self.n_latents * self.code_dim
        self.ema_decay = ema_decay
        self.dead_code_threshold = dead_code_threshold

        # lengths[i] is the input length of encoder layer i and the exact output length of the
        # decoder layer that mirrors it (layers.transpose_output_padding).
        k, s = int(kernel_size), int(stride)
        self.lengths = [n_steps]
        for _ in widths:
            self.lengths.append(conv_out_length(self.lengths[-1], k, s))
        encoder, decoder = [], []
        for i, (c_in, c_out) in enumerate(zip([n_channels, *widths[:-1]], widths, strict=True)):
            conv = nn.Conv1d(c_in, c_out, k, s, padding=k // 2)
            encoder.append(conv_block(conv, c_out, Dropout(dropout)))
            pad = transpose_output_padding(self.lengths[i + 1], self.lengths[i], k, s)
            deconv = nn.ConvTranspose1d(c_out, c_in, k, s, padding=k // 2, output_padding=pad)
            # The decoder mirrors the encoder layer by layer. Its last layer, back to C channels
            # at T steps, is a plain linear deconvolution: the targets (standardised vitals) are
            # unbounded. No extra full-length head: at T = 745 it would double the step time.
            decoder.insert(0, deconv if i == 0 else conv_block(deconv, c_in, Dropout(dropout)))
        self.encoder = nn.Sequential(*encoder)
        self._feature_shape = (widths[-1], self.lengths[-1])
        n_features = widths[-1] * self.lengths[-1]
        # Each of the n_latents slots reads the whole series (a linear map of the flattened
        # feature map), so a slot can carry a per-patient factor such as a baseline, not only
        # one time window's content.
        self.to_codes = nn.Linear(n_features, self.latent_dim)
        self.from_codes = nn.Sequential(nn.Linear(self.latent_dim, n_features), nn.LeakyReLU(0.2))
        self.decoder = nn.Sequential(*decoder)

        # The codebook and its EMA statistics are buffers: saved in the state dict, moved by
        # .to(device), never touched by the optimiser. ema_sum / ema_count is the codebook.
        codebook = torch.randn(self.codebook_size, self.code_dim)
        self.register_buffer("codebook", codebook)
        self.register_buffer("ema_count", torch.ones(self.codebook_size))
        self.register_buffer("ema_sum", codebook.clone())

    def encode_continuous(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder output before quantisation, z_e: (B, n_latents, code_dim)."""
        check_batch_shape(type(self).__name__, x, self.input_shape)
        h = self.encoder(x.transpose(1, 2))  # (B, C, T): Conv1d wants channels first
        return self.to_codes(h.flatten(1)).view(-1, self.n_latents, self.code_dim)

    def nearest_codes(self, z_e: torch.Tensor) -> torch.Tensor:
        """Index of the nearest codebook entry (Euclidean) of every vector: (B, n_latents)."""
        flat = z_e.detach().reshape(-1, self.code_dim).float()
        # ‖z − e‖² = ‖z‖² − 2 z·e + ‖e‖²; ‖z‖² is the same for every entry, so it is left out.
        # In float32 under any trainer.precision: bf16's 8-bit mantissa would tie close codes.
        with torch.autocast(device_type=flat.device.type, enabled=False):
            distances = self.codebook.pow(2).sum(dim=1) - 2 * flat @ self.codebook.T
        return distances.argmin(dim=1).view(z_e.shape[:-1])

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The quantised code flattened, (B, latent_dim), and the constant log-variance."""
        z_q = self.codebook[self.nearest_codes(self.encode_continuous(x))].flatten(1)
        return z_q, torch.full_like(z_q, DETERMINISTIC_LOGVAR)

    def decode(self, z: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Return the reconstruction (B, T, C) of a flat latent (B, latent_dim); no branches."""
        h = self.from_codes(z).view(z.shape[0], *self._feature_shape)
        return self.decoder(h).transpose(1, 2), {}

    @torch.no_grad()
    def _update_codebook(self, z_e: torch.Tensor, codes: torch.Tensor) -> None:
        """One EMA step of the codebook, then restart the entries below the usage threshold.

        ema_count is the moving average of how many vectors of a batch each entry receives,
        ema_sum that of their sum (van den Oord et al. 2017, appendix A.1, decay γ = 0.99).
        An entry whose count falls under `dead_code_threshold` is moved onto a random encoder
        output of this batch, with count = threshold (Jukebox's restart, threshold 1.0).
        """
        flat, index = z_e.reshape(-1, self.code_dim).float(), codes.reshape(-1)
        counts = torch.bincount(index, minlength=self.codebook_size).to(flat.dtype)
        sums = torch.zeros_like(self.ema_sum).index_add_(0, index, flat)
        self.ema_count.mul_(self.ema_decay).add_(counts, alpha=1 - self.ema_decay)
        self.ema_sum.mul_(self.ema_decay).add_(sums, alpha=1 - self.ema_decay)
        # Drawn for every entry and applied where dead: no host sync to ask whether any is.
        dead = self.ema_count < self.dead_code_threshold
        picks = flat[torch.randint(len(flat), (self.codebook_size,), device=flat.device)]
        self.ema_sum.copy_(
            torch.where(dead[:, None], picks * self.dead_code_threshold, self.ema_sum)
        )
        self.ema_count.copy_(torch.where(dead, self.dead_code_threshold, self.ema_count))
        # With restarts off a count can decay to zero; such an entry keeps its last value.
        alive = self.ema_count > 1e-8
        means = self.ema_sum / self.ema_count.clamp(min=1e-8)[:, None]
        self.codebook.copy_(torch.where(alive[:, None], means, self.codebook))

    def forward(self, x: torch.Tensor) -> VAEOutput:
        """Encode, quantise (EMA step in training mode), decode through the straight-through z."""
        z_e = self.encode_continuous(x)
        codes = self.nearest_codes(z_e)
        z_q = self.codebook[codes]  # a buffer lookup: no gradient
        if self.training:
            self._update_codebook(z_e, codes)  # z_q keeps the entries this batch was coded with
        # Straight-through estimator (section 3.2): the forward value is z_q, the gradient
        # reaching z_e is the decoder's gradient at z_q.
        z = (z_e + (z_q - z_e).detach()).flatten(1)
        recon, branches = self.decode(z)
        kl = math.log(self.codebook_size) * self.n_latents
        mu = z_q.flatten(1)
        return VAEOutput(
            recon=recon,
            mu=mu,
            logvar=torch.full_like(mu, DETERMINISTIC_LOGVAR),
            z=z,
            branches=branches,
            extras={
                "codes": codes,
                "commitment": F.mse_loss(z_e, z_q),
                "codebook_loss": F.mse_loss(z_e.detach(), z_q),
                "kl": z.new_tensor(kl),
            },
        )
