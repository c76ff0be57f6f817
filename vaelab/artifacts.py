"""The files a run leaves behind: checkpoints, latents and per-branch reconstructions.

Checkpoints are self-describing (nanoGPT habit): state dicts, epoch, normaliser and the resolved
config, so a model is rebuilt through `build(config.model)`, never by name. Everything stored is
a tensor or a plain Python value, so `torch.load(weights_only=True)` reads it: loading a
checkpoint never runs pickled code. Every file is written atomically (a partial file, then a
rename), so a crash mid-write never leaves a torn one.
"""

import logging
import os
import pickle
import shutil
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import mlflow
import numpy as np
import torch
from omegaconf import OmegaConf

from vaelab.config import build
from vaelab.data.prepare import Normaliser, PreparedData
from vaelab.errors import DataError, DivergenceError

log = logging.getLogger(__name__)

BEST_CHECKPOINT = "model.pt"  # the epoch with the best validation loss at the final weights
LAST_CHECKPOINT = "last.pt"  # the last epoch whose loss was finite


class Checkpoints:
    """The checkpoints of one run: last.pt after every epoch, model.pt at the best one.

    What stays the same over the run (normaliser, config, input shape, channel names) is given
    once; each save adds the model, the optimiser, the epoch and the validation loss at the
    run's final loss weights (what makes epochs comparable, see vaelab.loop.Validation).
    """

    def __init__(self, directory: Path, data: PreparedData, config: dict[str, Any]) -> None:
        self.directory = directory
        samples = data.sampleset
        self._fixed = {
            "normaliser": data.normaliser.state_dict(),
            "config": config,
            "input_shape": list(samples.sample_shape),
            # None when the data set only numbered its channels: nothing to compare later.
            "channel_names": list(samples.channel_names) if samples.channel_names_given else None,
        }

    @property
    def best(self) -> Path:
        """Path of the best epoch's checkpoint."""
        return self.directory / BEST_CHECKPOINT

    def save(
        self,
        model: torch.nn.Module,
        loss_fn: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        epoch: int,
        loss_final_weights: float,
        is_best: bool,
    ) -> None:
        """Write last.pt, and model.pt too when this epoch is the best so far (a copy of the
        same bytes: the state is serialised once)."""
        state = {
            "model": model.state_dict(),
            "loss": loss_fn.state_dict(),  # the decoder's σ (learned or fixed)
            "optimizer": optimizer.state_dict(),
            "epoch": int(epoch),
            "loss_final_weights": float(loss_final_weights),
            **self._fixed,
        }
        last = self.directory / LAST_CHECKPOINT
        _save_atomically(state, last)
        if is_best:
            # A hard link, not a copy: last.pt is replaced (a new file) at the next save, so
            # model.pt keeps this epoch's bytes, and takes no space while the two are equal.
            partial = self.best.with_suffix(".tmp")
            partial.unlink(missing_ok=True)
            try:
                os.link(last, partial)
            except OSError:  # a filesystem without hard links
                shutil.copyfile(last, partial)
            partial.replace(self.best)

    @contextmanager
    def kept_on_divergence(self) -> Iterator[None]:
        """If the loss diverges inside, log the checkpoints written so far to the active MLflow
        run (which then ends FAILED) and add to the error where the last good one is."""
        try:
            yield
        except DivergenceError as err:
            if self.directory.is_dir():
                mlflow.log_artifacts(str(self.directory), artifact_path="checkpoints")
            raise DivergenceError(
                f"{err}; the last good checkpoint is in {self.directory / LAST_CHECKPOINT}"
            ) from None


def log_artifact_once(path: Path, artifact_path: str | None = None) -> None:
    """Log a file, or a folder's files, to the active MLflow run, keeping the bytes on disk once.

    MLflow copies what it logs. Where the run's artifacts live in a local folder (the default
    store, under paths.output_root/mlartifacts), the run folder's copy is then replaced by a
    hard link to the stored file: both paths read the same bytes, which take their space once
    (a 4-trial quick sweep wrote 121 MB, half of it twice). Writers here replace files
    (write, then rename) and never change one in place, so the link never changes a logged
    artifact. A remote store (a tracking server) keeps its own copy; the run folder keeps
    this one, as the worker's cache.
    """
    if path.is_dir():
        mlflow.log_artifacts(str(path), artifact_path)
        files = {file: file.relative_to(path) for file in path.rglob("*") if file.is_file()}
    else:
        mlflow.log_artifact(str(path), artifact_path)
        files = {path: Path(path.name)}
    stored_root = local_artifact_dir(mlflow.get_artifact_uri(artifact_path))
    if stored_root is None:
        return
    for file, relative in files.items():
        stored = stored_root / relative
        try:
            if stored.stat().st_ino != file.stat().st_ino:
                link = file.with_name(f".{file.name}.link")
                link.unlink(missing_ok=True)
                os.link(stored, link)
                link.replace(file)
        except OSError as err:  # another filesystem, or no hard links: two copies it is
            log.debug("%s stays a copy of %s: %s", file, stored, err)


