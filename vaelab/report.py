"""What a trained run leaves for people to read: its final diagnostics, verdict and artifacts
(`record_final`, at the end of training), and the downstream report of its latents
(`report_run`: probe metrics and figures, at the end of training, or later: a sweep's trials
defer it, and `python -m vaelab.evaluate` repeats it on any stored run).
"""

import json
import logging
from pathlib import Path

import h5py
import mlflow
import numpy as np
import torch

from vaelab import plots
from vaelab.artifacts import (
    Checkpoints,
    encode_all,
    log_artifact_once,
    write_branch_components,
    write_latents,
    write_risk_scores,
)
from vaelab.config import IN_SWEEP_CHOICES
from vaelab.data.prepare import PreparedData
from vaelab.diagnostics import (
    CollapseCriteria,
    Diagnostics,
    eval_batch_size,
    importance_weighted_log_px,
    supervised_correlations,
)
from vaelab.errors import ConfigError
from vaelab.forest_export import ExportedForest
from vaelab.loop import Validation
from vaelab.models.base import GaussianVAE
from vaelab.probes import CLASS_SHARE, RiskScores, probe_latents, score_risk
from vaelab.tracking import log_batch, log_final
from vaelab.volume_metrics import volume_reconstruction_metrics, volume_scores

log = logging.getLogger(__name__)

N_RECONSTRUCTIONS = 4  # validation samples drawn against their reconstructions
# Seed 003's risk model of a run (an IsolationForest read without pickle, vaelab.forest_export)
# and every sample's risk score beside latents.h5.
RISK_MODEL, RISK_SCORES = "risk_model.npz", "risk_scores.h5"
# The run's tag saying where its downstream report (eval/* metrics, figures/*.png) stands:
# "done", "deferred" (a sweep's trial; vaelab.evaluate.evaluate_trial adds it), or "off".
EVAL_STATUS_TAG = "eval/status"


def downstream_plan(downstream: bool, in_sweep: str, is_trial: bool) -> str:
    """When this run's downstream report is made: "inline" at its end, "deferred" (a sweep's
    trial with evaluation.in_sweep=deferred), or "off" (evaluation.downstream=false)."""
    if in_sweep not in IN_SWEEP_CHOICES:
        raise ConfigError(
            f"evaluation.in_sweep must be one of {', '.join(IN_SWEEP_CHOICES)}, got {in_sweep!r}"
        )
    if not downstream:
        return "off"
    return "deferred" if is_trial and in_sweep == "deferred" else "inline"


