"""The training job's side of a sweep: its Optuna trial, reached through the shared storage.

Hydra's stock Optuna sweeper never hands the job its trial. vaelab's sweeper
(`vaelab.sweep.sweeper`) fills the job's `optuna_trial` group (study_name, storage, number,
parent_run_id, worker_slot); the job loads the study from the storage and, through its trial,
reports the objective every epoch, asks the pruner whether to stop, and records its constraints
(vaelab.diagnostics.sweep_constraints). The sweeper, not the job, beats the trial's heartbeat.

    trial = SweepTrial.from_config(cfg)  # None in a single run
    trial.start(mlflow_run_id, run_dir, run_name)
    if trial.should_prune(epoch, metrics): ...
    trial.finish(final_metrics, verdict, constraints)
"""

import logging
import math
import os
import socket
from pathlib import Path

import optuna
from omegaconf import DictConfig, OmegaConf

from vaelab.config import build, objective_names
from vaelab.diagnostics import Constraint
from vaelab.errors import ConfigError
from vaelab.sweep.storage import open_storage

log = logging.getLogger(__name__)

# The final metrics a trial copies to its user attrs (final/kl -> val_kl), read by the sweep's
# summary, its plots and the dashboard. KL = MI + marginal KL (Hoffman & Johnson 2016), and
# recon against recon_z0 is the decoder_uses_z constraint: together they say why a trial broke.
RECORDED_METRICS = (
    "final/active_units",
    "final/kl",
    "final/mi",
    "final/kl_marginal",
    "final/recon",
    "final/recon_z0",
)


class SweepTrial:
    """One Optuna trial as its training job sees it."""

    def __init__(
        self,
        study_name: str,
        storage: str,
        number: int,
        parent_run_id: str | None,
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
        self.objectives = objectives
        # Optuna prunes on one reported value; a Pareto sweep has several, so it never prunes.
        self.prunes = pruner is not None and len(objectives) == 1

    @classmethod
    def from_config(cls, cfg: DictConfig) -> "SweepTrial | None":
        """The job's trial when a vaelab sweep launched it (optuna_trial.number set), else None.

        Reads `optuna_trial` (filled by the sweeper) and the user's `sweep.objective` and
        `sweep.pruner` (an empty node, sweep/pruner=none, prunes nothing).
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
            pruner=build(pruner_node) if pruner_node else None,
            objectives=objective_names(cfg.sweep.objective),
        )

    def start(self, mlflow_run_id: str, run_dir: Path, run_name: str | None = None) -> None:
        """Tie the trial to its MLflow run (closed as KILLED if the worker dies) and its folder."""
        self.trial.set_user_attr("mlflow_run_id", mlflow_run_id)
        if run_name:  # what the MLflow UI lists; the sweep's summary names the best trial by it
            self.trial.set_user_attr("mlflow_run_name", run_name)
        self.trial.set_user_attr("run_dir", str(run_dir))
        self.trial.set_user_attr("host", socket.gethostname())
        self.trial.set_user_attr("pid", os.getpid())

    def should_prune(self, epoch: int, metrics: dict[str, float]) -> bool:
        """Report this epoch's objective and ask the pruner whether to stop."""
        if not self.prunes:
            return False
        self.trial.report(metrics[self.objectives[0]], step=epoch)
        return self.trial.should_prune()

    def finish(
        self,
        final_metrics: dict[str, float],
        verdict: dict[str, object],
        constraints: list[Constraint],
        latent_dim: int | None = None,
    ) -> tuple[bool, str]:
        """Set every constraint on the trial and record why it is (in)feasible as user attrs;
        return whether it is feasible and why, in one line ("infeasible: kl broken: raw KL ≥
        0.5 nats (found 0.31); mi holds: ...").

        Optuna 5 reads constraints set on the trial (Trial.set_constraint; the sampler's
        `constraints_func` is deprecated since 5.0.0): the trial is feasible when every value
        is ≤ 0. The user attrs say the same for people and the sweep's summary: `feasible`,
        `broken_constraints` (names), `constraint_meanings` ({name: what must hold}),
        `constraint_<name>` (each value), the collapse verdict and its failed checks, and the
        RECORDED_METRICS as val_<name>, and `feasibility`, the returned line.
        """
        values = {}
        for constraint in constraints:
            value = constraint.value
            if math.isnan(value):  # Optuna refuses NaN; a constraint not measured is not met
                log.warning("Constraint %s is NaN: counted as broken (+inf)", constraint.name)
                value = math.inf
            self.trial.set_constraint(constraint.name, value)
            values[constraint.name] = value
        broken = [name for name, value in values.items() if value > 0]
        self.trial.set_user_attr("feasible", not broken)
        self.trial.set_user_attr("broken_constraints", broken)
        self.trial.set_user_attr("constraint_meanings", {c.name: c.meaning for c in constraints})
        for name, value in values.items():
            self.trial.set_user_attr(f"constraint_{name}", value)
        self.trial.set_user_attr("collapse_verdict", verdict["verdict"])
        self.trial.set_user_attr("collapse_failed", verdict["failed"])
        for name in RECORDED_METRICS:
            self.trial.set_user_attr(name.replace("final/", "val_"), final_metrics[name])
        if latent_dim is not None:  # AU is read "of latent_dim" in the sweep's summary
            self.trial.set_user_attr("latent_dim", latent_dim)
        # A broken constraint first: it is the reason; the ones that hold follow.
        said = sorted(constraints, key=lambda c: values[c.name] <= 0)
        reasons = "; ".join(
            str(c) if values[c.name] == c.value else f"{c} (not measured)" for c in said
        )
        feasibility = f"{'infeasible' if broken else 'feasible'}: {reasons}"
        self.trial.set_user_attr("feasibility", feasibility)
        log.info("Trial %d %s", self.number, feasibility)
        return not broken, feasibility
