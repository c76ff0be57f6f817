"""Downstream probes of posterior means: is the code of a non-collapsed VAE useful?

A VAE can pass seed 000's collapse checks (KL > 0.01, std(mu) > 0.1) and still encode
nothing a downstream task needs. These functions score the posterior means `mu` the way the
seeds use them: clustering (seed 000, step 3: "HDBSCAN on FPCA+VAE vs FPCA-only"), anomaly
detection with an IsolationForest fitted on the normal class (seed 003,
`ml/risk/retrain_anomaly.py`), a linear probe on the labels, and how linearly the known
generative factors of synthetic data can be read off the code.

Each function takes numpy arrays and returns a flat `dict[str, float]` of MLflow metrics
named `eval/...`. `probe_latents` runs whichever apply to a data set and skips the rest
with a logged reason.
"""

import logging
import re
from collections.abc import Mapping

import numpy as np
from sklearn.cluster import HDBSCAN
from sklearn.decomposition import PCA
from sklearn.ensemble import IsolationForest
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import (
    accuracy_score,
    adjusted_mutual_info_score,
    adjusted_rand_score,
    balanced_accuracy_score,
    r2_score,
    roc_auc_score,
    silhouette_score,
)
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from vaelab.diagnostics import ACTIVE_UNIT_THRESHOLD

log = logging.getLogger(__name__)

# Below these sizes a split says nothing reliable; probe_latents skips with a reason.
MIN_TRAIN_SAMPLES = 10  # samples to fit a probe, a regression or an IsolationForest on
MIN_TEST_SAMPLES = 5  # held-out samples to score on
# HDBSCAN on more points than this runs on a seeded subsample of this size: its cost grows
# faster than N, and 5000 points already give stable cluster counts and fractions.
MAX_CLUSTER_SAMPLES = 5000
ISOLATION_TREES = 200  # trees of the IsolationForest (scikit-learn's default is 100)


