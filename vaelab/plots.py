"""Figures of a run, saved as PNG: per-dimension KL, collapse over training, reconstructions,
and a 2-D view of the latent means.

Each function takes arrays and an output path, writes the PNG and returns the Figure it drew,
so that a test (or a notebook) can read back the data and labels drawn. Figures are built as
`matplotlib.figure.Figure` objects and written by the Agg canvas, never through pyplot: no
global backend is switched (a notebook importing this keeps its own), no figure is left open
in a registry, and the PNG is exactly figsize x DPI pixels (constrained layout, no
bbox_inches="tight").
"""

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from vaelab.diagnostics import ACTIVE_UNIT_THRESHOLD

log = logging.getLogger(__name__)

DPI = 100  # pixels per inch of every figure: a (7, 5) inch figure is 700 x 500 pixels
# Seed 000's success criterion "KL > 0.01" applied per dimension: a dimension below it
# carries (almost) nothing. Not the definition of an active unit (Var_x(mu) ≥ 0.01, Burda et
# al. 2016): a dimension can carry KL with a mean that hardly moves, so the two counts differ
# and the KL figure names both.
KL_DIM_THRESHOLD = 0.01
MAX_LEGEND_CLASSES = 20  # more classes than this are coloured on a colorbar instead
# A numeric factor with at most this many distinct values (a binary flag, a grade) is drawn
# as classes with a legend; a colour bar would suggest values in between.
MAX_DISCRETE_FACTOR_VALUES = 10


def _figure(figsize: tuple[float, float]) -> Figure:
    """A pyplot-free figure at DPI with constrained layout."""
    return Figure(figsize=figsize, dpi=DPI, layout="constrained")


