"""Benchmarks of the sweep machinery: real Hydra multiruns in a temporary output root.

    python -m vaelab.bench_sweep            # part of `make bench`

- per-trial overhead of sweeper + launcher + MLflow parent/child, on trials that do
  almost nothing (one epoch of a tiny MLP on 8 patients);
- per-trial cost of one-epoch digits trials, the sweep machinery and the job's bookkeeping
  (MLflow run, data, diagnostics, log p(x), latents, checkpoints): (T(10 trials) − T(2
  trials)) / 8, on the default stores or on a given Optuna storage and MLflow tracking URI;
- the same on PostgreSQL and an MLflow tracking server (vaelab.server), when a PostgreSQL
  server answers at VAELAB_BENCH_POSTGRES (default postgresql+psycopg://postgres@127.0.0.1);
- the quick sweep with and without pruning: wall time and the best feasible AU each finds;
- one sweep worker against two asynchronous workers on one study: trials per minute;
- the storage load test: 16 workers of trivial trials on one PostgreSQL study, trials per
  second.
"""

import argparse
import contextlib
import itertools
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import optuna

from vaelab.server import serving, temporary_database
from vaelab.sweep.storage import open_storage
from vaelab.sweep.summary import is_feasible

log = logging.getLogger(__name__)

NOTHING_TRIAL = [
    "hparams_search=quick",
    "model=mlp",
    "model.hidden_dims=[8]",
    "dataset.n_patients=12",
    "dataset.seq_len=16",
    "trainer.epochs=1",
    "trainer.batch_size=4",
    "sweep/pruner=none",
]
# One-epoch trials of the digits experiment over its own search space (collapse): the epoch
# is ~0.1 s, so what a trial costs beyond it is the sweep's and the job's bookkeeping.
DIGITS_TRIAL = ["experiment=digits", "trainer.epochs=1", "sweep/pruner=none"]


def sweep_command(root: Path, study: str, overrides: list[str]) -> list[str]:
    """`python -m vaelab.train --multirun` of one study, writing under root."""
    return [
        sys.executable,
        "-m",
        "vaelab.train",
        "--multirun",
        f"paths.output_root={root}",
        f"hydra.sweeper.study_name={study}",
        *overrides,
    ]


def run_sweep(root: Path, study: str, overrides: list[str]) -> float:
    """Wall seconds of one sweep writing under root."""
    command = sweep_command(root, study, overrides)
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"sweep {study} failed:\n{result.stderr[-3000:]}")
    return time.perf_counter() - started


def journal(root: Path, study: str) -> str:
    """The journal file of a study of a sweep writing under root (the default storage)."""
    return str(root / "optuna" / f"{study}.journal")


def study_trials(storage: str, study: str) -> list[optuna.trial.FrozenTrial]:
    """The trials of a study in an Optuna storage (a journal file or a database URL)."""
    return optuna.load_study(study_name=study, storage=open_storage(storage)).get_trials()


def trial_seconds(trials: list[optuna.trial.FrozenTrial]) -> float:
    """Sum of the trials' own wall time (start to finish), seconds."""
    return sum((t.datetime_complete - t.datetime_start).total_seconds() for t in trials)


def best_feasible_au(trials: list[optuna.trial.FrozenTrial]) -> float:
    """The highest AU among complete feasible trials (NaN if none)."""
    values = [t.value for t in trials if t.state.name == "COMPLETE" and is_feasible(t)]
    return max(values) if values else float("nan")


def bench_overhead(root: Path, n_trials: int) -> dict[str, float]:
    """Per-trial cost of the machinery: (T(n trials) - T(0 trials)) / n, and inside trials."""
    empty = run_sweep(root, "empty", [*NOTHING_TRIAL, "hydra.sweeper.n_trials=0"])
    full = run_sweep(root, "nothing", [*NOTHING_TRIAL, f"hydra.sweeper.n_trials={n_trials}"])
    trials = study_trials(journal(root, "nothing"), "nothing")
    per_trial = (full - empty) / n_trials
    return {
        "sweep start-up and report (s)": empty,
        "per trial, all in (s)": per_trial,
        "per trial, inside the job (s)": trial_seconds(trials) / n_trials,
    }


