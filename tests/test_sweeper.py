"""vaelab's sweeper as a layer any Hydra app can use, and the job's side of a trial: real Optuna
studies, real Hydra multiruns of small apps of the test's own (no vaelab training job), and a
real MLflow store where a test asks for one."""

import math
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import optuna
import pytest
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf
from optuna.trial import TrialState

from vaelab.diagnostics import CollapseCriteria, sweep_constraints
from vaelab.errors import ConfigError
from vaelab.sweep.plots import plot_sweep
from vaelab.sweep.storage import open_storage
from vaelab.sweep.summary import summarise
from vaelab.sweep.sweeper import VaelabOptunaSweeper
from vaelab.sweep.trial import SweepTrial

CONF = Path(__file__).resolve().parents[1] / "conf"

# A Hydra app with none of vaelab's keys (paths, tracking, sweep, optuna_trial). It records at
# exit whether MLflow or matplotlib were ever imported in the sweep's process.
PLAIN_APP = """
import atexit
import sys
from pathlib import Path

import hydra


@atexit.register
def record_imports():
    loaded = [name for name in ("mlflow", "matplotlib") if name in sys.modules]
    Path("imported.txt").write_text(" ".join(loaded))


@hydra.main(config_path=".", config_name="plain")
def main(cfg):
    if cfg.fail:
        raise RuntimeError("boom from the job")
    if cfg.interrupt:
        raise KeyboardInterrupt
    return (cfg.x - 0.25) ** 2


if __name__ == "__main__":
    main()
"""
PLAIN_CONFIG = """
x: 0.0
fail: false
interrupt: false
"""
# The same app with an `optuna_trial` group, the sign that it wants its trial's keys.
WITH_TRIAL_KEYS_CONFIG = (
    PLAIN_CONFIG
    + """
optuna_trial:
  study_name: null
  storage: null
  number: null
  parent_run_id: null
  worker_slot: 0
"""
)
# vaelab's own train config, with a task that must never run: the sweep stops before it.
VAELAB_CONFIG_APP = f'''
import hydra


@hydra.main(config_path="{CONF}", config_name="train")
def main(cfg):
    raise AssertionError("no trial may start")


if __name__ == "__main__":
    main()
'''


def run_app(tmp_path, *overrides, config="plain", app=PLAIN_APP):
    (tmp_path / "app.py").write_text(app)
    (tmp_path / "plain.yaml").write_text(PLAIN_CONFIG)
    (tmp_path / "with_trial_keys.yaml").write_text(WITH_TRIAL_KEYS_CONFIG)
    return subprocess.run(
        [sys.executable, "app.py", "--multirun", f"--config-name={config}", *overrides],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )


def only_study(journal):
    storage = open_storage(str(journal))
    (summary,) = optuna.get_all_study_summaries(storage)
    return optuna.load_study(study_name=summary.study_name, storage=storage)


# --- telling the study a job's outcome ---


@pytest.mark.parametrize(
    ("value", "reason"),
    [(math.nan, "not finite"), ("ten", "float-castable"), ([1.0, 2.0], "expected 1 objective")],
)
def test_a_bad_objective_fails_the_trial_without_crashing(value, reason):
    study = optuna.create_study(direction="maximize")
    trial = study.ask()
    ret = JobReturn(status=JobStatus.COMPLETED, _return_value=value)
    assert VaelabOptunaSweeper._tell(study, trial, ret, 1) == TrialState.FAIL
    assert study.trials[0].state == TrialState.FAIL
    assert reason in study.trials[0].user_attrs["fail_reason"]


@pytest.mark.parametrize(
    ("error", "state"),
    [
        (optuna.TrialPruned("pruned after epoch 3"), TrialState.PRUNED),
        (OSError("disk full"), TrialState.FAIL),
    ],
)
def test_a_job_that_raises_is_a_pruned_or_failed_trial(error, state):
    study = optuna.create_study()
    ret = JobReturn(status=JobStatus.FAILED, _return_value=error)
    assert VaelabOptunaSweeper._tell(study, study.ask(), ret, 1) == state
    assert study.trials[0].state == state
    if state == TrialState.FAIL:
        assert study.trials[0].user_attrs["fail_reason"] == "OSError: disk full"


# --- the summary ---------------------------------------------------------------------------


