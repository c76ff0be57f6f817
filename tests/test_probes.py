"""Downstream probes of latents whose answer is known by construction: clustering against a PCA
baseline, anomaly detection, a linear probe, factor R²."""

import logging
import math

import numpy as np
import pytest

from vaelab.probes import (
    anomaly_scores,
    cluster_latents,
    factor_r2,
    linear_probe,
    min_cluster_size,
    probe_latents,
)


def blobs(rng: np.random.Generator, n_per: int, dim: int, distance: float = 20.0):
    """Three Gaussian blobs (unit sd), centres at least `distance` apart along every
    dimension's mix (0, +1 +1 +1 ..., +1 -1 +1 ...) x distance / sqrt(dim), and their labels."""
    signs = np.where(np.arange(dim) % 2 == 0, 1.0, -1.0)
    centres = np.stack([np.zeros(dim), np.ones(dim), signs]) * distance / np.sqrt(dim)
    labels = np.repeat(np.arange(3), n_per)
    return centres[labels] + rng.standard_normal((3 * n_per, dim)), labels


# --- clustering (seed 000: HDBSCAN on VAE latents vs the PCA baseline) ---------------------


def test_min_cluster_size_is_two_percent_at_least_five():
    assert min_cluster_size(100) == 5
    assert min_cluster_size(1000) == 20
    assert min_cluster_size(1797) == 35


def test_hdbscan_finds_three_separated_blobs_in_latents_and_inputs():
    rng = np.random.default_rng(0)
    mu, labels = blobs(rng, 100, dim=4)
    inputs, _ = blobs(rng, 100, dim=40)  # the same three groups, in input space
    m = cluster_latents(mu, inputs, labels)
    for side in ("latent", "pca"):
        assert m[f"eval/hdbscan_{side}_n_clusters"] == 3
        assert m[f"eval/hdbscan_{side}_ari"] > 0.95
        assert m[f"eval/hdbscan_{side}_ami"] > 0.9
        assert m[f"eval/hdbscan_{side}_noise_fraction"] < 0.1
        assert m[f"eval/hdbscan_{side}_silhouette"] > 0.6
    assert m["eval/hdbscan_latent_dims"] == 4
    assert m["eval/hdbscan_min_cluster_size"] == 6  # 300 // 50
    assert 0 < m["eval/pca_explained_variance"] <= 1


def test_random_latents_do_not_recover_the_labels():
    rng = np.random.default_rng(1)
    mu = rng.standard_normal((300, 4))
    inputs = rng.standard_normal((300, 40))
    labels = rng.integers(0, 3, 300)
    m = cluster_latents(mu, inputs, labels)
    assert abs(m["eval/hdbscan_latent_ari"]) < 0.05
    assert abs(m["eval/hdbscan_pca_ari"]) < 0.05
    assert abs(m["eval/hdbscan_latent_ami"]) < 0.05
    for side in ("latent", "pca"):  # here PCA calls everything noise: no silhouette
        if m[f"eval/hdbscan_{side}_n_clusters"] < 2:
            assert math.isnan(m[f"eval/hdbscan_{side}_silhouette"])
    assert math.isnan(m["eval/hdbscan_pca_silhouette"])


def test_inactive_dimensions_are_left_out_before_standardising():
    # Two informative dimensions and six collapsed ones (variance 1e-6): z-scored, the six
    # would be unit-variance noise that drowns the blobs.
    rng = np.random.default_rng(2)
    informative, labels = blobs(rng, 100, dim=2)
    mu = np.hstack([informative, 1e-3 * rng.standard_normal((300, 6))])
    m = cluster_latents(mu, informative, labels)
    assert m["eval/hdbscan_latent_dims"] == 2
    assert m["eval/hdbscan_latent_n_clusters"] == 3
    assert m["eval/hdbscan_latent_ari"] > 0.95


def test_a_fully_collapsed_latent_skips_only_the_latent_side(caplog):
    rng = np.random.default_rng(3)
    inputs, labels = blobs(rng, 100, dim=10)
    with caplog.at_level(logging.INFO, logger="vaelab.probes"):
        m = cluster_latents(np.full((300, 4), 0.5), inputs, labels)
    assert m["eval/hdbscan_latent_dims"] == 0
    assert not any(
        k.startswith("eval/hdbscan_latent_") and k != "eval/hdbscan_latent_dims" for k in m
    )
    assert m["eval/hdbscan_pca_n_clusters"] == 3
    assert "no active unit" in caplog.text


def test_clustering_without_labels_has_no_agreement_scores():
    mu, _ = blobs(np.random.default_rng(4), 50, dim=3)
    m = cluster_latents(mu, mu)
    assert "eval/hdbscan_latent_n_clusters" in m
    assert not any(k.endswith(("_ari", "_ami")) for k in m)


