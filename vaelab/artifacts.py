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
import tempfile
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
from vaelab.errors import ConfigError, DataError, DivergenceError
from vaelab.tracking import CHECKPOINT_ARTIFACT, download_checkpoint

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
            # No active run on a torchrun rank other than 0: only rank 0 records the run.
            if self.directory.is_dir() and mlflow.active_run() is not None:
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


# trainer.init_from=run_name:<name>: the newest FINISHED run of that name in the tracking store.
RUN_NAME_PREFIX = "run_name:"


@dataclass
class InitialWeights:
    """Where a run's starting weights came from (trainer.init_from), as logged on the run."""

    source: str  # the checkpoint file, or runs:/<run id>/checkpoints/model.pt
    epoch: int  # the epoch the checkpoint holds (a run's best)
    run_id: str | None = None  # the MLflow run it came from, when a run was named
    run_name: str | None = None


def load_initial_weights(
    model: torch.nn.Module,
    init_from: str | None,
    tracking_uri: str,
    made_by: str | None = None,
) -> InitialWeights | None:
    """Load trainer.init_from's model weights into `model` before it trains; None when unset.

    init_from is a checkpoint file (a .pt of `Checkpoints`), an MLflow run id (that run's best
    checkpoint), or "run_name:<name>": the newest FINISHED run of that name in any experiment
    of the store at tracking_uri (a fine-tuning run records in an experiment of its own, its
    pre-training run in another). A run or file that is not there is one ConfigError, saying
    for a run name how to record it (`made_by`, the command, when given); so is a checkpoint
    whose state-dict keys or shapes differ from the model's, naming them. The file is read
    with weights_only=True. Only the model's weights are taken: the optimiser, the loss's σ and
    the normaliser start afresh, the normaliser fitted on this run's own training split. The
    provenance goes on the active MLflow run, as params and tags init.*.
    """
    if init_from is None:
        return None
    init_from = str(init_from).strip()
    origin = f"trainer.init_from={init_from}"
    with tempfile.TemporaryDirectory(prefix="vaelab-init-") as download:
        path, run_id, run_name = _initial_checkpoint(
            init_from, tracking_uri, Path(download), made_by
        )
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            saved, epoch = state["model"], int(state["epoch"])
        except (pickle.UnpicklingError, RuntimeError, EOFError, KeyError, TypeError) as err:
            log.debug("load_initial_weights failed", exc_info=True)
            raise DataError(
                f"{origin}: cannot read {path} as a vaelab checkpoint: {type(err).__name__}: {err}"
            ) from err
    saved_target = state.get("config", {}).get("model", {}).get("_target_")
    _check_same_weights(model, saved, origin, saved_target)
    model.load_state_dict(saved)
    source = f"runs:/{run_id}/{CHECKPOINT_ARTIFACT}" if run_id else str(path.resolve())
    weights = InitialWeights(source=source, epoch=epoch, run_id=run_id, run_name=run_name)
    log.info("Initial weights from %s (epoch %d)", source, epoch)
    if mlflow.active_run() is not None:
        provenance = {"init.source": source, "init.epoch": str(epoch)}
        provenance |= {"init.run_id": run_id or "", "init.run_name": run_name or ""}
        mlflow.log_params(provenance)
        mlflow.set_tags(provenance)
    return weights


def _initial_checkpoint(
    init_from: str, tracking_uri: str, download: Path, made_by: str | None
) -> tuple[Path, str | None, str | None]:
    """The checkpoint file init_from names, and the id and name of the run it came from."""
    origin = f"trainer.init_from={init_from}"
    if init_from.startswith(RUN_NAME_PREFIX):
        name = init_from.removeprefix(RUN_NAME_PREFIX).strip()
        run_id = _newest_finished_run(name, tracking_uri, made_by, origin)
        return _run_checkpoint(run_id, tracking_uri, download, origin), run_id, name
    path = Path(init_from).expanduser()
    if path.is_file():
        return path, None, None
    if path.suffix == ".pt" or "/" in init_from:
        raise ConfigError(f"{origin}: no checkpoint file at {path.resolve()}")
    origin += " (neither a checkpoint file nor run_name:<name>, so an MLflow run id)"
    checkpoint = _run_checkpoint(init_from, tracking_uri, download, origin)
    return checkpoint, init_from, mlflow.MlflowClient(tracking_uri).get_run(init_from).info.run_name


def _run_checkpoint(run_id: str, tracking_uri: str, download: Path, origin: str) -> Path:
    """The best checkpoint of an MLflow run, downloaded; ConfigError when it is not there."""
    try:
        return download_checkpoint(run_id, tracking_uri, download)
    except ConfigError as err:
        raise ConfigError(f"{origin}: {err}") from None


