"""Train one VAE from the Hydra config and return its validation objective (active units).

    python -m vaelab.train experiment=quick
    python -m vaelab.train model=mlp loss.free_bits=0.5 schedule=linear trainer.epochs=30
    torchrun --standalone --nproc_per_node=2 -m vaelab.train experiment=mri3d_dipvae  # DDP

`train` reads top to bottom, as nanoGPT's train.py does: check the config, seed, data, model,
the epoch loop with its step loop inline, then the final record. Every other piece is a named
helper one layer down (vaelab.loop, vaelab.report, vaelab.sweep.trial).
"""

import logging
import math
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import hydra
import mlflow
import optuna
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from vaelab import distributed
from vaelab.artifacts import Checkpoints, load_initial_weights
from vaelab.config import (
    TRUSTED_TARGETS,
    build,
    check_run_config,
    exits_with_one_message,
    objective_names,
)
from vaelab.data.prepare import PreparedData, prepare
from vaelab.data.streaming import EpochReads
from vaelab.diagnostics import sweep_constraints
from vaelab.loop import (
    EarlyStopping,
    StepPrecision,
    Validation,
    add_terms,
    class_balanced_weights,
    compiled,
    epoch_batches,
    epoch_metrics,
    freeze,
    log_epoch,
    progress_bar,
    set_lr,
    train_step,
    trainable_parameters,
)
from vaelab.probes import contamination_setting
from vaelab.report import downstream_plan, record_final
from vaelab.runtime import (
    Precision,
    resolve_device,
    resolve_precision,
    seed_everything,
    set_torch_threads,
    trials_on_this_host,
)
from vaelab.schedules import cosine_lr
from vaelab.sweep.trial import SweepTrial
from vaelab.tracking import log_config

log = logging.getLogger(__name__)


