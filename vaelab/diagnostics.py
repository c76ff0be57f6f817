"""Collapse diagnostics on a data split (seed 004 section 2, seed 000 success criteria).

A collapsed VAE shows itself in several ways at once: raw KL near zero, few active units,
near-constant posterior means, and a decoder that reconstructs as well from z = 0 as from
the code. `diagnose` measures all of them in one pass over a split. A quantising model
(VQ-VAE) cannot collapse its posterior; for it, active units are replaced by codebook usage.
"""

import math
from dataclasses import dataclass, field

import torch

from vaelab.losses import ElboLoss, code_perplexity, gaussian_kl_per_dim

ACTIVE_UNIT_THRESHOLD = 0.01  # Burda et al. 2016 (IWAE paper), section 5.2
# Seed 000 "Success Criteria": thresholds a healthy latent space must clear.
HEALTHY_KL_NATS = 0.01
HEALTHY_MU_STD = 0.1
HEALTHY_LOGVAR_MEAN = -5.0


def active_units(mu: torch.Tensor, threshold: float = ACTIVE_UNIT_THRESHOLD) -> int:
    """Dimensions whose posterior mean varies over the data: Var_x(E_q[z_d | x]) ≥ threshold.

    Burda et al. 2016: a unit the encoder leaves at the same mean for every input carries
    no information, whatever its KL.
    """
    if len(mu) < 2:
        return 0
    return int((mu.var(dim=0, unbiased=False) >= threshold).sum())


def mutual_information(mu: torch.Tensor, logvar: torch.Tensor, seed: int = 0) -> float:
    """He et al. 2019 (Lagging inference networks, eq. 4) estimate of I(x; z) in nats.

    I = E_x[ E_q(z|x) log q(z|x) - log q(z) ], with the aggregate posterior q(z)
    approximated by the mixture of the N posteriors in the split, one z sample per x. It is
    bounded by log N, reached when the posteriors do not overlap. He et al. take the first
    term in closed form (minus the entropy); here both terms are evaluated at the same sample,
    which has the same expectation but lets their noise cancel: a collapsed posterior scores
    exactly 0 rather than 0 plus sampling noise. With few samples the estimate can dip a
    little below 0 (another posterior may be denser at a sample than its own). The sample
    comes from a generator of its own, so evaluating never moves the training random stream.
    """
    n, dim = mu.shape
    if n < 2:
        return 0.0
    mu, logvar = mu.double(), logvar.double()
    generator = torch.Generator(device="cpu").manual_seed(seed)
    eps = torch.randn(mu.shape, generator=generator, dtype=mu.dtype).to(mu.device)
    z = mu + eps * torch.exp(0.5 * logvar)
    log_normaliser = -0.5 * (dim * math.log(2 * math.pi) + logvar.sum(dim=-1))  # (N,)
    log_q_z_given_x = log_normaliser - 0.5 * eps.pow(2).sum(dim=-1)
    inverse_var = torch.exp(-logvar)
    log_q_z = []
    for start in range(0, n, 256):  # chunk the N x N x D density so memory stays bounded
        dev = z[start : start + 256, None, :] - mu[None, :, :]
        log_density = log_normaliser[None] - 0.5 * (dev.pow(2) * inverse_var[None]).sum(dim=-1)
        log_q_z.append(torch.logsumexp(log_density, dim=1) - math.log(n))
    return float((log_q_z_given_x - torch.cat(log_q_z)).mean())


def codebook_usage(codes: torch.Tensor) -> int:
    """Number of distinct codebook entries used anywhere in `codes` (any shape, long indices).

    The VQ-VAE counterpart of active units: a codebook that collapses onto a few entries
    ("index collapse", Kaiser et al. 2018) carries at most log(usage) nats per latent.
    """
    return int(torch.unique(codes).numel())


