"""Figures of a vaelab sweep, drawn from the user attrs its trials record
(vaelab.sweep.trial.SweepTrial.finish): active units against each swept parameter, KL
feasibility, and the optimisation history.

As in vaelab.plots, figures are `matplotlib.figure.Figure` objects written by the Agg canvas,
never through pyplot: no global backend is switched and no figure is left open.
"""

import math
from pathlib import Path

from matplotlib.figure import Figure
from optuna import Study
from optuna.trial import FrozenTrial, TrialState

from vaelab.sweep.summary import is_feasible

DPI = 100
AU = "val_active_units"  # user attrs of a vaelab trial
KL = "val_kl"
FEASIBLE, INFEASIBLE = "tab:blue", "tab:red"


def plot_sweep(study: Study, out_dir: Path) -> list[Path]:
    """The sweep's figures as PNG files in out_dir; none when no trial recorded active units."""
    trials = sorted(
        (t for t in study.get_trials(deepcopy=False) if AU in t.user_attrs),
        key=lambda t: t.number,
    )
    if not trials:
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    return [
        _save(_au_per_parameter(study.study_name, trials), out_dir / "au_vs_params.png"),
        _save(_feasibility(trials), out_dir / "feasibility.png"),
        _save(_history(trials), out_dir / "history.png"),
    ]


def _colours(trials: list[FrozenTrial]) -> list[str]:
    """Each trial's colour: blue feasible, red infeasible (collapsed)."""
    return [FEASIBLE if is_feasible(t) else INFEASIBLE for t in trials]


def _au_per_parameter(study_name: str, trials: list[FrozenTrial]) -> Figure:
    """One scatter per swept parameter: active units, blue feasible, red collapsed."""
    params = sorted({name for t in trials for name in t.params}) or ["(none)"]
    fig = Figure(figsize=(4 * len(params), 3.5), dpi=DPI, layout="constrained")
    axes = fig.subplots(1, len(params), squeeze=False)[0]
    for ax, name in zip(axes, params, strict=True):
        xs = [t.params.get(name) for t in trials]
        ax.scatter(
            [str(x) if isinstance(x, str) else x for x in xs],
            [t.user_attrs[AU] for t in trials],
            c=_colours(trials),
        )
        numeric = all(isinstance(x, (int, float)) and x > 0 for x in xs)
        if numeric and max(xs) / min(xs) > 20:  # a range spanning decades was swept on a log scale
            ax.set_xscale("log")
        ax.set_xlabel(name)
        ax.set_ylabel("validation active units")
    fig.suptitle(f"{study_name}: AU per parameter (blue feasible, red KL below threshold)")
    return fig


def _feasibility(trials: list[FrozenTrial]) -> Figure:
    """Active units against raw validation KL, with the collapse threshold."""
    fig = Figure(figsize=(5, 4), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    ax.scatter(
        [t.user_attrs.get(KL, math.nan) for t in trials],
        [t.user_attrs[AU] for t in trials],
        c=_colours(trials),
    )
    # constraint = threshold − KL, so the threshold is KL + constraint (the same for all trials)
    first = trials[0].user_attrs
    threshold = first.get(KL, 0) + first.get("constraint_kl", 0)
    ax.axvline(threshold, color="grey", linestyle="--", label="sweep.kl_threshold")
    ax.set_xscale("symlog", linthresh=0.01)
    ax.set_xlabel("validation KL (nats per sample)")
    ax.set_ylabel("validation active units")
    ax.legend()
    ax.set_title("feasibility: KL above the collapse threshold")
    return fig


def _history(trials: list[FrozenTrial]) -> Figure:
    """Active units per trial, and the best feasible so far."""
    fig = Figure(figsize=(6, 3.5), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    numbers = [t.number for t in trials]
    ax.scatter(numbers, [t.user_attrs[AU] for t in trials], c=_colours(trials))
    best_so_far, running = [], -math.inf
    for t in trials:
        if is_feasible(t) and t.state == TrialState.COMPLETE:
            running = max(running, t.user_attrs[AU])
        best_so_far.append(running if running > -math.inf else math.nan)
    ax.step(numbers, best_so_far, where="post", color="black", label="best feasible so far")
    ax.set_xlabel("trial")
    ax.set_ylabel("validation active units")
    ax.legend()
    ax.set_title("optimisation history")
    return fig


def _save(fig: Figure, path: Path) -> Path:
    """Write the figure as PNG and return the path."""
    fig.savefig(path, format="png", dpi=DPI)
    return path
