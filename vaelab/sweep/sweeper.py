"""vaelab's Optuna sweeper: Hydra's Optuna sweeper plugin (1.4.0rc3), extended where users of
the stock plugin keep tripping. Any Hydra app can use it (`hydra/sweeper=vaelab_optuna`).

- The config is checked once before the first trial: one trial's config is composed (every
  swept key must exist in it) and, if `validate` names a function, handed to it. A wrong
  config stops the sweep with one message, not with every trial failing the same way.
- A job that raises is a FAILED trial with its reason, a pruned job a PRUNED trial, a NaN or
  malformed objective a FAILED trial; the sweep goes on until failures exceed
  `max_failure_rate` x `n_trials`, and then stops with the last job's error as the cause (the
  stock plugin judges each batch alone, 0.0 by default, and never counts a rejected value).
- A sweep process is a worker: run the same command N times, on one machine or several, with
  the same `study_name` and `storage`, and N workers share the study, each in a sweep folder of
  its own, each asking for its next trial as soon as its last one ends. `n_trials` counts the
  whole study: exactly n_trials trials run to an outcome, however the workers race (a trial
  asked beyond it is closed untrained and not counted), and re-running a sweep resumes it.
- A trial whose worker died (its pid gone on this host, or no heartbeat for
  `stale_after_seconds`) is failed, not counted, and its parameters run again in a new trial,
  up to `max_retries` times. With no `study_name`, each sweep gets a study of its own (and, with
  no `storage`, its own journal file), so two runs never share one by accident.
- A password in a `storage` URL never reaches a log, a tag, a job's config or a file: the
  sweeper takes it out and hands it to its jobs in VAELAB_STORAGE_PASSWORD.
- An app whose config has an `optuna_trial` group gets its trial's keys (number, study_name,
  storage, parent_run_id, worker_slot), so the job can report per-epoch values for pruning and
  record constraints on its own trial (vaelab.sweep.trial); other apps get only their params.
- With a `tracking` node: one MLflow parent run per study, one child run per trial (the job's
  own), and a summary with plots. Without one, MLflow is never imported.
- Whatever stops the sweep (the failure budget, a bug, Ctrl-C) leaves nothing RUNNING: this
  process's trials are failed and the parent run closed, each with the reason.

Hydra 1.4 finds this class through the `hydra.plugins` entry point in pyproject.toml and
imports this module in every app it starts, so it imports nothing heavy (MLflow and
matplotlib come with `tracking`, built by instantiate). It subclasses the plugin's
implementation class, so it is tied to hydra-optuna-sweeper==1.4.0rc3 (pinned; the plugin's
own test suite runs against this class in tests/test_sweeper_stock_suite.py).
"""

import functools
import itertools
import logging
import math
import os
import re
import socket
import threading
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.types import Quote, QuotedString
from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import CompactHydraException, HydraException
from hydra.utils import instantiate
from hydra_plugins.hydra_optuna_sweeper._impl import (
    OptunaSweeperImpl,
    create_params_from_overrides,
)
from hydra_plugins.hydra_optuna_sweeper.config import OptunaSweeperConf
from omegaconf import MISSING, DictConfig, OmegaConf, open_dict, read_write
from omegaconf.errors import OmegaConfBaseException
from optuna.distributions import BaseDistribution, CategoricalDistribution
from optuna.storages._heartbeat import is_heartbeat_enabled
from optuna.trial import FrozenTrial, TrialState

from vaelab.config import build, objective_names
from vaelab.errors import ConfigError, VaelabError
from vaelab.runtime import pid_alive, worker_slot
from vaelab.sweep.storage import (
    HEARTBEAT_SECONDS,
    PASSWORD_VARIABLE,
    journal_path,
    masked,
    open_storage,
    split_password,
)
from vaelab.sweep.summary import (
    NOT_COUNTED,
    counted,
    is_feasible,
    log_summary,
    summarise,
    write_results,
)

if TYPE_CHECKING:  # for annotations only: importing it would load MLflow in every Hydra app
    from vaelab.sweep.record import MlflowSweepRecord

log = logging.getLogger(__name__)


class _HandedKeysHidden(logging.Filter):
    """Drops the optuna_trial.* overrides from the launchers' "#3 : schedule.beta=0.1 ..." lines.

    Hydra's launchers log each job's overrides but hide only hydra.* keys; the trial's study,
    storage, parent run and slot are the sweeper's plumbing (each job's .hydra/overrides.yaml
    keeps them), and they made every launch line several hundred characters long.
    """

    HANDED = re.compile(r"\s*optuna_trial\.\w+=('[^']*'|\"[^\"]*\"|\S+)")

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and "optuna_trial." in record.msg:
            record.msg = self.HANDED.sub("", record.msg)
        return True


