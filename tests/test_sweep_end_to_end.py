"""Real Optuna sweeps of vaelab's training job through vaelab's sweeper (hydra/sweeper=vaelab):
Hydra multiruns of tiny trials, a real journal storage and a real MLflow SQLite store. The
sweeper on its own, with small apps of the tests' own, is tested in tests/test_sweeper.py."""

import os
import signal
import subprocess
import time

import mlflow
import optuna
import pytest
from optuna.trial import TrialState

from vaelab.sweep.storage import open_storage

pytestmark = pytest.mark.slow


def load(tmp_path, study):
    storage = open_storage(str(tmp_path / "multirun" / "optuna" / f"{study}.journal"))
    return optuna.load_study(study_name=study, storage=storage)


def mlflow_runs(tmp_path):
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/multirun/mlflow.db")
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments)
    parents = [r for r in runs if r.data.tags.get("sweep.role") == "parent"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return client, parents, children


def test_the_best_feasible_trial_gets_the_report_its_trials_deferred(sweeps, tmp_path):
    sweeps.run(
        "deferred",
        "hydra.sweeper.n_trials=2",
        "sweep/pruner=none",
        "evaluation.downstream=true",  # the fixture turns it off; in_sweep=deferred by default
        "sweep.kl_threshold=0.0",
        "verdict.min_mi=-1e9",
        "verdict.min_z_gain=-1e9",
    )
    study = load(tmp_path, "deferred")
    best = study.best_trial
    client, _, children = mlflow_runs(tmp_path)
    by_number = {int(r.data.tags["sweep.trial_number"]): r for r in children}
    assert {n: r.data.tags["eval/status"] for n, r in by_number.items()} == {
        t.number: "done" if t.number == best.number else "deferred" for t in study.trials
    }
    evaluated = by_number[best.number]
    assert any(name.startswith("eval/") for name in evaluated.data.metrics)
    assert not any(
        name.startswith("eval/") for r in children if r is not evaluated for name in r.data.metrics
    )
    figures = [a.path for a in client.list_artifacts(evaluated.info.run_id, "figures")]
    assert "figures/kl_per_dim.png" in figures
    assert study.user_attrs[f"evaluated:{best.number}"]  # claimed once, by the last worker


def test_every_trial_is_recorded_and_the_infeasible_region_is_infeasible(sweeps, tmp_path):
    # A grid over the collapse threshold itself: with threshold 1e9 nats no trial can be
    # feasible, with 0 every trial is; the best trial must come from the feasible half. The two
    # information constraints are switched off here (their floors far below any value), so
    # that the KL threshold alone decides; tests/test_sweep_constraints.py covers them.
    sweeps.run(
        "grid",
        "sweep.kl_threshold=choice(0.0,1e9)",
        "verdict.min_mi=-1e9",
        "verdict.min_z_gain=-1e9",
        "sweep/pruner=none",
        "model.latent_dim=choice(2,4)",
        "hydra.sweeper.n_trials=4",
        search="grid",
    )
    study = load(tmp_path, "grid")
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    assert {(t.params["sweep.kl_threshold"], t.params["model.latent_dim"]) for t in trials} == {
        (0.0, 2),
        (0.0, 4),
        (1e9, 2),
        (1e9, 4),
    }
    for t in trials:
        kl = t.user_attrs["val_kl"]
        assert t.constraints["kl"] == pytest.approx(t.params["sweep.kl_threshold"] - kl)
        assert set(t.constraints) == {"kl", "mi", "decoder_uses_z"}
        assert t.user_attrs["feasible"] == (t.params["sweep.kl_threshold"] == 0.0)
        assert t.value == t.user_attrs["val_active_units"]
    assert study.best_trial.params["sweep.kl_threshold"] == 0.0

    client, parents, children = mlflow_runs(tmp_path)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    assert parent.data.tags["sweep.study_name"] == "grid"
    assert "model.latent_dim" in parent.data.tags["sweep.search_space"]
    assert len(children) == 4
    for run in children:
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        number = int(run.data.tags["sweep.trial_number"])
        assert run.info.run_name == f"grid-{number:04d}"
        trial = trials[number]
        assert run.info.run_id == trial.user_attrs["mlflow_run_id"]
        assert run.data.params["model.latent_dim"] == str(trial.params["model.latent_dim"])
        assert run.data.metrics["final/constraint_kl"] == pytest.approx(trial.constraints["kl"])
        assert run.info.status == "FINISHED" and run.data.tags["trial_state"] == "COMPLETE"
    best = study.best_trial
    assert parent.data.params["best.model.latent_dim"] == str(best.params["model.latent_dim"])
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert "optimization_results.yaml" in artifacts
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert plots == {"plots/au_vs_params.png", "plots/feasibility.png", "plots/history.png"}


def test_pruned_and_diverging_trials_are_recorded_and_the_sweep_completes(sweeps, tmp_path):
    # A floor no trial can reach prunes the healthy trial after its first epoch; lr=1e35
    # makes the other trial's loss infinite at once.
    result = sweeps.run(
        "prune",
        "trainer.lr=choice(0.001,1e35)",
        "hydra.sweeper.n_trials=2",
        "sweep/pruner=threshold",
        "sweep.pruner.lower=1e9",
        "sweep.pruner.n_warmup_steps=0",
        "hydra.sweeper.max_failure_rate=0.5",
        search="grid",
    )
    assert "Sweep 'prune'" in result.stderr
    trials = {t.params["trainer.lr"]: t for t in load(tmp_path, "prune").get_trials()}
    assert trials[0.001].state == TrialState.PRUNED
    assert trials[1e35].state == TrialState.FAIL
    assert "DivergenceError" in trials[1e35].user_attrs["fail_reason"]
    assert "pruned" not in trials[1e35].user_attrs

    client, _, children = mlflow_runs(tmp_path)
    by_run = {r.info.run_id: r for r in children}
    pruned = by_run[trials[0.001].user_attrs["mlflow_run_id"]]
    assert pruned.info.status == "KILLED" and pruned.data.tags["trial_state"] == "PRUNED"
    kept = {a.path for a in client.list_artifacts(pruned.info.run_id)}
    assert {"latents.h5", "checkpoints", "config.yaml"} <= kept  # the pruned trial keeps its work
    failed = by_run[trials[1e35].user_attrs["mlflow_run_id"]]
    assert failed.info.status == "FAILED" and "became" in failed.data.tags["error"]


def test_too_many_failures_stop_the_sweep_with_a_message(sweeps, tmp_path):
    result = sweeps.run(
        "fail",
        "trainer.lr=choice(1e35,1e36,1e37)",
        "sweep/pruner=none",
        "hydra.sweeper.n_trials=3",
        check=False,
        search="grid",
    )
    assert result.returncode != 0
    assert "exceed max_failure_rate=0.0" in result.stderr
    assert [t.state for t in load(tmp_path, "fail").get_trials()] == [TrialState.FAIL]


def test_a_killed_sweep_resumes_to_exactly_n_trials(sweeps, tmp_path):
    command = sweeps.command(
        "resume", "hydra.sweeper.n_trials=3", "trainer.epochs=3", "sweep/pruner=none"
    )
    sweep = subprocess.Popen(
        command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    journal = tmp_path / "multirun" / "optuna" / "resume.journal"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # wait for one finished trial and a second under way
        if journal.exists():
            trials = load(tmp_path, "resume").get_trials()
            states = [t.state for t in trials]
            if TrialState.COMPLETE in states and any(
                t.state == TrialState.RUNNING and "mlflow_run_id" in t.user_attrs for t in trials
            ):
                break
        time.sleep(0.2)
    else:
        pytest.fail("the sweep never had a finished and a running trial")
    sweep.send_signal(signal.SIGKILL)
    sweep.wait()

    sweeps.run("resume", "hydra.sweeper.n_trials=3", "trainer.epochs=3", "sweep/pruner=none")
    trials = load(tmp_path, "resume").get_trials()
    assert all(t.state.is_finished() for t in trials)
    (stale,) = [t for t in trials if t.state == TrialState.FAIL]
    assert stale.user_attrs["fail_reason"].startswith("stale")
    assert stale.user_attrs["not_counted"] == stale.user_attrs["fail_reason"]
    # The killed trial's parameters ran again, so n_trials=3 trials ran to an outcome.
    (retry,) = [t for t in trials if t.user_attrs.get("retry_of") == [stale.number]]
    assert retry.params == stale.params and retry.state == TrialState.COMPLETE
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 3 and len(trials) == 4
    client, _, _ = mlflow_runs(tmp_path)
    killed = client.get_run(stale.user_attrs["mlflow_run_id"])
    assert killed.info.status == "KILLED"
    assert client.get_run(retry.user_attrs["mlflow_run_id"]).info.status == "FINISHED"


def test_two_sweep_processes_fill_one_study(sweeps, tmp_path):
    command = sweeps.command("shared", "hydra.sweeper.n_trials=4", "sweep/pruner=none")
    sweeps = [
        subprocess.Popen(
            command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    for sweep in sweeps:
        _, stderr = sweep.communicate(timeout=600)
        assert sweep.returncode == 0, stderr[-3000:]
    storage = open_storage(str(tmp_path / "multirun" / "optuna" / "shared.journal"))
    assert [s.study_name for s in optuna.get_all_study_summaries(storage)] == ["shared"]
    trials = load(tmp_path, "shared").get_trials()
    outcomes = [(t.number, t.state.name, t.user_attrs.get("fail_reason")) for t in trials]
    assert all(t.state == TrialState.COMPLETE for t in trials), outcomes
    # n_trials counts the study: together they run 4, or 5 if both asked for the last one
    # at the same moment.
    assert 4 <= len(trials) <= 5
    assert len({t.user_attrs["sweeper_pid"] for t in trials}) == 2
    _, parents, children = mlflow_runs(tmp_path)
    assert len(parents) == 1
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}


def test_parallel_trials_share_the_cores(sweeps, tmp_path):
    sweeps.run(
        "parallel",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "hydra.sweeper.n_jobs=2",
        "hydra.sweeper.n_trials=2",
        "sweep/pruner=none",
    )
    trials = load(tmp_path, "parallel").get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    assert len({t.user_attrs["pid"] for t in trials}) == 2  # two worker processes
    _, _, children = mlflow_runs(tmp_path)
    expected = str(max(1, (os.cpu_count() or 1) // 2))
    assert [c.data.params["torch.num_threads"] for c in children] == [expected] * 2


def test_pareto_sweep_returns_the_front(sweeps, tmp_path):
    sweeps.run(
        "pareto",
        "sweep.objective=[val/active_units,val/recon]",
        "hydra.sweeper.direction=[maximize,minimize]",
        "hydra.sweeper.n_trials=3",
    )
    study = load(tmp_path, "pareto")
    assert len(study.directions) == 2
    trials = study.get_trials()
    assert all(t.state == TrialState.COMPLETE and len(t.values) == 2 for t in trials)
    for t in trials:
        assert t.values == [
            t.user_attrs["val_active_units"],
            pytest.approx(t.user_attrs["val_recon"]),
        ]
