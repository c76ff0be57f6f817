"""Figures checked by what they draw: the data of each artist, the labels and the legends,
read back from the matplotlib Figure each plot function returns, and the PNG it wrote."""

import struct

import numpy as np
import pytest
from matplotlib.collections import PathCollection

from vaelab.plots import (
    DPI,
    kl_threshold_of,
    plot_kl_per_dim,
    plot_latent_projection,
    plot_reconstructions,
    plot_training_curves,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_size(path) -> tuple[int, int]:
    """(width, height) in pixels from a PNG file's IHDR chunk, after checking the magic bytes."""
    head = path.read_bytes()[:24]
    assert head[:8] == PNG_MAGIC
    assert head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def legend_texts(ax_or_fig) -> list[str]:
    legends = getattr(ax_or_fig, "legends", None) or [ax_or_fig.get_legend()]
    return [text.get_text() for legend in legends for text in legend.get_texts()]


def test_kl_per_dim_draws_one_bar_per_dimension_and_greys_those_below_the_threshold(tmp_path):
    kl = np.array([0.5, 0.001, 2.0, 0.0, 0.02, 0.3])
    fig = plot_kl_per_dim(kl, tmp_path / "kl.png", figsize=(6, 3))
    ax = fig.axes[0]
    assert [bar.get_height() for bar in ax.patches] == pytest.approx(kl)
    hatched = [bool(bar.get_hatch()) for bar in ax.patches]
    assert hatched == [False, True, False, True, False, False]  # below 0.01 nats
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "1", "2", "3", "4", "5"]
    # without the run's AU count, the title says which definition its count is
    assert ax.get_title() == (
        "KL per latent dimension\n"
        "4 of 6 dims carry KL ≥ 0.01 nats (per-dimension KL, not active units)"
    )
    assert ax.get_ylabel() == "KL (nats per sample)"
    # every colour in the legend, the threshold line with its value
    assert legend_texts(ax) == [
        "KL ≥ 0.01 nats (4)",
        "KL < 0.01 nats (2)",
        "0.01 nats per dim (seed 000 threshold)",
    ]
    (threshold,) = ax.lines
    assert list(threshold.get_ydata()) == [0.01, 0.01]
    assert png_size(tmp_path / "kl.png") == (6 * DPI, 3 * DPI)


def test_kl_per_dim_names_both_counts_when_they_differ(tmp_path):
    """AU (Var(mu) ≥ 0.01, Burda et al. 2016) and dims above 0.01 nats are two definitions:
    a run that logs AU 17 with 26 of 32 dims above the threshold says both, by name."""
    kl = np.r_[np.full(26, 0.5), np.full(6, 0.001)]
    ax = plot_kl_per_dim(kl, tmp_path / "kl.png", sort=True, active_units=17).axes[0]
    assert ax.get_title().splitlines()[1] == (
        "17 active units (Var(μ) ≥ 0.01); 26 of 32 dims carry KL ≥ 0.01 nats"
    )


def test_kl_per_dim_sorted_labels_each_bar_with_its_dimension(tmp_path):
    kl = np.array([0.5, 0.001, 2.0, 0.0])
    ax = plot_kl_per_dim(kl, tmp_path / "kl.png", sort=True).axes[0]
    assert [bar.get_height() for bar in ax.patches] == pytest.approx([2.0, 0.5, 0.001, 0.0])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["2", "0", "1", "3"]
    assert "sorted by KL" in ax.get_xlabel()


def test_training_curves_draw_au_and_kl_per_epoch_with_beta_behind(tmp_path):
    epochs = np.arange(12)
    au, kl = np.minimum(epochs, 4), np.exp(-epochs / 3)
    beta = np.minimum(epochs / 5, 1.0) * 0.5
    fig = plot_training_curves(epochs, au, kl, beta, tmp_path / "sub" / "curves.png", latent_dim=8)
    top, bottom = (ax for ax in fig.axes if ax.get_ylabel().startswith(("active", "raw")))
    au_line = next(line for line in top.lines if line.get_label() == "active units")
    np.testing.assert_array_equal(au_line.get_xdata(), epochs)
    np.testing.assert_array_equal(au_line.get_ydata(), au)
    kl_line = next(line for line in bottom.lines if line.get_label() == "KL")
    np.testing.assert_allclose(kl_line.get_ydata(), kl)
    assert legend_texts(top) == ["active units", "latent dim (8)", "β (right axis)"]
    assert bottom.get_xlabel() == "epoch"
    # seed 000's threshold by default, named and valued
    (threshold,) = [line for line in bottom.lines if line.get_label() != "KL"]
    assert list(threshold.get_ydata()) == [0.01, 0.01]
    assert legend_texts(bottom) == ["KL", "verdict.min_kl = 0.01 nats", "β (right axis)"]
    beta_axes = [ax for ax in fig.axes if ax.get_ylabel() == "β (KL weight)"]
    assert len(beta_axes) == 2  # shaded behind both panels
    assert png_size(tmp_path / "sub" / "curves.png") == (7 * DPI, 5 * DPI)
    with pytest.raises(ValueError, match="one value per epoch"):
        plot_training_curves(epochs, epochs[:-1], epochs, epochs, tmp_path / "bad.png")


