"""Train one VAE from the Hydra config and return its validation active units.

    python -m vaelab.train experiment=quick
    python -m vaelab.train model=mlp loss.free_bits=0.5 schedule=linear trainer.epochs=30

Reads top to bottom: seed, build from config, train, evaluate, checkpoint, log, return.
"""

import logging
import math
import os
import sys
import time
from pathlib import Path

import hydra
import mlflow
import optuna
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import execution_whitelist, instantiate
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from vaelab.checkpoint import save_checkpoint
from vaelab.data.prepare import prepare
from vaelab.diagnostics import Evaluation, evaluate
from vaelab.downstream import report_run
from vaelab.errors import ConfigError, DivergenceError, VaelabError
from vaelab.outputs import encode_all, write_branch_components, write_latents
from vaelab.settings import TRUSTED_TARGETS, cosine_lr, resolve_device, seed_everything
from vaelab.tracking import flatten_config, log_verdict
from vaelab.trial import SweepTrial, objective_names, sweep_trial_from_config

log = logging.getLogger(__name__)


def train(cfg: DictConfig, run_dir: Path) -> float | list[float]:
    """Train, evaluate and record one run; return `sweep.objective` at the best epoch.

    Launched by vaelab's sweeper (sweep.trial_number set), the run is also an Optuna trial:
    it reports every epoch, may be pruned (raising optuna.TrialPruned after saving its
    checkpoint and latents), and records the KL constraint on the trial.
    """
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(
            f"{', '.join(missing)} required: give {missing[0]}=... on the command line"
        )
    with execution_whitelist(list(TRUSTED_TARGETS)):
        tracker = build(cfg.tracking)
        pruner = build(cfg.sweep.pruner) if cfg.sweep.pruner else None
        trial = sweep_trial_from_config(cfg.sweep, pruner)
        tags = {"run_dir": str(run_dir)}
        run_name = cfg.run_name
        if trial is not None:
            tags.update(
                {"sweep.study_name": cfg.sweep.study_name, "sweep.trial_number": str(trial.number)}
            )
            run_name = run_name or f"{cfg.sweep.study_name}-{trial.number:04d}"
        with tracker.start_run(run_name, tags, parent_run_id=cfg.sweep.parent_run_id) as run_id:
            if trial is not None:
                trial.start(run_id, run_dir)
            try:
                objective = _train(cfg, run_dir, trial)
                if trial is not None:
                    mlflow.set_tag("trial_state", "COMPLETE")
                return objective
            except DivergenceError:
                # The run is marked FAILED; its last good checkpoint is kept with it.
                if (run_dir / "checkpoints").is_dir():
                    mlflow.log_artifacts(str(run_dir / "checkpoints"), artifact_path="checkpoints")
                raise


def build(node: DictConfig, **runtime_kwargs: object) -> object:
    """instantiate(), turning what goes wrong into one message naming the config key.

    Hydra wraps an error raised by a target in an InstantiationException (or re-raises a
    TypeError for a misspelt argument, with the key in a note). A vaelab error of the target
    comes through as itself; anything else becomes a ConfigError carrying Hydra's text, which
    names the key. The full traceback stays in the log at DEBUG level.
    """
    try:
        return instantiate(node, **runtime_kwargs)
    except (InstantiationException, TypeError) as err:
        if isinstance(err.__cause__, VaelabError):
            raise err.__cause__ from None
        log.debug("instantiate failed", exc_info=True)
        notes = "".join(f"\n{note}" for note in getattr(err, "__notes__", []))
        raise ConfigError(f"{err}{notes}") from err


