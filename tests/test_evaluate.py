"""The downstream report inside a real run, and `python -m vaelab.evaluate`, which repeats it on
a stored run."""

import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from hydra import compose, initialize_config_dir

from vaelab.evaluate import evaluate_run
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
