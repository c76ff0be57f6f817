"""The pieces of the training loop that `vaelab.train` runs inline: the trainer settings, one
optimiser step, the shuffled (or class-balanced) batches of an epoch, frozen parameters, the
validation pass, early stopping and the metrics of an epoch.

`train_step` is also what `make bench` times, so the benchmark measures the loop's own step.
"""

import dataclasses
import fnmatch
import logging
import math
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import mlflow
import numpy as np
import torch
from tqdm import tqdm

from vaelab.data.prepare import PreparedData
from vaelab.data.streaming import take
from vaelab.diagnostics import Diagnostics, diagnose
from vaelab.errors import ConfigError, DivergenceError
from vaelab.losses import LossTerms, SupervisedLatentLoss
from vaelab.models.base import VAEOutput
from vaelab.runtime import PRECISION_CHOICES, Precision

log = logging.getLogger(__name__)


@dataclass
class TrainerSettings:
    """How to train: built from `conf/trainer/*.yaml`, so a misspelt key fails at instantiate."""

    optimizer: partial  # a torch.optim class with its settings, waiting for the parameters
    epochs: int = 20  # full passes over the training split
    batch_size: int = 64  # samples per optimiser step
    lr: float = 1e-3  # peak learning rate; cosine decay runs from it to lr * min_lr_ratio
    min_lr_ratio: float = 0.01  # the cosine floor as a fraction of lr
    # epochs without a better validation loss before stopping; None: never
    patience: int | None = 10
    grad_clip: float | None = 5.0  # max global gradient norm (seed 004 recommends 5.0); None: off
    device: str = "auto"  # "auto" picks CUDA when present, else CPU; or "cpu", "cuda", "cuda:1"
    num_threads: int | None = None  # torch CPU threads; None keeps torch's default
    # Optimiser steps an epoch takes at least: a training split smaller than this many batches
    # trains on smaller batches (never below 2), so that β, free bits and the learning rate
    # act over real steps, not one step an epoch.
    min_steps_per_epoch: int = 4
    # "auto", "32", "bf16-mixed" or "16-mixed" (Lightning's names; CUDA only for 16-mixed):
    # the dtype the train step's forward pass autocasts to. Validation stays in float32.
    precision: str = "auto"
    compile: bool = False  # run the train step's forward and backward through torch.compile
    # An improvement of the validation loss (at the final weights) counts for early stopping and
    # the best checkpoint only when it exceeds this, in the loss's own units (seed 003: 0.001).
    min_delta: float = 0.0
    # The weights the model starts from (vaelab.artifacts.load_initial_weights): None (fresh),
    # a checkpoint path (.pt of vaelab.artifacts.Checkpoints), an MLflow run id (its best
    # checkpoint), or "run_name:<name>" (the newest FINISHED run of that name in the store).
    init_from: str | None = None
    # The command that records the init_from run, quoted when the run is not there (a
    # fine-tuning experiment names its pre-training command here).
    init_from_command: str | None = None
    # fnmatch patterns over model.named_parameters() names ("encoder_conv.*"): the matching
    # parameters are not trained, and the modules they fill stay in eval mode (see `freeze`).
    freeze: Sequence[str] = field(default_factory=list)
    # true: each epoch's batches are drawn with replacement, a sample's chance ∝ 1 / the count
    # of its class in the training split, so every class comes out equally often (seed 003's
    # WeightedRandomSampler). The data set must have labels.
    class_weighted_sampling: bool = False

    def __post_init__(self) -> None:
        self.precision = str(self.precision)  # YAML reads `precision: 32` as an int
        # A ListConfig from Hydra; `trainer.freeze=encoder_conv.*` gives one pattern as a str.
        patterns = [self.freeze] if isinstance(self.freeze, str) else self.freeze
        self.freeze = [str(pattern) for pattern in patterns]
        if self.precision not in PRECISION_CHOICES:
            raise ConfigError(
                f"trainer.precision={self.precision}: expected one of "
                f"{', '.join(PRECISION_CHOICES)}"
            )
        # Known before the run starts: device cpu, or auto on a host without CUDA.
        on_cpu = self.device == "cpu" or (self.device == "auto" and not torch.cuda.is_available())
        if self.precision == "16-mixed" and on_cpu:
            raise ConfigError(
                f"trainer.precision=16-mixed needs CUDA, and trainer.device={self.device} runs "
                "on the CPU here: float16 autocast on the CPU is emulated and slower; use "
                "bf16-mixed or 32"
            )
        if self.epochs < 1:
            raise ConfigError(f"trainer.epochs must be ≥ 1, got {self.epochs}")
        if self.batch_size < 2:
            raise ConfigError(f"trainer.batch_size must be ≥ 2 (BatchNorm), got {self.batch_size}")
        if self.min_steps_per_epoch < 1:
            raise ConfigError(
                f"trainer.min_steps_per_epoch must be ≥ 1, got {self.min_steps_per_epoch}"
            )
        if not self.min_delta >= 0.0:  # also refuses NaN
            raise ConfigError(f"trainer.min_delta must be ≥ 0, got {self.min_delta}")
        if self.init_from is not None and not str(self.init_from).strip():
            raise ConfigError(
                "trainer.init_from is empty: give null, a checkpoint path, an MLflow run id "
                "or run_name:<name>"
            )

    def batch_size_for(self, n_train: int) -> int:
        """The batch size this training split trains with: trainer.batch_size, or less, so that
        an epoch takes at least min_steps_per_epoch steps (a warning says so, with figures)."""
        capped = max(2, min(self.batch_size, n_train // self.min_steps_per_epoch))
        if capped < self.batch_size:
            log.warning(
                "The training split holds %d samples: at trainer.batch_size=%d an epoch would be "
                "%d optimiser step(s). Training with batches of %d instead, %d steps an epoch "
                "(trainer.min_steps_per_epoch=%d).",
                n_train,
                self.batch_size,
                max(n_train // self.batch_size, 1),
                capped,
                max(n_train // capped, 1),
                self.min_steps_per_epoch,
            )
        return capped


def epoch_batches(
    train_index: torch.Tensor, batch_size: int, weights: torch.Tensor | None = None
) -> list[torch.Tensor]:
    """The training split shuffled into full batches (the global torch generator shuffles).

    A last batch of a single sample would break BatchNorm, so the remainder of the shuffle is
    left out: it is drawn again in the next epoch's. A split smaller than one batch is one batch.
    With `weights` (one per entry of train_index, `class_balanced_weights`), the epoch is as
    many draws with replacement instead, each sample's chance ∝ its weight, as torch's
    WeightedRandomSampler draws (seed 003), from the same global generator.
    """
    if weights is None:
        drawn = torch.randperm(len(train_index), device=train_index.device)
    else:
        drawn = torch.multinomial(weights, len(train_index), replacement=True)
    order = train_index[drawn]
    n_batches = max(len(order) // batch_size, 1)
    return [order[i * batch_size : (i + 1) * batch_size] for i in range(n_batches)]


def progress_bar(batches: Iterable[Any], epoch: int) -> Iterator[Any]:
    """The epoch's batches (or their reads), behind a progress bar when stderr is a terminal."""
    return iter(tqdm(batches, desc=f"epoch {epoch}", leave=False, disable=not sys.stderr.isatty()))


# torch.multinomial draws from at most 2**24 categories (WeightedRandomSampler's limit too).
MAX_WEIGHTED_SAMPLES = 2**24


def class_balanced_weights(data: PreparedData) -> torch.Tensor:
    """One weight per training sample (in data.indices("train") order), 1 / the count of its
    class in the training split, for `epoch_batches`: each class is then drawn with the same
    probability, uniformly within it. On seed 003's Healthy/Unhealthy 70/30 split these are
    its class weights 0.6 and 1.4 up to a common factor (1/0.7 : 1/0.3 = 0.6 : 1.4).

    A data set without labels is a ConfigError: there is nothing to balance.
    """
    labels = data.sampleset.labels
    if labels is None:
        raise ConfigError(
            f"trainer.class_weighted_sampling=true needs class labels, and "
            f"{data.sampleset.source or 'the data set'} has none: set it to false or use "
            "labelled data (vitals_windows: a CSV with a label column, or generated patients)"
        )
    train = data.indices("train").numpy()
    if len(train) > MAX_WEIGHTED_SAMPLES:
        raise ConfigError(
            f"trainer.class_weighted_sampling=true draws from at most {MAX_WEIGHTED_SAMPLES} "
            f"training samples (torch.multinomial), and this split has {len(train)}"
        )
    classes, inverse, counts = np.unique(
        np.asarray(labels)[train], return_inverse=True, return_counts=True
    )
    shares = ", ".join(f"{c}: {n}" for c, n in zip(classes.tolist(), counts.tolist(), strict=True))
    if len(classes) < 2:
        log.warning("Class-weighted sampling over one class (%s): the draws are uniform", shares)
    else:
        log.info("Class-weighted sampling: training samples per class %s, drawn equally", shares)
    return torch.from_numpy(1.0 / counts[inverse.reshape(-1)]).float()


def freeze(model: torch.nn.Module, patterns: Sequence[str]) -> tuple[int, int]:
    """Stop training the parameters whose names match any of `patterns` (fnmatch over
    model.named_parameters(), e.g. "encoder_conv.*"); return (frozen, trainable) counts of
    scalar weights, also logged as MLflow params when a run is active.

    A pattern matching no parameter is a ConfigError listing the model's top-level modules
    that hold parameters.

    The modules whose parameters are all frozen are kept in eval mode while the rest trains: a
    frozen BatchNorm would otherwise still move its running mean and variance with every
    training batch (so its "frozen" output would drift), and a frozen block's dropout would
    keep perturbing the features the trained layers after it learn from. A forward pre-hook
    does it, so every loop that calls model.train() (train, bench, a wrapper) keeps it.
    """
    names = [name for name, _ in model.named_parameters()]
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if unmatched:
        top = ", ".join(dict.fromkeys(name.split(".", 1)[0] for name in names))
        raise ConfigError(
            f"trainer.freeze: {unmatched} match no parameter of {type(model).__name__}, whose "
            f"top-level modules are {top} (patterns match parameter names such as "
            f"{names[0] if names else '(none)'}; use e.g. '<module>.*')"
        )
    for name, parameter in model.named_parameters():
        if any(fnmatch.fnmatchcase(name, p) for p in patterns):
            parameter.requires_grad_(False)
    for module in frozen_modules(model):
        module.register_forward_pre_hook(_stay_in_eval)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if patterns:
        log.info(
            "Frozen %d of %d parameters (%d trainable) by trainer.freeze=%s",
            frozen,
            frozen + trainable,
            trainable,
            list(patterns),
        )
    if mlflow.active_run() is not None:
        mlflow.log_params(
            {"model.n_frozen_parameters": frozen, "model.n_trainable_parameters": trainable}
        )
    return frozen, trainable


def frozen_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The largest submodules whose parameters are all frozen (none above them is): each is put
    in eval mode as a whole, its parameter-free children (ReLU, Dropout) with it."""
    found: list[torch.nn.Module] = []

    def walk(module: torch.nn.Module) -> None:
        parameters = list(module.parameters())
        if parameters and not any(p.requires_grad for p in parameters):
            found.append(module)
            return
        for child in module.children():
            walk(child)

    walk(model)
    return found


def _stay_in_eval(module: torch.nn.Module, _inputs: Any) -> None:
    """Forward pre-hook of a frozen module: eval mode, whatever model.train() set."""
    if module.training:
        module.eval()


def trainable_parameters(model: torch.nn.Module, loss_fn: torch.nn.Module) -> list:
    """What the optimiser updates: the model's parameters and the loss's own (a learned σ),
    leaving out frozen ones (trainer.freeze); a ConfigError when nothing is left."""
    parameters = [p for p in (*model.parameters(), *loss_fn.parameters()) if p.requires_grad]
    if not parameters:
        raise ConfigError("trainer.freeze froze every parameter: nothing is left to train")
    return parameters


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group (the schedule is a pure function)."""
    for group in optimizer.param_groups:
        group["lr"] = lr


FLOAT32 = Precision("32", "cpu", "float32 throughout")


class StepPrecision:
    """The train step's precision: autocast over the forward pass and, for 16-mixed, the
    gradient scaler (float16's 5 exponent bits underflow small gradients; bf16 has float32's
    8 and needs none). The weights, the optimiser state and the loss stay float32.
    """

    def __init__(self, precision: Precision = FLOAT32) -> None:
        self.precision = precision
        enabled = precision.name == "16-mixed"
        self.scaler = torch.amp.GradScaler(precision.device_type) if enabled else None

    def forward(self, model: torch.nn.Module, x: torch.Tensor) -> VAEOutput:
        """The model's forward pass under autocast, its outputs back in float32.

        The loss is computed outside autocast on float32 outputs: its KL (an exp and squares
        summed over the batch) and the free-bits floor must not round to bf16's 8 bits.
        """
        with self.precision.autocast():
            output = model(x)
        if self.precision.autocast_dtype is None:
            return output
        return float32_output(output)

    def backward_and_step(
        self,
        loss: torch.Tensor,
        parameters: Iterable[torch.nn.Parameter],
        optimizer: torch.optim.Optimizer,
        grad_clip: float | None,
    ) -> None:
        """Backward, clip the global gradient norm, step (through the scaler for 16-mixed)."""
        if self.scaler is None:
            loss.backward()
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(parameters, grad_clip)
            optimizer.step()
            return
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(parameters, grad_clip)
        self.scaler.step(optimizer)  # skipped when a gradient overflowed; the scale backs off
        self.scaler.update()


def float32_output(output: VAEOutput) -> VAEOutput:
    """A forward pass's floating-point tensors in float32 (autocast leaves them bf16/fp16)."""

    def up(value: torch.Tensor) -> torch.Tensor:
        return value.float() if value.is_floating_point() else value

    return dataclasses.replace(
        output,
        recon=up(output.recon),
        mu=up(output.mu),
        logvar=up(output.logvar),
        z=up(output.z),
        branches={name: up(value) for name, value in output.branches.items()},
        extras={name: up(value) for name, value in output.extras.items()},
    )


def compiled(model: torch.nn.Module, enabled: bool) -> torch.nn.Module:
    """The module the train step calls: `model`, or torch.compile(model) when enabled.

    The compiled module shares the model's parameters, so the optimiser, the checkpoints and
    the validation pass (which calls `model` itself, in eval mode) see one set of weights.
    dynamic=False: a run's batches all have one shape but the last of an epoch cannot differ
    (epoch_batches drops the remainder), so one static graph serves the whole run.
    """
    return torch.compile(model, dynamic=False) if enabled else model


def latent_targets(
    loss_fn: torch.nn.Module, data: PreparedData, device: torch.device
) -> torch.Tensor | None:
    """Every sample's targets (N, k) when the loss regresses latent dimensions on the data's
    known factors (seed 004 Exp3, SupervisedLatentLoss); None for every other loss. The train
    step and the validation pass index them with the same sample indices as the batches."""
    if not isinstance(loss_fn, SupervisedLatentLoss):
        return None
    samples = data.sampleset
    return loss_fn.targets_from(samples.factors, samples.source).to(device)


def train_step(
    model: torch.nn.Module,
    loss_fn,  # noqa: ANN001 - any vaelab loss: (output, x, mask, beta, epoch) -> LossTerms
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
    epoch: float,
    grad_clip: float | None,
    precision: StepPrecision | None = None,
    targets: torch.Tensor | None = None,
) -> LossTerms:
    """One optimiser step: forward, loss at β and the fractional epoch, backward, clip, step.

    `precision` (float32 when None) autocasts the forward pass only; the loss sees float32
    outputs. `targets` are the batch's rows of `latent_targets` for a supervised loss. A loss
    that is not finite stops the run before the step can spoil the weights: the last good
    checkpoint stays the last one written.
    """
    precision = precision or StepPrecision()
    supervised = {} if targets is None else {"latent_targets": targets}
    terms = loss_fn(precision.forward(model, x), x, mask, beta, epoch, **supervised)
    if not torch.isfinite(terms.total):
        hint = "Lower trainer.lr or set trainer.grad_clip"
        if precision.precision.name == "16-mixed":
            hint += ", or use trainer.precision=bf16-mixed (float16 overflows above 65504)"
        raise DivergenceError(
            f"training loss became {terms.total.item()} at epoch {epoch:.2f} "
            f"(recon={terms.recon.item():.4g}, kl={terms.kl_raw.item():.4g}, β={beta:.4g}, "
            f"lr={optimizer.param_groups[0]['lr']:.3g}). {hint}"
        )
    optimizer.zero_grad(set_to_none=True)
    precision.backward_and_step(terms.total, model.parameters(), optimizer, grad_clip)
    return terms


class Validation:
    """Collapse diagnostics of a split after a given epoch (eval mode, z = mu).

    Every schedule rises to and holds schedule.beta, and every loss weight that follows the
    epoch settles by the last one, so each pass also scores the loss at those final weights
    (β = schedule.beta at the last epoch): the one figure that compares across epochs, which
    early stopping and the best checkpoint use.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        data: PreparedData,
        values: torch.Tensor,
        masks: torch.Tensor,
        loss_fn,  # noqa: ANN001 - any vaelab loss
        beta_schedule,  # noqa: ANN001 - epoch -> β
        settings: TrainerSettings,
    ) -> None:
        self.model, self.data, self.values, self.masks = model, data, values, masks
        self.loss_fn, self.beta_schedule = loss_fn, beta_schedule
        self.batch_size = settings.batch_size
        self.final_weights = (beta_schedule.beta, float(settings.epochs))
        self.latent_targets = latent_targets(loss_fn, data, values.device)

    def __call__(self, epoch: float, split: str = "val", limit: int | None = None) -> Diagnostics:
        """Diagnostics of `split` after `epoch` epochs (its first `limit` samples, if given)."""
        index = self.data.indices(split)[:limit].to(self.values.device)
        diagnostics = diagnose(
            self.model,
            take(self.values, index),  # a streamed split is read a batch at a time
            take(self.masks, index),
            self.loss_fn,
            self.beta_schedule(epoch),
            self.batch_size,
            self.values.device,
            epoch,
            self.data.sampleset.feature_groups,
            self.final_weights,
            None if self.latent_targets is None else self.latent_targets[index],
        )
        if not math.isfinite(diagnostics.loss):
            raise DivergenceError(f"{split} loss became {diagnostics.loss} after epoch {epoch:g}")
        return diagnostics

    def check_objectives(self, objectives: list[str]) -> None:
        """Stop before training when sweep.objective names a metric this run will not log.

        Which `val/*` metrics exist depends on the model (branches, codes), the loss (its own
        terms) and the data (feature groups): one pass over two validation samples with the
        untrained model lists them, through the same code that logs them every epoch.
        """
        logged = self(0.0, limit=2).metrics("val")
        unknown = [name for name in objectives if name not in logged]
        if unknown:
            raise ConfigError(
                f"sweep.objective names {unknown}, not validation metrics of this run; choose "
                f"from {', '.join(sorted(logged))}"
            )


class EarlyStopping:
    """Stop when the validation loss at the final weights has not improved for `patience`.

    An epoch improves on the best only when its loss is lower by more than `min_delta` (seed
    003: min_delta=0.001; Keras's EarlyStopping alike); a smaller gain counts as none, and
    does not make that epoch the best either, so the best checkpoint and the stop agree.
    """

    def __init__(self, patience: int | None, min_delta: float = 0.0) -> None:
        self.patience = patience
        self.min_delta = min_delta
        self.best_loss = math.inf
        self.best_epoch = -1
        self.epochs_without_improvement = 0

    def update(self, epoch: int, loss: float) -> bool:
        """Record this epoch's loss; True when it is the best so far."""
        if self.best_loss - loss > self.min_delta:
            self.best_loss, self.best_epoch, self.epochs_without_improvement = loss, epoch, 0
            return True
        self.epochs_without_improvement += 1
        if self.should_stop:
            log.info(
                "Early stop at epoch %d: no better validation loss for %d epochs",
                epoch,
                self.patience,
            )
        return False

    @property
    def should_stop(self) -> bool:
        """Whether `patience` epochs have passed without a better loss."""
        return self.patience is not None and self.epochs_without_improvement >= self.patience


def add_terms(sums: dict[str, torch.Tensor], terms: LossTerms) -> None:
    """Add a step's loss and the loss's own terms to running sums, on the device (no sync)."""
    for name, value in {"loss": terms.total, **terms.extras}.items():
        sums[name] = sums.get(name, 0.0) + value.detach()


def epoch_metrics(
    train_sums: dict[str, torch.Tensor],
    n_steps: int,
    val: Diagnostics,
    beta: float,
    lr: float,
    samples_per_second: float,
    epoch_seconds: float,
) -> dict[str, float]:
    """One epoch's MLflow metrics: train/* means, val/* diagnostics, schedule/*, perf/*."""
    return {
        **{f"train/{name}": total.item() / n_steps for name, total in train_sums.items()},
        **val.metrics("val"),
        "schedule/beta": beta,
        "schedule/lr": lr,
        "perf/epoch_seconds": epoch_seconds,
        "perf/samples_per_second": samples_per_second,
    }


def log_epoch(epoch: int, metrics: dict[str, float]) -> None:
    """One line per epoch in the run's log."""
    log.info(
        "epoch %d  train %.4f  val %.4f  recon %.4f  kl %.3f  AU %d  MI %.3f  β %.3f  %.1fs",
        epoch,
        metrics["train/loss"],
        metrics["val/loss"],
        metrics["val/recon"],
        metrics["val/kl"],
        metrics["val/active_units"],
        metrics["val/mi"],
        metrics["schedule/beta"],
        metrics["perf/epoch_seconds"],
    )
