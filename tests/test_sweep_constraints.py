"""A sweep's trial is feasible only when every constraint holds: KL above sweep.kl_threshold,
and that KL carrying information (MI, a decoder that uses z). Trials get hand-picked final
metrics through the job's own API (SweepTrial.finish with vaelab.diagnostics'
sweep_constraints) on a real Optuna journal in tmp_path; the summary, the results file, the
console, the figures (read back artist by artist) and the MLflow parent run must all name the
constraints each infeasible trial broke."""

import logging
import math
import subprocess
import sys

import mlflow
import optuna
import pytest
from matplotlib.colors import to_hex
from omegaconf import OmegaConf
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from vaelab.diagnostics import CollapseCriteria, Constraint, sweep_constraints
from vaelab.sweep.plots import TRIALS_GID, sweep_figures
from vaelab.sweep.record import MlflowSweepRecord
from vaelab.sweep.storage import open_storage
from vaelab.sweep.summary import is_feasible, log_summary, summarise, write_results
from vaelab.sweep.trial import SweepTrial

KL_THRESHOLD = 0.5  # nats; the MI floor (0.1 nats) and z gain (2 %) are CollapseCriteria's
MEANINGS = {
    "kl": "raw KL ≥ 0.5 nats",
    "mi": "I(x; z) ≥ 0.1 nats",
    "decoder_uses_z": "recon ≤ 0.98 × recon at z = 0 (the decoder uses z)",
}
# Final metrics of a trial: KL and MI in nats, reconstruction errors (MSE) from the code and
# from z = 0.
HEALTHY = {"kl": 2.0, "mi": 1.5, "recon": 0.5, "recon_z0": 1.0}
KL_BELOW_THRESHOLD = {"kl": 0.3, "mi": 0.25, "recon": 0.5, "recon_z0": 1.0}
KL_WITHOUT_INFORMATION = {"kl": 2.0, "mi": 0.0, "recon": 0.5, "recon_z0": 1.0}
DECODER_IGNORES_Z = {"kl": 1.0, "mi": 0.0, "recon": 1.0, "recon_z0": 1.0}
ALL_BROKEN = {"kl": 0.0, "mi": 0.0, "recon": 1.0, "recon_z0": 1.0}
ON_EVERY_EDGE = {"kl": 0.5, "mi": 0.1, "recon": 0.98, "recon_z0": 1.0}  # each constraint = 0


def final_metrics(kl: float, mi: float, recon: float, recon_z0: float, au: float = 2.0) -> dict:
    return {
        "final/active_units": au,
        "final/kl": kl,
        "final/mi": mi,
        "final/kl_marginal": kl - mi,  # Hoffman & Johnson 2016: KL = MI + marginal KL
        "final/recon": recon,
        "final/recon_z0": recon_z0,
    }


def new_study(tmp_path, name="hand"):
    journal = tmp_path / f"{name}.journal"
    study = optuna.create_study(
        study_name=name, storage=open_storage(str(journal)), direction="maximize"
    )
    return study, journal


def run_trial(study, journal, outcome, beta, au, state=TrialState.COMPLETE):
    """One trial as the training job runs it: finish with its constraints, then told."""
    study.enqueue_trial({"schedule.beta": beta})
    asked = study.ask({"schedule.beta": FloatDistribution(0.01, 10.0, log=True)})
    cfg = OmegaConf.create(
        {
            "optuna_trial": {
                "study_name": study.study_name,
                "storage": str(journal),
                "number": asked.number,
                "parent_run_id": None,
                "worker_slot": 0,
            },
            "sweep": {"objective": "val/active_units", "kl_threshold": KL_THRESHOLD},
        }
    )
    metrics = final_metrics(**outcome, au=au)
    constraints = sweep_constraints(metrics, KL_THRESHOLD, CollapseCriteria())
    failed = "none" if outcome is HEALTHY else "mi"
    verdict = {"verdict": "healthy" if failed == "none" else "collapsed", "failed": failed}
    trial = SweepTrial.from_config(cfg)
    trial.start(
        f"run-{asked.number}", tmp_run_dir(journal, asked.number), f"hand-{asked.number:04d}"
    )
    trial.finish(metrics, verdict, constraints, latent_dim=8)
    study.tell(asked, au if state == TrialState.COMPLETE else None, state=state)
    return study.trials[asked.number]


