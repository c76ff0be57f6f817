"""A sweep's MLflow record: one parent run per study, its summary and plots, and the runs of
trials whose process died.

The sweeper builds this from its `tracking` node (conf/hydra/sweeper/vaelab.yaml fills it from
the app's `tracking` group). With no `tracking` node the sweeper never imports this module, so
MLflow is neither needed nor loaded by a plain Hydra app.
"""

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow
import optuna
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from vaelab.sweep.plots import plot_sweep
from vaelab.tracking import MAX_PARAM_LENGTH, MlflowTracker

log = logging.getLogger(__name__)

MAX_TAG_LENGTH = 5000  # MLflow rejects longer tag values


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
        trial's params and metrics."""
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
        if best:
            self._log_best(client, parent_run_id, best)
        log.info(
            "MLflow parent run %s at %s: open it with `make ui`; the study with `make dashboard`",
            parent_run_id,
            self.uri,
        )

    def close_parent(self, parent_run_id: str, status: str, reason: str | None = None) -> None:
        """End the parent run: FINISHED, or FAILED / KILLED with the reason in its `error` tag."""
        client = mlflow.MlflowClient(self.uri)
        if reason is not None:
            _set_tag(client, parent_run_id, "error", reason[:MAX_TAG_LENGTH])
        client.set_terminated(parent_run_id, status=status)

    @staticmethod
    def _log_best(client: mlflow.MlflowClient, parent_run_id: str, best: dict[str, Any]) -> None:
        """The best trial as params best.<name>, metrics best/val_*, and tags.

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
        _set_tag(client, parent_run_id, "sweep.best_trial", str(best["number"]))
        _set_tag(client, parent_run_id, "sweep.best_params", str(best["params"])[:MAX_TAG_LENGTH])


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
