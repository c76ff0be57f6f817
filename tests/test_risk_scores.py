"""Seed 003's risk scores: an IsolationForest fitted on the normal class's training latents,
its metrics on constructed latents whose answer is known, its export read back without pickle
(the same scores to the last bit), risk_scores.h5 and figures/risk_scores.png."""

import json
import logging
import struct
from types import SimpleNamespace

import h5py
import mlflow
import numpy as np
import pytest
import sklearn
from matplotlib.patches import Polygon
from sklearn.ensemble import IsolationForest

from vaelab.artifacts import write_risk_scores
from vaelab.errors import ConfigError, DataError
from vaelab.forest_export import ExportedForest
from vaelab.plots import DPI, plot_risk_scores
from vaelab.probes import (
    CLASS_SHARE,
    ISOLATION_TREES,
    contamination_setting,
    score_risk,
)
from vaelab.report import RISK_MODEL, RISK_SCORES, record_risk
from vaelab.train import train

# Tiny models: one thread each (tests/conftest.py says why).
pytestmark = pytest.mark.usefixtures("one_thread")


def risk_data(shift: float, n_train=(400, 40), n_test=(1000, 100), dim: int = 4, seed: int = 0):
    """Class 0 ~ N(0, I), class 1 ~ N(shift, I) in `dim` dimensions; mu, split, labels."""
    rng = np.random.default_rng(seed)
    labels = np.concatenate([np.repeat([0, 1], n_train), np.repeat([0, 1], n_test)])
    split = np.repeat(["train", "test"], [sum(n_train), sum(n_test)])
    mu = rng.standard_normal((len(labels), dim)) + shift * labels[:, None]
    return mu, split, labels


# --- the export: the same scores without pickle ---------------------------------------------


@pytest.mark.parametrize("max_features", [1.0, 0.5])
def test_exported_forest_scores_held_out_points_exactly_as_sklearn(tmp_path, max_features):
    rng = np.random.default_rng(0)
    fit = rng.standard_normal((500, 6))
    forest = IsolationForest(
        n_estimators=50, max_features=max_features, contamination=0.1, random_state=3
    ).fit(fit)
    # Held-out points: typical, far away, and exactly on some of the trees' thresholds.
    held_out = np.vstack([rng.standard_normal((300, 6)), 8 * rng.standard_normal((50, 6))])
    tree = forest.estimators_[0].tree_
    on_threshold = np.zeros((1, 6))
    on_threshold[0, tree.feature[0]] = np.float32(tree.threshold[0])
    held_out = np.vstack([held_out, on_threshold])
    ExportedForest.from_sklearn(forest, {"run_id": "r"}).save(tmp_path / "forest.npz")
    loaded = ExportedForest.load(tmp_path / "forest.npz")
    assert np.array_equal(loaded.score_samples(held_out), forest.score_samples(held_out))
    assert np.array_equal(loaded.decision_function(held_out), forest.decision_function(held_out))
    assert loaded.offset == forest.offset_ and loaded.n_trees == 50
    # Every array is plain numbers or text: numpy reads the file with pickle refused.
    with np.load(tmp_path / "forest.npz", allow_pickle=False) as f:
        assert all(f[name].dtype != object for name in f.files)


def test_loading_a_foreign_file_names_it(tmp_path):
    np.savez(tmp_path / "other.npz", weights=np.zeros(3))
    with pytest.raises(DataError, match=r"other.npz: not an IsolationForest export"):
        ExportedForest.load(tmp_path / "other.npz")


# --- metrics with known answers -------------------------------------------------------------


def test_far_anomalies_are_all_flagged_and_normals_at_the_contamination():
    mu, split, labels = risk_data(shift=50.0)
    risk = score_risk(mu, split, labels, normal_label=0, contamination=0.05, seed=0)
    m = risk.metrics
    assert m["eval/anomaly_n_fit"] == 400  # the normal class of the training split only
    assert m["eval/anomaly_contamination"] == 0.05
    # The threshold flags 5% of the fitted normals: the 20 lowest of 400 scores, exactly.
    train_normal = (split == "train") & (labels == 0)
    assert (risk.scores[train_normal] > risk.threshold).sum() == 20
    assert m["eval/anomaly_threshold"] == risk.threshold == -risk.forest.offset_
    # Anomalies 50 sd away: every one flagged, ranked above every normal.
    assert m["eval/anomaly_recall"] == 1.0 and m["eval/anomaly_auc"] == 1.0
    # Held-out normals: flagged at about the contamination (1000 of them: sd 0.007).
    fpr = m["eval/anomaly_fpr"]
    assert 0.03 <= fpr <= 0.07
    false_pos = round(fpr * 1000)
    assert m["eval/anomaly_precision"] == pytest.approx(100 / (100 + false_pos))
    assert m["eval/anomaly_accuracy"] == pytest.approx(1 - false_pos / 1100)
    # Seed 003's separation: mean anomaly score over mean normal score.
    test = split == "test"
    normal, anomalous = risk.scores[test & (labels == 0)], risk.scores[test & (labels == 1)]
    assert m["eval/anomaly_separation_ratio"] == pytest.approx(anomalous.mean() / normal.mean())
    assert m["eval/anomaly_separation_ratio"] > 1.3
    assert m["eval/anomaly_normal_score_var"] == pytest.approx(normal.var())
    assert m["eval/anomaly_score_mean/1"] > m["eval/anomaly_score_mean/0"]
    assert risk.scores.shape == (len(mu),) and ((risk.scores > 0) & (risk.scores <= 1)).all()


