"""Training one run on several processes with torch DistributedDataParallel, under torchrun.

    torchrun --standalone --nproc_per_node=2 -m vaelab.train experiment=mri3d_dipvae

torchrun starts one process per rank and tells each where it stands through the environment
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). Without those variables, or with one
process, nothing here does anything: world size 1, rank 0, every helper the identity, so a plain
`python -m vaelab.train` runs exactly as before.

Who does what in a run of N ranks:
- every rank runs the Hydra app, builds the same data and model, draws its own noise (seed +
  rank, as nanoGPT offsets its seed by the rank) and trains on its 1/N slice of each global batch
  of trainer.batch_size samples (`shard_batches`); DDP averages the gradients, so every rank
  holds the same weights after every step.
- rank 0 alone validates, writes the MLflow run, the checkpoints, the log, the latents and the
  report, and tells the others at the end of each epoch whether to stop (`stop_from_rank0`).
  The other ranks train only; Hydra writes nothing for them (`other_rank_hydra_overrides`).
- DIP-VAE-II's covariance is a statistic of the whole batch: DipVaeLoss gathers mu and logvar
  from every rank (`gather_batch`) before its penalties (seed 004: use_ddp_gather), and the
  KL of each sample before a per_dim or batch_mean free-bits floor, so that its loss and every
  gradient are one process's on the global batch (tests/test_distributed.py).

Where N ranks differ from one process on the same global batch:
- the other losses (elbo, capacity, vq) floor free bits in per_dim / batch_mean mode on each
  rank's own slice; per_sample free bits, or none, are exact;
- a masked-MSE reconstruction (loss.reduction=mean) averages each slice's mean, which equals
  the batch's only when the slices hold as many observed entries (always, for unmasked
  volumes); reduction=sum is exact;
- BatchNorm on the CPU normalises per slice (see `wrap`; on GPUs it becomes SyncBatchNorm);
- the noise of the reparameterisation differs (each rank draws its own), and after the first
  epoch so does the shuffle (see `shard_batches`).
Refused with a ConfigError: a sweep under torchrun, a learned σ (loss.sigma=learned), a batch
size the ranks cannot split evenly.
"""

import datetime
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import all_gather_single
from torch.nn.parallel import DistributedDataParallel

from vaelab.errors import ConfigError

log = logging.getLogger(__name__)

# The environment torchrun (torch.distributed.run) gives every process it starts.
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
# How long the other ranks wait for rank 0 at a collective. Rank 0 validates alone at the end of
# every epoch while the others wait at the broadcast of its stop decision; NCCL's default of
# 10 minutes could run out on a large validation split of 128³ volumes.
RANK0_WAIT = datetime.timedelta(hours=1)


def launched_by_torchrun() -> bool:
    """Whether torchrun started this process (its variables are set), however many ranks."""
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


def several_processes() -> bool:
    """Whether torchrun started more than one process for this run."""
    return launched_by_torchrun() and int(os.environ["WORLD_SIZE"]) > 1


def local_rank() -> int | None:
    """This process's rank on its host (the GPU it takes) when torchrun started several
    processes; None otherwise (one process chooses its device as ever)."""
    return int(os.environ["LOCAL_RANK"]) if several_processes() else None


def is_initialized() -> bool:
    """Whether a process group is up (torch may be built without torch.distributed)."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """The number of ranks training this run: 1 without a process group."""
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    """This process's rank in the run: 0 without a process group."""
    return dist.get_rank() if is_initialized() else 0


def is_main() -> bool:
    """Whether this process records the run (rank 0, or the only process)."""
    return rank() == 0


def other_rank_hydra_overrides() -> list[str]:
    """Command-line overrides that keep Hydra from writing anything for a rank other than 0.

    Every rank runs the Hydra app, and Hydra would give each its own run folder (the folder's
    name is the time, which can differ by a second between ranks) with its own .hydra/ and
    train.log. Rank 0's folder is the run's; the others get none: their output dir is the
    current one (which exists), no .hydra/ copy of the config, no log file, and their log says
    only warnings and errors. The same pattern as lightning-hydra-template issue #393 (extend
    sys.argv on non-zero ranks); Lightning's own DDP launcher passes hydra.run.dir to the ranks
    it starts (Lightning PR #18145). The ranks learn rank 0's folder by broadcast
    (`broadcast_object`), so all of them agree on it.
    """
    if not launched_by_torchrun() or int(os.environ["RANK"]) == 0:
        return []
    return [
        "hydra.run.dir=.",
        "hydra.output_subdir=null",
        "~hydra.job_logging.handlers.file",
        "hydra.job_logging.root.handlers=[console]",
        "hydra.job_logging.root.level=WARNING",
    ]


@contextmanager
def process_group(device: str, in_sweep: bool = False) -> Iterator[None]:
    """Join the run's process group while inside, when torchrun started several processes.

    The backend follows trainer.device as vaelab.runtime.resolve_device reads it: NCCL when the
    ranks train on GPUs (each on cuda:LOCAL_RANK), gloo on the CPU. One process (no torchrun, or
    --nproc_per_node=1) joins nothing.
    """
    if not several_processes():
        yield
        return
    if in_sweep:
        raise ConfigError(
            "torchrun trains one run on several processes; a sweep (--multirun) under torchrun "
            "would run every trial once per rank. Sweep with one process per trial "
            "(hydra.sweeper.n_jobs) instead"
        )
    on_gpu = device != "cpu" and torch.cuda.is_available()
    backend = "nccl" if on_gpu else "gloo"
    if on_gpu:
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend, timeout=RANK0_WAIT)
    log.info("Rank %d of %d (%s), local rank %d", rank(), world_size(), backend, local_rank())
    try:
        yield
    finally:
        dist.destroy_process_group()


