"""Are a finished run's latents useful? Its downstream probes and figures, logged to its MLflow
run again (a training run reports them at its end; this repeats it on any stored run).

    python -m vaelab.evaluate run_id=<mlflow run id>          # or: vaelab-evaluate run_id=...
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

from vaelab.artifacts import load_checkpoint
from vaelab.config import TRUSTED_TARGETS, build, exits_with_one_message, require_complete
from vaelab.data.prepare import prepare
from vaelab.errors import DataError
from vaelab.losses import gaussian_kl_per_dim
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
        loaded = load_checkpoint(checkpoint, device, origin=f"run {cfg.run_id}")
        saved = OmegaConf.create(loaded.config)
        split = saved.split
        data = prepare(build(saved.dataset), split.val_fraction, split.test_fraction, saved.seed)
        latents = download_run_artifact(cfg.run_id, cfg.tracking.uri, "latents.h5", tmp_dir)
        with h5py.File(latents) as f:
            mu, logvar = f["mu"][:], f["logvar"][:]
            stored_split = f["split"][:].astype(str)
        if not np.array_equal(stored_split, data.split.astype(str)):
            raise DataError(
                f"run {cfg.run_id}: its data set, rebuilt from config.yaml, splits differently "
                "from its latents.h5 (the data changed since the run)"
            )
        kl_per_dim = json.loads(
            client.get_run(cfg.run_id).data.tags.get("collapse/kl_per_dim", "[]")
        )
        if not kl_per_dim:  # a run from before the tag: the KL of its stored posteriors
            posterior = torch.from_numpy(mu), torch.from_numpy(logvar)
            kl_per_dim = gaussian_kl_per_dim(*posterior).mean(dim=0).tolist()
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


@hydra.main(config_path="../conf", config_name="evaluate", execution_whitelist=TRUSTED_TARGETS)
@exits_with_one_message
def main(cfg: DictConfig) -> None:
    """`python -m vaelab.evaluate run_id=...`: one message and exit 1 on bad input."""
    evaluate_run(cfg)


if __name__ == "__main__":
    main()
