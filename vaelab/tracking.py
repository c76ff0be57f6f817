"""The MLflow record of a run: where it goes and how it is written.

By default the store is a local SQLite file under multirun/, with artifacts beside it, so a
fresh clone records runs with no server; `tracking.uri` points anywhere MLflow can write.
"""

import fcntl
import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import mlflow
import optuna
from mlflow.entities import Metric, RunTag
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig, OmegaConf

from vaelab.errors import ConfigError

log = logging.getLogger(__name__)

MAX_PARAM_LENGTH = 6000  # MLflow rejects longer parameter values
MAX_TAG_LENGTH = 5000  # tag values are cut to this (MLflow rejects more than 8000)
CHECKPOINT_ARTIFACT = "checkpoints/model.pt"  # the best epoch of a training run
# The MLflow UI as `make ui` serves it (PORT=5000), and what its runs table (MLflow 3.17) reads.
LOCAL_UI = "http://127.0.0.1:5000"
# MLflow's own record of an experiment's kind of work. The 3.17 UI opens an experiment by the
# URL's workflowType instead (runs_table_url); its bundle reads this tag only with that off.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
# An experiment tag `mlflow.sharedViewState.<key>` holds a saved view of its runs table (the
# UI's "Views" menu, `?viewStateShareKey=<key>`): {name, createdAt, updatedAt, state}, where
# state is the JSON of the search facets and the UI state (selectedColumns, ...).
SAVED_VIEW_PREFIX = "mlflow.sharedViewState."
# The query that opens an MLflow 3.17 page as "Model training" (runs), not as GenAI.
MODEL_TRAINING = "workflowType=machine_learning"


class MlflowTracker:
    """Opens one MLflow run per training run in a named experiment."""

    def __init__(self, uri: str, experiment: str, artifact_root: str) -> None:
        self.uri = uri
        self.experiment = experiment
        self.artifact_root = artifact_root

    def _experiment_id(self) -> str:
        """The experiment's id, creating it (with artifacts under artifact_root) if new."""
        mlflow.set_tracking_uri(self.uri)
        with _sqlite_store_lock(self.uri):
            return self._get_or_create_experiment()

    def _get_or_create_experiment(self) -> str:
        existing = mlflow.get_experiment_by_name(self.experiment)
        if existing is not None:
            return existing.experiment_id
        # A local store keeps its artifacts next to it, under multirun/, not in ./mlruns.
        is_local = self.uri.startswith(("sqlite:", "file:")) or "://" not in self.uri
        location = Path(self.artifact_root).resolve().as_uri() if is_local else None
        try:
            return mlflow.create_experiment(
                self.experiment, artifact_location=location, tags=EXPERIMENT_KIND
            )
        except MlflowException:
            # Another process (a parallel trial) created it first.
            return mlflow.get_experiment_by_name(self.experiment).experiment_id

    @contextmanager
    def start_run(
        self,
        run_name: str | None = None,
        tags: dict[str, str] | None = None,
        parent_run_id: str | None = None,
    ) -> Iterator[str]:
        """A run that ends FINISHED; FAILED with the error in the `error` tag; or KILLED when
        interrupted or pruned (a pruned trial is also tagged `trial_state=PRUNED`)."""
        experiment_id = self._experiment_id()
        with mlflow.start_run(
            experiment_id=experiment_id, run_name=run_name, tags=tags, parent_run_id=parent_run_id
        ) as run:
            log.info(
                "MLflow run %s in experiment %r at %s", run.info.run_id, self.experiment, self.uri
            )
            try:
                yield run.info.run_id
            except BaseException as err:
                reason = f"{type(err).__name__}: {err}"[:MAX_TAG_LENGTH]
                if isinstance(err, optuna.TrialPruned):
                    mlflow.set_tags({"trial_state": "PRUNED", "pruned_reason": reason})
                else:
                    mlflow.set_tags({"trial_state": "FAILED", "error": reason})
                killed = isinstance(err, (optuna.TrialPruned, KeyboardInterrupt))
                mlflow.end_run(status="KILLED" if killed else "FAILED")
                raise

    def sweep_parent_run(self, study_name: str, tags: dict[str, str]) -> str:
        """The parent run of a study's trials: the existing one when a sweep resumes."""
        experiment_id = self._experiment_id()  # first: it creates a new store under a lock
        client = mlflow.MlflowClient(self.uri)
        query = f"tags.`sweep.study_name` = '{study_name}' and tags.`sweep.role` = 'parent'"
        existing = client.search_runs(
            [experiment_id], filter_string=query, order_by=["attributes.start_time ASC"]
        )
        if existing:
            run_id = existing[0].info.run_id
            client.update_run(run_id, status="RUNNING")
        else:
            run_id = client.create_run(
                experiment_id,
                run_name=f"{study_name}-sweep",
                tags={"sweep.role": "parent", "sweep.study_name": study_name},
            ).info.run_id
            # Sweep processes started together on one study may each have created a parent:
            # all keep the oldest, and each deletes its own younger one.
            parents = client.search_runs(
                [experiment_id], filter_string=query, order_by=["attributes.start_time ASC"]
            )
            oldest = min(parents, key=lambda r: (r.info.start_time, r.info.run_id))
            if oldest.info.run_id != run_id:
                client.delete_run(run_id)
                run_id = oldest.info.run_id
        for key, value in tags.items():
            client.set_tag(run_id, key, str(value)[:MAX_TAG_LENGTH])
        log.info("MLflow parent run %s for study %r", run_id, study_name)
        return run_id

    def close_run(self, run_id: str, status: str, reason: str) -> None:
        """End a run that its process left RUNNING, saying why (a finished run is left as is)."""
        client = mlflow.MlflowClient(self.uri)
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_tag(run_id, "error", reason)
            client.set_tag(run_id, "trial_state", "FAILED")
            client.set_terminated(run_id, status=status)


