"""The end of a sweep: the best feasible trial (or the Pareto front), the feasible set, plots,
and the MLflow parent run's summary."""

import logging
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: sweeps run on machines without a screen
import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
import optuna  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402
from optuna.trial import FrozenTrial, TrialState  # noqa: E402

log = logging.getLogger(__name__)

AU = "val_active_units"  # user attrs the trials record (vaelab.trial.SweepTrial.finish)
KL = "val_kl"


def is_feasible(trial: FrozenTrial) -> bool:
    """Feasible: every constraint ≤ 0 (KL above sweep.kl_threshold). Unknown counts as not."""
    return bool(trial.constraints) and all(v <= 0 for v in trial.constraints.values())


def summarise(study: optuna.Study) -> dict[str, Any]:
    """Counts by state, the feasible set and the best feasible trial(s), as plain data."""
    trials = study.get_trials(deepcopy=False)
    counts = {state.name: sum(t.state == state for t in trials) for state in TrialState}
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    feasible = [t for t in done if is_feasible(t)]
    summary: dict[str, Any] = {
        "study": study.study_name,
        "trials": {k: v for k, v in counts.items() if v},
        "feasible": [
            {
                "number": t.number,
                "values": t.values,
                "params": t.params,
                "val_kl": t.user_attrs.get(KL),
            }
            for t in feasible
        ],
    }
    if len(study.directions) == 1:
        best = study.best_trial if feasible else None  # Optuna: best among feasible trials
        summary["best"] = (
            None
            if best is None
            else {
                "number": best.number,
                "value": best.value,
                "params": best.params,
                "user_attrs": dict(best.user_attrs),
            }
        )
    else:
        summary["pareto_front"] = [
            {"number": t.number, "values": t.values, "params": t.params} for t in study.best_trials
        ]
    return summary


def plot_sweep(study: optuna.Study, out_dir: Path) -> list[Path]:
    """AU against each swept parameter (feasible vs collapsed), KL feasibility, and history."""
    out_dir.mkdir(parents=True, exist_ok=True)
    trials = [t for t in study.get_trials(deepcopy=False) if AU in t.user_attrs]
    if not trials:
        return []
    params = sorted({name for t in trials for name in t.params})
    colours = ["tab:blue" if is_feasible(t) else "tab:red" for t in trials]
    paths = []

    fig, axes = plt.subplots(
        1, max(len(params), 1), figsize=(4 * max(len(params), 1), 3.5), squeeze=False
    )
    for ax, name in zip(axes[0], params, strict=True):
        xs = [t.params.get(name) for t in trials]
        ys = [t.user_attrs[AU] for t in trials]
        ax.scatter([str(x) if isinstance(x, str) else x for x in xs], ys, c=colours)
        if all(isinstance(x, (int, float)) and x > 0 for x in xs) and max(xs) / min(xs) > 20:
            ax.set_xscale("log")
        ax.set_xlabel(name)
        ax.set_ylabel("validation active units")
    fig.suptitle(f"{study.study_name}: AU per parameter (blue feasible, red KL below threshold)")
    fig.tight_layout()
    paths.append(out_dir / "au_vs_params.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 4))
    ax.scatter(
        [t.user_attrs.get(KL, float("nan")) for t in trials],
        [t.user_attrs[AU] for t in trials],
        c=colours,
    )
    threshold = [t.user_attrs.get(KL, 0) + t.user_attrs.get("constraint_kl", 0) for t in trials]
    ax.axvline(threshold[0], color="grey", linestyle="--", label="sweep.kl_threshold")
    ax.set_xscale("symlog", linthresh=0.01)
    ax.set_xlabel("validation KL (nats per sample)")
    ax.set_ylabel("validation active units")
    ax.legend()
    ax.set_title("feasibility: KL above the collapse threshold")
    fig.tight_layout()
    paths.append(out_dir / "feasibility.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    ordered = sorted(trials, key=lambda t: t.number)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.scatter(
        [t.number for t in ordered],
        [t.user_attrs[AU] for t in ordered],
        c=["tab:blue" if is_feasible(t) else "tab:red" for t in ordered],
    )
    best_so_far, running = [], float("-inf")
    for t in ordered:
        if is_feasible(t) and t.state == TrialState.COMPLETE:
            running = max(running, t.user_attrs[AU])
        best_so_far.append(running if running > float("-inf") else float("nan"))
    ax.step(
        [t.number for t in ordered],
        best_so_far,
        where="post",
        color="black",
        label="best feasible so far",
    )
    ax.set_xlabel("trial")
    ax.set_ylabel("validation active units")
    ax.legend()
    ax.set_title("optimisation history")
    fig.tight_layout()
    paths.append(out_dir / "history.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    return paths


def report_sweep(
    study: optuna.Study, config: DictConfig, tracker: Any, parent_run_id: str, storage: str
) -> dict[str, Any]:
    """Write optimization_results.yaml and plots, fill the parent run, and log where to look."""
    summary = summarise(study)
    sweep_dir = Path(config.hydra.sweep.dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    results = sweep_dir / "optimization_results.yaml"
    OmegaConf.save(OmegaConf.create(summary), results)
    plots = plot_sweep(study, sweep_dir / "plots")

    client = mlflow.MlflowClient(tracker.uri)
    client.log_artifact(parent_run_id, str(results))
    for plot in plots:
        client.log_artifact(parent_run_id, str(plot), artifact_path="plots")
    client.set_tag(parent_run_id, "sweep.trials", str(summary["trials"]))
    client.set_tag(parent_run_id, "sweep.n_feasible", str(len(summary["feasible"])))
    best = summary.get("best")
    if best:
        client.log_batch(
            parent_run_id,
            params=[mlflow.entities.Param(f"best.{k}", str(v)) for k, v in best["params"].items()],
            metrics=[
                mlflow.entities.Metric(f"best/{k}", float(v), 0, 0)
                for k, v in best["user_attrs"].items()
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k.startswith("val_")
            ],
        )
        client.set_tag(parent_run_id, "sweep.best_trial", str(best["number"]))
    client.set_terminated(parent_run_id, status="FINISHED")

    log.info("Sweep %r: %s", study.study_name, summary["trials"])
    if "best" in summary:
        if best:
            log.info(
                "Best feasible trial %d: value %s, params %s",
                best["number"],
                best["value"],
                best["params"],
            )
        else:
            log.info("No feasible trial: every completed trial's KL fell below the threshold")
    else:
        for t in summary["pareto_front"]:
            log.info("Pareto trial %d: values %s, params %s", t["number"], t["values"], t["params"])
    for t in summary["feasible"]:
        log.info(
            "  feasible trial %d: values %s, KL %.3g nats, params %s",
            t["number"],
            t["values"],
            t["val_kl"] or float("nan"),
            t["params"],
        )
    log.info("Results: %s (plots in %s); Optuna storage %s", results, sweep_dir / "plots", storage)
    log.info(
        "MLflow parent run %s at %s: open it with `make ui`; the study with `make dashboard`",
        parent_run_id,
        tracker.uri,
    )
    return summary