def record_final(
    model: torch.nn.Module,
    checkpoints: Checkpoints,
    best_epoch: int,
    last: tuple[int, Diagnostics],
    validate: Validation,
    data: PreparedData,
    run_dir: Path,
    criteria: CollapseCriteria,
    iwae_samples: int,
    downstream: str,
    normal_label: object,
    contamination: float | str,
    seed: int,
) -> tuple[dict[str, float], dict[str, object]]:
    """The best epoch's final/* metrics, the held-out log p(x), the verdict and the run's
    artifacts, logged; the downstream report too when `downstream` is "inline" (see
    `downstream_plan`). Returns the final metrics and the verdict.

    `last` is the last epoch trained and its validation diagnostics: when it is the best
    epoch, the model already holds the best weights and those diagnostics are the best
    epoch's (the same pass, seeded), so nothing is reloaded or measured again.
    """
    device = validate.values.device
    last_epoch, val = last
    if best_epoch != last_epoch:
        best = torch.load(checkpoints.best, map_location=device, weights_only=True)
        model.load_state_dict(best["model"])
        validate.loss_fn.load_state_dict(best["loss"])
        val = validate(best_epoch + 1)
    final_metrics = {k.replace("val/", "final/", 1): v for k, v in val.metrics("val").items()}
    final_metrics["final/best_epoch"] = best_epoch
    final_metrics |= held_out_log_px(model, validate, data, iwae_samples, seed)
    verdict = val.verdict(criteria)
    status = {} if downstream == "inline" else {EVAL_STATUS_TAG: downstream}  # report_run: done
    log_final(final_metrics, verdict, val.kl_per_dim.tolist(), status)
    log.info(
        "Best epoch %d: AU %d of %d, KL %.3f nats (MI %.3f + marginal %.3f), recon %.4g "
        "(z = 0: %.4g), collapse verdict %s (failed: %s)",
        best_epoch,
        final_metrics["final/active_units"],
        model.latent_dim,
        val.kl_raw,
        final_metrics["final/mi"],
        final_metrics["final/kl_marginal"],
        val.recon,
        val.recon_z0,
        verdict["verdict"],
        verdict["failed"],
    )

    batch_size = eval_batch_size(validate.batch_size, validate.values[0].numel())
    mu, logvar = encode_all(model, validate.values, batch_size, device)
    write_latents(run_dir / "latents.h5", mu, logvar, data.sampleset.ids, split=data.split)
    log_artifact_once(run_dir / "latents.h5")
    if validate.latent_targets is not None:  # seed 004 Exp3: do z_vol, z_loc follow their factors?
        names = validate.loss_fn.target_names
        held_out = data.indices("test")
        correlations = supervised_correlations(mu, validate.latent_targets.cpu(), held_out, names)
        mlflow.log_metrics(correlations)
        final_metrics |= correlations
    if downstream == "inline":  # are the latents useful? (seed 000 step 3, seed 003)
        report_run(
            mlflow.MlflowClient(),
            mlflow.active_run().info.run_id,
            model,
            data,
            mu.numpy(),
            val.kl_per_dim.numpy(),
            run_dir,
            device,
            seed,
            normal_label,
            contamination,
        )
    elif downstream == "deferred":
        log.info(
            "Downstream evaluation deferred (evaluation.in_sweep=deferred): "
            "vaelab.evaluate.evaluate_trial adds it to this run later"
        )
    if val.branch_recon:
        write_branch_components(run_dir / "multiscale_components.h5", model, data, device)
        log_artifact_once(run_dir / "multiscale_components.h5")
    log_artifact_once(checkpoints.directory, artifact_path="checkpoints")
    mlflow.log_artifact(str(run_dir / "config.yaml"))
    return final_metrics, verdict


def held_out_log_px(
    model: torch.nn.Module,
    validate: Validation,
    data: PreparedData,
    iwae_samples: int,
    seed: int,
) -> dict[str, float]:
    """final/log_px_iwae and final/elbo on the test split (the validation split when there is
    no test split): nats per sample. Only for Gaussian posteriors; skipped with a reason."""
    if iwae_samples < 1 or not isinstance(model, GaussianVAE):
        why = "evaluation.iwae_samples is 0" if iwae_samples < 1 else "no Gaussian posterior"
        log.info("log p(x) estimate skipped: %s", why)
        return {}
    split = "test" if len(data.indices("test")) else "val"
    index = data.indices(split).to(validate.values.device)
    estimate = importance_weighted_log_px(
        model,
        validate.loss_fn,
        validate.values[index],
        validate.masks[index],
        iwae_samples,
        validate.batch_size,
        seed,
    )
    log.info(
        "log p(x) on the %s split: %.3f nats per sample (IWAE, K = %d); ELBO %.3f",
        split,
        estimate.iwae,
        iwae_samples,
        estimate.elbo,
    )
    return {"final/log_px_iwae": estimate.iwae, "final/elbo": estimate.elbo}


