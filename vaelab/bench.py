"""Throughput of the seed 000 multi-scale Conv1D VAE on this machine, and what the loop costs.

    python -m vaelab.bench          # make bench; about 1-3 minutes on 2 CPU cores

Reads top to bottom: the machine, its measured float32 matmul peak, one train step of the
seed 000 model (samples/s, FLOPs, share of that peak), the real training loop against a bare
loop of the same steps, every experiment's model on its own data shape, then one table.
Figures go to stdout through logging. `python -m vaelab.bench_sweep` measures the sweeps.
"""

import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import execution_whitelist
from omegaconf import DictConfig
from torch.utils.flop_counter import FlopCounterMode

from vaelab.data.prepare import prepare
from vaelab.losses import ElboLoss
from vaelab.models.multiscale_conv1d import (
    Dropout,
    MultiScaleConv1DVAE,
    PolyphaseConvTranspose1d,
)
from vaelab.settings import TRUSTED_TARGETS
from vaelab.train import build, train

log = logging.getLogger("vaelab.bench")

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"

# Seed 000: 745 hourly steps x 7 vitals, batch 64, and its model, loss and optimiser settings.
INPUT_SHAPE = (745, 7)
BATCH_SIZE = 64
LATENT_DIM, BASE_CHANNELS, DROPOUT = 32, 64, 0.2
FREE_BITS, BRANCH_WEIGHT, BETA = 2.0, 0.8, 0.5
GRAD_CLIP, LR = 5.0, 1e-3

# The users' figures for the seed plan's own model on this kind of machine.
REFERENCE_SAMPLES_PER_SECOND = 200.0
REFERENCE_PEAK_SHARE = 0.22

# Part (d): the real loop, kept short; epoch 0 is warm-up and left out of the figures.
LOOP_PATIENTS, LOOP_EPOCHS = 200, 3

