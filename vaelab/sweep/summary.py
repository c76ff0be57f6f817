"""The end of a sweep as plain data: the best trial (or the Pareto front), the feasible set,
and the counts by state, written to optimization_results.yaml.

The file keeps the stock plugin's keys (`name`, `best_params`, `best_value`, or `solutions`
for several objectives), so tools written for it read vaelab's, and adds vaelab's (`study`,
`trials`, `best`, and `feasible` when the trials carry constraints).
"""

import logging
from pathlib import Path
from typing import Any

import optuna
from omegaconf import OmegaConf
from optuna.trial import FrozenTrial, TrialState

log = logging.getLogger(__name__)

RESULTS_FILE = "optimization_results.yaml"


def is_feasible(trial: FrozenTrial) -> bool:
    """Feasible: every constraint ≤ 0 (KL above sweep.kl_threshold). Unknown counts as not."""
    return bool(trial.constraints) and all(v <= 0 for v in trial.constraints.values())


def summarise(study: optuna.Study) -> dict[str, Any]:
    """Counts by state, the best trial(s) and, in a constrained study, the feasible set.

    With constraints on any completed trial the best is the best feasible trial (None if no
    trial is feasible); without, it is simply the best trial, as in the stock plugin.
    """
    trials = study.get_trials(deepcopy=False)
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    constrained = any(t.constraints for t in done)
    candidates = [t for t in done if is_feasible(t)] if constrained else done
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
    return summary


def write_results(summary: dict[str, Any], sweep_dir: Path) -> Path:
    """optimization_results.yaml in the sweep's folder; returns its path."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    results = sweep_dir / RESULTS_FILE
    OmegaConf.save(OmegaConf.create(summary), results)
    return results


def log_summary(summary: dict[str, Any], results: Path, storage: str) -> None:
    """Say how the sweep went, what won, and where to look."""
    log.info("Sweep %r: %s", summary["study"], summary["trials"])
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
    log.info("Results: %s; Optuna storage %s", results, storage)
