"""End to end: real training runs recorded in a real MLflow SQLite store."""

import json
import math
import subprocess
import sys
import urllib.parse
from pathlib import Path

import h5py
import mlflow
import numpy as np
import pytest
import torch
from hydra.utils import execution_whitelist

from vaelab.artifacts import load_checkpoint
from vaelab.data.vitals_synthetic import generate_vitals
from vaelab.diagnostics import ACTIVE_UNIT_THRESHOLD
from vaelab.errors import DataError, DivergenceError
from vaelab.models.base import VAEOutput
from vaelab.models.mlp import MLPVAE
from vaelab.train import train

EPOCH_METRICS = [
    "val/loss",
    "val/recon",
    "val/kl",
    "val/kl_constrained",
    "val/active_units",
    "val/mi",
    "val/kl_marginal",
    "val/nll",
    "val/mu_var_mean",
    "val/logvar_mean",
    "val/recon_z0",
    "schedule/beta",
    "train/loss",
    "perf/epoch_seconds",
    "perf/samples_per_second",
]


def only_run(tracking_uri):
    client = mlflow.MlflowClient(tracking_uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1
    return client, runs[0]


@pytest.mark.slow
def test_tiny_run_writes_a_readable_mlflow_run(compose_config, tiny, tmp_path):
    cfg = compose_config([*tiny.multiscale_run, "tracking.experiment=tiny"])
    au = train(cfg, tmp_path / "run")

    client, run = only_run(cfg.tracking.uri)
    assert run.info.status == "FINISHED"
    assert run.data.params["model._target_"].endswith("MultiScaleConv1DVAE")
    assert run.data.params["trainer.epochs"] == "2"
    for name in EPOCH_METRICS:
        history = client.get_metric_history(run.info.run_id, name)
        assert [m.step for m in history] == [0, 1], name
    assert au == run.data.metrics["final/active_units"]
    # The verdict is what its own checks say: healthy exactly when every check passed.
    tags = run.data.tags
    checks = {k: v for k, v in tags.items() if k.startswith("collapse/check_")}
    assert checks, tags
    expected = "healthy" if all(v == "True" for v in checks.values()) else "collapsed"
    assert tags["collapse/verdict"] == expected
    failed = [k.removeprefix("collapse/check_") for k, v in checks.items() if v == "False"]
    assert tags["collapse/failed"] == (", ".join(failed) or "none")
    # The held-out log-likelihood: the IWAE bound is at least the ELBO of the same samples.
    metrics = run.data.metrics
    assert metrics["final/elbo"] <= metrics["final/log_px_iwae"] < 0
    assert metrics["final/kl"] == pytest.approx(metrics["final/mi"] + metrics["final/kl_marginal"])
    kl_per_dim = json.loads(tags["collapse/kl_per_dim"])
    assert len(kl_per_dim) == 4
    assert sum(kl_per_dim) == pytest.approx(run.data.metrics["final/kl"], rel=1e-3)
    for branch in ("local", "hourly", "daily", "multiday"):
        assert f"val/recon_{branch}" in run.data.metrics

    artifacts = tmp_path / "artifacts"
    client.download_artifacts(run.info.run_id, "", str(artifacts))
    for name in ("latents.h5", "config.yaml", "checkpoints/model.pt", "multiscale_components.h5"):
        assert (artifacts / name).is_file(), name
    # Stored once: the run folder's large files are the local artifact store's, hard-linked.
    stored = Path(urllib.parse.urlparse(run.info.artifact_uri).path)
    for name in ("latents.h5", "checkpoints/model.pt", "checkpoints/last.pt"):
        assert (tmp_path / "run" / name).stat().st_ino == (stored / name).stat().st_ino, name
        assert (stored / name).stat().st_nlink >= 2, name

    with h5py.File(artifacts / "latents.h5") as f:
        mu, logvar = f["mu"][:], f["logvar"][:]
        ids = [s.decode() for s in f["ids"][:]]
        split = [s.decode() for s in f["split"][:]]
    assert mu.shape == logvar.shape == (24, 4)
    assert len(set(ids)) == 24 and set(split) == {"train", "val", "test"}
    # The returned AU is the count of validation dimensions whose mean varies (Burda et al.).
    val_mu = mu[np.asarray(split) == "val"]
    assert au == int((val_mu.var(axis=0) >= ACTIVE_UNIT_THRESHOLD).sum())
    with h5py.File(artifacts / "multiscale_components.h5") as f:
        assert f["branch_daily"].shape == f["input"].shape == f["recon"].shape
        assert f["input"].shape[1:] == (300, 7)

    # The checkpoint loads with weights_only=True and rebuilds the model from its config:
    # encoding the run's data again reproduces the logged latents.
    loaded = load_checkpoint(artifacts / "checkpoints" / "model.pt")
    assert loaded.input_shape == (300, 7)
    state = torch.load(artifacts / "checkpoints" / "model.pt", weights_only=True)
    assert {"model", "optimizer", "epoch", "normaliser", "config"} <= set(state)
    samples = generate_vitals(n_patients=24, seq_len=300, seed=0)
    x = torch.as_tensor(loaded.normaliser.transform(samples.values, samples.masks))
    with torch.no_grad():
        mu_again, _ = loaded.model.encode(x)
    np.testing.assert_allclose(mu_again.numpy(), mu, atol=1e-4)


@pytest.mark.slow
def test_mlp_run_returns_active_units_and_writes_no_branch_file(compose_config, tiny, tmp_path):
    cfg = compose_config([*tiny.mlp_run, "model.latent_dim=3"])
    au = train(cfg, tmp_path / "run")
    _, run = only_run(cfg.tracking.uri)
    assert run.info.status == "FINISHED" and au == run.data.metrics["final/active_units"]
    assert not (tmp_path / "run" / "multiscale_components.h5").exists()
    assert "val/recon_local" not in run.data.metrics


class NaNAfterFirstEpoch(MLPVAE):
    """An MLP VAE whose reconstruction turns NaN once it has trained for `healthy_steps`."""

    def __init__(self, healthy_steps: int, **kwargs):
        super().__init__(**kwargs)
        self.healthy_steps = healthy_steps
        self.train_steps = 0

    def forward(self, x):
        out = super().forward(x)
        if self.training:
            self.train_steps += 1
            if self.train_steps > self.healthy_steps:
                return VAEOutput(out.recon * torch.nan, out.mu, out.logvar, out.z, out.branches)
        return out


@pytest.mark.slow
def test_a_diverging_loss_fails_the_run_and_keeps_the_last_good_checkpoint(
    compose_config, tiny, tmp_path
):
    # 24 patients -> 16 train, batch 8: two steps per epoch; epoch 0 is healthy.
    cfg = compose_config(
        [
            *tiny.mlp_run,
            "trainer.epochs=3",
            "trainer.min_steps_per_epoch=2",
            "model._target_=test_train.NaNAfterFirstEpoch",
            "+model.healthy_steps=2",
        ]
    )
    with execution_whitelist(["test_train.NaNAfterFirstEpoch"]):
        with pytest.raises(
            DivergenceError,
            match=r"training loss became nan at epoch 1\.00 .*last good checkpoint is in",
        ):
            train(cfg, tmp_path / "run")
    client, run = only_run(cfg.tracking.uri)
    assert run.info.status == "FAILED"
    assert "DivergenceError" in run.data.tags["error"] and "epoch 1" in run.data.tags["error"]
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")]
    assert "checkpoints/last.pt" in artifacts
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert last["epoch"] == 0 and math.isfinite(last["loss_final_weights"])


@pytest.mark.slow
def test_early_stopping_stops_patience_epochs_after_the_best(compose_config, tiny, tmp_path):
    cfg = compose_config([*tiny.mlp_run, "trainer.epochs=40", "trainer.patience=2"])
    train(cfg, tmp_path / "run")
    client, run = only_run(cfg.tracking.uri)
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "val/loss")]
    best = int(run.data.metrics["final/best_epoch"])
    assert len(steps) < 40  # it stopped early
    assert steps[-1] == best + 2
    at_target = client.get_metric_history(run.info.run_id, "val/loss_final_weights")
    losses = [m.value for m in sorted(at_target, key=lambda m: m.step)]
    assert losses[best] == min(losses)
    # The best epoch's weights are reloaded and measured again: its final/* diagnostics are
    # the ones that epoch logged (a run whose best epoch is its last reuses them as they are).
    for name in ("loss_final_weights", "kl", "mi", "active_units", "recon", "recon_z0"):
        history = client.get_metric_history(run.info.run_id, f"val/{name}")
        at_best = next(m.value for m in history if m.step == best)
        assert run.data.metrics[f"final/{name}"] == pytest.approx(at_best, rel=1e-6), name