def _save(fig: Figure, path: str | Path) -> Figure:
    """Write the figure as PNG (creating the folder) and return it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=DPI)
    log.debug("wrote %s", path)
    return fig


def plot_kl_per_dim(
    kl_per_dim: np.ndarray,
    path: str | Path,
    sort: bool = False,
    threshold: float = KL_DIM_THRESHOLD,
    active_units: int | None = None,
    figsize: tuple[float, float] | None = None,
) -> Figure:
    """Bar chart of the mean KL of each latent dimension; bars below `threshold` nats in grey.

    `sort=True` orders bars from most to least informative, labelled by dimension index.
    `active_units` is the run's own count (Var_x(mu) ≥ ACTIVE_UNIT_THRESHOLD, Burda et al.
    2016), named in the title beside the count of dimensions above `threshold`: the two are
    different definitions and need not agree.
    """
    kl = np.asarray(kl_per_dim, dtype=np.float64).ravel()
    order = np.argsort(-kl, kind="stable") if sort else np.arange(len(kl))
    figsize = figsize or (min(16.0, max(6.0, 0.25 * len(kl) + 2.0)), 3.5)
    fig = _figure(figsize)
    ax = fig.add_subplot()
    below = kl[order] < threshold
    colours = np.where(below, "0.6", "tab:blue")
    bars = ax.bar(np.arange(len(kl)), kl[order], color=colours)
    for bar, is_below in zip(bars, below, strict=True):
        if is_below:
            bar.set_hatch("//")
    line = ax.axhline(
        threshold,
        color="tab:red",
        linestyle="--",
        linewidth=1,
        label=f"{threshold:g} nats per dim (seed 000 threshold)",
    )
    few = len(kl) <= 32
    ticks = [str(d) for d in order]
    ax.set_xticks(np.arange(len(kl)), ticks, fontsize=8 if few else 6, rotation=0 if few else 90)
    ax.set_xlabel("latent dimension" + (" (sorted by KL)" if sort else ""))
    ax.set_ylabel("KL (nats per sample)")
    n_above = int((~below).sum())
    dims = f"{n_above} of {len(kl)} dims carry KL ≥ {threshold:g} nats"
    units = (
        f"{active_units} active unit{'' if active_units == 1 else 's'} "
        f"(Var(μ) ≥ {ACTIVE_UNIT_THRESHOLD:g}); {dims}"
        if active_units is not None
        else f"{dims} (per-dimension KL, not active units)"
    )
    ax.set_title(f"KL per latent dimension\n{units}", fontsize=10)
    handles = [
        Patch(facecolor="tab:blue", label=f"KL ≥ {threshold:g} nats ({n_above})"),
        Patch(facecolor="0.6", hatch="//", label=f"KL < {threshold:g} nats ({len(kl) - n_above})"),
        line,
    ]
    ax.legend(handles=handles, loc="upper right", fontsize=8)
    return _save(fig, path)


def threshold_line(
    ax: Axes,
    value: float,
    label: str,
    color: str,
    text_color: str | None = None,
    vertical: bool = False,
    unit: str = "nats",
    **line_style: object,
) -> Line2D:
    """A dashed threshold across `ax` (horizontal, or vertical for a threshold on x), with
    `label` for the legend and its value written at the line's end ("0.5 nats", in `unit`;
    "" for a unitless score), so the number reads without the legend. Returns the line."""
    line_style = {"linestyle": "--", **line_style}
    value_text = f"{value:g} {unit}".rstrip()
    text_style = {"fontsize": 8, "color": text_color or color}
    if vertical:
        line = ax.axvline(value, color=color, label=label, **line_style)
        ax.text(
            value,
            0.98,
            f"{value_text} ",
            transform=ax.get_xaxis_transform(),
            rotation=90,
            ha="right",
            va="top",
            **text_style,
        )
    else:
        line = ax.axhline(value, color=color, label=label, **line_style)
        ax.text(
            0.99,
            value,
            value_text,
            transform=ax.get_yaxis_transform(),
            ha="right",
            va="bottom",
            **text_style,
        )
    return line


def plot_risk_scores(
    scores: np.ndarray,
    path: str | Path,
    labels: np.ndarray | None = None,
    normal_label: object = 0,
    threshold: float | None = None,
    threshold_name: str = "threshold",
    title: str = "Risk scores (IsolationForest fitted on the normal class)",
    bins: int = 40,
    figsize: tuple[float, float] = (7.0, 4.0),
) -> Figure:
    """Histograms of the anomaly scores (seed 003's risk score), one per class on shared bins,
    the normal class first, with the flagging threshold as a vertical line.

    Counts, not densities: how many of each class fall beyond the threshold is what the
    figure is read for (its precision and false positives). Without labels, one histogram.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1 or len(scores) == 0:
        raise ValueError(f"plot_risk_scores: expected scores (N >= 1,), found {scores.shape}")
    if labels is not None and len(labels) != len(scores):
        raise ValueError(
            f"plot_risk_scores: expected one label per score, found {len(labels)} labels "
            f"for {len(scores)} scores"
        )
    edges = np.histogram_bin_edges(scores, bins=bins)
    fig = _figure(figsize)
    ax = fig.add_subplot()
    if labels is None:
        groups = [("all samples", np.ones(len(scores), dtype=bool))]
    else:
        labels = np.asarray(labels)
        others = [c for c in np.unique(labels) if c != normal_label]
        groups = [(f"{_class_name(normal_label)} (normal)", labels == normal_label)]
        groups += [(f"{_class_name(c)}", labels == c) for c in others]
    cmap = matplotlib.colormaps["tab10"]
    for k, (name, member) in enumerate(groups):
        if member.any():
            ax.hist(
                scores[member],
                bins=edges,
                histtype="stepfilled",
                alpha=0.45,
                color=cmap(k),
                edgecolor=cmap(k),
                label=f"{name} ({int(member.sum())})",
            )
    if threshold is not None:
        threshold_line(
            ax, threshold, f"{threshold_name} = {threshold:.3g}", "tab:red", vertical=True, unit=""
        )
    ax.set_xlabel("anomaly score s(x) (Liu et al. 2008; higher = more anomalous)")
    ax.set_ylabel("samples (count)")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title, fontsize=10)
    ax.legend(title="label" if labels is not None else None, fontsize=8)
    return _save(fig, path)


