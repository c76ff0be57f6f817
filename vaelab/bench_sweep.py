"""Benchmarks of the sweep machinery: real Hydra multiruns in a temporary output root.

    python -m vaelab.bench_sweep            # part of `make bench`

- per-trial overhead of sweeper + launcher + MLflow parent/child, on trials that do
  almost nothing (one epoch of a tiny MLP on 8 patients);
- per-trial cost of one-epoch digits trials, the sweep machinery and the job's bookkeeping
  (MLflow run, data, diagnostics, log p(x), latents, checkpoints): (T(10 trials) − T(2
  trials)) / 8, on the default stores or on a given Optuna storage and MLflow tracking URI;
- the quick sweep with and without pruning: wall time and the best feasible AU each finds;
- two parallel trials (joblib, 2 workers) against one at a time: trials per minute.
"""

import argparse
import itertools
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna

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


def run_sweep(root: Path, study: str, overrides: list[str]) -> float:
    """Wall seconds of one `python -m vaelab.train --multirun` sweep writing under root."""
    command = [
        sys.executable,
        "-m",
        "vaelab.train",
        "--multirun",
        f"paths.output_root={root}",
        f"hydra.sweeper.study_name={study}",
        *overrides,
    ]
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


def bench_parallel(root: Path, n_trials: int, epochs: int) -> dict[str, float]:
    """Trials per minute, one at a time against two joblib workers sharing the cores."""
    common = [
        "experiment=quick",
        "sweep/pruner=none",
        f"trainer.epochs={epochs}",
        f"hydra.sweeper.n_trials={n_trials}",
    ]
    serial = run_sweep(root, "serial", common)
    two_workers = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "hydra.sweeper.n_jobs=2"]
    parallel = run_sweep(root, "parallel", [*common, *two_workers])
    return {
        "one at a time: trials/min": 60 * n_trials / serial,
        "two parallel: trials/min": 60 * n_trials / parallel,
        "speed-up": serial / parallel,
    }


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
    parser.add_argument("--storage", help="Optuna storage URL of the digits trials' studies")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI of the digits trials' runs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    log.info("load average at start: %s, cores: %d", os.getloadavg(), os.cpu_count())
    with tempfile.TemporaryDirectory(prefix="vaelab-bench-") as tmp:
        root = Path(tmp)
        report("Sweep machinery (trials that do almost nothing)", bench_overhead(root, args.trials))
        report(
            "Sweep machinery and a job's bookkeeping (one-epoch digits trials)",
            bench_trial_cost(root, args.storage, args.tracking_uri),
        )
        report(
            f"Quick sweep, {args.trials} trials x {args.epochs} epochs: pruning",
            bench_pruning(root, args.trials, args.epochs),
        )
        report(
            f"Quick sweep, {args.trials} trials x {args.epochs} epochs: parallel trials",
            bench_parallel(root, args.trials, args.epochs),
        )
    log.info("load average at end: %s", os.getloadavg())


if __name__ == "__main__":
    main()