def _train(cfg: DictConfig, run_dir: Path, trial: SweepTrial | None) -> float | list[float]:
    run_dir.mkdir(parents=True, exist_ok=True)
    mlflow.log_params(flatten_config(cfg))
    config = OmegaConf.to_container(cfg, resolve=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))

    # --- seed, device -------------------------------------------------------------------
    seed_everything(cfg.seed)
    trainer = build(cfg.trainer)
    threads = trainer.num_threads
    if threads is None and cfg.sweep.n_parallel > 1:  # parallel trials share the cores
        threads = max(1, (os.cpu_count() or 1) // cfg.sweep.n_parallel)
    if threads:
        torch.set_num_threads(threads)
    mlflow.log_param("torch.num_threads", torch.get_num_threads())
    device = resolve_device(trainer.device)

    # --- data: generate or read, split by patient, normalise on train only ----------------
    log.info("Instantiating dataset <%s>", cfg.dataset._target_)
    data = prepare(build(cfg.dataset), cfg.split.val_fraction, cfg.split.test_fraction, cfg.seed)
    values, masks = data.values.to(device), data.masks.to(device)
    train_index = data.indices("train").to(device)
    input_shape = data.sampleset.sample_shape

    # --- model, loss, β schedule, optimiser ---------------------------------------------
    log.info("Instantiating model <%s> for input %s", cfg.model._target_, input_shape)
    model = build(cfg.model, input_shape=input_shape).to(device)
    loss_fn = build(cfg.loss)
    schedule = build(cfg.schedule)
    optimizer = trainer.optimizer(model.parameters())
    n_params = sum(p.numel() for p in model.parameters())
    mlflow.log_params({"model.n_parameters": n_params, "data.input_shape": str(input_shape)})
    log.info("%d parameters on %s", n_params, device)

    # Every schedule rises to and holds schedule.beta, and every loss weight that follows the
    # epoch settles by the last one: the loss at those final weights compares across epochs.
    final_weights = (schedule.beta, float(trainer.epochs))

    def evaluate_split(beta: float, epoch: float, split: str = "val") -> Evaluation:
        index = data.indices(split).to(device)
        return evaluate(
            model,
            values[index],
            masks[index],
            loss_fn,
            beta,
            trainer.batch_size,
            device,
            epoch,
            data.sampleset.feature_groups,
            final_weights,
        )

    # --- train ----------------------------------------------------------------------------
    # A last batch of one sample would break BatchNorm; it joins the next epoch's shuffle.
    steps_per_epoch = max(len(train_index) // trainer.batch_size, 1)
    checkpoint_dir = run_dir / "checkpoints"
    best_val_loss, best_epoch, epochs_without_improvement = math.inf, -1, 0
    objectives, pruned_at = objective_names(cfg.sweep.objective), None
    for epoch in range(trainer.epochs):
        model.train()
        started = time.perf_counter()
        order = train_index[torch.randperm(len(train_index), device=device)]
        train_sums: dict[str, torch.Tensor] = {}  # summed on the device: no sync per step
        steps = tqdm(
            range(steps_per_epoch),
            desc=f"epoch {epoch}",
            leave=False,
            disable=not sys.stderr.isatty(),
        )
        for step in steps:
            progress = epoch + step / steps_per_epoch
            beta = schedule(progress)
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(progress / trainer.epochs, trainer.lr, trainer.min_lr_ratio)
            batch = order[step * trainer.batch_size : (step + 1) * trainer.batch_size]
            x, m = values[batch], masks[batch]
            terms = loss_fn(model(x), x, m, beta, progress)
            if not torch.isfinite(terms.total):
                raise DivergenceError(
                    f"training loss became {terms.total.item()} at epoch {epoch}, step {step} "
                    f"(recon={terms.recon.item():.4g}, kl={terms.kl_raw.item():.4g}, β={beta:.4g}, "
                    f"lr={optimizer.param_groups[0]['lr']:.3g}); the last good checkpoint is in "
                    f"{checkpoint_dir}. Lower trainer.lr or set trainer.grad_clip."
                )
            optimizer.zero_grad(set_to_none=True)
            terms.total.backward()
            if trainer.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), trainer.grad_clip)
            optimizer.step()
            for name, value in {"loss": terms.total, **terms.extras}.items():
                train_sums[name] = train_sums.get(name, 0.0) + value.detach()
            if not steps.disable:
                steps.set_postfix(loss=f"{terms.total.item():.4f}", beta=f"{beta:.3f}")
        train_seconds = time.perf_counter() - started

        # --- evaluate: loss terms and collapse diagnostics on the validation split -------
        beta = schedule(epoch + 1)
        val = evaluate_split(beta, epoch + 1)
        if not math.isfinite(val.loss):
            raise DivergenceError(f"validation loss became {val.loss} after epoch {epoch}")
        # val/loss moves with β (and C(t), λ(t)); early stopping compares the final weights'.
        val_loss_final = val.loss_reference
        epoch_seconds = time.perf_counter() - started
        metrics = {
            **{f"train/{name}": sum_.item() / steps_per_epoch for name, sum_ in train_sums.items()},
            **val.metrics("val"),
            "val/loss_final_weights": val_loss_final,
            "schedule/beta": beta,
            "schedule/lr": optimizer.param_groups[0]["lr"],
            "perf/epoch_seconds": epoch_seconds,
            "perf/samples_per_second": steps_per_epoch * trainer.batch_size / train_seconds,
        }
        mlflow.log_metrics(metrics, step=epoch)  # one batched call per epoch
        unknown = [
            name for name in objectives if name not in metrics or not name.startswith("val/")
        ]
        if unknown:
            raise ConfigError(
                f"sweep.objective names {unknown}, not validation metrics of this run; choose "
                f"from {', '.join(sorted(k for k in metrics if k.startswith('val/')))}"
            )
        log.info(
            "epoch %d  train %.4f  val %.4f  recon %.4f  kl %.3f  AU %d  MI %.3f  β %.3f  %.1fs",
            epoch,
            metrics["train/loss"],
            val.loss,
            val.recon,
            val.kl_raw,
            metrics["val/active_units"],
            metrics["val/mi"],
            beta,
            epoch_seconds,
        )

        # --- checkpoint: the best epoch by val loss at the target β, and the last good one --
        checkpoint = dict(
            optimizer=optimizer,
            epoch=epoch,
            normaliser=data.normaliser,
            config=config,
            input_shape=input_shape,
            val_loss=val_loss_final,
            channel_names=list(data.sampleset.channel_names)
            if data.sampleset.channel_names_given
            else None,
        )
        save_checkpoint(checkpoint_dir / "last.pt", model, **checkpoint)
        if val_loss_final < best_val_loss:
            best_val_loss, best_epoch, epochs_without_improvement = val_loss_final, epoch, 0
            save_checkpoint(checkpoint_dir / "model.pt", model, **checkpoint)
        else:
            epochs_without_improvement += 1
            if trainer.patience is not None and epochs_without_improvement >= trainer.patience:
                log.info(
                    "Early stop at epoch %d: no better validation loss for %d epochs",
                    epoch,
                    trainer.patience,
                )
                break
        if trial is not None and trial.should_stop(epoch, metrics):
            pruned_at = epoch  # checkpoint and latents are kept, as for any finished run
            log.info(
                "Pruned by the sweep after epoch %d: %s = %.4g",
                epoch,
                objectives[0],
                metrics[objectives[0]],
            )
            break

    # --- final evaluation of the best checkpoint, artifacts, verdict ---------------------
    best = torch.load(checkpoint_dir / "model.pt", map_location=device, weights_only=True)
    model.load_state_dict(best["model"])
    val = evaluate_split(schedule(best_epoch + 1), best_epoch + 1)
    final_metrics = {k.replace("val/", "final/", 1): v for k, v in val.metrics("val").items()}
    final_metrics["final/best_epoch"] = best_epoch
    mlflow.log_metrics(final_metrics)
    verdict = val.verdict()
    log_verdict(verdict, val.kl_per_dim.tolist())

    mu, logvar = encode_all(model, values, trainer.batch_size, device)
    write_latents(run_dir / "latents.h5", mu, logvar, data)
    mlflow.log_artifact(str(run_dir / "latents.h5"))
    if cfg.evaluation.downstream:  # are the latents useful? (seed 000 step 3, seed 003)
        report_run(
            mlflow.MlflowClient(),
            mlflow.active_run().info.run_id,
            model,
            data,
            mu.numpy(),
            val.kl_per_dim.numpy(),
            run_dir,
            device,
            cfg.seed,
            cfg.evaluation.normal_label,
        )
    if val.branch_recon:
        write_branch_components(run_dir / "multiscale_components.h5", model, data, device)
        mlflow.log_artifact(str(run_dir / "multiscale_components.h5"))
    mlflow.log_artifacts(str(checkpoint_dir), artifact_path="checkpoints")
    mlflow.log_artifact(str(run_dir / "config.yaml"))

    values = [final_metrics[name.replace("val/", "final/", 1)] for name in objectives]
    log.info(
        "Best epoch %d: %s (latent dim %d), KL %.3f nats, verdict %s",
        best_epoch,
        ", ".join(f"{n} = {v:.4g}" for n, v in zip(objectives, values, strict=True)),
        model.latent_dim,
        val.kl_raw,
        verdict["verdict"],
    )
    if trial is not None:
        mlflow.log_metric("final/constraint_kl", trial.finish(final_metrics, verdict["verdict"]))
        if pruned_at is not None:
            raise optuna.TrialPruned(
                f"pruned by {type(trial.study.pruner).__name__} after epoch {pruned_at}"
            )
    return values[0] if len(values) == 1 else values


@hydra.main(config_path="../conf", config_name="train", execution_whitelist=list(TRUSTED_TARGETS))
def main(cfg: DictConfig) -> float:
    """Hydra entry point: one run, or one trial of a sweep."""
    hydra_cfg = HydraConfig.get()
    try:
        return train(cfg, Path(hydra_cfg.runtime.output_dir))
    except VaelabError as err:
        if hydra_cfg.mode == RunMode.MULTIRUN:
            raise  # the sweeper records the failed trial and goes on
        log.error("%s", err)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
