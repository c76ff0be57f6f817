"""Figures of a vaelab sweep, drawn from the user attrs and constraints its trials record
(vaelab.sweep.trial.SweepTrial.finish): active units against each swept parameter, the
constraints (KL above its threshold, and that KL carrying information), and the optimisation
history. Every trial is one marker, coloured and shaped by its category: feasible, or the
constraints it broke ("broke mi", "broke kl + mi"), named in the legend with its count;
pruned trials are hollow, and trials that would hide each other are moved a few points apart
on the page (their data stays exact). Threshold lines carry their value, every axis numeric
ticks (integers for trial numbers and active units), and a parameter searched on a log scale
is drawn on a log axis.

As in vaelab.plots, figures are `matplotlib.figure.Figure` objects written by the Agg canvas,
never through pyplot: no global backend is switched and no figure is left open.
"""

import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.axis import Axis
from matplotlib.collections import PathCollection
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import (
    FuncFormatter,
    LogLocator,
    MaxNLocator,
    NullFormatter,
    SymmetricalLogLocator,
)
from matplotlib.transforms import IdentityTransform, ScaledTranslation
from optuna import Study
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import FrozenTrial, TrialState

from vaelab.plots import threshold_line
from vaelab.sweep.summary import broken_constraints, constraint_names, is_feasible

DPI = 100
AU = "val_active_units"  # user attrs of a vaelab trial
KL = "val_kl"
MI = "val_mi"
# A KL or MI axis whose positive values span more than SYMLOG_SPAN (two decades) is symlog:
# linear below LINTHRESH nats (seed 000's collapse threshold, 0.01), logarithmic above, so
# collapsed trials (KL ~ 1e-4) and healthy ones (KL ~ 10) both show. A narrower span is
# linear: symlog would leave it without a labelled tick.
LINTHRESH = 0.01
SYMLOG_SPAN = 100.0
MARKER_SIZE = 36.0  # pt² (matplotlib's default scatter size): markers 6 pt across
# Trials whose markers would cover each other are dodged sideways by this many points each
# (an offset in display space: the data drawn stays each trial's exact value), so that n
# trials always show n markers.
DODGE_STEP = 7.0
TRIALS_GID = "trials"  # gid of the scatters that draw trials: the only ones dodged
FEASIBLE = "feasible"
FEASIBLE_STYLE = ("tab:blue", "o")  # (colour, marker)
# One style per kind of infeasible trial, in legend order; the markers differ as well as the
# colours, so that the figures read without colour.
BROKEN_STYLES = [
    ("tab:red", "X"),
    ("tab:orange", "s"),
    ("tab:purple", "^"),
    ("tab:brown", "D"),
    ("tab:pink", "v"),
    ("tab:olive", "P"),
    ("tab:cyan", "*"),
    ("tab:grey", "h"),
]


def categorise(
    broken_by_trial: list[list[str]], names: list[str]
) -> tuple[list[str], dict[str, tuple[str, str]]]:
    """Each trial's category, "feasible" or "broke " and the constraints it broke (in the
    order of `names`), and each category's (colour, marker) in legend order: feasible first,
    then by how many constraints broke. The sweep report notebook draws with it too."""

    def position(name: str) -> int:
        return names.index(name) if name in names else len(names)

    def label(broken: tuple[str, ...]) -> str:
        return f"broke {' + '.join(broken)}" if broken else FEASIBLE

    broken_sets = [tuple(sorted(broken, key=position)) for broken in broken_by_trial]
    kinds = sorted(
        {broken for broken in broken_sets if broken},
        key=lambda broken: (len(broken), [position(name) for name in broken]),
    )
    styles = {FEASIBLE: FEASIBLE_STYLE} if () in broken_sets else {}
    for i, broken in enumerate(kinds):
        styles[label(broken)] = BROKEN_STYLES[i % len(BROKEN_STYLES)]
    return [label(broken) for broken in broken_sets], styles