def tmp_run_dir(journal, number):
    return journal.parent / "runs" / str(number)


@pytest.fixture
def mixed_study(tmp_path):
    """Six trials: 0 feasible; 1 broke kl; 2 broke mi (KL above its threshold); 3 broke mi and
    decoder_uses_z; 4 broke kl and was pruned; 5 failed before its end."""
    study, journal = new_study(tmp_path)
    run_trial(study, journal, HEALTHY, beta=0.1, au=4.0)
    run_trial(study, journal, KL_BELOW_THRESHOLD, beta=1.0, au=1.0)
    run_trial(study, journal, KL_WITHOUT_INFORMATION, beta=0.5, au=3.0)
    run_trial(study, journal, DECODER_IGNORES_Z, beta=4.0, au=0.0)
    run_trial(study, journal, KL_BELOW_THRESHOLD, beta=8.0, au=0.5, state=TrialState.PRUNED)
    failed = study.ask({"schedule.beta": FloatDistribution(0.01, 10.0, log=True)})
    study.tell(failed, state=TrialState.FAIL)
    return study


# --- the job's side ------------------------------------------------------------------------


def test_a_kl_above_its_threshold_that_carries_no_information_is_infeasible_naming_mi(tmp_path):
    study, journal = new_study(tmp_path)
    trial = run_trial(study, journal, KL_WITHOUT_INFORMATION, beta=0.5, au=3.0)

    assert trial.constraints == {
        "kl": pytest.approx(-1.5),  # KL 2 is well above the threshold 0.5 ...
        "mi": pytest.approx(0.1),  # ... but MI 0 is below its floor of 0.1
        "decoder_uses_z": pytest.approx(-0.48),  # recon 0.5 ≤ 0.98 × 1.0
    }
    attrs = trial.user_attrs
    assert attrs["feasible"] is False and not is_feasible(trial)
    assert attrs["broken_constraints"] == ["mi"]
    assert attrs["constraint_meanings"] == MEANINGS
    assert attrs["constraint_mi"] == pytest.approx(0.1)
    assert attrs["collapse_verdict"] == "collapsed"
    assert attrs["collapse_failed"] == "mi"
    # why, in one line: the broken constraint first, each with what the trial measured
    assert attrs["feasibility"] == (
        "infeasible: mi broken: I(x; z) ≥ 0.1 nats (found 0); kl holds: raw KL ≥ 0.5 nats "
        "(found 2); decoder_uses_z holds: recon ≤ 0.98 × recon at z = 0 (the decoder uses z) "
        "(found 0.5 against 1)"
    )
    assert (attrs["mlflow_run_name"], attrs["latent_dim"]) == ("hand-0000", 8)
    assert (attrs["val_kl"], attrs["val_mi"], attrs["val_kl_marginal"]) == (2.0, 0.0, 2.0)
    assert (attrs["val_recon"], attrs["val_recon_z0"], attrs["val_active_units"]) == (
        0.5,
        1.0,
        3.0,
    )

    summary = summarise(study)
    assert summary["feasible"] == [] and summary["best"] is None
    assert summary["infeasible"] == [
        {
            "number": 0,
            "broke": {"mi": "I(x; z) ≥ 0.1 nats"},
            "values": [3.0],
            "params": {"schedule.beta": 0.5},
            "constraints": trial.constraints,
        }
    ]