# --- anomaly detection (seed 003: IsolationForest on the normal class) ----------------------


def anomaly_data(shift: float, seed: int = 0):
    """Class 0 ~ N(0, I) and class 1 ~ N(shift, I) in 4-D; 300/30 train, 100/100 test."""
    rng = np.random.default_rng(seed)
    labels_train = np.repeat([0, 1], [300, 30])
    labels_test = np.repeat([0, 1], [100, 100])
    mu_train = rng.standard_normal((330, 4)) + shift * labels_train[:, None]
    mu_test = rng.standard_normal((200, 4)) + shift * labels_test[:, None]
    return mu_train, mu_test, labels_train, labels_test


def test_a_planted_anomaly_class_is_found():
    mu_train, mu_test, y_train, y_test = anomaly_data(shift=6.0)
    m = anomaly_scores(mu_train, mu_test, y_train, y_test)
    assert m["eval/anomaly_auc"] > 0.95
    assert m["eval/anomaly_score_mean/1"] > m["eval/anomaly_score_mean/0"]
    assert m["eval/anomaly_n_fit"] == 300  # the normal class only


def test_overlapping_classes_score_chance_auc():
    mu_train, mu_test, y_train, y_test = anomaly_data(shift=0.0)
    m = anomaly_scores(mu_train, mu_test, y_train, y_test)
    assert abs(m["eval/anomaly_auc"] - 0.5) < 0.08


def test_anomaly_without_labels_fits_every_training_sample():
    mu_train, mu_test, _, _ = anomaly_data(shift=6.0)
    m = anomaly_scores(mu_train, mu_test)
    assert m["eval/anomaly_n_fit"] == 330
    assert "eval/anomaly_auc" not in m
    assert m["eval/anomaly_score_mean"] > 0


def test_string_labels_become_metric_names():
    mu_train, mu_test, y_train, y_test = anomaly_data(shift=6.0)
    names = np.array(["Low Risk", "High Risk"])
    m = anomaly_scores(mu_train, mu_test, names[y_train], names[y_test], normal_label="Low Risk")
    assert m["eval/anomaly_auc"] > 0.95
    assert {"eval/anomaly_score_mean/High_Risk", "eval/anomaly_score_mean/Low_Risk"} <= set(m)


def test_anomaly_without_a_normal_class_in_training_stops():
    mu_train, mu_test, y_train, y_test = anomaly_data(shift=6.0)
    with pytest.raises(ValueError, match="normal class 7"):
        anomaly_scores(mu_train, mu_test, y_train, y_test, normal_label=7)


# --- linear probe --------------------------------------------------------------------------


def test_probe_separates_linearly_separable_latents():
    rng = np.random.default_rng(5)
    # class = sign of dimension 0, with a margin; train mostly class 1, test mostly class 0
    y_train = np.repeat([0, 1], [60, 140])
    y_test = np.repeat([0, 1], [70, 30])

    def latents(y):
        mu = rng.standard_normal((len(y), 3))
        mu[:, 0] = np.where(y == 1, 1.0, -1.0) * (1.0 + np.abs(mu[:, 0]))
        return mu

    m = linear_probe(latents(y_train), y_train, latents(y_test), y_test)
    assert m["eval/probe_accuracy"] == 1.0
    assert m["eval/probe_balanced_accuracy"] == 1.0
    # chance = always answering the training majority (1), scored on the test split
    assert m["eval/probe_chance"] == pytest.approx(0.3)


def test_probe_on_uninformative_latents_is_near_chance():
    rng = np.random.default_rng(6)
    mu_train, mu_test = rng.standard_normal((400, 3)), rng.standard_normal((400, 3))
    y_train, y_test = rng.integers(0, 2, 400), rng.integers(0, 2, 400)
    m = linear_probe(mu_train, y_train, mu_test, y_test)
    assert abs(m["eval/probe_balanced_accuracy"] - 0.5) < 0.08


def test_probe_needs_two_classes():
    with pytest.raises(ValueError, match="at least 2 classes"):
        linear_probe(np.zeros((10, 2)), np.zeros(10), np.zeros((5, 2)), np.zeros(5))


# --- generative factors ----------------------------------------------------------------------


