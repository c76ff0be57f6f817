"""The AR(1) noise of the synthetic data sets: layout, stationary variance, autocorrelation.

Statistics are estimated across 20,000 independent series, so each tolerance is several
standard errors wide: a 3 % band on a standard deviation whose relative standard error is
1 / sqrt(2 * 20000) = 0.5 %, and 0.01 on correlations whose standard error is below 0.003.
"""

import numpy as np
import pytest

from vaelab.data.noise import ar1

N_SERIES = 20_000


@pytest.mark.parametrize(("phi", "sd"), [(0.85, 1.0), (0.98, 3.0), (0.98, 0.4)])
def test_every_step_has_the_stationary_sd(phi: float, sd: float) -> None:
    x = ar1(np.random.default_rng(0), 60, (N_SERIES,), phi=phi, sd=sd)
    # The first step as much as the last: the start is drawn stationary, no burn-in needed.
    for t in (0, 1, 30, 59):
        assert abs(x[t].std() / sd - 1.0) < 0.03, t
        assert abs(x[t].mean()) < 0.03 * sd, t


@pytest.mark.parametrize("phi", [0.85, 0.98])
def test_lag_k_autocorrelation_is_phi_to_the_k(phi: float) -> None:
    x = ar1(np.random.default_rng(1), 40, (N_SERIES,), phi=phi, sd=2.0)
    for t, lag in ((0, 1), (0, 10), (20, 1), (20, 19)):
        correlation = np.corrcoef(x[t], x[t + lag])[0, 1]
        assert abs(correlation - phi**lag) < 0.01, (t, lag)


def test_layout_independence_and_seed() -> None:
    x = ar1(np.random.default_rng(2), 500, (N_SERIES // 100, 7), phi=0.85, sd=1.0)
    assert x.shape == (500, N_SERIES // 100, 7) and x.dtype == np.float64
    # Series of the trailing axes are independent of one another.
    flat = x.reshape(500, -1)
    assert abs(np.corrcoef(flat[:, 0], flat[:, 1])[0, 1]) < 0.15  # 500 steps, phi 0.85
    one = ar1(np.random.default_rng(2), 30, (), phi=0.98, sd=3.0)
    assert one.shape == (30,)
    np.testing.assert_array_equal(one, ar1(np.random.default_rng(2), 30, (), phi=0.98, sd=3.0))
    assert not np.array_equal(one, ar1(np.random.default_rng(3), 30, (), phi=0.98, sd=3.0))


@pytest.mark.parametrize("phi", [1.0, -1.0, 1.5])
def test_non_stationary_phi_is_refused(phi: float) -> None:
    with pytest.raises(ValueError, match=r"phi must lie in \(-1, 1\)"):
        ar1(np.random.default_rng(0), 10, (), phi=phi, sd=1.0)