def _newest_finished_run(name: str, tracking_uri: str, made_by: str | None, origin: str) -> str:
    """The id of the newest FINISHED run named `name` in any experiment of the store."""
    if not name or "'" in name:
        raise ConfigError(f"{origin}: expected a run name (without quotes) after {RUN_NAME_PREFIX}")
    how = made_by or (
        f"python -m vaelab.train experiment=<the pre-training experiment> run_name={name}"
    )
    where = f"the MLflow store {tracking_uri} (paths.output_root, tracking.uri)"
    found: list = []
    unfinished = 0
    database = tracking_uri.removeprefix("sqlite:///")
    if not tracking_uri.startswith("sqlite:///") or Path(database).is_file():
        # MlflowClient would create an empty SQLite store rather than say it is not there.
        client = mlflow.MlflowClient(tracking_uri)
        experiments = [e.experiment_id for e in client.search_experiments()]
        named = f"attributes.run_name = '{name}'"
        newest_first = ["attributes.start_time DESC"]
        if experiments:
            found = client.search_runs(
                experiments,
                f"{named} and attributes.status = 'FINISHED'",
                order_by=newest_first,
                max_results=1,
            )
            if not found:
                unfinished = len(client.search_runs(experiments, named, max_results=100))
    if not found:
        others = f" ({unfinished} run(s) of that name did not finish)" if unfinished else ""
        raise ConfigError(
            f"{origin}: no FINISHED run named {name!r} in {where}{others}. Record it first: {how}"
        )
    run = found[0]
    log.info(
        "trainer.init_from: run %s in experiment %r, the newest FINISHED run named %r",
        run.info.run_id,
        client.get_experiment(run.info.experiment_id).name,
        name,
    )
    return run.info.run_id


def _check_same_weights(
    model: torch.nn.Module, saved: dict[str, torch.Tensor], origin: str, saved_target: str | None
) -> None:
    """ConfigError naming every state-dict key the checkpoint lacks, adds or shapes otherwise."""
    own = model.state_dict()
    reshaped = [
        f"{key} {tuple(saved[key].shape)} -> {tuple(value.shape)}"
        for key, value in own.items()
        if key in saved and tuple(saved[key].shape) != tuple(value.shape)
    ]
    missing = [key for key in own if key not in saved]
    extra = [key for key in saved if key not in own]
    if not (reshaped or missing or extra):
        return
    parts = [
        f"{what}: {_listed(keys)}"
        for what, keys in (
            ("shapes differ (checkpoint -> model)", reshaped),
            ("missing from the checkpoint", missing),
            ("in the checkpoint, not in the model", extra),
        )
        if keys
    ]
    saved_as = f" (the checkpoint holds a {saved_target})" if saved_target else ""
    raise ConfigError(
        f"{origin}: the checkpoint's weights do not fit this {type(model).__name__}{saved_as}: "
        f"{'; '.join(parts)}. Build the model with the pre-trained run's model.* settings"
    )


def _listed(keys: list[str], limit: int = 8) -> str:
    """The first `limit` keys, and how many more there are."""
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


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
    """latents.h5, vaelab's own latents format: `mu`, `logvar` (float32, (N, latent_dim)) and
    `ids` of every sample, `split` when the samples have one (a training run's; new samples
    encoded later have none), and `attrs` saying where they came from. It is not seed 000's
    vae_latents.h5 (`patient_ids` for `ids`, no `split`): vaelab.export writes that one."""
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


def write_risk_scores(
    path: Path,
    ids: np.ndarray,
    split: np.ndarray,
    risk_score: np.ndarray,
    threshold: float | None,
    attrs: dict[str, object] | None = None,
) -> None:
    """risk_scores.h5 (seed 003), beside latents.h5 and in its sample order: `ids`, `split`,
    `risk_score` (the IsolationForest's anomaly score of each sample's mu, higher = riskier)
    and, with a threshold, `flagged` (risk_score > threshold), with the threshold and `attrs`
    (where the scores came from) as attributes. A file of its own, not a dataset of
    latents.h5: the latents are logged at the end of training, the risk model is fitted by
    the downstream report, which a sweep's trial defers (vaelab.evaluate)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".tmp")
    text = h5py.string_dtype()
    risk_score = np.asarray(risk_score, dtype=np.float64)
    with h5py.File(partial, "w") as f:
        f.create_dataset("ids", data=_strings(ids), dtype=text)
        f.create_dataset("split", data=_strings(split), dtype=text)
        f.create_dataset("risk_score", data=risk_score)
        if threshold is not None:
            f.create_dataset("flagged", data=risk_score > threshold)
            f.attrs["threshold"] = float(threshold)
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
