"""Encode new samples with a trained model into latents.h5 (mu, logvar, ids).

    python -m vaelab.encode run_id=<mlflow run id> dataset=h5 dataset.path=new.h5
    python -m vaelab.encode checkpoint=path/to/model.pt dataset=h5 dataset.path=new.h5 out=z.h5

The model is rebuilt through the config saved in its checkpoint, and the new samples go
through the normaliser fitted on that run's training split (never refitted), so their latents
sit in the same space as the run's own latents.h5.
"""

import logging
import os
import pickle
import tempfile
from pathlib import Path

import h5py
import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import execution_whitelist
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig, OmegaConf

from vaelab.checkpoint import LoadedModel, load_checkpoint
from vaelab.errors import ConfigError, DataError, VaelabError
from vaelab.outputs import encode_all
from vaelab.settings import TRUSTED_TARGETS, resolve_device
from vaelab.train import build

log = logging.getLogger(__name__)

CHECKPOINT_ARTIFACT = "checkpoints/model.pt"  # the best epoch, as train.py logs it


def encode(cfg: DictConfig) -> Path:
    """Load the model of cfg.run_id or cfg.checkpoint, encode cfg.dataset, write cfg.out."""
    with execution_whitelist(list(TRUSTED_TARGETS)):
        if (cfg.run_id is None) == (cfg.checkpoint is None):
            found = "neither"
            if cfg.run_id is not None:
                found = f"both (run_id={cfg.run_id}, checkpoint={cfg.checkpoint})"
            raise ConfigError(
                "give exactly one of run_id=<MLflow run id> or checkpoint=<path to model.pt>, "
                f"found {found}"
            )
        missing = sorted(OmegaConf.missing_keys(cfg))
        if missing:  # before any download: dataset=h5 without dataset.path, say
            raise ConfigError(f"{', '.join(missing)} required: give {missing[0]}=...")
        if cfg.batch_size < 1:
            raise ConfigError(f"batch_size must be ≥ 1, got {cfg.batch_size}")
        out = Path(cfg.out)
        data_path = cfg.dataset.get("path")  # None when the option has no path or it is ???
        if data_path is not None and out.resolve() == Path(str(data_path)).resolve():
            raise ConfigError(f"out={cfg.out} would overwrite the data being encoded")
        try:
            device = resolve_device(cfg.device)
        except (ConfigError, RuntimeError):
            raise ConfigError(
                f"device={cfg.device}: expected auto, cpu or a CUDA device this machine has"
            ) from None

        # --- the model, its training config and its normaliser ----------------------------
        if cfg.run_id is not None:
            origin = f"run {cfg.run_id}"
            with tempfile.TemporaryDirectory(prefix="vaelab-encode-") as tmp:
                path = download_checkpoint(str(cfg.run_id), cfg.tracking.uri, Path(tmp))
                loaded = _load(path, origin, device)
        else:
            origin = f"checkpoint {cfg.checkpoint}"
            path = Path(str(cfg.checkpoint))
            if not path.is_file():
                raise ConfigError(f"checkpoint={cfg.checkpoint}: file not found")
            loaded = _load(path, origin, device)
        log.info(
            "Loaded the model of %s (epoch %d, input %s, latent dim %d)",
            origin,
            loaded.epoch,
            loaded.input_shape,
            loaded.model.latent_dim,
        )

        # --- the new samples, checked against the model, through the saved normaliser -----
        log.info("Instantiating dataset <%s>", cfg.dataset._target_)
        samples = build(cfg.dataset)
        if samples.sample_shape != loaded.input_shape:
            raise DataError(
                f"{samples.source}: values have samples of shape {samples.sample_shape}, "
                f"the model of {origin} was trained on {loaded.input_shape}"
            )
        names = tuple(samples.channel_names)
        if samples.channel_names_given and loaded.channel_names and names != loaded.channel_names:
            raise DataError(
                f"{samples.source}: vital_index lists {list(names)}, the model of {origin} was "
                f"trained on {list(loaded.channel_names)} (same channels, same order)"
            )
        # Unobserved entries become 0 after normalising, the channel mean, as in training.
        values = torch.from_numpy(loaded.normaliser.transform(samples.values, samples.masks))

        mu, logvar = encode_all(loaded.model, values, cfg.batch_size, device)
        write_encoded(out, mu, logvar, samples.ids, source=samples.source, origin=origin)
        log.info(
            "Wrote %d samples x latent dim %d (mu, logvar, ids) of %s to %s",
            mu.shape[0],
            mu.shape[1],
            samples.source,
            out,
        )
        return out


def download_checkpoint(run_id: str, tracking_uri: str, into: Path) -> Path:
    """checkpoints/model.pt of an MLflow run, downloaded into a directory."""
    if tracking_uri.startswith("sqlite:///"):
        # MlflowClient would create an empty store here rather than say it is not there.
        database = Path(tracking_uri.removeprefix("sqlite:///"))
        if not database.is_file():
            raise ConfigError(
                f"run_id={run_id}: no MLflow store at {tracking_uri} (set paths.output_root "
                "or tracking.uri to where the run was recorded)"
            )
    client = MlflowClient(tracking_uri)
    try:
        run = client.get_run(run_id)
    except MlflowException as err:
        log.debug("get_run failed", exc_info=True)
        message = f"run_id={run_id}: no such run in the MLflow store {tracking_uri}"
        raise ConfigError(message) from err
    try:
        return Path(client.download_artifacts(run_id, CHECKPOINT_ARTIFACT, str(into)))
    except (MlflowException, OSError) as err:
        log.debug("download_artifacts failed", exc_info=True)
        raise ConfigError(
            f"run_id={run_id}: the run ({run.info.status}) in the MLflow store {tracking_uri} "
            f"has no artifact {CHECKPOINT_ARTIFACT}"
        ) from err


def _load(path: Path, origin: str, device: torch.device) -> LoadedModel:
    """load_checkpoint, turning a file that is not a vaelab checkpoint into one message."""
    try:
        return load_checkpoint(path, device)
    except (
        pickle.UnpicklingError,
        RuntimeError,
        EOFError,
        KeyError,
        InstantiationException,
        OSError,
    ) as err:
        # torch.load(weights_only=True) refuses pickled code with UnpicklingError; a torn or
        # foreign file gives one of the others. The traceback stays in the log at DEBUG.
        log.debug("load_checkpoint failed", exc_info=True)
        raise DataError(
            f"{origin}: cannot load {path} as a vaelab checkpoint: {type(err).__name__}: {err}"
        ) from err


def write_encoded(
    path: Path, mu: torch.Tensor, logvar: torch.Tensor, ids: np.ndarray, source: str, origin: str
) -> None:
    """latents.h5 as vaelab.outputs.write_latents writes it, without `split` (new samples are
    in no split); written atomically, so a crash never leaves a torn file at `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".tmp")
    with h5py.File(partial, "w") as f:
        f.create_dataset("mu", data=mu.numpy())
        f.create_dataset("logvar", data=logvar.numpy())
        f.create_dataset(
            "ids", data=np.asarray([str(s) for s in ids], dtype=object), dtype=h5py.string_dtype()
        )
        f.attrs["model"] = origin  # "run <id>" or "checkpoint <path>"
        f.attrs["data"] = source
    os.replace(partial, path)


@hydra.main(config_path="../conf", config_name="encode", execution_whitelist=list(TRUSTED_TARGETS))
def main(cfg: DictConfig) -> None:
    """Hydra entry point: encode one data set (or one job of a --multirun)."""
    try:
        encode(cfg)
    except VaelabError as err:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise
        log.error("%s", err)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
