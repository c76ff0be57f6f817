"""3D convolutional VAE for (C, D, H, W) volumes such as 4-modality MRI (seed 004)."""

import math

import torch
from torch import nn

from vaelab.errors import ConfigError, DataError
from vaelab.models.base import GaussianVAE
from vaelab.models.priors import PriorFactory

# With model.n_down = null, halve while every side stays even and at least MIN_GRID voxels, at
# most MAX_DERIVED_DOWN times: 32³ -> 4³, and 128³ -> 8³, seed 004's compact feature volume.
MAX_DERIVED_DOWN = 4
MIN_GRID = 4


def derive_n_down(spatial: tuple[int, ...]) -> int:
    """The number of stride-2 levels model.n_down = null picks for these spatial sizes."""
    n = 0
    while n < MAX_DERIVED_DOWN and all(
        s % 2 ** (n + 1) == 0 and s // 2 ** (n + 1) >= MIN_GRID for s in spatial
    ):
        n += 1
    return n


def coordinate_grid(grid: tuple[int, int, int]) -> torch.Tensor:
    """(1, 3, D, H, W) channels holding each voxel's D, H and W coordinate, in [-1, 1]."""
    # Watters et al. 2019, section 2: the spatial broadcast decoder's fixed coordinate channels.
    axes = [torch.linspace(-1.0, 1.0, n) for n in grid]
    return torch.stack(torch.meshgrid(*axes, indexing="ij")).unsqueeze(0)


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    """GroupNorm, not BatchNorm: 3D batches hold 2 to 4 volumes (seed 004; Wu & He 2018)."""
    return nn.GroupNorm(groups, channels)


