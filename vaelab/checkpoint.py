"""Self-describing checkpoints (nanoGPT habit): state dicts, epoch, normaliser and the
resolved config, so a model is rebuilt through `instantiate(config.model)`, never by name.

Everything stored is a tensor or a plain Python value, so `torch.load(weights_only=True)`
reads it: loading a checkpoint never runs pickled code.
"""

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.utils import execution_whitelist, instantiate
from omegaconf import OmegaConf

from vaelab.data.prepare import Normaliser
from vaelab.settings import TRUSTED_TARGETS

log = logging.getLogger(__name__)


def save_checkpoint(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    epoch: int,
    normaliser: Normaliser,
    config: dict[str, Any],
    input_shape: tuple[int, ...],
    val_loss: float,
    channel_names: list[str] | None = None,
) -> None:
    """Write the checkpoint atomically: a crash mid-write never leaves a torn file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": int(epoch),
        "val_loss": float(val_loss),
        "normaliser": normaliser.state_dict(),
        "config": config,
        "input_shape": list(input_shape),
        "channel_names": channel_names,  # None when the data set only numbered its channels
    }
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


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> LoadedModel:
    """Rebuild the model of a checkpoint through its saved config (weights_only=True)."""
    state = torch.load(path, map_location=device, weights_only=True)
    input_shape = tuple(state["input_shape"])
    with execution_whitelist(list(TRUSTED_TARGETS)):
        model = instantiate(OmegaConf.create(state["config"]["model"]), input_shape=input_shape)
    model.load_state_dict(state["model"])
    model.to(device).eval()
    return LoadedModel(
        model=model,
        normaliser=Normaliser.from_state_dict(state["normaliser"]),
        config=state["config"],
        epoch=state["epoch"],
        input_shape=input_shape,
        channel_names=tuple(state["channel_names"]) if state.get("channel_names") else None,
    )
