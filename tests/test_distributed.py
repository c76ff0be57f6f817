"""Multi-process training (vaelab.distributed): two gloo processes on the CPU equal one process.

The must-show: DDP over two ranks, each with half of a fixed global batch, under DipVaeLoss
with its covariance gathered across the ranks, gives the loss and every parameter gradient of
one process on the whole batch; without the gather it does not. Then `torchrun -m vaelab.train`
end to end: one epoch on two CPU processes records one MLflow run.
"""

import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vaelab import distributed
from vaelab.losses import DipVaeLoss, gaussian_kl_per_dim
from vaelab.models.conv3d import Conv3DVAE

WORLD = 2
GLOBAL_BATCH = 8
INPUT_SHAPE = (1, 8, 8, 8)


def loss_settings() -> dict[str, dict]:
    """The losses each rank evaluates, by name: DIP-VAE-II at its full λs (no warm-up) with its
    batch statistics gathered; with free bits per sample (a mean of per-sample floors); with
    seed 004's batch_mean free bits at a floor between the two halves' KL rates, so that the
    whole batch is above it and one half below; and the controls, each rank on its own half
    (the second without the covariance penalty, so that only the floor differs).
    """
    model = tiny_model(seed=0).eval()
    x, _ = global_batch()
    with torch.no_grad():
        mu, logvar = model.encode(x)
    rates = gaussian_kl_per_dim(mu, logvar).sum(dim=1).view(WORLD, -1).mean(dim=1)
    floor = (rates.min() + rates.mean()).item() / 2 / mu.shape[1]  # nats per dimension
    batch_mean = dict(free_bits=floor, free_bits_mode="batch_mean")
    return {
        "gathered": dict(ddp_gather=True),
        "gathered_per_sample": dict(ddp_gather=True, free_bits=0.5, free_bits_mode="per_sample"),
        "gathered_batch_mean": dict(ddp_gather=True, **batch_mean),
        "local": dict(ddp_gather=False),
        # No covariance penalty: only the floor can tell this control from one process.
        "local_batch_mean": dict(ddp_gather=False, lambda_od=0.0, lambda_d=0.0, **batch_mean),
    }


def tiny_model(seed: int) -> Conv3DVAE:
    """A conv3d VAE of seed 004's shape, small: GroupNorm, no BatchNorm, 3 latent dims."""
    torch.manual_seed(seed)
    return Conv3DVAE(INPUT_SHAPE, latent_dim=3, base_channels=2, norm_groups=1)


def dip_loss(**kwargs: object) -> DipVaeLoss:
    return DipVaeLoss(lambda_start_epoch=0.0, lambda_annealing_epochs=0.0, **kwargs)


def global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn((GLOBAL_BATCH, *INPUT_SHAPE), generator=torch.Generator().manual_seed(7))
    return x, torch.ones_like(x)


def one_step(model: torch.nn.Module, loss_fn: DipVaeLoss, x, mask) -> torch.Tensor:
    """Loss and backward of one batch in eval mode: z = mu, so no noise differs between runs."""
    model.zero_grad(set_to_none=True)
    terms = loss_fn(model(x), x, mask, beta=1.0, epoch=1.0)
    terms.total.backward()
    return terms.total.detach()


def _ddp_rank(rank: int, init_file: str, out_dir: str, losses: dict[str, dict]) -> None:
    """One rank: DDP (vaelab.distributed.wrap) over its slice (shard_batches) of the batch.

    torch.multiprocessing.spawn starts each rank as a fresh interpreter that imports this
    module to find this function, so the module imports only what the ranks need."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        # Rank 1 starts from other weights: DDP must give it rank 0's.
        model = tiny_model(seed=rank).eval()
        ddp = distributed.wrap(model, dip_loss(), torch.device("cpu"))
        # Rank 1 shuffled otherwise: shard_batches must give it its slice of rank 0's batches.
        order = torch.arange(GLOBAL_BATCH) if rank == 0 else torch.randperm(GLOBAL_BATCH)
        (mine,) = distributed.shard_batches([order])
        x, mask = global_batch()
        result = {"is_ddp": isinstance(ddp, torch.nn.parallel.DistributedDataParallel)}
        result["slice"] = mine
        for name, kwargs in losses.items():
            total = one_step(ddp, dip_loss(**kwargs), x[mine], mask[mine])
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
            result[name] = {"total": total, "grads": grads}
        result["stop"] = distributed.stop_from_rank0(stop=rank == 0)
        result["means"] = distributed.mean_over_ranks({"a": torch.tensor(float(rank))})
        torch.save(result, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """What each of two spawned gloo ranks computed (see _ddp_rank)."""
    folder = tmp_path_factory.mktemp("ddp")
    args = (str(folder / "store"), str(folder), loss_settings())
    mp.spawn(_ddp_rank, args=args, nprocs=WORLD, join=True)
    return [torch.load(folder / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def single_process(name: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss and gradients of one process on the whole global batch."""
    model = tiny_model(seed=0).eval()
    x, mask = global_batch()
    total = one_step(model, dip_loss(**loss_settings()[name]), x, mask)
    return total, {n: p.grad for n, p in model.named_parameters()}


