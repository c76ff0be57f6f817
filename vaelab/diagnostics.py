"""Collapse diagnostics on a data split (seed 004 section 2, seed 000 success criteria).

A collapsed VAE shows itself in several ways at once: raw KL near zero, few active units,
near-constant posterior means, little mutual information between x and z, and a decoder
that reconstructs as well from z = 0 as from the code. `diagnose` measures all of them in one
pass over a split, and `Diagnostics.verdict` calls a run healthy only when every one of them
says so (`CollapseCriteria`): no diagnostic can contradict the verdict. A quantising model
(VQ-VAE) cannot collapse its posterior; for it, active units are replaced by codebook usage.

The raw KL alone cannot tell: averaged over the data it is I(x; z) + KL(q(z) || p(z))
(Hoffman & Johnson 2016, "ELBO surgery"), and the second part is positive whenever the
aggregate posterior sits off the prior, even when z tells no sample from another. Both parts
are logged (`mi`, `kl_marginal`), and a sweep's constraints ask for information, not KL only.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from vaelab.losses import (
    LOG_2PI,
    GaussianLoss,
    ReconstructionLoss,
    code_perplexity,
    gaussian_kl_per_dim,
)
from vaelab.models.base import GaussianVAE

# Burda et al. 2016 (IWAE paper), section 5.2: a unit is active when Var_x(mu) ≥ 0.01, i.e.
# when its mean's spread across samples has std ≥ 0.1 — seed 000's "mu.std() > 0.1" as it
# was meant (per dimension, across samples), not over all entries of the (N, D) matrix, which
# a constant but non-zero mean vector passes.
ACTIVE_UNIT_THRESHOLD = 0.01
MI_SAMPLES = 8  # z samples per posterior in the MI estimate: its noise shrinks as 1/sqrt(8)
# The estimate costs samples x N² density terms a validation pass. Small splits, where the
# noise matters, get all 8 samples; large ones fewer, down to one (the cost before the 8).
MI_DENSITY_BUDGET = 2_000_000
MI_CHUNK_ENTRIES = 1 << 22  # sample-posterior densities held at once (32 MB of float64)
# Outside training no activation is kept for a backward pass, so an evaluation pass (IWAE's
# decodes, encoding every sample for latents.h5) can take larger batches than training:
# enough samples for this many input elements, never fewer than the training batch.
EVAL_BATCH_ELEMENTS = 1 << 20  # 4 MB of float32: 16,384 digits, 201 vitals of 745 h x 7


def eval_batch_size(batch_size: int, sample_numel: int) -> int:
    """Samples per forward call of an evaluation pass (no gradients): the training batch, or
    more when the samples are small."""
    return max(batch_size, EVAL_BATCH_ELEMENTS // max(sample_numel, 1))


def mi_samples(n: int) -> int:
    """z samples per posterior for an MI estimate over n posteriors, within the budget."""
    return max(1, min(MI_SAMPLES, MI_DENSITY_BUDGET // max(n * n, 1)))


@dataclass(frozen=True)
class CollapseCriteria:
    """What a healthy latent space shows at the best epoch (`verdict:` in conf/train.yaml).

    Every field is one check of `Diagnostics.verdict`; a run failing any is collapsed, and the
    verdict names the checks it failed. The seed 000 "Success Criteria" are min_kl,
    min_active_units (its std(mu) > 0.1 per dimension) and min_logvar_mean; seed 004's
    z = 0 ablation is min_z_gain; min_mi asks the KL to carry information.
    """

    min_kl: float = 0.01  # raw KL, nats per sample (seed 000: KL > 0.01 at convergence)
    min_active_units: int = 1  # dimensions with Var(mu) ≥ 0.01 = std(mu) ≥ 0.1 (seed 000)
    min_logvar_mean: float = -5.0  # mean posterior log-variance (seed 000: logvar.mean() > -5)
    # I(x; z) in nats (He et al. 2019 estimate, at most log N): the collapsed runs of issue 10
    # had 0.03-0.05, healthy ones 1 and more.
    min_mi: float = 0.1
    # The decoder must reconstruct from the code at least this share better than from z = 0
    # (seed 004: recon_z0 ≈ recon means the decoder ignores z): recon ≤ (1 - 0.02) recon_z0.
    min_z_gain: float = 0.02


@dataclass(frozen=True)
class Constraint:
    """One Optuna constraint of a sweep's trial: feasible when `value` ≤ 0 (Optuna's rule)."""

    name: str
    value: float
    meaning: str  # what must hold, with its threshold, for people reading why a trial failed
    found: str = ""  # what the trial measured, e.g. "raw KL 0.31 nats"

    def __str__(self) -> str:
        """e.g. "kl holds: raw KL ≥ 0.5 nats (found 0.93)", or "kl broken: ..."."""
        state = "holds" if self.value <= 0 else "broken"
        found = f" (found {self.found})" if self.found else ""
        return f"{self.name} {state}: {self.meaning}{found}"


def sweep_constraints(
    final_metrics: dict[str, float], kl_threshold: float, criteria: CollapseCriteria
) -> list[Constraint]:
    """A trial's constraints from its final/* metrics: KL above the collapse threshold (the
    users' words, sweep.kl_threshold), and that KL carrying information: MI above
    criteria.min_mi, and a decoder that uses z. A trial is feasible only when all hold."""
    kl, mi = final_metrics["final/kl"], final_metrics["final/mi"]
    recon, recon_z0 = final_metrics["final/recon"], final_metrics["final/recon_z0"]
    keep = 1.0 - criteria.min_z_gain
    return [
        Constraint("kl", kl_threshold - kl, f"raw KL ≥ {kl_threshold:g} nats", f"{kl:.3g}"),
        Constraint("mi", criteria.min_mi - mi, f"I(x; z) ≥ {criteria.min_mi:g} nats", f"{mi:.3g}"),
        Constraint(
            "decoder_uses_z",
            recon - keep * recon_z0,
            f"recon ≤ {keep:g} × recon at z = 0 (the decoder uses z)",
            f"{recon:.4g} against {recon_z0:.4g}",
        ),
    ]


def active_units(mu: torch.Tensor, threshold: float = ACTIVE_UNIT_THRESHOLD) -> int:
    """Dimensions whose posterior mean varies over the data: Var_x(E_q[z_d | x]) ≥ threshold.

    Burda et al. 2016: a unit the encoder leaves at the same mean for every input carries
    no information, whatever its KL.
    """
    if len(mu) < 2:
        return 0
    return int((mu.var(dim=0, unbiased=False) >= threshold).sum())


def mutual_information(
    mu: torch.Tensor, logvar: torch.Tensor, seed: int = 0, n_samples: int = MI_SAMPLES
) -> float:
    """He et al. 2019 (Lagging inference networks, eq. 4) estimate of I(x; z) in nats.

    I = E_x[ E_q(z|x) log q(z|x) - log q(z) ], with the aggregate posterior q(z)
    approximated by the mixture of the N posteriors in the split, `n_samples` z samples per
    x. It is bounded by log N, reached when the posteriors do not overlap. He et al. take the
    first term in closed form (minus the entropy); here both terms are evaluated at the same
    sample, which has the same expectation but lets their noise cancel: a collapsed posterior
    scores 0 (to rounding) rather than 0 plus sampling noise. With few samples the estimate can
    dip a little below 0 (another posterior may be denser at a sample than its own). The
    samples come from a generator of their own, so evaluating never moves the training random
    stream.

    The squared distances of every sample to every posterior are expanded into two matrix
    products, Σ_d z²/σ² − 2 z μ/σ² + μ²/σ², in float64, where the cancellation of the large
    terms leaves errors of ~1e-12 nats: the (S N) x N x D tensor of differences it replaces
    took 0.3-1 s a validation pass of 270 digits, the products ~0.02 s.
    """
    n, dim = mu.shape
    if n < 2:
        return 0.0
    mu, logvar = mu.double(), logvar.double()
    generator = torch.Generator(device="cpu").manual_seed(seed)
    eps = torch.randn((n_samples, *mu.shape), generator=generator, dtype=mu.dtype)
    eps = eps.to(mu.device).reshape(n_samples * n, dim)  # sample s of x_i at row s * n + i
    z = mu.repeat(n_samples, 1) + eps * torch.exp(0.5 * logvar).repeat(n_samples, 1)
    log_normaliser = -0.5 * (dim * math.log(2 * math.pi) + logvar.sum(dim=-1))  # (N,)
    log_q_z_given_x = log_normaliser.repeat(n_samples) - 0.5 * eps.pow(2).sum(dim=-1)
    inverse_var = torch.exp(-logvar)
    scaled_mu = mu * inverse_var
    mu_term = (mu * scaled_mu).sum(dim=-1)  # (N,)
    rows = max(1, MI_CHUNK_ENTRIES // n)  # samples per chunk of the (S N) x N densities
    log_q_z = []
    for start in range(0, len(z), rows):
        chunk = z[start : start + rows]
        squared = chunk.pow(2) @ inverse_var.T - 2.0 * chunk @ scaled_mu.T + mu_term
        log_density = log_normaliser - 0.5 * squared
        log_q_z.append(torch.logsumexp(log_density, dim=1) - math.log(n))
    return float((log_q_z_given_x - torch.cat(log_q_z)).mean())


def codebook_usage(codes: torch.Tensor) -> int:
    """Number of distinct codebook entries used anywhere in `codes` (any shape, long indices).

    The VQ-VAE counterpart of active units: a codebook that collapses onto a few entries
    ("index collapse", Kaiser et al. 2018) carries at most log(usage) nats per latent.
    """
    return int(torch.unique(codes).numel())


def _verdict(checks: dict[str, tuple[bool, str]], figures: dict[str, object]) -> dict:
    """The verdict of named checks, each (passed, what it asked and found): `failed` lists
    the names of those that did not pass, `why` says what each found."""
    failed = [name for name, (passed, _) in checks.items() if not passed]
    return {
        "verdict": "collapsed" if failed else "healthy",
        "failed": ", ".join(failed) or "none",
        "why": "; ".join(checks[name][1] for name in failed) or "every check passed",
        **figures,
        **{f"check_{name}": passed for name, (passed, _) in checks.items()},
    }


def collapse_verdict(
    kl_raw: float,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    mi: float,
    recon: float,
    recon_z0: float,
    criteria: CollapseCriteria,
) -> dict[str, object]:
    """Healthy only when every check of `criteria` passes; `failed` names those that did not.

    Seed 000's checks as it meant them (KL, the spread of each latent across samples, mean
    log-variance), seed 004's z = 0 ablation, and the mutual information I(x; z).
    """
    c = criteria
    n_active = active_units(mu)
    spread = mu.std(dim=0, unbiased=False) if len(mu) > 1 else torch.zeros(mu.shape[1])
    logvar_mean = float(logvar.mean())
    z_gain = 1.0 - recon / recon_z0 if recon_z0 > 0 else 0.0
    checks = {
        "kl": (kl_raw > c.min_kl, f"raw KL {kl_raw:.3g} nats, not above {c.min_kl:g}"),
        "active_units": (
            n_active >= c.min_active_units,
            f"{n_active} dimensions whose mean varies across samples (std ≥ 0.1), "
            f"fewer than {c.min_active_units}",
        ),
        "logvar_mean": (
            logvar_mean > c.min_logvar_mean,
            f"mean log-variance {logvar_mean:.3g}, not above {c.min_logvar_mean:g}",
        ),
        "mi": (mi >= c.min_mi, f"I(x; z) {mi:.3g} nats, below {c.min_mi:g}"),
        "decoder_uses_z": (
            z_gain >= c.min_z_gain,
            f"recon only {100 * z_gain:.1f} % below recon at z = 0, less than "
            f"{100 * c.min_z_gain:g} %",
        ),
    }
    figures = {
        "kl_raw": kl_raw,
        "active_units": n_active,
        "mu_std_max": float(spread.max()) if spread.numel() else 0.0,
        "logvar_mean": logvar_mean,
        "mi": mi,
        "z_gain": z_gain,
    }
    return _verdict(checks, figures)


def codebook_verdict(
    codes: torch.Tensor, recon: float, recon_z0: float, criteria: CollapseCriteria
) -> dict[str, object]:
    """A VQ-VAE cannot collapse its KL (seed 000's reason to fall back to it), but it can use
    one code for everything or have a decoder that ignores the code: it is healthy when it
    uses at least two codes and reconstructs from them at least `min_z_gain` better than from
    z = 0."""
    usage = codebook_usage(codes)
    z_gain = 1.0 - recon / recon_z0 if recon_z0 > 0 else 0.0
    checks = {
        "codes_used": (usage >= 2, f"{usage} codebook entry used, fewer than 2"),
        "decoder_uses_z": (
            z_gain >= criteria.min_z_gain,
            f"recon only {100 * z_gain:.1f} % below recon at z = 0, less than "
            f"{100 * criteria.min_z_gain:g} %",
        ),
    }
    return _verdict(checks, {"codebook_usage": usage, "z_gain": z_gain})


def expected_kl_floor(loss_fn: ReconstructionLoss, latent_dim: int) -> float | None:
    """The free-bits floor of the KL term, nats per sample: free_bits x latent_dim (seed 004:
    "128 dims x 0.2 = 25.6 nats floor"); None for a loss without free bits (VQ).

    It is the constrained KL at raw KL 0, the same λ·D in every mode of `free_bits_kl`:
    per_dim Σ_d max(λ, 0), batch_mean max(λ·D, 0), per_sample mean_b Σ_d max(λ, 0). It is a
    floor of the term β multiplies, not of the raw KL: below it the term is flat, so nothing
    pushes the KL lower, and nothing pushes it higher either. Seed 004 reads it as a floor the
    raw KL "should exceed", and a raw KL under it as an encoder collapsed to the prior; that
    is where its reading is flawed: under batch_mean (its default) a healthy model may spend
    less than λ·D nats on a few informative dimensions (its own healthy threshold, KL > 10
    nats, lies below its 25.6-nat floor), and a raw KL above the floor says nothing about
    information (see the module docstring). Read it beside kl_raw: raw ≪ floor means the
    floor, not the data, sets the KL term.
    """
    if not isinstance(loss_fn, GaussianLoss):
        return None
    return float(loss_fn.free_bits) * latent_dim


@dataclass
class Diagnostics:
    """Loss terms and collapse diagnostics of one split, plus its posterior means."""

    loss: float
    # the loss at the run's final weights (diagnose()'s `final_weights`), if asked: what makes
    # the losses of different epochs comparable, whatever schedule β, C(t) or λ(t) follow
    loss_final_weights: float | None
    recon: float
    nll: float  # -log p(x | z = mu), nats per sample, under the loss's Gaussian decoder
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
    # Seed 004's decoder z-dependence: the masked MSE of decoding one z ~ q(z|x) per sample,
    # beside `recon` (z = mu). None for a quantising model (its posterior is a point).
    recon_sampled: float | None = None
    # The constrained KL when the raw KL is 0: the least the β-weighted KL term can be
    # (`expected_kl_floor`); None for a loss without free bits (VQ)
    kl_floor: float | None = None
    # (mean, variance), (D,) each, of a mixture prior (`prior_moments`); None under N(0, I)
    prior_moments: tuple[torch.Tensor, torch.Tensor] | None = None
    _mi: float | None = field(default=None, repr=False)

    @property
    def kl_per_dim(self) -> torch.Tensor:
        """Mean KL of each latent dimension over the split, nats: closed-form against N(0, I),
        whose sum is kl_raw; under a mixture prior, against its moment-matched Gaussian (the
        mixture's KL has no per-dimension split, vaelab.models.priors.MixturePrior), a view of
        the dimensions in use whose sum is not kl_raw."""
        return gaussian_kl_per_dim(self.mu, self.logvar, *(self.prior_moments or ())).mean(dim=0)

    @property
    def mi(self) -> float:
        """I(x; z) over the split, nats (cached: the estimate costs N² density terms)."""
        if self._mi is None:
            n_samples = mi_samples(len(self.mu))
            self._mi = mutual_information(self.mu, self.logvar, n_samples=n_samples)
        return self._mi

    def verdict(self, criteria: CollapseCriteria) -> dict[str, object]:
        """Healthy or collapsed by every check of `criteria`, or by codebook use for a
        quantising model; `failed` names the checks that did not pass."""
        if self.codes is None:
            return collapse_verdict(
                self.kl_raw, self.mu, self.logvar, self.mi, self.recon, self.recon_z0, criteria
            )
        return codebook_verdict(self.codes, self.recon, self.recon_z0, criteria)

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
            f"{prefix}/nll": self.nll,
            f"{prefix}/kl": self.kl_raw,
            f"{prefix}/kl_constrained": self.kl_constrained,
            f"{prefix}/active_units": float(active_units(self.mu)),
            # AU / latent dim: plain AU rewards a large latent dimension in a sweep
            f"{prefix}/au_fraction": active_units(self.mu) / self.mu.shape[1],
            f"{prefix}/mi": self.mi,
            # ELBO surgery (Hoffman & Johnson 2016): KL = I(x; z) + KL(q(z) || p(z))
            f"{prefix}/kl_marginal": self.kl_raw - self.mi,
            f"{prefix}/mu_var_mean": float(self.mu.var(dim=0, unbiased=False).mean()),
            f"{prefix}/logvar_mean": float(self.logvar.mean()),
            f"{prefix}/recon_z0": self.recon_z0,
        }
        if self.codes is None:  # Gaussian posteriors (seed 004 section 2's collapse table)
            # mean posterior std: ≈ 1 for a prior-like (collapsed) posterior
            metrics[f"{prefix}/z_std"] = float(torch.exp(0.5 * self.logvar).mean())
        if self.recon_sampled is not None:
            # > 0: sampling z off mu costs reconstruction, the decoder uses z; ≈ 0: it does not
            metrics[f"{prefix}/recon_delta_mu_vs_sampled"] = self.recon_sampled - self.recon
        if self.kl_floor is not None:
            metrics[f"{prefix}/expected_kl_floor"] = self.kl_floor
        parts = {**self.branch_recon, **self.group_recon}
        metrics.update({f"{prefix}/recon_{name}": v for name, v in parts.items()})
        metrics.update({f"{prefix}/{name}": v for name, v in self.extras.items()})
        if self.codes is not None:
            # over the whole split, every latent position pooled (one codebook is shared);
            # the perplexity is the codebook size for uniform use, 1 for a single code
            metrics[f"{prefix}/codebook_usage"] = float(codebook_usage(self.codes))
            metrics[f"{prefix}/codebook_perplexity"] = float(code_perplexity(self.codes))
        return metrics


def loss_inputs(
    latent_targets: torch.Tensor | None, start: int, batch_size: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """What a loss takes besides (output, x, mask, β, epoch) for the batch at `start`: the
    batch's latent targets for a supervised loss (seed 004 Exp3), nothing for every other."""
    if latent_targets is None:
        return {}
    return {"latent_targets": latent_targets[start : start + batch_size].to(device)}


@torch.no_grad()
def diagnose(
    model: torch.nn.Module,
    values: torch.Tensor,
    masks: torch.Tensor,
    loss_fn: ReconstructionLoss,
    beta: float,
    batch_size: int,
    device: torch.device,
    epoch: float = 0.0,
    feature_groups: dict[str, tuple[int, int]] | None = None,
    final_weights: tuple[float, float] | None = None,
    latent_targets: torch.Tensor | None = None,
) -> Diagnostics:
    """Run the model in eval mode (z = mu) over `values` and measure loss and collapse.

    `latent_targets`, one row per sample of `values`, go to a loss that regresses latent
    dimensions on known factors (seed 004 Exp3: losses.SupervisedLatentLoss), batch by batch.

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
    # One z ~ q(z|x) per sample for recon_delta_mu_vs_sampled, from a generator of its own, so
    # that a validation pass never moves the training random stream and repeats exactly.
    generator = torch.Generator(device="cpu").manual_seed(0)
    for start in range(0, len(values), batch_size):
        x = values[start : start + batch_size].to(device, non_blocking=True)
        m = masks[start : start + batch_size].to(device, non_blocking=True)
        out = model(x)
        supervised = loss_inputs(latent_targets, start, batch_size, device)
        terms = loss_fn(out, x, m, beta, epoch, **supervised)
        batch_terms = {
            "loss": terms.total,
            "nll": terms.nll,
            "kl_raw": terms.kl_raw,
            "kl_constrained": terms.kl_constrained,
            **terms.extras,
        }
        if final_weights is not None:
            at_final_weights = loss_fn(out, x, m, *final_weights, **supervised)
            batch_terms["loss_final_weights"] = at_final_weights.total
        for name, value in batch_terms.items():
            per_sample[name] = per_sample.get(name, 0.0) + float(value) * len(x)
        errors = {"recon": (out.recon - x) ** 2 * m, "z0": (recon_z0 - x) ** 2 * m}
        errors.update({f"branch/{name}": (b - x) ** 2 * m for name, b in out.branches.items()})
        if "codes" not in out.extras:  # a Gaussian posterior: decode a sample of it too
            eps = torch.randn(out.mu.shape, generator=generator).to(device)
            recon_sampled, _ = model.decode(out.mu + eps * torch.exp(0.5 * out.logvar))
            errors["sampled"] = (recon_sampled - x) ** 2 * m
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
        nll=mean.pop("nll"),
        kl_raw=mean.pop("kl_raw"),
        kl_constrained=mean.pop("kl_constrained"),
        recon_z0=mse.pop("z0"),
        mu=torch.cat(mus),
        logvar=torch.cat(logvars),
        branch_recon={k[7:]: v for k, v in mse.items() if k.startswith("branch/")},
        group_recon={k[6:]: v for k, v in mse.items() if k.startswith("group/")},
        extras=mean,
        codes=torch.cat(codes) if codes else None,
        recon_sampled=mse.pop("sampled", None),
        kl_floor=expected_kl_floor(loss_fn, model.latent_dim),
        prior_moments=prior_moments(model),
    )


def supervised_correlations(
    mu: torch.Tensor, targets: torch.Tensor, index: torch.Tensor, names: Sequence[str]
) -> dict[str, float]:
    """Pearson r of each supervised latent dimension k with its target k over the samples
    `index` (the held-out test split): does z_vol follow log V on subjects the loss never saw
    (seed 004 Exp3)? `final/supervised_r/<factor>`; empty below 3 samples, where r says nothing.
    """
    if len(index) < 3:
        return {}
    index = index.cpu()
    codes, wanted = mu[index, : len(names)].double(), targets[index].double()
    codes, wanted = codes - codes.mean(dim=0), wanted - wanted.mean(dim=0)
    scale = (codes.norm(dim=0) * wanted.norm(dim=0)).clamp(min=1e-12)
    r = (codes * wanted).sum(dim=0) / scale
    pairs = zip(names, r.tolist(), strict=True)
    return {f"final/supervised_r/{name}": value for name, value in pairs}


def prior_moments(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The per-dimension mean and variance of a Gaussian model's mixture prior, on the CPU;
    None under N(0, I), whose KL per dimension is closed-form, and for other models."""
    if not isinstance(model, GaussianVAE) or model.prior.kl_estimator == "closed_form":
        return None
    mean, var = model.prior.moments(model.encode_in_eval_mode)
    return mean.detach().cpu(), var.detach().cpu()


@dataclass(frozen=True)
class LogLikelihood:
    """Held-out estimates of log p(x), nats per sample (Burda et al. 2016)."""

    iwae: float  # log (1/K) Σ_k w_k: a lower bound that tightens to log p(x) as K grows
    elbo: float  # (1/K) Σ_k log w_k: the ELBO, estimated on the same samples (≤ iwae)
    n_importance: int  # K, samples of z per x


@torch.no_grad()
def importance_weighted_log_px(
    model: GaussianVAE,
    loss_fn: ReconstructionLoss,
    values: torch.Tensor,
    masks: torch.Tensor,
    n_importance: int,
    batch_size: int,
    seed: int = 0,
) -> LogLikelihood:
    """The importance-weighted estimate of log p(x) (Burda et al. 2016, eq. 8), in eval mode.

    For each x, K samples z_k ~ q(z|x) weigh w_k = p(x|z_k) p(z_k) / q(z_k|x) with the loss's
    Gaussian decoder (σ fixed or learned; observed entries only) and the model's prior (N(0, I)
    unless it was built with another, vaelab.models.priors):
    log p(x) ≥ log (1/K) Σ w_k ≥ (1/K) Σ log w_k = the ELBO; the first tightens to log p(x) as
    K grows. This is the figure VAE papers compare models on. The samples come from a
    generator of their own, so evaluating never moves the training random stream. Each x draws
    its own K x D block of that stream, in order, so the estimate does not depend on how the
    samples are chunked. Decoding goes `eval_batch_size` codes at a time: the K = 100 codes of
    one x, decoded 64 at a time, made this 0.2-0.7 s of a one-epoch digits trial.
    """
    model.eval()
    generator = torch.Generator(device="cpu").manual_seed(seed)
    iwae_sum, elbo_sum = 0.0, 0.0
    codes_per_call = eval_batch_size(batch_size, math.prod(values.shape[1:]))
    per_chunk = max(1, codes_per_call // n_importance)  # samples x whose codes go together
    for start in range(0, len(values), per_chunk):
        x, m = values[start : start + per_chunk], masks[start : start + per_chunk]
        mu, logvar = model.encode(x)
        draws = [torch.randn((n_importance, mu.shape[1]), generator=generator) for _ in x]
        eps = torch.stack(draws, dim=1).to(mu.device)  # (K, b, D), drawn x by x
        z = mu + eps * torch.exp(0.5 * logvar)  # (K, b, D)
        log_prior = model.log_prior(z)
        log_posterior = -0.5 * (eps.pow(2) + LOG_2PI + logvar).sum(dim=-1)
        flat_z = z.reshape(-1, z.shape[-1])  # row k * b + i: sample k of x_i
        log_lik = []
        for first in range(0, len(flat_z), codes_per_call):
            codes = flat_z[first : first + codes_per_call]
            index = torch.arange(first, first + len(codes), device=codes.device) % len(x)
            recon, _ = model.decode(codes)
            log_lik.append(loss_fn.log_likelihood(recon, x[index], m[index]))
        log_w = torch.cat(log_lik).view(n_importance, len(x)) + log_prior - log_posterior
        iwae_sum += float((torch.logsumexp(log_w, dim=0) - math.log(n_importance)).sum())
        elbo_sum += float(log_w.mean(dim=0).sum())
    return LogLikelihood(
        len(values) and iwae_sum / len(values), elbo_sum / len(values), n_importance
    )
