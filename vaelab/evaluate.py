"""Are a finished run's latents useful? Its downstream probes and figures, logged to its MLflow
run after the run's end: a sweep's trials leave them out (evaluation.in_sweep=deferred) and
get them here, and any stored run can have them again.

    python -m vaelab.evaluate run_id=<mlflow run id>          # or: vaelab-evaluate run_id=...

`evaluate_trial(run_dir, mlflow_run_id)` does the same for a finished trial from its run folder
(checkpoints/model.pt, latents.h5), with nothing to download: what a sweep calls at its end
for its best feasible trial.
"""

import json
import logging
import tempfile
from pathlib import Path

import h5py
import hydra
import mlflow
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from vaelab.artifacts import BEST_CHECKPOINT, LoadedModel, load_checkpoint
from vaelab.config import TRUSTED_TARGETS, build, exits_with_one_message, require_complete
from vaelab.data.prepare import prepare
from vaelab.errors import ConfigError, DataError
from vaelab.losses import gaussian_kl_per_dim
from vaelab.probes import CLASS_SHARE, contamination_setting
from vaelab.report import report_run
from vaelab.runtime import resolve_device
from vaelab.tracking import download_checkpoint, download_run_artifact

log = logging.getLogger(__name__)


def evaluate_run(cfg: DictConfig) -> dict[str, float]:
    """Rebuild a finished run's model and data from its artifacts and report on its latents."""
    require_complete(cfg)
    client = mlflow.MlflowClient(cfg.tracking.uri)
    device = resolve_device(cfg.device)
    with tempfile.TemporaryDirectory(prefix="vaelab-evaluate-") as tmp:
        tmp_dir = Path(tmp)
        checkpoint = download_checkpoint(cfg.run_id, cfg.tracking.uri, tmp_dir)
        origin = f"run {cfg.run_id}"
        loaded = load_checkpoint(checkpoint, device, origin=origin)
        latents = download_run_artifact(cfg.run_id, cfg.tracking.uri, "latents.h5", tmp_dir)
        return report_stored(
            client,
            cfg.run_id,
            loaded,
            latents,
            tmp_dir,
            device,
            cfg.normal_label,
            contamination_setting(cfg.contamination),
            origin,
        )


def evaluate_trial(run_dir: str | Path, mlflow_run_id: str | None = None) -> dict[str, float]:
    """The downstream report of a finished run, read from its run folder, logged to its MLflow
    run (eval/* metrics, figures/*.png, the tag eval/status=done); returns the eval metrics.

    For a sweep's trial whose evaluation was deferred. The folder holds what every trial keeps
    (checkpoints/model.pt, latents.h5); the figures are written into it, as a run that
    evaluates itself writes them. The run's config (in its checkpoint) names the MLflow store,
    the data and the anomaly detector's normal class. Without `mlflow_run_id`, the run is the
    one whose `run_dir` tag names this folder. The model runs on the CPU: it only draws a few
    reconstructions, and the sweep process that calls this holds no GPU of its own.
    """
    run_dir = Path(run_dir)
    checkpoint, latents = run_dir / "checkpoints" / BEST_CHECKPOINT, run_dir / "latents.h5"
    for path in (checkpoint, latents):
        if not path.is_file():
            raise DataError(
                f"{run_dir}: no {path.relative_to(run_dir)}, which a finished run keeps"
            )
    device = torch.device("cpu")
    loaded = load_checkpoint(checkpoint, device)
    if not loaded.config["evaluation"]["downstream"]:
        log.info("%s: evaluation.downstream=false, so no downstream report", run_dir)
        return {}
    tracking_uri = loaded.config["tracking"]["uri"]
    client = mlflow.MlflowClient(tracking_uri)
    run_id = mlflow_run_id or run_of_folder(client, run_dir, tracking_uri)
    evaluation = loaded.config["evaluation"]  # the anomaly detector as the run itself would
    # fit it; class_share (the default) for a run saved before evaluation.contamination
    contamination = contamination_setting(evaluation.get("contamination", CLASS_SHARE))
    return report_stored(
        client,
        run_id,
        loaded,
        latents,
        run_dir,
        device,
        evaluation["normal_label"],
        contamination,
        str(run_dir),
    )


def run_of_folder(client: mlflow.MlflowClient, run_dir: Path, tracking_uri: str) -> str:
    """The MLflow run whose `run_dir` tag (set by vaelab.train) names this folder."""
    names = {str(run_dir), str(run_dir.resolve())}
    experiments = [e.experiment_id for e in client.search_experiments()]
    for name in names:
        runs = client.search_runs(experiments, filter_string=f"tags.run_dir = '{name}'")
        if runs:
            return runs[0].info.run_id
    raise ConfigError(f"{run_dir}: no MLflow run in {tracking_uri} is tagged with this run_dir")


def report_stored(
    client: mlflow.MlflowClient,
    run_id: str,
    loaded: LoadedModel,
    latents: Path,
    out_dir: Path,
    device: torch.device,
    normal_label: object,
    contamination: float | str,
    origin: str,
) -> dict[str, float]:
    """report_run on a stored run: its data rebuilt from the saved config, its latents.h5, and
    the per-dimension KL it logged. `origin` names the run in an error."""
    saved = OmegaConf.create(loaded.config)
    split = saved.split
    data = prepare(build(saved.dataset), split.val_fraction, split.test_fraction, saved.seed)
    with h5py.File(latents) as f:
        mu, logvar = f["mu"][:], f["logvar"][:]
        stored_split = f["split"][:].astype(str)
    if not np.array_equal(stored_split, data.split.astype(str)):
        raise DataError(
            f"{origin}: its data set, rebuilt from config.yaml, splits differently from its "
            "latents.h5 (the data changed since the run)"
        )
    kl_per_dim = json.loads(client.get_run(run_id).data.tags.get("collapse/kl_per_dim", "[]"))
    if not kl_per_dim:  # a run from before the tag: the KL of its stored posteriors
        posterior = torch.from_numpy(mu), torch.from_numpy(logvar)
        kl_per_dim = gaussian_kl_per_dim(*posterior).mean(dim=0).tolist()
    return report_run(
        client,
        run_id,
        loaded.model,
        data,
        mu,
        np.asarray(kl_per_dim),
        out_dir,
        device,
        int(saved.seed),
        normal_label,
        contamination,
    )


@hydra.main(config_path="../conf", config_name="evaluate", execution_whitelist=TRUSTED_TARGETS)
@exits_with_one_message
def main(cfg: DictConfig) -> None:
    """`python -m vaelab.evaluate run_id=...`: one message and exit 1 on bad input."""
    evaluate_run(cfg)


if __name__ == "__main__":
    main()
