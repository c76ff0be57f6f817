"""What every vaelab model returns, the checks they share, and the Gaussian VAE's one forward."""

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch
from torch import nn

from vaelab.errors import ConfigError, DataError
from vaelab.models.priors import Prior, PriorFactory, StandardNormal

# What a sample of each rank is, for the message of checked_input_shape (None: any rank).
LAYOUTS = {2: "(T, C) for sequences", 4: "(C, D, H, W) for volumes", None: "non-empty"}


@dataclass
class VAEOutput:
    """One forward pass: the reconstruction, the posterior and the sampled code.

    `branches` maps a decoder branch name to that branch's own reconstruction, with the same
    shape as `recon`; it is empty for single-branch models. `extras` carries what a model
    needs its loss or diagnostics to see besides these (a VQ-VAE's codebook terms, say).
    `kl` is the model's Monte-Carlo estimate of KL(q(z|x) || p(z)) per sample, (B,) nats, under
    a prior without a closed form (vaelab.models.priors); None under N(0, I), whose KL the loss
    takes in closed form.
    """

    recon: torch.Tensor
    mu: torch.Tensor
    logvar: torch.Tensor
    z: torch.Tensor
    branches: dict[str, torch.Tensor] = field(default_factory=dict)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    kl: torch.Tensor | None = None


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


def build_prior(
    factory: PriorFactory | None, latent_dim: int, input_shape: tuple[int, ...]
) -> Prior:
    """The prior of a model, from its partial config node (`_partial_: true`); None: N(0, I),
    which has no parameters and no state, so a model without the option keeps its state dict."""
    if factory is None:
        return StandardNormal(latent_dim, input_shape)
    if not callable(factory):
        raise ConfigError(
            f"model.prior must be a prior's config node with _partial_: true "
            f"(conf/model/prior/*.yaml), got {factory!r}"
        )
    prior = factory(latent_dim=latent_dim, input_shape=input_shape)
    if not isinstance(prior, Prior):
        raise ConfigError(
            f"model.prior must build a vaelab.models.priors.Prior, got {type(prior).__name__}"
        )
    return prior


class GaussianVAE(nn.Module, ABC):
    """A VAE with a diagonal Gaussian posterior: the one batch check, logvar floor, prior and
    forward.

    A subclass calls `super().__init__` first, with the rank its samples must have (None: any),
    then builds its layers, and implements only what is its own: `posterior(x)`, the mean and
    raw log-variance of a batch already checked, and `decode(z)`. It passes on its `prior`
    keyword (`model.prior`, conf/model/prior/): p(z) is `self.prior`, N(0, I) when None
    (vaelab.models.priors).
    """

    def __init__(
        self,
        input_shape: object,
        latent_dim: int,
        posterior_logvar_min: float | None,
        *,
        input_rank: int | None,
        prior: PriorFactory | None = None,
    ) -> None:
        super().__init__()
        self.input_shape = checked_input_shape(type(self).__name__, input_shape, input_rank)
        self.latent_dim = int(latent_dim)
        self.posterior_logvar_min = posterior_logvar_min
        self.prior: Prior = build_prior(prior, self.latent_dim, self.input_shape)

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

    def encode_in_eval_mode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`encode` with every layer in eval mode (running BatchNorm statistics, no dropout),
        whatever mode the model is in; gradients flow as usual. The VampPrior's posteriors at
        its pseudo-inputs come from here (vaelab.models.priors.VampPrior says why)."""
        modes = [(module, module.training) for module in self.modules()]
        self.eval()
        try:
            return self.encode(x)
        finally:
            for module, training in modes:
                module.training = training

    def log_prior(self, z: torch.Tensor) -> torch.Tensor:
        """log p(z) of codes (..., latent_dim) under the model's prior: (...,) nats."""
        return self.prior.log_prob(z, self.encode_in_eval_mode)

    def forward(self, x: torch.Tensor) -> VAEOutput:
        """Encode, sample z in training mode (z = mu in eval mode), decode; under a prior
        without a closed-form KL, estimate the KL (`VAEOutput.kl`)."""
        mu, logvar = self.encode(x)
        if self.training:
            self.prior.observe(x)  # a VampPrior's pseudo-inputs from the first training samples
        # z = mu + eps * sigma as `reparameterize` draws it (the same numbers), with eps kept
        # for the prior's Monte-Carlo KL, which evaluates log q and log p at this z.
        eps = torch.randn_like(mu) if self.training else None
        z = mu if eps is None else mu + eps * torch.exp(0.5 * logvar)
        recon, branches = self.decode(z)
        kl = self.prior.kl(mu, logvar, eps, self.encode_in_eval_mode)
        return VAEOutput(recon=recon, mu=mu, logvar=logvar, z=z, branches=branches, kl=kl)