def tick_labels(axis) -> list[str]:
    """The texts of the ticks drawn inside the axis' view, after a layout pass."""
    axis.get_figure(root=True).draw_without_rendering()
    low, high = sorted(axis.get_view_interval())
    return [
        text.get_text()
        for tick, text in zip(axis.get_ticklocs(), axis.get_ticklabels(), strict=True)
        if low <= tick <= high
    ]


def test_training_curves_of_a_sweeps_trial_draw_its_threshold_on_whole_epochs(tmp_path):
    """A trial's KL curve shows sweep.kl_threshold (read from the run's params and tags, as
    report_run does), not seed 000's 0.01: below it the trial is infeasible."""
    params = {"sweep.kl_threshold": "0.5", "verdict.min_kl": "0.01"}
    trial = kl_threshold_of(params, {"sweep.study_name": "quick"})
    assert kl_threshold_of(params, {}) == {
        "kl_threshold": 0.01,
        "kl_threshold_name": "verdict.min_kl",
    }
    assert kl_threshold_of({}, {}) == {}  # a run logged without its config: the default
    epochs = np.arange(3)  # three epochs and 0-1 units: the default ticks would be 0.25 apart
    fig = plot_training_curves(
        epochs,
        [0, 1, 1],
        [0.1, 0.4, 0.9],
        [0.5, 0.5, 0.5],
        tmp_path / "curves.png",
        **trial,
    )
    top, bottom = (ax for ax in fig.axes if ax.get_ylabel().startswith(("active", "raw")))
    (threshold,) = [line for line in bottom.lines if line.get_label() != "KL"]
    assert list(threshold.get_ydata()) == [0.5, 0.5]
    assert threshold.get_label() == "sweep.kl_threshold = 0.5 nats"
    assert [t.get_text() for t in bottom.texts] == ["0.5 nats"]  # on the line itself
    # epochs and active units are counts: whole-number ticks only
    for axis in (bottom.xaxis, top.yaxis):
        labels = tick_labels(axis)
        assert len(labels) >= 2 and all(text.isdigit() for text in labels)


def test_reconstructions_of_sequences_draw_input_recon_and_branches_per_channel(tmp_path):
    rng = np.random.default_rng(9)
    x = rng.standard_normal((3, 50, 2))
    masks = (rng.random(x.shape) > 0.1).astype(np.float32)
    branches = {"local": x + 0.1, "daily": x - 0.1}
    fig = plot_reconstructions(
        x,
        x + 0.2,
        tmp_path / "seq.png",
        channel_names=["HR", "SBP"],
        branches=branches,
        masks=masks,
        sample_ids=["P1", "P2", "P3"],
        time_label="hour",
        figsize=(8, 6),
    )
    axes = np.array(fig.axes).reshape(3, 2)
    assert [ax.get_title() for ax in axes[0]] == ["HR", "SBP"]
    assert axes[1, 0].get_ylabel().startswith("P2")
    assert axes[2, 1].get_xlabel() == "hour"
    lines = {line.get_label(): line for line in axes[1, 1].lines}
    # Unobserved entries are gaps in the input line, not their fill value.
    expected_input = np.where(masks[1, :, 1] > 0, x[1, :, 1], np.nan)
    np.testing.assert_array_equal(lines["input"].get_ydata(), expected_input)
    np.testing.assert_allclose(lines["reconstruction"].get_ydata(), x[1, :, 1] + 0.2)
    np.testing.assert_allclose(lines["branch daily"].get_ydata(), x[1, :, 1] - 0.1)
    assert set(legend_texts(fig)) == {"input", "reconstruction", "branch local", "branch daily"}
    assert png_size(tmp_path / "seq.png") == (8 * DPI, 6 * DPI)


