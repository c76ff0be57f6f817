"""Files a run leaves behind for later analysis: latents and per-branch reconstructions."""

from pathlib import Path

import h5py
import numpy as np
import torch

from vaelab.data.prepare import PreparedData


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


def _strings(array: np.ndarray) -> np.ndarray:
    return np.asarray([str(s) for s in array], dtype=object)


def write_latents(path: Path, mu: torch.Tensor, logvar: torch.Tensor, data: PreparedData) -> None:
    """latents.h5 (seed 000 format): mu, logvar, ids and split of every sample."""
    text = h5py.string_dtype()
    with h5py.File(path, "w") as f:
        f.create_dataset("mu", data=mu.numpy())
        f.create_dataset("logvar", data=logvar.numpy())
        f.create_dataset("ids", data=_strings(data.sampleset.ids), dtype=text)
        f.create_dataset("split", data=_strings(data.split), dtype=text)


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
