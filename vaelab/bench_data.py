"""What streaming a data set larger than memory costs (issue 12 part 4), on this machine.

    python -m vaelab.bench_data     # make bench; 1.5 min on 2 CPU cores (load 5 from others)

(a) Peak memory. A generated volumes file of 600 subjects of 4 x 32³ float32 (300 MB) is
trained on for one epoch under dataset.memory_budget_mb=64, by `python -m vaelab.train` in a
subprocess that reports its own peak resident set at exit (getrusage RUSAGE_SELF, i.e.
VmHWM), with dataset.num_workers=auto (no worker on a CPU-only machine) and with 2 workers.
Workers are forks, whose RSS counts the pages they share with the run, so their private
memory (USS) is sampled with psutil (a dev dependency, as make installs), summed over the
live workers. The same run on a 16-subject file (8 MB), in memory, is "the model":
interpreter, libraries, weights, optimiser, activations, and that little data. The goal: the
streamed run's peak, workers included, is under that baseline plus the budget.
(b) Throughput on a file that fits (96 subjects, 48 MB), streamed against in memory:
training steps as `vaelab.train` takes them (`epoch_batches`, `values[batch]`,
`train_step`); the same steps with the epoch's batches read ahead by 2 DataLoader workers
(`streaming.EpochReads`, which vaelab.train does not use yet); and a full pass in order, as
the latents at the end are written (`encode_all`). Rounds rotate the modes, so that load
from other processes falls on all of them; the goal is a median ratio >= 0.9. The model is a
small MLP, whose step is cheap: reading is the largest share of a step it can be.
(c) The seed 004 model's step (mri3d_baseline's conv3d) against the read of its batch, for
the ratio a 3D convolutional model sees.

Everything runs on one torch thread: on a shared 2-core machine a second OpenMP thread mostly
waits at barriers for a core another process holds (tests/conftest.py, one_thread), which
made the MLP's step 6x slower. Figures go to stdout through logging, with the load average.
"""

import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from vaelab.artifacts import encode_all
from vaelab.config import build
from vaelab.data.prepare import PreparedData, prepare
from vaelab.data.streaming import MB, EpochReads
from vaelab.data.volumes import load_volumes, write_volumes
from vaelab.loop import epoch_batches, train_step

log = logging.getLogger("vaelab.bench_data")

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
SIZE = 32  # voxels per side: 4 x 32³ float32 = 0.5 MB a subject
# The baseline's file is small, so that it holds little data (values, masks of ones and the
# normalised copy: 3 x 8 MB), and big enough for batches of 8 (12 training subjects).
BIG_SUBJECTS, SMALL_SUBJECTS, FITTING_SUBJECTS = 600, 16, 96
BUDGET_MB = 64
ROUNDS = 3  # rounds of (b), after one warm-up round
SAMPLE_SECONDS = 0.1  # how often the workers' private memory is sampled
# A small model, so that reading is as large a share of a step as it gets.
MODEL = ["model=mlp", "model.hidden_dims=[16]", "model.latent_dim=8"]
RUN = [
    *MODEL,
    "dataset=volumes",
    f"dataset.memory_budget_mb={BUDGET_MB}",
    "trainer.epochs=1",
    "trainer.batch_size=8",
    "trainer.min_steps_per_epoch=1",  # batches of 8 in the baseline's small split too
    "trainer.device=cpu",
    "trainer.num_threads=1",
    "evaluation.downstream=false",  # its PCA baseline loads every input (see README)
    "evaluation.iwae_samples=0",
    "tracking.experiment=bench_data",
]
# Run vaelab.train in this process and print its own peak RSS and its workers' at exit.
PEAK_RSS_RUNNER = """
import atexit, json, resource, runpy, sys
def report():
    own, kids = (resource.getrusage(who).ru_maxrss for who in
                 (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    print("PEAK_RSS_KB " + json.dumps({"self": own, "workers": kids}), flush=True)
atexit.register(report)
sys.argv = ["vaelab.train", *sys.argv[1:]]
runpy.run_module("vaelab.train", run_name="__main__")
"""


class WorkersMemory:
    """The peak of the summed private memory (USS) of a process's children, sampled."""

    def __init__(self, pid: int) -> None:
        self.process, self.peak = psutil.Process(pid), 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._done.wait(SAMPLE_SECONDS):
            total = 0
            try:
                for child in self.process.children(recursive=True):
                    total += child.memory_full_info().uss
            except psutil.Error:  # a worker ended between the listing and the reading
                continue
            self.peak = max(self.peak, total)

    def stop(self) -> int:
        """Stop sampling; the peak in bytes."""
        self._done.set()
        self._thread.join()
        return self.peak