def report_run(
    client: mlflow.MlflowClient,
    run_id: str,
    model: torch.nn.Module,
    data: PreparedData,
    mu: np.ndarray,
    kl_per_dim: np.ndarray,
    out_dir: Path,
    device: torch.device,
    seed: int,
    normal_label: object = 0,
    contamination: float | str = CLASS_SHARE,
) -> dict[str, float]:
    """Log `eval/*` metrics and `figures/*.png` of a trained model to its run; return them.

    `normal_label` and `contamination` (checked by probes.contamination_setting) set seed 003's
    anomaly detector: the class it is fitted on, and the share of samples it flags.
    """
    samples = data.sampleset
    metrics = probe_latents(
        mu,
        data.split,
        data.values.numpy(),
        samples.labels,
        samples.factors,
        seed=seed,
    )
    risk = score_risk(mu, data.split, samples.labels, normal_label, contamination, seed)
    if risk is not None:
        metrics |= risk.metrics
    if data.values.ndim == 5 and len(data.indices("val")):  # volumes: seed 004's SSIM and PSNR
        metrics |= volume_reconstruction_metrics(
            model,
            data.values,
            device,
            index=data.indices("val"),
            masks=data.masks,
            channel_names=samples.channel_names,
        )
    log_batch(client, run_id, metrics, {EVAL_STATUS_TAG: "done"})

    figures = out_dir / "figures"
    logged = client.get_run(run_id).data  # its config as params, its final/* metrics
    au = logged.metrics.get("final/active_units")
    plots.plot_kl_per_dim(
        kl_per_dim,
        figures / "kl_per_dim.png",
        sort=True,
        active_units=None if au is None else int(au),
    )
    history = {
        name: sorted(client.get_metric_history(run_id, name), key=lambda m: m.step)
        for name in ("val/active_units", "val/kl", "schedule/beta")
    }
    if history["val/kl"]:
        plots.plot_training_curves(
            [m.step for m in history["val/kl"]],
            *([m.value for m in history[name]] for name in history),
            figures / "collapse_curves.png",
            latent_dim=mu.shape[1],
            **plots.kl_threshold_of(logged.params, logged.tags),
        )
    if data.values.ndim == 5 and len(data.indices("val")):  # volumes: slices and recon_volumes.h5
        save_volume_reconstructions(client, run_id, model, data, out_dir, device)
    if data.values.ndim in (2, 3):  # sequences and feature vectors; volumes have no line plot
        index = data.indices("val")[:N_RECONSTRUCTIONS]
        model.eval()
        with torch.no_grad():
            out = model(data.values[index].to(device))
        plots.plot_reconstructions(
            data.values[index].numpy(),
            out.recon.cpu().numpy(),
            figures / "reconstructions.png",
            channel_names=samples.channel_names,
            branches={name: b.cpu().numpy() for name, b in out.branches.items()},
            masks=data.masks[index].numpy(),
            sample_ids=samples.ids[index.numpy()],
        )
    plots.plot_latent_projection(mu, figures / "latents_pca.png", labels=samples.labels)
    for name, factor in samples.factors.items():
        if np.issubdtype(np.asarray(factor).dtype, np.number):
            plots.plot_latent_projection(
                mu, figures / f"latents_pca_{name}.png", factor=factor, factor_name=name
            )
    if risk is not None:
        record_risk(client, run_id, risk, data, out_dir)
    client.log_artifacts(run_id, str(figures), artifact_path="figures")
    # Every eval/* metric is on the run; the log names how many, and lists them at DEBUG.
    log.info("Downstream evaluation of run %s: %d eval/* metrics, figures", run_id, len(metrics))
    log.debug("eval/* of run %s: %s", run_id, ", ".join(f"{k}={v:.3g}" for k, v in metrics.items()))
    return metrics


def log_run_file(client: mlflow.MlflowClient, run_id: str, path: Path) -> None:
    """A file of the downstream report, logged to its run: at the end of the run itself (the
    active run) with its bytes kept once (artifacts.log_artifact_once); for `vaelab.evaluate`
    on a stored run, through the client."""
    active = mlflow.active_run()
    if active is not None and active.info.run_id == run_id:
        log_artifact_once(path)
    else:
        client.log_artifact(run_id, str(path))


