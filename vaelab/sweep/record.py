"""A sweep's MLflow record: one parent run per study, its summary and plots, and the runs of
trials whose process died.

The sweeper builds this from its `tracking` node (conf/hydra/sweeper/vaelab.yaml fills it from
the app's `tracking` group). With no `tracking` node the sweeper never imports this module, so
MLflow is neither needed nor loaded by a plain Hydra app.
"""

import logging
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow
import optuna
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from vaelab.sweep.plots import plot_sweep
from vaelab.tracking import (
    LOCAL_UI,
    MAX_PARAM_LENGTH,
    MODEL_TRAINING,
    SAVED_VIEW_PREFIX,
    MlflowTracker,
    run_column,
    runs_table_url,
    save_runs_view,
)

log = logging.getLogger(__name__)

MAX_TAG_LENGTH = 5000  # MLflow rejects longer tag values
DESCRIPTION_TAG = "mlflow.note.content"  # a run's description (markdown) in the MLflow UI
MAX_LISTED = 6  # infeasible trials named in the parent run's description
# Columns of the sweep's runs table besides the objectives, the constraints and the swept
# params: active units and KL (the collapse story) and the sweep's verdict on each trial.
VIEW_METRICS = ["final/active_units", "final/kl", "final/mi", "final/feasible"]
VIEW_TAGS = ["sweep.feasible", "sweep.feasibility", "trial_state"]