# Part (e): every model at its experiment's data shape, batch size, loss and schedule. Only the
# number of generated samples is cut (the shape of one sample is what a step costs).
EXPERIMENTS = (
    "multiscale_vitals",
    "quick",
    "lstm_vitals_baseline",
    "conv_lstm_vitals",
    "vqvae_vitals",
    "kmer_mlp",
    "mri3d_baseline",
    "mri3d_dipvae",
    "digits",
    "mnist1d",
)
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


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, or 'unknown'."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"


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
    """Threads, cores, torch version, CPU model and the Conv1d kernel."""
    return {
        "torch threads": torch.get_num_threads(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "CPU": cpu_model(),
        "Conv1d kernel": conv1d_backend(),
    }


def matmul_peak(sizes: tuple[int, ...] = (1024, 2048), repeats: int = 5) -> tuple[float, int]:
    """Best sustained float32 torch.mm GFLOP/s (2·n³ FLOPs per product) and the n reaching it."""
    best, best_n = 0.0, sizes[0]
    for n in sizes:
        a, b, out = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
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


def seed000_model(stock_layers: bool = False) -> MultiScaleConv1DVAE:
    """The seed 000 multi-scale Conv1D VAE, in training mode.

    With stock_layers its faster transposed convolutions and dropout become the torch.nn
    classes they subclass (same parameters, same outputs to float32 rounding): the same model
    as torch alone runs it, for a like-for-like speed-up on this machine.
    """
    model = MultiScaleConv1DVAE(INPUT_SHAPE, LATENT_DIM, BASE_CHANNELS, DROPOUT)
    if stock_layers:
        for module in model.modules():
            if isinstance(module, PolyphaseConvTranspose1d):
                module.__class__ = torch.nn.ConvTranspose1d
            elif isinstance(module, Dropout):
                module.__class__ = torch.nn.Dropout
    return model.train()


def train_step(
    model,
    loss_fn,
    optimizer,
    x: torch.Tensor,
    mask: torch.Tensor,
    beta: float = BETA,
    grad_clip: float | None = GRAD_CLIP,
    epoch: float = 0.0,
) -> None:
    """One optimiser step as vaelab.train takes it: forward, loss at β, backward, clip, step.

    The defaults are seed 000's β and clipping.
    """
    terms = loss_fn(model(x), x, mask, beta, epoch)
    optimizer.zero_grad(set_to_none=True)
    terms.total.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()


def step_speed(warmup: int = 3, steps: int = 20, stock_layers: bool = False) -> dict[str, float]:
    """Median train-step time at batch 64 and the FLOPs of one step (FlopCounterMode)."""
    torch.manual_seed(0)
    model = seed000_model(stock_layers)
    loss_fn = ElboLoss(free_bits=FREE_BITS, branch_weight=BRANCH_WEIGHT)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    x = torch.randn(BATCH_SIZE, *INPUT_SHAPE)
    mask = (torch.rand(BATCH_SIZE, *INPUT_SHAPE) > 0.05).float()  # 5% missing, as generated
    for _ in range(warmup):
        train_step(model, loss_fn, optimizer, x, mask)
    load = OtherLoad()
    load.start()
    seconds = []
    for _ in range(steps):
        started = time.perf_counter()
        train_step(model, loss_fn, optimizer, x, mask)
        seconds.append(time.perf_counter() - started)
    other_cores = load.stop()
    # Counts the matmuls and convolutions of forward and backward, 2 FLOPs per multiply-add.
    with FlopCounterMode(display=False) as counter:
        train_step(model, loss_fn, optimizer, x, mask)
    return {
        "median": statistics.median(seconds),
        "best": min(seconds),
        "flops": counter.get_total_flops(),
        "other_cores": other_cores,
    }


def compose_loop_config(output_root: Path) -> DictConfig:
    """The train config of part (d): seed 000's experiment, 200 patients, 3 epochs, temp store."""
    overrides = [
        "experiment=multiscale_vitals",
        f"paths.output_root={output_root}",
        f"dataset.n_patients={LOOP_PATIENTS}",
        f"dataset.seq_len={INPUT_SHAPE[0]}",
        f"trainer.epochs={LOOP_EPOCHS}",
        "trainer.patience=null",
        "trainer.device=cpu",
        f"trainer.batch_size={BATCH_SIZE}",
        f"trainer.lr={LR}",
        f"trainer.grad_clip={GRAD_CLIP}",
        f"model.latent_dim={LATENT_DIM}",
        f"model.base_channels={BASE_CHANNELS}",
        f"model.dropout={DROPOUT}",
        f"loss.free_bits={FREE_BITS}",
        f"loss.branch_weight={BRANCH_WEIGHT}",
        f"schedule.beta={BETA}",
        "evaluation.downstream=false",  # after the epochs, so outside the figures; saves time
        "run_name=bench",
    ]
    with initialize_config_dir(config_dir=str(CONF_DIR)):  # Hydra 1.4: no version_base
        return compose("train", overrides=overrides)


def full_loop_epochs(cfg: DictConfig, run_dir: Path) -> list[float]:
    """Run vaelab.train.train and read back its perf/epoch_seconds from the MLflow store."""
    train(cfg, run_dir)
    client = mlflow.MlflowClient(tracking_uri=cfg.tracking.uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    run = client.search_runs([experiment.experiment_id], order_by=["start_time DESC"])[0]
    history = client.get_metric_history(run.info.run_id, "perf/epoch_seconds")
    return [metric.value for metric in sorted(history, key=lambda m: m.step)]


def bare_loop_epochs(cfg: DictConfig) -> list[float]:
    """Seconds per epoch of the same train steps on the same data, and nothing else."""
    with execution_whitelist(list(TRUSTED_TARGETS)):
        dataset = build(cfg.dataset)
    data = prepare(dataset, cfg.split.val_fraction, cfg.split.test_fraction, cfg.seed)
    train_index = data.indices("train")
    steps_per_epoch = max(len(train_index) // BATCH_SIZE, 1)  # as vaelab.train counts them
    torch.manual_seed(cfg.seed)
    model = seed000_model()
    loss_fn = ElboLoss(free_bits=FREE_BITS, branch_weight=BRANCH_WEIGHT)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    epochs = []
    for _ in range(LOOP_EPOCHS):
        started = time.perf_counter()
        order = train_index[torch.randperm(len(train_index))]
        for step in range(steps_per_epoch):
            batch = order[step * BATCH_SIZE : (step + 1) * BATCH_SIZE]
            train_step(model, loss_fn, optimizer, data.values[batch], data.masks[batch])
        epochs.append(time.perf_counter() - started)
    return epochs


def loop_overhead() -> dict[str, object]:
    """Seconds per epoch (epoch 0 left out) of vaelab.train's loop and of a bare loop."""
    load = OtherLoad()
    with tempfile.TemporaryDirectory(prefix="vaelab-bench-") as tmp:
        cfg = compose_loop_config(Path(tmp) / "multirun")
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


def compose_experiment(name: str, output_root: Path) -> DictConfig:
    """experiment=name with few generated samples, on the CPU, writing under output_root."""
    overrides = [f"experiment={name}", f"paths.output_root={output_root}", "trainer.device=cpu"]
    with initialize_config_dir(config_dir=str(CONF_DIR)):
        cfg = compose("train", overrides=overrides)
    for key, count in FEW_SAMPLES.items():
        if key in cfg.dataset:
            cfg.dataset[key] = count
    return cfg


def experiment_step_speed(cfg: DictConfig, warmup: int = 2, steps: int = 6) -> dict[str, object]:
    """Median train step of the experiment's model, loss and optimiser at its batch size.

    Batches are drawn with replacement from all samples: the figure is about the step, and the
    few generated samples may be fewer than one batch.
    """
    with execution_whitelist(list(TRUSTED_TARGETS)):
        data = prepare(build(cfg.dataset), cfg.split.val_fraction, cfg.split.test_fraction, 0)
        torch.manual_seed(cfg.seed)
        model = build(cfg.model, input_shape=data.sampleset.sample_shape).train()
        loss_fn, schedule, trainer = build(cfg.loss), build(cfg.schedule), build(cfg.trainer)
    optimizer = trainer.optimizer(model.parameters())
    beta, progress = schedule(float(trainer.epochs)), float(trainer.epochs)
    seconds = []
    for step in range(warmup + steps):
        batch = torch.randint(len(data.values), (trainer.batch_size,))
        x, mask = data.values[batch], data.masks[batch]
        started = time.perf_counter()
        train_step(model, loss_fn, optimizer, x, mask, beta, trainer.grad_clip, progress)
        if step >= warmup:
            seconds.append(time.perf_counter() - started)
    median = statistics.median(seconds)
    return {
        "model": cfg.model._target_.rsplit(".", 1)[-1],
        "shape": "x".join(str(n) for n in data.sampleset.sample_shape),
        "batch": trainer.batch_size,
        "parameters": sum(p.numel() for p in model.parameters()),
        "step": median,
        "samples_per_second": trainer.batch_size / median,
    }


def every_model() -> dict[str, dict[str, object]]:
    """Part (e): experiment_step_speed for each of EXPERIMENTS."""
    figures = {}
    with tempfile.TemporaryDirectory(prefix="vaelab-bench-") as tmp:
        for name in EXPERIMENTS:
            figures[name] = experiment_step_speed(compose_experiment(name, Path(tmp)))
            log.info(
                "  %-22s %-20s %-12s batch %-4d %9d params  %7.3f s/step  %8.1f samples/s",
                name,
                figures[name]["model"],
                figures[name]["shape"],
                figures[name]["batch"],
                figures[name]["parameters"],
                figures[name]["step"],
                figures[name]["samples_per_second"],
            )
    return figures


def summary(
    loads: tuple[float, float],
    info: dict[str, object],
    peak: tuple[float, int],
    step: dict,
    loop: dict,
) -> list[tuple[str, str, str]]:
    """The final table: (figure, value on this machine, note) rows."""
    peak_rate, peak_n = peak
    samples_per_second = BATCH_SIZE / step["median"]
    achieved = step["flops"] / step["median"] / 1e9
    reference_share = f"reference ~{100 * REFERENCE_PEAK_SHARE:.0f}%"
    return [
        ("load average start / end", f"{loads[0]:.2f} / {loads[1]:.2f}", "1-minute"),
        ("torch threads, version", f"{info['torch threads']}, {info['torch']}", info["CPU"]),
        ("matmul peak (float32)", f"{peak_rate:.1f} GFLOP/s", f"torch.mm, n={peak_n}"),
        (
            "train step, batch 64",
            f"{samples_per_second:.1f} samples/s",
            f"reference ~{REFERENCE_SAMPLES_PER_SECOND:.0f} samples/s",
        ),
        ("  median step", f"{step['median']:.3f} s", f"best {step['best']:.3f} s"),
        ("  over torch.nn layers", f"{step['speedup']:.2f}x", "same model, same machine"),
        ("FLOPs per train step", f"{step['flops'] / 1e9:.2f} GFLOP", "FlopCounterMode, fwd+bwd"),
        ("achieved", f"{achieved:.1f} GFLOP/s", ""),
        ("share of matmul peak", f"{100 * achieved / peak_rate:.0f}%", reference_share),
        ("epoch, vaelab.train", f"{loop['full']:.2f} s", "perf/epoch_seconds, epochs 1+"),
        ("epoch, bare loop", f"{loop['bare']:.2f} s", "same train steps, epochs 1+"),
        ("loop overhead", f"{100 * loop['overhead']:.0f}%", "validation, logging, checkpoints"),
        (
            "other processes' load",
            f"{step['other_cores']:.2f} / {loop['other_cores']:.2f} cores",
            "during (c) / (d)",
        ),
    ]


def configure_logging() -> None:
    """The bench's own INFO lines to stdout; other loggers (train, MLflow) only from WARNING."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logging.basicConfig(level=logging.WARNING, handlers=[handler], force=True)
    log.setLevel(logging.INFO)
    for noisy in ("mlflow", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main() -> None:
    """(a) the machine, (b) matmul peak, (c) one train step, (d) loop overhead, (e) models."""
    configure_logging()
    started = time.perf_counter()
    start_load = os.getloadavg()

    info = machine()
    log.info("(a) machine; load average at start %.2f %.2f %.2f", *start_load)
    for name, value in info.items():
        log.info("  %-24s %s", name, value)

    peak = matmul_peak()
    log.info("(b) float32 torch.mm peak: %.1f GFLOP/s at n=%d (best of repeats)", *peak)

    step = step_speed()
    log.info(
        "(c) train step at batch %d: median %.3f s (best %.3f s) = %.1f samples/s, "
        "%.2f GFLOP per step = %.1f GFLOP/s; other processes used %.2f cores meanwhile",
        BATCH_SIZE,
        step["median"],
        step["best"],
        BATCH_SIZE / step["median"],
        step["flops"] / 1e9,
        step["flops"] / step["median"] / 1e9,
        step["other_cores"],
    )
    stock = step_speed(stock_layers=True)
    step["speedup"] = stock["median"] / step["median"]
    log.info(
        "    the same model with torch.nn's ConvTranspose1d and Dropout: median %.3f s "
        "= %.1f samples/s; vaelab's layers are %.2fx faster",
        stock["median"],
        BATCH_SIZE / stock["median"],
        step["speedup"],
    )

    loop = loop_overhead()
    log.info(
        "(d) %d patients, %d epochs: vaelab.train %s s per epoch (%.1f s in all), "
        "bare loop %s s per epoch",
        LOOP_PATIENTS,
        LOOP_EPOCHS,
        [round(s, 2) for s in loop["epochs_full"]],
        loop["train_seconds"],
        [round(s, 2) for s in loop["epochs_bare"]],
    )

    log.info("(e) every experiment's train step on its own data shape (median of 6)")
    every_model()

    end_load = os.getloadavg()
    log.info("load average at end %.2f %.2f %.2f", *end_load)
    rows = summary((start_load[0], end_load[0]), info, peak, step, loop)
    log.info("")
    log.info("%-26s %-24s %s", "figure", "this machine", "note")
    for name, value, note in rows:
        log.info("%-26s %-24s %s", name, value, note)
    log.info("bench took %.0f s", time.perf_counter() - started)


if __name__ == "__main__":
    main()