@pytest.mark.parametrize(
    ("outcome", "broken"),
    [
        (HEALTHY, []),
        (ON_EVERY_EDGE, []),  # a constraint of exactly 0 holds (Optuna's rule)
        (KL_BELOW_THRESHOLD, ["kl"]),
        (KL_WITHOUT_INFORMATION, ["mi"]),
        (DECODER_IGNORES_Z, ["mi", "decoder_uses_z"]),
        (ALL_BROKEN, ["kl", "mi", "decoder_uses_z"]),
    ],
    ids=["healthy", "on-every-edge", "kl", "mi", "mi-and-decoder", "all"],
)
def test_a_trial_is_feasible_only_when_every_constraint_holds(tmp_path, outcome, broken):
    study, journal = new_study(tmp_path)
    trial = run_trial(study, journal, outcome, beta=1.0, au=2.0)
    assert set(trial.constraints) == {"kl", "mi", "decoder_uses_z"}
    assert trial.user_attrs["broken_constraints"] == broken
    assert trial.user_attrs["feasible"] is is_feasible(trial) is (broken == [])
    summary = summarise(study)
    assert [t["number"] for t in summary["feasible"]] == ([] if broken else [0])
    assert [t["broke"] for t in summary["infeasible"]] == (
        [{name: MEANINGS[name] for name in broken}] if broken else []
    )


def test_a_constraint_that_could_not_be_measured_counts_as_broken(tmp_path):
    study, journal = new_study(tmp_path)
    asked = study.ask()
    cfg = OmegaConf.create(
        {
            "optuna_trial": {
                "study_name": "hand",
                "storage": str(journal),
                "number": asked.number,
                "parent_run_id": None,
                "worker_slot": 0,
            },
            "sweep": {"objective": "val/active_units"},
        }
    )
    verdict = {"verdict": "collapsed", "failed": "mi"}
    constraints = [
        Constraint("kl", -1.0, MEANINGS["kl"]),
        Constraint("mi", math.nan, MEANINGS["mi"]),  # Optuna refuses NaN
    ]
    SweepTrial.from_config(cfg).finish(final_metrics(**HEALTHY), verdict, constraints)
    study.tell(asked, 2.0)
    (trial,) = study.trials
    assert trial.constraints == {"kl": -1.0, "mi": math.inf}
    assert trial.user_attrs["broken_constraints"] == ["mi"] and not is_feasible(trial)
    written = OmegaConf.load(write_results(summarise(study), tmp_path / "sweep"))
    assert written.infeasible[0].constraints.mi == math.inf


# --- the summary, the results file and the console -----------------------------------------


def test_the_summary_lists_exactly_the_constraints_each_infeasible_trial_broke(
    mixed_study, tmp_path, caplog
):
    summary = summarise(mixed_study)
    assert summary["name"] == "optuna" and summary["study"] == "hand"
    assert summary["trials"] == {"COMPLETE": 4, "PRUNED": 1, "FAIL": 1}
    assert summary["best"]["number"] == 0 and summary["best_value"] == 4.0
    assert summary["best_params"] == {"schedule.beta": 0.1}
    assert [t["number"] for t in summary["feasible"]] == [0]
    # the pruned trial 4 broke kl too, but only complete trials are listed and counted
    assert [(t["number"], t["broke"]) for t in summary["infeasible"]] == [
        (1, {"kl": MEANINGS["kl"]}),
        (2, {"mi": MEANINGS["mi"]}),
        (3, {"mi": MEANINGS["mi"], "decoder_uses_z": MEANINGS["decoder_uses_z"]}),
    ]
    trials = mixed_study.trials
    for entry in summary["infeasible"]:
        trial = trials[entry["number"]]
        assert entry["values"] == trial.values and entry["params"] == trial.params
        assert entry["constraints"] == trial.constraints
    assert summary["infeasible_by_constraint"] == {"kl": 1, "mi": 2, "decoder_uses_z": 1}

    results = write_results(summary, tmp_path / "sweep")
    assert OmegaConf.to_container(OmegaConf.load(results)) == summary

    where = {"Results": str(results), "MLflow UI": "make ui OUT=x  then open http://..."}
    with caplog.at_level(logging.INFO, logger="vaelab.sweep.summary"):
        log_summary(summarise(mixed_study, ["val/active_units"]), where)
    assert caplog.messages == [
        "Sweep 'hand': 6 trials: 1 feasible, 3 infeasible (kl 1, mi 2, decoder_uses_z 1), "
        "1 pruned, 1 failed",
        "Feasible means every constraint holds: kl (raw KL ≥ 0.5 nats), mi (I(x; z) ≥ 0.1 "
        "nats), decoder_uses_z (recon ≤ 0.98 × recon at z = 0 (the decoder uses z))",
        "Objective: maximize val/active_units; feasible trials range 4 to 4",
        "Best feasible: trial 0, run hand-0000 (id run-0): val/active_units 4 of 8 latent dims",
        "  params: schedule.beta=0.1",
        "Infeasible: trial 1 broke kl; trial 2 broke mi; trial 3 broke mi, decoder_uses_z",
        f"Results:   {results}",
        "MLflow UI: make ui OUT=x  then open http://...",
    ]


