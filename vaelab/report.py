"""What a trained run leaves for people to read: its final diagnostics, verdict and artifacts
(`record_final`, at the end of training), and the downstream report of its latents
(`report_run`: probe metrics and figures, at the end of training or later through
`python -m vaelab.evaluate run_id=...`).
"""

import logging
import time
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.entities import Metric

from vaelab import plots
from vaelab.artifacts import Checkpoints, encode_all, write_branch_components, write_latents
from vaelab.data.prepare import PreparedData
from vaelab.diagnostics import CollapseCriteria, importance_weighted_log_px
from vaelab.loop import Validation
from vaelab.models.base import GaussianVAE
from vaelab.probes import probe_latents
from vaelab.tracking import log_verdict

log = logging.getLogger(__name__)

N_RECONSTRUCTIONS = 4  # validation samples drawn against their reconstructions


def record_final(
    model: torch.nn.Module,
    checkpoints: Checkpoints,
    best_epoch: int,
    validate: Validation,
    data: PreparedData,
    run_dir: Path,
    criteria: CollapseCriteria,
    iwae_samples: int,
    downstream: bool,
    normal_label: object,
    seed: int,
) -> tuple[dict[str, float], dict[str, object]]:
    """Reload the best epoch; log its final/* metrics, the held-out log p(x), the verdict and
    the run's artifacts. Returns the final metrics and the verdict."""
    device = validate.values.device
    best = torch.load(checkpoints.best, map_location=device, weights_only=True)
    model.load_state_dict(best["model"])
    validate.loss_fn.load_state_dict(best["loss"])
    val = validate(best_epoch + 1)
    final_metrics = {k.replace("val/", "final/", 1): v for k, v in val.metrics("val").items()}
    final_metrics["final/best_epoch"] = best_epoch
    final_metrics |= held_out_log_px(model, validate, data, iwae_samples, seed)
    mlflow.log_metrics(final_metrics)
    verdict = val.verdict(criteria)
    log_verdict(verdict, val.kl_per_dim.tolist())
    log.info(
        "Best epoch %d: AU %d of %d, KL %.3f nats (MI %.3f + marginal %.3f), recon %.4g "
        "(z = 0: %.4g), verdict %s (failed: %s)",
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

    mu, logvar = encode_all(model, validate.values, validate.batch_size, device)
    write_latents(run_dir / "latents.h5", mu, logvar, data.sampleset.ids, split=data.split)
    mlflow.log_artifact(str(run_dir / "latents.h5"))
    if downstream:  # are the latents useful? (seed 000 step 3, seed 003)
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
        )
    if val.branch_recon:
        write_branch_components(run_dir / "multiscale_components.h5", model, data, device)
        mlflow.log_artifact(str(run_dir / "multiscale_components.h5"))
    mlflow.log_artifacts(str(checkpoints.directory), artifact_path="checkpoints")
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
) -> dict[str, float]:
    """Log `eval/*` metrics and `figures/*.png` of a trained model to its run; return them."""
    samples = data.sampleset
    metrics = probe_latents(
        mu,
        data.split,
        data.values.numpy(),
        samples.labels,
        samples.factors,
        seed=seed,
        normal_label=normal_label,
    )
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])

    figures = out_dir / "figures"
    plots.plot_kl_per_dim(kl_per_dim, figures / "kl_per_dim.png", sort=True)
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
        )
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
    client.log_artifacts(run_id, str(figures), artifact_path="figures")
    log.info(
        "Downstream evaluation of run %s: %s",
        run_id,
        ", ".join(f"{k}={v:.3g}" for k, v in metrics.items()),
    )
    return metrics