def sweep_figures(study: Study) -> dict[str, Figure]:
    """The sweep's figures by file stem; none when no trial recorded active units."""
    trials = sorted(
        (t for t in study.get_trials(deepcopy=False) if AU in t.user_attrs),
        key=lambda t: t.number,
    )
    if not trials:
        return {}
    labels, styles = categorise([broken_constraints(t) for t in trials], constraint_names(trials))
    marks = _Marks(labels, styles, [t.state == TrialState.PRUNED for t in trials])
    return {
        "au_vs_params": _au_per_parameter(study.study_name, trials, marks),
        "feasibility": _feasibility(trials, marks),
        "history": _history(trials, marks),
    }


def plot_sweep(study: Study, out_dir: Path) -> list[Path]:
    """The sweep's figures as PNG files in out_dir; none when no trial recorded active units."""
    figures = sweep_figures(study)
    if figures:
        out_dir.mkdir(parents=True, exist_ok=True)
    return [_save(fig, out_dir / f"{stem}.png") for stem, fig in figures.items()]


class _Marks:
    """How each trial is drawn: its category's colour and marker, hollow when pruned."""

    def __init__(
        self, labels: list[str], styles: dict[str, tuple[str, str]], pruned: list[bool]
    ) -> None:
        self.labels, self.styles, self.pruned = labels, styles, pruned

    def scatter(self, ax: Axes, xs: Sequence[float], ys: Sequence[float]) -> None:
        """One scatter per category and pruned-or-not, labelled with the category; each trial
        drawn once at its exact (x, y). `_dodge` later moves apart those that overlap."""
        for category, (colour, marker) in self.styles.items():
            for hollow in (False, True):
                members = [
                    i
                    for i, label in enumerate(self.labels)
                    if label == category and self.pruned[i] == hollow
                ]
                if not members:
                    continue
                fill = (
                    {"facecolors": "none", "edgecolors": colour, "linewidths": 1.3}
                    if hollow
                    else {"color": colour, "edgecolors": "black", "linewidths": 0.3}
                )
                ax.scatter(
                    [xs[i] for i in members],
                    [ys[i] for i in members],
                    s=MARKER_SIZE,
                    marker=marker,
                    label=category,
                    gid=TRIALS_GID,
                    clip_on=False,  # a marker dodged past the axes' edge shows whole
                    **fill,
                )

    def legend_handles(self) -> list[Line2D]:
        """A legend entry per category, "feasible (n)" or "infeasible: broke kl (n)", and one
        for the hollow marker of pruned trials when there are any."""
        counts = Counter(self.labels)
        handles = [
            Line2D(
                [],
                [],
                linestyle="none",
                marker=marker,
                markersize=7,
                markerfacecolor=colour,
                markeredgecolor="black",
                markeredgewidth=0.3,
                label=f"{category if category == FEASIBLE else 'infeasible: ' + category} "
                f"({counts[category]})",
            )
            for category, (colour, marker) in self.styles.items()
        ]
        if any(self.pruned):
            handles.append(
                Line2D(
                    [],
                    [],
                    linestyle="none",
                    marker="o",
                    markersize=7,
                    markerfacecolor="none",
                    markeredgecolor="0.3",
                    label=f"pruned: hollow marker ({sum(self.pruned)})",
                )
            )
        return handles


def _dodge(fig: Figure) -> None:
    """Move apart, sideways in display space, the trial markers that would cover each other.

    The figure is laid out first, so that each axes' size and limits are final; the data of
    every point stays the trial's value (an offset transform moves the marker), so tests and
    readers of the artists see exact values.
    """
    fig.draw_without_rendering()
    diameter = math.sqrt(MARKER_SIZE) * fig.dpi / 72.0  # pixels
    for ax in fig.axes:
        collections = [c for c in ax.collections if c.get_gid() == TRIALS_GID]
        if not collections:
            continue
        # scatter masks a NaN (a parameter the trial did not sample): unmasked, it stays put
        own = [np.ma.filled(np.ma.asarray(c.get_offsets(), float), np.nan) for c in collections]
        shifts = iter(_dodge_shifts(ax.transData.transform(np.concatenate(own)), diameter))
        for collection, offsets in zip(collections, own, strict=True):
            mine = np.array([next(shifts) for _ in offsets])
            for k, shift in enumerate(sorted(set(mine.tolist()))):
                target = collection if k == 0 else _same_style(ax, collection)
                target.set_offsets(offsets[mine == shift])
                moved = ScaledTranslation(shift / 72.0, 0.0, fig.dpi_scale_trans)
                target.set_offset_transform(ax.transData + moved)


