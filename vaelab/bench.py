"""Throughput of the seed 000 multi-scale Conv1D VAE on this machine, and what the loop costs.

    python -m vaelab.bench          # make bench; a few minutes on 2 CPU cores

Reads top to bottom: the machine, its measured float32 matmul peak, one train step of the
seed 000 experiment (samples/s, FLOPs, share of that peak), the same model with torch.nn's
layers, the real training loop against a bare loop of the same steps, every experiment's
model on its own data shape, then one table. Every figure comes from the experiment configs
in conf/experiment/ and from `vaelab.loop.train_step`, the step the training loop takes, so
the bench cannot drift from what `python -m vaelab.train` runs. Figures go to stdout through
logging. `python -m vaelab.bench_sweep` measures the sweeps.
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
from omegaconf import DictConfig
from torch.utils.flop_counter import FlopCounterMode

from vaelab.config import build
from vaelab.data.prepare import PreparedData, prepare
from vaelab.loop import TrainerSettings, epoch_batches, train_step
from vaelab.runtime import cpu_model
from vaelab.train import train

log = logging.getLogger("vaelab.bench")

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
EXPERIMENTS = sorted(path.stem for path in (CONF_DIR / "experiment").glob("*.yaml"))
SEED000 = "multiscale_vitals"  # seed 000's model, data shape, batch, loss and optimiser

# The users' figures for the seed plan's own model on this kind of machine.
REFERENCE_SAMPLES_PER_SECOND = 200.0
REFERENCE_PEAK_SHARE = 0.22

# Part (d): the real loop, kept short; epoch 0 is warm-up and left out of the figures.
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


def compose_experiment(name: str, output_root: Path, overrides: tuple[str, ...] = ()) -> DictConfig:
    """experiment=name with few generated samples, on the CPU, writing under output_root."""
    base = [f"experiment={name}", f"paths.output_root={output_root}", "trainer.device=cpu"]
    with initialize_config_dir(config_dir=str(CONF_DIR)):  # Hydra 1.4: no version_base
        cfg = compose("train", overrides=[*base, *overrides])
    for key, count in FEW_SAMPLES.items():
        if key in cfg.dataset and f"dataset.{key}" not in " ".join(overrides):
            cfg.dataset[key] = count
    return cfg


class Parts:
    """An experiment's data, model, loss, β schedule, settings and optimiser, built from its
    config exactly as vaelab.train builds them."""

    def __init__(self, cfg: DictConfig) -> None:
        self.data: PreparedData = prepare(
            build(cfg.dataset), cfg.split.val_fraction, cfg.split.test_fraction, cfg.seed
        )
        torch.manual_seed(cfg.seed)
        self.model = build(cfg.model, input_shape=self.data.sampleset.sample_shape).train()
        self.loss_fn, self.beta_schedule = build(cfg.loss), build(cfg.schedule)
        self.settings: TrainerSettings = build(cfg.trainer)
        self.optimizer = self.settings.optimizer(self.model.parameters())

    def step(self, batch: torch.Tensor, epoch: float) -> None:
        """One vaelab.loop.train_step on these samples at this fractional epoch."""
        x, mask = self.data.values[batch], self.data.masks[batch]
        beta = self.beta_schedule(epoch)
        train_step(
            self.model, self.loss_fn, self.optimizer, x, mask, beta, epoch, self.settings.grad_clip
        )


def step_speed(cfg: DictConfig, warmup: int = 2, steps: int = 6, flops: bool = False) -> dict:
    """Median train step of the experiment at its batch size; its FLOPs too if asked.

    Batches are drawn with replacement from all samples: the figure is about the step, and the
    few generated samples may be fewer than one batch. The step runs at the last epoch, where
    every schedule has settled (β, capacity, DIP λ at their final values).
    """
    parts = Parts(cfg)
    batch_size, epoch = parts.settings.batch_size, float(parts.settings.epochs)
    generator = torch.Generator().manual_seed(0)
    batches = [
        torch.randint(len(parts.data.values), (batch_size,), generator=generator)
        for _ in range(warmup + steps)
    ]
    load = OtherLoad()
    seconds = []
    for i, batch in enumerate(batches):
        if i == warmup:
            load.start()
        started = time.perf_counter()
        parts.step(batch, epoch)
        if i >= warmup:
            seconds.append(time.perf_counter() - started)
    figures = {
        "model": cfg.model._target_.rsplit(".", 1)[-1],
        "shape": "x".join(str(n) for n in parts.data.sampleset.sample_shape),
        "batch": batch_size,
        "parameters": sum(p.numel() for p in parts.model.parameters()),
        "step": statistics.median(seconds),
        "best": min(seconds),
        "samples_per_second": batch_size / statistics.median(seconds),
        "other_cores": load.stop(),
    }
    if flops:
        # Counts the matmuls and convolutions of forward and backward, 2 FLOPs per multiply-add.
        with FlopCounterMode(display=False) as counter:
            parts.step(batches[0], epoch)
        figures["flops"] = counter.get_total_flops()
    return figures


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
    """Part (e): step_speed for each experiment of conf/experiment/."""
    figures = {}
    with tempfile.TemporaryDirectory(prefix="vaelab-bench-") as tmp:
        for name in EXPERIMENTS:
            f = figures[name] = step_speed(compose_experiment(name, Path(tmp)))
            log.info(
                "  %-22s %-20s %-12s batch %-4d %9d params  %7.3f s/step  %8.1f samples/s",
                name,
                f["model"],
                f["shape"],
                f["batch"],
                f["parameters"],
                f["step"],
                f["samples_per_second"],
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
    achieved = step["flops"] / step["step"] / 1e9
    reference_share = f"reference ~{100 * REFERENCE_PEAK_SHARE:.0f}%"
    return [
        ("load average start / end", f"{loads[0]:.2f} / {loads[1]:.2f}", "1-minute"),
        ("torch threads, version", f"{info['torch threads']}, {info['torch']}", info["CPU"]),
        ("matmul peak (float32)", f"{peak_rate:.1f} GFLOP/s", f"torch.mm, n={peak_n}"),
        (
            f"train step, batch {step['batch']}",
            f"{step['samples_per_second']:.1f} samples/s",
            f"reference ~{REFERENCE_SAMPLES_PER_SECOND:.0f} samples/s",
        ),
        ("  median step", f"{step['step']:.3f} s", f"best {step['best']:.3f} s"),
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

    with tempfile.TemporaryDirectory(prefix="vaelab-bench-") as tmp:
        step = step_speed(compose_experiment(SEED000, Path(tmp)), warmup=3, steps=20, flops=True)
        stock_cfg = compose_experiment(SEED000, Path(tmp), ("model.stock_layers=true",))
        stock = step_speed(stock_cfg, warmup=3, steps=20)
    log.info(
        "(c) %s train step (%s %s, batch %d): median %.3f s (best %.3f s) = %.1f samples/s, "
        "%.2f GFLOP per step = %.1f GFLOP/s; other processes used %.2f cores meanwhile",
        SEED000,
        step["model"],
        step["shape"],
        step["batch"],
        step["step"],
        step["best"],
        step["samples_per_second"],
        step["flops"] / 1e9,
        step["flops"] / step["step"] / 1e9,
        step["other_cores"],
    )
    step["speedup"] = stock["step"] / step["step"]
    log.info(
        "    the same model with model.stock_layers=true (torch.nn's ConvTranspose1d and "
        "Dropout): median %.3f s = %.1f samples/s; vaelab's layers are %.2fx faster",
        stock["step"],
        stock["samples_per_second"],
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
