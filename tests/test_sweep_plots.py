"""The sweep's figures read at a glance, checked by the artists they draw: numeric tick labels
where the trials are, each threshold drawn at its value and labelled with it, a legend entry
for every colour and for pruned trials, one visible marker per trial even where two coincide,
and each parameter on the scale Optuna searched it on. Studies are built in memory with the
user attrs and constraints vaelab.sweep.trial.SweepTrial.finish records; nothing trains."""

import math

import numpy as np
import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial

from vaelab.sweep.plots import TRIALS_GID, sweep_figures

KL_THRESHOLD = 0.5  # nats, sweep.kl_threshold of experiment=quick
MI_FLOOR = 0.1  # nats, CollapseCriteria.min_mi
SPACE = {  # as conf/hparams_search/quick.yaml searches it
    "schedule.beta": FloatDistribution(0.05, 4.0, log=True),
    "loss.free_bits": FloatDistribution(0.0, 0.5),
    "model.latent_dim": CategoricalDistribution([4, 8, 16, 32]),
    "trainer.epochs": IntDistribution(2, 5),
}


def add_trial(study, kl, mi, au, state=TrialState.COMPLETE, **params):
    """A finished trial as SweepTrial.finish records it: constraints (feasible when ≤ 0) and
    the user attrs the figures read."""
    constraints = {"kl": KL_THRESHOLD - kl, "mi": MI_FLOOR - mi}
    broken = [name for name, value in constraints.items() if value > 0]
    params = {"schedule.beta": 0.5, "loss.free_bits": 0.1, "model.latent_dim": 8} | params
    study.add_trial(
        create_trial(
            state=state,
            value=au if state == TrialState.COMPLETE else None,
            params=params,
            distributions={name: SPACE[name] for name in params},
            user_attrs={
                "val_kl": kl,
                "val_mi": mi,
                "val_active_units": au,
                "feasible": not broken,
                "broken_constraints": broken,
                "constraint_meanings": {
                    "kl": f"raw KL ≥ {KL_THRESHOLD:g} nats",
                    "mi": f"I(x; z) ≥ {MI_FLOOR:g} nats",
                },
                **{f"constraint_{name}": value for name, value in constraints.items()},
            },
            constraints=constraints,
            intermediate_values={0: au} if state == TrialState.PRUNED else None,
        )
    )


def quick_study():
    """The four trials of the quick sweep a user read: KL between 0.15 and 0.6 nats, two of
    them at the same KL and AU."""
    study = optuna.create_study(study_name="quick", direction="maximize")
    add_trial(study, kl=0.6, mi=0.5, au=3.0, **{"schedule.beta": 0.3})
    add_trial(study, kl=0.15, mi=0.05, au=0.0, **{"schedule.beta": 2.0})
    add_trial(study, kl=0.15, mi=0.05, au=0.0, **{"schedule.beta": 2.0})
    add_trial(study, kl=0.45, mi=0.3, au=2.0, **{"schedule.beta": 0.1})
    return study


def wide_study():
    """KL over five decades, collapsed (1e-4 nats) to healthy (20 nats), one trial pruned."""
    study = optuna.create_study(study_name="wide", direction="maximize")
    for kl, au in [(1e-4, 0.0), (0.003, 0.0), (0.2, 1.0), (0.45, 1.0), (2.0, 4.0), (20.0, 8.0)]:
        add_trial(study, kl=kl, mi=0.5 * kl, au=au, **{"schedule.beta": 4.0 / (1.0 + kl)})
    add_trial(study, kl=0.3, mi=0.2, au=1.0, state=TrialState.PRUNED)
    return study


# The figures of each study, drawn once for the module (a layout pass is the slow part); the
# tests only read them.
@pytest.fixture(scope="module")
def quick():
    return sweep_figures(quick_study())


@pytest.fixture(scope="module")
def wide():
    return sweep_figures(wide_study())


def number(text: str) -> float:
    """A tick label as a number (matplotlib writes minus as U+2212)."""
    return float(text.replace("\N{MINUS SIGN}", "-"))


