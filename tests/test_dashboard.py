"""Feasibility where researchers look: `make dashboard` (vaelab.dashboard) and `make ui` over
one tiny sweep with a feasible and an infeasible trial, read through their HTTP APIs as their
pages read them. The dashboard must report every complete trial's constraints (Optuna 5's
named ones, which optuna-dashboard 0.21 alone reports as []) and name the objective; the
MLflow parent run must name its best feasible child and link to it in its description.

The serializer patch on its own (no server, no sweep) is tested at the end, fast."""

import json
import urllib.parse

import optuna
import pytest
from optuna_dashboard import _serializer
from servers import HTTP, api, run_one_feasible_one_infeasible, serving

from vaelab import dashboard
from vaelab.sweep.record import view_key
from vaelab.sweep.storage import open_storage
from vaelab.tracking import runs_table_url

STUDY = "feasibility"
CONSTRAINTS = ["kl", "mi", "decoder_uses_z"]  # vaelab.diagnostics.sweep_constraints, in order


def get(port: int, path: str) -> dict:
    with HTTP.open(f"http://127.0.0.1:{port}{path}", timeout=20) as response:
        return json.loads(response.read())


@pytest.mark.slow
def test_the_dashboard_and_the_mlflow_ui_show_which_trials_are_feasible(sweeps, tmp_path):
    run_one_feasible_one_infeasible(sweeps, STUDY)
    root = tmp_path / "multirun"
    journal = root / "optuna" / f"{STUDY}.journal"
    study = optuna.load_study(study_name=STUDY, storage=open_storage(str(journal)))
    by_threshold = {t.params["sweep.kl_threshold"]: t for t in study.trials}
    feasible, infeasible = by_threshold[0.0], by_threshold[1e9]
    assert feasible.constraints["kl"] <= 0 < infeasible.constraints["kl"]
    assert study.metric_names == ["val/active_units"]  # the sweeper names the objective

    targets = {"ui": {"OUT": root}, "dashboard": {"OUT": root, "STUDY": STUDY}}
    with serving(targets, tmp_path) as port:
        # --- optuna-dashboard: the study's trials as its pages fetch them ------------------
        [summary] = get(port["dashboard"], "/api/studies")["study_summaries"]
        assert summary["study_name"] == STUDY
        detail = get(port["dashboard"], f"/api/studies/{summary['study_id']}?after=0")
        assert detail["objective_names"] == ["val/active_units"]
        trials = {t["number"]: t for t in detail["trials"]}
        assert {n: t["state"] for n, t in trials.items()} == {0: "Complete", 1: "Complete"}
        for trial in study.trials:  # every constraint, in the study's order (sweep_constraints)
            assert list(trial.constraints) == CONSTRAINTS
            assert trials[trial.number]["constraints"] == [
                pytest.approx(trial.constraints[name]) for name in CONSTRAINTS
            ]
        # The dashboard's rule (constraints.every(c => c <= 0)) greys out exactly one trial.
        assert max(trials[infeasible.number]["constraints"]) > 0
        assert all(c <= 0 for c in trials[feasible.number]["constraints"])
        [best] = detail["best_trials"]
        assert best["number"] == feasible.number

        # --- MLflow: the parent run names its best feasible child and links to it ---------
        ui = port["ui"]
        experiment = api(ui, "/api/2.0/mlflow/experiments/get-by-name?experiment_name=vaelab")[
            "experiment"
        ]
        experiment_id = experiment["experiment_id"]
        [parent] = api(
            ui,
            "/api/2.0/mlflow/runs/search",
            {"experiment_ids": [experiment_id], "filter": "tags.`sweep.role` = 'parent'"},
        )["runs"]
        tags = {t["key"]: t["value"] for t in parent["data"]["tags"]}
        best_run_id = feasible.user_attrs["mlflow_run_id"]
        child = api(ui, f"/api/2.0/mlflow/runs/get?run_id={best_run_id}")["run"]
        assert tags["sweep.best_run_id"] == best_run_id
        assert tags["sweep.best_run_name"] == child["info"]["run_name"]
        assert child["info"]["run_name"] == f"{STUDY}-{feasible.number:04d}"
        assert tags["sweep.best_trial"] == str(feasible.number)
        description = tags["mlflow.note.content"]
        page = f"#/experiments/{experiment_id}/runs/{best_run_id}?workflowType=machine_learning"
        link = f"[{child['info']['run_name']}]({page})"
        assert link in description
        assert "2 trials: **1 feasible**, 1 infeasible (broke kl: 1), 0 pruned, 0 failed" in (
            description
        )
        assert f"#/experiments/{experiment_id}/runs/{infeasible.user_attrs['mlflow_run_id']}" in (
            description
        )

        # The runs table's saved view: the trials' AU, KL, feasibility and swept param.
        experiment_tags = {t["key"]: t["value"] for t in experiment["tags"]}
        assert experiment_tags["mlflow.experimentKind"] == "custom_model_development"
        view = json.loads(experiment_tags[f"mlflow.sharedViewState.{view_key(STUDY)}"])
        state = json.loads(view["state"])
        assert state["searchFilter"] == f"tags.mlflow.parentRunId = '{parent['info']['run_id']}'"
        assert state["orderByKey"] == "metrics.`final/active_units`"
        assert state["orderByAsc"] is False
        for column in [
            "metrics.`final/active_units`",
            "metrics.`final/kl`",
            "metrics.`final/constraint_kl`",
            "tags.`sweep.feasible`",
            "params.`sweep.kl_threshold`",
        ]:
            assert column in state["selectedColumns"]
        table = f"#/experiments/{experiment_id}/runs?workflowType=machine_learning&"
        table += urllib.parse.urlencode({"viewStateShareKey": view_key(STUDY)})
        assert f"({table})" in description