def peak_rss(path: Path, root: Path, name: str, *overrides: str) -> dict[str, float]:
    """One training run on `path`: its process's peak RSS and its workers' peak private
    memory, in MB, and its wall time."""
    command = [
        sys.executable,
        "-c",
        PEAK_RSS_RUNNER,
        *RUN,
        f"dataset.path={path}",
        f"paths.output_root={root}",
        f"hydra.run.dir={root / 'runs' / name}",
        *overrides,
    ]
    started = time.perf_counter()
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as process:
        workers = WorkersMemory(process.pid)
        stdout, stderr = process.communicate(timeout=1200)
        workers_peak = workers.stop()
    seconds = time.perf_counter() - started
    if process.returncode != 0:
        raise RuntimeError(f"the {name} run failed:\n{stderr[-3000:]}")
    line = next(x for x in stdout.splitlines() if x.startswith("PEAK_RSS_KB "))
    kb = json.loads(line.removeprefix("PEAK_RSS_KB "))
    return {"self": kb["self"] / 1024, "workers": workers_peak / MB, "seconds": seconds}


def compose_run(root: Path) -> DictConfig:
    """The train config of the runs above, for the in-process throughput figures."""
    with initialize_config_dir(config_dir=str(CONF_DIR)):
        return compose("train", overrides=[*RUN, f"paths.output_root={root}"])


class Steps:
    """The model, loss and optimiser of the runs, taking training steps on prepared data as
    vaelab.train does: shuffled batches, values[batch] and masks[batch], train_step."""

    def __init__(self, cfg: DictConfig, shape: tuple[int, ...]) -> None:
        torch.manual_seed(0)
        self.model = build(cfg.model, input_shape=shape).train()
        self.loss_fn = build(cfg.loss, n_channels=shape[0], channel_axis=1)
        self.settings = build(cfg.trainer)
        self.optimizer = self.settings.optimizer(self.model.parameters())

    def epoch(self, data: PreparedData, read_ahead: bool = False) -> float:
        """Samples per second of one epoch of training steps, each batch read when its step
        asks for it (as vaelab.train reads), or read ahead by EpochReads."""
        values, masks = data.values, data.masks
        batches = epoch_batches(data.indices("train"), self.settings.batch_size)
        started = time.perf_counter()
        if read_ahead:
            pairs = iter(EpochReads(values, masks, batches))
        else:
            pairs = ((values[batch], masks[batch]) for batch in batches)
        for x, mask in pairs:
            train_step(self.model, self.loss_fn, self.optimizer, x, mask, 1.0, 0.0, None)
        return len(batches) * self.settings.batch_size / (time.perf_counter() - started)

    def full_pass(self, data: PreparedData) -> float:
        """Samples per second of encoding every sample in order (the latents at the end)."""
        started = time.perf_counter()
        encode_all(self.model, data.values, self.settings.batch_size, torch.device("cpu"))
        self.model.train()
        return len(data.values) / (time.perf_counter() - started)


# (b)'s modes: which prepared data (dataset.num_workers), read how.
MODES = {
    "memory": ("memory", False),
    "streamed": ("streamed", False),
    "read ahead": ("workers", True),
}


def throughput(path: Path, root: Path) -> tuple[dict[str, dict[str, list[float]]], float]:
    """Samples/s of training steps per mode and of a full pass (in memory, streamed), per
    round; and the seconds a streamed batch takes to read, check and normalise."""
    cfg = compose_run(root)
    data = {"memory": prepare(load_volumes(path, in_memory=True), 0.15, 0.15, seed=0)}
    for name, workers in (("streamed", "auto"), ("workers", 2)):
        samples = load_volumes(
            path, in_memory=False, memory_budget_mb=BUDGET_MB, num_workers=workers
        )
        data[name] = prepare(samples, 0.15, 0.15, seed=0)
    steps = Steps(cfg, data["memory"].sampleset.sample_shape)
    train = {mode: [] for mode in MODES}
    full_pass = {"memory": [], "streamed": []}
    for round_ in range(ROUNDS + 1):
        names = list(MODES)
        for mode in names[round_ % 3 :] + names[: round_ % 3]:  # rotate the order
            which, read_ahead = MODES[mode]
            speed = steps.epoch(data[which], read_ahead)
            if round_ > 0:  # round 0 warms up: page cache, allocator, oneDNN kernels
                train[mode].append(speed)
        for which in full_pass:
            speed = steps.full_pass(data[which])
            if round_ > 0:
                full_pass[which].append(speed)
    batch = torch.arange(steps.settings.batch_size)
    reads = []
    for _ in range(5):
        started = time.perf_counter()
        data["streamed"].values[batch]
        reads.append(time.perf_counter() - started)
    return {"train": train, "pass": full_pass}, statistics.median(reads)


