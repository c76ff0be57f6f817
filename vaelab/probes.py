"""Downstream probes of posterior means: is the code of a non-collapsed VAE useful?

A VAE can pass seed 000's collapse checks (KL > 0.01, std(mu) > 0.1) and still encode
nothing a downstream task needs. These functions score the posterior means `mu` the way the
seeds use them: clustering (seed 000, step 3: "HDBSCAN on FPCA+VAE vs FPCA-only"), anomaly
detection with an IsolationForest fitted on the normal class (seed 003,
`ml/risk/retrain_anomaly.py`), a linear probe on the labels, and how linearly the known
generative factors of synthetic data can be read off the code.

Each function takes numpy arrays and returns a flat `dict[str, float]` of MLflow metrics
named `eval/...`. `probe_latents` runs whichever apply to a data set and skips the rest
with a logged reason. The anomaly detector leaves more than metrics, a model and a risk score
per sample, so it is a step of its own: `score_risk`.
"""

import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

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
from vaelab.errors import ConfigError

log = logging.getLogger(__name__)

# Below these sizes a split says nothing reliable; probe_latents skips with a reason.
MIN_TRAIN_SAMPLES = 10  # samples to fit a probe, a regression or an IsolationForest on
MIN_TEST_SAMPLES = 5  # held-out samples to score on
# HDBSCAN on more points than this runs on a seeded subsample of this size: its cost grows
# faster than N, and 5000 points already give stable cluster counts and fractions.
MAX_CLUSTER_SAMPLES = 5000
ISOLATION_TREES = 200  # trees of the IsolationForest (scikit-learn's default is 100)
# evaluation.contamination: seed 003's setting, "Contamination: auto-computed from class
# distribution", i.e. the share of training samples outside the normal class.
CLASS_SHARE = "class_share"
MAX_CONTAMINATION = 0.5  # scikit-learn's bound on IsolationForest(contamination=...)
# FPCA (seed 000's baseline): components kept per channel, "FPCA works well (85% variance)".
FPCA_VARIANCE = 0.85
# FPCA's smoothing: cosines with a period of at least this many steps (see cosine_basis).
FPCA_MIN_PERIOD = 8


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


def cosine_basis(n_steps: int, n_basis: int) -> np.ndarray:
    """The first `n_basis` functions of the orthonormal DCT-II basis on `n_steps` equally spaced
    points, as rows (n_basis, n_steps): sqrt(2/T) cos(pi k (2t + 1) / 2T), k = 0 scaled to
    sqrt(1/T). Orthonormal, so coefficients keep the curves' inner products: PCA of the
    coefficients is PCA of the smoothed curves on the grid."""
    t = np.arange(n_steps)
    k = np.arange(n_basis)[:, None]
    basis = np.sqrt(2.0 / n_steps) * np.cos(np.pi * k * (2 * t + 1) / (2 * n_steps))
    basis[0] = np.sqrt(1.0 / n_steps)
    return basis


