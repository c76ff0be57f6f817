"""The ELBO and its anti-collapse variants, each returned as named terms.

Every loss is a torch module built from config (`conf/loss/*.yaml`): `elbo`, `capacity`
(Burgess et al. 2018), `dip_vae` (Kumar et al. 2018) and `vq` (van den Oord et al. 2017).
They share one reconstruction part (`ReconstructionLoss`) and, for Gaussian posteriors, one
KL part with free bits (`GaussianLoss`). None holds schedule state: β and the fractional
epoch are arguments, so a validation pass can never move a schedule (STYLE.md habit 6). The
only parameters a loss may own are the learned decoder scales of `sigma: learned`.

A β with one meaning. With `reduction: sum` (the default) the reconstruction term is the
Gaussian negative log-likelihood -log p(x | z) in nats per sample, summed over the observed
entries, and the KL is summed over latent dimensions: β = 1 is the ELBO whatever the shape of
the input. `sigma` is the decoder's standard deviation: fixed (1 on standardised data), or
`learned`, one per channel: the calibrated decoder of Rybkin et al. 2021 (σ-VAE), whose
optimum σ² is the channel's mean squared error, so that β needs no balancing by hand.
`reduction: mean` (the masked MSE averaged over entries) is kept so that the seeds'
experiments reproduce their seeds' β.
"""

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from vaelab.distributed import gather_batch
from vaelab.errors import ConfigError, DataError
from vaelab.models.base import VAEOutput

FreeBitsMode = Literal["per_dim", "batch_mean", "per_sample"]
FREE_BITS_MODES = ("per_dim", "batch_mean", "per_sample")
REDUCTIONS = ("sum", "mean")
LOG_2PI = math.log(2.0 * math.pi)


@dataclass
class LossTerms:
    """Named terms of one loss evaluation (pythae habit: every term logged and tested by name).

    total:          what the optimiser minimises.
    recon:          masked MSE of the final reconstruction (mean over observed entries), to read.
    nll:            -log p(x | z) of the final reconstruction, nats per sample, summed over the
                    observed entries under the loss's Gaussian decoder (σ fixed or learned).
    kl_raw:         KL(q(z|x) || p(z)) in nats per sample, summed over latent dimensions:
                    closed-form against N(0, I), the model's Monte-Carlo estimate under a
                    mixture prior (VAEOutput.kl, vaelab.models.priors).
    kl_constrained: the KL term after the free-bits floor, in the same units; what β multiplies.
    branch_recon:   masked MSE of each decoder branch's own reconstruction (multi-scale models).
    extras:         further named terms of a particular loss (a penalty, its weight), logged
                    as `train/<name>` and `val/<name>`; per-sample means like the rest.
    """

    total: torch.Tensor
    recon: torch.Tensor
    nll: torch.Tensor
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


def gaussian_kl_per_dim(
    mu: torch.Tensor,
    logvar: torch.Tensor,
    prior_mean: torch.Tensor | None = None,
    prior_var: torch.Tensor | None = None,
) -> torch.Tensor:
    """Closed-form KL(N(mu, exp(logvar)) || N(0, 1)) per sample and dimension, in nats.

    Kingma & Welling 2014, appendix B: -1/2 (1 + log σ² - μ² - σ²). Given a prior mean m and
    variance v per dimension, (D,) each, the KL against N(m, v) instead:
    1/2 (log v - log σ² + (σ² + (μ - m)²) / v - 1); the diagnostics' per-dimension view under
    a mixture prior, against its moment-matched Gaussian (vaelab.models.priors.MixturePrior).
    """
    if prior_mean is None or prior_var is None:
        return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)
    prior_mean, prior_var = prior_mean.to(mu), prior_var.to(mu)
    return 0.5 * (
        prior_var.log() - logvar + (logvar.exp() + (mu - prior_mean).pow(2)) / prior_var - 1.0
    )


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


@dataclass
class Reconstruction:
    """The reconstruction part every loss shares.

    recon:        masked MSE of the final reconstruction (what `LossTerms.recon` reports).
    nll:          -log p(x | z) of the final reconstruction, nats per sample.
    objective:    what the loss minimises for reconstruction: the NLL (reduction sum) or the
                  MSE (reduction mean) of the final reconstruction, or its blend with the same
                  term of each branch when the model has branches and branch_weight > 0.
    branch_recon: masked MSE of each decoder branch's own reconstruction.
    """

    recon: torch.Tensor
    nll: torch.Tensor
    objective: torch.Tensor
    branch_recon: dict[str, torch.Tensor]


