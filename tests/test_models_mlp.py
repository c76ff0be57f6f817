"""The dense VAE (seed 002): flat and sequence inputs, and the seed's parameter counts."""

import pytest
import torch
from torch import nn

from vaelab.errors import DataError
from vaelab.models.mlp import MLPVAE


def test_mlp_vector_and_sequence_inputs() -> None:
    torch.manual_seed(0)
    vector = MLPVAE(input_shape=[20], latent_dim=4, hidden_dims=[16, 8])
    out = vector(torch.randn(5, 20))
    assert out.recon.shape == (5, 20) and out.mu.shape == (5, 4) and out.branches == {}
    sequence = MLPVAE(input_shape=(10, 3), latent_dim=4, hidden_dims=[16])
    out = sequence(torch.randn(5, 10, 3))
    assert out.recon.shape == (5, 10, 3) and out.logvar.shape == (5, 4)
    assert sequence.encoder[0][0].in_features == 30  # flattened T * C
    with pytest.raises(DataError, match="expected input"):
        sequence(torch.randn(5, 30))


def test_mlp_seed002_parameter_counts() -> None:
    # Seed 002: input 2772 -> 1024 -> 512 -> latent 256 and back. Its Keras summary counts four
    # numbers per BatchNormalization unit (gamma, beta, moving mean, moving variance); PyTorch
    # keeps the last two as buffers (running_mean, running_var), so they are added here.
    model = MLPVAE(input_shape=[2772], latent_dim=256, hidden_dims=[1024, 512])

    def keras_count(*modules: nn.Module) -> tuple[int, int]:
        params = sum(p.numel() for m in modules for p in m.parameters())
        stats = sum(
            b.numel()
            for m in modules
            for name, b in m.named_buffers()
            if name.endswith(("running_mean", "running_var"))
        )
        return params + stats, params

    encoder_total, encoder_trainable = keras_count(model.encoder, model.fc_mu, model.fc_logvar)
    decoder_total, decoder_trainable = keras_count(model.decoder)
    assert encoder_total == 3_633_152
    assert decoder_total == 3_504_340
    # Trainable weights: the seed's totals minus 2 * (1024 + 512) moving statistics each.
    assert encoder_trainable == 3_633_152 - 3_072
    assert decoder_trainable == 3_504_340 - 3_072