def local_artifact_dir(uri: str) -> Path | None:
    """The folder behind a file: artifact URI (or a plain path); None for a remote store."""
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme == "file":
        return Path(urllib.parse.unquote(parsed.path))
    return Path(uri) if not parsed.scheme else None


def _save_atomically(state: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".tmp")
    torch.save(state, partial)
    partial.replace(path)


@dataclass
class LoadedModel:
    """A model rebuilt from a checkpoint, in eval mode, with what it was trained with."""

    model: torch.nn.Module
    normaliser: Normaliser
    config: dict[str, Any]
    epoch: int
    input_shape: tuple[int, ...]
    channel_names: tuple[str, ...] | None = None


def load_checkpoint(
    path: Path, device: torch.device | str = "cpu", origin: str | None = None
) -> LoadedModel:
    """Rebuild the model of a checkpoint through its saved config (weights_only=True).

    A file that is not a vaelab checkpoint (pickled code, which weights_only refuses; a torn or
    foreign file) stops with one DataError naming it, or `origin` ("run <id>") when the file is
    a download; the traceback stays in the DEBUG log. A saved model config that no longer
    builds is a ConfigError, from `build`.
    """
    try:
        state = torch.load(path, map_location=device, weights_only=True)
        input_shape = tuple(state["input_shape"])
        model = build(OmegaConf.create(state["config"]["model"]), input_shape=input_shape)
        model.load_state_dict(state["model"])
    except (
        pickle.UnpicklingError,
        RuntimeError,
        EOFError,
        KeyError,
        TypeError,
        OSError,
    ) as err:
        log.debug("load_checkpoint failed", exc_info=True)
        raise DataError(
            f"{origin or path}: cannot load {path} as a vaelab checkpoint: "
            f"{type(err).__name__}: {err}"
        ) from err
    model.to(device).eval()
    return LoadedModel(
        model=model,
        normaliser=Normaliser.from_state_dict(state["normaliser"]),
        config=state["config"],
        epoch=state["epoch"],
        input_shape=input_shape,
        channel_names=tuple(state["channel_names"]) if state.get("channel_names") else None,
    )


@torch.no_grad()
def encode_all(
    model: torch.nn.Module, values: torch.Tensor, batch_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and log-variance of every sample, in eval mode, on the CPU."""
    model.eval()
    mus, logvars = [], []
    for start in range(0, len(values), batch_size):
        mu, logvar = model.encode(values[start : start + batch_size].to(device))
        mus.append(mu.cpu())
        logvars.append(logvar.cpu())
    return torch.cat(mus), torch.cat(logvars)


def _strings(values: Any) -> np.ndarray:
    return np.asarray([str(s) for s in values], dtype=object)


def write_latents(
    path: Path,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    ids: np.ndarray,
    split: np.ndarray | None = None,
    attrs: dict[str, str] | None = None,
) -> None:
    """latents.h5: `mu`, `logvar` and `ids` of every sample, `split` when the samples have one
    (a training run's; new samples encoded later have none), and `attrs` saying where they
    came from."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".tmp")
    text = h5py.string_dtype()
    with h5py.File(partial, "w") as f:
        f.create_dataset("mu", data=mu.numpy())
        f.create_dataset("logvar", data=logvar.numpy())
        f.create_dataset("ids", data=_strings(ids), dtype=text)
        if split is not None:
            f.create_dataset("split", data=_strings(split), dtype=text)
        f.attrs.update(attrs or {})
    os.replace(partial, path)


@torch.no_grad()
def write_branch_components(
    path: Path, model: torch.nn.Module, data: PreparedData, device: torch.device, n_samples: int = 8
) -> None:
    """multiscale_components.h5 (seed 000): per-branch reconstructions of a few validation
    samples, in normalised units, beside the input, mask and merged reconstruction."""
    model.eval()
    index = data.indices("val")[:n_samples]
    x = data.values[index].to(device)
    out = model(x)
    with h5py.File(path, "w") as f:
        f.create_dataset(
            "ids", data=_strings(data.sampleset.ids[index.numpy()]), dtype=h5py.string_dtype()
        )
        f.create_dataset("input", data=x.cpu().numpy())
        f.create_dataset("mask", data=data.masks[index].numpy())
        f.create_dataset("recon", data=out.recon.cpu().numpy())
        for name, branch in out.branches.items():
            f.create_dataset(f"branch_{name}", data=branch.cpu().numpy())
        f.attrs["channel_names"] = [str(c) for c in data.sampleset.channel_names]