def train(cfg: DictConfig, run_dir: Path) -> float | list[float]:
    """Train, evaluate and record one run; return `sweep.objective` at the best epoch.

    Launched by vaelab's sweeper (optuna_trial.number set), the run is also an Optuna trial:
    it reports every epoch, may be pruned (raising optuna.TrialPruned after saving its
    checkpoint and latents), and records its constraints on the trial.
    """
    check_run_config(cfg)
    objectives = objective_names(cfg.sweep.objective)
    # The downstream report (eval/*, figures): at the run's end ("inline"), or, in a sweep's
    # trial, later ("deferred": vaelab.evaluate.evaluate_trial); "off" when not wanted.
    evaluation = cfg.evaluation
    is_trial = cfg.optuna_trial.number is not None
    downstream = downstream_plan(evaluation.downstream, evaluation.in_sweep, is_trial)
    contamination = contamination_setting(evaluation.contamination)  # checked before training
    trial = SweepTrial.from_config(cfg)  # None unless a vaelab sweep launched this run
    run_name, tags, parent_run_id = run_identity(cfg, trial, run_dir)
    # Under torchrun rank 0 alone records the run; the other ranks train only.
    records = distributed.is_main()
    run = build(cfg.tracking).start_run(run_name, tags, parent_run_id)
    with run if records else nullcontext() as run_id:
        if trial is not None:
            trial.start(run_id, run_dir, run_name)
        if records:
            log_config(cfg, run_dir)

        # --- seed, device, threads ---------------------------------------------------------
        # Each rank draws its own noise (nanoGPT's seed offset); the data take cfg.seed itself.
        seed_everything(cfg.seed + distributed.rank())
        settings = build(cfg.trainer)
        device = resolve_device(
            settings.device, cfg.optuna_trial.worker_slot, distributed.local_rank()
        )
        # Autocast covers the train step only: validation, the KL and the AU variance stay
        # float32, so their thresholds (AU at Var(mu) ≥ 0.01) do not move with precision.
        precision = resolve_precision(settings.precision, device)
        # A sweep's trials share this host with every worker's (vaelab.runtime.worker_slot).
        threads = set_torch_threads(settings.num_threads, trials_on_this_host() if trial else 1)

        # --- data: generate or read, split by patient, normalise on train only -------------
        log.info("Instantiating dataset <%s>", cfg.dataset._target_)
        split = cfg.split
        data = prepare(build(cfg.dataset), split.val_fraction, split.test_fraction, cfg.seed)
        values, masks = data.values.to(device), data.masks.to(device)
        train_index = data.indices("train").to(device)

        # --- model, loss, β schedule, optimiser ---------------------------------------------
        log.info("Instantiating model <%s>", cfg.model._target_)
        samples = data.sampleset
        model = build(cfg.model, input_shape=samples.sample_shape).to(device)
        # trainer.init_from's weights, then trainer.freeze: before the optimiser takes the rest.
        load_initial_weights(
            model, settings.init_from, cfg.tracking.uri, settings.init_from_command
        )
        freeze(model, settings.freeze)
        channels = dict(n_channels=samples.n_channels, channel_axis=samples.channel_axis)
        loss_fn = build(cfg.loss, **channels).to(device)
        beta_schedule, criteria = build(cfg.schedule), build(cfg.verdict)
        optimizer = settings.optimizer(trainable_parameters(model, loss_fn))
        batch_size = settings.batch_size_for(len(train_index))
        balanced = settings.class_weighted_sampling  # draw classes equally (seed 003)
        sample_weights = class_balanced_weights(data).to(device) if balanced else None
        if records:
            log_model(model, data, device, threads, batch_size, precision)
        ddp_model = distributed.wrap(model, loss_fn, device)  # `model` itself in one process
        step_model, step_precision = compiled(ddp_model, settings.compile), StepPrecision(precision)
        validate = Validation(model, data, values, masks, loss_fn, beta_schedule, settings)
        # None, or each sample's known factors for a supervised loss (seed 004 Exp3)
        targets = validate.latent_targets
        validate.check_objectives(objectives)
        config = OmegaConf.to_container(cfg, resolve=True)
        checkpoints = Checkpoints(run_dir / "checkpoints", data, config)
        early_stopping, pruned_at = EarlyStopping(settings.patience, settings.min_delta), None

        # --- train -------------------------------------------------------------------------
        with checkpoints.kept_on_divergence():
            for epoch in range(settings.epochs):
                model.train()
                started = time.perf_counter()
                batches = epoch_batches(train_index, batch_size, sample_weights)
                batches = distributed.shard_batches(batches)  # this rank's slice of each
                train_sums: dict[str, torch.Tensor] = {}  # summed on the device: no sync a step
                # (values[b], masks[b]) per batch; a streamed file's are read ahead (workers)
                reads = EpochReads(values, masks, batches)
                for step, (x, mask) in enumerate(progress_bar(reads, epoch)):
                    progress = epoch + step / len(batches)  # the fractional epoch
                    beta = beta_schedule(progress)
                    lr = cosine_lr(progress / settings.epochs, settings.lr, settings.min_lr_ratio)
                    set_lr(optimizer, lr)
                    terms = train_step(
                        step_model,
                        loss_fn,
                        optimizer,
                        x,
                        mask,
                        beta,
                        progress,
                        settings.grad_clip,
                        step_precision,
                        None if targets is None else targets[batches[step]],
                    )
                    add_terms(train_sums, terms)
                train_seconds = time.perf_counter() - started
                train_sums = distributed.mean_over_ranks(train_sums)  # the global batches'
                if not records:  # rank 0 alone validates, records and decides to stop
                    if distributed.stop_from_rank0():
                        break
                    continue

                # --- validate, log, checkpoint, stop early or be pruned ----------------------
                val = validate(epoch + 1)
                metrics = epoch_metrics(
                    train_sums,
                    len(batches),
                    val,
                    beta_schedule(epoch + 1),
                    lr,
                    samples_per_second=len(batches) * batch_size / train_seconds,
                    epoch_seconds=time.perf_counter() - started,
                )
                mlflow.log_metrics(metrics, step=epoch)  # one batched call per epoch
                log_epoch(epoch, metrics)
                is_best = early_stopping.update(epoch, val.loss_final_weights)
                checkpoints.save(model, loss_fn, optimizer, epoch, val.loss_final_weights, is_best)
                if distributed.stop_from_rank0(early_stopping.should_stop):
                    break
                if trial is not None and trial.should_prune(epoch, metrics):
                    pruned_at = epoch  # its checkpoint and latents are kept, as for any run
                    break

        if not records:
            return math.nan  # rank 0 records the run and returns its objective

        # --- the best epoch's diagnostics, verdict, latents, downstream report ----------------
        final_metrics, verdict = record_final(
            model,
            checkpoints,
            early_stopping.best_epoch,
            (epoch, val),
            validate,
            data,
            run_dir,
            criteria,
            evaluation.iwae_samples,
            downstream,
            evaluation.normal_label,
            contamination,
            cfg.seed,
        )
        results = [final_metrics[name.replace("val/", "final/", 1)] for name in objectives]
        if trial is not None:
            constraints = sweep_constraints(final_metrics, cfg.sweep.kl_threshold, criteria)
            mlflow.log_metrics({f"final/constraint_{c.name}": c.value for c in constraints})
            feasible, why = trial.finish(final_metrics, verdict, constraints, model.latent_dim)
            # Feasible is the sweep's judgement (its KL threshold), the verdict the run's own
            # collapse checks (conf verdict:): both go on the run, for the runs table.
            mlflow.log_metric("final/feasible", float(feasible))
            mlflow.set_tags({"sweep.feasible": str(feasible).lower(), "sweep.feasibility": why})
            if pruned_at is not None:
                raise optuna.TrialPruned(f"pruned by the sweep's pruner after epoch {pruned_at}")
            mlflow.set_tag("trial_state", "COMPLETE")
        return results[0] if len(results) == 1 else results