def _beta_behind(ax: Axes, epochs: np.ndarray, beta: np.ndarray) -> Patch:
    """β as a shaded area on a right-hand twin axis, drawn behind the curves of `ax`; returns
    a legend entry for the shading."""
    twin = ax.twinx()
    twin.fill_between(epochs, 0.0, beta, color="0.85", step="post", label="β")
    twin.set_ylabel("β (KL weight)", color="0.4")
    twin.set_ylim(0.0, max(float(np.nanmax(beta)) * 1.05, 1e-6))
    ax.set_zorder(twin.get_zorder() + 1)  # the curves above the shading
    ax.patch.set_visible(False)
    return Patch(facecolor="0.85", label="β (right axis)")


def kl_threshold_of(params: Mapping[str, str], tags: Mapping[str, str]) -> dict[str, Any]:
    """The raw-KL threshold a run is judged by, from its MLflow params (its flat config) and
    tags, as plot_training_curves' keyword arguments: a sweep's trial (tag sweep.study_name)
    is infeasible below sweep.kl_threshold, any other run collapsed below verdict.min_kl
    (seed 000's 0.01 nats); none for a run logged without its config."""
    name = "sweep.kl_threshold" if "sweep.study_name" in tags else "verdict.min_kl"
    if name not in params:
        return {}
    return {"kl_threshold": float(params[name]), "kl_threshold_name": name}


def plot_training_curves(
    epochs: Sequence[float],
    au: Sequence[float],
    kl: Sequence[float],
    beta: Sequence[float],
    path: str | Path,
    latent_dim: int | None = None,
    kl_threshold: float = KL_DIM_THRESHOLD,
    kl_threshold_name: str = "verdict.min_kl",
    figsize: tuple[float, float] = (7.0, 5.0),
) -> Figure:
    """Active units (top) and raw KL (bottom) per epoch, each with the β schedule behind.

    `kl_threshold` is the raw KL the run is judged by, drawn and labelled with its value and
    `kl_threshold_name`: for a sweep's trial sweep.kl_threshold (below it the trial is
    infeasible), otherwise the collapse verdict's min_kl (seed 000's 0.01 nats).
    """
    epochs, au, kl, beta = (np.asarray(a, dtype=np.float64) for a in (epochs, au, kl, beta))
    if not len(epochs) == len(au) == len(kl) == len(beta):
        raise ValueError(
            f"plot_training_curves: expected one value per epoch, found {len(epochs)} epochs, "
            f"{len(au)} AU, {len(kl)} KL, {len(beta)} β"
        )
    fig = _figure(figsize)
    top, bottom = fig.subplots(2, 1, sharex=True)
    top.plot(epochs, au, marker="o", markersize=3, color="tab:blue", label="active units")
    if latent_dim is not None:
        top.axhline(
            latent_dim,
            color="tab:blue",
            linestyle=":",
            linewidth=1,
            label=f"latent dim ({latent_dim})",
        )
    top.set_ylabel("active units (count)")
    top.set_ylim(bottom=0)
    top.yaxis.set_major_locator(MaxNLocator(integer=True))  # a count: no half units
    top.set_title("Collapse during training (validation split), β schedule shaded")
    bottom.plot(epochs, kl, marker="o", markersize=3, color="tab:orange", label="KL")
    threshold_line(
        bottom, kl_threshold, f"{kl_threshold_name} = {kl_threshold:g} nats", "tab:red", linewidth=1
    )
    bottom.set_ylabel("raw KL (nats per sample)")
    bottom.set_xlabel("epoch")
    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))  # shared with the top panel
    for ax in (top, bottom):
        shading = _beta_behind(ax, epochs, beta)
        handles = ax.get_legend_handles_labels()[0]
        ax.legend(handles=[*handles, shading], loc="best", fontsize=8)
    return _save(fig, path)