def collapse_verdict(kl_raw: float, mu: torch.Tensor, logvar: torch.Tensor) -> dict[str, object]:
    """Seed 000's three checks: KL > 0.01 nats, std of mu > 0.1, mean logvar > -5."""
    mu_std = float(mu.std()) if mu.numel() > 1 else 0.0
    logvar_mean = float(logvar.mean())
    checks = {
        "kl_above_0.01": kl_raw > HEALTHY_KL_NATS,
        "mu_std_above_0.1": mu_std > HEALTHY_MU_STD,
        "logvar_mean_above_-5": logvar_mean > HEALTHY_LOGVAR_MEAN,
    }
    return {
        "verdict": "healthy" if all(checks.values()) else "collapsed",
        "kl_raw": kl_raw,
        "mu_std": mu_std,
        "logvar_mean": logvar_mean,
        **checks,
    }


def codebook_verdict(codes: torch.Tensor, recon: float, recon_z0: float) -> dict[str, object]:
    """A VQ-VAE cannot collapse its KL (seed 000's reason to fall back to it), but it can use
    one code for everything or have a decoder that ignores the code: it is healthy when it
    uses at least two codes and reconstructs clearly better than from z = 0."""
    usage = codebook_usage(codes)
    checks = {
        "codes_used_at_least_2": usage >= 2,
        "recon_below_0.95_recon_z0": recon < 0.95 * recon_z0,
    }
    return {
        "verdict": "healthy" if all(checks.values()) else "collapsed",
        "codebook_usage": usage,
        **checks,
    }


@dataclass
class Diagnostics:
    """Loss terms and collapse diagnostics of one split, plus its posterior means."""

    loss: float
    # the loss at the run's final weights (diagnose()'s `final_weights`), if asked: what makes
    # the losses of different epochs comparable, whatever schedule β, C(t) or λ(t) follow
    loss_final_weights: float | None
    recon: float
    kl_raw: float
    kl_constrained: float
    recon_z0: float
    mu: torch.Tensor
    logvar: torch.Tensor
    # masked MSE of each decoder branch (seed 000), and of each feature group (seed 002 k-mers)
    branch_recon: dict[str, float] = field(default_factory=dict)
    group_recon: dict[str, float] = field(default_factory=dict)
    # a loss's own further terms (LossTerms.extras), per-sample means over the split
    extras: dict[str, float] = field(default_factory=dict)
    # codebook indices (N, n_latents) of a quantising model (VAEOutput.extras["codes"]); None
    # for Gaussian models
    codes: torch.Tensor | None = None

    @property
    def kl_per_dim(self) -> torch.Tensor:
        """Mean KL of each latent dimension over the split, nats."""
        return gaussian_kl_per_dim(self.mu, self.logvar).mean(dim=0)

    def verdict(self) -> dict[str, object]:
        """Healthy or collapsed: seed 000's checks, or codebook use for a quantising model."""
        if self.codes is None:
            return collapse_verdict(self.kl_raw, self.mu, self.logvar)
        return codebook_verdict(self.codes, self.recon, self.recon_z0)

    def metrics(self, prefix: str) -> dict[str, float]:
        """The per-epoch MLflow metrics under `prefix/` (seed 004 diagnostic names)."""
        metrics = {
            f"{prefix}/loss": self.loss,
            **(
                {}
                if self.loss_final_weights is None
                else {f"{prefix}/loss_final_weights": self.loss_final_weights}
            ),
            f"{prefix}/recon": self.recon,
            f"{prefix}/kl": self.kl_raw,
            f"{prefix}/kl_constrained": self.kl_constrained,
            f"{prefix}/active_units": float(active_units(self.mu)),
            # AU / latent dim: plain AU rewards a large latent dimension in a sweep
            f"{prefix}/au_fraction": active_units(self.mu) / self.mu.shape[1],
            f"{prefix}/mi": mutual_information(self.mu, self.logvar),
            f"{prefix}/mu_var_mean": float(self.mu.var(dim=0, unbiased=False).mean()),
            f"{prefix}/logvar_mean": float(self.logvar.mean()),
            f"{prefix}/recon_z0": self.recon_z0,
        }
        parts = {**self.branch_recon, **self.group_recon}
        metrics.update({f"{prefix}/recon_{name}": v for name, v in parts.items()})
        metrics.update({f"{prefix}/{name}": v for name, v in self.extras.items()})
        if self.codes is not None:
            # over the whole split, every latent position pooled (one codebook is shared);
            # the perplexity is the codebook size for uniform use, 1 for a single code
            metrics[f"{prefix}/codebook_usage"] = float(codebook_usage(self.codes))
            metrics[f"{prefix}/codebook_perplexity"] = float(code_perplexity(self.codes))
        return metrics