def fpca_scores(
    sequences: np.ndarray, variance: float = FPCA_VARIANCE, min_period: int = FPCA_MIN_PERIOD
) -> tuple[np.ndarray, dict[str, float]]:
    """Functional PCA of each channel of (N, T, C) sequences, the scores concatenated.

    FPCA (Ramsay & Silverman 2005, ch. 8) on a common, equally spaced grid, simplified: each
    channel's curves are smoothed by projection onto the cosines of period >= `min_period`
    steps (a fixed low-pass, where R&S choose a roughness penalty by cross-validation), and the
    principal components of those coefficients are the channel's functional components
    (orthonormal basis, so no weight matrix). Per channel, the fewest components that hold
    `variance` of its smoothed variance are kept (seed 000: 85%). Univariate per channel, as
    seed 000 says its FPCA was ("misses cross-vital patterns"), not multivariate FPCA (Happ &
    Greven 2018). Scores keep their units (no whitening). Returns the scores (N, K) and
    `eval/fpca_n_components` (K, over all channels) and `eval/fpca_explained_variance` (the
    share of the summed smoothed variance of every channel they hold).
    """
    x = np.asarray(sequences, dtype=np.float64)
    if x.ndim != 3:
        raise ValueError(f"fpca_scores: expected sequences (N, T, C), found {x.shape}")
    n_steps = x.shape[1]
    basis = cosine_basis(n_steps, min(n_steps, math.ceil(2 * n_steps / min_period)))
    parts, kept, total = [], 0.0, 0.0
    for c in range(x.shape[2]):
        coefficients = x[:, :, c] @ basis.T
        centred = coefficients - coefficients.mean(axis=0)
        u, singular, _ = np.linalg.svd(centred, full_matrices=False)
        eigen = singular**2
        if eigen.sum() <= 0:  # a constant channel has no component
            continue
        share = np.cumsum(eigen) / eigen.sum()
        n = int(np.searchsorted(share, variance - 1e-12)) + 1
        parts.append(u[:, :n] * singular[:n])
        kept, total = kept + eigen[:n].sum(), total + eigen.sum()
    scores = np.hstack(parts) if parts else np.zeros((len(x), 0))
    return scores, {
        "eval/fpca_n_components": float(scores.shape[1]),
        "eval/fpca_explained_variance": float(kept / total) if total > 0 else float("nan"),
    }


def cluster_latents(
    mu: np.ndarray,
    inputs_flat: np.ndarray,
    labels: np.ndarray | None = None,
    seed: int = 0,
    sequences: np.ndarray | None = None,
) -> dict[str, float]:
    """HDBSCAN on the latent means against HDBSCAN on a PCA of the inputs (seed 000, step 3),
    and for sequences (N, T, C) seed 000's own comparison, FPCA + VAE against FPCA alone.

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
    FPCA side (`sequences` given): `fpca_scores` (eval/hdbscan_fpca_*), and those scores beside
    the z-scored active units (eval/hdbscan_fpca_vae_*), each block scaled to a total variance
    of 1 so that neither outweighs the other by its units or its number of coordinates
    (block weighting as in multiple factor analysis, Escofier & Pagès 1994; HDBSCAN is
    unchanged by one overall scale, so FPCA alone needs none).
    Above MAX_CLUSTER_SAMPLES samples every side uses the same seeded subsample.
    """
    mu = np.asarray(mu, dtype=np.float64)
    inputs_flat = np.asarray(inputs_flat, dtype=np.float64).reshape(len(inputs_flat), -1)
    if (
        len(mu) != len(inputs_flat)
        or (labels is not None and len(labels) != len(mu))
        or (sequences is not None and len(sequences) != len(mu))
    ):
        raise ValueError(
            f"cluster_latents: expected one row per sample, found mu {mu.shape}, inputs "
            f"{inputs_flat.shape}, labels {None if labels is None else np.shape(labels)}, "
            f"sequences {None if sequences is None else np.shape(sequences)}"
        )
    if len(mu) > MAX_CLUSTER_SAMPLES:
        keep = np.sort(np.random.default_rng(seed).choice(len(mu), MAX_CLUSTER_SAMPLES, False))
        log.info("HDBSCAN on a subsample of %d of %d samples", MAX_CLUSTER_SAMPLES, len(mu))
        mu, inputs_flat = mu[keep], inputs_flat[keep]
        labels = None if labels is None else np.asarray(labels)[keep]
        sequences = None if sequences is None else np.asarray(sequences)[keep]

    active = mu.var(axis=0) >= ACTIVE_UNIT_THRESHOLD
    metrics: dict[str, float] = {
        "eval/hdbscan_min_cluster_size": float(min_cluster_size(len(mu))),
        "eval/hdbscan_latent_dims": float(active.sum()),
    }
    latent = StandardScaler().fit_transform(mu[:, active]) if active.any() else None
    if latent is not None:
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
    if sequences is not None:
        metrics.update(_fpca_comparison(np.asarray(sequences), latent, labels))
    return metrics