def plot_reconstructions(
    inputs: np.ndarray,
    recons: np.ndarray,
    path: str | Path,
    channel_names: Sequence[str] | None = None,
    branches: Mapping[str, np.ndarray] | None = None,
    masks: np.ndarray | None = None,
    sample_ids: Sequence[str] | None = None,
    max_samples: int = 4,
    max_channels: int = 8,
    time_label: str = "time step",
    value_label: str = "normalised value (z)",
    figsize: tuple[float, float] | None = None,
) -> Figure:
    """Inputs against reconstructions: one row per sample, one column per channel.

    Sequences (n, T, C) get a column per channel; feature vectors (n, F) one column, with
    the feature index on the x axis. `branches` (name -> array like recons) adds each decoder
    branch of a multi-scale model (seed 000) as a thin line. Entries where `masks` is 0 are
    left out of the input line (they hold a fill value, not a measurement).
    """
    inputs, recons = np.asarray(inputs, dtype=np.float64), np.asarray(recons, dtype=np.float64)
    if inputs.shape != recons.shape or inputs.ndim not in (2, 3):
        raise ValueError(
            f"plot_reconstructions: expected inputs and recons of one shape (n, T, C) or "
            f"(n, F), found {inputs.shape} and {recons.shape}"
        )
    vectors = inputs.ndim == 2
    expand = (lambda a: np.asarray(a, dtype=np.float64)[..., None]) if vectors else np.asarray
    inputs, recons = expand(inputs), expand(recons)
    branches = {name: expand(b) for name, b in (branches or {}).items()}
    if masks is not None:
        inputs = np.where(expand(masks) > 0, inputs, np.nan)
    n_rows = min(len(inputs), max_samples)
    n_cols = min(inputs.shape[2], max_channels)
    if inputs.shape[2] > max_channels:
        log.info("plotting the first %d of %d channels", max_channels, inputs.shape[2])
    names = list(channel_names) if channel_names is not None else None
    if vectors:
        names = names if names is not None and len(names) == 1 else ["features"]
    elif names is None:
        names = [f"channel {c}" for c in range(n_cols)]
    ids = list(sample_ids) if sample_ids is not None else [f"sample {i}" for i in range(n_rows)]
    figsize = figsize or (min(max(3.2 * n_cols, 6.0), 24.0), 2.2 * n_rows + 0.6)
    fig = _figure(figsize)
    axes = np.atleast_2d(fig.subplots(n_rows, n_cols, sharex=True, squeeze=False))
    x = np.arange(inputs.shape[1])
    for i in range(n_rows):
        for c in range(n_cols):
            ax = axes[i, c]
            ax.plot(x, inputs[i, :, c], color="0.2", linewidth=1.0, label="input")
            ax.plot(x, recons[i, :, c], color="tab:red", linewidth=1.2, label="reconstruction")
            for name, branch in branches.items():
                ax.plot(x, branch[i, :, c], linewidth=0.6, alpha=0.7, label=f"branch {name}")
            if i == 0:
                ax.set_title(names[c], fontsize=9)
            if c == 0:
                ax.set_ylabel(f"{ids[i]}\n{value_label}", fontsize=8)
            if i == n_rows - 1:
                ax.set_xlabel("feature index" if vectors else time_label, fontsize=8)
            ax.tick_params(labelsize=7)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # whole steps and features
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 6), fontsize=8)
    fig.suptitle("Inputs and reconstructions")
    return _save(fig, path)


# The three central slices of a volume (C, D, H, W), by the axis a slice fixes. Voxel order is
# taken as NIfTI stores it and nibabel reads it (BraTS: D left-right, H posterior-anterior, W
# inferior-superior), so the axial slice fixes W, the coronal H, the sagittal D. Each slice is
# drawn with its second remaining axis pointing up (superior up in coronal and sagittal).
VOLUME_VIEWS = {"axial": 3, "coronal": 2, "sagittal": 1}