def min_cluster_size(n_samples: int) -> int:
    """HDBSCAN's smallest cluster: 2% of the samples, at least 5 (scikit-learn's default).

    A fixed 5 on thousands of samples splits the data into dozens of micro-clusters; 2% keeps
    the count comparable across data set sizes (seed 000 found 19 clusters on its FPCA scores).
    """
    return max(5, n_samples // 50)


def _hdbscan_metrics(
    features: np.ndarray, labels: np.ndarray | None, prefix: str
) -> dict[str, float]:
    """HDBSCAN on `features`: cluster count, noise share, silhouette, ARI and AMI with labels."""
    size = min_cluster_size(len(features))
    assigned = HDBSCAN(min_cluster_size=size, copy=True).fit_predict(features)
    clustered = assigned >= 0
    n_clusters = len(np.unique(assigned[clustered]))
    metrics = {
        f"{prefix}_n_clusters": float(n_clusters),
        f"{prefix}_noise_fraction": float(1.0 - clustered.mean()),
        # Silhouette of the clustered points only (HDBSCAN's noise is no cluster); undefined
        # for fewer than two clusters.
        f"{prefix}_silhouette": (
            float(silhouette_score(features[clustered], assigned[clustered]))
            if n_clusters >= 2
            else float("nan")
        ),
    }
    if labels is not None:
        # Noise counts as one more cluster here, so calling everything noise scores 0, not
        # the agreement of the few points that were clustered.
        metrics[f"{prefix}_ari"] = float(adjusted_rand_score(labels, assigned))
        metrics[f"{prefix}_ami"] = float(adjusted_mutual_info_score(labels, assigned))
    return metrics


def cluster_latents(
    mu: np.ndarray, inputs_flat: np.ndarray, labels: np.ndarray | None = None, seed: int = 0
) -> dict[str, float]:
    """HDBSCAN on the latent means against HDBSCAN on a PCA of the inputs (seed 000, step 3).

    Latent side: the active units only (Var(mu) ≥ 0.01, Burda et al. 2016), each z-scored. The
    latent scale is arbitrary, so dimensions are standardised; an inactive one would be blown
    up from near-constant noise to unit variance, so it is left out (`eval/hdbscan_latent_dims`
    counts those kept; with none, the latent side is skipped and logged). Standardising also
    weighs every active unit alike, whether or not it carries the cluster structure.
    PCA side (the FPCA-only baseline): the inputs projected onto as many principal components
    as the latent has dimensions, so both clusterings get the same number of coordinates;
    seed 000's "85% of variance" would give PCA a budget the VAE does not have. The scores are
    not whitened: they keep the inputs' own geometry. `eval/pca_explained_variance` is the
    variance share those components hold.
    Above MAX_CLUSTER_SAMPLES samples both sides use the same seeded subsample.
    """
    mu = np.asarray(mu, dtype=np.float64)
    inputs_flat = np.asarray(inputs_flat, dtype=np.float64).reshape(len(inputs_flat), -1)
    if len(mu) != len(inputs_flat) or (labels is not None and len(labels) != len(mu)):
        raise ValueError(
            f"cluster_latents: expected one row per sample, found mu {mu.shape}, inputs "
            f"{inputs_flat.shape}, labels {None if labels is None else np.shape(labels)}"
        )
    if len(mu) > MAX_CLUSTER_SAMPLES:
        keep = np.sort(np.random.default_rng(seed).choice(len(mu), MAX_CLUSTER_SAMPLES, False))
        log.info("HDBSCAN on a subsample of %d of %d samples", MAX_CLUSTER_SAMPLES, len(mu))
        mu, inputs_flat = mu[keep], inputs_flat[keep]
        labels = None if labels is None else np.asarray(labels)[keep]

    active = mu.var(axis=0) >= ACTIVE_UNIT_THRESHOLD
    metrics: dict[str, float] = {
        "eval/hdbscan_min_cluster_size": float(min_cluster_size(len(mu))),
        "eval/hdbscan_latent_dims": float(active.sum()),
    }
    if active.any():
        latent = StandardScaler().fit_transform(mu[:, active])
        metrics.update(_hdbscan_metrics(latent, labels, "eval/hdbscan_latent"))
    else:
        log.info(
            "HDBSCAN on the latents skipped: no active unit (Var(mu) >= %g)", ACTIVE_UNIT_THRESHOLD
        )

    n_components = min(mu.shape[1], *inputs_flat.shape)
    pca = PCA(n_components=n_components, random_state=seed)
    scores = pca.fit_transform(inputs_flat)
    metrics["eval/pca_explained_variance"] = float(pca.explained_variance_ratio_.sum())
    metrics.update(_hdbscan_metrics(scores, labels, "eval/hdbscan_pca"))
    return metrics


def _metric_name(value: object) -> str:
    """A class label as an MLflow metric-name part (letters, digits, _ - . only)."""
    return re.sub(r"[^0-9A-Za-z_.-]+", "_", str(value)) or "_"


def anomaly_scores(
    mu_train: np.ndarray,
    mu_test: np.ndarray,
    labels_train: np.ndarray | None = None,
    labels_test: np.ndarray | None = None,
    normal_label: object = 0,
    seed: int = 0,
) -> dict[str, float]:
    """Seed 003's detector: an IsolationForest fitted on the normal class's training latents.

    Without training labels it is fitted on every training sample. The anomaly score is
    minus `score_samples` (higher = more anomalous); no contamination threshold is needed
    for a ranking. With test labels: ROC-AUC of the score against "label != normal_label"
    (`eval/anomaly_auc`, omitted when the test split holds one class only) and the mean
    score of each class (`eval/anomaly_score_mean/<label>`); without, the mean over the test
    split (`eval/anomaly_score_mean`). The forest splits each feature at a uniform point of
    its range, so the raw means are used, unscaled. For the same reason a sample that departs
    from the normal class along one dimension only scores about as the most extreme normal
    sample there: the forest finds anomalies that are isolated, not merely far.
    """
    mu_train = np.asarray(mu_train, dtype=np.float64)
    mu_test = np.asarray(mu_test, dtype=np.float64)
    fit_on = mu_train
    if labels_train is not None:
        fit_on = mu_train[np.asarray(labels_train) == normal_label]
        if len(fit_on) == 0:
            raise ValueError(
                f"anomaly_scores: expected training samples of the normal class "
                f"{normal_label!r}, found classes {np.unique(labels_train).tolist()}"
            )
    forest = IsolationForest(n_estimators=ISOLATION_TREES, random_state=seed).fit(fit_on)
    score = -forest.score_samples(mu_test)
    metrics = {"eval/anomaly_n_fit": float(len(fit_on))}
    if labels_test is None:
        metrics["eval/anomaly_score_mean"] = float(score.mean())
        return metrics
    labels_test = np.asarray(labels_test)
    for label in np.unique(labels_test):
        name = f"eval/anomaly_score_mean/{_metric_name(label)}"
        metrics[name] = float(score[labels_test == label].mean())
    is_anomaly = labels_test != normal_label
    if 0 < is_anomaly.sum() < len(is_anomaly):
        metrics["eval/anomaly_auc"] = float(roc_auc_score(is_anomaly, score))
    else:
        log.info("anomaly ROC-AUC skipped: the test split holds one class only")
    return metrics


def linear_probe(
    mu_train: np.ndarray, y_train: np.ndarray, mu_test: np.ndarray, y_test: np.ndarray
) -> dict[str, float]:
    """Logistic regression on z-scored means: test accuracy, balanced accuracy, chance level.

    `eval/probe_chance` is the test accuracy of always answering the training split's most
    frequent class: what a probe that learnt nothing from mu scores.
    """
    y_train, y_test = np.asarray(y_train), np.asarray(y_test)
    classes, counts = np.unique(y_train, return_counts=True)
    if len(classes) < 2:
        raise ValueError(
            f"linear_probe: expected at least 2 classes in training, found {classes.tolist()}"
        )
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    predicted = probe.fit(mu_train, y_train).predict(mu_test)
    return {
        "eval/probe_accuracy": float(accuracy_score(y_test, predicted)),
        "eval/probe_balanced_accuracy": float(balanced_accuracy_score(y_test, predicted)),
        "eval/probe_chance": float(np.mean(y_test == classes[np.argmax(counts)])),
    }


RIDGE_ALPHA = 1e-3  # ridge on z-scored means: near-OLS, but a duplicated dimension is harmless


def factor_r2(
    mu_train: np.ndarray,
    factors_train: Mapping[str, np.ndarray],
    mu_test: np.ndarray,
    factors_test: Mapping[str, np.ndarray],
) -> dict[str, float]:
    """Test R² of a ridge regression from z-scored mu to each known generative factor.

    R² ≈ 1: the factor is linearly readable from the code; ≤ 0: not at all. Factors that are
    non-finite, or constant in either split (R² undefined), are skipped and logged.
    """
    metrics: dict[str, float] = {}
    for name in factors_train:
        y_train = np.asarray(factors_train[name], dtype=np.float64)
        y_test = np.asarray(factors_test[name], dtype=np.float64)
        if not (np.isfinite(y_train).all() and np.isfinite(y_test).all()):
            log.info("factor R² of %r skipped: non-finite values", name)
            continue
        if np.ptp(y_train) == 0 or np.ptp(y_test) == 0:
            log.info("factor R² of %r skipped: constant in the training or test split", name)
            continue
        model = make_pipeline(StandardScaler(), Ridge(alpha=RIDGE_ALPHA))
        predicted = model.fit(mu_train, y_train).predict(mu_test)
        metrics[f"eval/factor_r2/{_metric_name(name)}"] = float(r2_score(y_test, predicted))
    return metrics


def probe_latents(
    mu: np.ndarray,
    split: np.ndarray,
    inputs: np.ndarray,
    labels: np.ndarray | None = None,
    factors: Mapping[str, np.ndarray] | None = None,
    seed: int = 0,
    normal_label: object = 0,
) -> dict[str, float]:
    """Every evaluation that applies to this data set; the others are skipped with a reason.

    Clustering runs on all samples (it fits nothing to the labels, which only score it);
    the probe, the anomaly detector and the factor regressions are fitted on the "train"
    split and scored on "test". `inputs` are the (normalised) model inputs, any shape
    (N, ...), flattened for the PCA baseline.
    """
    mu = np.asarray(mu, dtype=np.float64)
    split = np.asarray(split).astype(str)
    if mu.ndim != 2 or len(split) != len(mu) or len(inputs) != len(mu):
        raise ValueError(
            f"probe_latents: expected mu (N, D) with N splits and inputs, found mu "
            f"{mu.shape}, split {split.shape}, inputs {np.shape(inputs)}"
        )
    if not np.isfinite(mu).all():
        log.warning("evaluation skipped: the latent means hold NaN or inf")
        return {}
    labels = None if labels is None else np.asarray(labels)
    factors = dict(factors or {})
    train, test = split == "train", split == "test"
    metrics: dict[str, float] = {}

    if len(mu) >= 2 * min_cluster_size(len(mu)):
        inputs_flat = np.asarray(inputs, dtype=np.float64).reshape(len(mu), -1)
        metrics.update(cluster_latents(mu, inputs_flat, labels, seed))
    else:
        log.info("clustering skipped: %d samples, fewer than 2 x min_cluster_size", len(mu))

    if train.sum() < MIN_TRAIN_SAMPLES or test.sum() < MIN_TEST_SAMPLES:
        log.info(
            "probe, anomaly and factor evaluations skipped: %d train / %d test samples, "
            "need %d / %d",
            train.sum(),
            test.sum(),
            MIN_TRAIN_SAMPLES,
            MIN_TEST_SAMPLES,
        )
        return metrics

    if labels is None:
        log.info("linear probe skipped: the data set has no labels")
        metrics.update(anomaly_scores(mu[train], mu[test], seed=seed))
    else:
        if len(np.unique(labels[train])) >= 2:
            metrics.update(linear_probe(mu[train], labels[train], mu[test], labels[test]))
        else:
            log.info("linear probe skipped: one class only in the training split")
        n_normal = int((labels[train] == normal_label).sum())
        if n_normal >= MIN_TRAIN_SAMPLES:
            metrics.update(
                anomaly_scores(mu[train], mu[test], labels[train], labels[test], normal_label, seed)
            )
        else:
            log.info(
                "anomaly detection skipped: %d training samples of the normal class %r, need %d",
                n_normal,
                normal_label,
                MIN_TRAIN_SAMPLES,
            )

    if factors:
        metrics.update(
            factor_r2(
                mu[train],
                {k: np.asarray(v)[train] for k, v in factors.items()},
                mu[test],
                {k: np.asarray(v)[test] for k, v in factors.items()},
            )
        )
    else:
        log.info("factor R² skipped: the data set has no known generative factors")
    return metrics