def test_without_constraints_the_best_is_the_best_trial_under_the_stock_keys():
    study = optuna.create_study(direction="minimize")
    for x in (3.0, 1.0, 2.0):
        study.enqueue_trial({"x": x})
        trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 5)})
        study.tell(trial, trial.params["x"] ** 2)
    summary = summarise(study)
    assert summary["name"] == "optuna"
    assert summary["best_params"] == {"x": 1.0} and summary["best_value"] == 1.0
    assert summary["best"]["number"] == study.best_trial.number == 1
    assert summary["trials"] == {"COMPLETE": 3}
    assert "feasible" not in summary


def test_with_constraints_the_best_is_the_best_feasible_trial():
    study = optuna.create_study(direction="maximize")
    for value, constraint in [(9.0, 1.0), (5.0, -1.0), (4.0, 0.0)]:
        trial = study.ask()
        trial.set_constraint("kl", constraint)
        study.tell(trial, value)
    summary = summarise(study)
    assert summary["best_value"] == 5.0 and summary["best"]["number"] == 1
    assert [t["number"] for t in summary["feasible"]] == [1, 2]
    assert summary["feasible"][0]["constraints"] == {"kl": -1.0}

    infeasible = optuna.create_study(direction="maximize")
    trial = infeasible.ask()
    trial.set_constraint("kl", 1.0)
    infeasible.tell(trial, 1.0)
    summary = summarise(infeasible)
    assert summary["best"] is None and summary["best_value"] is None
    assert summary["best_params"] is None and summary["feasible"] == []


def test_several_objectives_give_the_stock_solutions():
    study = optuna.create_study(directions=["minimize", "minimize"])
    for values in [(1.0, 3.0), (3.0, 1.0), (4.0, 4.0)]:
        study.tell(study.ask(), values)
    solutions = summarise(study)["solutions"]
    assert sorted(s["number"] for s in solutions) == [0, 1]
    assert all(set(s) == {"number", "params", "values"} for s in solutions)


def test_the_sweep_plots_need_vaelab_trials(tmp_path):
    study = optuna.create_study(direction="maximize")
    assert plot_sweep(study, tmp_path / "none") == []  # a plain app's trials: no figures
    for beta, kl in [(0.1, 3.0), (1.0, 0.2)]:
        study.enqueue_trial({"schedule.beta": beta})
        trial = study.ask({"schedule.beta": optuna.distributions.FloatDistribution(0.01, 2)})
        trial.set_constraint("kl", 1.0 - kl)
        trial.set_user_attr("val_kl", kl)
        trial.set_user_attr("constraint_kl", 1.0 - kl)
        trial.set_user_attr("val_active_units", 4 * kl)
        study.tell(trial, 4 * kl)
    paths = plot_sweep(study, tmp_path / "plots")
    assert [p.name for p in paths] == ["au_vs_params.png", "feasibility.png", "history.png"]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in paths)


# --- the job's side ------------------------------------------------------------------------


def job_config(storage, number, **sweep):
    return OmegaConf.create(
        {
            "optuna_trial": {
                "study_name": "unit",
                "storage": str(storage),
                "number": number,
                "parent_run_id": "abc123",
                "worker_slot": 0,
            },
            "sweep": {"objective": "val/active_units", "kl_threshold": 1.0, **sweep},
        }
    )


def test_a_job_reaches_its_trial_reports_is_pruned_and_records_the_constraint(tmp_path):
    journal = tmp_path / "unit.journal"
    study = optuna.create_study(study_name="unit", storage=open_storage(str(journal)))
    number = study.ask().number
    floor = {"_target_": "optuna.pruners.ThresholdPruner", "lower": 5.0, "n_warmup_steps": 0}
    trial = SweepTrial.from_config(job_config(journal, number, pruner=floor))
    assert (trial.number, trial.study_name, trial.parent_run_id) == (number, "unit", "abc123")

    trial.start("run-1", tmp_path / "run")
    assert trial.should_prune(0, {"val/active_units": 1.0})  # below the floor of 5
    metrics = {
        "final/active_units": 2.0,
        "final/kl": 0.25,
        "final/mi": 0.1,
        "final/kl_marginal": 0.15,
        "final/recon": 0.5,
        "final/recon_z0": 0.5,
    }
    verdict = {"verdict": "collapsed", "failed": "decoder_uses_z_gain_at_least_0.02"}
    constraints = sweep_constraints(metrics, 1.0, CollapseCriteria())
    feasible, why = trial.finish(metrics, verdict, constraints)
    assert not feasible and why.startswith("infeasible: kl broken: raw KL ≥ 1 nats (found 0.25)")

    (frozen,) = optuna.load_study(study_name="unit", storage=open_storage(str(journal))).trials
    assert frozen.constraints == {
        "kl": pytest.approx(0.75),  # threshold 1 − KL 0.25
        "mi": pytest.approx(0.0),  # MI 0.1 meets its floor of 0.1
        "decoder_uses_z": pytest.approx(0.01),  # recon 0.5 > 0.98 × recon_z0 0.5
    }
    assert frozen.intermediate_values == {0: 1.0}
    attrs = frozen.user_attrs
    assert attrs["mlflow_run_id"] == "run-1" and attrs["feasible"] is False
    assert attrs["collapse_verdict"] == "collapsed" and attrs["val_kl"] == 0.25
    assert attrs["pid"] == os.getpid() and "run_dir" in attrs  # the sweeper beats, not the job