# The loggers of the launchers vaelab configures (basic, joblib, submitit).
for _launcher in (
    "hydra._internal.core_plugins.basic_launcher",
    "hydra_plugins.hydra_joblib_launcher._core",
    "hydra_plugins.hydra_submitit_launcher.submitit_launcher",
):
    logging.getLogger(_launcher).addFilter(_HandedKeysHidden())

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
PARENT_RUN_ATTR = "mlflow_parent_run_id"  # the study's user attr naming its MLflow parent run
WAITING = TrialState.WAITING
IDLE_POLL_SECONDS = 2.0  # how often a worker with nothing to ask checks the others' trials
PARENT_WAIT_SECONDS = 60.0  # how long a joining worker waits for the creator's parent run
WORKER_FILE = ".worker"  # in a sweep folder: the host and pid of the worker that claimed it
MAX_REASON_LENGTH = 2000  # characters of a fail_reason user attr


@dataclass
class SweepTrackingConf:
    """Where the sweep records itself in MLflow: vaelab.tracking.MlflowTracker's arguments."""

    _target_: str = "vaelab.sweep.record.MlflowSweepRecord"
    uri: str = MISSING  # MLflow tracking URI, e.g. sqlite:///multirun/mlflow.db
    experiment: str = MISSING  # MLflow experiment of the parent run and the trials' runs
    artifact_root: str = MISSING  # where a local store keeps its artifacts


@dataclass
class VaelabOptunaSweeperConf(OptunaSweeperConf):
    """The stock plugin's settings, with vaelab's defaults and its own settings below."""

    _target_: str = "vaelab.sweep.sweeper.VaelabOptunaSweeper"
    # Trials launched at once. More than 1 only helps with a parallel launcher
    # (hydra/launcher=joblib); each trial's torch then gets cores / n_jobs threads.
    n_jobs: int = 1
    # The sweep stops once failed trials exceed this share of n_trials (the stock plugin's
    # 0.0 stops at the first failure).
    max_failure_rate: float = 0.25
    # With `storage` null, a study lives in the journal file <journal_dir>/<study_name>.journal.
    # (With `study_name` null, the study is named after the job and the sweep's start time.)
    journal_dir: str = "${hydra.sweep.dir}"
    # A RUNNING trial whose worker is gone (same host), or whose job has sent no heartbeat for
    # this many seconds (any host; jobs beat every 30 s), is failed, and its parameters run
    # again in a new trial, at most max_retries times for one set of parameters.
    stale_after_seconds: float = 120.0
    max_retries: int = 2
    # MLflow parent run of the study; null: no MLflow at all.
    tracking: SweepTrackingConf | None = None
    # A function (dotted path, vaelab.* only) called once with one trial's config before the
    # first trial; it raises to stop the sweep. vaelab's: vaelab.config.check_run_config.
    validate: str | None = None
    # A function (dotted path, vaelab.* only) called as f(run_dir, mlflow_run_id) on each of
    # the `evaluate_best` best feasible trials, by the worker that ends the study: vaelab's,
    # vaelab.evaluate.evaluate_trial, makes the downstream report its trials deferred.
    evaluate: str | None = None
    evaluate_best: int = 1


ConfigStore.instance().store(
    group="hydra/sweeper", name="vaelab_optuna", node=VaelabOptunaSweeperConf, provider="vaelab"
)


class SweepConfigError(ConfigError, CompactHydraException):
    """A sweep config that cannot work, found before the first trial (Hydra prints the message
    alone, without a traceback)."""


class Heartbeat:
    """While a worker's jobs train, a thread tells the storage every HEARTBEAT_SECONDS that
    their trials are alive: Optuna's heartbeat in a database, the `heartbeat` user attr in a
    journal file. The sweeper beats, not the job, so any Hydra app's trials have one, and a
    job whose worker died stops beating with it."""

    def __init__(self, study: optuna.Study, trials: list[optuna.Trial]) -> None:
        self.study, self.trials = study, trials
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, name="vaelab-heartbeat", daemon=True)

    def __enter__(self) -> "Heartbeat":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()

    def _beat(self) -> None:
        while True:
            for trial in self.trials:
                try:
                    record_heartbeat(self.study, trial)
                except optuna.exceptions.UpdateFinishedTrialError:
                    pass  # told already; the thread stops with the batch
                except Exception as err:  # a lost beat must not stop the sweep
                    log.warning("Heartbeat of trial %d not recorded: %s", trial.number, err)
            if self.stop.wait(HEARTBEAT_SECONDS):
                return