def ticks(axis) -> dict[float, str]:
    """Each major tick inside the axis' view and its label, as the axis' own locator and
    formatter make them (the figures come laid out: their limits are final)."""
    low, high = sorted(axis.get_view_interval())
    locations = [float(tick) for tick in axis.get_majorticklocs() if low <= tick <= high]
    return dict(zip(locations, axis.get_major_formatter().format_ticks(locations), strict=True))


def trial_points(ax) -> np.ndarray:
    """The data of every trial marker on ax (all categories, hollow or not, dodged or not)."""
    return np.concatenate([c.get_offsets() for c in ax.collections if c.get_gid() == TRIALS_GID])


def marker_centres(ax) -> np.ndarray:
    """Where each trial marker is drawn, in pixels (the figures come laid out)."""
    return np.concatenate(
        [
            c.get_offset_transform().transform(np.ma.filled(c.get_offsets(), np.nan))
            for c in ax.collections
            if c.get_gid() == TRIALS_GID
        ]
    )


def legend_texts(fig) -> list[str]:
    (legend,) = fig.legends
    return [text.get_text() for text in legend.get_texts()]


# --- feasibility -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["quick", "wide"])
def test_every_kl_tick_has_a_number_and_the_trials_range_has_ticks(name, request):
    """On a linear axis (0.15-0.6 nats) and on a symlog one (1e-4-20 nats) alike, every tick
    carries a number, and the band 0.15-0.6 nats, where the user saw none, carries some."""
    au_ax, mi_ax = request.getfixturevalue(name)["feasibility"].axes[:2]
    for ax in (au_ax, mi_ax):
        drawn = ticks(ax.xaxis)
        assert all(text for text in drawn.values())
        values = {tick: number(text) for tick, text in drawn.items()}
        assert all(value == pytest.approx(tick) for tick, value in values.items())
        assert [tick for tick in values if 0.15 <= tick <= 0.6]
        kls = trial_points(ax)[:, 0]
        assert min(values) <= kls.min() and kls.max() <= max(values) * 1.5
    assert all(text.isdigit() for text in ticks(au_ax.yaxis).values())  # active units: counts
    assert all(text for text in ticks(mi_ax.yaxis).values())


def test_kl_over_decades_is_symlog_and_a_narrow_range_linear(quick, wide):
    assert quick["feasibility"].axes[0].get_xscale() == "linear"
    wide_kl = wide["feasibility"].axes[0]
    assert wide_kl.get_xscale() == "symlog"
    assert min(wide_kl.get_xlim()) < 0 < 1e-4  # the collapsed trials show whole, right of 0


def test_the_sweeps_own_thresholds_are_drawn_at_their_values_and_say_them(quick):
    fig = quick["feasibility"]
    au_ax, mi_ax = fig.axes[:2]
    for ax in (au_ax, mi_ax):
        (line,) = [line for line in ax.lines if line.get_label().startswith("sweep.kl")]
        assert list(line.get_xdata()) == [KL_THRESHOLD] * 2
        assert line.get_label() == "sweep.kl_threshold = 0.5 nats"
        assert "0.5 nats" in [text.get_text().strip() for text in ax.texts]  # on the line
    (floor,) = [line for line in mi_ax.lines if line.get_label().startswith("MI floor")]
    assert list(floor.get_ydata()) == [pytest.approx(MI_FLOOR)] * 2
    assert floor.get_label() == "MI floor = 0.1 nats"
    assert "sweep.kl_threshold = 0.5 nats" in legend_texts(fig)


def test_the_legend_names_feasible_infeasible_and_pruned_trials(wide):
    fig = wide["feasibility"]
    assert legend_texts(fig) == [
        "feasible (2)",
        "infeasible: broke kl (3)",
        "infeasible: broke kl + mi (2)",
        "pruned: hollow marker (1)",
        "sweep.kl_threshold = 0.5 nats",
    ]
    au_ax = fig.axes[0]
    hollow = [
        c for c in au_ax.collections if c.get_gid() == TRIALS_GID and not len(c.get_facecolor())
    ]
    assert [tuple(p) for c in hollow for p in c.get_offsets()] == [(0.3, 1.0)]  # the pruned one