def test_an_empty_pruner_never_prunes_and_a_single_run_has_no_trial(tmp_path):
    journal = tmp_path / "unit.journal"
    study = optuna.create_study(study_name="unit", storage=open_storage(str(journal)))
    trial = SweepTrial.from_config(job_config(journal, study.ask().number, pruner={}))
    assert not trial.should_prune(0, {"val/active_units": 0.0})
    assert SweepTrial.from_config(job_config(journal, None)) is None
    with pytest.raises(ConfigError, match="optuna_trial.storage"):
        SweepTrial.from_config(job_config("", 0))


# --- plain Hydra apps ----------------------------------------------------------------------


@pytest.mark.slow
def test_a_retry_left_waiting_after_n_trials_is_closed_not_run_and_not_left(tmp_path):
    # The race it stands for: a worker marks a dead trial stale (n_trials - 1 counted) and,
    # before it enqueues the retry, another worker asks a fresh trial; the retry then waits
    # in a study that already holds n_trials. A worker must close it, not wait on it forever.
    journal = tmp_path / "race.journal"
    study = optuna.create_study(study_name="race", storage=open_storage(str(journal)))
    x = optuna.distributions.FloatDistribution(-1, 1)
    for value in (0.1, 0.2):
        study.add_trial(
            optuna.create_trial(params={"x": value}, distributions={"x": x}, value=value)
        )
    study.enqueue_trial({"x": 0.5}, user_attrs={"retry_of": [1]})
    result = run_app(
        tmp_path,
        "hydra/sweeper=vaelab_optuna",
        f"hydra.sweeper.storage={journal}",
        "hydra.sweeper.study_name=race",
        "hydra.sweeper.n_trials=2",
        "x=interval(-1,1)",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    trials = only_study(journal).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.FAIL]
    assert trials[2].user_attrs["not_counted"].startswith("surplus")
    assert not (tmp_path / "sweep" / "0").exists()  # closed untrained


