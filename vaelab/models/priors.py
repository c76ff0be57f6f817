"""Priors p(z) of a Gaussian VAE: N(0, I), a mixture of Gaussians, and the VampPrior.

    python -m vaelab.train +model/prior=vamp model.prior.n_components=50
    python -m vaelab.train +model/prior=mog model.prior.learn_weights=true

Every `GaussianVAE` takes a `prior` (conf/model/prior/*.yaml, a `_partial_` node that the model
builds with its latent dimension and input shape), N(0, I) when none is given. The prior is a
submodule of the model: its parameters are trained by the model's optimiser and saved in its
checkpoint, and the model rebuilt from the checkpoint's config gets the same prior back.

The KL term. Against N(0, I) the KL is closed-form (Kingma & Welling 2014, appendix B), and the
model leaves it to the loss (`VAEOutput.kl` is None): the numbers are those of a model without
the option. Against a mixture it has no closed form; the model estimates it by Monte Carlo,
KL(q(z|x) || p(z)) ≈ (1/S) Σ_s [log q(z_s|x) − log p(z_s)], z_s ~ q(z|x), per sample, in nats
(`kl_estimator = "monte_carlo"`), and passes it to the loss in `VAEOutput.kl`. Both terms are
evaluated at the same z_s, so that their noise cancels where q is close to p (a collapsed
posterior scores ≈ 0, not 0 plus noise). In training the first z_s is the z the decoder sees
(Tomczak & Welling 2018 take that one sample), `kl_samples - 1` more are drawn; in evaluation
(z = mu) `eval_kl_samples` are drawn from a generator of their own, seeded afresh each call, so
that a validation pass never moves the training random stream and val/kl repeats exactly for
the same weights. The estimate is unbiased; one sample of it can be negative.
"""

import logging
import math
from collections.abc import Callable
from typing import ClassVar, Literal

import torch
from torch import nn

from vaelab.errors import ConfigError

log = logging.getLogger(__name__)

LOG_2PI = math.log(2.0 * math.pi)
# The seed of the evaluation-mode KL samples: fixed, so val/kl is a function of the weights.
EVAL_KL_SEED = 0

# encode(x) -> (mu, logvar) of a batch (K, *input_shape): how a VampPrior reaches its encoder
# (the model passes it at every call, so the prior never holds the model that holds it).
Encode = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
# A prior waiting for the model's latent dimension and input shape: what `model.prior`
# (conf/model/prior/*.yaml, `_partial_: true`) instantiates to.
PriorFactory = Callable[..., "Prior"]