def _dodge_shifts(pixels: np.ndarray, diameter: float) -> list[float]:
    """Each point's sideways shift in points: the points within one marker diameter of a
    cluster's first point are spread DODGE_STEP apart, centred on it."""
    clusters: list[list[int]] = []
    for i, point in enumerate(pixels):
        if not np.isfinite(point).all():
            continue
        near = (c for c in clusters if np.hypot(*(point - pixels[c[0]])) < diameter)
        cluster = next(near, None)
        if cluster is None:
            clusters.append([i])
        else:
            cluster.append(i)
    shifts = [0.0] * len(pixels)
    for cluster in clusters:
        for k, i in enumerate(cluster):
            shifts[i] = (k - (len(cluster) - 1) / 2) * DODGE_STEP
    return shifts


def _same_style(ax: Axes, like: PathCollection) -> PathCollection:
    """An empty scatter on ax drawn like `like` (marker, size, colours, label)."""
    twin = PathCollection(
        like.get_paths(),
        sizes=like.get_sizes(),
        facecolors=like.get_facecolor(),
        edgecolors=like.get_edgecolor(),
        linewidths=like.get_linewidths(),
        label=like.get_label(),
        gid=TRIALS_GID,
        zorder=like.get_zorder(),
    )
    twin.set_transform(IdentityTransform())  # as scatter does: the marker is in points
    twin.set_clip_on(like.get_clip_on())
    ax.add_collection(twin, autolim=False)
    return twin


def _integer_ticks(*axes: Axis) -> None:
    """Whole-number ticks (trial numbers, active units, epochs): no 2.5 trials."""
    for axis in axes:
        axis.set_major_locator(MaxNLocator(integer=True))


def _au_axis(ax: Axes, trials: list[FrozenTrial]) -> None:
    """The y axis of validation active units: a count from 0 (where collapsed trials sit) to
    the most any trial reached, with whole-number ticks."""
    top = max(1.0, *(t.user_attrs[AU] for t in trials))
    ax.set_ylim(-0.05 * top, 1.05 * top)
    _integer_ticks(ax.yaxis)
    ax.set_ylabel("validation active units")


def _nats_axis(ax: Axes, which: str, values: Sequence[float]) -> bool:
    """Scale a KL or MI axis (nats) for `values`: linear, or symlog when the positive values
    span more than SYMLOG_SPAN, with ticks at 1, 2 and 5 of each decade (fewer over many
    decades) each labelled as a plain number. Returns whether it is symlog."""
    positive = [v for v in values if math.isfinite(v) and v > 0]
    if not positive or max(positive) / min(positive) <= SYMLOG_SPAN:
        return False
    axis = ax.xaxis if which == "x" else ax.yaxis
    (ax.set_xscale if which == "x" else ax.set_yscale)("symlog", linthresh=LINTHRESH)
    subs = _decade_subs(math.log10(max(positive) / LINTHRESH))
    axis.set_major_locator(SymmetricalLogLocator(linthresh=LINTHRESH, base=10, subs=subs))
    axis.set_major_formatter(FuncFormatter(_plain))
    ax.tick_params(axis=which, labelsize=8)
    return True


def _decade_subs(decades: float) -> tuple[float, ...]:
    """Ticks within each decade of a log axis spanning `decades`: 1, 2 and 5 of each when
    there is room, fewer as the decades get narrower on the page."""
    return (1.0, 2.0, 5.0) if decades <= 3 else (1.0, 3.0) if decades <= 5 else (1.0,)


def _plain(value: float, _position: object = None) -> str:
    """A tick label as a plain number (0.05, 2, 30), not 5 × 10⁻²."""
    return f"{value:g}"