def test_the_patch_reports_named_constraints_in_the_study_order(monkeypatch):
    # The same function set again: monkeypatch puts it back after the test, patched or not.
    monkeypatch.setattr(_serializer, "serialize_frozen_trial", _serializer.serialize_frozen_trial)
    stock = _serializer.serialize_frozen_trial
    trial = optuna.trial.create_trial(value=1.0, constraints={"mi": 0.5, "kl": -1.0})
    assert stock(0, trial, {})["constraints"] == []  # optuna-dashboard 0.21 on Optuna 5

    dashboard.patch_serializer()
    dashboard.patch_serializer()  # idempotent
    patched = _serializer.serialize_frozen_trial
    assert patched.__wrapped__ is stock
    # The study's order is the order names first appear: a later trial that set its
    # constraints in another order reports them in the study's.
    assert patched(0, trial, {})["constraints"] == [0.5, -1.0]
    later = optuna.trial.create_trial(value=2.0, constraints={"kl": -2.0, "mi": -0.5})
    assert patched(0, later, {})["constraints"] == [-0.5, -2.0]
    assert patched(1, later, {})["constraints"] == [-2.0, -0.5]  # another study, its own order


def test_a_changed_dashboard_stops_the_module_with_a_message(monkeypatch):
    def serialize_frozen_trial(trial, study_system_attrs):  # a different signature
        return {}

    monkeypatch.setattr(_serializer, "serialize_frozen_trial", serialize_frozen_trial)
    with pytest.raises(dashboard.DashboardChanged, match="update vaelab/dashboard.py"):
        dashboard.patch_serializer()
    monkeypatch.delattr(_serializer, "serialize_frozen_trial")
    with pytest.raises(dashboard.DashboardChanged, match="no _serializer.serialize_frozen_trial"):
        dashboard.patch_serializer()


def test_a_missing_journal_is_named_not_created(tmp_path, capsys):
    missing = tmp_path / "optuna" / "typo.journal"
    with pytest.raises(SystemExit) as stopped:
        dashboard.main([str(missing)])
    assert stopped.value.code == 2
    assert f"no Optuna journal at {missing}" in capsys.readouterr().err
    assert not missing.parent.exists()


def test_the_dashboards_best_trial_is_the_best_feasible_one(tmp_path):
    journal = tmp_path / "best.journal"
    study = optuna.create_study(
        study_name="best", storage=open_storage(str(journal)), direction="maximize"
    )
    for value, kl in [(5.0, 1.0), (3.0, -1.0), (4.0, 0.5), (2.0, -2.0)]:  # kl > 0: infeasible
        study.add_trial(optuna.trial.create_trial(value=value, constraints={"kl": kl}))
    assert study.best_trial.value == 3.0  # Optuna applies the constraints in the study...
    assert study._storage.get_best_trial(study._study_id).value == 5.0  # not in the storage
    storage = dashboard.open_study_storage(str(journal))  # the same storage object, patched
    assert storage.get_best_trial(study._study_id).value == 3.0


def test_the_runs_table_url_opens_model_training_not_genai():
    view = runs_table_url("3", "vaelab-quick")
    assert view == (
        "http://127.0.0.1:5000/#/experiments/3/runs?workflowType=machine_learning"
        "&viewStateShareKey=vaelab-quick"
    )
    assert runs_table_url("3", base_url="") == "#/experiments/3/runs?workflowType=machine_learning"
    assert view_key("sweep 2026/12?") == "vaelab-sweep_2026_12_"