class ReconstructionLoss(nn.Module):
    """Base of every vaelab loss: the Gaussian decoder's likelihood, the masked reconstruction
    terms and the branch weighting.

    `n_channels` and `channel_axis` (where a batch (N, ...) holds its channels: -1, or 1 for
    volumes) come from the data at run time; a learned σ needs them, one σ per channel.
    """

    def __init__(
        self,
        branch_weight: float = 0.0,
        reduction: Literal["sum", "mean"] = "sum",
        sigma: float | Literal["learned"] = 1.0,
        n_channels: int | None = None,
        channel_axis: int = -1,
    ) -> None:
        super().__init__()
        if not 0.0 <= branch_weight <= 1.0:
            raise ConfigError(f"loss.branch_weight must lie in [0, 1], got {branch_weight}")
        if reduction not in REDUCTIONS:
            raise ConfigError(f"loss.reduction must be sum or mean, got {reduction!r}")
        self.branch_weight = branch_weight
        self.reduction = reduction
        self.channel_axis = channel_axis
        if sigma == "learned":
            if reduction == "mean":
                raise ConfigError(
                    "loss.sigma=learned needs loss.reduction=sum: a mean squared error has no σ"
                )
            if n_channels is None:
                raise ConfigError("loss.sigma=learned needs the data's number of channels")
            # log σ per channel, from σ = 1 (standardised data); Rybkin et al. 2021, section 3.
            self.log_sigma = nn.Parameter(torch.zeros(int(n_channels)))
        else:
            if isinstance(sigma, str) or not float(sigma) > 0:
                raise ConfigError(f"loss.sigma must be a number > 0 or 'learned', got {sigma!r}")
            self.register_buffer("log_sigma", torch.tensor(math.log(float(sigma))))

    def _log_sigma_like(self, target: torch.Tensor) -> torch.Tensor:
        """log σ broadcast against a batch: a scalar, or one value per channel on its axis."""
        if self.log_sigma.dim() == 0:
            return self.log_sigma
        shape = [1] * target.dim()
        shape[self.channel_axis] = len(self.log_sigma)
        return self.log_sigma.view(shape)

    def log_likelihood(
        self, recon: torch.Tensor, target: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """log N(target; recon, σ²) summed over each sample's observed entries: (B,) nats."""
        log_sigma = self._log_sigma_like(target)
        z = (target - recon) * torch.exp(-log_sigma)
        log_density = -0.5 * z.pow(2) - log_sigma - 0.5 * LOG_2PI
        return (log_density * mask).flatten(1).sum(dim=1)

    def reconstruction(
        self, output: VAEOutput, target: torch.Tensor, mask: torch.Tensor
    ) -> Reconstruction:
        """MSE and NLL of the reconstruction, each branch's, and the term the loss minimises."""
        recon = masked_mse(output.recon, target, mask)
        nll = -self.log_likelihood(output.recon, target, mask).mean()
        branch_recon = {
            name: masked_mse(branch, target, mask) for name, branch in output.branches.items()
        }
        if self.reduction == "sum":
            objective = nll
            branch_terms = [
                -self.log_likelihood(b, target, mask).mean() for b in output.branches.values()
            ]
        else:
            objective, branch_terms = recon, list(branch_recon.values())
        # Seed 000: per-branch reconstruction terms force every temporal scale to carry
        # information. The final reconstruction keeps weight 1 - branch_weight.
        if branch_terms and self.branch_weight > 0:
            branch_mean = torch.stack(branch_terms).mean()
            objective = (1 - self.branch_weight) * objective + self.branch_weight * branch_mean
        return Reconstruction(recon=recon, nll=nll, objective=objective, branch_recon=branch_recon)


class GaussianLoss(ReconstructionLoss):
    """Base of the losses of a diagonal Gaussian posterior: adds the KL with free bits."""

    def __init__(
        self,
        free_bits: float = 0.0,
        free_bits_mode: FreeBitsMode = "per_dim",
        branch_weight: float = 0.0,
        kl_reduction: Literal["sum", "mean"] = "sum",
        reduction: Literal["sum", "mean"] = "sum",
        sigma: float | Literal["learned"] = 1.0,
        n_channels: int | None = None,
        channel_axis: int = -1,
    ) -> None:
        super().__init__(branch_weight, reduction, sigma, n_channels, channel_axis)
        if kl_reduction not in ("sum", "mean"):
            raise ConfigError(f"loss.kl_reduction must be sum or mean, got {kl_reduction!r}")
        if free_bits < 0:
            raise ConfigError(f"loss.free_bits must be ≥ 0 nats per dimension, got {free_bits}")
        if free_bits_mode not in FREE_BITS_MODES:
            raise ConfigError(
                f"loss.free_bits_mode must be one of {', '.join(FREE_BITS_MODES)}, "
                f"got {free_bits_mode!r}"
            )
        self.free_bits = free_bits
        self.free_bits_mode = free_bits_mode
        self.kl_reduction = kl_reduction

    def kl_term(self, kl_constrained: torch.Tensor, latent_dim: int) -> torch.Tensor:
        """The KL as β multiplies it: summed over latent dimensions (the ELBO's own scale), or
        their mean, as seed 001's loss took it, so that its β = 0.5 means what it meant there."""
        return kl_constrained if self.kl_reduction == "sum" else kl_constrained / latent_dim

    def kl(self, output: VAEOutput) -> tuple[torch.Tensor, torch.Tensor]:
        """(kl_raw, kl_constrained): the KL and its free-bits version, nats per sample.

        Against N(0, I) the KL is closed-form, per dimension. Under a mixture prior the model
        gives a Monte-Carlo estimate per sample (`output.kl`), with no per-dimension split, so
        the free-bits floor applies to the total: max(λ·D, mean_b KL_b), the batch_mean mode;
        per_dim and per_sample, which floor single dimensions, are refused.
        """
        if output.kl is None:
            kl_per_dim = gaussian_kl_per_dim(output.mu, output.logvar)
            kl_raw = kl_per_dim.sum(dim=1).mean()
            return kl_raw, free_bits_kl(kl_per_dim, self.free_bits, self.free_bits_mode)
        if self.free_bits > 0 and self.free_bits_mode != "batch_mean":
            raise ConfigError(
                f"loss.free_bits_mode={self.free_bits_mode} floors the KL of each latent "
                "dimension, which a mixture prior (model.prior) does not have: its KL is one "
                "Monte-Carlo estimate per sample. Use loss.free_bits_mode=batch_mean, which "
                "floors the total at free_bits x latent_dim"
            )
        kl_raw = output.kl.mean()
        if self.free_bits <= 0:
            return kl_raw, kl_raw
        return kl_raw, kl_raw.clamp(min=self.free_bits * output.mu.shape[1])


class ElboLoss(GaussianLoss):
    """Negative ELBO: Gaussian reconstruction + β · KL with free bits and per-branch terms.

    Its settings are GaussianLoss's: free_bits, free_bits_mode, branch_weight.
    """

    def forward(
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
        rec = self.reconstruction(output, target, mask)
        kl_raw, kl_constrained = self.kl(output)
        return LossTerms(
            total=rec.objective + beta * self.kl_term(kl_constrained, output.mu.shape[1]),
            recon=rec.recon,
            nll=rec.nll,
            kl_raw=kl_raw,
            kl_constrained=kl_constrained,
            branch_recon=rec.branch_recon,
        )


def linear_ramp(epoch: float, start: float, duration: float) -> float:
    """0 before `start`, rising linearly to 1 over `duration` epochs, then 1 (a pure function).

    A zero duration is a step at `start`.
    """
    if epoch < start:
        return 0.0
    if duration <= 0:
        return 1.0
    return min((epoch - start) / duration, 1.0)


class CapacityLoss(GaussianLoss):
    """Controlled capacity: recon + γ · |KL − C(t)| (Burgess et al. 2018, arXiv:1804.03599).

    C(t) rises linearly from 0 to `capacity_max` nats over `capacity_epochs`, then holds, so
    the encoder is allowed, then made, to put C nats into the code. β from the schedule is
    ignored: C(t) is this loss's schedule (use schedule=constant, see conf/loss/capacity.yaml).
    With free bits the penalised KL is the floored one, so while C(t) is below the floor the
    gap stops pushing the KL down (the start, C = 0, would otherwise push towards collapse).
    """

    def __init__(
        self,
        gamma: float = 10.0,
        capacity_max: float = 25.0,
        capacity_epochs: float = 100.0,
        free_bits: float = 0.0,
        free_bits_mode: FreeBitsMode = "per_dim",
        branch_weight: float = 0.0,
        reduction: Literal["sum", "mean"] = "mean",
        sigma: float | Literal["learned"] = 1.0,
        n_channels: int | None = None,
        channel_axis: int = -1,
    ) -> None:
        super().__init__(
            free_bits,
            free_bits_mode,
            branch_weight,
            "sum",
            reduction,
            sigma,
            n_channels,
            channel_axis,
        )
        if gamma < 0:
            raise ConfigError(f"loss.gamma must be ≥ 0, got {gamma}")
        if capacity_max < 0:
            raise ConfigError(f"loss.capacity_max must be ≥ 0 nats, got {capacity_max}")
        if capacity_epochs < 0:
            raise ConfigError(f"loss.capacity_epochs must be ≥ 0, got {capacity_epochs}")
        self.gamma = gamma
        self.capacity_max = capacity_max
        self.capacity_epochs = capacity_epochs

    def capacity(self, epoch: float) -> float:
        """C(t) in nats per sample: 0 at epoch 0, capacity_max from capacity_epochs on."""
        return self.capacity_max * linear_ramp(epoch, 0.0, self.capacity_epochs)

    def forward(
        self,
        output: VAEOutput,
        target: torch.Tensor,
        mask: torch.Tensor,
        beta: float,
        epoch: float = 0.0,
    ) -> LossTerms:
        """Evaluate the loss of one batch at the fractional `epoch`; `beta` is not used."""
        rec = self.reconstruction(output, target, mask)
        kl_raw, kl_constrained = self.kl(output)
        capacity = kl_constrained.new_tensor(self.capacity(epoch))
        gap = (kl_constrained - capacity).abs()
        return LossTerms(
            total=rec.objective + self.gamma * gap,
            recon=rec.recon,
            nll=rec.nll,
            kl_raw=kl_raw,
            kl_constrained=kl_constrained,
            branch_recon=rec.branch_recon,
            extras={"capacity": capacity, "capacity_gap": gap},
        )


def dip_covariance(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Cov_q(z) = Cov_batch(mu) + mean_batch(diag(exp(logvar))), (D, D), always in float32.

    Kumar et al. 2018 (DIP-VAE-II, section 3): the covariance of the aggregate posterior
    q(z) = E_x q(z|x). Cov_batch is the population covariance (1/B, as disentanglement_lib's
    compute_covariance_z_mean), which stays defined for a batch of one. Autocast is switched
    off so a half-precision forward pass still gets a float32 matrix (seed 004).
    """
    with torch.autocast(device_type=mu.device.type, enabled=False):
        mu, logvar = mu.float(), logvar.float()
        centred = mu - mu.mean(dim=0, keepdim=True)
        cov_mu = centred.T @ centred / len(mu)
        return cov_mu + torch.diag(logvar.exp().mean(dim=0))


def dip_penalties(cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ_{i≠j} Cov_ij², Σ_i (Cov_ii − 1)²): the two DIP-VAE-II penalties of one covariance."""
    diagonal = torch.diagonal(cov)
    off_diagonal = cov.pow(2).sum() - diagonal.pow(2).sum()
    return off_diagonal, (diagonal - 1.0).pow(2).sum()


class DipVaeLoss(ElboLoss):
    """DIP-VAE-II (Kumar et al. 2018, section 3; seed 004):
    the ELBO with free bits + λ_od · Σ_{i≠j} Cov_ij² + λ_d · Σ_i (Cov_ii − 1)².

    The λs follow a pure function of the epoch: 0 before `lambda_start_epoch`, so the VAE
    trains on its own first, then a linear warm-up over `lambda_annealing_epochs` to the
    targets (seed 004 recipe 1). β multiplies the KL exactly as in ElboLoss.

    Under torchrun (vaelab.distributed), with `ddp_gather` (seed 004's use_ddp_gather), Cov is
    taken over the global batch: the train step gathers mu and logvar from every rank.
    """

    def __init__(
        self,
        lambda_od: float = 10.0,
        lambda_d: float = 5.0,
        lambda_start_epoch: float = 20.0,
        lambda_annealing_epochs: float = 40.0,
        free_bits: float = 0.0,
        free_bits_mode: FreeBitsMode = "per_dim",
        branch_weight: float = 0.0,
        reduction: Literal["sum", "mean"] = "mean",
        sigma: float | Literal["learned"] = 1.0,
        n_channels: int | None = None,
        channel_axis: int = -1,
        ddp_gather: bool = True,
    ) -> None:
        super().__init__(
            free_bits,
            free_bits_mode,
            branch_weight,
            "sum",
            reduction,
            sigma,
            n_channels,
            channel_axis,
        )
        for key, value in {
            "lambda_od": lambda_od,
            "lambda_d": lambda_d,
            "lambda_start_epoch": lambda_start_epoch,
            "lambda_annealing_epochs": lambda_annealing_epochs,
        }.items():
            if value < 0:
                raise ConfigError(f"loss.{key} must be ≥ 0, got {value}")
        self.lambda_od = lambda_od
        self.lambda_d = lambda_d
        self.lambda_start_epoch = lambda_start_epoch
        self.lambda_annealing_epochs = lambda_annealing_epochs
        self.ddp_gather = bool(ddp_gather)

    def lambdas(self, epoch: float) -> tuple[float, float]:
        """(λ_od, λ_d) at the fractional `epoch`."""
        ramp = linear_ramp(epoch, self.lambda_start_epoch, self.lambda_annealing_epochs)
        return self.lambda_od * ramp, self.lambda_d * ramp

    def gathers(self) -> bool:
        """Whether this evaluation takes its batch statistics over every rank's batch.

        The train step runs with gradients on every rank at once; a no-grad pass (validation,
        the final record) runs on rank 0 alone and must not wait for the others: it scores its
        own batch. In one process the gather is the identity.
        """
        return self.ddp_gather and torch.is_grad_enabled()

    def kl(self, output: VAEOutput) -> tuple[torch.Tensor, torch.Tensor]:
        """GaussianLoss.kl, with the free-bits floor on the global batch's mean KL under torchrun.

        per_dim and batch_mean floor a batch mean, and one rank's slice can sit on the other
        side of the floor from the whole batch (seed 004's batch_mean at 0.2 nats per dim);
        the gathered KL gives one process's term and gradient, by the argument in `forward`.
        """
        if output.kl is not None or self.free_bits <= 0 or not self.gathers():
            return super().kl(output)
        kl_per_dim = gaussian_kl_per_dim(output.mu, output.logvar)
        kl_raw = kl_per_dim.sum(dim=1).mean()
        return kl_raw, free_bits_kl(gather_batch(kl_per_dim), self.free_bits, self.free_bits_mode)

    def forward(
        self,
        output: VAEOutput,
        target: torch.Tensor,
        mask: torch.Tensor,
        beta: float,
        epoch: float = 0.0,
    ) -> LossTerms:
        """The ELBO terms of ElboLoss, plus the covariance penalty at this epoch's λs."""
        terms = super().forward(output, target, mask, beta, epoch)
        lambda_od, lambda_d = self.lambdas(epoch)
        mu, logvar = output.mu, output.logvar
        # Under torchrun, Cov over the global batch of N·B (seed 004), with no rescaling for the
        # gradient to equal one process's: every rank's penalty P is the same function of the
        # gathered mu, the gather's backward sums the N ranks' equal gradients dP/dmu_r, so
        # rank r's encoder receives N · dP/dmu_r, and DDP's average over ranks,
        # (1/N) Σ_r N · dP/dmu_r · dmu_r/dθ, is dP/dθ. The reconstruction is a mean over each
        # rank's B samples, which DDP's average turns into the mean over N·B
        # (tests/test_distributed.py checks the loss and every gradient).
        if self.gathers():
            mu, logvar = gather_batch(mu), gather_batch(logvar)
        off_diagonal, diagonal = dip_penalties(dip_covariance(mu, logvar))
        penalty = lambda_od * off_diagonal + lambda_d * diagonal
        terms.total = terms.total + penalty
        terms.extras = {
            "cov_offdiag": off_diagonal,
            "cov_diag": diagonal,
            "lambda_od": penalty.new_tensor(lambda_od),
            "lambda_d": penalty.new_tensor(lambda_d),
            "cov_penalty": penalty,
        }
        return terms


class SupervisedLatentLoss(DipVaeLoss):
    """Seed 004's Experiment 3: DIP-VAE-II with latent dimensions tied to known state variables,
    L = DIP-VAE-II + volume_weight · ||z_vol − log V_gt||² + location_weight · ||z_loc − c_gt||².

    z_vol is latent dimension 0, z_loc dimensions 1 .. len(location_factors) (seed 004's
    "latent partition": z_vol ∈ R¹ log-volume, z_loc ∈ R³ centroid; its z_shape is not
    supervised and is left to the other dimensions with the rest). The targets of a batch,
    (B, 1 + len(location_factors)) in that order, come from the data set's known factors
    (`targets_from`) and are passed with the batch as `latent_targets`: the loss holds no
    table of samples and no state, so it cannot be fed the wrong rows by a shuffle.

    The squared errors are taken on the posterior mean, not on the sample z the seed writes:
    E||z − t||² = ||mu − t||² + Σσ², so regressing the sample would also drive the supervised
    dimensions' variance to the log-variance floor, against the KL and DIP's Cov_ii → 1; the
    mean is the state a downstream ODE reads. Seed 004 gives no weights: both terms are
    unweighted there, so 1.0 each. The targets sit off the N(0, 1) prior (log V ≈ 1-5 in
    voxels): where the KL term is not flat, its pull μ balances 2 (μ − t) at μ = 2t/3 (β = 1,
    unit weight), a shrunken z_vol; under seed 004's free-bits floor (0.2 x 128 = 25.6 nats,
    which the supervised dimensions' few nats do not reach) the KL term is flat and μ reaches t.
    """

    def __init__(
        self,
        volume_factor: str = "lesion_volume",
        location_factors: tuple[str, ...] | list[str] = ("centroid_d", "centroid_h", "centroid_w"),
        volume_weight: float = 1.0,
        location_weight: float = 1.0,
        lambda_od: float = 10.0,
        lambda_d: float = 5.0,
        lambda_start_epoch: float = 20.0,
        lambda_annealing_epochs: float = 40.0,
        free_bits: float = 0.0,
        free_bits_mode: FreeBitsMode = "per_dim",
        branch_weight: float = 0.0,
        reduction: Literal["sum", "mean"] = "mean",
        sigma: float | Literal["learned"] = 1.0,
        n_channels: int | None = None,
        channel_axis: int = -1,
    ) -> None:
        super().__init__(
            lambda_od,
            lambda_d,
            lambda_start_epoch,
            lambda_annealing_epochs,
            free_bits,
            free_bits_mode,
            branch_weight,
            reduction,
            sigma,
            n_channels,
            channel_axis,
        )
        for key, value in (("volume_weight", volume_weight), ("location_weight", location_weight)):
            if not value >= 0:  # also refuses NaN
                raise ConfigError(f"loss.{key} must be ≥ 0, got {value}")
        self.volume_factor = str(volume_factor)
        self.location_factors = tuple(str(name) for name in location_factors)
        self.volume_weight = volume_weight
        self.location_weight = location_weight

    @property
    def target_names(self) -> tuple[str, ...]:
        """The factors the supervised dimensions 0, 1, ... regress on, in order."""
        return (self.volume_factor, *self.location_factors)

    def targets_from(
        self, factors: Mapping[str, object], source: str = "the data set"
    ) -> torch.Tensor:
        """(N, 1 + len(location_factors)) float32 targets from a SampleSet's `factors`:
        log of the volume factor (seed 004: z_vol is the log-volume), then the location
        factors as they are. DataError when a factor is missing, not finite, or a volume ≤ 0."""
        missing = [name for name in self.target_names if name not in factors]
        if missing:
            raise DataError(
                f"{source}: loss=supervised_latent needs the factors {', '.join(missing)}; the "
                f"data set has {', '.join(sorted(factors)) or 'no factors'}"
            )
        columns = [torch.as_tensor(factors[n], dtype=torch.float64) for n in self.target_names]
        volume = columns[0]
        if not (torch.isfinite(volume).all() and (volume > 0).all()):
            raise DataError(
                f"{source}: factor {self.volume_factor}: expected finite volumes > 0 for its "
                f"log, found {int((~(volume > 0)).sum())} ≤ 0 or NaN"
            )
        targets = torch.stack([volume.log(), *columns[1:]], dim=1)
        if not torch.isfinite(targets).all():
            names = zip(self.target_names, columns, strict=True)
            bad = [name for name, column in names if not column.isfinite().all()]
            raise DataError(f"{source}: factors {', '.join(bad)}: expected finite values")
        return targets.float()

    def forward(
        self,
        output: VAEOutput,
        target: torch.Tensor,
        mask: torch.Tensor,
        beta: float,
        epoch: float = 0.0,
        latent_targets: torch.Tensor | None = None,
    ) -> LossTerms:
        """The DIP-VAE-II terms, plus the supervised squared errors of the batch's targets."""
        n_targets = len(self.target_names)
        if latent_targets is None:
            raise ConfigError(
                "loss=supervised_latent needs each batch's latent targets (latent_targets, "
                "from SupervisedLatentLoss.targets_from): this training loop does not pass them"
            )
        if latent_targets.shape != (len(output.mu), n_targets):
            raise DataError(
                f"latent_targets: expected ({len(output.mu)}, {n_targets}) for "
                f"{', '.join(self.target_names)}, found {tuple(latent_targets.shape)}"
            )
        if output.mu.shape[1] < n_targets:
            raise ConfigError(
                f"loss=supervised_latent ties {n_targets} latent dimensions to factors; "
                f"model.latent_dim is {output.mu.shape[1]}"
            )
        terms = super().forward(output, target, mask, beta, epoch)
        squared = (output.mu[:, :n_targets] - latent_targets.to(output.mu.dtype)) ** 2
        volume_error = squared[:, 0].mean()  # ||z_vol − log V_gt||², batch mean
        location_error = squared[:, 1:].sum(dim=1).mean()  # ||z_loc − c_gt||², batch mean
        penalty = self.volume_weight * volume_error + self.location_weight * location_error
        terms.total = terms.total + penalty
        terms.extras |= {
            "z_vol_mse": volume_error,
            "z_loc_mse": location_error,
            "supervised_penalty": penalty,
        }
        return terms


# What a quantising model (vaelab.models.vqvae.VQVAE) puts in VAEOutput.extras for VQLoss.
VQ_EXTRAS = ("codes", "commitment", "codebook_loss", "kl")


def code_perplexity(codes: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of the histogram of `codes` (any shape, long indices), in float32.

    Equals the number of codes for uniform use and 1 when one code takes every position.
    """
    counts = torch.bincount(codes.flatten()).float()
    p = counts[counts > 0] / counts.sum()
    return torch.exp(-(p * p.log()).sum())


class VQLoss(ReconstructionLoss):
    """VQ-VAE objective (van den Oord et al. 2017, eq. 3):
    recon + ‖sg[z_e] − e‖² + commitment_cost · ‖z_e − sg[e]‖².

    The model computes both squared distances (mean over latents and code dimensions) and
    passes them in `output.extras`. With vaelab's EMA codebook the codebook term carries no
    gradient (the codebook is not a parameter) and only its value is reported; the sum is
    kept so that a loss-trained codebook would need no other loss. β is ignored: the KL of a
    one-hot posterior against the uniform prior is the constant n_latents · log K
    (van den Oord et al. 2017, section 3.1), reported as `kl_raw`; nothing in the objective
    is β-weighted, so `kl_constrained` is 0.
    """

    def __init__(
        self,
        commitment_cost: float = 0.25,
        branch_weight: float = 0.0,
        reduction: Literal["sum", "mean"] = "mean",
        sigma: float | Literal["learned"] = 1.0,
        n_channels: int | None = None,
        channel_axis: int = -1,
    ) -> None:
        super().__init__(branch_weight, reduction, sigma, n_channels, channel_axis)
        if commitment_cost < 0:
            raise ConfigError(f"loss.commitment_cost must be ≥ 0, got {commitment_cost}")
        self.commitment_cost = commitment_cost

    def forward(
        self,
        output: VAEOutput,
        target: torch.Tensor,
        mask: torch.Tensor,
        beta: float,
        epoch: float = 0.0,
    ) -> LossTerms:
        """Evaluate the loss of one batch; `beta` and `epoch` are not used."""
        missing = [name for name in VQ_EXTRAS if name not in output.extras]
        if missing:
            raise ConfigError(
                f"loss=vq needs a quantising model (model=vqvae): the model output lacks "
                f"extras {', '.join(missing)}"
            )
        rec = self.reconstruction(output, target, mask)
        commitment = output.extras["commitment"]
        codebook_loss = output.extras["codebook_loss"]
        return LossTerms(
            total=rec.objective + codebook_loss + self.commitment_cost * commitment,
            recon=rec.recon,
            nll=rec.nll,
            kl_raw=output.extras["kl"],
            kl_constrained=torch.zeros_like(rec.recon),
            branch_recon=rec.branch_recon,
            extras={
                "commitment": commitment,
                "codebook_loss": codebook_loss,
                "perplexity": code_perplexity(output.extras["codes"]),
            },
        )
