"""What every vaelab model returns, the checks they share, and the Gaussian VAE's one forward."""

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch
from torch import nn

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


def check_batch_shape(model: str, x: torch.Tensor, input_shape: tuple[int, ...]) -> None:
    """DataError naming the model unless x is a batch (B, *input_shape).

    Every model is built for one sample shape: dense layers fix the flattened size, and the
    1-D decoders' output paddings are chosen for one T, so another T could not round-trip.
    """
    if tuple(x.shape[1:]) != input_shape:
        expected = ", ".join(str(s) for s in ("B", *input_shape))
        raise DataError(f"{model}: expected input of shape ({expected}), got {tuple(x.shape)}")


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


class GaussianVAE(nn.Module, ABC):
    """A VAE with a diagonal Gaussian posterior: the one batch check, logvar floor and forward.

    A subclass calls `super().__init__` first, with the rank its samples must have (None: any),
    then builds its layers, and implements only what is its own: `posterior(x)`, the mean and
    raw log-variance of a batch already checked, and `decode(z)`.
    """

    def __init__(
        self,
        input_shape: object,
        latent_dim: int,
        posterior_logvar_min: float | None,
        *,
        input_rank: int | None,
    ) -> None:
        super().__init__()
        self.input_shape = checked_input_shape(type(self).__name__, input_shape, input_rank)
        self.latent_dim = int(latent_dim)
        self.posterior_logvar_min = posterior_logvar_min

    @abstractmethod
    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The posterior mean and the raw (unfloored) log-variance, each (B, latent_dim)."""

    @abstractmethod
    def decode(self, z: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The reconstruction (B, *input_shape) and each decoder branch's own, if any."""

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the posterior mean and the floored log-variance, each (B, latent_dim)."""
        check_batch_shape(type(self).__name__, x, self.input_shape)
        mu, logvar = self.posterior(x)
        return mu, floor_logvar(logvar, self.posterior_logvar_min)

    def forward(self, x: torch.Tensor) -> VAEOutput:
        """Encode, sample z in training mode (z = mu in eval mode), decode."""
        mu, logvar = self.encode(x)
        z = reparameterize(mu, logvar) if self.training else mu
        recon, branches = self.decode(z)
        return VAEOutput(recon=recon, mu=mu, logvar=logvar, z=z, branches=branches)