@contextmanager
def _sqlite_store_lock(uri: str) -> Iterator[None]:
    """Serialise the first touch of a local SQLite store across processes.

    MLflow creates and migrates the database on first use; two sweep processes starting
    together would both run the migration, and one fails ("No such index"). A file lock
    beside the database makes the second wait for the first.
    """
    if not uri.startswith("sqlite:///"):
        yield
        return
    database = Path(uri.removeprefix("sqlite:///"))
    database.parent.mkdir(parents=True, exist_ok=True)
    with open(database.with_name(database.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def download_run_artifact(run_id: str, tracking_uri: str, artifact: str, into: Path) -> Path:
    """Download one artifact of an MLflow run into a directory; one ConfigError naming the run,
    the store and the artifact when any of them is not there."""
    if tracking_uri.startswith("sqlite:///"):
        # MlflowClient would create an empty store here rather than say it is not there.
        database = Path(tracking_uri.removeprefix("sqlite:///"))
        if not database.is_file():
            raise ConfigError(
                f"run_id={run_id}: no MLflow store at {tracking_uri} (set paths.output_root "
                "or tracking.uri to where the run was recorded)"
            )
    client = mlflow.MlflowClient(tracking_uri)
    try:
        run = client.get_run(run_id)
    except MlflowException as err:
        log.debug("get_run failed", exc_info=True)
        message = f"run_id={run_id}: no such run in the MLflow store {tracking_uri}"
        raise ConfigError(message) from err
    try:
        return Path(client.download_artifacts(run_id, artifact, str(into)))
    except (MlflowException, OSError) as err:
        log.debug("download_artifacts failed", exc_info=True)
        raise ConfigError(
            f"run_id={run_id}: the run ({run.info.status}) in the MLflow store {tracking_uri} "
            f"has no artifact {artifact}"
        ) from err


def download_checkpoint(run_id: str, tracking_uri: str, into: Path) -> Path:
    """checkpoints/model.pt (the best epoch, as a training run logs it) of an MLflow run."""
    return download_run_artifact(run_id, tracking_uri, CHECKPOINT_ARTIFACT, into)


def flatten_config(cfg: DictConfig) -> dict[str, str]:
    """The resolved config as flat `group.key` params, without Hydra's own settings."""
    container = OmegaConf.to_container(cfg, resolve=True)
    flat: dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            flat[prefix.rstrip(".")] = str(node)[:MAX_PARAM_LENGTH]

    walk({k: v for k, v in container.items() if k != "hydra"}, "")
    return flat


def log_config(cfg: DictConfig, run_dir: Path) -> None:
    """The run's resolved config: config.yaml in the run directory, and flat MLflow params."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    mlflow.log_params(flatten_config(cfg))


def log_final(
    metrics: dict[str, float],
    verdict: dict[str, object],
    kl_per_dim: list[float],
    tags: dict[str, str],
) -> None:
    """The end of the active run in one MLflow call (one round trip to a tracking server): its
    final metrics, the collapse verdict as tags, the per-dimension KL as a tag and as metrics,
    and further tags."""
    metrics = metrics | {f"final/kl_dim_{d:03d}": v for d, v in enumerate(kl_per_dim)}
    tags = {
        **{f"collapse/{k}": str(v) for k, v in verdict.items()},
        "collapse/kl_per_dim": json.dumps([round(v, 5) for v in kl_per_dim]),
        **tags,
    }
    log_batch(mlflow.MlflowClient(), mlflow.active_run().info.run_id, metrics, tags)


def log_batch(
    client: mlflow.MlflowClient, run_id: str, metrics: dict[str, float], tags: dict[str, str]
) -> None:
    """Metrics (at step 0) and tags of a run in one call; MLflow splits it at its own limits."""
    now = int(time.time() * 1000)
    client.log_batch(
        run_id,
        metrics=[Metric(name, float(value), now, 0) for name, value in metrics.items()],
        tags=[RunTag(name, str(value)[:MAX_TAG_LENGTH]) for name, value in tags.items()],
    )


def run_column(kind: str, name: str) -> str:
    """A runs-table column as the MLflow UI names it: kind is metrics, params, tags or
    attributes, e.g. run_column("metrics", "final/kl") == "metrics.`final/kl`"."""
    return f"{kind}.`{name}`"


def save_runs_view(
    client: mlflow.MlflowClient,
    experiment_id: str,
    key: str,
    name: str,
    columns: list[str],
    search_filter: str = "",
    order_by: str | None = None,
    ascending: bool = False,
) -> None:
    """A saved view of the experiment's runs table, opened by runs_table_url(view_key=key):
    these columns (run_column names) in this order, runs matching search_filter, sorted by
    order_by.

    The format is the MLflow 3.17 UI's (its saved-view envelope and the keys of its shared
    view state, read from its bundle in mlflow/server/js/build); a UI that cannot read it says
    "share key is invalid" and opens the experiment as usual.
    """
    # columnOrder: in this order, not the UI's alphabetical one, so AU and KL come first.
    state: dict[str, Any] = {
        "searchFilter": search_filter,
        "selectedColumns": columns,
        "columnOrder": columns,
    }
    if order_by is not None:
        state |= {"orderByKey": order_by, "orderByAsc": ascending}
    now = int(time.time() * 1000)
    envelope = {"name": name, "createdAt": now, "updatedAt": now, "state": json.dumps(state)}
    client.set_experiment_tag(experiment_id, SAVED_VIEW_PREFIX + key, json.dumps(envelope))


def runs_table_url(
    experiment_id: str,
    view_key: str | None = None,
    search_filter: str | None = None,
    base_url: str = LOCAL_UI,
) -> str:
    """The experiment's runs table in the MLflow UI at base_url (or, with base_url "", the
    page's link within the UI), in a saved view (save_runs_view) or filtered by an MLflow
    search filter.

    MLflow 3.17 opens an experiment on its GenAI overview unless the URL says
    workflowType=machine_learning (or the browser remembers the "Model training" switch): the
    experiment tag mlflow.experimentKind no longer decides it.
    """
    query = {}
    if view_key is not None:
        query["viewStateShareKey"] = view_key
    if search_filter:
        query["searchFilter"] = search_filter
    page = f"#/experiments/{experiment_id}/runs?{MODEL_TRAINING}"
    page += f"&{urlencode(query)}" if query else ""
    return f"{base_url.rstrip('/')}/{page}" if base_url else page  # "": a link within the UI