def test_trials_at_the_same_point_each_show_a_marker(quick):
    """Trials 1 and 2 share KL and AU: both are drawn at their exact values, and their markers
    are moved apart on the page (a display offset), not stacked."""
    au_ax, mi_ax = quick["feasibility"].axes[:2]
    for ax in (au_ax, mi_ax):
        points = trial_points(ax)
        assert len(points) == 4
        centres = marker_centres(ax)
        gaps = [math.dist(a, b) for i, a in enumerate(centres) for b in centres[i + 1 :]]
        assert min(gaps) >= 6.0  # pixels: a 6 pt marker is 8 px at 100 dpi; ≥ 6 px apart
    assert sorted(map(tuple, trial_points(au_ax).tolist())) == [
        (0.15, 0.0),
        (0.15, 0.0),
        (0.45, 2.0),
        (0.6, 3.0),
    ]


# --- active units per parameter --------------------------------------------------------------


def test_each_parameter_is_drawn_on_the_scale_optuna_searched():
    study = quick_study()
    add_trial(study, kl=1.0, mi=0.8, au=4.0, **{"model.latent_dim": 32, "trainer.epochs": 3})
    fig = sweep_figures(study)["au_vs_params"]
    axes = {ax.get_xlabel().split(" (")[0]: ax for ax in fig.axes}
    assert list(axes) == ["loss.free_bits", "model.latent_dim", "schedule.beta", "trainer.epochs"]

    beta = axes["schedule.beta"]  # FloatDistribution(log=True): a log axis, plain numbers
    assert beta.get_xscale() == "log" and beta.get_xlabel() == "schedule.beta (log scale)"
    labels = ticks(beta.xaxis)
    assert {"0.1", "0.2", "0.5", "1", "2"} <= set(labels.values())
    assert axes["loss.free_bits"].get_xscale() == "linear"  # FloatDistribution(log=False)

    dims = axes["model.latent_dim"]  # a choice: one evenly spaced tick per choice
    assert [t.get_text() for t in dims.get_xticklabels()] == ["4", "8", "16", "32"]
    assert sorted(trial_points(dims)[:, 0].tolist()) == [1.0, 1.0, 1.0, 1.0, 3.0]

    epochs = axes["trainer.epochs"]  # an IntDistribution: whole numbers; NaN where unsampled
    assert all(text.isdigit() for text in ticks(epochs.xaxis).values())
    assert np.isnan(np.ma.filled(trial_points(epochs)[:, 0], np.nan)).sum() == 4
    for ax in fig.axes:
        assert all(text.isdigit() for text in ticks(ax.yaxis).values())
    assert legend_texts(fig) == [
        "feasible (2)",
        "infeasible: broke kl (1)",
        "infeasible: broke kl + mi (2)",
    ]


# --- history -----------------------------------------------------------------------------


def test_the_history_counts_trials_in_whole_numbers_with_a_legend(quick):
    fig = quick["history"]
    (ax,) = fig.axes
    trial_ticks = ticks(ax.xaxis)
    assert trial_ticks and all(text.isdigit() for text in trial_ticks.values())
    assert all(tick == int(tick) for tick in trial_ticks)
    assert all(text.isdigit() for text in ticks(ax.yaxis).values())
    assert ax.get_xlabel() == "trial number"
    assert legend_texts(fig) == [
        "feasible (1)",
        "infeasible: broke kl (1)",
        "infeasible: broke kl + mi (2)",
        "best feasible so far",
    ]
    (best,) = ax.lines
    assert list(best.get_ydata()) == [3.0] * 4  # trial 0 stays the best feasible
    assert sorted(trial_points(ax)[:, 0].tolist()) == [0, 1, 2, 3]
