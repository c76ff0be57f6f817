"""Conv1D + LSTM VAE for (T, C) sequences: seed 003's autoencoder made variational.

`use_lstm=False` is seed 003's conv-only variant ("use_lstm=True (configurable)"; its "Before"
architecture): the conv features are flattened straight into the posterior, with no LSTM.
"""

from collections.abc import Sequence

import torch
from torch import nn

from vaelab.errors import ConfigError, DataError
from vaelab.models.base import GaussianVAE
from vaelab.models.layers import conv_out_length, transpose_output_padding
from vaelab.models.priors import PriorFactory

# Seed 003 quarters the sequence over its two convolutions, (B, 4, 256) -> (B, 32, 64), so each
# has stride 2. The seed gives neither kernel nor activation; kernel 5 and ReLU are our choice.
STRIDE = 2


class ConvLSTMVAE(GaussianVAE):
    """Strided Conv1d layers, then an LSTM whose last step gives the posterior; mirrored back.

    With use_lstm=False the LSTMs are left out: the last conv's (channels[-1], L) features are
    flattened into the posterior heads, and the decoder's Linear unflattens back to them.
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        latent_dim: int = 32,
        conv_channels: Sequence[int] = (16, 32),
        kernel: int = 5,
        lstm_hidden: int = 64,
        n_layers: int = 2,
        dropout: float = 0.5,
        posterior_logvar_min: float | None = -6.0,
        use_lstm: bool = True,
        prior: PriorFactory | None = None,
    ) -> None:
        super().__init__(input_shape, latent_dim, posterior_logvar_min, input_rank=2, prior=prior)
        channels = [int(c) for c in conv_channels]
        if not channels or min(channels) < 1:
            raise ConfigError(f"model.conv_channels must be non-empty and positive: {channels}")
        # An odd kernel with padding k // 2 makes every output_padding (T - 1) mod 2, inside
        # [0, stride - 1] as ConvTranspose1d requires; an even one can ask for -1.
        if kernel < 1 or kernel % 2 == 0:
            raise ConfigError(f"model.kernel must be odd and ≥ 1, got {kernel}")
        if lstm_hidden < 1 or n_layers < 1:
            raise ConfigError(
                f"model.lstm_hidden and model.n_layers must be ≥ 1, got {lstm_hidden}, {n_layers}"
            )
        n_steps, n_channels = self.input_shape
        if kernel > n_steps:
            # Deeper, shorter layers may read some zero padding; the first, which reads the raw
            # series, must not be wider than the series itself.
            raise DataError(
                f"ConvLSTMVAE: model.kernel={kernel} is larger than the sequence length {n_steps}"
            )
        between_layers = float(dropout) if n_layers > 1 else 0.0  # nn.LSTM: between layers only

        # lengths[i] is the input length of encoder conv i, and the exact output length of the
        # transposed conv that mirrors it: T=256 gives (256, 128, 64) as in seed 003.
        self.lengths = [n_steps]
        for _ in channels:
            self.lengths.append(conv_out_length(self.lengths[-1], kernel, STRIDE))

        widths = [n_channels, *channels]
        encoder: list[nn.Module] = []
        decoder: list[nn.Module] = []
        for i in range(len(channels)):
            encoder += [
                nn.Conv1d(widths[i], widths[i + 1], kernel, STRIDE, padding=kernel // 2),
                nn.ReLU(),
            ]
            # Chosen from the encoder's own lengths, so the decoder lands on exactly T with no
            # cropping or padding afterwards (the length arithmetic of the multi-scale decoder).
            pad = transpose_output_padding(self.lengths[i + 1], self.lengths[i], kernel, STRIDE)
            deconv = nn.ConvTranspose1d(
                widths[i + 1], widths[i], kernel, STRIDE, padding=kernel // 2, output_padding=pad
            )
            # No activation after the last layer: the targets (z-scored vitals) are unbounded.
            decoder[:0] = [deconv] if i == 0 else [deconv, nn.ReLU()]
        self.encoder_conv = nn.Sequential(*encoder)
        self.decoder_conv = nn.Sequential(*decoder)

        self.use_lstm = bool(use_lstm)
        if not self.use_lstm:
            # Seed 003's conv-only ("Before") encoder: Conv1d(2->16) -> Conv1d(16->32) ->
            # Flatten(2048) -> Linear(2048->32); here two such heads give mu and logvar. Its
            # decoder is not given: the mirror is Linear back to (channels[-1], L), ReLU (the
            # encoder's last conv ends in one), then the transposed convs. lstm_hidden,
            # n_layers and dropout then shape nothing.
            flat = channels[-1] * self.lengths[-1]
            self.fc_mu = nn.Linear(flat, self.latent_dim)
            self.fc_logvar = nn.Linear(flat, self.latent_dim)
            self.fc_decode = nn.Linear(self.latent_dim, flat)
            return

        # Seed 003: LSTM(32 -> 64, 2 layers, dropout 0.5) over the 64 conv steps; its last step
        # (B, 64) fed Linear(64 -> 32); here two such heads give mu and logvar.
        self.encoder_lstm = nn.LSTM(
            channels[-1], lstm_hidden, n_layers, batch_first=True, dropout=between_layers
        )
        self.fc_mu = nn.Linear(lstm_hidden, self.latent_dim)
        self.fc_logvar = nn.Linear(lstm_hidden, self.latent_dim)

        # Mirror: z -> Linear -> the same vector at each of the deepest conv steps -> an LSTM
        # from lstm_hidden back to the last conv width -> the transposed convs. Seed 003 gives
        # its decoder only as "LSTM decoder with matching architecture"; this is that mirror.
        self.fc_decode = nn.Linear(self.latent_dim, lstm_hidden)
        self.decoder_lstm = nn.LSTM(
            lstm_hidden, channels[-1], n_layers, batch_first=True, dropout=between_layers
        )

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The posterior mean and the raw log-variance, each (B, latent_dim)."""
        h = self.encoder_conv(x.transpose(1, 2))  # (B, C, T) -> (B, channels[-1], L)
        if self.use_lstm:
            _, (h_n, _) = self.encoder_lstm(h.transpose(1, 2))  # LSTM reads (B, L, channels)
            h = h_n[-1]  # (B, lstm_hidden): the top layer at the last step
        else:
            h = h.flatten(1)  # (B, channels[-1] * L), seed 003's Flatten(2048)
        return self.fc_mu(h), self.fc_logvar(h)

    def decode(self, z: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Return the reconstruction (B, T, C) and no branch outputs."""
        if self.use_lstm:
            steps = self.fc_decode(z).unsqueeze(1).expand(-1, self.lengths[-1], -1)
            h, _ = self.decoder_lstm(steps)  # (B, L, channels[-1])
            h = h.transpose(1, 2)
        else:
            h = torch.relu(self.fc_decode(z)).unflatten(1, (-1, self.lengths[-1]))
        return self.decoder_conv(h).transpose(1, 2), {}