def test_factor_r2_of_linear_and_independent_factors(caplog):
    rng = np.random.default_rng(7)
    mu_train, mu_test = rng.standard_normal((400, 4)), rng.standard_normal((200, 4))

    def factors(mu):
        n = len(mu)
        return {
            "linear": 2.0 * mu[:, 0] - 3.0 * mu[:, 2] + 1.0,
            "independent": rng.standard_normal(n),
            "constant": np.full(n, 4.0),
            "broken": np.where(np.arange(n) == 0, np.nan, 1.0 * np.arange(n)),
        }

    with caplog.at_level(logging.INFO, logger="vaelab.probes"):
        m = factor_r2(mu_train, factors(mu_train), mu_test, factors(mu_test))
    assert m["eval/factor_r2/linear"] > 0.999
    assert m["eval/factor_r2/independent"] <= 0.1
    assert set(m) == {"eval/factor_r2/linear", "eval/factor_r2/independent"}
    assert "'constant' skipped" in caplog.text
    assert "'broken' skipped" in caplog.text


# --- probe_latents ------------------------------------------------------------------------


def full_set(n_per: int = 100, seed: int = 8):
    """Three blobs with labels, a factor read off dimension 0, inputs (N, T, C), splits."""
    rng = np.random.default_rng(seed)
    mu, labels = blobs(rng, n_per, dim=4)
    inputs = np.repeat(mu[:, None, :], 5, axis=1) + 0.1 * rng.standard_normal((len(mu), 5, 4))
    split = rng.choice(np.array(["train", "val", "test"]), len(mu), p=[0.6, 0.2, 0.2])
    factors = {"position": 0.5 * mu[:, 0], "noise": rng.standard_normal(len(mu))}
    return mu, split, inputs, labels, factors


def test_probe_latents_runs_everything_that_applies():
    mu, split, inputs, labels, factors = full_set()
    m = probe_latents(mu, split, inputs, labels, factors, seed=0)
    assert m["eval/hdbscan_latent_n_clusters"] == 3
    assert m["eval/probe_accuracy"] > 0.95
    # class 0 is normal; classes 1 and 2 lie far from it
    assert m["eval/anomaly_auc"] > 0.95
    assert m["eval/factor_r2/position"] > 0.999
    assert all(isinstance(v, float) for v in m.values())


def test_probe_latents_without_labels_or_factors_skips_gracefully(caplog):
    mu, split, inputs, labels, factors = full_set()
    full = probe_latents(mu, split, inputs, labels, factors)
    with caplog.at_level(logging.INFO, logger="vaelab.probes"):
        bare = probe_latents(mu, split, inputs)
    assert len(bare) < len(full)
    clustering = {k for k in full if k.startswith(("eval/hdbscan", "eval/pca"))}
    assert clustering - {k for k in clustering if k.endswith(("_ari", "_ami"))} <= set(bare)
    assert "eval/anomaly_score_mean" in bare  # the forest fits all training samples
    assert not any(
        k.endswith(("_ari", "_ami", "_auc")) or "probe" in k or "factor" in k for k in bare
    )
    assert "no labels" in caplog.text and "no known generative factors" in caplog.text


def test_probe_latents_skips_a_split_that_is_too_small(caplog):
    mu, split, inputs, labels, factors = full_set()
    split = np.where(split == "test", "val", split)
    split[:3] = "test"  # 3 test samples: below MIN_TEST_SAMPLES
    with caplog.at_level(logging.INFO, logger="vaelab.probes"):
        m = probe_latents(mu, split, inputs, labels, factors)
    assert "eval/hdbscan_latent_n_clusters" in m
    assert not any("probe" in k or "anomaly" in k or "factor" in k for k in m)
    assert "3 test samples" in caplog.text


def test_probe_latents_on_a_handful_of_samples_returns_nothing(caplog):
    mu, split, inputs, labels, factors = full_set()
    with caplog.at_level(logging.INFO, logger="vaelab.probes"):
        m = probe_latents(
            mu[:6], split[:6], inputs[:6], labels[:6], {k: v[:6] for k, v in factors.items()}
        )
    assert m == {}
    assert "clustering skipped" in caplog.text


def test_probe_latents_of_a_diverged_model_returns_nothing():
    mu, split, inputs, labels, factors = full_set()
    mu[0, 0] = np.nan
    assert probe_latents(mu, split, inputs, labels, factors) == {}


def test_probe_latents_reads_split_names_as_h5py_returns_them():
    mu, split, inputs, labels, factors = full_set(n_per=30)
    as_bytes = np.array([s.encode() for s in split], dtype=object)  # f["split"][:] of latents.h5
    assert probe_latents(mu, as_bytes, inputs, labels, factors) == pytest.approx(
        probe_latents(mu, split, inputs, labels, factors), nan_ok=True
    )
    assert "eval/probe_accuracy" in probe_latents(mu, as_bytes, inputs, labels, factors)


def test_probe_latents_checks_lengths():
    mu, split, inputs, labels, factors = full_set()
    with pytest.raises(ValueError, match="expected mu"):
        probe_latents(mu, split[:-1], inputs)
