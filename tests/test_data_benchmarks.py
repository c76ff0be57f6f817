"""The benchmark data sets: scikit-learn's digits and MNIST-1D, generated without a network."""

import random
import socket
import urllib.request

import numpy as np
import pytest
import requests

from vaelab.data.benchmarks import load_digits, load_mnist1d
from vaelab.errors import DataError


def test_digits_vectors_and_images() -> None:
    s = load_digits()
    assert s.values.shape == (1797, 64) and s.values.dtype == np.float32
    assert np.isfinite(s.values).all() and 0 <= s.values.min() and s.values.max() <= 16
    assert s.labels.dtype == np.int64 and set(s.labels.tolist()) == set(range(10))
    assert len(np.unique(s.groups)) == 1797 and s.factors == {}
    image = load_digits(as_image=True)
    assert image.values.shape == (1797, 8, 8) and len(image.channel_names) == 8
    np.testing.assert_array_equal(image.values.reshape(1797, 64), s.values)


def _no_network(*args, **kwargs):
    raise AssertionError("network access while loading MNIST-1D")


def test_mnist1d_generated_locally_deterministic_and_without_network(monkeypatch) -> None:
    monkeypatch.setattr(requests, "get", _no_network)
    monkeypatch.setattr(requests.Session, "request", _no_network)
    monkeypatch.setattr(urllib.request, "urlopen", _no_network)
    monkeypatch.setattr(socket.socket, "connect", _no_network)
    np.random.seed(123)
    random.seed(123)
    expected_numpy, expected_python = np.random.random(), random.random()
    np.random.seed(123)
    random.seed(123)
    s = load_mnist1d(n_samples=200, seed=0)
    # The generator seeds the global streams; the loader puts them back.
    assert np.random.random() == expected_numpy and random.random() == expected_python
    assert s.values.shape == (200, 40, 1) and s.values.dtype == np.float32
    assert np.isfinite(s.values).all()
    assert s.labels.dtype == np.int64 and np.bincount(s.labels).tolist() == [20] * 10
    assert len(np.unique(s.groups)) == 200
    again = load_mnist1d(n_samples=200, seed=0)
    np.testing.assert_array_equal(again.values, s.values)
    np.testing.assert_array_equal(again.labels, s.labels)
    assert not np.allclose(load_mnist1d(n_samples=200, seed=1).values, s.values)


def test_mnist1d_rejects_a_size_the_generator_would_shrink() -> None:
    with pytest.raises(DataError, match=r"^mnist1d\(n_samples=15, seed=0\): n_samples: expected"):
        load_mnist1d(n_samples=15)
