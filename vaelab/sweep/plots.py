"""Figures of a vaelab sweep, drawn from the user attrs and constraints its trials record
(vaelab.sweep.trial.SweepTrial.finish): active units against each swept parameter, the
constraints (KL above its threshold, and that KL carrying information), and the optimisation
history. Every trial is one point, coloured and marked by its category: feasible, or the
constraints it broke ("broke mi", "broke kl + mi"), named in the legend with its count.

As in vaelab.plots, figures are `matplotlib.figure.Figure` objects written by the Agg canvas,
never through pyplot: no global backend is switched and no figure is left open.
"""

import math
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from optuna import Study
from optuna.trial import FrozenTrial, TrialState

from vaelab.sweep.summary import broken_constraints, constraint_names, is_feasible

DPI = 100
AU = "val_active_units"  # user attrs of a vaelab trial
KL = "val_kl"
MI = "val_mi"
LINTHRESH = 0.01  # nats: KL and MI axes are linear below, logarithmic above (symlog)
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
    return {
        "au_vs_params": _au_per_parameter(study.study_name, trials, labels, styles),
        "feasibility": _feasibility(trials, labels, styles),
        "history": _history(trials, labels, styles),
    }


def plot_sweep(study: Study, out_dir: Path) -> list[Path]:
    """The sweep's figures as PNG files in out_dir; none when no trial recorded active units."""
    figures = sweep_figures(study)
    if figures:
        out_dir.mkdir(parents=True, exist_ok=True)
    return [_save(fig, out_dir / f"{stem}.png") for stem, fig in figures.items()]


def _scatter_by_category(
    ax: Axes,
    xs: list[object],
    ys: list[float],
    labels: list[str],
    styles: dict[str, tuple[str, str]],
) -> None:
    """One scatter per category, each trial drawn once, labelled "<category> (<count>)"."""
    for category, (colour, marker) in styles.items():
        members = [i for i, label in enumerate(labels) if label == category]
        ax.scatter(
            [xs[i] for i in members],
            [ys[i] for i in members],
            color=colour,
            marker=marker,
            edgecolors="black",
            linewidths=0.3,
            label=f"{category} ({len(members)})",
        )


def _au_per_parameter(
    study_name: str,
    trials: list[FrozenTrial],
    labels: list[str],
    styles: dict[str, tuple[str, str]],
) -> Figure:
    """One scatter per swept parameter: active units by trial category."""
    params = sorted({name for t in trials for name in t.params}) or ["(none)"]
    fig = Figure(figsize=(4 * len(params) + 2, 3.5), dpi=DPI, layout="constrained")
    axes = fig.subplots(1, len(params), squeeze=False)[0]
    for ax, name in zip(axes, params, strict=True):
        xs = [t.params.get(name) for t in trials]
        categorical = any(isinstance(x, str) for x in xs)
        if categorical:
            xs = [str(x) for x in xs]
        else:  # a trial that did not sample this parameter has no point on its axis
            xs = [math.nan if x is None else x for x in xs]
        _scatter_by_category(ax, xs, [t.user_attrs[AU] for t in trials], labels, styles)
        sampled = [x for x in xs if not categorical and not math.isnan(x)]
        positive = bool(sampled) and all(x > 0 for x in sampled)
        if positive and max(sampled) / min(sampled) > 20:  # swept over decades: a log scale
            ax.set_xscale("log")
        ax.set_xlabel(name)
        ax.set_ylabel("validation active units")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside right upper")
    fig.suptitle(f"{study_name}: active units per parameter")
    return fig