class MlflowSweepRecord:
    """The sweep's parent run in an MLflow store; each trial's run is its child."""

    def __init__(self, uri: str, experiment: str, artifact_root: str) -> None:
        self.tracker = MlflowTracker(uri, experiment, artifact_root)
        self.uri = uri

    def open_parent(self, study_name: str, tags: dict[str, str], known: str | None = None) -> str:
        """The study's parent run, RUNNING, with these tags: `known` (the run the study names)
        when another worker or an earlier sweep made it, else the one found by its tags or
        made anew."""
        parent_run_id = known or self.tracker.sweep_parent_run(study_name, {})
        client = mlflow.MlflowClient(self.uri)
        client.update_run(parent_run_id, status="RUNNING")
        tags = [RunTag(k, str(v)[:MAX_TAG_LENGTH]) for k, v in tags.items()]
        _racing_workers_tolerated(lambda: client.log_batch(parent_run_id, tags=tags))
        return parent_run_id

    def close_trial_run(self, run_id: str, reason: str) -> None:
        """A trial's run that its dead process left RUNNING: KILLED, saying why."""
        self.tracker.close_run(run_id, "KILLED", reason)

    def fill_parent(
        self, parent_run_id: str, study: optuna.Study, summary: dict[str, Any], results: Path
    ) -> None:
        """Attach the results file and plots; tag the counts of feasible trials and, for each
        constraint, of complete trials that broke it (sweep.n_broken.<name>); log the best
        trial's params and metrics, and tag its run (sweep.best_run_id, sweep.best_run_name);
        save the runs table of the sweep's trials (runs_table_url) and describe the sweep in
        the parent run's description, with links to the best run and that table."""
        client = mlflow.MlflowClient(self.uri)
        client.log_artifact(parent_run_id, str(results))
        for plot in plot_sweep(study, results.parent / "plots"):
            client.log_artifact(parent_run_id, str(plot), artifact_path="plots")
        _set_tag(client, parent_run_id, "sweep.trials", str(summary["trials"]))
        if "feasible" in summary:  # a constrained study: how many trials broke which constraint
            counts = {
                "sweep.n_feasible": len(summary["feasible"]),
                "sweep.n_infeasible": len(summary["infeasible"]),
                **{
                    f"sweep.n_broken.{name}": n
                    for name, n in summary["infeasible_by_constraint"].items()
                },
            }
            tags = [RunTag(k, str(n)) for k, n in counts.items()]
            _racing_workers_tolerated(lambda: client.log_batch(parent_run_id, tags=tags))
        best = summary.get("best")
        best_run = self._log_best(client, parent_run_id, best) if best else None
        experiment_id = client.get_run(parent_run_id).info.experiment_id
        columns, order_by, ascending = _view_columns(study, summary)
        _racing_workers_tolerated(  # every worker writes it as it ends, maybe at once
            lambda: save_runs_view(
                client,
                experiment_id,
                view_key(study.study_name),
                f"sweep {study.study_name}",
                columns,
                search_filter=children_filter(parent_run_id),
                order_by=order_by,
                ascending=ascending,
            )
        )
        table = runs_table_url(experiment_id, view_key(study.study_name), base_url="")
        description = describe(study, summary, experiment_id, best_run, table)
        _set_tag(client, parent_run_id, DESCRIPTION_TAG, description[:MAX_TAG_LENGTH])
        # The end summary says how to open it (vaelab.sweep.summary.log_summary).
        log.debug("MLflow parent run %s at %s filled", parent_run_id, self.uri)

    def runs_table_url(
        self, study_name: str, parent_run_id: str | None = None, base_url: str = LOCAL_UI
    ) -> str:
        """The MLflow UI's runs table of this sweep's trials: the saved view fill_parent writes
        (AU, KL, feasibility, constraints and swept params as columns, sorted by the objective),
        or, before it has, the parent's children (or the experiment's runs) as they are."""
        experiment_id = self.tracker._experiment_id()
        client = mlflow.MlflowClient(self.uri)
        tags = client.get_experiment(experiment_id).tags
        if SAVED_VIEW_PREFIX + view_key(study_name) in tags:
            return runs_table_url(experiment_id, view_key(study_name), base_url=base_url)
        search = children_filter(parent_run_id) if parent_run_id else None
        return runs_table_url(experiment_id, search_filter=search, base_url=base_url)

    def close_parent(self, parent_run_id: str, status: str, reason: str | None = None) -> None:
        """End the parent run: FINISHED, or FAILED / KILLED with the reason in its `error` tag."""
        client = mlflow.MlflowClient(self.uri)
        if reason is not None:
            _set_tag(client, parent_run_id, "error", reason[:MAX_TAG_LENGTH])
        client.set_terminated(parent_run_id, status=status)

    @staticmethod
    def _log_best(
        client: mlflow.MlflowClient, parent_run_id: str, best: dict[str, Any]
    ) -> tuple[str, str] | None:
        """The best trial as params best.<name>, metrics best/val_*, and tags naming it and
        its run (sweep.best_trial, sweep.best_run_id, sweep.best_run_name); returns its run's
        id and name (None when the trial recorded no run).

        MLflow params cannot change once logged, so when a resumed sweep finds a new best the
        params keep the first one and a warning says so; the tags always name the current best.
        """
        params = {f"best.{k}": str(v)[:MAX_PARAM_LENGTH] for k, v in best["params"].items()}
        metrics = [
            Metric(f"best/{k}", float(v), 0, 0)
            for k, v in best["user_attrs"].items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k.startswith("val_")
        ]

        def log_new_params_and_metrics() -> None:  # read again on each try: a worker may race
            logged = client.get_run(parent_run_id).data.params
            changed = sorted(k for k, v in params.items() if logged.get(k, v) != v)
            if changed:
                log.warning(
                    "The parent run keeps its earlier %s (MLflow params cannot change); the "
                    "best trial is now %d (tags sweep.best_trial, sweep.best_params)",
                    ", ".join(changed),
                    best["number"],
                )
            fresh = [Param(k, v) for k, v in params.items() if k not in logged]
            client.log_batch(parent_run_id, params=fresh, metrics=metrics)

        _racing_workers_tolerated(log_new_params_and_metrics)
        tags = {
            "sweep.best_trial": str(best["number"]),
            "sweep.best_params": str(best["params"])[:MAX_TAG_LENGTH],
            "sweep.best_value": str(best["value"]),
        }
        run = _run_of(client, best["user_attrs"])
        if run is not None:
            tags |= {"sweep.best_run_id": run[0], "sweep.best_run_name": run[1]}
        batch = [RunTag(k, v) for k, v in tags.items()]
        _racing_workers_tolerated(lambda: client.log_batch(parent_run_id, tags=batch))
        return run


