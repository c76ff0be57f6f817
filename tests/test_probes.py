"""Downstream probes of latents whose answer is known by construction: clustering against a PCA
baseline and (sequences) against FPCA, a linear probe, factor R². The anomaly detector (seed 003)
is tested in tests/test_risk_scores.py."""

import logging
import math

import numpy as np
import pytest

from vaelab.probes import (
    FPCA_VARIANCE,
    cluster_latents,
    cosine_basis,
    factor_r2,
    fpca_scores,
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


# --- FPCA (seed 000: HDBSCAN on FPCA + VAE against FPCA alone) ------------------------------


def test_cosine_basis_is_orthonormal():
    basis = cosine_basis(50, 13)
    np.testing.assert_allclose(basis @ basis.T, np.eye(13), atol=1e-12)
    np.testing.assert_allclose(basis[0], np.full(50, 1 / np.sqrt(50)))


def test_fpca_keeps_the_fewest_components_holding_85_percent_per_channel():
    # Channel 0: a sin(.) + b cos(.) with Var a = 4, Var b = 1 (slow curves, kept whole by the
    # smoothing): one component holds 80%, two hold 100%, so 2 are kept. Channel 1: c times
    # one curve, a single component. Channel 2: constant, no component.
    rng = np.random.default_rng(0)
    n, t = 400, 64
    phase = 2 * np.pi * np.arange(t) / t
    a, b, c = 2 * rng.standard_normal(n), rng.standard_normal(n), rng.standard_normal(n)
    a, b = a - a.mean(), b - b.mean()
    a *= 2 / a.std()  # exactly Var a = 4, Var b = 1, uncorrelated: shares 0.8 and 0.2
    b -= a * (a @ b) / (a @ a)
    b /= b.std()
    x = np.stack(
        [
            a[:, None] * np.sin(phase) + b[:, None] * np.cos(phase),
            c[:, None] * np.sin(2 * phase),
            np.full((n, t), 3.0),
        ],
        axis=2,
    )
    scores, m = fpca_scores(x)
    assert FPCA_VARIANCE == 0.85
    assert scores.shape == (n, 3) and m["eval/fpca_n_components"] == 3
    assert m["eval/fpca_explained_variance"] == pytest.approx(1.0)
    # The first score of channel 0 is +-a scaled by the curve's norm: |corr| = 1.
    assert abs(np.corrcoef(scores[:, 0], a)[0, 1]) == pytest.approx(1.0, abs=1e-6)
    assert abs(np.corrcoef(scores[:, 2], c)[0, 1]) == pytest.approx(1.0, abs=1e-6)
    # 90% would need the same 2 components of channel 0; 75% only 1.
    assert fpca_scores(x, variance=0.75)[0].shape == (n, 2)


def test_fpca_smoothing_drops_fast_noise():
    # A fast cosine (period 2 x 64 / 60 ~ 2 steps, 5 times larger than the slow curve) lies
    # above the smoothing basis's cutoff (period >= 8 steps: its first 16 cosines).
    rng = np.random.default_rng(1)
    slow = rng.standard_normal(200)[:, None] * np.sin(2 * np.pi * np.arange(64) / 64)
    fast = rng.standard_normal((200, 1)) * cosine_basis(64, 61)[60] * np.sqrt(32)
    scores, m = fpca_scores((slow + 5 * fast)[:, :, None])
    assert m["eval/fpca_n_components"] == 1
    assert abs(np.corrcoef(scores[:, 0], slow[:, 16])[0, 1]) > 0.999


def test_fpca_vae_beats_fpca_when_the_clusters_are_only_in_the_latents():
    # Two groups that the curves cannot tell apart: the same distribution of smooth random
    # curves in both; the latents carry the groups (seed 000: what FPCA alone misses).
    rng = np.random.default_rng(2)
    n, t = 300, 48
    labels = np.repeat([0, 1], n // 2)
    phase = 2 * np.pi * np.arange(t) / t
    weights = rng.standard_normal((n, 2, 3))
    sequences = np.einsum("nkc,kt->ntc", weights, np.stack([np.sin(phase), np.cos(phase)]))
    mu = np.where(labels[:, None] == 1, 4.0, -4.0) + rng.standard_normal((n, 3))
    m = cluster_latents(mu, sequences.reshape(n, -1), labels, sequences=sequences)
    assert abs(m["eval/hdbscan_fpca_ari"]) < 0.1
    assert m["eval/hdbscan_fpca_vae_ari"] > 0.9
    assert m["eval/hdbscan_fpca_vae_n_clusters"] == 2
    assert m["eval/fpca_n_components"] == 6  # 2 per channel: sin and cos
    assert {
        f"eval/hdbscan_fpca{s}_{k}" for s in ("", "_vae") for k in ("ami", "silhouette")
    } <= set(m)


def test_fpca_comparison_only_for_sequences_and_active_latents(caplog):
    rng = np.random.default_rng(3)
    mu, labels = blobs(rng, 50, dim=3)
    assert not any("fpca" in k for k in cluster_latents(mu, mu, labels))  # feature vectors
    sequences = np.repeat(mu[:, None, :], 8, axis=1)
    with caplog.at_level(logging.INFO, logger="vaelab.probes"):
        m = cluster_latents(np.zeros_like(mu), mu, labels, sequences=sequences)
    assert m["eval/hdbscan_fpca_n_clusters"] == 3
    assert not any(k.startswith("eval/hdbscan_fpca_vae") for k in m)
    assert "FPCA + VAE skipped" in caplog.text


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
    assert m["eval/factor_r2/position"] > 0.999
    # (N, T, C) inputs: the FPCA comparison too; the anomaly detector is score_risk's
    assert m["eval/hdbscan_fpca_n_clusters"] == 3
    assert m["eval/hdbscan_fpca_vae_ari"] > 0.95
    assert not any("anomaly" in k for k in m)
    assert all(isinstance(v, float) for v in m.values())


def test_probe_latents_without_labels_or_factors_skips_gracefully(caplog):
    mu, split, inputs, labels, factors = full_set()
    full = probe_latents(mu, split, inputs, labels, factors)
    with caplog.at_level(logging.INFO, logger="vaelab.probes"):
        bare = probe_latents(mu, split, inputs)
    assert len(bare) < len(full)
    clustering = {k for k in full if k.startswith(("eval/hdbscan", "eval/pca"))}
    assert clustering - {k for k in clustering if k.endswith(("_ari", "_ami"))} <= set(bare)
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
    assert not any("probe" in k or "factor" in k for k in m)
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