def record_heartbeat(study: optuna.Study, trial: optuna.Trial) -> None:
    """Tell the storage the trial is alive (Optuna's heartbeat where the storage has one)."""
    storage = study._storage
    if is_heartbeat_enabled(storage):
        storage.record_heartbeat(trial._trial_id)
    else:
        storage.set_trial_user_attr(trial._trial_id, "heartbeat", time.time())


class FailureBudgetExceeded(RuntimeError):
    """More trials failed than max_failure_rate x n_trials allows."""


class VaelabOptunaSweeper(OptunaSweeperImpl):
    """Hydra sweeper: Optuna trials as Hydra jobs, optionally recorded in MLflow."""

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
        journal_dir: str,
        stale_after_seconds: float,
        max_retries: int,
        tracking: DictConfig | None,
        validate: str | None,
        evaluate: str | None,
        evaluate_best: int,
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
        self.journal_dir = journal_dir
        self.stale_after_seconds = stale_after_seconds
        self.max_retries = max_retries
        self.tracking = tracking
        self.validate = validate
        self.evaluate = evaluate
        self.evaluate_best = evaluate_best

    def sweep(self, arguments: list[str]) -> None:
        """Check the config, then run the study up to n_trials trials, resuming what it holds.

        The worker's slot on this host is held from the start, so workers started together
        count each other before any of them trains (each trial reads the count when it starts).
        """
        assert self.config is not None and self.launcher is not None
        with worker_slot(self._trials_at_once()) as slot:
            self._sweep(arguments, slot)

    def _sweep(self, arguments: list[str], slot: int) -> None:
        search_space, fixed_params, fixed_overrides = self._search_space(arguments)
        fixed = [*(f"{name}={value}" for name, value in fixed_params.items()), *fixed_overrides]
        self._check_job_config(search_space, fixed)
        self._claim_sweep_dir()
        storage_spec = self._take_out_password()

        self._build_grid_sampler(search_space)
        study, created = self._open_study(storage_spec)
        record: MlflowSweepRecord | None = build(self.tracking) if self.tracking else None
        self._fail_stale_trials(study, record)
        parent_run_id = None
        if record is not None:
            parent_run_id = self._parent_run(study, record, storage_spec, search_space, created)

        try:
            handed = self._trial_keys(study.study_name, storage_spec, parent_run_id, slot)
            self._run_trials(study, search_space, fixed_params, fixed_overrides, handed, record)
            # The best trial's evaluation first: the summary is the last thing a sweep says.
            self._evaluate_best_trials(study)
            self._report(study, record, parent_run_id, storage_spec)
        except BaseException as err:
            try:
                if isinstance(err, FailureBudgetExceeded):
                    self._report(study, record, parent_run_id, storage_spec)  # what did run
            finally:
                self._leave_nothing_running(study, record, parent_run_id, err)
            raise
        if record is not None and not _unfinished(study):
            record.close_parent(parent_run_id, "FINISHED")  # the last worker to end closes it

    def _search_space(
        self, arguments: list[str]
    ) -> tuple[dict[str, BaseDistribution], dict[str, Any], list[str]]:
        """hydra.sweeper.params and the command line's overrides: what is swept, what fixed."""
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
        return search_space, fixed_params, fixed_overrides

    def _take_out_password(self) -> str:
        """The study's storage as every log, tag and job sees it: a database password moves
        to VAELAB_STORAGE_PASSWORD (this process's and so its jobs' environment), and Hydra's
        own record of the command line (multirun.yaml, each job's .hydra) is masked."""
        if self.storage is None:
            journal = journal_path(self.journal_dir, self.study_name or self._new_study_name())
            # Absolute: a job that changes its directory (hydra.job.chdir) still finds it.
            return str(journal.absolute())
        storage_spec, password = split_password(str(self.storage))
        if password is None:
            return storage_spec
        os.environ[PASSWORD_VARIABLE] = password
        hydra_node = self.config.hydra
        with read_write(hydra_node), open_dict(hydra_node):
            hydra_node.sweeper.storage = masked(str(self.storage))
            hydra_node.overrides.hydra = [
                _masked_override(override) for override in hydra_node.overrides.hydra
            ]
        log.info("The storage URL's password is kept out of logs, tags and job configs")
        return storage_spec

    def _open_study(self, storage_spec: str) -> tuple[optuna.Study, bool]:
        """The study, and whether this worker created it: every worker runs this, and exactly
        one creates it (the storage refuses a second study of the same name).

        With no study_name a study of its own (named after the job and the start time), so two
        sweeps never share one by accident; with no storage a journal file of its own.
        """
        study_name = self.study_name or Path(storage_spec).stem
        directions = self._get_directions()
        storage = open_storage(storage_spec, self.stale_after_seconds)
        try:
            study = optuna.create_study(
                study_name=study_name, storage=storage, sampler=self.sampler, directions=directions
            )
            created = True
        except optuna.exceptions.DuplicatedStudyError:
            created = False
            # Another worker made it, or an earlier sweep. With the same seed this worker's
            # sampler would propose what theirs did, trial for trial: it draws a seed of its own.
            self.sampler.reseed_rng()
            study = optuna.load_study(study_name=study_name, storage=storage, sampler=self.sampler)
        # The objectives by name (optuna-dashboard, trials_dataframe and plots say "Objective 0"
        # without): vaelab's app names them in sweep.objective; other apps have no such key.
        objective = OmegaConf.select(self.config, "sweep.objective")
        names = objective_names(objective) if objective is not None else None
        if names and len(names) == len(directions) and study.metric_names != names:
            with warnings.catch_warnings():  # experimental since Optuna 3.2, stable in use
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                study.set_metric_names(names)
        log.info(
            "Study %r in %s: %d trials finished already, n_trials %d; sampler %s, directions %s",
            study_name,
            masked(storage_spec),
            len(study.get_trials(deepcopy=False, states=FINISHED)),
            self.n_trials,
            type(self.sampler).__name__,
            directions,
        )
        return study, created

    def _new_study_name(self) -> str:
        """A study of its own for a sweep that names none: the job name and the start time."""
        return f"{self.config.hydra.job.name}-{datetime.now():%Y-%m-%d_%H-%M-%S_%f}"

    def _parent_run(
        self,
        study: optuna.Study,
        record: "MlflowSweepRecord",
        storage_spec: str,
        search_space: dict[str, BaseDistribution],
        created: bool,
    ) -> str:
        """The study's MLflow parent run, shared by every worker and named in the study.

        The worker that created the study makes it (or finds it, for a study an earlier
        version left unnamed) and tags it; the others wait for its name, so that the MLflow
        experiment and the parent are made once (concurrent creation races: mlflow #4123).
        A joiner that waits in vain makes or finds one itself (of two, both keep the oldest).
        """
        known = study.user_attrs.get(PARENT_RUN_ATTR)
        deadline = time.monotonic() + PARENT_WAIT_SECONDS
        while known is None and not created and time.monotonic() < deadline:
            time.sleep(0.5)
            known = study.user_attrs.get(PARENT_RUN_ATTR)  # read from the storage each time
        tags = self._parent_tags(study, storage_spec, search_space) if known is None else {}
        parent_run_id = record.open_parent(study.study_name, tags, known)
        if parent_run_id != known:
            study.set_user_attr(PARENT_RUN_ATTR, parent_run_id)
        return parent_run_id

    def _trials_at_once(self) -> int:
        """Trials this worker runs at once: one with the basic launcher, else n_jobs."""
        return 1 if "BasicLauncher" in type(self.launcher).__name__ else self.n_jobs

    def _parent_tags(
        self, study: optuna.Study, storage_spec: str, search_space: dict[str, BaseDistribution]
    ) -> dict[str, str]:
        """What the MLflow parent run says about the sweep."""
        return {
            "sweep.study_name": study.study_name,
            "sweep.storage": masked(storage_spec),
            "sweep.sampler": type(self.sampler).__name__,
            "sweep.directions": ",".join(self._get_directions()),
            "sweep.search_space": str({name: str(d) for name, d in search_space.items()}),
            "sweep.dir": str(self.config.hydra.sweep.dir),
        }

    # --- before the first trial -----------------------------------------------------------

    def _check_job_config(
        self, search_space: dict[str, BaseDistribution], fixed: list[str]
    ) -> None:
        """Compose one trial's config and validate it; SweepConfigError naming what is wrong.

        The trial takes the first choice or the low end of each swept distribution: a key
        missing from the job's config, or a value of the wrong type, fails here as it would
        fail every trial.
        """
        sample = [f"{name}={_first_value(dist)}" for name, dist in search_space.items()]
        try:
            job_config = self._compose_job_config([*sample, *fixed])
        except (HydraException, OmegaConfBaseException) as err:
            raise SweepConfigError(self._composition_failure(search_space, fixed, err)) from err
        if not self.validate:
            return
        try:
            check = build(OmegaConf.create({"_target_": self.validate, "_partial_": True}))
        except ConfigError as err:
            raise SweepConfigError(f"hydra.sweeper.validate={self.validate}: {err}") from err
        try:
            check(job_config)
        except Exception as err:
            why = str(err) if isinstance(err, VaelabError) else f"{type(err).__name__}: {err}"
            raise SweepConfigError(
                f"The sweep stopped before its first trial, as {self.validate} found: {why}"
            ) from err

    def _compose_job_config(self, overrides: Sequence[str]) -> DictConfig:
        """The config a job launched with these overrides receives (without `hydra`)."""
        assert self.hydra_context is not None
        config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        with read_write(config), open_dict(config):
            del config["hydra"]
        return config

    def _composition_failure(
        self, search_space: dict[str, BaseDistribution], fixed: list[str], err: Exception
    ) -> str:
        """Why a trial's config does not compose: the swept keys the job's config lacks, or
        Hydra's own message."""
        try:
            job_config = self._compose_job_config(fixed)
        except (HydraException, OmegaConfBaseException):
            job_config = None  # the fixed overrides fail by themselves: Hydra's message says how
        missing = [
            name
            for name in search_space
            if job_config is not None and _is_config_key(name) and not _has_key(job_config, name)
        ]
        if not missing:
            return f"The sweep stopped before its first trial: its config does not compose: {err}"
        parent, _, _ = missing[0].rpartition(".")
        node = OmegaConf.select(job_config, parent) if parent else job_config
        keys = ", ".join(map(str, node)) if isinstance(node, DictConfig) else ""
        there = f" ({parent or 'the root'} has {keys})" if keys else ""
        return (
            f"The sweep stopped before its first trial: it sweeps {', '.join(missing)}, which "
            f"this job's config does not have{there}. Sweep a key the config has, or choose a "
            "config (an experiment, a group option) that has it."
        )

    def _claim_sweep_dir(self) -> None:
        """A sweep folder of this worker's own. Workers on one study that start in the same
        second (or a re-run with a fixed hydra.sweep.dir) would otherwise share Hydra's folder,
        and their jobs, numbered from 0 in each, would write into each other's trial folders.
        A worker claims a folder by creating its WORKER_FILE (O_EXCL: atomic, so two never
        both win); the first keeps the name, the others get _2, _3, ..."""
        wanted = Path(str(self.config.hydra.sweep.dir))
        for attempt in itertools.count(1):
            claimed = wanted if attempt == 1 else wanted.with_name(f"{wanted.name}_{attempt}")
            claimed.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(claimed / WORKER_FILE, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                continue
            with os.fdopen(fd, "w") as file:
                file.write(f"{socket.gethostname()} {os.getpid()}\n")
            break
        if claimed != wanted:
            log.info(
                "%s belongs to another worker or an earlier sweep: this one writes to %s",
                wanted,
                claimed,
            )
        # The launcher reads the sweep's config; each job's is composed anew from Hydra's
        # overrides, so the folder goes there too.
        hydra_node = self.config.hydra
        with read_write(hydra_node), open_dict(hydra_node):
            hydra_node.sweep.dir = str(claimed)
            hydra_node.overrides.hydra = [
                *(o for o in hydra_node.overrides.hydra if not o.startswith("hydra.sweep.dir=")),
                f"hydra.sweep.dir={_quoted(str(claimed))}",
            ]

    def _build_grid_sampler(self, search_space: dict[str, BaseDistribution]) -> None:
        """A GridSampler needs the search space itself (as the stock plugin does)."""
        is_grid = (
            isinstance(self.sampler, functools.partial)
            and self.sampler.func == optuna.samplers.GridSampler
        )
        if is_grid:
            grid = {name: self._to_grid_sampler_choices(d) for name, d in search_space.items()}
            self.sampler = self.sampler(grid)
            self.n_trials = min(self.n_trials, math.prod(len(v) for v in grid.values()))

    def _fail_stale_trials(self, study: optuna.Study, record: "MlflowSweepRecord | None") -> None:
        """Fail the RUNNING trials whose worker died, close their MLflow runs as KILLED, and
        run their parameters again in a new trial (as Optuna's RetryHeartbeatStaleTrialCallback
        does, which only study.optimize would call): the dead trial does not count toward
        n_trials, its retry does.

        Dead: its worker's pid is gone on this host, or its job has been silent for
        stale_after_seconds (Optuna's heartbeat in a database; the `heartbeat` user attr in a
        journal file, which has no heartbeat of its own).
        """
        host = socket.gethostname()
        storage = study._storage
        silent_ids = (
            set(storage._get_stale_trial_ids(study._study_id))
            if is_heartbeat_enabled(storage)
            else set()
        )
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            attrs = trial.user_attrs
            pid = attrs.get("sweeper_pid")
            owner_gone = (
                attrs.get("sweeper_host") == host and pid is not None and not pid_alive(pid)
            )
            last_sign = attrs.get("heartbeat", trial.datetime_start.timestamp())
            silent = trial._trial_id in silent_ids or (
                not is_heartbeat_enabled(storage)
                and time.time() - last_sign > self.stale_after_seconds
            )
            if not (owner_gone or silent):
                continue
            why = (
                f"stale: its worker (pid {attrs.get('sweeper_pid')} on {host}) is gone"
                if owner_gone
                else f"stale: no heartbeat for {self.stale_after_seconds:.0f} s"
            )
            retries = attrs.get("retry_of", [])
            retried = len(retries) < self.max_retries
            if not _fail_trial(study, trial, why, record, not_counted=retried):
                continue  # another worker settled it first
            if retried:
                study.enqueue_trial(trial.params, user_attrs={"retry_of": [*retries, trial.number]})
                log.warning("Trial %d %s: failed, and its parameters run again", trial.number, why)
            else:
                log.warning(
                    "Trial %d %s: failed; not run again, its parameters ran %d times already",
                    trial.number,
                    why,
                    len(retries) + 1,
                )

    # --- the trials -------------------------------------------------------------------------

    def _run_trials(
        self,
        study: optuna.Study,
        search_space: dict[str, BaseDistribution],
        fixed_params: dict[str, Any],
        fixed_overrides: list[str],
        handed: tuple[str, ...],
        record: "MlflowSweepRecord | None",
    ) -> None:
        """Ask, launch and tell, n_jobs trials at a time, until the study holds n_trials.

        A worker with the basic launcher runs one trial and asks for the next as soon as it
        ends; before each ask it fails (and retries) the trials of dead workers. `handed`: the
        overrides that hand each job its trial, besides its number (none for an app without
        an `optuna_trial` group).
        """
        n_objectives = len(study.directions)
        allowed_failures = math.floor(self.max_failure_rate * self.n_trials)
        where_else = " and its FAILED run in MLflow" if self.tracking else ""
        failures, last_failure = 0, None
        while True:
            self._fail_stale_trials(study, record)
            # A waiting trial (a dead worker's retry) is asked even when n_trials is reached:
            # if a fresh trial took its place meanwhile, it is closed as surplus, not left.
            waiting = study.get_trials(deepcopy=False, states=(WAITING,))
            batch_size = min(self.n_jobs, max(self._trials_to_go(study), len(waiting)))
            if batch_size <= 0:
                if not study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                    break
                # Nothing to ask, but other workers' trials still run: stay, so that if their
                # worker dies, this one runs them again.
                time.sleep(IDLE_POLL_SECONDS)
                continue
            trials = []
            for _ in range(batch_size):
                with warnings.catch_warnings():  # the Heartbeat below beats for ask-and-tell
                    warnings.filterwarnings("ignore", "Heartbeat of storage is supposed to be")
                    trial = study.ask()
                # Who owns this RUNNING trial, so another worker can tell whether it died (a
                # database's heartbeat check skips a trial that never beat: beat at once).
                record_heartbeat(study, trial)
                # (pid first: a worker that reads the host must find the pid there already)
                trial.set_user_attr("sweeper_pid", os.getpid())
                trial.set_user_attr("sweeper_host", socket.gethostname())
                if self._is_surplus(study, trial):
                    break
                trials.append(trial)
            if not trials:
                continue
            trial_settings = self._configure_trials(
                trials, search_space, fixed_params, fixed_overrides
            )
            overrides = [
                (*settings, *handed, f"optuna_trial.number={trial.number}") if handed else settings
                for trial, settings in zip(trials, trial_settings, strict=True)
            ]
            with Heartbeat(study, trials):
                returns = self.launcher.launch(overrides, initial_job_idx=self.job_idx)
            self.job_idx += len(returns)
            for trial, ret in zip(trials, returns, strict=True):
                if self._tell(study, trial, ret, n_objectives) == TrialState.FAIL:
                    failures += 1
                    last_failure = _failure(trial, ret)
            if failures > allowed_failures:
                raise FailureBudgetExceeded(
                    f"{failures} failed trials exceed max_failure_rate={self.max_failure_rate} "
                    f"of n_trials={self.n_trials}; each trial's fail_reason is in study "
                    f"{study.study_name!r}{where_else}. The last failure is above."
                ) from last_failure

    def _is_surplus(self, study: optuna.Study, trial: optuna.Trial) -> bool:
        """Whether n_trials counted trials came before this one: then workers raced past
        n_trials (Optuna cannot ask "only if fewer than n"), and the trial is closed untrained
        and not counted. Trial numbers are unique in a study, so every worker agrees."""
        earlier = [t for t in counted(study.get_trials(deepcopy=False)) if t.number < trial.number]
        if len(earlier) < self.n_trials:
            return False
        why = f"surplus: {self.n_trials} trials were asked before it (n_trials)"
        _fail_trial(study, trial, why, record=None, not_counted=True)
        log.info("Trial %d closed untrained, not counted: %s", trial.number, why)
        return True

    def _trials_to_go(self, study: optuna.Study) -> int:
        """Trials still to ask: n_trials counts the study's trials in every worker, all but
        the stale and surplus ones; a stale trial's retry waits in the study to be asked."""
        asked = [t for t in counted(study.get_trials(deepcopy=False)) if t.state != WAITING]
        return self.n_trials - len(asked)

    def _trial_keys(
        self, study_name: str, storage_spec: str, parent_run_id: str | None, slot: int
    ) -> tuple[str, ...]:
        """The overrides that hand every job its study (its number comes per trial), for an
        app whose config has an `optuna_trial` group; none for any other app. The storage
        carries no password (_take_out_password)."""
        if not isinstance(OmegaConf.select(self.config, "optuna_trial"), DictConfig):
            return ()
        return (
            f"optuna_trial.study_name={_quoted(study_name)}",
            f"optuna_trial.storage={_quoted(storage_spec)}",
            f"optuna_trial.parent_run_id={parent_run_id or 'null'}",
            f"optuna_trial.worker_slot={slot}",
        )

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
                log.info(
                    "Trial %d complete: %s", trial.number, ", ".join(f"{v:.4g}" for v in values)
                )
                return TrialState.COMPLETE
        else:
            error = ret._return_value  # JobReturn.return_value re-raises it; the sweep must not
            if isinstance(error, optuna.TrialPruned):
                _tell_study(study, trial, TrialState.PRUNED)
                log.info("Trial %d pruned: %s", trial.number, error)
                return TrialState.PRUNED
            reason = f"{type(error).__name__}: {error}"
        trial.set_user_attr("fail_reason", reason[:MAX_REASON_LENGTH])
        _tell_study(study, trial, TrialState.FAIL)
        log.warning("Trial %d failed: %s", trial.number, reason)
        return TrialState.FAIL

    # --- the end ----------------------------------------------------------------------------

    def _report(
        self,
        study: optuna.Study,
        record: "MlflowSweepRecord | None",
        parent_run_id: str | None,
        storage_spec: str,
    ) -> None:
        """optimization_results.yaml in the sweep folder, the parent run's summary, the log."""
        summary = summarise(study)
        results = write_results(summary, Path(self.config.hydra.sweep.dir))
        if record is not None:
            record.fill_parent(parent_run_id, study, summary, results)
        where = self._where_to_look(study, record, parent_run_id, storage_spec, results)
        log_summary(summary, where)

    def _where_to_look(
        self,
        study: optuna.Study,
        record: "MlflowSweepRecord | None",
        parent_run_id: str | None,
        storage_spec: str,
        results: Path,
    ) -> dict[str, str]:
        """The end summary's last lines: the results file, the figures, and ready-to-paste
        commands with their URLs for the MLflow UI and optuna-dashboard. The commands name
        this sweep's output root (make's OUT=), so a sweep written elsewhere opens as it is."""
        where = {"Results": str(results)}
        if (results.parent / "plots").is_dir():
            where["Figures"] = str(results.parent / "plots")
        # <root>/optuna/<study>.journal and sqlite:///<root>/mlflow.db are the layout of
        # conf/paths: `make dashboard` and `make ui` open them with OUT=<root>.
        journal_dir = Path(self.journal_dir)
        root = journal_dir.parent if journal_dir.name == "optuna" else None
        if record is not None:
            # The runs table of this sweep's trials, AU, KL and feasibility as columns.
            remote = record.uri.startswith(("http://", "https://"))
            base = record.uri.rstrip("/") if remote else "http://127.0.0.1:5000"
            ui_url = record.runs_table_url(study.study_name, parent_run_id, base_url=base)
            if remote:
                where["MLflow UI"] = ui_url
            elif root is not None and record.uri == f"sqlite:///{root}/mlflow.db":
                where["MLflow UI"] = f"make ui OUT={root}  then open {ui_url}"
            else:
                where["MLflow UI"] = f"mlflow ui --backend-store-uri '{masked(record.uri)}'"
        dashboard_url = f"http://127.0.0.1:8080/dashboard/studies/{study._study_id}"
        journal = journal_dir / f"{study.study_name}.journal"
        if root is not None and Path(storage_spec) == journal.absolute():
            command = f"make dashboard OUT={root} STUDY={study.study_name}"
        else:
            command = f"python -m vaelab.dashboard '{masked(storage_spec)}'"
        where["Dashboard"] = f"{command}  then open {dashboard_url}"
        where["Storage"] = masked(storage_spec)
        return where

    def _evaluate_best_trials(self, study: optuna.Study) -> None:
        """Call `evaluate` on the best feasible trials that have no evaluation yet, once the
        study has no trial left to run (the last worker to end does it). A failed evaluation
        is logged, not raised: the sweep's trials and records stand without it."""
        if not self.evaluate or self.evaluate_best < 1 or _unfinished(study):
            return
        evaluate = build(OmegaConf.create({"_target_": self.evaluate, "_partial_": True}))
        for trial in self._best_feasible(study)[: self.evaluate_best]:
            claim = f"evaluated:{trial.number}"  # a finished trial's attrs cannot change
            if claim in study.user_attrs:
                continue
            study.set_user_attr(claim, f"{socket.gethostname()}:{os.getpid()}")
            log.info("Evaluating trial %d (%s)", trial.number, self.evaluate)
            try:
                evaluate(trial.user_attrs["run_dir"], trial.user_attrs.get("mlflow_run_id"))
            except Exception as err:
                log.warning(
                    "Trial %d's evaluation failed: %s: %s", trial.number, type(err).__name__, err
                )

    @staticmethod
    def _best_feasible(study: optuna.Study) -> list[FrozenTrial]:
        """The feasible complete trials with a run folder, best first (the Pareto front of a
        multi-objective study, in trial order)."""
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        feasible = [t for t in counted(complete) if is_feasible(t) and "run_dir" in t.user_attrs]
        if len(study.directions) > 1:
            front = {t.number for t in study.best_trials}
            return [t for t in feasible if t.number in front]
        maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
        return sorted(feasible, key=lambda t: t.value, reverse=maximize)

    def _leave_nothing_running(
        self,
        study: optuna.Study,
        record: "MlflowSweepRecord | None",
        parent_run_id: str | None,
        err: BaseException,
    ) -> None:
        """After an error: fail this process's RUNNING trials and close the parent run, each
        with the reason (KILLED for Ctrl-C, FAILED otherwise)."""
        reason = f"{type(err).__name__}: {err}"
        host, pid = socket.gethostname(), os.getpid()
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            mine = trial.user_attrs.get("sweeper_host") == host
            if mine and trial.user_attrs.get("sweeper_pid") == pid:
                _fail_trial(study, trial, f"the sweep stopped: {reason}", record)
        if record is not None and not _unfinished(study):
            status = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"
            record.close_parent(parent_run_id, status, reason)
        log.error("Sweep of study %r stopped: %s", study.study_name, reason)


def _first_value(distribution: BaseDistribution) -> Any:
    """A value a trial could get: the first choice, or the low end of a range."""
    if isinstance(distribution, CategoricalDistribution):
        return distribution.choices[0]
    return distribution.low


def _is_config_key(name: str) -> bool:
    """A swept name that must already exist in the job's config: not `+key` (appended),
    `~key` (deleted), a config group (`group/option`) or a Hydra setting."""
    return not name.startswith(("+", "~", "hydra.")) and "/" not in name


def _has_key(config: DictConfig, key: str) -> bool:
    """Whether a dotted key exists in the config (its value may be null)."""
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(config, parent) if parent else config
    return isinstance(node, DictConfig) and leaf in node


def _quoted(text: str) -> str:
    """A string as a quoted Hydra override value, whatever characters it holds."""
    return QuotedString(text=text, quote=Quote.single).with_quotes()


def _failure(trial: optuna.Trial, ret: JobReturn) -> BaseException:
    """Why a trial failed: its job's exception, or a ValueError saying what was wrong with the
    value a completed job returned."""
    if ret.status == JobStatus.COMPLETED:
        return ValueError(f"trial {trial.number}: {trial.user_attrs['fail_reason']}")
    return ret._return_value


def _fail_trial(
    study: optuna.Study,
    trial: FrozenTrial | optuna.Trial,
    reason: str,
    record: "MlflowSweepRecord | None",
    not_counted: bool = False,
) -> bool:
    """Fail a RUNNING trial with its reason, and close its MLflow run; False if another
    process settled it first. A trial `not_counted` does not count toward n_trials."""
    try:
        study._storage.set_trial_user_attr(
            trial._trial_id, "fail_reason", reason[:MAX_REASON_LENGTH]
        )
        if not_counted:
            study._storage.set_trial_user_attr(trial._trial_id, NOT_COUNTED, reason)
        study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
    except optuna.exceptions.UpdateFinishedTrialError:
        return False
    if record is not None and "mlflow_run_id" in trial.user_attrs:
        record.close_trial_run(trial.user_attrs["mlflow_run_id"], reason)
    return True


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


def _unfinished(study: optuna.Study) -> bool:
    """Whether any worker still has a trial to run: one RUNNING or WAITING (a retry)."""
    return bool(study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)))


def _masked_override(override: str) -> str:
    """A hydra.sweeper.storage=URL override with the URL's password masked; others as they are."""
    key, sep, value = override.partition("=")
    if key.lstrip("+~") != "hydra.sweeper.storage" or not sep:
        return override
    return f"{key}={masked(value.strip(chr(39) + chr(34)))}"