def test_ranks_train_on_halves_of_rank0s_batch(ranks):
    assert all(r["is_ddp"] for r in ranks)
    assert ranks[0]["slice"].tolist() == [0, 1, 2, 3]
    assert ranks[1]["slice"].tolist() == [4, 5, 6, 7]
    assert [r["stop"] for r in ranks] == [True, True]  # rank 0's decision, on both
    assert [r["means"]["a"].item() for r in ranks] == [0.5, 0.5]


@pytest.mark.parametrize("name", ["gathered", "gathered_per_sample", "gathered_batch_mean"])
def test_two_ranks_equal_one_process_on_the_whole_batch(ranks, name):
    total, grads = single_process(name)
    # The global loss: the mean over ranks of each rank's total (its ELBO terms are means over
    # its half; the covariance penalty, over the gathered batch, is the same on both).
    global_total = torch.stack([r[name]["total"] for r in ranks]).mean()
    torch.testing.assert_close(global_total, total, rtol=1e-6, atol=1e-6 * abs(total.item()))
    assert set(grads) == set(ranks[0][name]["grads"])
    for param, expected in grads.items():
        scale = expected.abs().max().item()
        for r in ranks:  # DDP's averaged gradient, the same on every rank
            got = r[name]["grads"][param]
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6 * scale, msg=param)


@pytest.mark.parametrize(
    ("name", "param"), [("local", "fc_mu.weight"), ("local_batch_mean", "fc_logvar.weight")]
)
def test_without_the_gather_the_gradients_differ(ranks, name, param):
    """The controls: each rank's covariance, or free-bits floor, of its own half batch is not
    the global one (the covariance pulls on mu; the floor stops the KL's pull on one half)."""
    _, grads = single_process(name)
    expected, got = grads[param], ranks[0][name]["grads"][param]
    assert (got - expected).abs().max() > 1e-3 * expected.abs().max()


def test_one_process_is_untouched():
    """Without torchrun every helper is the identity and nothing is gathered."""
    model = tiny_model(seed=0)
    batches = [torch.arange(4), torch.arange(4, 8)]
    assert distributed.world_size() == 1 and distributed.is_main()
    assert distributed.wrap(model, dip_loss(), torch.device("cpu")) is model
    assert distributed.shard_batches(batches) is batches
    assert distributed.stop_from_rank0(True) is True
    assert distributed.other_rank_hydra_overrides() == []


@pytest.mark.slow
def test_torchrun_trains_one_run_on_two_cpu_processes(tmp_path):
    """`torchrun --nproc_per_node=2 -m vaelab.train`: gloo, one epoch, one MLflow run."""
    root = tmp_path / "multirun"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",  # torchrun
        "--standalone",
        f"--nproc_per_node={WORLD}",
        "-m",
        "vaelab.train",
        "experiment=mri3d_dipvae",
        "dataset.n_subjects=24",  # 16 training volumes: 4 steps of 4, 2 per rank
        "dataset.size=16",
        "model.latent_dim=8",
        "model.base_channels=4",
        "trainer.batch_size=4",
        "trainer.epochs=1",
        "trainer.device=auto",  # no GPU here: the CPU and gloo
        "loss.lambda_start_epoch=0",  # the gathered penalty from the first step
        "evaluation.downstream=false",
        "evaluation.iwae_samples=4",
        f"paths.output_root={root}",
    ]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]

    import mlflow  # here, not at the top: each spawned rank above imports this module

    client = mlflow.MlflowClient(f"sqlite:///{root}/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1  # rank 1 recorded nothing
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["trainer.world_size"] == "2"
    assert run.data.params["trainer.batch_size_used"] == "4"  # the global batch
    assert "train/cov_penalty" in run.data.metrics
    # One run folder, rank 0's, with its checkpoint and log; nothing of rank 1's in the cwd.
    (run_dir,) = (root / "runs").glob("*/*")
    assert run.data.tags["run_dir"] == str(run_dir)
    assert (run_dir / "checkpoints" / "model.pt").is_file()
    assert "Rank 0 of 2 (gloo)" in (run_dir / "train.log").read_text()
    assert not (tmp_path / "train.log").exists() and not (tmp_path / ".hydra").exists()
