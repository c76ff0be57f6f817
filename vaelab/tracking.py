"""The MLflow record of a run: where it goes and how it is written.

By default the store is a local SQLite file under multirun/, with artifacts beside it, so a
fresh clone records runs with no server; `tracking.uri` points anywhere MLflow can write.
"""

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

MAX_PARAM_LENGTH = 6000  # MLflow rejects longer parameter values


class MlflowTracker:
    """Opens one MLflow run per training run in a named experiment."""

    def __init__(self, uri: str, experiment: str, artifact_root: str) -> None:
        self.uri = uri
        self.experiment = experiment
        self.artifact_root = artifact_root

    def _experiment_id(self) -> str:
        """The experiment's id, creating it (with artifacts under artifact_root) if new."""
        mlflow.set_tracking_uri(self.uri)
        existing = mlflow.get_experiment_by_name(self.experiment)
        if existing is not None:
            return existing.experiment_id
        # A local store keeps its artifacts next to it, under multirun/, not in ./mlruns.
        is_local = self.uri.startswith(("sqlite:", "file:")) or "://" not in self.uri
        location = Path(self.artifact_root).resolve().as_uri() if is_local else None
        try:
            return mlflow.create_experiment(self.experiment, artifact_location=location)
        except MlflowException:
            # Another process (a parallel trial) created it first.
            return mlflow.get_experiment_by_name(self.experiment).experiment_id

    @contextmanager
    def start_run(
        self, run_name: str | None = None, tags: dict[str, str] | None = None
    ) -> Iterator[str]:
        """A run that ends FINISHED, or FAILED with the error recorded as the `error` tag."""
        experiment_id = self._experiment_id()
        with mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=tags) as run:
            log.info(
                "MLflow run %s in experiment %r at %s", run.info.run_id, self.experiment, self.uri
            )
            try:
                yield run.info.run_id
            except BaseException as err:
                reason = f"{type(err).__name__}: {err}"
                mlflow.set_tag("error", reason[:5000])
                status = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"
                mlflow.end_run(status=RunStatus.to_string(getattr(RunStatus, status)))
                raise


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


def log_verdict(verdict: dict[str, object], kl_per_dim: list[float]) -> None:
    """The end-of-run collapse verdict as tags, and the per-dimension KL as a tag and metrics."""
    mlflow.set_tags({f"collapse/{k}": str(v) for k, v in verdict.items()})
    mlflow.set_tag("collapse/kl_per_dim", json.dumps([round(v, 5) for v in kl_per_dim]))
    mlflow.log_metrics({f"final/kl_dim_{d:03d}": v for d, v in enumerate(kl_per_dim)})
