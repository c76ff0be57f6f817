"""What every vaelab model returns, and the reparameterisation they share."""

from dataclasses import dataclass, field

import torch

from vaelab.errors import DataError

# What a sample of each rank is, for the message of checked_input_shape (None: any rank).
LAYOUTS = {2: "(T, C) for sequences", 4: "(C, D, H, W) for volumes", None: "non-empty"}


@dataclass
class VAEOutput:
    """One forward pass: the reconstruction, the posterior and the sampled code.

    `branches` maps a decoder branch name to that branch's own reconstruction, with the same
    shape as `recon`; it is empty for single-branch models. `extras` carries what a model
    needs its loss or diagnostics to see besides these (a VQ-VAE's codebook terms, say).
    """

    recon: torch.Tensor
    mu: torch.Tensor
    logvar: torch.Tensor
    z: torch.Tensor
    branches: dict[str, torch.Tensor] = field(default_factory=dict)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


def checked_input_shape(model: str, input_shape: object, rank: int | None) -> tuple[int, ...]:
    """input_shape as a tuple of positive ints of `rank`, or one DataError naming the layout.

    Hydra hands over lists or ListConfigs; plain ints keep the shape hashable and printable.
    """
    shape = tuple(int(s) for s in input_shape)
    if not shape or (rank is not None and len(shape) != rank) or min(shape) < 1:
        raise DataError(f"{model}: input_shape must be {LAYOUTS[rank]}, positive, got {shape}")
    return shape


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """z = mu + sigma * eps (Kingma & Welling 2014, section 2.4)."""
    return mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)


def floor_logvar(logvar: torch.Tensor, minimum: float | None) -> torch.Tensor:
    """Clamp the posterior log-variance from below (seed 004: posterior_logvar_min = -6).

    Without a floor a posterior can shrink its variance without bound, which makes the KL
    term and the reparameterised z numerically brittle. It lives in the model, not in the
    loss, because z is drawn from the floored variance.
    """
    return logvar if minimum is None else logvar.clamp(min=minimum)
