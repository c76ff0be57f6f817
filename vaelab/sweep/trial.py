"""The training job's side of a sweep: its Optuna trial, reached through the shared storage.

Hydra's stock Optuna sweeper never hands the job its trial. vaelab's sweeper
(`vaelab.sweep.sweeper`) fills the job's `optuna_trial` group (study_name, storage, number,
parent_run_id, n_parallel); the job loads the study from the storage and, through its trial,
reports the objective every epoch, asks the pruner whether to stop, records the KL constraint,
and leaves a heartbeat so that a later sweep can tell a dead trial from a running one.

    trial = SweepTrial.from_config(cfg)  # None in a single run
    trial.start(mlflow_run_id, run_dir)
    if trial.should_prune(epoch, metrics): ...
    constraint = trial.finish(final_metrics, verdict)
"""

import logging
import os
import socket
import time
from pathlib import Path

import optuna
from omegaconf import DictConfig, OmegaConf

from vaelab.config import build, objective_names
from vaelab.errors import ConfigError
from vaelab.sweep.storage import open_storage

log = logging.getLogger(__name__)

KL_CONSTRAINT = "kl"  # Optuna constraint name; feasible when ≤ 0
# The final metrics a trial copies to its user attrs, read by the sweep's summary and plots.
RECORDED_METRICS = ("final/active_units", "final/kl", "final/recon", "final/mi")


class SweepTrial:
    """One Optuna trial as its training job sees it."""

    def __init__(
        self,
        study_name: str,
        storage: str,
        number: int,
        parent_run_id: str | None,
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
            self.study._study_id, number
        )
        self.trial = optuna.trial.Trial(self.study, trial_id)
        self.study_name = study_name
        self.number = number
        self.parent_run_id = parent_run_id
        self.kl_threshold = kl_threshold
        self.objectives = objectives
        # Optuna prunes on one reported value; a Pareto sweep has several, so it never prunes.
        self.prunes = pruner is not None and len(objectives) == 1

    @classmethod
    def from_config(cls, cfg: DictConfig) -> "SweepTrial | None":
        """The job's trial when a vaelab sweep launched it (optuna_trial.number set), else None.

        Reads `optuna_trial` (filled by the sweeper) and the user's `sweep.objective`,
        `sweep.kl_threshold` and `sweep.pruner` (an empty node, sweep/pruner=none, prunes nothing).
        """
        handed = cfg.optuna_trial
        if handed.number is None:
            return None
        if not handed.study_name or not handed.storage:
            raise ConfigError(
                "optuna_trial.number is set but optuna_trial.study_name or optuna_trial.storage "
                "is not: these keys are the sweeper's to fill, leave them out of the command line"
            )
        pruner_node = OmegaConf.select(cfg, "sweep.pruner")
        return cls(
            study_name=handed.study_name,
            storage=handed.storage,
            number=int(handed.number),
            parent_run_id=handed.parent_run_id,
            kl_threshold=float(cfg.sweep.kl_threshold),
            pruner=build(pruner_node) if pruner_node else None,
            objectives=objective_names(cfg.sweep.objective),
        )

    def start(self, mlflow_run_id: str, run_dir: Path) -> None:
        """Tie the trial to its MLflow run and to this process (for stale-trial detection)."""
        self.trial.set_user_attr("mlflow_run_id", mlflow_run_id)
        self.trial.set_user_attr("run_dir", str(run_dir))
        self.trial.set_user_attr("host", socket.gethostname())
        self.trial.set_user_attr("pid", os.getpid())
        self.trial.set_user_attr("heartbeat", time.time())

    def should_prune(self, epoch: int, metrics: dict[str, float]) -> bool:
        """Leave a heartbeat, report this epoch's objective, and ask the pruner whether to stop."""
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
        constraint = self.kl_threshold - final_metrics["final/kl"]
        self.trial.set_constraint(KL_CONSTRAINT, constraint)
        self.trial.set_user_attr("constraint_kl", constraint)
        self.trial.set_user_attr("feasible", constraint <= 0)
        self.trial.set_user_attr("collapse_verdict", verdict)
        for name in RECORDED_METRICS:
            self.trial.set_user_attr(name.replace("final/", "val_"), final_metrics[name])
        return constraint
