"""The ELBO with the anti-collapse terms the seeds use, returned as named terms.

The loss is a plain callable built from config (`conf/loss/elbo.yaml`). It holds no schedule
state: β is an argument, computed by the schedule from the epoch, so a validation pass can
never move it (STYLE.md habit 6).
"""

from dataclasses import dataclass, field
from typing import Literal

import torch

from vaelab.errors import ConfigError
from vaelab.models.base import VAEOutput

FreeBitsMode = Literal["per_dim", "batch_mean", "per_sample"]
FREE_BITS_MODES = ("per_dim", "batch_mean", "per_sample")


@dataclass
class LossTerms:
    """Named terms of one loss evaluation (pythae habit: every term logged and tested by name).

    total:          what the optimiser minimises.
    recon:          masked MSE of the final reconstruction (mean over observed entries).
    kl_raw:         KL(q(z|x) || N(0, I)) in nats per sample, summed over latent dimensions.
    kl_constrained: the KL term after the free-bits floor, in the same units; what β multiplies.
    branch_recon:   masked MSE of each decoder branch's own reconstruction (multi-scale models).
    extras:         further named terms of a particular loss (a penalty, its weight), logged
                    as `train/<name>` and `val/<name>`; per-sample means like the rest.
    """

    total: torch.Tensor
    recon: torch.Tensor
    kl_raw: torch.Tensor
    kl_constrained: torch.Tensor
    branch_recon: dict[str, torch.Tensor] = field(default_factory=dict)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


def masked_mse(recon: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over observed entries only (mask 1 = observed).

    Mean reduction keeps the scale of the reconstruction comparable to the KL whatever the
    sequence length (seed 004: reduction="mean").
    """
    observed = mask.sum().clamp(min=1.0)
    return ((recon - target) ** 2 * mask).sum() / observed


def gaussian_kl_per_dim(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Closed-form KL(N(mu, exp(logvar)) || N(0, 1)) per sample and dimension, in nats.

    Kingma & Welling 2014, appendix B: -1/2 (1 + log σ² - μ² - σ²).
    """
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)


def free_bits_kl(kl_per_dim: torch.Tensor, free_bits: float, mode: FreeBitsMode) -> torch.Tensor:
    """The KL term with a floor of `free_bits` nats per latent dimension, nats per sample.

    Below the floor the term is constant, so the optimiser gains nothing by pushing KL lower.
    - per_dim: Kingma et al. 2016 (IAF paper, eq. 15): each dimension's KL, averaged over the
      minibatch, is floored: sum_d max(λ, mean_b KL_bd).
    - batch_mean: the floor applies to the minibatch-mean total rate, λ·D in all, so the model
      may spend it on a few informative dimensions (Pelsmaeker & Aziz 2020, seed 004):
      max(λ·D, mean_b sum_d KL_bd).
    - per_sample: every sample and dimension is floored (seed 004 recipe 3, the strongest):
      mean_b sum_d max(λ, KL_bd).
    By Jensen's inequality per_sample ≥ per_dim ≥ batch_mean ≥ the raw KL.
    """
    if free_bits <= 0:
        return kl_per_dim.sum(dim=1).mean()
    if mode == "per_dim":
        return kl_per_dim.mean(dim=0).clamp(min=free_bits).sum()
    if mode == "batch_mean":
        latent_dim = kl_per_dim.shape[1]
        return kl_per_dim.sum(dim=1).mean().clamp(min=free_bits * latent_dim)
    if mode == "per_sample":
        return kl_per_dim.clamp(min=free_bits).sum(dim=1).mean()
    raise ConfigError(
        f"loss.free_bits_mode must be one of {', '.join(FREE_BITS_MODES)}, got {mode!r}"
    )


class ElboLoss:
    """Negative ELBO: Gaussian reconstruction + β · KL with free bits and per-branch terms."""

    def __init__(
        self,
        free_bits: float = 0.0,
        free_bits_mode: FreeBitsMode = "per_dim",
        branch_weight: float = 0.0,
    ) -> None:
        if free_bits < 0:
            raise ConfigError(f"loss.free_bits must be ≥ 0 nats per dimension, got {free_bits}")
        if not 0.0 <= branch_weight <= 1.0:
            raise ConfigError(f"loss.branch_weight must lie in [0, 1], got {branch_weight}")
        if free_bits_mode not in FREE_BITS_MODES:
            raise ConfigError(
                f"loss.free_bits_mode must be one of {', '.join(FREE_BITS_MODES)}, "
                f"got {free_bits_mode!r}"
            )
        self.free_bits = free_bits
        self.free_bits_mode = free_bits_mode
        self.branch_weight = branch_weight

    def __call__(
        self,
        output: VAEOutput,
        target: torch.Tensor,
        mask: torch.Tensor,
        beta: float,
        epoch: float = 0.0,
    ) -> LossTerms:
        """Evaluate the loss of one batch at the KL weight β the schedule gives.

        `epoch` (fractional: epoch + step / steps per epoch) is there for losses whose own
        weights follow training progress; the plain ELBO does not use it.
        """
        recon = masked_mse(output.recon, target, mask)
        branch_recon = {
            name: masked_mse(branch, target, mask) for name, branch in output.branches.items()
        }
        # Seed 000: per-branch reconstruction terms force every temporal scale to carry
        # information. The final reconstruction keeps weight 1 - branch_weight.
        recon_objective = recon
        if branch_recon and self.branch_weight > 0:
            branch_mean = torch.stack(list(branch_recon.values())).mean()
            recon_objective = (1 - self.branch_weight) * recon + self.branch_weight * branch_mean

        kl_per_dim = gaussian_kl_per_dim(output.mu, output.logvar)
        kl_raw = kl_per_dim.sum(dim=1).mean()
        kl_constrained = free_bits_kl(kl_per_dim, self.free_bits, self.free_bits_mode)
        return LossTerms(
            total=recon_objective + beta * kl_constrained,
            recon=recon,
            kl_raw=kl_raw,
            kl_constrained=kl_constrained,
            branch_recon=branch_recon,
        )
