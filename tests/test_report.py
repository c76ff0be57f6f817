"""When a run makes its downstream report: at its end, deferred in a sweep's trial, or never;
the saved reconstructions of volumes (seed 004)."""

import h5py
import mlflow
import numpy as np
import pytest
import torch

from vaelab.data.prepare import prepare
from vaelab.data.volumes import load_volumes
from vaelab.errors import ConfigError
from vaelab.models.base import VAEOutput
from vaelab.plots import plot_volume_reconstructions
from vaelab.report import downstream_plan, save_volume_reconstructions


@pytest.mark.parametrize(
    ("downstream", "in_sweep", "is_trial", "plan"),
    [
        (True, "deferred", False, "inline"),  # a single run always reports at its end
        (True, "deferred", True, "deferred"),
        (True, "inline", True, "inline"),
        (False, "deferred", True, "off"),
        (False, "inline", False, "off"),
    ],
)
def test_a_sweeps_trial_defers_its_report_unless_told_inline(downstream, in_sweep, is_trial, plan):
    assert downstream_plan(downstream, in_sweep, is_trial) == plan


def test_a_misspelt_choice_is_named_with_the_choices():
    with pytest.raises(ConfigError, match="evaluation.in_sweep must be one of deferred, inline"):
        downstream_plan(True, "later", True)


# --- seed 004's saved reconstructions of volumes ------------------------------------------------


class HalfVolume(torch.nn.Module):
    """A 'model' whose reconstruction is half its input: every score is known."""

    def forward(self, x):
        mu = torch.zeros(len(x), 2)
        return VAEOutput(recon=0.5 * x, mu=mu, logvar=mu, z=mu)


def test_volume_reconstructions_save_slices_and_an_h5_of_the_first_validation_volumes(tmp_path):
    data = prepare(load_volumes(n_subjects=12, size=12, seed=3), 0.4, 0.0, seed=0)
    val = data.indices("val")
    assert len(val) >= 4
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.create_experiment("e", artifact_location=str(tmp_path / "artifacts"))
    run_id = client.create_run(experiment).info.run_id  # a stored run, not the active one
    saved = save_volume_reconstructions(
        client, run_id, HalfVolume(), data, tmp_path, torch.device("cpu")
    )
    x = data.values[val[:4]]
    with h5py.File(tmp_path / "recon_volumes.h5") as f:
        assert torch.equal(torch.from_numpy(f["input"][:]), x)
        assert torch.equal(torch.from_numpy(f["recon"][:]), 0.5 * x)
        assert [s.decode() for s in f["ids"][:]] == list(data.sampleset.ids[val[:4].numpy()])
        assert [s.decode() for s in f["channel_names"][:]] == ["t1c", "t1n", "t2f", "t2w"]
        psnr = f["psnr"][:]
    # PSNR of 0.5 x against x, by hand: 10 log10(range² / mean((x / 2)²)) per volume and channel
    flat = x.double().flatten(2)
    range_ = flat.amax(2) - flat.amin(2)
    by_hand = 10 * torch.log10(range_**2 / (0.25 * flat.pow(2).mean(2)))
    assert psnr == pytest.approx(by_hand.numpy(), rel=1e-4)
    assert saved["ssim"].shape == (4, 4) and (saved["ssim"] < 1).all()  # 12³ fits the window
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert "recon_volumes.h5" in artifacts
    png = tmp_path / "figures" / "volume_reconstructions.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_volume_slices_figure_draws_each_view_of_input_and_recon_with_its_scores(tmp_path):
    inputs = np.arange(2 * 1 * 4 * 5 * 6, dtype=np.float64).reshape(2, 1, 4, 5, 6)
    recons = -inputs
    fig = plot_volume_reconstructions(
        inputs,
        recons,
        tmp_path / "v.png",
        channel_names=["t2f"],
        sample_ids=["S0007", "S0009"],
        ssim=np.array([[0.5], [np.nan]]),
        psnr=np.array([[21.25], [30.0]]),
    )
    axes = fig.axes
    assert len(axes) == 2 * 6  # 2 volumes x 1 modality rows, 3 views x (input, recon)
    titles = [ax.get_title() for ax in axes]
    assert titles[:2] == [
        "S0007 t2f axial\ninput",
        "S0007 t2f axial\nrecon, SSIM 0.500, PSNR 21.2 dB",
    ]
    assert titles[3] == "S0007 t2f coronal\nrecon, SSIM 0.500, PSNR 21.2 dB"
    assert titles[11] == "S0009 t2f sagittal\nrecon, SSIM n/a, PSNR 30.0 dB"
    # the central slices: axial fixes W (index 3), coronal H (2), sagittal D (2)
    drawn = [np.asarray(ax.images[0].get_array()) for ax in axes]
    np.testing.assert_array_equal(drawn[0], inputs[0, 0, :, :, 3].T)
    np.testing.assert_array_equal(drawn[1], recons[0, 0, :, :, 3].T)
    np.testing.assert_array_equal(drawn[2], inputs[0, 0, :, 2, :].T)
    np.testing.assert_array_equal(drawn[10], inputs[1, 0, 2, :, :].T)
    # input and recon share the input's grey scale
    assert axes[1].images[0].get_clim() == (inputs[0, 0].min(), inputs[0, 0].max())
    assert drawn[2].shape == (6, 4)  # (W up, D across)