def _param_axis(ax: Axes, name: str, trials: list[FrozenTrial]) -> list[float]:
    """Each trial's position on the axis of parameter `name` (NaN when it did not sample it),
    the axis scaled as Optuna searched it: log for a log-scaled distribution, one evenly spaced
    and labelled tick per choice of a categorical one; a numeric axis spans the whole searched
    range, so that where in it the trials landed shows."""
    distribution: BaseDistribution | None = next(
        (t.distributions[name] for t in trials if name in t.distributions), None
    )
    values = [t.params.get(name) for t in trials]
    if isinstance(distribution, CategoricalDistribution) or any(isinstance(v, str) for v in values):
        choices = (
            list(distribution.choices)
            if isinstance(distribution, CategoricalDistribution)
            else sorted({v for v in values if v is not None}, key=str)
        )
        ax.set_xticks(range(len(choices)), [str(c) for c in choices])
        ax.set_xlim(-0.5, len(choices) - 0.5)
        return [math.nan if v is None else float(choices.index(v)) for v in values]
    if getattr(distribution, "log", False):  # FloatDistribution or IntDistribution, log=True
        ax.set_xscale("log")
        decades = math.log10(distribution.high / distribution.low)
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=_decade_subs(decades + 1)))
        ax.xaxis.set_major_formatter(FuncFormatter(_plain))
        ax.xaxis.set_minor_formatter(NullFormatter())
    elif isinstance(distribution, IntDistribution):
        _integer_ticks(ax.xaxis)
    if isinstance(distribution, FloatDistribution | IntDistribution):
        sampled = [float(v) for v in values if v is not None]  # a range since widened, too
        low, high = min([distribution.low, *sampled]), max([distribution.high, *sampled])
        if distribution.log:  # 4 % of the range as margins, in the axis' own (log) units
            ratio = (high / low) ** 0.04 if high > low else 1.5
            ax.set_xlim(low / ratio, high * ratio)
        else:
            pad = 0.04 * (high - low) or 0.5
            ax.set_xlim(low - pad, high + pad)
    return [math.nan if v is None else float(v) for v in values]


def _au_per_parameter(study_name: str, trials: list[FrozenTrial], marks: _Marks) -> Figure:
    """One scatter per swept parameter: active units by trial category."""
    params = sorted({name for t in trials for name in t.params}) or ["(none)"]
    fig = Figure(figsize=(4 * len(params) + 2.5, 3.5), dpi=DPI, layout="constrained")
    axes = fig.subplots(1, len(params), squeeze=False)[0]
    for ax, name in zip(axes, params, strict=True):
        xs = _param_axis(ax, name, trials)  # the scale before the points: log needs it
        marks.scatter(ax, xs, [t.user_attrs[AU] for t in trials])
        _au_axis(ax, trials)
        ax.set_xlabel(name + (" (log scale)" if ax.get_xscale() == "log" else ""))
    fig.legend(handles=marks.legend_handles(), loc="outside right upper")
    fig.suptitle(f"{study_name}: active units per parameter")
    _dodge(fig)
    return fig