def broadcast_object(value: Any) -> Any:
    """Rank 0's `value` on every rank (picklable values; the value itself in one process)."""
    if world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def stop_from_rank0(stop: bool = False) -> bool:
    """Rank 0's decision to stop training, on every rank (other ranks' `stop` is ignored).

    Rank 0 alone validates, so it alone knows whether early stopping fires; every rank must
    leave the epoch loop together, or the others would wait for a step rank 0 never takes.
    """
    return bool(broadcast_object(stop))


def wrap(model: nn.Module, loss_fn: nn.Module, device: torch.device) -> nn.Module:
    """The module the train step calls: `model` itself in one process, else DDP around it.

    DDP broadcasts rank 0's parameters and buffers when it wraps, so every rank starts from the
    same weights whatever its seed, and averages the gradients in the backward pass. `model`
    stays the bare module: validation and checkpoints use it (state dict keys without the
    `module.` prefix).

    BatchNorm: on GPUs each BatchNorm becomes a SyncBatchNorm (in place, sharing its
    parameters and buffers, so the optimiser and the checkpoints see the same tensors), which
    normalises with the statistics of the global batch. torch 2.13's SyncBatchNorm refuses CPU
    tensors in training ("expected input tensor to be on GPU"), so on the CPU (gloo) each rank
    normalises with its own shard's statistics, and rank 0's running statistics are broadcast
    at every step (DDP's broadcast_buffers): the gradients then differ from one process's on
    the whole batch. vaelab's conv3d model uses GroupNorm and is unaffected.
    """
    if world_size() == 1:
        return model
    if any(p.requires_grad for p in loss_fn.parameters()):
        # DDP averages the gradients of the module it wraps; a loss's own parameters (the
        # learned decoder σ) would drift apart between ranks.
        raise ConfigError(
            "loss.sigma=learned is not supported under torchrun: DDP averages the model's "
            "gradients only, so each rank's learned σ would drift apart. Use a fixed loss.sigma"
        )
    has_batchnorm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if has_batchnorm and device.type == "cuda":
        nn.SyncBatchNorm.convert_sync_batchnorm(model)
    elif has_batchnorm:
        log.warning(
            "%s has BatchNorm layers and the %d ranks train on the CPU, where SyncBatchNorm does "
            "not run: each rank normalises with the statistics of its own 1/%d of each batch",
            type(model).__name__,
            world_size(),
            world_size(),
        )
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def shard_batches(batches: list[torch.Tensor]) -> list[torch.Tensor]:
    """This rank's slice of each of the epoch's global batches (sample indices).

    Each global batch keeps trainer.batch_size samples, split in world-size equal slices, rank
    r taking the r-th: the union of the ranks' slices at a step is the global batch one process
    would train on. The batches are rank 0's shuffle, broadcast: the ranks seed their streams
    apart (their noise must differ), so their own shuffles would differ. The first epoch's
    batches are exactly those of a one-process run with the same seed; later epochs' shuffles
    differ from it, as rank 0 draws noise for its slice only.
    """
    n = world_size()
    if n == 1:
        return batches
    uneven = sorted({len(b) for b in batches if len(b) % n})
    if uneven:
        raise ConfigError(
            f"trainer.batch_size: batches of {uneven[0]} samples cannot be split evenly across "
            f"{n} ranks (DIP-VAE's gathered covariance and the gradient average need equal "
            f"slices); use a batch size divisible by {n}"
        )
    if len({len(b) for b in batches}) > 1:
        raise ConfigError(f"epoch batches of unequal sizes {sorted({len(b) for b in batches})}")
    stacked = torch.stack(batches)  # (steps, batch size), on the device the indices are on
    dist.broadcast(stacked, src=0)
    size = stacked.shape[1] // n
    return list(stacked[:, rank() * size : (rank() + 1) * size].unbind(0))


def mean_over_ranks(sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each running sum averaged over the ranks (one all-reduce): an epoch's train/* metrics
    of the global batches rather than of rank 0's slices."""
    if world_size() == 1 or not sums:
        return sums
    stacked = torch.stack(list(sums.values()))
    dist.all_reduce(stacked)  # names are in the same order on every rank: the same code ran
    return dict(zip(sums, (stacked / world_size()).unbind(0), strict=True))


def gather_batch(tensor: torch.Tensor) -> torch.Tensor:
    """The rows of `tensor` from every rank, rank 0's first: the global batch's, (N·B, ...).

    The gather is differentiable: its backward is a reduce-scatter with SUM, which adds up, over
    the ranks, the gradient each rank's loss sends to a slice and hands this rank the sum for its
    own slice. torch 2.13 deprecates torch.distributed.nn.functional.all_gather (same backward)
    in favour of this functional collective, which also runs under torch.compile. Every rank
    must call it, in the same order; in one process it returns `tensor`.
    """
    if world_size() == 1:
        return tensor
    return all_gather_single(tensor.contiguous(), 0, dist.group.WORLD)