def write_h5(path, values, masks=None):
    with h5py.File(path, "w") as f:
        f.create_dataset("values", data=values)
        if masks is not None:
            f.create_dataset("masks", data=masks)


def test_bad_data_stops_before_training_and_records_why(compose_config, tiny, tmp_path):
    values = np.random.default_rng(0).normal(size=(20, 300, 3)).astype(np.float32)
    values[3, 10, 1] = np.nan
    write_h5(tmp_path / "nan.h5", values)
    cfg = compose_config(
        [*tiny.trainer, *tiny.mlp, "dataset=h5", f"dataset.path={tmp_path / 'nan.h5'}"]
    )
    with pytest.raises(DataError, match=r"nan\.h5.*values.*NaN"):
        train(cfg, tmp_path / "run")
    _, run = only_run(cfg.tracking.uri)
    assert run.info.status == "FAILED" and "NaN" in run.data.tags["error"]
    assert not (tmp_path / "run" / "checkpoints").exists()  # stopped before training


def run_cli(*overrides, cwd):
    """`python -m vaelab.train` as a user runs it, writing under cwd."""
    return subprocess.run(
        [sys.executable, "-m", "vaelab.train", f"paths.output_root={cwd}/multirun", *overrides],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_cli_reports_a_missing_file_in_one_message(tiny, tmp_path):
    missing = tmp_path / "nowhere.h5"
    result = run_cli(
        *tiny.trainer, *tiny.mlp, "dataset=h5", f"dataset.path={missing}", cwd=tmp_path
    )
    assert result.returncode == 1
    assert str(missing) in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


@pytest.mark.slow
def test_cli_refuses_a_target_outside_the_whitelist_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    result = run_cli(
        "dataset._target_=os.system", f"+dataset.command='touch {marker}'", cwd=tmp_path
    )
    assert result.returncode != 0
    assert "os.system" in result.stderr and "full_key: dataset" in result.stderr
    assert "Traceback" not in result.stderr
    assert not marker.exists()


@pytest.mark.slow
def test_cli_rejects_an_unknown_option_and_a_misspelt_key(tiny, tmp_path):
    result = run_cli("model=transformer", cwd=tmp_path)
    assert result.returncode == 1 and "model/transformer" in result.stderr
    assert "multiscale_conv1d" in result.stderr  # the available options are listed
    result = run_cli("trainer.epochz=1", cwd=tmp_path)
    assert result.returncode == 1 and "epochz" in result.stderr
    result = run_cli("+loss.free_bitz=1", *tiny.trainer, cwd=tmp_path)
    assert (
        result.returncode == 1
        and "free_bitz" in result.stderr
        and "full_key: loss" in result.stderr
    )
    assert "Traceback" not in result.stderr