def view_key(study_name: str) -> str:
    """The saved runs-table view of a study's trials: a name fit for an MLflow tag key."""
    return "vaelab-" + re.sub(r"[^A-Za-z0-9_.-]", "_", study_name)[:200]


def children_filter(parent_run_id: str) -> str:
    """An MLflow search filter for the runs of a sweep's trials (children of its parent)."""
    return f"tags.mlflow.parentRunId = '{parent_run_id}'"


def _objectives(study: optuna.Study, summary: dict[str, Any]) -> dict[str, str]:
    """{objective name: direction}: the summary's, else the study's metric names."""
    if summary.get("objectives"):
        return dict(summary["objectives"])
    names = study.metric_names or [f"objective {i}" for i in range(len(study.directions))]
    return {name: d.name.lower() for name, d in zip(names, study.directions, strict=True)}


def _view_columns(
    study: optuna.Study, summary: dict[str, Any]
) -> tuple[list[str], str | None, bool]:
    """The sweep's runs-table columns, its sort key and whether ascending: each objective as
    the run logs it at its best epoch (val/x is final/x), AU, KL, feasibility, each
    constraint's value, each swept param; sorted by the first objective."""
    objectives = _objectives(study, summary)
    finals = [name.replace("val/", "final/", 1) for name in objectives if name.startswith("val/")]
    constraints = [
        f"final/constraint_{name}" for name in summary.get("infeasible_by_constraint", {})
    ]
    swept = dict.fromkeys(
        name for t in study.get_trials(deepcopy=False) for name in t.distributions
    )
    columns = [
        *(run_column("metrics", m) for m in dict.fromkeys([*finals, *VIEW_METRICS, *constraints])),
        *(run_column("tags", tag) for tag in VIEW_TAGS),
        *(run_column("params", name) for name in swept),
    ]
    if not finals:
        return columns, None, False
    return columns, run_column("metrics", finals[0]), next(iter(objectives.values())) == "minimize"


def describe(
    study: optuna.Study,
    summary: dict[str, Any],
    experiment_id: str,
    best_run: tuple[str, str] | None,
    table: str,
) -> str:
    """The parent run's description (markdown): what the sweep found, with links to the best
    feasible trial's run, to the runs table of every trial and to each infeasible trial's run.
    The links come first: the run page shows the first few paragraphs until "Show more"."""
    objectives = _objectives(study, summary)
    paragraphs = [f"**Sweep `{summary['study']}`**, {_counts(summary)}."]
    best = summary.get("best")
    if best:
        paragraphs.append(_best(summary, objectives, experiment_id, best_run))
    elif "solutions" in summary:
        front = ", ".join(str(t["number"]) for t in summary["solutions"])
        paragraphs.append(f"Pareto front ({', '.join(objectives)}): trials {front}.")
    elif "feasible" in summary:
        paragraphs.append("No feasible trial: every complete trial broke a constraint.")
    else:
        paragraphs.append("No complete trial.")
    paragraphs.append(
        f"[Every trial in the runs table]({table}): AU, KL, feasibility, constraints and the "
        "swept parameters as columns."
    )
    if summary.get("infeasible"):
        paragraphs.append(_infeasible(study, summary["infeasible"], experiment_id))
    if meanings := summary.get("constraint_meanings"):
        holds = "; ".join(f"{name}: {meaning}" for name, meaning in meanings.items())
        paragraphs.append(f"Feasible means every constraint holds: {holds}.")
    return "\n\n".join(paragraphs)