def _feasibility(trials: list[FrozenTrial], marks: _Marks) -> Figure:
    """The constraints as pictures: active units against raw KL with sweep.kl_threshold, and
    I(x; z) against raw KL with the MI floor and the line MI = KL, each threshold labelled
    with its value.

    Raw KL = I(x; z) + KL(q(z) ‖ p(z)) (Hoffman & Johnson 2016): a trial far below the
    diagonal has KL that carries no information about x.
    """
    fig = Figure(figsize=(11, 4), dpi=DPI, layout="constrained")
    au_ax, mi_ax = fig.subplots(1, 2)
    kls = [t.user_attrs.get(KL, math.nan) for t in trials]
    mis = [t.user_attrs.get(MI, math.nan) for t in trials]
    kl_threshold = _threshold(trials, "kl", KL)
    mi_threshold = _threshold(trials, "mi", MI)
    kl_span = [x for x in [*kls, kl_threshold] if x is not None and math.isfinite(x)]
    mi_span = [x for x in [*mis, mi_threshold] if x is not None and math.isfinite(x)]
    # Scales first: axvline and axhline read the limits, which are computed for the scale
    # of that moment and then kept.
    symlog_kl = [_nats_axis(ax, "x", kl_span) for ax in (au_ax, mi_ax)][0]
    symlog_mi = _nats_axis(mi_ax, "y", mi_span)
    marks.scatter(au_ax, kls, [t.user_attrs[AU] for t in trials])
    marks.scatter(mi_ax, kls, mis)
    _au_axis(au_ax, trials)

    references = []
    if kl_threshold is not None:  # in the figure's legend once, on both panels
        for ax in (au_ax, mi_ax):
            line = threshold_line(
                ax,
                kl_threshold,
                f"sweep.kl_threshold = {kl_threshold:g} nats",
                "grey",
                text_color="0.35",
                vertical=True,
            )
        references.append(line)
    au_ax.set_title(
        "KL above sweep.kl_threshold"
        if kl_threshold is not None or not any("kl" in t.constraints for t in trials)
        else "KL above sweep.kl_threshold (not one threshold for all trials)"
    )

    largest = max(kl_span, default=1.0)
    diagonal = np.concatenate([[0.0], np.geomspace(1e-3, max(largest, 1e-2), 100)])
    mi_refs = mi_ax.plot(diagonal, diagonal, color="black", linewidth=0.8, label="MI = KL")
    if mi_threshold is not None:
        label = f"MI floor = {mi_threshold:g} nats"
        mi_refs.append(
            threshold_line(mi_ax, mi_threshold, label, "grey", text_color="0.35", linestyle=":")
        )
    mi_ax.set_ylabel("validation I(x; z) (nats)")
    mi_ax.set_title("KL that carries information")
    mi_ax.legend(handles=mi_refs, loc="upper left", fontsize=8)  # MI ≤ KL: that corner is empty
    # Raw KL is never negative and MI hardly: the axes start just below 0, so that points at
    # 0 show whole (where symlog's margins would show a decade of negative values) and how
    # far a trial is from no KL at all shows on a linear axis too.
    for ax in (au_ax, mi_ax):
        ax.set_xlim(left=-0.3 * LINTHRESH if symlog_kl else -0.04 * largest)
    below_zero = -0.3 * LINTHRESH if symlog_mi else -0.04 * max([*mi_span, largest])
    mi_ax.set_ylim(bottom=min([below_zero, *(1.2 * mi for mi in mi_span)]))

    for ax in (au_ax, mi_ax):
        ax.set_xlabel("validation KL (nats per sample)")
    fig.legend(handles=marks.legend_handles() + references, loc="outside right upper")
    fig.suptitle("feasibility: which constraint each infeasible trial broke")
    _dodge(fig)
    return fig


def _threshold(trials: list[FrozenTrial], constraint: str, attr: str) -> float | None:
    """The threshold of a `threshold − metric` constraint, when every trial shares one.

    constraint = threshold − metric, so threshold = metric + constraint; None when no trial
    records both, or when the trials differ (a sweep of the threshold itself).
    """
    thresholds = {
        round(t.user_attrs[attr] + t.constraints[constraint], 9)
        for t in trials
        if constraint in t.constraints and attr in t.user_attrs
    }
    thresholds = {x for x in thresholds if math.isfinite(x)}
    return thresholds.pop() if len(thresholds) == 1 else None


def _history(trials: list[FrozenTrial], marks: _Marks) -> Figure:
    """Active units per trial by category, and the best feasible so far."""
    fig = Figure(figsize=(7.5, 3.5), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    numbers = [t.number for t in trials]
    marks.scatter(ax, numbers, [t.user_attrs[AU] for t in trials])
    best_so_far, running = [], -math.inf
    for t in trials:
        if is_feasible(t) and t.state == TrialState.COMPLETE:
            running = max(running, t.user_attrs[AU])
        best_so_far.append(running if running > -math.inf else math.nan)
    (best,) = ax.step(
        numbers, best_so_far, where="post", color="black", label="best feasible so far"
    )
    ax.set_xlim(min(numbers) - 0.5, max(numbers) + 0.5)  # at least one whole trial wide
    _integer_ticks(ax.xaxis)
    _au_axis(ax, trials)
    ax.set_xlabel("trial number")
    fig.legend(handles=[*marks.legend_handles(), best], loc="outside right upper")
    ax.set_title("optimisation history")
    _dodge(fig)
    return fig


def _save(fig: Figure, path: Path) -> Path:
    """Write the figure as PNG and return the path."""
    fig.savefig(path, format="png", dpi=DPI)
    return path