@pytest.mark.slow
def test_a_plain_app_sweeps_without_mlflow_or_trial_keys(tmp_path):
    sweep_dir = tmp_path / "sweep"
    result = run_app(
        tmp_path,
        "hydra/sweeper=vaelab_optuna",
        "hydra.sweeper.n_trials=4",
        "x=interval(-1,1)",
        f"hydra.sweep.dir={sweep_dir}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "imported.txt").read_text() == ""  # no MLflow, no plots
    assert not list(tmp_path.glob("**/mlflow.db")) and not (tmp_path / "mlruns").exists()
    (journal,) = sweep_dir.glob("*.journal")  # a study of its own, in its own file
    study = only_study(journal)
    assert journal.stem == study.study_name and study.study_name.startswith("app-")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 4
    results = OmegaConf.load(sweep_dir / "optimization_results.yaml")
    assert results.name == "optuna"
    assert results.best_params == study.best_trial.params
    assert results.best_value == study.best_trial.value
    assert results.best.number == study.best_trial.number
    for job in range(4):
        job_config = OmegaConf.load(sweep_dir / str(job) / ".hydra" / "config.yaml")
        assert "optuna_trial" not in job_config
        overrides = OmegaConf.load(sweep_dir / str(job) / ".hydra" / "overrides.yaml")
        assert [o.split("=")[0] for o in overrides] == ["x"]


@pytest.mark.slow
def test_two_sweeps_without_a_study_name_never_share_a_study(tmp_path):
    sweep_dir = tmp_path / "sweep"
    command = ["hydra/sweeper=vaelab_optuna", "hydra.sweeper.n_trials=3", "x=interval(-1,1)"]
    for _ in range(2):
        result = run_app(tmp_path, *command, f"hydra.sweep.dir={sweep_dir}")
        assert result.returncode == 0, result.stderr[-3000:]
    journals = sorted(sweep_dir.glob("*.journal"))
    assert len(journals) == 2
    studies = [only_study(journal) for journal in journals]
    assert studies[0].study_name != studies[1].study_name
    assert [len(study.trials) for study in studies] == [3, 3]  # the second started afresh


@pytest.mark.slow
def test_an_app_with_an_optuna_trial_group_gets_its_trial_keys(tmp_path):
    sweep_dir = tmp_path / "sweep"
    result = run_app(
        tmp_path,
        "hydra/sweeper=vaelab_optuna",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.study_name=keyed",
        "x=interval(-1,1)",
        f"hydra.sweep.dir={sweep_dir}",
        config="with_trial_keys",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    journal = sweep_dir / "keyed.journal"
    assert only_study(journal).study_name == "keyed"
    for number in range(2):
        handed = OmegaConf.load(sweep_dir / str(number) / ".hydra" / "config.yaml").optuna_trial
        assert handed == {
            "study_name": "keyed",
            "storage": str(journal),
            "number": number,
            "parent_run_id": None,
            "worker_slot": 0,
        }


@pytest.mark.slow
def test_a_swept_key_the_app_lacks_stops_the_sweep_before_any_trial(tmp_path):
    sweep_dir = tmp_path / "sweep"
    result = run_app(
        tmp_path,
        "hydra/sweeper=vaelab_optuna",
        "x=interval(-1,1)",
        "nothere=choice(1,2)",
        f"hydra.sweep.dir={sweep_dir}",
    )
    assert result.returncode == 1
    assert "it sweeps nothere, which this job's config does not have" in result.stderr
    assert "Traceback" not in result.stderr  # one message
    assert not sweep_dir.exists()  # no study, no trial


@pytest.mark.slow
@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        # the review's case: a group option written as a key
        (["sweep.pruner=none"], ["sweep.pruner='none'", "write sweep/pruner=none"]),
        # quick sweeps schedule.cycle_epochs, which the linear schedule does not have
        (["schedule=linear"], ["it sweeps schedule.cycle_epochs", "warmup_epochs"]),
    ],
)
def test_a_vaelab_config_slip_stops_the_sweep_before_any_trial(tmp_path, overrides, named):
    root = tmp_path / "multirun"
    result = run_app(
        tmp_path,
        "hparams_search=quick",
        f"paths.output_root={root}",
        *overrides,
        app=VAELAB_CONFIG_APP,
        config="train",
    )
    assert result.returncode == 1
    for text in named:
        assert text in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "no trial may start" not in result.stderr
    assert not (root / "optuna").exists() and not (root / "mlflow.db").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("overrides", "parent_status", "stopped_by", "job_error"),
    [
        (
            ["fail=true", "hydra.sweeper.max_failure_rate=0.25"],  # 1 failure of 4 allowed
            "FAILED",
            "FailureBudgetExceeded",
            "RuntimeError: boom from the job",
        ),
        (["interrupt=true", "hydra.sweeper.n_jobs=2"], "KILLED", "KeyboardInterrupt", None),
    ],
    ids=["failure-budget", "ctrl-c"],
)
def test_an_aborted_sweep_leaves_nothing_running(
    tmp_path, overrides, parent_status, stopped_by, job_error
):
    sweep_dir, uri = tmp_path / "sweep", f"sqlite:///{tmp_path}/mlflow.db"
    tracking = f"{{uri:'{uri}',experiment:plain,artifact_root:'{tmp_path}/artifacts'}}"
    result = run_app(
        tmp_path,
        "hydra/sweeper=vaelab_optuna",
        "hydra.sweeper.n_trials=4",
        "hydra.sweeper.study_name=aborted",
        f"hydra.sweeper.tracking={tracking}",
        "x=interval(-1,1)",
        f"hydra.sweep.dir={sweep_dir}",
        *overrides,
    )
    assert result.returncode != 0
    assert stopped_by in result.stderr
    if job_error:  # the job's own error is in the traceback, as the cause
        assert job_error in result.stderr and "direct cause" in result.stderr
    trials = only_study(sweep_dir / "aborted.journal").trials
    assert len(trials) == 2 and all(t.state == TrialState.FAIL for t in trials)
    if stopped_by == "KeyboardInterrupt":  # both trials of the batch were RUNNING
        assert all(t.user_attrs["fail_reason"].startswith("the sweep stopped") for t in trials)
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("plain")
    (parent,) = client.search_runs([experiment.experiment_id])
    assert parent.data.tags["sweep.role"] == "parent"
    assert parent.info.status == parent_status
    assert stopped_by in parent.data.tags["error"]