@torch.no_grad()
def diagnose(
    model: torch.nn.Module,
    values: torch.Tensor,
    masks: torch.Tensor,
    loss_fn: ElboLoss,
    beta: float,
    batch_size: int,
    device: torch.device,
    epoch: float = 0.0,
    feature_groups: dict[str, tuple[int, int]] | None = None,
    final_weights: tuple[float, float] | None = None,
) -> Diagnostics:
    """Run the model in eval mode (z = mu) over `values` and measure loss and collapse.

    `feature_groups` names ranges [start, stop) of the last axis whose reconstruction error
    is reported on its own, like seed 002's MSE per k-mer size. `final_weights` = (β, epoch)
    of the run's end also scores the loss with the weights it has there
    (`loss_final_weights`): every epoch's loss at one set of weights, which early stopping can
    compare, whatever schedule β, capacity C(t) or DIP λ(t) follow.
    """
    model.eval()
    # With z = 0 every sample gets the same reconstruction (eval mode: BatchNorm uses its
    # running statistics), so one decode serves the whole split (seed 004: recon_z0_mse).
    recon_z0, _ = model.decode(torch.zeros(1, model.latent_dim, device=device))
    per_sample: dict[str, float] = {}
    # Squared errors and observed counts are summed over the split, so every reconstruction
    # figure (recon, recon_z0, branches, feature groups) is one masked MSE over the whole split.
    squared_error: dict[str, float] = {}
    observed: dict[str, float] = {}
    mus, logvars, codes = [], [], []
    for start in range(0, len(values), batch_size):
        x = values[start : start + batch_size].to(device, non_blocking=True)
        m = masks[start : start + batch_size].to(device, non_blocking=True)
        out = model(x)
        terms = loss_fn(out, x, m, beta, epoch)
        batch_terms = {
            "loss": terms.total,
            "kl_raw": terms.kl_raw,
            "kl_constrained": terms.kl_constrained,
            **terms.extras,
        }
        if final_weights is not None:
            batch_terms["loss_final_weights"] = loss_fn(out, x, m, *final_weights).total
        for name, value in batch_terms.items():
            per_sample[name] = per_sample.get(name, 0.0) + float(value) * len(x)
        errors = {"recon": (out.recon - x) ** 2 * m, "z0": (recon_z0 - x) ** 2 * m}
        errors.update({f"branch/{name}": (b - x) ** 2 * m for name, b in out.branches.items()})
        counts = dict.fromkeys(errors, m)
        for name, (lo, hi) in (feature_groups or {}).items():
            errors[f"group/{name}"] = errors["recon"][..., lo:hi]
            counts[f"group/{name}"] = m[..., lo:hi]
        for name, error in errors.items():
            squared_error[name] = squared_error.get(name, 0.0) + float(error.sum())
            observed[name] = observed.get(name, 0.0) + float(counts[name].sum())
        mus.append(out.mu.cpu())
        logvars.append(out.logvar.cpu())
        if "codes" in out.extras:
            codes.append(out.extras["codes"].cpu())
    n = len(values)
    mse = {name: total / max(observed[name], 1.0) for name, total in squared_error.items()}
    mean = {name: total / n for name, total in per_sample.items()}
    return Diagnostics(
        loss=mean.pop("loss"),
        loss_final_weights=mean.pop("loss_final_weights", None),
        recon=mse.pop("recon"),
        kl_raw=mean.pop("kl_raw"),
        kl_constrained=mean.pop("kl_constrained"),
        recon_z0=mse.pop("z0"),
        mu=torch.cat(mus),
        logvar=torch.cat(logvars),
        branch_recon={k[7:]: v for k, v in mse.items() if k.startswith("branch/")},
        group_recon={k[6:]: v for k, v in mse.items() if k.startswith("group/")},
        extras=mean,
        codes=torch.cat(codes) if codes else None,
    )
