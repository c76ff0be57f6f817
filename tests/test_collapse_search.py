"""The generic search space finds healthy settings on any data set: the same
`hparams_search=collapse`, with no β chosen per data set, on two public benchmarks whose
inputs differ in size (64 pixels, 40 steps), with a tiny budget."""

import subprocess
import sys

import optuna
import pytest

from vaelab.sweep.storage import open_storage

pytestmark = pytest.mark.slow

BUDGET = [
    "hydra.sweeper.n_trials=3",
    "trainer.epochs=6",
    "sweep/pruner=none",
    "evaluation.downstream=false",
    "evaluation.iwae_samples=10",
]
DATA = {"digits": [], "mnist1d": ["dataset.n_samples=1000"]}


@pytest.mark.parametrize("experiment", sorted(DATA))
def test_collapse_search_finds_feasible_trials_with_several_active_units(experiment, tmp_path):
    root = tmp_path / "multirun"
    command = [
        sys.executable,
        "-m",
        "vaelab.train",
        "--multirun",
        f"experiment={experiment}",
        "hparams_search=collapse",
        f"paths.output_root={root}",
        *BUDGET,
        *DATA[experiment],
    ]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    study_name = f"collapse_{experiment}"
    storage = open_storage(str(root / "optuna" / f"{study_name}.journal"))
    trials = optuna.load_study(study_name=study_name, storage=storage).get_trials()
    # No β was chosen for this data set: the schedule's β is the space's, on the NLL scale.
    assert len(trials) == 3 and all("schedule.beta" in t.params for t in trials)
    feasible = [
        t
        for t in trials
        if t.state == optuna.trial.TrialState.COMPLETE
        and t.constraints
        and all(v <= 0 for v in t.constraints.values())
    ]
    assert feasible, [(t.state, t.constraints) for t in trials]
    best = max(feasible, key=lambda t: t.value)
    assert best.value >= 3  # several active units
    assert set(best.constraints) == {"kl", "mi", "decoder_uses_z"}
    assert best.user_attrs["collapse_verdict"] == "healthy"
