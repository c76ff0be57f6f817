"""Throughput of the seed 000 multi-scale Conv1D VAE on this machine, and what the loop costs.

    python -m vaelab.bench          # make bench; a few minutes on 2 CPU cores

Reads top to bottom: the machine and the precision `trainer.precision=auto` picks on it, the
measured matmul peak of every precision the host runs natively, one train step of the seed
000 experiment at each of those precisions against the seed plan's own model (seed 001's
code, timed in turns with it in the same run: samples/s, FLOPs, share of that precision's
peak), the same model with torch.nn's layers, torch.compile's cost and gain, the real
training loop against a bare loop of the same steps, every experiment's model on its own
data shape, then one table. Every vaelab figure comes from the experiment configs in
conf/experiment/ and from `vaelab.loop.train_step`, the step the training loop takes, so the
bench cannot drift from what `python -m vaelab.train` runs. Figures go to stdout through
logging. `python -m vaelab.bench_sweep` measures the sweeps.
"""

import logging
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from vaelab.config import build
from vaelab.data.prepare import PreparedData, prepare
from vaelab.loop import (
    StepPrecision,
    TrainerSettings,
    compiled,
    epoch_batches,
    latent_targets,
    train_step,
)
from vaelab.runtime import cpu_model, native_bf16, resolve_precision
from vaelab.train import train

log = logging.getLogger("vaelab.bench")

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
EXPERIMENTS = sorted(path.stem for path in (CONF_DIR / "experiment").glob("*.yaml"))
SEED000 = "multiscale_vitals"  # seed 000's model, data shape, batch, loss and optimiser

# Cores other processes may keep busy during a measurement before the bench says its figures
# are not the host's own (OtherLoad measures them from /proc/stat).
BUSY_CORES = 0.25
# The dtype of each trainer.precision's matmuls, for its peak.
MATMUL_DTYPES = {"32": torch.float32, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}

# Part (e): the real loop, kept short; epoch 0 is warm-up and left out of the figures.
LOOP_PATIENTS, LOOP_EPOCHS = 200, 3

# Every step figure is taken at the experiment's own sample shape and batch size; only the
# number of generated samples is cut (the shape of one sample is what a step costs).
FEW_SAMPLES = {"n_patients": 8, "n_subjects": 6, "n_samples": 200}


class OtherLoad:
    """Cores kept busy by other processes between start() and stop(), from /proc/stat."""

    def __init__(self) -> None:
        self.available = Path("/proc/stat").exists()
        self.ticks_per_second = os.sysconf("SC_CLK_TCK") if self.available else 100

    def _busy_seconds(self) -> tuple[float, float, float]:
        """(all processes' busy CPU seconds, this process's CPU seconds, wall seconds)."""
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        busy = (sum(fields) - fields[3] - fields[4]) / self.ticks_per_second  # minus idle, iowait
        own = os.times()
        return busy, own.user + own.system, time.perf_counter()

    def start(self) -> None:
        """Mark the start of the measured window."""
        self._start = self._busy_seconds() if self.available else None

    def stop(self) -> float:
        """Mean number of cores other processes used since start(); NaN without /proc/stat."""
        if self._start is None:
            return float("nan")
        busy, own, wall = self._busy_seconds()
        busy0, own0, wall0 = self._start
        return max(0.0, (busy - busy0) - (own - own0)) / max(wall - wall0, 1e-9)


@contextmanager
def stderr_silenced() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null: the profiler's C++ side prints start/stop lines."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def conv1d_backend() -> str:
    """Which ATen kernels run a float32 Conv1d and ConvTranspose1d here (oneDNN is the fast one)."""
    conv = torch.nn.Conv1d(8, 16, 5, stride=2, padding=2)
    deconv = torch.nn.ConvTranspose1d(16, 8, 5, stride=2, padding=2, output_padding=1)
    with stderr_silenced(), torch.profiler.profile() as prof, torch.no_grad():
        deconv(conv(torch.randn(2, 8, 64)))
    # Below aten::_convolution: mkldnn_convolution for Conv1d; oneDNN's transposed path records
    # no op of its own, while the native fallbacks show up as thnn_* / slow_conv_* kernels.
    wrappers = {"aten::conv1d", "aten::conv_transpose1d", "aten::convolution", "aten::_convolution"}
    kernels = sorted({e.name for e in prof.events() if "conv" in e.name} - wrappers)
    if kernels == ["aten::mkldnn_convolution"]:
        return "oneDNN (aten::mkldnn_convolution) for Conv1d and ConvTranspose1d"
    return f"not all oneDNN: {', '.join(kernels)} (mkldnn enabled: {torch.backends.mkldnn.enabled})"