@torch.no_grad()
def save_volume_reconstructions(
    client: mlflow.MlflowClient,
    run_id: str,
    model: torch.nn.Module,
    data: PreparedData,
    out_dir: Path,
    device: torch.device,
    n_volumes: int = N_RECONSTRUCTIONS,
) -> dict[str, np.ndarray]:
    """The first `n_volumes` validation volumes beside their reconstructions (eval mode,
    z = mu), seed 004's saved reconstructions: figures/volume_reconstructions.png (central
    axial, coronal and sagittal slices per modality, titled with each volume's SSIM and PSNR)
    and recon_volumes.h5 (`input`, `recon`, `ids`, `channel_names`, `ssim`, `psnr`), logged to
    the run. The figure goes up with the run's other figures (`report_run`). Returns what the
    file holds."""
    index = data.indices("val")[:n_volumes]
    model.eval()
    x = data.values[index].to(device)
    recon = model(x).recon
    masks = data.masks[index].to(device)
    ssim, psnr = volume_scores(x, recon, None if bool(masks.all()) else masks)
    samples = data.sampleset
    saved = {
        "input": x.cpu().numpy(),
        "recon": recon.cpu().numpy(),
        "ids": samples.ids[index.numpy()],
        "channel_names": np.asarray(samples.channel_names),
        "ssim": ssim.cpu().numpy(),
        "psnr": psnr.cpu().numpy(),
    }
    plots.plot_volume_reconstructions(
        saved["input"],
        saved["recon"],
        out_dir / "figures" / "volume_reconstructions.png",
        channel_names=samples.channel_names,
        sample_ids=saved["ids"],
        ssim=saved["ssim"],
        psnr=saved["psnr"],
    )
    path = out_dir / "recon_volumes.h5"
    partial = path.with_name(path.name + ".tmp")
    text = h5py.string_dtype()
    with h5py.File(partial, "w") as f:
        for name in ("input", "recon", "ssim", "psnr"):
            # one chunk per volume; gzip: 4 volumes of 4 x 128³ float32 are 134 MB a dataset
            chunks = (1, *saved[name].shape[1:]) if saved[name].ndim == 5 else None
            f.create_dataset(name, data=saved[name], chunks=chunks, compression="gzip")
        for name in ("ids", "channel_names"):
            f.create_dataset(name, data=[str(v) for v in saved[name]], dtype=text)
        f.attrs["units"] = "normalised (z-scored per subject and channel), as the model reads them"
        f.attrs["split"] = "val"
    partial.replace(path)
    log_run_file(client, run_id, path)
    log.info(
        "Saved %d validation volumes and their reconstructions: %s, figures/%s",
        len(index),
        path.name,
        "volume_reconstructions.png",
    )
    return saved


def record_risk(
    client: mlflow.MlflowClient, run_id: str, risk: RiskScores, data: PreparedData, out_dir: Path
) -> None:
    """Seed 003's risk model and scores as the run's artifacts: the forest as risk_model.npz
    (its arrays and provenance, read without pickle), every sample's score in risk_scores.h5
    (in latents.h5's order), and figures/risk_scores.png (the test split's scores by class,
    logged with the other figures)."""
    provenance = risk.provenance(run_id)
    ExportedForest.from_sklearn(risk.forest, provenance).save(out_dir / RISK_MODEL)
    write_risk_scores(
        out_dir / RISK_SCORES,
        data.sampleset.ids,
        data.split,
        risk.scores,
        risk.threshold,
        attrs={"model": RISK_MODEL, "provenance": json.dumps(provenance, sort_keys=True)},
    )
    for name in (RISK_MODEL, RISK_SCORES):
        log_run_file(client, run_id, out_dir / name)
    test = np.asarray(data.split).astype(str) == "test"
    labels = data.sampleset.labels
    fitted = "of the normal class" if risk.normal_label is not None else "(no labels)"
    share = "none" if risk.contamination is None else f"{risk.contamination:.3g}"
    plots.plot_risk_scores(
        risk.scores[test],
        out_dir / "figures" / "risk_scores.png",
        labels=None if labels is None else np.asarray(labels)[test],
        normal_label=risk.normal_label,
        threshold=risk.threshold,
        threshold_name=f"threshold (contamination {share})",
        title=f"Risk scores of the test split; forest fitted on {risk.n_fit} training samples "
        f"{fitted}",
    )