def _fpca_comparison(
    sequences: np.ndarray, latent: np.ndarray | None, labels: np.ndarray | None
) -> dict[str, float]:
    """HDBSCAN on FPCA scores, and on FPCA scores beside the latent (`latent`: z-scored active
    units, or None), each block at total variance 1 (see cluster_latents)."""
    fpca, metrics = fpca_scores(sequences)
    if fpca.shape[1] == 0:
        log.info("HDBSCAN on FPCA skipped: every channel of the sequences is constant")
        return metrics
    metrics.update(_hdbscan_metrics(fpca, labels, "eval/hdbscan_fpca"))
    if latent is None:
        log.info("HDBSCAN on FPCA + VAE skipped: no active unit, FPCA alone is the same")
        return metrics
    joint = np.hstack(
        [
            fpca / np.sqrt(fpca.var(axis=0).sum()),
            latent / np.sqrt(latent.shape[1]),  # z-scored: total variance = its dimensions
        ]
    )
    metrics.update(_hdbscan_metrics(joint, labels, "eval/hdbscan_fpca_vae"))
    return metrics


def _metric_name(value: object) -> str:
    """A class label as an MLflow metric-name part (letters, digits, _ - . only)."""
    return re.sub(r"[^0-9A-Za-z_.-]+", "_", str(value)) or "_"


def contamination_setting(value: object) -> float | str:
    """evaluation.contamination as given (a config value, or the run's logged param text):
    CLASS_SHARE, or a share in (0, MAX_CONTAMINATION]; a ConfigError names anything else."""
    if value == CLASS_SHARE:
        return CLASS_SHARE
    try:
        share = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        share = math.nan
    if isinstance(value, bool) or not 0.0 < share <= MAX_CONTAMINATION:
        raise ConfigError(
            f"evaluation.contamination must be {CLASS_SHARE} (seed 003: the share of training "
            f"samples outside the normal class) or a share in (0, {MAX_CONTAMINATION:g}], "
            f"got {value!r}"
        )
    return share


def resolve_contamination(
    setting: float | str, labels_train: np.ndarray | None, normal_label: object
) -> float | None:
    """The contamination the forest is fitted with: a number as given; CLASS_SHARE the share of
    training samples outside the normal class (seed 003), capped at MAX_CONTAMINATION, or None
    (no threshold) when there are no labels or no anomaly in training."""
    if setting != CLASS_SHARE:
        return float(setting)
    if labels_train is None:
        log.info("risk threshold skipped: contamination=%s needs labels", CLASS_SHARE)
        return None
    share = float(np.mean(np.asarray(labels_train) != normal_label))
    if share == 0.0:
        log.info("risk threshold skipped: no training sample outside the normal class")
        return None
    if share > MAX_CONTAMINATION:
        log.warning(
            "contamination=%s: %.3f of the training samples are anomalies; capped at %g",
            CLASS_SHARE,
            share,
            MAX_CONTAMINATION,
        )
    return min(share, MAX_CONTAMINATION)


def fit_isolation_forest(
    mu_fit: np.ndarray, contamination: float | None, seed: int = 0
) -> IsolationForest:
    """Seed 003's detector on the samples given. With a contamination, its `offset_` is that
    quantile of their scores (scikit-learn): that share of the fitted samples lies beyond."""
    return IsolationForest(
        n_estimators=ISOLATION_TREES,
        contamination="auto" if contamination is None else contamination,
        random_state=seed,
    ).fit(mu_fit)


