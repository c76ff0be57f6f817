"""Are the latents useful? Downstream metrics and figures of a trained run, logged to its
MLflow run: at the end of training, or later on any run with this module's command.

    python -m vaelab.downstream run_id=<mlflow run id>
"""

import json
import logging
import tempfile
import time
from pathlib import Path

import h5py
import hydra
import mlflow
import numpy as np
import torch
from hydra.utils import execution_whitelist
from mlflow.entities import Metric
from omegaconf import DictConfig, OmegaConf

from vaelab import plots
from vaelab.checkpoint import load_checkpoint
from vaelab.data.prepare import PreparedData, prepare
from vaelab.errors import DataError, VaelabError
from vaelab.evaluation import evaluate_latents
from vaelab.settings import TRUSTED_TARGETS, resolve_device

log = logging.getLogger(__name__)

N_RECONSTRUCTIONS = 4  # validation samples drawn against their reconstructions


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
    metrics = evaluate_latents(
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


def evaluate_run(cfg: DictConfig) -> dict[str, float]:
    """Rebuild a finished run's model and data from its artifacts and report on its latents."""
    # Imported here: vaelab.train imports this module for report_run.
    from vaelab.encode import download_checkpoint  # one-message errors for a bad run id
    from vaelab.train import build

    client = mlflow.MlflowClient(cfg.tracking.uri)
    device = resolve_device(cfg.device)
    with (
        tempfile.TemporaryDirectory(prefix="vaelab-evaluate-") as tmp,
        execution_whitelist(list(TRUSTED_TARGETS)),
    ):
        tmp_dir = Path(tmp)
        checkpoint = download_checkpoint(cfg.run_id, cfg.tracking.uri, tmp_dir)
        loaded = load_checkpoint(checkpoint, device)
        saved = OmegaConf.create(loaded.config)
        data = prepare(
            build(saved.dataset), saved.split.val_fraction, saved.split.test_fraction, saved.seed
        )
        latents = Path(client.download_artifacts(cfg.run_id, "latents.h5", str(tmp_dir)))
        with h5py.File(latents) as f:
            mu, logvar = f["mu"][:], f["logvar"][:]
            split = f["split"][:].astype(str)
        if not np.array_equal(split, data.split.astype(str)):
            raise DataError(
                f"run {cfg.run_id}: its data set, rebuilt from config.yaml, splits differently "
                "from its latents.h5 (the data changed since the run)"
            )
        kl_per_dim = json.loads(
            client.get_run(cfg.run_id).data.tags.get("collapse/kl_per_dim", "[]")
        )
        if not kl_per_dim:
            kl_per_dim = (0.5 * (mu**2 + np.exp(logvar) - 1 - logvar)).mean(axis=0)
        return report_run(
            client,
            cfg.run_id,
            loaded.model,
            data,
            mu,
            np.asarray(kl_per_dim),
            tmp_dir,
            device,
            int(saved.seed),
            cfg.normal_label,
        )


@hydra.main(
    config_path="../conf", config_name="evaluate", execution_whitelist=list(TRUSTED_TARGETS)
)
def main(cfg: DictConfig) -> None:
    """`python -m vaelab.downstream run_id=...`: one message and exit 1 on bad input."""
    try:
        evaluate_run(cfg)
    except VaelabError as err:
        log.error("%s", err)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
