"""The training job's side of a sweep: its Optuna trial, reached through the shared storage.

Hydra's stock Optuna sweeper never hands the job its trial. vaelab's sweeper
(`vaelab.sweeper`) passes each job `sweep.trial_number`, `sweep.study_name` and
`sweep.storage`; the job loads the study from the storage and, through its trial, records the
KL constraint, reports the objective every epoch, asks the pruner whether to stop, and leaves a
heartbeat so that a later sweep can tell a dead trial from a running one.
"""

import logging
import os
import socket
import time
from pathlib import Path

import optuna
from optuna.storages import BaseStorage, JournalStorage
from optuna.storages.journal import JournalFileBackend

from vaelab.errors import ConfigError

log = logging.getLogger(__name__)

KL_CONSTRAINT = "kl"  # Optuna constraint name; feasible when ≤ 0


def open_storage(spec: str) -> str | BaseStorage:
    """An Optuna storage from config: a database URL as it is, or a journal file.

    A plain path becomes a JournalStorage on that file: several processes append to it
    safely (file lock), with no database server, which SQLite cannot promise when sweepers
    race to create one study.
    """
    if "://" in spec:
        return spec
    path = Path(spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(path)))


class SweepTrial:
    """One Optuna trial as its training job sees it."""

    def __init__(
        self,
        study_name: str,
        storage: str,
        trial_number: int,
        kl_threshold: float,
        pruner: optuna.pruners.BasePruner | None,
        objectives: list[str],
    ) -> None:
        self.study = optuna.load_study(
            study_name=study_name,
            storage=open_storage(storage),
            pruner=pruner or optuna.pruners.NopPruner(),
        )
        trial_id = self.study._storage.get_trial_id_from_study_id_trial_number(
            self.study._study_id, trial_number
        )
        self.trial = optuna.trial.Trial(self.study, trial_id)
        self.number = trial_number
        self.kl_threshold = kl_threshold
        self.objectives = objectives
        # Optuna prunes on one reported value; a Pareto sweep has several, so it never prunes.
        self.prunes = pruner is not None and len(objectives) == 1

    def start(self, mlflow_run_id: str, run_dir: Path) -> None:
        """Tie the trial to its MLflow run and to this process (for stale-trial detection)."""
        self.trial.set_user_attr("mlflow_run_id", mlflow_run_id)
        self.trial.set_user_attr("run_dir", str(run_dir))
        self.trial.set_user_attr("host", socket.gethostname())
        self.trial.set_user_attr("pid", os.getpid())
        self.trial.set_user_attr("heartbeat", time.time())

    def should_stop(self, epoch: int, metrics: dict[str, float]) -> bool:
        """Report this epoch's objective and ask the pruner whether the trial is hopeless."""
        self.trial.set_user_attr("heartbeat", time.time())
        if not self.prunes:
            return False
        self.trial.report(metrics[self.objectives[0]], step=epoch)
        return self.trial.should_prune()

    def finish(self, final_metrics: dict[str, float], verdict: str) -> float:
        """Record the KL constraint and the outcome; return the constraint value.

        Constraint = sweep.kl_threshold − raw validation KL (nats per sample): a trial whose
        KL fell below the threshold has a positive value and is infeasible. Optuna 5 reads
        constraints set on the trial (Trial.set_constraint); its sampler `constraints_func`
        is deprecated since 5.0.0.
        """
        kl = final_metrics["final/kl"]
        constraint = self.kl_threshold - kl
        self.trial.set_constraint(KL_CONSTRAINT, constraint)
        self.trial.set_user_attr("constraint_kl", constraint)
        self.trial.set_user_attr("feasible", constraint <= 0)
        self.trial.set_user_attr("collapse_verdict", verdict)
        for name in ("final/active_units", "final/kl", "final/recon", "final/mi"):
            self.trial.set_user_attr(name.replace("final/", "val_"), final_metrics[name])
        return constraint


def sweep_trial_from_config(sweep_cfg, pruner) -> SweepTrial | None:  # noqa: ANN001
    """The job's trial when a vaelab sweep launched it (sweep.trial_number set), else None."""
    if sweep_cfg.trial_number is None:
        return None
    if not sweep_cfg.study_name or not sweep_cfg.storage:
        raise ConfigError("sweep.trial_number is set but sweep.study_name or sweep.storage is not")
    return SweepTrial(
        study_name=sweep_cfg.study_name,
        storage=sweep_cfg.storage,
        trial_number=int(sweep_cfg.trial_number),
        kl_threshold=float(sweep_cfg.kl_threshold),
        pruner=pruner,
        objectives=objective_names(sweep_cfg.objective),
    )


def objective_names(objective) -> list[str]:  # noqa: ANN001
    """`sweep.objective` as a list: one metric name, or several for a Pareto sweep."""
    if isinstance(objective, str):
        return [objective]
    return [str(name) for name in objective]