def test_the_end_summary_stays_short_with_many_infeasible_trials(tmp_path, caplog):
    study, journal = new_study(tmp_path)
    for beta in [0.5 + i for i in range(9)]:
        run_trial(study, journal, KL_BELOW_THRESHOLD, beta=beta, au=1.0)
    with caplog.at_level(logging.INFO, logger="vaelab.sweep.summary"):
        log_summary(summarise(study), {"Results": "r.yaml", "Dashboard": "make dashboard"})
    said = [r.getMessage() for r in caplog.records if r.name == "vaelab.sweep.summary"]
    assert len(said) <= 15
    assert said[0].startswith("Sweep 'hand': 9 trials: 0 feasible, 9 infeasible (kl 9)")
    assert "No feasible trial: every complete trial broke a constraint" in said
    listed = next(line for line in said if line.startswith("Infeasible:"))
    assert listed.count("broke kl") == 6 and listed.endswith("3 more in optimization_results.yaml")


def test_a_trial_without_constraints_is_feasible():
    study = optuna.create_study(direction="maximize")
    study.tell(study.ask(), 1.0)  # a plain Hydra app's trial: no constraint at all
    infeasible = study.ask()
    infeasible.set_constraint("kl", 0.5)
    study.tell(infeasible, 5.0)
    plain, broken = study.trials
    assert is_feasible(plain) and not is_feasible(broken)
    summary = summarise(study)
    assert [t["number"] for t in summary["feasible"]] == [0]
    assert summary["best"]["number"] == study.best_trial.number == 0  # Optuna agrees
    # a trial whose app recorded no meaning still says which constraint it broke
    assert summary["infeasible"][0]["broke"] == {"kl": "its value must be ≤ 0"}
    assert summary["infeasible_by_constraint"] == {"kl": 1}


# --- the figures ---------------------------------------------------------------------------
# (each figure's readability, ticks, scales and dodged markers: tests/test_sweep_plots.py)

CATEGORIES = {  # legend label: the trials drawn in it (the pruned trial 4 too, hollow)
    "feasible (1)": [0],
    "infeasible: broke kl (2)": [1, 4],
    "infeasible: broke mi (1)": [2],
    "infeasible: broke mi + decoder_uses_z (1)": [3],
}
TRIAL_KL = {0: 2.0, 1: 0.3, 2: 2.0, 3: 1.0, 4: 0.3}
TRIAL_MI = {0: 1.5, 1: 0.25, 2: 0.0, 3: 0.0, 4: 0.25}
TRIAL_AU = {0: 4.0, 1: 1.0, 2: 3.0, 3: 0.0, 4: 0.5}
TRIAL_BETA = {0: 0.1, 1: 1.0, 2: 0.5, 3: 4.0, 4: 8.0}