def run_identity(
    cfg: DictConfig, trial: SweepTrial | None, run_dir: Path
) -> tuple[str | None, dict[str, str], str | None]:
    """The MLflow run's name, tags and parent: a sweep's trial is a child of the sweep's run."""
    tags = {"run_dir": str(run_dir)}
    if trial is None:
        return cfg.run_name, tags, None
    tags |= {"sweep.study_name": trial.study_name, "sweep.trial_number": str(trial.number)}
    name = cfg.run_name or f"{trial.study_name}-{trial.number:04d}"
    return name, tags, trial.parent_run_id


def log_model(
    model: torch.nn.Module,
    data: PreparedData,
    device: torch.device,
    threads: int,
    batch_size: int,
    precision: Precision,
) -> None:
    """The model's size, the input it reads, where it runs, the batch and the precision it
    trains with, and how its KL is computed, as params and a log line."""
    n_parameters = sum(p.numel() for p in model.parameters())
    input_shape = data.sampleset.sample_shape
    # closed_form against N(0, I); monte_carlo under a mixture prior (vaelab.models.priors):
    # val/kl is then an estimate. A VQ-VAE has no Gaussian posterior and no prior module.
    prior = getattr(model, "prior", None)
    mlflow.log_params(
        {
            "model.n_parameters": n_parameters,
            "kl.estimator": "none" if prior is None else prior.kl_estimator,
            "data.input_shape": str(input_shape),
            "torch.num_threads": threads,
            "trainer.batch_size_used": batch_size,
            "trainer.world_size": distributed.world_size(),  # processes under torchrun
            "trainer.precision_used": precision.name,
            "trainer.precision_reason": precision.reason,
        }
    )
    log.info(
        "%d parameters, input %s, on %s (%d threads), batches of %d, precision %s (%s)",
        n_parameters,
        input_shape,
        device,
        threads,
        batch_size,
        precision.name,
        precision.reason,
    )


@hydra.main(config_path="../conf", config_name="train", execution_whitelist=TRUSTED_TARGETS)
@exits_with_one_message
def main(cfg: DictConfig) -> float | list[float]:
    """Hydra entry point: one run, or one trial of a sweep; under torchrun, one rank of a run."""
    in_sweep = HydraConfig.get().mode == RunMode.MULTIRUN
    with distributed.process_group(cfg.trainer.device, in_sweep):
        # Rank 0's run folder on every rank: Hydra made none for the others.
        run_dir = distributed.broadcast_object(Path(HydraConfig.get().runtime.output_dir))
        return train(cfg, run_dir)


if __name__ == "__main__":
    sys.argv += distributed.other_rank_hydra_overrides()  # rank 0 alone writes Hydra's files
    main()