def conv3d_step(root: Path) -> float:
    """Median seconds of a train step of mri3d_baseline's conv3d model on a batch of 8."""
    with initialize_config_dir(config_dir=str(CONF_DIR)):
        overrides = ["experiment=mri3d_baseline", "trainer.device=cpu"]
        cfg = compose("train", overrides=[*overrides, f"paths.output_root={root}"])
    shape = (4, SIZE, SIZE, SIZE)
    torch.manual_seed(0)
    model = build(cfg.model, input_shape=shape).train()
    loss_fn = build(cfg.loss, n_channels=4, channel_axis=1)
    optimizer = build(cfg.trainer).optimizer(model.parameters())
    x = torch.randn(cfg.trainer.batch_size, *shape)
    seconds = []
    for _ in range(3):  # the first warms up
        started = time.perf_counter()
        train_step(model, loss_fn, optimizer, x, torch.ones_like(x), 1.0, 0.0, None)
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds[1:])


def configure_logging() -> None:
    """The bench's own INFO lines to stdout; other loggers only from WARNING."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logging.basicConfig(level=logging.WARNING, handlers=[handler], force=True)
    log.setLevel(logging.INFO)


def main() -> None:
    """(a) peak memory of a streamed run against its budget, (b) streamed/in-memory speed."""
    configure_logging()
    torch.set_num_threads(1)  # as the runs' trainer.num_threads=1: see the module docstring
    started = time.perf_counter()
    log.info("load average at start %.2f %.2f %.2f on %d cores", *os.getloadavg(), os.cpu_count())
    with tempfile.TemporaryDirectory(prefix="vaelab-bench-data-") as tmp:
        root = Path(tmp)
        big, small, fitting = root / "big.h5", root / "small.h5", root / "fitting.h5"
        write_volumes(big, BIG_SUBJECTS, size=SIZE, seed=0)
        write_volumes(small, SMALL_SUBJECTS, size=SIZE, seed=1)
        write_volumes(fitting, FITTING_SUBJECTS, size=SIZE, seed=2)
        size_mb = big.stat().st_size / MB

        baseline = peak_rss(small, root, "baseline")
        streamed = peak_rss(big, root, "streamed")  # in_memory=auto: 300 MB > 64 MB streams
        workers = peak_rss(big, root, "workers", "dataset.num_workers=2")
        log.info(
            "(a) peak RSS, one epoch of a %d-subject 4x%d³ file (%.0f MB, %.1fx the budget of "
            "%d MB):",
            BIG_SUBJECTS,
            SIZE,
            size_mb,
            size_mb / BUDGET_MB,
            BUDGET_MB,
        )
        log.info(
            "  baseline: %d subjects in memory %6.0f MB (%.0f s)",
            SMALL_SUBJECTS,
            baseline["self"],
            baseline["seconds"],
        )
        for name, run in (("streamed, num_workers=auto", streamed), ("2 workers", workers)):
            over = run["self"] + run["workers"] - baseline["self"]
            log.info(
                "  %-27s %6.0f MB + workers' private %3.0f MB (%.0f s): %+.0f MB over the "
                "baseline, goal under the budget of %d MB: %s",
                name,
                run["self"],
                run["workers"],
                run["seconds"],
                over,
                BUDGET_MB,
                "met" if over <= BUDGET_MB else "NOT met",
            )

        figures, read_seconds = throughput(fitting, root)
        step_seconds = conv3d_step(root)
    log.info(
        "(b) %d subjects (%.0f MB, fit in memory), MLP batch 8, samples/s, median of %d rounds:",
        FITTING_SUBJECTS,
        FITTING_SUBJECTS * 4 * SIZE**3 * 4 / MB,
        ROUNDS,
    )
    rows = [
        ("training steps, as vaelab.train reads", "train", "streamed", True),
        ("training steps, read ahead by 2 workers", "train", "read ahead", False),
        ("full pass in order (latents.h5)", "pass", "streamed", False),
    ]
    for what, kind, mode, goal in rows:
        memory = statistics.median(figures[kind]["memory"])
        stream = statistics.median(figures[kind][mode])
        ratios = [s / m for s, m in zip(figures[kind][mode], figures[kind]["memory"], strict=True)]
        verdict = f", goal >= 0.9: {'met' if stream / memory >= 0.9 else 'NOT met'}" if goal else ""
        log.info(
            "  %-40s streamed %6.1f, in memory %6.1f: ratio %.2f (rounds %s)%s",
            what,
            stream,
            memory,
            stream / memory,
            ", ".join(f"{r:.2f}" for r in ratios),
            verdict,
        )
    log.info(
        "(c) reading a streamed batch of 8 (read, check, z-score, normalise): %.1f ms; a "
        "train step of mri3d_baseline's conv3d on 8 subjects of 4x%d³: %.2f s; reading as "
        "vaelab.train does leaves it %.3f of its in-memory speed",
        read_seconds * 1000,
        SIZE,
        step_seconds,
        step_seconds / (step_seconds + read_seconds),
    )
    log.info(
        "load average at end %.2f %.2f %.2f; %.0f s in all",
        *os.getloadavg(),
        time.perf_counter() - started,
    )


if __name__ == "__main__":
    main()