def test_with_a_tiny_contamination_far_anomalies_score_accuracy_near_one():
    mu, split, labels = risk_data(shift=50.0)
    m = score_risk(mu, split, labels, contamination=0.0025, seed=0).metrics  # 1 of 400 fitted
    assert m["eval/anomaly_recall"] == 1.0
    assert m["eval/anomaly_fpr"] <= 0.01
    assert m["eval/anomaly_accuracy"] >= 0.99


def test_overlapping_classes_separate_at_chance():
    mu, split, labels = risk_data(shift=0.0)
    m = score_risk(mu, split, labels, contamination=0.1, seed=0).metrics
    assert abs(m["eval/anomaly_auc"] - 0.5) < 0.08
    assert m["eval/anomaly_separation_ratio"] == pytest.approx(1.0, abs=0.03)
    # Flagged at random: recall and FPR both about the contamination.
    assert abs(m["eval/anomaly_recall"] - m["eval/anomaly_fpr"]) < 0.07


def test_class_share_is_the_training_share_outside_the_normal_class(caplog):
    mu, split, labels = risk_data(shift=6.0, n_train=(300, 100))
    assert score_risk(mu, split, labels).metrics["eval/anomaly_contamination"] == 0.25
    mu, split, labels = risk_data(shift=6.0, n_train=(40, 100))  # 71% anomalies: capped
    with caplog.at_level(logging.WARNING, logger="vaelab.probes"):
        risk = score_risk(mu, split, labels, contamination=CLASS_SHARE)
    assert risk.contamination == 0.5 and "capped at 0.5" in caplog.text


def test_string_labels_become_metric_names():
    mu, split, labels = risk_data(shift=6.0)
    names = np.array(["Low Risk", "High Risk"])[labels]
    m = score_risk(mu, split, names, normal_label="Low Risk").metrics
    assert m["eval/anomaly_auc"] > 0.95
    assert {"eval/anomaly_score_mean/High_Risk", "eval/anomaly_score_mean/Low_Risk"} <= set(m)


def test_without_labels_the_forest_fits_every_training_sample_and_has_no_threshold(caplog):
    mu, split, _ = risk_data(shift=6.0)
    with caplog.at_level(logging.INFO, logger="vaelab.probes"):
        risk = score_risk(mu, split, None)
    assert risk.n_fit == 440 and risk.threshold is None and risk.normal_label is None
    assert set(risk.metrics) == {"eval/anomaly_n_fit", "eval/anomaly_score_mean"}
    assert "needs labels" in caplog.text
    # A number needs no labels: the threshold flags that share of the training samples.
    risk = score_risk(mu, split, None, contamination=0.1)
    assert (risk.scores[split == "train"] > risk.threshold).sum() == 44


def test_too_few_normal_training_samples_skip_with_a_reason(caplog):
    mu, split, labels = risk_data(shift=6.0)
    with caplog.at_level(logging.INFO, logger="vaelab.probes"):
        assert score_risk(mu, split, labels, normal_label=7) is None
    assert "0 training samples of the normal class 7" in caplog.text


@pytest.mark.parametrize("value", ["0", 0.0, "0.7", "auto", True, None])
def test_a_bad_contamination_names_the_key(value):
    with pytest.raises(ConfigError, match=r"evaluation.contamination must be class_share"):
        contamination_setting(value)


def test_a_run_with_a_bad_contamination_stops_before_training(compose_config, tiny, tmp_path):
    # Checked at the start, not in the end-of-run report after a whole run's training.
    cfg = compose_config([*tiny.mlp_run, "evaluation.contamination=0.7"])
    with pytest.raises(ConfigError, match="evaluation.contamination must be class_share"):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_contamination_reads_a_config_value_or_its_logged_text():
    assert contamination_setting("class_share") == CLASS_SHARE
    assert contamination_setting("0.05") == contamination_setting(0.05) == 0.05
    assert contamination_setting(0.5) == 0.5


