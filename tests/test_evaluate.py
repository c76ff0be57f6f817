"""The downstream report inside a real run; deferred in a sweep's trial and added later by
`evaluate_trial`; and `python -m vaelab.evaluate`, which repeats it on a stored run."""

import subprocess
import sys
from pathlib import Path

import mlflow
import optuna
import pytest
from hydra import compose, initialize_config_dir

from vaelab.errors import DataError
from vaelab.evaluate import evaluate_run, evaluate_trial, run_of_folder
from vaelab.sweep.storage import open_storage
from vaelab.train import train

CONF = Path(__file__).resolve().parents[1] / "conf"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny):
    """A tiny multi-scale run on generated vitals (labels and factors) with 40 patients."""
    tmp = tmp_path_factory.mktemp("downstream")
    root = tmp / "multirun"
    overrides = [*tiny.multiscale_run, "dataset.n_patients=40", f"paths.output_root={root}"]
    with initialize_config_dir(config_dir=str(CONF)):
        cfg = compose("train", overrides=overrides)
    train(cfg, tmp / "run")
    client = mlflow.MlflowClient(cfg.tracking.uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return client, run, root


def test_a_run_logs_downstream_metrics_and_figures(finished_run):
    client, run, _ = finished_run
    metrics = run.data.metrics
    # The PCA baseline always clusters; the tiny run's latents may have no active unit, in
    # which case the latent side is skipped with a logged reason rather than scored.
    for name in ("eval/hdbscan_pca_n_clusters", "eval/probe_accuracy", "eval/probe_chance"):
        assert name in metrics, name
    assert 0.0 <= metrics["eval/probe_accuracy"] <= 1.0
    # Known generative factors of the synthetic vitals are regressed from mu.
    assert any(name.startswith("eval/factor_r2/") for name in metrics)
    figures = {a.path for a in client.list_artifacts(run.info.run_id, "figures")}
    assert {
        "figures/kl_per_dim.png",
        "figures/collapse_curves.png",
        "figures/reconstructions.png",
        "figures/latents_pca.png",
    } <= figures


def test_the_command_reproduces_the_runs_own_numbers(finished_run):
    client, run, root = finished_run
    with initialize_config_dir(config_dir=str(CONF)):
        cfg = compose(
            "evaluate", overrides=[f"run_id={run.info.run_id}", f"paths.output_root={root}"]
        )
    again = evaluate_run(cfg)
    # Every probe the run logged is computed again, and to the same value.
    logged = {name for name in run.data.metrics if name.startswith("eval/")}
    assert set(again) == logged
    compared = [name for name, value in again.items() if value == value]  # NaN: no silhouette
    assert {"eval/probe_accuracy", "eval/hdbscan_pca_n_clusters"} <= set(compared)
    assert any(name.startswith("eval/factor_r2/") for name in compared)
    for name in compared:
        assert again[name] == pytest.approx(run.data.metrics[name], rel=1e-6, abs=1e-9), name


# vaelab.downstream is the command's earlier name, kept so that older commands still run.
@pytest.mark.parametrize("module", ["vaelab.evaluate", "vaelab.downstream"])
def test_the_command_names_an_unknown_run(finished_run, tmp_path, module):
    _, _, root = finished_run
    command = [
        sys.executable,
        "-m",
        module,
        "run_id=0123456789abcdef",
        f"paths.output_root={root}",
    ]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "0123456789abcdef" in result.stderr and "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def trial_and_single_run(tmp_path_factory, tiny):
    """The same tiny run twice, from the same seed: as trial 0 of a sweep's study, whose
    downstream report is deferred, and on its own, which reports at its end."""
    tmp = tmp_path_factory.mktemp("deferred")
    storage = str(tmp / "study.journal")
    study = optuna.create_study(
        study_name="deferred", storage=open_storage(storage), direction="maximize"
    )
    number = study.ask().number
    common = [*tiny.mlp_run, "dataset.n_patients=40", f"paths.output_root={tmp / 'multirun'}"]
    as_trial = [
        "optuna_trial.study_name=deferred",
        f"optuna_trial.storage={storage}",
        f"optuna_trial.number={number}",
        "tracking.experiment=trial",
    ]
    with initialize_config_dir(config_dir=str(CONF)):
        trial_cfg = compose("train", overrides=[*common, *as_trial])
        single_cfg = compose("train", overrides=[*common, "tracking.experiment=single"])
    # No other sweep worker of this host (the test suite may run sweeps alongside) changes
    # the trial's thread count: both runs compute alike.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VAELAB_WORKERS_DIR", str(tmp / "workers"))
        train(trial_cfg, tmp / "trial")
    train(single_cfg, tmp / "single")
    client = mlflow.MlflowClient(trial_cfg.tracking.uri)

    def run_of(experiment):
        (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
        return run

    return client, run_of("trial"), run_of("single"), tmp / "trial"


def figures_of(client, run_id):
    return {a.path for a in client.list_artifacts(run_id, "figures")}


def test_a_sweeps_trial_defers_its_report_and_keeps_everything_else(trial_and_single_run):
    client, trial_run, single_run, run_dir = trial_and_single_run
    assert trial_run.data.tags["eval/status"] == "deferred"
    assert single_run.data.tags["eval/status"] == "done"
    assert not any(name.startswith("eval/") for name in trial_run.data.metrics)
    assert not figures_of(client, trial_run.info.run_id)
    assert not (run_dir / "figures").exists()
    # Its diagnostics, verdict, constraints, latents and checkpoints are all there, and its
    # diagnostics are the single run's.
    final = {k: v for k, v in single_run.data.metrics.items() if k.startswith("final/")}
    assert "final/log_px_iwae" in final and "final/mi" in final
    for name, value in final.items():
        assert trial_run.data.metrics[name] == pytest.approx(value, rel=1e-6), name
    assert any(name.startswith("final/constraint_") for name in trial_run.data.metrics)
    assert trial_run.data.tags["collapse/verdict"] == single_run.data.tags["collapse/verdict"]
    artifacts = {a.path for a in client.list_artifacts(trial_run.info.run_id)}
    assert {"latents.h5", "config.yaml", "checkpoints"} <= artifacts
    checkpoints = {a.path for a in client.list_artifacts(trial_run.info.run_id, "checkpoints")}
    assert "checkpoints/model.pt" in checkpoints


def test_evaluate_trial_adds_the_report_the_run_would_have_made(trial_and_single_run):
    client, trial_run, single_run, run_dir = trial_and_single_run
    # Its run is found by the folder's run_dir tag when the caller does not name it.
    assert run_of_folder(client, run_dir, "the store") == trial_run.info.run_id
    metrics = evaluate_trial(str(run_dir), trial_run.info.run_id)

    after = client.get_run(trial_run.info.run_id)
    assert after.data.tags["eval/status"] == "done"
    inline = {k: v for k, v in single_run.data.metrics.items() if k.startswith("eval/")}
    assert {"eval/probe_accuracy", "eval/hdbscan_pca_n_clusters"} <= set(inline)
    assert any(name.startswith("eval/factor_r2/") for name in inline)
    assert set(metrics) == set(inline)
    for name, value in inline.items():
        if value == value:  # NaN (no silhouette) compares unequal to itself
            assert metrics[name] == pytest.approx(value, rel=1e-6, abs=1e-9), name
            assert after.data.metrics[name] == pytest.approx(value, rel=1e-6, abs=1e-9), name
    figures = figures_of(client, trial_run.info.run_id)
    assert figures == figures_of(client, single_run.info.run_id)
    assert "figures/collapse_curves.png" in figures
    assert {f"figures/{p.name}" for p in (run_dir / "figures").iterdir()} == figures


def test_evaluate_trial_names_a_folder_that_holds_no_finished_run(tmp_path):
    with pytest.raises(DataError, match=r"no checkpoints/model\.pt"):
        evaluate_trial(tmp_path, "0123456789abcdef")