def drawn(ax) -> dict[str, list[tuple[float, float]]]:
    """The points drawn for each category, sorted: a category may take several scatters
    (hollow for pruned trials, one per sideways offset of markers that would overlap)."""
    points: dict[str, list[tuple[float, float]]] = {}
    for c in ax.collections:
        if c.get_gid() == TRIALS_GID:
            points.setdefault(c.get_label(), []).extend(tuple(p) for p in c.get_offsets())
    return {label: sorted(p) for label, p in points.items()}


def expected(x: dict, y: dict) -> dict[str, list[tuple[float, float]]]:
    return {
        label.split(" (")[0].removeprefix("infeasible: "): sorted((x[n], y[n]) for n in numbers)
        for label, numbers in CATEGORIES.items()
    }


def legend_texts(legend) -> list[str]:
    return [text.get_text() for text in legend.get_texts()]


def test_the_figures_draw_each_trial_once_in_the_category_of_what_it_broke(mixed_study):
    figures = sweep_figures(mixed_study)
    assert list(figures) == ["au_vs_params", "feasibility", "history"]
    pruned = "pruned: hollow marker (1)"

    (au,) = figures["au_vs_params"].axes
    assert au.get_xlabel().startswith("schedule.beta") and au.get_xscale() == "log"
    assert drawn(au) == expected(TRIAL_BETA, TRIAL_AU)
    (legend,) = figures["au_vs_params"].legends
    assert legend_texts(legend) == [*CATEGORIES, pruned]

    au_kl, mi_kl = figures["feasibility"].axes[:2]
    assert drawn(au_kl) == expected(TRIAL_KL, TRIAL_AU)
    assert drawn(mi_kl) == expected(TRIAL_KL, TRIAL_MI)
    (legend,) = figures["feasibility"].legends
    assert legend_texts(legend) == [*CATEGORIES, pruned, "sweep.kl_threshold = 0.5 nats"]
    (threshold,) = [line for line in au_kl.lines if line.get_label().startswith("sweep.kl")]
    assert list(threshold.get_xdata()) == [KL_THRESHOLD, KL_THRESHOLD]
    assert legend_texts(mi_kl.get_legend()) == ["MI = KL", "MI floor = 0.1 nats"]
    floor = next(line for line in mi_kl.lines if line.get_label().startswith("MI floor"))
    assert list(floor.get_ydata()) == [pytest.approx(0.1)] * 2
    assert au_kl.get_xlabel() == mi_kl.get_xlabel() == "validation KL (nats per sample)"
    assert mi_kl.get_ylabel() == "validation I(x; z) (nats)"

    (history,) = figures["history"].axes
    numbers = {n: n for n in TRIAL_AU}
    assert drawn(history) == expected(numbers, TRIAL_AU)
    (legend,) = figures["history"].legends
    assert legend_texts(legend) == [*CATEGORIES, pruned, "best feasible so far"]

    # one colour and one marker per category, blue for feasible
    categories = legend.legend_handles[: len(CATEGORIES)]
    colours = [to_hex(handle.get_markerfacecolor()) for handle in categories]
    markers = [handle.get_marker() for handle in categories]
    assert colours[0] == to_hex("tab:blue")
    assert len(set(colours)) == len(set(markers)) == len(CATEGORIES)


def test_a_sweep_of_the_threshold_itself_draws_no_single_threshold(tmp_path):
    study, journal = new_study(tmp_path)
    run_trial(study, journal, HEALTHY, beta=0.1, au=4.0)
    # the same trial judged against another threshold, as a sweep of sweep.kl_threshold does
    other = study.ask()
    other.set_constraint("kl", 1.0 - HEALTHY["kl"])
    for name, value in final_metrics(**HEALTHY).items():
        other.set_user_attr(name.replace("final/", "val_"), value)
    study.tell(other, 4.0)
    au_kl = sweep_figures(study)["feasibility"].axes[0]
    assert not [line for line in au_kl.lines if line.get_label().startswith("sweep.kl")]
    assert "not one threshold" in au_kl.get_title()


# --- the MLflow parent run -----------------------------------------------------------------