def _counts(summary: dict[str, Any]) -> str:
    """e.g. "5 trials: **2 feasible**, 3 infeasible (broke kl: 2, mi: 3), 0 pruned, 0 failed"
    (a trial may break several constraints)."""
    by_state = summary["trials"]
    ended = f"{by_state.get('PRUNED', 0)} pruned, {by_state.get('FAIL', 0)} failed"
    if running := by_state.get("RUNNING", 0) + by_state.get("WAITING", 0):
        ended += f", {running} still running"
    total = f"{sum(by_state.values())} trials"
    if "feasible" not in summary:
        return f"{total}: {by_state.get('COMPLETE', 0)} complete (no constraints), {ended}"
    broken = ", ".join(f"{c}: {n}" for c, n in summary["infeasible_by_constraint"].items() if n)
    infeasible = f"{len(summary['infeasible'])} infeasible" + (
        f" (broke {broken})" if broken else ""
    )
    return f"{total}: **{len(summary['feasible'])} feasible**, {infeasible}, {ended}"


def _best(
    summary: dict[str, Any],
    objectives: dict[str, str],
    experiment_id: str,
    best_run: tuple[str, str] | None,
) -> str:
    """The best (feasible) trial with a link to its run, its value and the range, its params."""
    best = summary["best"]
    name, direction = next(iter(objectives.items()), ("objective", ""))
    trial = f"trial {best['number']}"
    if best_run is not None:
        run_id, run_name = best_run
        trial += f", run [{run_name}]({_run_link(experiment_id, run_id)})"
    values = [t["values"][0] for t in summary.get("feasible", []) if t.get("values")]
    low_high = summary.get("objective_range") or ([min(values), max(values)] if values else None)
    found = f"{name} = {_number(best['value'])}"
    if low_high:
        of = "feasible" if "feasible" in summary else "complete"
        found += f" ({direction}; {of} trials range {_number(low_high[0])} to "
        found += f"{_number(low_high[1])})"
    params = ", ".join(f"`{k}={_number(v)}`" for k, v in best["params"].items())
    feasible = "feasible " if "feasible" in summary else ""
    return f"**Best {feasible}{trial}**: {found}. Params: {params}."


def _infeasible(study: optuna.Study, infeasible: list[dict[str, Any]], experiment_id: str) -> str:
    """The first infeasible trials, each linked to its run, with the constraints it broke."""
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    listed = []
    for t in infeasible[:MAX_LISTED]:
        trial = f"trial {t['number']}"
        if run_id := trials[t["number"]].user_attrs.get("mlflow_run_id"):
            trial = f"[{trial}]({_run_link(experiment_id, run_id)})"
        listed.append(f"{trial} broke {', '.join(t['broke'])}")
    more = len(infeasible) - MAX_LISTED
    return "Infeasible: " + "; ".join(listed) + (f"; {more} more" if more > 0 else "") + "."


def _run_link(experiment_id: str, run_id: str) -> str:
    """A run's page as a link within the MLflow UI, shown as "Model training" (not GenAI)."""
    return f"#/experiments/{experiment_id}/runs/{run_id}?{MODEL_TRAINING}"


def _number(value: Any) -> str:
    """A value for people: 4 significant digits for floats, anything else as it is."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _run_of(client: mlflow.MlflowClient, user_attrs: dict[str, Any]) -> tuple[str, str] | None:
    """The id and name of a trial's MLflow run, from its user attrs (the name read from the
    store when the trial did not record it); None when it recorded no run."""
    run_id = user_attrs.get("mlflow_run_id")
    if run_id is None:
        return None
    name = user_attrs.get("mlflow_run_name")
    if name is None:
        try:
            name = client.get_run(run_id).info.run_name
        except MlflowException:
            log.debug("the best trial's run %s is not in the store", run_id, exc_info=True)
            name = run_id
    return run_id, str(name)


def _set_tag(client: mlflow.MlflowClient, run_id: str, key: str, value: str) -> None:
    _racing_workers_tolerated(lambda: client.set_tag(run_id, key, value))


def _racing_workers_tolerated(write: Callable[[], None], attempts: int = 3) -> None:
    """A write to the shared parent run, tried again when another worker wrote the same tag
    at the same moment: MLflow's store inserts a new tag after looking for it, so two writers
    can both insert, and the second fails on the table's unique key."""
    for attempt in range(1, attempts + 1):
        try:
            write()
            return
        except MlflowException as err:
            if attempt == attempts or "unique" not in str(err).lower():
                raise
            time.sleep(0.2 * attempt)
