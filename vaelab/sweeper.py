"""vaelab's Optuna sweeper: Hydra's Optuna sweeper plugin (1.4.0rc3), extended where users of
the stock plugin keep tripping.

- Each job gets its trial (`sweep.trial_number`, `sweep.study_name`, `sweep.storage`), so it
  can report per-epoch values for pruning and record the KL constraint on the trial itself.
- A job that raises is a FAILED trial with its reason, a pruned job a PRUNED trial, a NaN
  objective a FAILED trial; the sweep goes on until failures exceed
  `max_failure_rate` x `n_trials` (the stock plugin aborts on the first failure of a batch).
- `n_trials` counts the whole study: re-running a sweep resumes it, and trials left RUNNING
  by a dead sweep process are failed and their MLflow runs closed as KILLED.
- One MLflow parent run per study, one child run per trial, and a summary with plots.

Hydra 1.4 finds this class through the `hydra.plugins` entry point in pyproject.toml; its
config is `hydra/sweeper=vaelab_optuna` (registered below). It subclasses the plugin's
implementation class, so it is tied to hydra-optuna-sweeper==1.4.0rc3 (pinned, and tested in
tests/test_sweep.py).
"""

import functools
import logging
import math
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn, JobStatus
from hydra.utils import execution_whitelist, instantiate
from hydra_plugins.hydra_optuna_sweeper._impl import (
    OptunaSweeperImpl,
    create_params_from_overrides,
)
from hydra_plugins.hydra_optuna_sweeper.config import OptunaSweeperConf
from omegaconf import DictConfig
from optuna.trial import TrialState

from vaelab.settings import TRUSTED_TARGETS
from vaelab.sweep_report import report_sweep
from vaelab.trial import open_storage

log = logging.getLogger(__name__)

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


@dataclass
class VaelabOptunaSweeperConf(OptunaSweeperConf):
    """The stock plugin's settings, plus how long a silent RUNNING trial may live."""

    _target_: str = "vaelab.sweeper.VaelabOptunaSweeper"
    # Trials launched at once. More than 1 only helps with a parallel launcher
    # (hydra/launcher=joblib); each trial's torch then gets cores / n_jobs threads.
    n_jobs: int = 1
    # The sweep stops once failed trials exceed this share of n_trials (the stock plugin's
    # 0.0 stops at the first failure).
    max_failure_rate: float = 0.25
    # A RUNNING trial whose sweep process is gone (same host), or whose job has not sent a
    # heartbeat for this many seconds (any host), is failed when a sweep starts on the study.
    stale_after_seconds: float = 3600.0


ConfigStore.instance().store(
    group="hydra/sweeper", name="vaelab_optuna", node=VaelabOptunaSweeperConf, provider="vaelab"
)