def test_the_parent_run_counts_feasible_trials_and_each_broken_constraint(mixed_study, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    record = MlflowSweepRecord(uri, "constraints", str(tmp_path / "artifacts"))
    parent_run_id = record.open_parent("hand", {})
    summary = summarise(mixed_study)
    record.fill_parent(parent_run_id, mixed_study, summary, write_results(summary, tmp_path))
    parent = mlflow.MlflowClient(uri).get_run(parent_run_id)
    tags = parent.data.tags
    assert tags["sweep.n_feasible"] == "1" and tags["sweep.n_infeasible"] == "3"
    assert {k: v for k, v in tags.items() if k.startswith("sweep.n_broken.")} == {
        "sweep.n_broken.kl": "1",
        "sweep.n_broken.mi": "2",
        "sweep.n_broken.decoder_uses_z": "1",
    }
    assert tags["sweep.best_trial"] == "0"
    assert parent.data.metrics["best/val_mi"] == 1.5
    assert parent.data.metrics["best/val_kl_marginal"] == 0.5


# --- through the sweeper -------------------------------------------------------------------

# A Hydra app of the test's own whose job records hand-picked final metrics through
# SweepTrial.finish, as vaelab's training job does at its end.
CONSTRAINED_APP = """
import hydra

from vaelab.diagnostics import CollapseCriteria, sweep_constraints
from vaelab.sweep.trial import SweepTrial


@hydra.main(config_path=".", config_name="job")
def main(cfg):
    metrics = {
        "final/active_units": 2.0,
        "final/kl": cfg.kl,
        "final/mi": cfg.mi,
        "final/kl_marginal": cfg.kl - cfg.mi,
        "final/recon": 0.5,
        "final/recon_z0": 1.0,
    }
    constraints = sweep_constraints(metrics, cfg.sweep.kl_threshold, CollapseCriteria())
    verdict = {"verdict": "collapsed", "failed": "set by the test"}
    SweepTrial.from_config(cfg).finish(metrics, verdict, constraints)
    return cfg.kl + cfg.mi


if __name__ == "__main__":
    main()
"""
CONSTRAINED_CONFIG = """
kl: 1.0
mi: 1.0
sweep:
  objective: val/active_units
  kl_threshold: 0.5
optuna_trial:
  study_name: null
  storage: null
  number: null
  parent_run_id: null
  worker_slot: 0
"""


@pytest.mark.slow
def test_a_sweep_writes_and_says_which_constraints_its_trials_broke(tmp_path):
    (tmp_path / "app.py").write_text(CONSTRAINED_APP)
    (tmp_path / "job.yaml").write_text(CONSTRAINED_CONFIG)
    sweep_dir = tmp_path / "sweep"
    result = subprocess.run(
        [
            sys.executable,
            "app.py",
            "--multirun",
            "hydra/sweeper=vaelab_optuna",
            "hydra/sweeper/sampler=grid",
            "hydra.sweeper.direction=maximize",
            "hydra.sweeper.study_name=constrained",
            "kl=choice(0.2,2.0)",
            "mi=choice(0.0,1.0)",
            f"hydra.sweep.dir={sweep_dir}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = OmegaConf.to_container(OmegaConf.load(sweep_dir / "optimization_results.yaml"))
    broke = {
        (t["params"]["kl"], t["params"]["mi"]): sorted(t["broke"]) for t in results["infeasible"]
    }
    assert broke == {(0.2, 0.0): ["kl", "mi"], (0.2, 1.0): ["kl"], (2.0, 0.0): ["mi"]}
    assert [t["params"] for t in results["feasible"]] == [{"kl": 2.0, "mi": 1.0}]
    assert results["best_params"] == {"kl": 2.0, "mi": 1.0} and results["best_value"] == 3.0
    assert results["infeasible_by_constraint"] == {"kl": 2, "mi": 2, "decoder_uses_z": 0}
    said = result.stdout + result.stderr
    assert "4 trials: 1 feasible, 3 infeasible (kl 2, mi 2), 0 pruned, 0 failed" in said