class Prior(nn.Module):
    """p(z) over the latent space R^D of a model with samples of `input_shape`."""

    # "closed_form": the loss takes the KL in closed form; "monte_carlo": the model estimates it
    kl_estimator: ClassVar[str]

    def __init__(self, latent_dim: int, input_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.latent_dim = int(latent_dim)
        self.input_shape = tuple(int(s) for s in input_shape)

    def log_prob(self, z: torch.Tensor, encode: Encode) -> torch.Tensor:
        """log p(z) of codes (..., D): (...,) nats."""
        raise NotImplementedError

    def moments(self, encode: Encode) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of p(z) in each dimension, each (D,)."""
        raise NotImplementedError

    def kl(
        self, mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor | None, encode: Encode
    ) -> torch.Tensor | None:
        """KL(q(z|x) || p(z)) per sample, (B,) nats; None when the loss takes it in closed form.

        `eps` is the standard normal draw behind the decoder's z (training), None in eval mode.
        """
        raise NotImplementedError

    def observe(self, x: torch.Tensor) -> None:
        """See a training batch (B, *input_shape) before the forward pass; most priors do not."""


class StandardNormal(Prior):
    """N(0, I), the default: the KL is closed-form, taken by the loss (`gaussian_kl_per_dim`)."""

    kl_estimator = "closed_form"

    def log_prob(self, z: torch.Tensor, encode: Encode) -> torch.Tensor:
        """log N(z; 0, I): -1/2 Σ_d (z_d² + log 2π)."""
        return -0.5 * (z.pow(2) + LOG_2PI).sum(dim=-1)

    def moments(self, encode: Encode) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero mean, unit variance."""
        return torch.zeros(self.latent_dim), torch.ones(self.latent_dim)

    def kl(
        self, mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor | None, encode: Encode
    ) -> None:
        """None: the loss computes the closed form, exactly as without a prior option."""
        return None


def mixture_log_prob(
    z: torch.Tensor, means: torch.Tensor, logvars: torch.Tensor, log_weights: torch.Tensor
) -> torch.Tensor:
    """log Σ_k w_k N(z; m_k, diag(exp(s_k))) of codes (..., D): (...,) nats.

    The squared distances of every code to every component are expanded into matrix products,
    Σ_d z²/v − 2 z m/v + m²/v (as `diagnostics.mutual_information`), in float64 with autocast
    off: a (codes x K x D) tensor of differences would hold 500 pseudo-inputs x 256
    dimensions per code, and in float32 the large terms' cancellation (1/v = 400 at the
    log-variance floor -6) would leave errors of ~0.1 nats.
    """
    shape = z.shape[:-1]
    with torch.autocast(device_type=z.device.type, enabled=False):
        flat = z.reshape(-1, z.shape[-1]).double()
        means, logvars = means.double(), logvars.double()
        inverse_var = torch.exp(-logvars)  # (K, D)
        scaled_means = means * inverse_var
        squared = (
            flat.pow(2) @ inverse_var.T
            - 2.0 * flat @ scaled_means.T
            + (means * scaled_means).sum(dim=-1)
        )  # (codes, K)
        log_normaliser = -0.5 * (z.shape[-1] * LOG_2PI + logvars.sum(dim=-1))  # (K,)
        log_components = log_weights.double() + log_normaliser - 0.5 * squared
        return torch.logsumexp(log_components, dim=1).to(z.dtype).reshape(shape)


class MixturePrior(Prior):
    """A mixture of K diagonal Gaussians, Σ_k w_k N(m_k, diag(v_k)), with a Monte-Carlo KL.

    Free bits (`loss.free_bits`) need a KL per dimension, which a mixture does not have: its
    log-density does not split over dimensions. Under a mixture prior the floor applies to the
    total, max(λ·D, mean_b KL_b) (free_bits_mode=batch_mean, Pelsmaeker & Aziz 2020); the loss
    refuses per_dim and per_sample (vaelab.losses.GaussianLoss.kl). The per-dimension KL the
    diagnostics report (val KL per dimension, kl_per_dim.png) is that of q against the
    prior's moment-matched Gaussian, N(E_p[z_d], Var_p[z_d]) per dimension (`moments`): a view
    of which dimensions the posteriors move off the prior, whose sum is not the KL.
    """

    kl_estimator = "monte_carlo"

    def __init__(
        self,
        latent_dim: int,
        input_shape: tuple[int, ...],
        n_components: int,
        kl_samples: int = 1,
        eval_kl_samples: int = 16,
    ) -> None:
        super().__init__(latent_dim, input_shape)
        name = type(self).__name__
        for key, value in {
            "n_components": n_components,
            "kl_samples": kl_samples,
            "eval_kl_samples": eval_kl_samples,
        }.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(
                    f"model.prior.{key} ({name}) must be an integer ≥ 1, got {value!r}"
                )
        self.n_components = n_components
        self.kl_samples = kl_samples
        self.eval_kl_samples = eval_kl_samples

    def components(self, encode: Encode) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(means (K, D), log-variances (K, D), log-weights (K,), normalised)."""
        raise NotImplementedError

    def log_prob(self, z: torch.Tensor, encode: Encode) -> torch.Tensor:
        """log p(z) of codes (..., D): (...,) nats."""
        return mixture_log_prob(z, *self.components(encode))

    def moments(self, encode: Encode) -> tuple[torch.Tensor, torch.Tensor]:
        """E_p[z] = Σ_k w_k m_k and Var_p[z] = Σ_k w_k (v_k + m_k²) − E_p[z]², each (D,)."""
        means, logvars, log_weights = self.components(encode)
        weights = log_weights.exp()[:, None]
        mean = (weights * means).sum(dim=0)
        second = (weights * (logvars.exp() + means.pow(2))).sum(dim=0)
        return mean, (second - mean.pow(2)).clamp(min=1e-12)

    def kl(
        self, mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor | None, encode: Encode
    ) -> torch.Tensor:
        """(1/S) Σ_s [log q(z_s|x) − log p(z_s)], z_s = mu + σ ε_s, per sample: (B,) nats.

        log q(z_s|x) = −1/2 Σ_d (ε_sd² + log 2π + logvar_d), the reparameterised form
        (its gradient is that of the entropy; Roeder et al. 2017 discuss the variants).
        """
        if eps is None:  # eval mode: draws of its own, the same every call
            generator = torch.Generator(device="cpu").manual_seed(EVAL_KL_SEED)
            draws = torch.randn((self.eval_kl_samples, *mu.shape), generator=generator)
            eps = draws.to(device=mu.device, dtype=mu.dtype)
        else:  # training: the decoder's z first, then kl_samples - 1 more
            more = torch.randn((self.kl_samples - 1, *mu.shape), device=mu.device, dtype=mu.dtype)
            eps = torch.cat([eps[None], more])
        z = mu + eps * torch.exp(0.5 * logvar)  # (S, B, D)
        log_q = -0.5 * (eps.pow(2) + LOG_2PI + logvar).sum(dim=-1)
        return (log_q - self.log_prob(z, encode)).mean(dim=0)


class MixtureOfGaussians(MixturePrior):
    """K learned diagonal Gaussians, with uniform or learned weights.

    Means start at N(0, 1) draws (distinct components: equal ones would get equal gradients and
    stay equal), log-variances at 0, so that the mixture starts as broad as N(0, I).
    """

    def __init__(
        self,
        latent_dim: int,
        input_shape: tuple[int, ...],
        n_components: int = 10,
        learn_weights: bool = False,
        kl_samples: int = 1,
        eval_kl_samples: int = 16,
    ) -> None:
        super().__init__(latent_dim, input_shape, n_components, kl_samples, eval_kl_samples)
        self.means = nn.Parameter(torch.randn(n_components, self.latent_dim))
        self.logvars = nn.Parameter(torch.zeros(n_components, self.latent_dim))
        logits = torch.zeros(n_components)
        if learn_weights:
            self.logits = nn.Parameter(logits)
        else:  # uniform, 1/K: a buffer, so the checkpoint still says what they were
            self.register_buffer("logits", logits)

    def components(self, encode: Encode) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The learned means and log-variances, and the softmax of the weight logits."""
        return self.means, self.logvars, torch.log_softmax(self.logits, dim=0)


class VampPrior(MixturePrior):
    """The VampPrior (Tomczak & Welling 2018, eq. 9): p(z) = (1/K) Σ_k q(z | u_k), the mixture
    of the encoder's own posteriors at K learned pseudo-inputs u_k of the data's shape.

    The posteriors q(z | u_k) come from the encoder in eval mode (running BatchNorm statistics,
    no dropout; `GaussianVAE.encode_in_eval_mode`): in training mode BatchNorm would normalise
    the K pseudo-inputs by their own batch statistics, fold them into its running statistics,
    and fail for K = 1. So the prior is the same function of the weights in training and in
    validation, and val/kl measures the prior the loss trained against.

    Pseudo-inputs, `init`:
    - "data" (default): the first training samples the model sees, copied in as the first
      training batches arrive (`observe`), until all K are filled; until then, and for a model
      never trained, they are N(0, 1). This is the paper's "initialized with training data"
      variant: pseudo-inputs start where the encoder's inputs are, so the prior starts as the
      aggregate posterior of K training samples, whatever scale the data has (the k-mer CLR
      values without z-score reach -14). The model is built before it sees data (from
      conf/model), hence the fill on first sight, as Glow's ActNorm (Kingma & Dhariwal 2018)
      initialises from its first batch. With K larger than the training split some samples
      are copied twice. How many are filled is a buffer saved with the model.
    - "random": N(0, 1) draws, the paper's code default (`pseudoinputs_std`); on z-scored data
      that is the data's scale per feature.
    """

    def __init__(
        self,
        latent_dim: int,
        input_shape: tuple[int, ...],
        n_components: int = 50,
        init: Literal["data", "random"] = "data",
        kl_samples: int = 1,
        eval_kl_samples: int = 16,
    ) -> None:
        super().__init__(latent_dim, input_shape, n_components, kl_samples, eval_kl_samples)
        if init not in ("data", "random"):
            raise ConfigError(f"model.prior.init must be data or random, got {init!r}")
        self.init = init
        self.pseudo_inputs = nn.Parameter(torch.randn(n_components, *self.input_shape))
        filled = n_components if init == "random" else 0
        self.register_buffer("filled", torch.tensor(filled, dtype=torch.int64))
        self._filled = filled  # a Python copy: no device sync a step to ask whether to fill
        self.register_load_state_dict_post_hook(VampPrior._loaded)

    @staticmethod
    def _loaded(module: "VampPrior", incompatible_keys: object) -> None:
        module._filled = int(module.filled)

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        """Copy training samples into the pseudo-inputs not yet filled (init="data")."""
        if self._filled >= self.n_components:
            return
        take = min(len(x), self.n_components - self._filled)
        self.pseudo_inputs[self._filled : self._filled + take] = x[:take].to(
            self.pseudo_inputs.dtype
        )
        self._filled += take
        self.filled.fill_(self._filled)
        if self._filled == self.n_components:
            log.info("VampPrior: %d pseudo-inputs initialised from training samples", self._filled)

    def components(self, encode: Encode) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The posteriors at the pseudo-inputs, each with weight 1/K."""
        means, logvars = encode(self.pseudo_inputs)
        log_weights = torch.full(
            (self.n_components,), -math.log(self.n_components), device=means.device
        )
        return means, logvars, log_weights