class VaelabOptunaSweeper(OptunaSweeperImpl):
    """Hydra sweeper: Optuna trials as vaelab training jobs, recorded in Optuna and MLflow."""

    def __init__(
        self,
        sampler: Any,
        direction: Any,
        storage: Any | None,
        study_name: str | None,
        n_trials: int,
        n_jobs: int,
        max_failure_rate: float,
        custom_search_space: str | None,
        params: DictConfig | None,
        stale_after_seconds: float = 3600.0,
    ) -> None:
        # The sampler comes from Optuna or the plugin (as in the stock OptunaSweeper), never
        # from anything a config could name.
        sampler = instantiate(
            sampler,
            _execution_whitelist_=("hydra_plugins.hydra_optuna_sweeper.*", "optuna.samplers.*"),
        )
        super().__init__(
            sampler,
            direction,
            storage,
            study_name,
            n_trials,
            n_jobs,
            max_failure_rate,
            custom_search_space,
            params,
        )
        self.stale_after_seconds = stale_after_seconds

    def sweep(self, arguments: list[str]) -> None:
        """Run the study up to n_trials finished trials, resuming whatever it already holds."""
        assert self.config is not None and self.launcher is not None
        self._process_searchspace_config()
        search_space, fixed_params, fixed_overrides = create_params_from_overrides(
            self._parse_sweeper_params_config() + list(arguments)
        )
        for name in fixed_params:
            if search_space.pop(name, None) is not None:
                log.warning(
                    "%s is both swept and fixed: the fixed value %s is used",
                    name,
                    fixed_params[name],
                )
        self._build_grid_sampler(search_space)
        directions = self._get_directions()
        storage_spec = str(
            self.storage or Path(self.config.paths.output_root) / "optuna" / "journal.log"
        )
        study_name = self.study_name or "vaelab"
        study = optuna.create_study(
            study_name=study_name,
            storage=open_storage(storage_spec),
            sampler=self.sampler,
            directions=directions,
            load_if_exists=True,
        )
        with execution_whitelist(list(TRUSTED_TARGETS)):
            tracker = instantiate(self.config.tracking)
        self._fail_stale_trials(study, tracker)
        search_space_text = {name: str(dist) for name, dist in search_space.items()}
        parent_run_id = tracker.sweep_parent_run(
            study_name,
            tags={
                "sweep.study_name": study_name,
                "sweep.storage": storage_spec,
                "sweep.sampler": type(self.sampler).__name__,
                "sweep.directions": ",".join(directions),
                "sweep.search_space": str(search_space_text),
                "sweep.dir": str(self.config.hydra.sweep.dir),
            },
        )
        already = len(study.get_trials(deepcopy=False, states=FINISHED))
        log.info(
            "Study %r in %s: %d trials finished already, n_trials %d; sampler %s, directions %s",
            study_name,
            storage_spec,
            already,
            self.n_trials,
            type(self.sampler).__name__,
            directions,
        )
        parallel = 1 if "BasicLauncher" in type(self.launcher).__name__ else self.n_jobs
        allowed_failures = math.floor(self.max_failure_rate * self.n_trials)
        failures = 0
        while (batch_size := min(self.n_jobs, self._trials_to_go(study))) > 0:
            trials = [study.ask() for _ in range(batch_size)]
            for trial in trials:
                # Who owns this RUNNING trial, so a later sweep can tell whether it died.
                trial.set_user_attr("sweeper_host", socket.gethostname())
                trial.set_user_attr("sweeper_pid", os.getpid())
            trial_settings = self._configure_trials(
                trials, search_space, fixed_params, fixed_overrides
            )
            overrides = [
                (
                    *trial_overrides,
                    f"sweep.trial_number={trial.number}",
                    f"sweep.study_name={study_name}",
                    f"sweep.storage='{storage_spec}'",
                    f"sweep.parent_run_id={parent_run_id}",
                    f"sweep.n_parallel={parallel}",
                )
                for trial, trial_overrides in zip(trials, trial_settings, strict=True)
            ]
            returns = self.launcher.launch(overrides, initial_job_idx=self.job_idx)
            self.job_idx += len(returns)
            for trial, ret in zip(trials, returns, strict=True):
                failures += self._tell(study, trial, ret, len(directions)) == TrialState.FAIL
            if failures > allowed_failures:
                report_sweep(study, self.config, tracker, parent_run_id, storage_spec)
                raise RuntimeError(
                    f"{failures} failed trials exceed max_failure_rate={self.max_failure_rate} "
                    f"of n_trials={self.n_trials}; see the trials' fail_reason in study "
                    f"{study_name!r} ({storage_spec}) or the FAILED runs in MLflow"
                )
        report_sweep(study, self.config, tracker, parent_run_id, storage_spec)

    def _trials_to_go(self, study: optuna.Study) -> int:
        """Trials still to ask: n_trials counts every trial of the study, in any process."""
        live = (*FINISHED, TrialState.RUNNING, TrialState.WAITING)
        return self.n_trials - len(study.get_trials(deepcopy=False, states=live))

    def _build_grid_sampler(self, search_space: dict[str, Any]) -> None:
        """A GridSampler needs the search space itself (as the stock plugin does)."""
        is_grid = (
            isinstance(self.sampler, functools.partial)
            and self.sampler.func == optuna.samplers.GridSampler
        )
        if is_grid:
            grid = {name: self._to_grid_sampler_choices(d) for name, d in search_space.items()}
            self.sampler = self.sampler(grid)
            self.n_trials = min(self.n_trials, math.prod(len(v) for v in grid.values()))

    @staticmethod
    def _tell(
        study: optuna.Study, trial: optuna.Trial, ret: JobReturn, n_objectives: int
    ) -> TrialState:
        """Record one job's outcome in the study; never raises for a bad job."""
        if ret.status == JobStatus.COMPLETED:
            value = ret.return_value
            values = list(value) if isinstance(value, (list, tuple)) else [value]
            reason = None
            try:
                values = [float(v) for v in values]
            except (TypeError, ValueError):
                reason = f"objective must be float-castable, got {value!r}"
            if reason is None and len(values) != n_objectives:
                reason = f"expected {n_objectives} objective values, got {len(values)}"
            if reason is None and not all(math.isfinite(v) for v in values):
                reason = f"objective is not finite: {values}"
            if reason is None:
                _tell_study(study, trial, TrialState.COMPLETE, values)
                log.info("Trial %d complete: %s", trial.number, values)
                return TrialState.COMPLETE
        else:
            error = ret._return_value  # the job's exception (JobReturn.return_value re-raises it)
            if isinstance(error, optuna.TrialPruned):
                _tell_study(study, trial, TrialState.PRUNED)
                log.info("Trial %d pruned: %s", trial.number, error)
                return TrialState.PRUNED
            reason = f"{type(error).__name__}: {error}"
        trial.set_user_attr("fail_reason", reason[:2000])
        _tell_study(study, trial, TrialState.FAIL)
        log.warning("Trial %d failed: %s", trial.number, reason)
        return TrialState.FAIL

    def _fail_stale_trials(self, study: optuna.Study, tracker: Any) -> None:
        """Fail RUNNING trials left by a sweep process that died, and close their MLflow runs."""
        host = socket.gethostname()
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            attrs = trial.user_attrs
            owner_gone = attrs.get("sweeper_host") == host and not _pid_alive(
                attrs.get("sweeper_pid")
            )
            last_sign = attrs.get("heartbeat", trial.datetime_start.timestamp())
            silent = time.time() - last_sign > self.stale_after_seconds
            if not (owner_gone or silent):
                continue
            why = (
                f"stale: its sweep process (pid {attrs.get('sweeper_pid')} on {host}) is gone"
                if owner_gone
                else f"stale: no heartbeat for {self.stale_after_seconds:.0f} s"
            )
            study._storage.set_trial_user_attr(trial._trial_id, "fail_reason", why)
            try:
                study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
            except optuna.exceptions.UpdateFinishedTrialError:
                continue  # another sweep process settled it first
            if "mlflow_run_id" in attrs:
                tracker.close_run(attrs["mlflow_run_id"], "KILLED", why)
            log.warning("Trial %d was left RUNNING; marked FAILED (%s)", trial.number, why)


def _tell_study(
    study: optuna.Study, trial: optuna.Trial, state: TrialState, values: list[float] | None = None
) -> None:
    """study.tell, tolerating the GridSampler's study.stop() once the grid is exhausted: that
    call is meant for study.optimize and raises under ask-and-tell (as the stock plugin found)."""
    try:
        study.tell(trial, values=values, state=state)
    except RuntimeError as err:
        if "Study.stop" not in str(err):
            raise


def _pid_alive(pid: int | None) -> bool:
    """Whether a process with this id exists on this host."""
    if pid is None:
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
