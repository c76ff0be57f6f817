"""The end of a sweep as plain data: the best trial (or the Pareto front), the feasible set,
the infeasible trials with the constraints each broke, and the counts by state, written to
optimization_results.yaml.

The file keeps the stock plugin's keys (`name`, `best_params`, `best_value`, or `solutions`
for several objectives), so tools written for it read vaelab's, and adds vaelab's (`study`,
`trials`, `best`, and, when the trials carry constraints, `feasible`, `infeasible` and
`infeasible_by_constraint`):

    infeasible:
      - number: 3
        broke: {mi: "I(x; z) ≥ 0.1 nats"}  # each broken constraint and what it asks
        values: [2.0]
        params: {schedule.beta: 4.1}
        constraints: {kl: -0.4, mi: 0.07, decoder_uses_z: -0.1}
    infeasible_by_constraint: {kl: 0, mi: 1, decoder_uses_z: 0}
"""

import logging
from pathlib import Path
from typing import Any

import optuna
from omegaconf import OmegaConf
from optuna.trial import FrozenTrial, TrialState

log = logging.getLogger(__name__)

RESULTS_FILE = "optimization_results.yaml"
# Said of a broken constraint whose trial recorded no meaning (set by an app other than vaelab).
UNEXPLAINED = "its value must be ≤ 0"


# The user attr of a trial that does not count toward n_trials: one whose worker died (its
# parameters run again in a new trial) or one asked beyond n_trials by racing workers.
NOT_COUNTED = "not_counted"


def counted(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """The trials that count toward n_trials: all but the stale and the surplus."""
    return [t for t in trials if NOT_COUNTED not in t.user_attrs]


def broken_constraints(trial: FrozenTrial) -> list[str]:
    """The names of the trial's constraints that do not hold: value > 0 (Optuna's rule)."""
    return [name for name, value in trial.constraints.items() if value > 0]


def is_feasible(trial: FrozenTrial) -> bool:
    """Feasible: every constraint ≤ 0, as Optuna judges it; a trial with none is feasible."""
    return not broken_constraints(trial)


def constraint_names(trials: list[FrozenTrial]) -> list[str]:
    """Every constraint name the trials carry, in the order they first appear."""
    return list(dict.fromkeys(name for t in trials for name in t.constraints))


def summarise(study: optuna.Study) -> dict[str, Any]:
    """Counts by state, the best trial(s) and, in a constrained study, the feasible set and
    the infeasible trials with the constraints each broke.

    With constraints on any completed trial the best is the best feasible trial (None if no
    trial is feasible); without, it is simply the best trial, as in the stock plugin.
    """
    every_trial = study.get_trials(deepcopy=False)
    trials = counted(every_trial)
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    constrained = any(t.constraints for t in done)
    candidates = [t for t in done if is_feasible(t)]
    summary: dict[str, Any] = {"name": "optuna"}
    if len(study.directions) == 1:
        # Optuna's best_trial is the best feasible trial in a constrained study.
        best = study.best_trial if candidates else None
        summary["best_params"] = best.params if best else None
        summary["best_value"] = best.value if best else None
    else:
        # Optuna's Pareto front holds feasible trials only in a constrained study.
        summary["solutions"] = [
            {"number": t.number, "params": t.params, "values": t.values} for t in study.best_trials
        ]
    summary["study"] = study.study_name
    summary["trials"] = {
        state.name: n for state in TrialState if (n := sum(t.state == state for t in trials))
    }
    if not_counted := [t for t in every_trial if t not in trials]:
        # Why each uncounted trial is left out: its worker died (and its parameters ran again)
        # or racing workers asked one trial too many.
        summary["not_counted"] = {t.number: t.user_attrs[NOT_COUNTED] for t in not_counted}
    if len(study.directions) == 1:
        summary["best"] = (
            {
                "number": best.number,
                "value": best.value,
                "params": best.params,
                "user_attrs": dict(best.user_attrs),
            }
            if best
            else None
        )
    if constrained:
        summary["feasible"] = [
            {
                "number": t.number,
                "values": t.values,
                "params": t.params,
                "constraints": t.constraints,
            }
            for t in candidates
        ]
        infeasible = [t for t in done if not is_feasible(t)]
        summary["infeasible"] = [
            {
                "number": t.number,
                "broke": _broke(t),
                "values": t.values,
                "params": t.params,
                "constraints": t.constraints,
            }
            for t in infeasible
        ]
        summary["infeasible_by_constraint"] = {
            name: sum(name in broken_constraints(t) for t in infeasible)
            for name in constraint_names(done)
        }
    return summary


def _broke(trial: FrozenTrial) -> dict[str, str]:
    """Each constraint the trial broke, with what it asks (vaelab.sweep.trial records it)."""
    meanings = trial.user_attrs.get("constraint_meanings", {})
    return {name: meanings.get(name, UNEXPLAINED) for name in broken_constraints(trial)}


def write_results(summary: dict[str, Any], sweep_dir: Path) -> Path:
    """optimization_results.yaml in the sweep's folder; returns its path."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    results = sweep_dir / RESULTS_FILE
    OmegaConf.save(OmegaConf.create(summary), results)
    return results


def log_summary(summary: dict[str, Any], results: Path, storage: str) -> None:
    """Say how the sweep went, what won, which constraints the others broke, and where to look."""
    log.info("Sweep %r: %s", summary["study"], _counts(summary))
    if "solutions" in summary:
        for t in summary["solutions"]:
            log.info("Pareto trial %d: values %s, params %s", t["number"], t["values"], t["params"])
    elif summary["best"]:
        best = summary["best"]
        log.info(
            "Best%s trial %d: value %s, params %s",
            " feasible" if "feasible" in summary else "",
            best["number"],
            best["value"],
            best["params"],
        )
    elif "feasible" in summary:
        log.info("No feasible trial: every completed trial broke a constraint")
    else:
        log.info("No completed trial")
    for t in summary.get("feasible", []):
        log.info(
            "  feasible trial %d: values %s, constraints %s, params %s",
            t["number"],
            t["values"],
            t["constraints"],
            t["params"],
        )
    for t in summary.get("infeasible", []):
        log.info(
            "  infeasible trial %d: broke %s; values %s, params %s",
            t["number"],
            "; ".join(f"{name} ({meaning})" for name, meaning in t["broke"].items()),
            t["values"],
            t["params"],
        )
    for number, why in summary.get("not_counted", {}).items():
        log.info("  trial %d does not count toward n_trials: %s", number, why)
    log.info("Results: %s; Optuna storage %s", results, storage)


def _counts(summary: dict[str, Any]) -> str:
    """The trials counted: feasible, infeasible by broken constraint, pruned, failed.

    e.g. "1 feasible, 3 of 4 infeasible: kl 1, mi 3, decoder_uses_z 2; 1 pruned, 0 failed
    (by state {'COMPLETE': 4, 'PRUNED': 1})"; a trial may break several constraints.
    """
    by_state = summary["trials"]
    complete = by_state.get("COMPLETE", 0)
    ended = f"{by_state.get('PRUNED', 0)} pruned, {by_state.get('FAIL', 0)} failed"
    if "feasible" not in summary:
        return f"{complete} complete (no constraints), {ended} (by state {by_state})"
    broken = ", ".join(f"{name} {n}" for name, n in summary["infeasible_by_constraint"].items())
    return (
        f"{len(summary['feasible'])} feasible, "
        f"{len(summary['infeasible'])} of {complete} infeasible: {broken}; "
        f"{ended} (by state {by_state})"
    )