def central_slice(volume: np.ndarray, view: str) -> np.ndarray:
    """The central slice of a (D, H, W) volume in `view`, as imshow draws it (rows = up)."""
    axis = VOLUME_VIEWS[view] - 1
    plane = np.take(volume, volume.shape[axis] // 2, axis=axis)
    return plane.T  # the later remaining axis on the vertical (drawn with origin="lower")


def plot_volume_reconstructions(
    inputs: np.ndarray,
    recons: np.ndarray,
    path: str | Path,
    channel_names: Sequence[str],
    sample_ids: Sequence[str],
    ssim: np.ndarray | None = None,
    psnr: np.ndarray | None = None,
    panel_inches: float = 1.45,
) -> Figure:
    """Central slices of volumes (n, C, D, H, W) against their reconstructions (seed 004).

    One row per volume and modality; for each of the axial, coronal and sagittal views an
    input panel beside its reconstruction, on the input's own grey scale (its min to max), so
    a reconstruction that loses contrast shows it. Every panel's title names the subject,
    modality and view; the reconstruction's also gives the volume and modality's SSIM and
    PSNR (`ssim`, `psnr`: (n, C), NaN or None where not measured).
    """
    inputs, recons = np.asarray(inputs, dtype=np.float64), np.asarray(recons, dtype=np.float64)
    if inputs.ndim != 5 or inputs.shape != recons.shape:
        raise ValueError(
            f"plot_volume_reconstructions: expected inputs and recons of one shape "
            f"(n, C, D, H, W), found {inputs.shape} and {recons.shape}"
        )
    n, c = inputs.shape[:2]
    names, ids = list(channel_names), [str(i) for i in sample_ids]
    if len(names) != c or len(ids) != n:
        raise ValueError(
            f"plot_volume_reconstructions: expected {c} channel names and {n} sample ids, "
            f"found {len(names)} and {len(ids)}"
        )
    nan = np.full((n, c), np.nan)
    ssim = nan if ssim is None else np.asarray(ssim, dtype=np.float64)
    psnr = nan if psnr is None else np.asarray(psnr, dtype=np.float64)
    views = list(VOLUME_VIEWS)
    fig = _figure((2 * len(views) * panel_inches, n * c * (panel_inches + 0.25) + 0.5))
    axes = fig.subplots(n * c, 2 * len(views), squeeze=False)
    for i in range(n):
        for k, modality in enumerate(names):
            row = axes[i * c + k]
            lo, hi = float(inputs[i, k].min()), float(inputs[i, k].max())
            quality = (
                f"SSIM {'n/a' if np.isnan(ssim[i, k]) else f'{ssim[i, k]:.3f}'}, "
                f"PSNR {'n/a' if np.isnan(psnr[i, k]) else f'{psnr[i, k]:.1f} dB'}"
            )
            for v, view in enumerate(views):
                for j, (kind, volume) in enumerate((("input", inputs), ("recon", recons))):
                    ax = row[2 * v + j]
                    ax.imshow(
                        central_slice(volume[i, k], view),
                        cmap="gray",
                        vmin=lo,
                        vmax=hi if hi > lo else lo + 1.0,
                        origin="lower",
                        interpolation="nearest",
                    )
                    title = f"{ids[i]} {modality} {view}\n{kind}"
                    ax.set_title(title + (f", {quality}" if kind == "recon" else ""), fontsize=6)
                    ax.set_xticks([])
                    ax.set_yticks([])
    fig.suptitle("Central slices: inputs and reconstructions (z = mu)", fontsize=10)
    return _save(fig, path)


def _pca_2d(mu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The first two principal components of mu (zero-padded below 2 dims) and their shares."""
    centred = mu - mu.mean(axis=0)
    _, singular, vt = np.linalg.svd(centred, full_matrices=False)
    scores = centred @ vt[:2].T
    variance = singular**2
    share = variance[:2] / variance.sum() if variance.sum() > 0 else np.zeros(len(variance[:2]))
    pad = 2 - scores.shape[1]
    return np.pad(scores, ((0, 0), (0, pad))), np.pad(share, (0, pad))


def plot_latent_projection(
    mu: np.ndarray,
    path: str | Path,
    labels: np.ndarray | None = None,
    factor: np.ndarray | None = None,
    factor_name: str = "factor",
    max_points: int = 20000,
    seed: int = 0,
    figsize: tuple[float, float] = (6.5, 5.0),
) -> Figure:
    """Scatter of the latent means on their first two principal components.

    Coloured by class `labels` (legend) or by a `factor`, not both: a factor with at most
    MAX_DISCRETE_FACTOR_VALUES distinct values (or not numeric) as classes with a legend, a
    continuous one on a colorbar. The projection uses the raw means: inactive dimensions
    hardly vary, so they do not steer it. Above `max_points` a seeded subsample is drawn.
    """
    mu = np.asarray(mu, dtype=np.float64)
    if mu.ndim != 2 or len(mu) < 2:
        raise ValueError(f"plot_latent_projection: expected mu (N >= 2, D), found {mu.shape}")
    if labels is not None and factor is not None:
        raise ValueError("plot_latent_projection: colour by labels or by factor, not both")
    keep = np.arange(len(mu))
    if len(mu) > max_points:
        keep = np.sort(np.random.default_rng(seed).choice(len(mu), max_points, replace=False))
    scores, share = _pca_2d(mu)
    scores = scores[keep]
    fig = _figure(figsize)
    ax = fig.add_subplot()
    style = dict(s=10, alpha=0.7, linewidths=0)
    if labels is not None:
        _scatter_classes(fig, ax, scores, np.asarray(labels)[keep], "label", style)
    elif factor is not None:
        values = np.asarray(factor)[keep]
        numeric = np.issubdtype(values.dtype, np.number)
        if not numeric or len(np.unique(values)) <= MAX_DISCRETE_FACTOR_VALUES:
            _scatter_classes(fig, ax, scores, values, factor_name, style)
        else:
            points = ax.scatter(*scores.T, c=values, cmap="viridis", **style)
            fig.colorbar(points, ax=ax, label=factor_name)
    else:
        ax.scatter(*scores.T, color="tab:blue", **style)
    ax.set_xlabel(f"PC 1 of mu ({100 * share[0]:.0f}% of variance; latent units)")
    ax.set_ylabel(f"PC 2 of mu ({100 * share[1]:.0f}% of variance; latent units)")
    ax.set_title(f"Latent means, PCA to 2-D ({len(keep)} of {len(mu)} samples)")
    return _save(fig, path)


def _scatter_classes(
    fig: Figure, ax: Axes, scores: np.ndarray, values: np.ndarray, title: str, style: dict
) -> None:
    """One colour per class with a legend titled `title`; above MAX_LEGEND_CLASSES classes,
    the class index on a colorbar."""
    classes = np.unique(values)  # NaN, if any, once
    if len(classes) > MAX_LEGEND_CLASSES:
        codes = np.searchsorted(classes, values)
        points = ax.scatter(*scores.T, c=codes, cmap="viridis", **style)
        fig.colorbar(points, ax=ax, label=f"{title} index (of {len(classes)} classes)")
        return
    cmap = matplotlib.colormaps["tab10" if len(classes) <= 10 else "tab20"]
    for k, cls in enumerate(classes):
        missing = isinstance(cls, float | np.floating) and np.isnan(cls)
        at = _isnan(values) if missing else values == cls
        ax.scatter(*scores[at].T, color=cmap(k), label=_class_name(cls), **style)
    ax.legend(title=title, fontsize=8, markerscale=1.5)


def _isnan(values: np.ndarray) -> np.ndarray:
    """Which values are NaN, for arrays of any dtype."""
    if np.issubdtype(values.dtype, np.floating):
        return np.isnan(values)
    return np.array([isinstance(v, float) and np.isnan(v) for v in values], dtype=bool)


def _class_name(cls: object) -> str:
    """A legend label: 1 rather than 1.0 for a whole float, "missing" for NaN."""
    if isinstance(cls, float | np.floating):
        return "missing" if np.isnan(cls) else f"{cls:g}"
    return str(cls)
