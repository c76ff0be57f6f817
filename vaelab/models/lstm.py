"""LSTM-VAE for (T, C) sequences: the seed 000 model that collapsed, kept as the baseline."""

import torch
from torch import nn

from vaelab.errors import ConfigError
from vaelab.models.base import GaussianVAE
from vaelab.models.priors import PriorFactory


class LSTMVAE(GaussianVAE):
    """Stacked-LSTM encoder and non-autoregressive LSTM decoder conditioned on z alone."""

    def __init__(
        self,
        input_shape: tuple[int, ...],
        latent_dim: int = 32,
        hidden_dim: int = 128,
        n_layers: int = 2,
        dropout: float = 0.0,
        posterior_logvar_min: float | None = -6.0,
        prior: PriorFactory | None = None,
    ) -> None:
        super().__init__(input_shape, latent_dim, posterior_logvar_min, input_rank=2, prior=prior)
        if hidden_dim < 1:
            raise ConfigError(f"model.hidden_dim must be ≥ 1, got {hidden_dim}")
        if n_layers < 1:
            raise ConfigError(f"model.n_layers must be ≥ 1, got {n_layers}")
        n_channels = self.input_shape[1]
        self.hidden_dim = int(hidden_dim)
        self.n_layers = int(n_layers)
        # nn.LSTM applies dropout between stacked layers only, and warns if asked for it with one.
        between_layers = float(dropout) if self.n_layers > 1 else 0.0

        self.encoder = nn.LSTM(
            n_channels, self.hidden_dim, self.n_layers, batch_first=True, dropout=between_layers
        )
        # The top layer's last hidden state summarises the whole sequence (seed 000's encoder).
        self.fc_mu = nn.Linear(self.hidden_dim, self.latent_dim)
        self.fc_logvar = nn.Linear(self.hidden_dim, self.latent_dim)

        # Decoder: z sets every layer's initial (h, c) through one linear map (Bowman et al.
        # 2016, section 3.1) and is also fed as the input at every step ("RepeatVector"), so it
        # cannot be forgotten over 745 steps. It is not autoregressive (no previous outputs, no
        # teacher forcing): seed 000 reports the collapse persisted "despite ... weaker decoder",
        # so the baseline keeps the weak form, where z is the decoder's only source of
        # information. A collapse here is then the objective's doing, not the decoder's.
        self.fc_state = nn.Linear(self.latent_dim, 2 * self.n_layers * self.hidden_dim)
        self.decoder = nn.LSTM(
            self.latent_dim,
            self.hidden_dim,
            self.n_layers,
            batch_first=True,
            dropout=between_layers,
        )
        # Linear output: the targets (standardised vitals) are unbounded.
        self.fc_out = nn.Linear(self.hidden_dim, n_channels)

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The posterior mean and the raw log-variance, each (B, latent_dim)."""
        _, (h_n, _) = self.encoder(x)
        h = h_n[-1]  # (B, hidden_dim): the top layer at the last step
        return self.fc_mu(h), self.fc_logvar(h)

    def decode(self, z: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Return the reconstruction (B, T, C) and no branch outputs."""
        n_steps = self.input_shape[0]
        # (B, 2 * L * H) -> two (L, B, H) tensors, the layout nn.LSTM wants for (h_0, c_0).
        state = self.fc_state(z).view(z.shape[0], 2, self.n_layers, self.hidden_dim)
        h_0, c_0 = state.permute(1, 2, 0, 3).contiguous().unbind(0)
        inputs = z.unsqueeze(1).expand(-1, n_steps, -1)  # (B, T, latent_dim)
        h, _ = self.decoder(inputs, (h_0, c_0))
        return self.fc_out(h), {}
