"""Dense VAE for flat feature vectors such as k-mer profiles (seed 002)."""

import math
from collections.abc import Sequence

import torch
from torch import nn

from vaelab.models.base import GaussianVAE
from vaelab.models.priors import PriorFactory


def _dense_block(in_features: int, out_features: int, dropout: float) -> nn.Sequential:
    """Linear -> BatchNorm1d -> LeakyReLU(0.2) -> Dropout, the seed 002 layer."""
    # The Linear keeps its bias although BatchNorm follows: seed 002's Keras Dense layers have
    # one, and the seed's parameter counts (tested in tests/test_models_mlp.py) include it.
    return nn.Sequential(
        nn.Linear(in_features, out_features),
        nn.BatchNorm1d(out_features),
        nn.LeakyReLU(0.2),
        nn.Dropout(dropout),
    )


class MLPVAE(GaussianVAE):
    """Dense VAE with a symmetric decoder; (T, C) inputs are flattened to T*C features."""

    def __init__(
        self,
        input_shape: tuple[int, ...],
        latent_dim: int = 32,
        hidden_dims: Sequence[int] = (512, 256),
        dropout: float = 0.0,
        posterior_logvar_min: float | None = -6.0,
        prior: PriorFactory | None = None,
    ) -> None:
        super().__init__(
            input_shape, latent_dim, posterior_logvar_min, input_rank=None, prior=prior
        )
        hidden = [int(h) for h in hidden_dims]
        n_features = math.prod(self.input_shape)

        widths = [n_features, *hidden]
        self.encoder = nn.Sequential(
            *(_dense_block(a, b, dropout) for a, b in zip(widths[:-1], widths[1:], strict=True))
        )
        self.fc_mu = nn.Linear(widths[-1], self.latent_dim)
        self.fc_logvar = nn.Linear(widths[-1], self.latent_dim)

        # Symmetric decoder (seed 002): the hidden widths reversed, then a linear output layer,
        # because the targets (CLR-transformed k-mers, standardised vitals) are unbounded.
        widths = [self.latent_dim, *reversed(hidden)]
        self.decoder = nn.Sequential(
            *(_dense_block(a, b, dropout) for a, b in zip(widths[:-1], widths[1:], strict=True)),
            nn.Linear(widths[-1], n_features),
        )

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The posterior mean and the raw log-variance, each (B, latent_dim)."""
        h = self.encoder(x.flatten(1))
        return self.fc_mu(h), self.fc_logvar(h)

    def decode(self, z: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Return the reconstruction (B, *input_shape) and no branch outputs."""
        return self.decoder(z).view(z.shape[0], *self.input_shape), {}