def _feasibility(
    trials: list[FrozenTrial], labels: list[str], styles: dict[str, tuple[str, str]]
) -> Figure:
    """The constraints as pictures: active units against raw KL with sweep.kl_threshold, and
    I(x; z) against raw KL with the MI floor and the line MI = KL.

    Raw KL = I(x; z) + KL(q(z) ‖ p(z)) (Hoffman & Johnson 2016): a trial far below the
    diagonal has KL that carries no information about x.
    """
    fig = Figure(figsize=(11, 4), dpi=DPI, layout="constrained")
    au_ax, mi_ax = fig.subplots(1, 2)
    # Scales first: axvline and axhline read the limits, which are computed for the scale
    # of that moment and then kept.
    for ax in (au_ax, mi_ax):
        ax.set_xscale("symlog", linthresh=LINTHRESH)
        ax.set_xlabel("validation KL (nats per sample)")
    mi_ax.set_yscale("symlog", linthresh=LINTHRESH)
    kls = [t.user_attrs.get(KL, math.nan) for t in trials]
    _scatter_by_category(au_ax, kls, [t.user_attrs[AU] for t in trials], labels, styles)
    mis = [t.user_attrs.get(MI, math.nan) for t in trials]
    _scatter_by_category(mi_ax, kls, mis, labels, styles)

    kl_threshold = _threshold(trials, "kl", KL)
    if kl_threshold is not None:  # in the legend once, from the left panel
        au_ax.axvline(kl_threshold, color="grey", linestyle="--", label="sweep.kl_threshold")
        mi_ax.axvline(kl_threshold, color="grey", linestyle="--")
    au_ax.set_ylabel("validation active units")
    au_ax.set_title(
        "KL above sweep.kl_threshold"
        if kl_threshold is not None or not any("kl" in t.constraints for t in trials)
        else "KL above sweep.kl_threshold (not one threshold for all trials)"
    )

    largest = max((kl for kl in kls if math.isfinite(kl)), default=1.0)
    diagonal = np.concatenate([[0.0], np.geomspace(1e-3, max(largest, 1e-2), 100)])
    references = mi_ax.plot(diagonal, diagonal, color="black", linewidth=0.8, label="MI = KL")
    mi_threshold = _threshold(trials, "mi", MI)
    if mi_threshold is not None:
        references.append(
            mi_ax.axhline(mi_threshold, color="grey", linestyle=":", label="MI floor")
        )
    mi_ax.set_ylabel("validation I(x; z) (nats)")
    mi_ax.set_title("KL that carries information")
    mi_ax.legend(handles=references, loc="upper left")  # MI ≤ KL leaves that corner empty
    # Raw KL is never negative and MI hardly: the axes start just below 0, so that points at
    # 0 show whole, where symlog's margins would show a decade of negative values.
    for ax in (au_ax, mi_ax):
        ax.set_xlim(left=-0.3 * LINTHRESH)
    lowest_mi = min((mi for mi in mis if math.isfinite(mi)), default=0.0)
    mi_ax.set_ylim(bottom=min(-0.3 * LINTHRESH, 1.2 * lowest_mi))

    fig.legend(*au_ax.get_legend_handles_labels(), loc="outside right upper")
    fig.suptitle("feasibility: which constraint each infeasible trial broke")
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


def _history(
    trials: list[FrozenTrial], labels: list[str], styles: dict[str, tuple[str, str]]
) -> Figure:
    """Active units per trial by category, and the best feasible so far."""
    fig = Figure(figsize=(7, 3.5), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    numbers = [t.number for t in trials]
    _scatter_by_category(ax, numbers, [t.user_attrs[AU] for t in trials], labels, styles)
    best_so_far, running = [], -math.inf
    for t in trials:
        if is_feasible(t) and t.state == TrialState.COMPLETE:
            running = max(running, t.user_attrs[AU])
        best_so_far.append(running if running > -math.inf else math.nan)
    ax.step(numbers, best_so_far, where="post", color="black", label="best feasible so far")
    ax.set_xlabel("trial")
    ax.set_ylabel("validation active units")
    fig.legend(*ax.get_legend_handles_labels(), loc="outside right upper")
    ax.set_title("optimisation history")
    return fig


def _save(fig: Figure, path: Path) -> Path:
    """Write the figure as PNG and return the path."""
    fig.savefig(path, format="png", dpi=DPI)
    return path