def bench_trial_cost(
    root: Path,
    storage: str | None = None,
    tracking_uri: str | None = None,
    few: int = 2,
    many: int = 10,
    repeats: int = 3,
) -> dict[str, float | list[float]]:
    """Seconds per one-epoch digits trial beyond the sweep's start and end: (T(many trials) −
    T(few trials)) / (many − few), the median over `repeats` pairs of sweeps (one pair is
    noisy when anything else runs on the host), and, in the sweeps of `many`, the median time
    from one trial's start to the next's and from a trial's ask to its tell.

    Each sweep writes under a folder of its own, so each creates its stores afresh; `storage`
    (an Optuna URL, postgresql://...) and `tracking_uri` (an MLflow server, http://...) put
    every study and run there instead, each study under a name of its own.
    """
    shared = [f"hydra.sweeper.storage='{storage}'"] if storage else []
    shared += [f"tracking.uri='{tracking_uri}'"] if tracking_uri else []
    stamp = time.strftime("%Y%m%d-%H%M%S")
    per_trial, start_to_start, ask_to_tell = [], [], []
    for repeat in range(repeats):
        walls = {}
        for n in (few, many):
            study = f"trial_cost_{stamp}_{repeat}_{n}"
            overrides = [*DIGITS_TRIAL, *shared, f"hydra.sweeper.n_trials={n}"]
            walls[n] = run_sweep(root / study, study, overrides)
        per_trial.append((walls[many] - walls[few]) / (many - few))
        trials = study_trials(storage or journal(root / study, study), study)
        starts = sorted(t.datetime_start for t in trials)
        start_to_start += [(b - a).total_seconds() for a, b in itertools.pairwise(starts)]
        ask_to_tell += [(t.datetime_complete - t.datetime_start).total_seconds() for t in trials]
    return {
        f"per trial, (T({many}) - T({few})) / {many - few} (s)": statistics.median(per_trial),
        "  each pair of sweeps (s)": per_trial,
        "per trial, start to next start (s)": statistics.median(start_to_start),
        "per trial, ask to tell (s)": statistics.median(ask_to_tell),
    }


def bench_pruning(root: Path, n_trials: int, epochs: int) -> dict[str, float]:
    """The quick sweep with the median pruner and without: wall time and best feasible AU."""
    figures = {}
    for pruner in ("median", "none"):
        study = f"prune_{pruner}"
        overrides = [
            "experiment=quick",
            f"sweep/pruner={pruner}",
            f"trainer.epochs={epochs}",
            f"hydra.sweeper.n_trials={n_trials}",
        ]
        seconds = run_sweep(root, study, overrides)
        trials = study_trials(journal(root, study), study)
        figures[f"{pruner}: wall (s)"] = seconds
        figures[f"{pruner}: pruned trials"] = sum(t.state.name == "PRUNED" for t in trials)
        figures[f"{pruner}: best feasible AU"] = best_feasible_au(trials)
    return figures


def bench_workers(
    root: Path, n_trials: int, epochs: int, experiment: str = "quick"
) -> dict[str, float]:
    """Trials per minute of one study, with 1 and with 2 asynchronous workers (sweep
    processes started together, as `make sweep WORKERS=2`), from the first trial's start to
    the last one's end; each worker trains one trial at a time on its share of the cores."""
    overrides = [
        f"experiment={experiment}",
        "sweep/pruner=none",
        f"trainer.epochs={epochs}",
        f"hydra.sweeper.n_trials={n_trials}",
    ]
    figures = {}
    for workers in (1, 2):
        study = f"workers_{workers}"
        command = sweep_command(root, study, overrides)
        processes = [
            subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for _ in range(workers)
        ]
        if any(process.wait() != 0 for process in processes):
            raise RuntimeError(f"a worker of {study} failed: {' '.join(command)}")
        trials = study_trials(journal(root, study), study)
        span = max(t.datetime_complete for t in trials) - min(t.datetime_start for t in trials)
        figures[f"{workers} worker(s): trials/min"] = 60 * len(trials) / span.total_seconds()
    figures["speed-up"] = figures["2 worker(s): trials/min"] / figures["1 worker(s): trials/min"]
    return figures


# A Hydra app whose trial does nothing: the storage and the sweep machinery are all there is.
TRIVIAL_APP = """
import hydra


@hydra.main(config_path=".", config_name="trivial")
def main(cfg):
    return (cfg.x - 0.25) ** 2


if __name__ == "__main__":
    main()
"""


