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


def summarise(study: optuna.Study, objective_names: list[str] | None = None) -> dict[str, Any]:
    """Counts by state, the objectives (named by the study's metric names, else
    `objective_names`) and the range of their value, the best trial(s) and, in a constrained
    study, what each constraint means, the feasible set and the infeasible trials with the
    constraints each broke.

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
    directions = study.directions
    names = (
        study.metric_names or objective_names or [f"objective {i}" for i in range(len(directions))]
    )
    summary["objectives"] = {
        name: direction.name.lower() for name, direction in zip(names, directions, strict=True)
    }
    if len(study.directions) == 1 and (ranked := candidates if constrained else done):
        summary["objective_range"] = [min(t.value for t in ranked), max(t.value for t in ranked)]
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
        summary["constraint_meanings"] = {
            name: meaning
            for t in done
            for name, meaning in t.user_attrs.get("constraint_meanings", {}).items()
        }
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


def log_summary(summary: dict[str, Any], where: dict[str, str]) -> None:
    """The sweep's answer in at most ~15 lines: the counts, what feasible means, the objective
    and its range, the best feasible trial with its run, the infeasible trials by what they
    broke, and `where` ({label: path, command or URL}, one line each). The per-trial detail
    is in optimization_results.yaml and at DEBUG."""
    lines = [f"Sweep {summary['study']!r}: {_counts(summary)}"]
    if meanings := summary.get("constraint_meanings"):
        holds = ", ".join(f"{name} ({meaning})" for name, meaning in meanings.items())
        lines.append(f"Feasible means every constraint holds: {holds}")
    objectives = summary.get("objectives", {})
    said = ", ".join(f"{direction} {name}" for name, direction in objectives.items())
    if "objective_range" in summary:
        low, high = summary["objective_range"]
        of = "feasible" if "feasible" in summary else "complete"
        said += f"; {of} trials range {_number(low)} to {_number(high)}"
    if said:
        lines.append(f"Objective: {said}")
    if "solutions" in summary:
        front = "; ".join(
            f"trial {t['number']} ({', '.join(_number(v) for v in t['values'])})"
            for t in summary["solutions"][:MAX_LISTED]
        )
        lines.append(f"Pareto front of {len(summary['solutions'])}: {front}")
    elif summary["best"]:
        lines.extend(_best_lines(summary["best"], list(objectives)))
    elif "feasible" in summary:
        lines.append("No feasible trial: every complete trial broke a constraint")
    else:
        lines.append("No complete trial")
    if infeasible := summary.get("infeasible"):
        listed = "; ".join(
            f"trial {t['number']} broke {', '.join(t['broke'])}" for t in infeasible[:MAX_LISTED]
        )
        more = len(infeasible) - MAX_LISTED
        lines.append(
            f"Infeasible: {listed}" + (f"; {more} more in {RESULTS_FILE}" if more > 0 else "")
        )
    if not_counted := summary.get("not_counted"):
        lines.append(f"Not counted toward n_trials: {len(not_counted)} (why: {RESULTS_FILE})")
    width = max(map(len, where), default=0)
    lines.extend(f"{label + ':':<{width + 1}} {text}" for label, text in where.items())
    for line in lines:
        log.info("%s", line)
    for t in summary.get("feasible", []) + summary.get("infeasible", []):
        log.debug("trial %d: %s", t["number"], t)


# Trials named on one console line of the end summary; the rest are in the results file.
MAX_LISTED = 6


def _best_lines(best: dict[str, Any], objectives: list[str]) -> list[str]:
    """The best trial, its MLflow run and value ("32 of 32 latent dims" for active units),
    and its parameters."""
    attrs = best["user_attrs"]
    run = ""
    if "mlflow_run_id" in attrs:
        name = attrs.get("mlflow_run_name")
        run = f", run {name + ' ' if name else ''}(id {attrs['mlflow_run_id']})"
    value = _number(best["value"])
    if objectives and objectives[0].endswith("active_units") and "latent_dim" in attrs:
        value += f" of {attrs['latent_dim']} latent dims"
    name = objectives[0] if objectives else "value"
    params = ", ".join(f"{k}={_number(v)}" for k, v in best["params"].items())
    return [f"Best feasible: trial {best['number']}{run}: {name} {value}", f"  params: {params}"]


def _number(value: Any) -> str:
    """A value for people: 4 significant digits for floats, anything else as it is."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _counts(summary: dict[str, Any]) -> str:
    """The trials counted: feasible, infeasible by broken constraint, pruned, failed.

    e.g. "6 trials: 1 feasible, 3 infeasible (kl 1, mi 2, decoder_uses_z 1), 1 pruned,
    1 failed"; a trial may break several constraints, so the broken counts may add up to more.
    """
    by_state = summary["trials"]
    total = sum(by_state.values())
    complete = by_state.get("COMPLETE", 0)
    ended = f"{by_state.get('PRUNED', 0)} pruned, {by_state.get('FAIL', 0)} failed"
    running = by_state.get("RUNNING", 0) + by_state.get("WAITING", 0)
    ended += f", {running} still running" if running else ""
    if "feasible" not in summary:
        return f"{total} trials: {complete} complete (no constraints), {ended}"
    broken = ", ".join(
        f"{name} {n}" for name, n in summary["infeasible_by_constraint"].items() if n
    )
    infeasible = len(summary["infeasible"])
    return (
        f"{total} trials: {len(summary['feasible'])} feasible, {infeasible} infeasible"
        + (f" ({broken})" if broken else "")
        + f", {ended}"
    )
