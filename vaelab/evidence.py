"""The evidence table: the generic `hparams_search=collapse`, unchanged, on every bundled data set.

    python -m vaelab.evidence                 # make evidence; ~15 min on 2 CPU cores
    python -m vaelab.evidence --trials 4 --epochs 5 --only digits --no-readme

For each data set it runs one real sweep (`python -m vaelab.train --multirun ...`, the same
search space, no β chosen per data set), reads its best feasible trial back from Optuna and
MLflow, and writes one table row: active units of the latent dimension, I(x; z), the held-out
log p(x) (IWAE), the linear probe's accuracy against the published baselines, HDBSCAN's
agreement with the labels on the latents against the PCA baseline, and the trial counts. The
table, with the machine and the date, replaces the one between the markers in README.md.
"""

import argparse
import datetime
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import optuna
import torch

from vaelab.runtime import cpu_model
from vaelab.sweep.storage import open_storage
from vaelab.sweep.summary import is_feasible

log = logging.getLogger("vaelab.evidence")

REPO = Path(__file__).resolve().parents[1]
README_START, README_END = "<!-- evidence:start -->", "<!-- evidence:end -->"


@dataclass(frozen=True)
class DataSet:
    """One row: a bundled data set, the model it is swept with, and published baselines."""

    name: str
    overrides: tuple[str, ...]  # data and model; the search space and budget are the same
    baseline: str  # published probe accuracies of the inputs themselves, for comparison


DATA_SETS = (
    DataSet(
        "digits",
        ("dataset=digits", "model=mlp", "model.hidden_dims=[256,128]"),
        "logistic regression on pixels ≈ 0.97",
    ),
    DataSet(
        "mnist1d",
        ("dataset=mnist1d", "model=mlp", "model.hidden_dims=[256,128]"),
        "logistic 0.32, MLP 0.68, CNN 0.94 (Greydanus 2020)",
    ),
    DataSet(
        "vitals_synthetic",
        ("dataset=vitals_synthetic", "dataset.n_patients=128", "model.base_channels=32"),
        "-",
    ),
    DataSet("vitals_windows", ("dataset=vitals_windows", "model=conv_lstm"), "-"),
    DataSet(
        "kmers",
        (
            "dataset=kmers",
            "dataset.fasta=${vaelab.bundled:ecoli_MIIJ01000039.fna.gz}",
            "dataset.max_skipped_fraction=0.5",  # half of the contig is N
            "model=mlp",
            "model.hidden_dims=[1024,512]",
        ),
        "- (no labels)",
    ),
)


def run_sweep(data: DataSet, root: Path, trials: int, epochs: int) -> str:
    """One sweep of `data` under root; returns its study name."""
    study = f"evidence_{data.name}"
    command = [
        sys.executable,
        "-m",
        "vaelab.train",
        "--multirun",
        *data.overrides,
        "hparams_search=collapse",
        f"tracking.experiment={study}",
        f"hydra.sweeper.study_name={study}",
        f"hydra.sweeper.n_trials={trials}",
        f"trainer.epochs={epochs}",
        f"paths.output_root={root}",
    ]
    log.info("%s: %s", data.name, " ".join(command[2:]))
    started = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"the sweep of {data.name} failed:\n{result.stderr[-3000:]}")
    log.info("%s: %.0f s", data.name, time.perf_counter() - started)
    return study


def row(data: DataSet, study_name: str, root: Path) -> dict[str, str]:
    """The table row of one finished sweep, from its study and its best trial's MLflow run."""
    storage = open_storage(str(root / "optuna" / f"{study_name}.journal"))
    trials = optuna.load_study(study_name=study_name, storage=storage).get_trials()
    states = optuna.trial.TrialState
    complete = [t for t in trials if t.state == states.COMPLETE]
    feasible = [t for t in complete if t.constraints and is_feasible(t)]
    counts = f"{len(trials)} / {len(feasible)} / {sum(t.state == states.PRUNED for t in trials)}"
    if not feasible:
        return {"data set": data.name, "trials / feasible / pruned": counts}
    best = max(feasible, key=lambda t: t.value)
    client = mlflow.MlflowClient(f"sqlite:///{root}/mlflow.db")
    run = client.get_run(best.user_attrs["mlflow_run_id"])
    m, params = run.data.metrics, run.data.params

    def figure(name: str, digits: int = 2) -> str:
        return f"{m[name]:.{digits}f}" if name in m else "-"

    return {
        "data set": data.name,
        "best feasible AU / latent dim": f"{m['final/active_units']:.0f} / "
        f"{params['model.latent_dim']}",
        "MI (nats)": figure("final/mi"),
        "log p(x), IWAE (nats)": figure("final/log_px_iwae", 1),
        "probe accuracy": figure("eval/probe_accuracy"),
        "published baseline": data.baseline,
        "HDBSCAN ARI, latents / PCA": f"{figure('eval/hdbscan_latent_ari')} / "
        f"{figure('eval/hdbscan_pca_ari')}",
        "trials / feasible / pruned": counts,
        "β, free bits of the best": f"{best.params['schedule.beta']:.3g}, "
        f"{best.params['loss.free_bits']:.2f}",
    }


def table(rows: list[dict[str, str]], trials: int, epochs: int) -> str:
    """The markdown table with the machine, the date and the command that made it."""
    columns = list(dict.fromkeys(key for r in rows for key in r))
    lines = [
        f"Made by `make evidence` (`python -m vaelab.evidence --trials {trials} --epochs "
        f"{epochs}`) on {datetime.date.today():%Y-%m-%d}, {os.cpu_count()} CPU cores "
        f"({cpu_model()}), torch {torch.__version__}: each data set swept by "
        f"`hparams_search=collapse` with {trials} trials of {epochs} epochs. Feasible: raw "
        "KL ≥ 1 nat, I(x; z) ≥ 0.1 nats, and a decoder that uses z. ARI: HDBSCAN clusters "
        "against the labels.",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]
    lines += [
        "| " + " | ".join(r.get(c, "no feasible trial") for c in columns) + " |" for r in rows
    ]
    return "\n".join(lines)


def write_readme(text: str, readme: Path) -> None:
    """Replace what stands between the evidence markers in README.md."""
    content = readme.read_text()
    start, end = content.index(README_START), content.index(README_END)
    content = content[: start + len(README_START)] + "\n" + text + "\n" + content[end:]
    readme.write_text(content)


def main(argv: list[str] | None = None) -> None:
    """Sweep every bundled data set, print the table and write it into README.md."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=12, help="trials per data set")
    parser.add_argument("--epochs", type=int, default=20, help="epochs per trial")
    parser.add_argument("--root", type=Path, default=REPO / "multirun" / "evidence")
    parser.add_argument("--only", nargs="*", help="data set names (default: all)")
    parser.add_argument("--no-readme", action="store_true", help="print the table only")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    chosen = [d for d in DATA_SETS if not args.only or d.name in args.only]
    rows = []
    for data in chosen:
        study = run_sweep(data, args.root, args.trials, args.epochs)
        rows.append(row(data, study, args.root))
    text = table(rows, args.trials, args.epochs)
    log.info("\n%s", text)
    if not args.no_readme:
        write_readme(text, REPO / "README.md")
        log.info("README.md updated")


if __name__ == "__main__":
    main()