class _ResidualDown(nn.Module):
    """Halve each side: two 3x3x3 convs beside a strided 1x1x1 projection (He et al. 2016)."""

    def __init__(self, c_in: int, c_out: int, groups: int) -> None:
        super().__init__()
        # No conv biases: the GroupNorm after each conv has its own shift.
        self.main = nn.Sequential(
            nn.Conv3d(c_in, c_out, 3, stride=2, padding=1, bias=False),
            _norm(c_out, groups),
            nn.LeakyReLU(0.2),
            nn.Conv3d(c_out, c_out, 3, padding=1, bias=False),
            _norm(c_out, groups),
        )
        # Projection shortcut ("option B"): the channels and the grid both change.
        self.skip = nn.Sequential(
            nn.Conv3d(c_in, c_out, 1, stride=2, bias=False), _norm(c_out, groups)
        )
        self.act = nn.LeakyReLU(0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual sum of the strided path and the projected input, then the activation."""
        return self.act(self.main(x) + self.skip(x))


def _up_transposed(c_in: int, c_out: int, groups: int) -> nn.Sequential:
    """Double each side with ConvTranspose3d(k=4, s=2, p=1): exactly 2L, no output_padding."""
    return nn.Sequential(
        nn.ConvTranspose3d(c_in, c_out, 4, stride=2, padding=1, bias=False),
        _norm(c_out, groups),
        nn.LeakyReLU(0.2),
    )


def _up_resize(c_in: int, c_out: int, groups: int) -> nn.Sequential:
    """Double each side by nearest resize then a 3x3x3 conv (seed 004's "resize_conv")."""
    # Resize-convolution avoids the checkerboard of transposed convs (Odena et al. 2016).
    return nn.Sequential(
        nn.Upsample(scale_factor=2, mode="nearest"),
        nn.Conv3d(c_in, c_out, 3, padding=1, bias=False),
        _norm(c_out, groups),
        nn.LeakyReLU(0.2),
    )


class Conv3DVAE(GaussianVAE):
    """Residual 3D encoder to a compact grid; transposed-conv or spatial broadcast decoder."""

    def __init__(
        self,
        input_shape: tuple[int, ...],
        latent_dim: int = 32,
        base_channels: int = 8,
        n_down: int | None = None,
        norm_groups: int = 4,
        use_sbd: bool = False,
        posterior_logvar_min: float | None = -6.0,
        prior: PriorFactory | None = None,
    ) -> None:
        super().__init__(input_shape, latent_dim, posterior_logvar_min, input_rank=4, prior=prior)
        if base_channels < 1:
            raise ConfigError(f"model.base_channels must be ≥ 1, got {base_channels}")
        # Every level has base_channels * 2**i channels, so dividing the first divides them all.
        if norm_groups < 1 or base_channels % norm_groups:
            raise ConfigError(
                f"model.norm_groups={norm_groups} must divide model.base_channels="
                f"{base_channels}: GroupNorm splits the channels into equal groups"
            )
        n_channels, *spatial = self.input_shape
        if n_down is None:
            n_down = derive_n_down(tuple(spatial))
            if n_down == 0:
                raise DataError(
                    f"Conv3DVAE: input_shape {self.input_shape} cannot be halved once with every "
                    f"side staying even and ≥ {2 * MIN_GRID}; use larger volumes or set "
                    f"model.n_down"
                )
        elif n_down < 1:
            raise ConfigError(f"model.n_down must be ≥ 1 or null, got {n_down}")
        elif any(s % 2**n_down for s in spatial):
            raise DataError(
                f"Conv3DVAE: the spatial sizes of input_shape {self.input_shape} must be "
                f"divisible by 2**model.n_down = {2**n_down}"
            )
        self.n_down = int(n_down)
        self.use_sbd = bool(use_sbd)
        groups = int(norm_groups)
        widths = [int(base_channels) * 2**i for i in range(self.n_down + 1)]
        self.grid = tuple(s // 2**self.n_down for s in spatial)  # the compact feature volume
        flat = widths[-1] * math.prod(self.grid)

        self.encoder = nn.Sequential(
            nn.Conv3d(n_channels, widths[0], 3, padding=1, bias=False),
            _norm(widths[0], groups),
            nn.LeakyReLU(0.2),
            *(_ResidualDown(widths[i], widths[i + 1], groups) for i in range(self.n_down)),
        )
        # Seed 004: flatten the compact volume into a diagonal Gaussian posterior.
        self.fc_mu = nn.Linear(flat, self.latent_dim)
        self.fc_logvar = nn.Linear(flat, self.latent_dim)

        if self.use_sbd:
            # Spatial broadcast decoder (Watters et al. 2019): z tiled over the compact grid with
            # three coordinate channels, so position comes from the coordinates and content
            # from z. Watters et al. broadcast to the full image with stride-1 convs; at 128³
            # that is out of reach, so as in seed 004 the grid is small (8³ there) and
            # resize-convs upsample it. Seed 004 warns that this decoder can learn a template
            # from the coordinates alone and ignore z: the switch exists to study that collapse.
            self.register_buffer("coords", coordinate_grid(self.grid), persistent=False)
            self.decoder_input = nn.Sequential(
                nn.Conv3d(self.latent_dim + 3, widths[-1], 3, padding=1, bias=False),
                _norm(widths[-1], groups),
                nn.LeakyReLU(0.2),
            )
            up = _up_resize
        else:
            # Seed 004's baseline: a linear map back to the compact volume, transposed convs up.
            self.decoder_input = nn.Sequential(
                nn.Linear(self.latent_dim, flat),
                nn.Unflatten(1, (widths[-1], *self.grid)),
                nn.LeakyReLU(0.2),
            )
            up = _up_transposed
        # Linear output conv: the targets are z-scored intensities (seed 004), unbounded.
        self.decoder = nn.Sequential(
            *(up(widths[i + 1], widths[i], groups) for i in reversed(range(self.n_down))),
            nn.Conv3d(widths[0], n_channels, 3, padding=1),
        )

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The posterior mean and the raw log-variance, each (B, latent_dim)."""
        h = self.encoder(x).flatten(1)
        return self.fc_mu(h), self.fc_logvar(h)

    def decode(self, z: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Return the reconstruction (B, C, D, H, W) and no branch outputs."""
        if self.use_sbd:
            tiled = z[:, :, None, None, None].expand(-1, -1, *self.grid)
            coords = self.coords.expand(z.shape[0], -1, -1, -1, -1)
            h = self.decoder_input(torch.cat([tiled, coords], dim=1))
        else:
            h = self.decoder_input(z)
        return self.decoder(h), {}