def start_trivial_workers(
    root: Path, storage: str, n_workers: int, n_trials: int, *overrides: str
) -> list[subprocess.Popen]:
    """n_workers sweep processes of TRIVIAL_APP on the study `load` in `storage`, started in
    root at once (their stderr piped, as text); the storage load test of the bench and of
    tests/test_scaling_out.py."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "app.py").write_text(TRIVIAL_APP)
    (root / "trivial.yaml").write_text("x: 0.0\n")
    command = [
        sys.executable,
        "app.py",
        "--multirun",
        "hydra/sweeper=vaelab_optuna",
        f"hydra.sweeper.storage={storage}",
        "hydra.sweeper.study_name=load",
        f"hydra.sweeper.n_trials={n_trials}",
        "hydra/job_logging=disabled",
        "x=interval(-1,1)",
        *overrides,
    ]
    return [
        subprocess.Popen(
            command, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        for _ in range(n_workers)
    ]


def bench_storage_load(root: Path, storage: str, n_workers: int, n_trials: int) -> dict[str, float]:
    """n_workers sweep processes of trivial trials on one database study: trials per second
    from the first trial's start to the last one's end, and how many were lost or surplus."""
    processes = start_trivial_workers(root, storage, n_workers, n_trials)
    errors = [process.communicate()[1] for process in processes]
    failed = [error for process, error in zip(processes, errors, strict=True) if process.returncode]
    if failed:
        raise RuntimeError(f"{len(failed)} of {n_workers} workers failed:\n{failed[0][-2000:]}")
    trials = study_trials(storage, "load")
    complete = [
        t for t in trials if t.state.name == "COMPLETE" and "not_counted" not in t.user_attrs
    ]
    span = max(t.datetime_complete for t in trials) - min(t.datetime_start for t in trials)
    return {
        f"{n_workers} workers: trials/s": len(complete) / span.total_seconds(),
        "complete trials": len(complete),
        "surplus trials (closed untrained)": len(trials) - len(complete),
    }


def postgres_database(stack: contextlib.ExitStack) -> Callable[[], str] | None:
    """A maker of fresh databases on the PostgreSQL server at VAELAB_BENCH_POSTGRES, each
    dropped when the stack closes; None (and a log line) when no server answers."""
    server = os.environ.get("VAELAB_BENCH_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1")
    try:
        check = stack.enter_context(temporary_database(server, "vaelab_bench"))
    except Exception as err:  # psycopg's OperationalError: no server here
        log.info("No PostgreSQL at %s (%s): its figures are skipped", server, err)
        return None
    del check  # it answered; each figure gets a database of its own
    return lambda: stack.enter_context(temporary_database(server, "vaelab_bench"))


def report(title: str, figures: dict[str, float | list[float]]) -> None:
    """Log one block of figures (a list: each value, as measured)."""
    log.info("%s", title)
    for name, value in figures.items():
        if isinstance(value, list):
            log.info("  %-34s %s", name, " ".join(f"{v:.3f}" for v in value))
        else:
            log.info("  %-34s %10.3f", name, value)


def main(argv: list[str] | None = None) -> None:
    """Run the three sweep benchmarks in a temporary output root and log the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8, help="trials per measured sweep")
    parser.add_argument("--epochs", type=int, default=10, help="epochs per quick-sweep trial")
    parser.add_argument("--load-workers", type=int, default=16, help="storage load test")
    parser.add_argument("--load-trials", type=int, default=64, help="storage load test")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    log.info("load average at start: %s, cores: %d", os.getloadavg(), os.cpu_count())
    with tempfile.TemporaryDirectory(prefix="vaelab-bench-") as tmp:
        root = Path(tmp)
        report("Sweep machinery (trials that do almost nothing)", bench_overhead(root, args.trials))
        report(
            "Sweep machinery and a job's bookkeeping (one-epoch digits trials), "
            "journal file + SQLite",
            bench_trial_cost(root / "embedded"),
        )
        with contextlib.ExitStack() as servers:
            database = postgres_database(servers)
            if database is not None:
                tracking = servers.enter_context(
                    serving(database(), root / "mlartifacts", root / "mlflow-server.log")
                )
                report(
                    "... the same on PostgreSQL + an MLflow tracking server",
                    bench_trial_cost(root / "server", database(), tracking),
                )
                report(
                    f"Storage load: {args.load_workers} workers of trivial trials, PostgreSQL",
                    bench_storage_load(
                        root / "load", database(), args.load_workers, args.load_trials
                    ),
                )
        report(
            f"Quick sweep, {args.trials} trials x {args.epochs} epochs: pruning",
            bench_pruning(root, args.trials, args.epochs),
        )
        report(
            f"Quick sweep, {args.trials} trials x {args.epochs} epochs: asynchronous workers",
            bench_workers(root, args.trials, args.epochs),
        )
    log.info("load average at end: %s", os.getloadavg())


if __name__ == "__main__":
    main()