def anomaly_metrics(
    score: np.ndarray,
    labels: np.ndarray | None,
    normal_label: object = 0,
    threshold: float | None = None,
) -> dict[str, float]:
    """Scores (higher = more anomalous) of held-out samples against "label != normal_label".

    Without labels: the mean score (`eval/anomaly_score_mean`). With labels: the mean of each
    class (`eval/anomaly_score_mean/<label>`); ROC-AUC (`eval/anomaly_auc`); seed 003's
    "separation ratio", mean anomaly score / mean normal score (`eval/anomaly_separation_ratio`,
    > 1 when anomalies score higher); the variance of the normal class's scores
    (`eval/anomaly_normal_score_var`, seed 003's "variance (normal)": how tight the normal
    class scores); and with a `threshold` (a score above it is flagged), seed 003's accuracy,
    precision and false positive rate, and the recall (`eval/anomaly_accuracy`, `_precision`,
    `_fpr`, `_recall`). A metric a split cannot define (no anomaly, nothing flagged) is NaN.
    """
    score = np.asarray(score, dtype=np.float64)
    if labels is None:
        return {"eval/anomaly_score_mean": float(score.mean())}
    labels = np.asarray(labels)
    metrics: dict[str, float] = {}
    for label in np.unique(labels):
        name = f"eval/anomaly_score_mean/{_metric_name(label)}"
        metrics[name] = float(score[labels == label].mean())
    is_anomaly = labels != normal_label
    n_anomalies = int(is_anomaly.sum())
    normal, anomalous = score[~is_anomaly], score[is_anomaly]
    nan = float("nan")
    if 0 < n_anomalies < len(is_anomaly):
        metrics["eval/anomaly_auc"] = float(roc_auc_score(is_anomaly, score))
        metrics["eval/anomaly_separation_ratio"] = float(anomalous.mean() / normal.mean())
    else:
        log.info("anomaly ROC-AUC and separation skipped: the split holds one class only")
    metrics["eval/anomaly_normal_score_var"] = float(normal.var()) if len(normal) else nan
    if threshold is not None:
        flagged = score > threshold
        true_pos = int((flagged & is_anomaly).sum())
        metrics |= {
            "eval/anomaly_threshold": float(threshold),
            "eval/anomaly_accuracy": float(np.mean(flagged == is_anomaly)),
            "eval/anomaly_precision": true_pos / int(flagged.sum()) if flagged.any() else nan,
            "eval/anomaly_recall": true_pos / n_anomalies if n_anomalies else nan,
            "eval/anomaly_fpr": float(flagged[~is_anomaly].mean()) if len(normal) else nan,
        }
    return metrics


@dataclass
class RiskScores:
    """Seed 003's risk model of a run and what it says of every sample.

    `forest` was fitted on the `n_fit` training samples of the normal class (every training
    sample without labels); `scores` is its anomaly score of every sample, -score_samples(mu),
    in (0, 1], higher = riskier; a score above `threshold` is flagged (None: no threshold, see
    `resolve_contamination`). `metrics` are the test split's (`anomaly_metrics`).
    """

    forest: IsolationForest
    scores: np.ndarray
    threshold: float | None
    contamination: float | None
    contamination_setting: float | str
    normal_label: object
    n_fit: int
    metrics: dict[str, float] = field(default_factory=dict)

    def provenance(self, run_id: str) -> dict[str, object]:
        """What the forest was fitted on, for its exported file (JSON values)."""
        return {
            "run_id": run_id,
            "fit_split": "train",
            "fit_class": "normal" if self.normal_label is not None else "all",
            "normal_label": _json_value(self.normal_label),
            "n_fit": self.n_fit,
            "contamination": self.contamination,
            "contamination_setting": self.contamination_setting,
            "threshold": self.threshold,
            "n_estimators": ISOLATION_TREES,
            "score": "risk = -score_samples(mu) = s(x) of Liu et al. 2008; flagged above threshold",
        }


def _json_value(value: object) -> object:
    """A label as JSON holds it (numpy scalars as Python ones)."""
    return value.item() if isinstance(value, np.generic) else value