def machine() -> dict[str, object]:
    """Threads, cores, torch version, CPU model, the Conv1d kernel and auto's precision."""
    auto = resolve_precision("auto", torch.device("cpu"))
    return {
        "torch threads": torch.get_num_threads(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "CPU": cpu_model(),
        "Conv1d kernel": conv1d_backend(),
        "precision=auto": f"{auto.name} ({auto.reason})",
    }


def matmul_peak(
    sizes: tuple[int, ...] = (1024, 2048), repeats: int = 5, dtype: torch.dtype = torch.float32
) -> tuple[float, int]:
    """Best sustained torch.mm GFLOP/s in `dtype` (2·n³ FLOPs per product) and the n reaching
    it: the ceiling a train step at that precision is measured against."""
    best, best_n = 0.0, sizes[0]
    for n in sizes:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        out = torch.empty(n, n, dtype=dtype)
        flops = 2 * n**3
        started = time.perf_counter()
        torch.mm(a, b, out=out)  # warm-up, and a first guess of one product's time
        per_repeat = max(1, int(0.3 / max(time.perf_counter() - started, 1e-6)))
        for _ in range(repeats):
            started = time.perf_counter()
            for _ in range(per_repeat):
                torch.mm(a, b, out=out)
            rate = per_repeat * flops / (time.perf_counter() - started) / 1e9
            if rate > best:
                best, best_n = rate, n
    return best, best_n


def compose_experiment(
    name: str, output_root: Path, overrides: tuple[str, ...] = (), few_samples: bool = True
) -> DictConfig:
    """experiment=name with few generated samples (unless few_samples=False), on the CPU,
    writing under output_root."""
    base = [f"experiment={name}", f"paths.output_root={output_root}", "trainer.device=cpu"]
    with initialize_config_dir(config_dir=str(CONF_DIR)):  # Hydra 1.4: no version_base
        cfg = compose("train", overrides=[*base, *overrides])
    for key, count in FEW_SAMPLES.items() if few_samples else ():
        if key in cfg.dataset and f"dataset.{key}" not in " ".join(overrides):
            cfg.dataset[key] = count
    return cfg


class Parts:
    """An experiment's data, model, loss, β schedule, settings, optimiser and train-step
    precision, built from its config exactly as vaelab.train builds them."""

    def __init__(self, cfg: DictConfig) -> None:
        self.data: PreparedData = prepare(
            build(cfg.dataset), cfg.split.val_fraction, cfg.split.test_fraction, cfg.seed
        )
        torch.manual_seed(cfg.seed)
        self.model = build(cfg.model, input_shape=self.data.sampleset.sample_shape).train()
        self.loss_fn, self.beta_schedule = build(cfg.loss), build(cfg.schedule)
        self.settings: TrainerSettings = build(cfg.trainer)
        self.optimizer = self.settings.optimizer(self.model.parameters())
        self.precision = resolve_precision(self.settings.precision, torch.device("cpu"))
        self.step_precision = StepPrecision(self.precision)
        self.step_model = compiled(self.model, self.settings.compile)
        # a supervised loss's known factors, one row per sample (seed 004 Exp3); else None
        self.targets = latent_targets(self.loss_fn, self.data, torch.device("cpu"))

    def step(self, batch: torch.Tensor, epoch: float) -> None:
        """One vaelab.loop.train_step on these samples at this fractional epoch."""
        x, mask = self.data.values[batch], self.data.masks[batch]
        beta = self.beta_schedule(epoch)
        train_step(
            self.step_model,
            self.loss_fn,
            self.optimizer,
            x,
            mask,
            beta,
            epoch,
            self.settings.grad_clip,
            self.step_precision,
            None if self.targets is None else self.targets[batch],
        )


# --- the seed plan's own model ------------------------------------------------------------
# Seed 001 ("Multi-Scale Conv1D VAE Implementation Plan", Tasks 1-4) as it is written there:
# ConvBlock / TransposeConvBlock of torch.nn layers, a decoder that projects z to 8 steps per
# branch and replicate-pads or crops each branch to T, and MultiScaleVAELoss (masked MSE of
# the merged and the four branch reconstructions, averaged; free bits on the per-dimension
# KL). Only its class names carry a SeedPlan prefix. It is timed against vaelab's seed 000
# step in the same run, on the same batches, optimiser settings and gradient clipping.


class SeedPlanConvBlock(nn.Module):
    """Seed 001's ConvBlock: Conv1d + BatchNorm + LeakyReLU + Dropout."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.conv = nn.Conv1d(c_in, c_out, kernel, stride=stride, padding=kernel // 2)
        self.bn = nn.BatchNorm1d(c_out)
        self.act = nn.LeakyReLU(0.2)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The block."""
        return self.dropout(self.act(self.bn(self.conv(x))))


class SeedPlanTransposeConvBlock(SeedPlanConvBlock):
    """Seed 001's TransposeConvBlock: its ConvBlock with a ConvTranspose1d."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, dropout: float) -> None:
        super().__init__(c_in, c_out, kernel, stride, dropout)
        self.conv = nn.ConvTranspose1d(
            c_in, c_out, kernel, stride=stride, padding=kernel // 2, output_padding=stride - 1
        )


class SeedPlanVAE(nn.Module):
    """Seed 001's MultiScaleConv1DVAE (its MultiScaleEncoder and MultiScaleDecoder)."""

    def __init__(
        self, input_dim: int, seq_len: int, latent_dim: int, base_channels: int, dropout: float
    ) -> None:
        super().__init__()
        c, d, self.c, self.seq_len = base_channels, dropout, base_channels, seq_len
        block, up = SeedPlanConvBlock, SeedPlanTransposeConvBlock
        pool = nn.AdaptiveAvgPool1d
        self.encoders = nn.ModuleList(
            [
                nn.Sequential(
                    block(input_dim, c // 2, 3, 2, d),
                    block(c // 2, c, 5, 2, d),
                    block(c, c, 5, 2, d),
                    pool(1),
                ),
                nn.Sequential(
                    block(input_dim, c // 2, 15, 4, d), block(c // 2, c, 31, 4, d), pool(1)
                ),
                nn.Sequential(
                    block(input_dim, c // 2, 63, 8, d), block(c // 2, c, 127, 8, d), pool(1)
                ),
                nn.Sequential(block(input_dim, c, 255, 16, d), pool(1)),
            ]
        )
        self.fc_merge = nn.Linear(c * 4, c * 2)
        self.fc_mu = nn.Linear(c * 2, latent_dim)
        self.fc_logvar = nn.Linear(c * 2, latent_dim)
        self.fc = nn.Linear(latent_dim, c * 4 * 8)  # 4 branches, 8 initial length
        q = c // 4
        self.decoders = nn.ModuleList(
            [
                nn.Sequential(
                    up(c, c, 5, 2, d),
                    up(c, c // 2, 5, 2, d),
                    up(c // 2, c // 2, 5, 2, d),
                    up(c // 2, q, 5, 2, d),
                    up(q, q, 5, 2, d),
                    up(q, q, 5, 2, d),
                ),
                nn.Sequential(up(c, c, 15, 4, d), up(c, c // 2, 15, 4, d), up(c // 2, q, 15, 4, d)),
                nn.Sequential(up(c, c, 31, 8, d), up(c, c // 2, 31, 8, d)),
                nn.Sequential(up(c, c // 2, 63, 16, d), up(c // 2, q, 63, 8, d)),
            ]
        )
        self.heads = nn.ModuleList(
            [nn.Conv1d(width, input_dim, 3, padding=1) for width in (q, q, c // 2, q)]
        )
        self.merge = nn.Conv1d(input_dim * 4, input_dim, kernel_size=1)

    def _adjust_length(self, x: torch.Tensor) -> torch.Tensor:
        """Seed 001: crop, or replicate-pad, a branch to seq_len."""
        if x.shape[2] > self.seq_len:
            return x[:, :, : self.seq_len]
        if x.shape[2] < self.seq_len:
            return F.pad(x, (0, self.seq_len - x.shape[2]), mode="replicate")
        return x

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(recon, mu, logvar, *branch reconstructions), each (B, T, C) but mu and logvar."""
        h = x.transpose(1, 2)
        h = torch.cat([encoder(h).squeeze(-1) for encoder in self.encoders], dim=1)
        h = F.leaky_relu(self.fc_merge(h), 0.2)
        mu, logvar = self.fc_mu(h), self.fc_logvar(h)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        h = self.fc(z).view(z.shape[0], self.c * 4, 8)
        chunks = torch.split(h, self.c, dim=1)
        branches = [
            self._adjust_length(head(decoder(chunk)))
            for decoder, head, chunk in zip(self.decoders, self.heads, chunks, strict=True)
        ]
        recon = self.merge(torch.cat(branches, dim=1)).transpose(1, 2)
        return recon, mu, logvar, *(b.transpose(1, 2) for b in branches)


def seed_plan_loss(
    outputs: tuple[torch.Tensor, ...],
    x: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
    free_bits: float,
) -> torch.Tensor:
    """Seed 001's MultiScaleVAELoss with branch_recons: masked MSE of the merged and each
    branch reconstruction, averaged, + β · mean over dimensions of max(KL - free_bits, 0)."""
    recon, mu, logvar, *branches = (t.float() for t in outputs)

    def mse(r: torch.Tensor) -> torch.Tensor:
        return (((r - x) ** 2) * mask).sum() / (mask.sum() + 1e-8)

    recon_loss = (mse(recon) + sum(mse(b) for b in branches)) / (1 + len(branches))
    kl_per_dim = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp())
    return recon_loss + beta * torch.clamp(kl_per_dim - free_bits, min=0).mean()


class SeedPlanParts:
    """The seed plan's model with the experiment's data, sizes, optimiser and clipping."""

    def __init__(self, parts: Parts, cfg: DictConfig, precision: str = "32") -> None:
        self.parts = parts
        n_steps, n_channels = parts.data.sampleset.sample_shape
        model = cfg.model
        torch.manual_seed(cfg.seed)
        self.model = SeedPlanVAE(
            n_channels, n_steps, model.latent_dim, model.base_channels, model.dropout
        ).train()
        self.optimizer = parts.settings.optimizer(self.model.parameters())
        self.free_bits = float(cfg.loss.free_bits)
        self.precision = resolve_precision(precision, torch.device("cpu"))

    def step(self, batch: torch.Tensor, epoch: float) -> None:
        """One optimiser step of the seed plan's model, the forward pass under `precision`."""
        x, mask = self.parts.data.values[batch], self.parts.data.masks[batch]
        with self.precision.autocast():
            outputs = self.model(x)
        loss = seed_plan_loss(outputs, x, mask, self.parts.beta_schedule(epoch), self.free_bits)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.parts.settings.grad_clip)
        self.optimizer.step()


Stepper = Callable[[torch.Tensor, float], None]  # one optimiser step on (batch, epoch)


def bench_batches(parts: Parts, count: int) -> list[torch.Tensor]:
    """`count` batches of the experiment's batch size, drawn with replacement from all samples:
    the figure is about the step, and the few generated samples may be fewer than one batch."""
    generator = torch.Generator().manual_seed(0)
    n, batch_size = len(parts.data.values), parts.settings.batch_size
    return [torch.randint(n, (batch_size,), generator=generator) for _ in range(count)]


def timed_steps(
    steppers: dict[str, Stepper], batches: list[torch.Tensor], epoch: float, warmup: int
) -> tuple[dict[str, list[float]], float]:
    """Seconds of each stepper's steps after `warmup`, and the other processes' cores meanwhile.

    The steppers take turns batch by batch, so that a change in the host's load (2 cores
    shared with other work) falls on all of them alike and their ratios stay fair.
    """
    load = OtherLoad()
    seconds: dict[str, list[float]] = {name: [] for name in steppers}
    for i, batch in enumerate(batches):
        if i == warmup:
            load.start()
        for name, step in steppers.items():
            started = time.perf_counter()
            step(batch, epoch)
            if i >= warmup:
                seconds[name].append(time.perf_counter() - started)
    return seconds, load.stop()


def count_flops(step: Stepper, batch: torch.Tensor, epoch: float) -> int:
    """FLOPs of one step: matmuls and convolutions of forward and backward, 2 per multiply-add."""
    with FlopCounterMode(display=False) as counter:
        step(batch, epoch)
    return counter.get_total_flops()


def step_speed(cfg: DictConfig, warmup: int = 2, steps: int = 6, flops: bool = False) -> dict:
    """Median train step of the experiment at its batch size; its FLOPs too if asked.

    The step runs at the last epoch, where every schedule has settled (β, capacity, DIP λ at
    their final values).
    """
    parts = Parts(cfg)
    batch_size, epoch = parts.settings.batch_size, float(parts.settings.epochs)
    batches = bench_batches(parts, warmup + steps)
    times, other_cores = timed_steps({"step": parts.step}, batches, epoch, warmup)
    seconds = times["step"]
    figures = {
        "model": cfg.model._target_.rsplit(".", 1)[-1],
        "shape": "x".join(str(n) for n in parts.data.sampleset.sample_shape),
        "batch": batch_size,
        "parameters": sum(p.numel() for p in parts.model.parameters()),
        "precision": parts.precision.name,
        "step": statistics.median(seconds),
        "best": min(seconds),
        "samples_per_second": batch_size / statistics.median(seconds),
        "other_cores": other_cores,
    }
    if flops:
        figures["flops"] = count_flops(parts.step, batches[0], epoch)
    return figures


def host_precisions() -> list[str]:
    """The precisions this CPU runs natively: 32, and bf16-mixed where it computes bf16."""
    return ["32", "bf16-mixed"] if native_bf16(torch.device("cpu"))[0] else ["32"]


def precision_speeds(output_root: Path, precisions: list[str], warmup: int, steps: int) -> dict:
    """The seed 000 step at each precision, and the seed plan's model as written (float32) and
    at each precision, all timed in turns on the same batches: {precision: figures}."""
    if "32" not in precisions:
        raise ValueError(f"precisions must include 32, the seed plan's own, got {precisions}")
    steppers: dict[str, Stepper] = {}
    for precision in precisions:
        cfg = compose_experiment(SEED000, output_root, (f"trainer.precision={precision}",))
        parts = Parts(cfg)
        steppers[f"vaelab {precision}"] = parts.step
        steppers[f"seed plan {precision}"] = SeedPlanParts(parts, cfg, precision).step
        if precision == "32":
            first = parts  # the data, batch size and epochs are the same at every precision
    epoch = float(first.settings.epochs)
    batches = bench_batches(first, warmup + steps)
    times, other_cores = timed_steps(steppers, batches, epoch, warmup)
    flops = {  # the same products whatever the dtype: counted once per model
        model: count_flops(steppers[f"{model} 32"], batches[0], epoch)
        for model in ("vaelab", "seed plan")
    }
    plan = statistics.median(times["seed plan 32"])  # the seed plan as written: float32
    figures = {}
    for precision in precisions:
        step = statistics.median(times[f"vaelab {precision}"])
        same = statistics.median(times[f"seed plan {precision}"])
        figures[precision] = {
            "step": step,
            "best": min(times[f"vaelab {precision}"]),
            "samples_per_second": first.settings.batch_size / step,
            "plan_samples_per_second": first.settings.batch_size / same,
            "ratio_to_plan": plan / step,  # vaelab's speed over the seed plan's, float32
            "ratio_same_precision": same / step,  # both at this precision
            "flops": flops["vaelab"],
            "plan_flops": flops["seed plan"],
            "other_cores": other_cores,
        }
    return {"batch": first.settings.batch_size, "plan_step": plan, "precisions": figures}


@contextmanager
def cold_compile_cache() -> Iterator[None]:
    """Inductor's caches in an empty folder, so the compile time measured is a first run's."""
    saved = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    with tempfile.TemporaryDirectory(prefix="vaelab-inductor-") as cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        try:
            yield
        finally:
            if saved is None:
                os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
            else:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = saved


def run_steps(cfg: DictConfig) -> int:
    """Optimiser steps of the experiment's full run on its full data (epochs x steps each)."""
    data = prepare(build(cfg.dataset), cfg.split.val_fraction, cfg.split.test_fraction, cfg.seed)
    settings: TrainerSettings = build(cfg.trainer)
    n_train = len(data.indices("train"))
    return settings.epochs * max(n_train // settings.batch_size_for(n_train), 1)


def compile_cost(output_root: Path, warmup: int, steps: int) -> dict:
    """torch.compile on the seed 000 step at the default precision: the first step's extra
    seconds (a cold cache), the gain per step after it, and the steps it takes to pay off."""
    eager = Parts(compose_experiment(SEED000, output_root))
    compiled_parts = Parts(compose_experiment(SEED000, output_root, ("trainer.compile=true",)))
    epoch = float(eager.settings.epochs)
    batches = bench_batches(eager, warmup + steps)
    eager.step(batches[0], epoch)
    started = time.perf_counter()
    eager.step(batches[0], epoch)
    eager_first = time.perf_counter() - started
    with cold_compile_cache():
        started = time.perf_counter()
        compiled_parts.step(batches[0], epoch)  # compiles forward and backward
        first = time.perf_counter() - started
    steppers = {"eager": eager.step, "compiled": compiled_parts.step}
    times, other_cores = timed_steps(steppers, batches, epoch, warmup)
    eager_step, compiled_step = (statistics.median(times[k]) for k in ("eager", "compiled"))
    gain = eager_step - compiled_step
    compile_seconds = max(first - eager_first, 0.0)
    full_run = run_steps(compose_experiment(SEED000, output_root, few_samples=False))
    break_even = compile_seconds / gain if gain > 0 else math.inf
    return {
        "precision": eager.precision.name,
        "compile_seconds": compile_seconds,
        "eager_step": eager_step,
        "compiled_step": compiled_step,
        "break_even_steps": break_even,
        "run_steps": full_run,
        "pays": break_even < full_run,
        "other_cores": other_cores,
    }


def full_loop_epochs(cfg: DictConfig, run_dir: Path) -> list[float]:
    """Run vaelab.train.train and read back its perf/epoch_seconds from the MLflow store."""
    train(cfg, run_dir)
    client = mlflow.MlflowClient(tracking_uri=cfg.tracking.uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    run = client.search_runs([experiment.experiment_id], order_by=["start_time DESC"])[0]
    history = client.get_metric_history(run.info.run_id, "perf/epoch_seconds")
    return [metric.value for metric in sorted(history, key=lambda m: m.step)]


def bare_loop_epochs(cfg: DictConfig) -> list[float]:
    """Seconds per epoch of the loop's own batches and train steps, and nothing else."""
    parts = Parts(cfg)
    train_index = parts.data.indices("train")
    epochs = []
    for epoch in range(parts.settings.epochs):
        started = time.perf_counter()
        batches = epoch_batches(train_index, parts.settings.batch_size)
        for step, batch in enumerate(batches):
            parts.step(batch, epoch + step / len(batches))
        epochs.append(time.perf_counter() - started)
    return epochs


def loop_overhead() -> dict[str, object]:
    """Seconds per epoch (epoch 0 left out) of vaelab.train's loop and of a bare loop."""
    load = OtherLoad()
    overrides = (
        f"dataset.n_patients={LOOP_PATIENTS}",
        f"trainer.epochs={LOOP_EPOCHS}",
        "trainer.patience=null",
        "evaluation.downstream=false",  # after the epochs, so outside the figures; saves time
        "run_name=bench",
    )
    with tempfile.TemporaryDirectory(prefix="vaelab-bench-") as tmp:
        cfg = compose_experiment(SEED000, Path(tmp) / "multirun", overrides)
        load.start()
        started = time.perf_counter()
        full = full_loop_epochs(cfg, Path(tmp) / "run")
        train_seconds = time.perf_counter() - started
        bare = bare_loop_epochs(cfg)
        other_cores = load.stop()
    full_epoch, bare_epoch = statistics.mean(full[1:]), statistics.mean(bare[1:])
    return {
        "full": full_epoch,
        "bare": bare_epoch,
        "overhead": (full_epoch - bare_epoch) / bare_epoch,
        "train_seconds": train_seconds,
        "epochs_full": full,
        "epochs_bare": bare,
        "other_cores": other_cores,
    }


def every_model() -> dict[str, dict[str, object]]:
    """Part (f): step_speed for each experiment of conf/experiment/."""
    figures = {}
    with tempfile.TemporaryDirectory(prefix="vaelab-bench-") as tmp:
        for name in EXPERIMENTS:
            f = figures[name] = step_speed(compose_experiment(name, Path(tmp)))
            log.info(
                "  %-22s %-20s %-12s batch %-4d %9d params  %-10s %7.3f s/step  %8.1f samples/s",
                name,
                f["model"],
                f["shape"],
                f["batch"],
                f["parameters"],
                f["precision"],
                f["step"],
                f["samples_per_second"],
            )
    return figures


def summary(
    loads: tuple[float, float],
    info: dict[str, object],
    peaks: dict[str, tuple[float, int]],
    speeds: dict,
    stock: dict,
    compile_figures: dict,
    loop: dict,
) -> list[tuple[str, str, str]]:
    """The final table: (figure, value on this machine, note) rows."""
    rows = [
        ("load average start / end", f"{loads[0]:.2f} / {loads[1]:.2f}", "1-minute"),
        ("torch threads, version", f"{info['torch threads']}, {info['torch']}", info["CPU"]),
        ("precision=auto", str(info["precision=auto"]).split(" ")[0], "trainer's default"),
    ]
    for precision, (rate, n) in peaks.items():
        rows.append((f"matmul peak, {precision}", f"{rate:.1f} GFLOP/s", f"torch.mm, n={n}"))
    plan_rate = speeds["batch"] / speeds["plan_step"]
    rows.append(("seed plan's model, 32", f"{plan_rate:.1f} samples/s", "seed 001 as written"))
    for precision, f in speeds["precisions"].items():
        achieved = f["flops"] / f["step"] / 1e9
        share = achieved / peaks[precision][0]
        rows += [
            (
                f"train step, {precision}",
                f"{f['samples_per_second']:.1f} samples/s",
                f"batch {speeds['batch']}, median {f['step']:.3f} s",
            ),
            (
                "  / seed plan's model",
                f"{f['ratio_to_plan']:.2f}x",
                f"{f['ratio_same_precision']:.2f}x against it at {precision} too",
            ),
            ("  share of matmul peak", f"{100 * share:.0f}%", f"{achieved:.1f} GFLOP/s"),
        ]
    first = next(iter(speeds["precisions"].values()))
    flops_note = f"seed plan {first['plan_flops'] / 1e9:.2f}; FlopCounterMode, fwd+bwd"
    rows.append(("FLOPs per train step", f"{first['flops'] / 1e9:.2f} GFLOP", flops_note))
    rows.append(("  over torch.nn layers", f"{stock['speedup']:.2f}x", "same model, same machine"))
    c = compile_figures
    verdict = "pays" if c["pays"] else "does not pay"
    rows += [
        ("torch.compile, first step", f"+{c['compile_seconds']:.0f} s", "cold cache"),
        (
            "  compiled / eager step",
            f"{c['compiled_step']:.3f} / {c['eager_step']:.3f} s",
            f"at {c['precision']}",
        ),
        (
            "  break-even",
            f"{c['break_even_steps']:.0f} steps",
            f"{verdict} in a {c['run_steps']}-step {SEED000} run",
        ),
        ("epoch, vaelab.train", f"{loop['full']:.2f} s", "perf/epoch_seconds, epochs 1+"),
        ("epoch, bare loop", f"{loop['bare']:.2f} s", "same train steps, epochs 1+"),
        ("loop overhead", f"{100 * loop['overhead']:.0f}%", "validation, logging, checkpoints"),
        (
            "other processes' load",
            f"{first['other_cores']:.2f} / {loop['other_cores']:.2f} cores",
            "during (c) / (e)",
        ),
    ]
    return rows


def configure_logging() -> None:
    """The bench's own INFO lines to stdout; other loggers (train, MLflow) only from WARNING."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logging.basicConfig(level=logging.WARNING, handlers=[handler], force=True)
    log.setLevel(logging.INFO)
    for noisy in ("mlflow", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def log_precision_speeds(speeds: dict, peaks: dict[str, tuple[float, int]]) -> None:
    """Part (c)'s lines: each precision's step against the seed plan's model."""
    plan_rate = speeds["batch"] / speeds["plan_step"]
    for precision, f in speeds["precisions"].items():
        achieved = f["flops"] / f["step"] / 1e9
        log.info(
            "  %-10s vaelab %6.1f samples/s (median %.3f s, best %.3f s) = %.2fx the seed "
            "plan's %.1f samples/s at 32 (%.2fx its %.1f at %s); %.2f GFLOP per step = "
            "%.1f GFLOP/s = %.0f%% of the %s matmul peak",
            precision,
            f["samples_per_second"],
            f["step"],
            f["best"],
            f["ratio_to_plan"],
            plan_rate,
            f["ratio_same_precision"],
            f["plan_samples_per_second"],
            precision,
            f["flops"] / 1e9,
            achieved,
            100 * achieved / peaks[precision][0],
            precision,
        )


def main() -> None:
    """(a) the machine, (b) matmul peaks, (c) the seed 000 step per precision against the
    seed plan's model, (d) torch.compile, (e) loop overhead, (f) every model."""
    configure_logging()
    started = time.perf_counter()
    start_load = os.getloadavg()

    info = machine()
    log.info("(a) machine; load average at start %.2f %.2f %.2f", *start_load)
    for name, value in info.items():
        log.info("  %-24s %s", name, value)

    precisions = host_precisions()
    peaks = {p: matmul_peak(dtype=MATMUL_DTYPES[p]) for p in precisions}
    for precision, (rate, n) in peaks.items():
        dtype = str(MATMUL_DTYPES[precision]).removeprefix("torch.")
        log.info("(b) %s torch.mm peak (%s): %.1f GFLOP/s at n=%d", dtype, precision, rate, n)

    with tempfile.TemporaryDirectory(prefix="vaelab-bench-") as tmp:
        speeds = precision_speeds(Path(tmp), precisions, warmup=3, steps=20)
        log.info(
            "(c) %s train step (batch %d) per precision, timed in turns with the seed plan's "
            "own model (seed 001's code) on the same batches; other processes used %.2f cores",
            SEED000,
            speeds["batch"],
            next(iter(speeds["precisions"].values()))["other_cores"],
        )
        log_precision_speeds(speeds, peaks)
        busy = next(iter(speeds["precisions"].values()))["other_cores"]
        if busy > BUSY_CORES:
            # Two OpenMP threads wait at every barrier for a core another process holds: the
            # long step slows far more than the short one, and the ratios with it.
            log.warning(
                "    other processes used %.2f of %d cores during (c): its figures and ratios "
                "are not this host's; rerun `make bench` when it is idle",
                busy,
                os.cpu_count(),
            )
        fast_cfg = compose_experiment(SEED000, Path(tmp))
        stock_cfg = compose_experiment(SEED000, Path(tmp), ("model.stock_layers=true",))
        fast, stock = Parts(fast_cfg), Parts(stock_cfg)
        batches, epoch = bench_batches(fast, 3 + 12), float(fast.settings.epochs)
        times, _ = timed_steps({"fast": fast.step, "stock": stock.step}, batches, epoch, 3)
        fast_step, stock_step = (statistics.median(times[k]) for k in ("fast", "stock"))
        stock_figures = {"speedup": stock_step / fast_step}
        log.info(
            "    at %s, model.stock_layers=true (torch.nn's Conv1d, ConvTranspose1d, LeakyReLU "
            "and Dropout): median %.3f s against %.3f s; vaelab's layers are %.2fx faster",
            fast.precision.name,
            stock_step,
            fast_step,
            stock_figures["speedup"],
        )
        del fast, stock

        compile_figures = compile_cost(Path(tmp), warmup=3, steps=8)
    c = compile_figures
    log.info(
        "(d) torch.compile at %s: the first step took %.0f s more (cold cache); then %.3f s a "
        "step against %.3f s eager; break-even after %.0f steps, and a %s run takes %d: %s",
        c["precision"],
        c["compile_seconds"],
        c["compiled_step"],
        c["eager_step"],
        c["break_even_steps"],
        SEED000,
        c["run_steps"],
        "it pays here, set trainer.compile=true for long runs"
        if c["pays"]
        else "it does not pay here, trainer.compile=false (the default) is right",
    )

    loop = loop_overhead()
    log.info(
        "(e) %d patients, %d epochs: vaelab.train %s s per epoch (%.1f s in all), "
        "bare loop %s s per epoch",
        LOOP_PATIENTS,
        LOOP_EPOCHS,
        [round(s, 2) for s in loop["epochs_full"]],
        loop["train_seconds"],
        [round(s, 2) for s in loop["epochs_bare"]],
    )

    log.info("(f) every experiment's train step on its own data shape (median of 6)")
    every_model()

    end_load = os.getloadavg()
    log.info("load average at end %.2f %.2f %.2f", *end_load)
    rows = summary(
        (start_load[0], end_load[0]), info, peaks, speeds, stock_figures, compile_figures, loop
    )
    log.info("")
    log.info("%-26s %-24s %s", "figure", "this machine", "note")
    for name, value, note in rows:
        log.info("%-26s %-24s %s", name, value, note)
    log.info("bench took %.0f s", time.perf_counter() - started)


if __name__ == "__main__":
    main()