def test_reconstructions_of_vectors_plot_features_in_one_column(tmp_path):
    v = np.random.default_rng(2).standard_normal((2, 30))
    fig = plot_reconstructions(v, v * 0.9, tmp_path / "vec.png", figsize=(4, 5))
    assert len(fig.axes) == 2
    lines = {line.get_label(): line for line in fig.axes[1].lines}
    np.testing.assert_allclose(lines["reconstruction"].get_ydata(), v[1] * 0.9)
    assert fig.axes[1].get_xlabel() == "feature index"
    assert png_size(tmp_path / "vec.png") == (4 * DPI, 5 * DPI)
    with pytest.raises(ValueError, match="one shape"):
        plot_reconstructions(v, v[:, :5], tmp_path / "bad.png")


def scatter_points(ax) -> np.ndarray:
    return np.concatenate(
        [c.get_offsets() for c in ax.collections if isinstance(c, PathCollection)]
    )


def test_latent_projection_draws_the_principal_components_of_mu(tmp_path):
    rng = np.random.default_rng(10)
    # Variance along dimension 0 (sd 10) dwarfs dimension 1 (sd 1): PC 1 is dimension 0.
    mu = np.column_stack([10 * rng.standard_normal(200), rng.standard_normal(200)])
    labels = (mu[:, 0] > 0).astype(int)
    fig = plot_latent_projection(mu, tmp_path / "labels.png", labels=labels, figsize=(5, 4))
    ax = fig.axes[0]
    points = scatter_points(ax)
    assert len(points) == 200
    # PC 1 is dimension 0 up to sign, centred.
    centred = np.sort(np.abs(mu[:, 0] - mu[:, 0].mean()))
    np.testing.assert_allclose(np.sort(np.abs(points[:, 0])), centred, rtol=1e-3, atol=0.05)
    assert ax.get_xlabel().startswith("PC 1 of mu (99% of variance")
    assert legend_texts(ax) == ["0", "1"] and ax.get_legend().get_title().get_text() == "label"
    assert png_size(tmp_path / "labels.png") == (5 * DPI, 4 * DPI)


def test_latent_projection_colours_a_factor_on_a_named_colorbar(tmp_path):
    rng = np.random.default_rng(11)
    mu = rng.standard_normal((60, 5))
    fig = plot_latent_projection(mu, tmp_path / "f.png", factor=mu[:, 0], factor_name="trend")
    colorbar_axes = [ax for ax in fig.axes if ax.get_ylabel() == "trend"]
    assert len(colorbar_axes) == 1
    (points,) = [c for c in fig.axes[0].collections if isinstance(c, PathCollection)]
    np.testing.assert_allclose(points.get_array(), mu[:, 0])
    many = plot_latent_projection(mu, tmp_path / "m.png", labels=np.arange(60) % 25)
    assert any(ax.get_ylabel() == "label index (of 25 classes)" for ax in many.axes)


def test_latent_projection_colours_a_few_valued_factor_by_class_with_a_legend(tmp_path):
    """A binary factor is two classes, not a colour bar from 0 to 1."""
    rng = np.random.default_rng(13)
    mu = rng.standard_normal((50, 3))
    flag = (mu[:, 0] > 0).astype(np.float64)
    flag[:3] = np.nan  # unknown for three samples
    fig = plot_latent_projection(mu, tmp_path / "flag.png", factor=flag, factor_name="sepsis")
    assert len(fig.axes) == 1  # no colorbar axes
    ax = fig.axes[0]
    assert legend_texts(ax) == ["0", "1", "missing"]
    assert ax.get_legend().get_title().get_text() == "sepsis"
    sizes = {c.get_label(): len(c.get_offsets()) for c in ax.collections}
    assert sizes == {"0": int((flag == 0).sum()), "1": int((flag == 1).sum()), "missing": 3}


def test_latent_projection_of_one_dimension_and_bad_arguments(tmp_path):
    mu = np.random.default_rng(12).standard_normal((40, 1))
    fig = plot_latent_projection(mu, tmp_path / "one.png")
    points = scatter_points(fig.axes[0])
    np.testing.assert_array_equal(points[:, 1], 0.0)  # no second component: zero-padded
    with pytest.raises(ValueError, match="not both"):
        plot_latent_projection(mu, tmp_path / "bad.png", labels=np.zeros(40), factor=mu[:, 0])
