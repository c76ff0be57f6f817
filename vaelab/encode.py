"""Encode new samples with a trained model into latents.h5 (mu, logvar, ids).

    python -m vaelab.encode run_id=<mlflow run id> dataset=h5 dataset.path=new.h5
    python -m vaelab.encode checkpoint=path/to/model.pt dataset=h5 dataset.path=new.h5 out=z.h5

latents.h5 is vaelab's own format (vaelab.artifacts.write_latents), not seed 000's
vae_latents.h5 (mu, logvar, patient_ids): `python -m vaelab.export RUN_DIR OUT_DIR` writes that.

The model is rebuilt through the config saved in its checkpoint, and the new samples go
through the normaliser fitted on that run's training split (never refitted), so their latents
sit in the same space as the run's own latents.h5. A file larger than dataset.memory_budget_mb
is streamed (vaelab.data.streaming): read, checked and normalised a chunk at a time, ahead of
the model by dataset.num_workers DataLoader workers, into pinned memory on CUDA.
"""

import logging
import tempfile
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from vaelab.artifacts import LoadedModel, encode_all, load_checkpoint, write_latents
from vaelab.config import TRUSTED_TARGETS, build, exits_with_one_message, require_complete
from vaelab.data.prepare import normalised
from vaelab.data.streaming import StreamedSamples
from vaelab.errors import ConfigError, DataError
from vaelab.runtime import resolve_device
from vaelab.tracking import download_checkpoint

log = logging.getLogger(__name__)


def encode(cfg: DictConfig) -> Path:
    """Load the model of cfg.run_id or cfg.checkpoint, encode cfg.dataset, write cfg.out."""
    if (cfg.run_id is None) == (cfg.checkpoint is None):
        found = "neither"
        if cfg.run_id is not None:
            found = f"both (run_id={cfg.run_id}, checkpoint={cfg.checkpoint})"
        raise ConfigError(
            "give exactly one of run_id=<MLflow run id> or checkpoint=<path to model.pt>, "
            f"found {found}"
        )
    require_complete(cfg)  # before any download: dataset=h5 without dataset.path, say
    if cfg.batch_size < 1:
        raise ConfigError(f"batch_size must be ≥ 1, got {cfg.batch_size}")
    out = Path(cfg.out)
    data_path = cfg.dataset.get("path")  # None when the option has no path
    if data_path is not None and out.resolve() == Path(str(data_path)).resolve():
        raise ConfigError(f"out={cfg.out} would overwrite the data being encoded")
    device = resolve_device(cfg.device)

    # --- the model, its training config and its normaliser --------------------------------
    loaded, origin = load_model(cfg, device)
    log.info(
        "Loaded the model of %s (epoch %d, input %s, latent dim %d)",
        origin,
        loaded.epoch,
        loaded.input_shape,
        loaded.model.latent_dim,
    )

    # --- the new samples, checked against the model, through the saved normaliser ---------
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
    values, batch_size = normalised(samples, loaded.normaliser), cfg.batch_size
    if isinstance(samples.values, StreamedSamples):
        # Read onto the device (pinned on CUDA), in batches the memory budget holds.
        values = values.to(device)
        batch_size = min(batch_size, samples.values.chunk_rows())
        log.info("Streaming %s in batches of %d", samples.source, batch_size)

    mu, logvar = encode_all(loaded.model, values, batch_size, device)
    # New samples belong to no split of the run: latents.h5 without `split`.
    write_latents(out, mu, logvar, samples.ids, attrs={"model": origin, "data": samples.source})
    log.info(
        "Wrote %d samples x latent dim %d (mu, logvar, ids) of %s to %s",
        mu.shape[0],
        mu.shape[1],
        samples.source,
        out,
    )
    return out


def load_model(cfg: DictConfig, device: torch.device) -> tuple[LoadedModel, str]:
    """The model of cfg.run_id (downloaded from MLflow) or cfg.checkpoint, and where it came
    from ("run <id>" or "checkpoint <path>")."""
    if cfg.run_id is not None:
        with tempfile.TemporaryDirectory(prefix="vaelab-encode-") as tmp:
            path = download_checkpoint(str(cfg.run_id), cfg.tracking.uri, Path(tmp))
            origin = f"run {cfg.run_id}"
            return load_checkpoint(path, device, origin), origin
    path = Path(str(cfg.checkpoint))
    if not path.is_file():
        raise ConfigError(f"checkpoint={cfg.checkpoint}: file not found")
    origin = f"checkpoint {cfg.checkpoint}"
    return load_checkpoint(path, device, origin), origin


@hydra.main(config_path="../conf", config_name="encode", execution_whitelist=TRUSTED_TARGETS)
@exits_with_one_message
def main(cfg: DictConfig) -> None:
    """Hydra entry point: encode one data set (or one job of a --multirun)."""
    encode(cfg)


if __name__ == "__main__":
    main()