def score_risk(
    mu: np.ndarray,
    split: np.ndarray,
    labels: np.ndarray | None,
    normal_label: object = 0,
    contamination: float | str = CLASS_SHARE,
    seed: int = 0,
) -> RiskScores | None:
    """Seed 003's detector: an IsolationForest fitted on the training split's normal class
    (every training sample without labels), its risk score of every sample, and the test
    split's `anomaly_metrics`. None, with a logged reason, when the data are too few.

    The score is -score_samples, s(x) of Liu et al. 2008 in (0, 1]: higher = more anomalous.
    The threshold is the forest's at `contamination` (`resolve_contamination`): that share of
    the fitted normal samples scores above it, so on held-out normals the false positive rate
    is about the contamination. The forest splits each feature at a uniform point of its
    range, so the raw means are used, unscaled. For the same reason a sample that departs from
    the normal class along one dimension only scores about as the most extreme normal sample
    there: the forest finds anomalies that are isolated, not merely far.
    """
    mu = np.asarray(mu, dtype=np.float64)
    split = np.asarray(split).astype(str)
    train, test = split == "train", split == "test"
    if not np.isfinite(mu).all():
        log.warning("risk scores skipped: the latent means hold NaN or inf")
        return None
    labels = None if labels is None else np.asarray(labels)
    fit = train if labels is None else train & (labels == normal_label)
    if fit.sum() < MIN_TRAIN_SAMPLES or test.sum() < MIN_TEST_SAMPLES:
        log.info(
            "anomaly detection skipped: %d training samples%s and %d test samples, need %d / %d",
            fit.sum(),
            "" if labels is None else f" of the normal class {normal_label!r}",
            test.sum(),
            MIN_TRAIN_SAMPLES,
            MIN_TEST_SAMPLES,
        )
        return None
    share = resolve_contamination(
        contamination, None if labels is None else labels[train], normal_label
    )
    forest = fit_isolation_forest(mu[fit], share, seed)
    scores = -forest.score_samples(mu)
    threshold = None if share is None else -float(forest.offset_)
    metrics = {"eval/anomaly_n_fit": float(fit.sum())}
    if share is not None:
        metrics["eval/anomaly_contamination"] = share
    metrics |= anomaly_metrics(
        scores[test], None if labels is None else labels[test], normal_label, threshold
    )
    return RiskScores(
        forest=forest,
        scores=scores,
        threshold=threshold,
        contamination=share,
        contamination_setting=contamination,
        normal_label=None if labels is None else normal_label,
        n_fit=int(fit.sum()),
        metrics=metrics,
    )


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
) -> dict[str, float]:
    """Every evaluation that applies to this data set; the others are skipped with a reason.

    Clustering runs on all samples (it fits nothing to the labels, which only score it);
    the probe and the factor regressions are fitted on the "train" split and scored on
    "test". `inputs` are the (normalised) model inputs, any shape (N, ...), flattened for the
    PCA baseline; sequences (N, T, C) get the FPCA comparison too. The anomaly detector is
    `score_risk`.
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
        sequences = np.asarray(inputs) if np.ndim(inputs) == 3 else None
        metrics.update(cluster_latents(mu, inputs_flat, labels, seed, sequences))
    else:
        log.info("clustering skipped: %d samples, fewer than 2 x min_cluster_size", len(mu))

    if train.sum() < MIN_TRAIN_SAMPLES or test.sum() < MIN_TEST_SAMPLES:
        log.info(
            "probe and factor evaluations skipped: %d train / %d test samples, need %d / %d",
            train.sum(),
            test.sum(),
            MIN_TRAIN_SAMPLES,
            MIN_TEST_SAMPLES,
        )
        return metrics

    if labels is None:
        log.info("linear probe skipped: the data set has no labels")
    elif len(np.unique(labels[train])) >= 2:
        metrics.update(linear_probe(mu[train], labels[train], mu[test], labels[test]))
    else:
        log.info("linear probe skipped: one class only in the training split")

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