# --- the run's artifacts and figure ---------------------------------------------------------


def test_risk_figure_draws_a_histogram_per_class_and_the_threshold(tmp_path):
    scores = np.array([0.40, 0.42, 0.45, 0.41, 0.70, 0.72, 0.43])
    labels = np.array([0, 0, 0, 0, 1, 1, 0])
    fig = plot_risk_scores(
        scores, tmp_path / "risk.png", labels, threshold=0.5, threshold_name="t", figsize=(6, 3)
    )
    (ax,) = fig.axes
    histograms = [p for p in ax.patches if isinstance(p, Polygon)]
    assert len(histograms) == 2  # stepfilled: one polygon per class
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "0 (normal) (5)",
        "1 (2)",
        "t = 0.5",
    ]
    # The normal class's bars lie left of the threshold, the anomalies' right of it.
    normal_x, anomaly_x = (h.get_xy()[h.get_xy()[:, 1] > 0, 0] for h in histograms)
    assert 0.40 <= normal_x.min() and normal_x.max() <= 0.5 <= anomaly_x.min()
    assert anomaly_x.max() == pytest.approx(0.72)
    (line,) = ax.lines
    assert list(line.get_xdata()) == [0.5, 0.5]
    assert [t.get_text() for t in ax.texts] == ["0.5 "]  # a score: no unit after the value
    head = (tmp_path / "risk.png").read_bytes()[:24]
    assert struct.unpack(">II", head[16:24]) == (6 * DPI, 3 * DPI)


def test_risk_figure_without_labels_or_threshold_draws_one_histogram(tmp_path):
    fig = plot_risk_scores(np.linspace(0.3, 0.7, 20), tmp_path / "risk.png")
    (ax,) = fig.axes
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["all samples (20)"]
    assert not ax.lines


def test_write_risk_scores_beside_the_latents(tmp_path):
    write_risk_scores(
        tmp_path / "r.h5",
        np.array(["a", "b", "c"]),
        np.array(["train", "test", "test"]),
        np.array([0.4, 0.6, 0.5]),
        threshold=0.55,
        attrs={"model": "risk_model.npz"},
    )
    with h5py.File(tmp_path / "r.h5") as f:
        assert [s.decode() for s in f["ids"][:]] == ["a", "b", "c"]
        assert f["flagged"][:].tolist() == [False, True, False]
        assert f["risk_score"][:].tolist() == [0.4, 0.6, 0.5]
        assert f.attrs["threshold"] == 0.55 and f.attrs["model"] == "risk_model.npz"


def test_record_risk_logs_the_model_scores_and_figure_to_the_run(tmp_path):
    mu, split, labels = risk_data(shift=6.0, n_train=(200, 20), n_test=(100, 20))
    risk = score_risk(mu, split, labels, contamination=0.05)
    ids = np.array([f"s{i}" for i in range(len(mu))])
    data = SimpleNamespace(split=split, sampleset=SimpleNamespace(ids=ids, labels=labels))
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("risk", artifact_location=str(tmp_path / "artifacts"))
    run_id = client.create_run(experiment).info.run_id
    record_risk(client, run_id, risk, data, tmp_path / "run")

    assert (tmp_path / "run" / "figures" / "risk_scores.png").is_file()
    stored = tmp_path / "stored"
    client.download_artifacts(run_id, "", str(stored))
    model = ExportedForest.load(stored / RISK_MODEL)
    assert np.array_equal(model.score_samples(mu), risk.forest.score_samples(mu))
    assert model.provenance == {
        "sklearn_version": sklearn.__version__,
        "run_id": run_id,
        "fit_split": "train",
        "fit_class": "normal",
        "normal_label": 0,
        "n_fit": 200,
        "contamination": 0.05,
        "contamination_setting": 0.05,
        "threshold": risk.threshold,
        "n_estimators": ISOLATION_TREES,
        "score": "risk = -score_samples(mu) = s(x) of Liu et al. 2008; flagged above threshold",
    }
    with h5py.File(stored / RISK_SCORES) as f:
        assert [s.decode() for s in f["ids"][:]] == ids.tolist()
        # The stored scores are the exported model's, recomputed from mu without sklearn.
        assert np.array_equal(f["risk_score"][:], -model.score_samples(mu))
        assert np.array_equal(f["flagged"][:], -model.score_samples(mu) > f.attrs["threshold"])
        assert json.loads(f.attrs["provenance"])["run_id"] == run_id
