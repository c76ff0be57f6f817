"""SSIM (Wang et al. 2004, in 3D) and PSNR of volumes: known answers, an independent reference
(scipy's filters), the mask, and one clear error per bad input."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter, uniform_filter

from vaelab.errors import DataError
from vaelab.models.conv3d import Conv3DVAE
from vaelab.volume_metrics import (
    K1,
    K2,
    psnr,
    ssim_3d,
    volume_range,
    volume_reconstruction_metrics,
    volume_scores,
)


def volumes(n=2, c=2, side=13, seed=0) -> torch.Tensor:
    """Smooth random volumes (N, C, side³), so that SSIM has structure to compare."""
    rng = np.random.default_rng(seed)
    v = gaussian_filter(rng.normal(size=(n, c, side, side, side)), sigma=(0, 0, 1, 1, 1))
    return torch.from_numpy(v).float()


def reference_ssim(x: np.ndarray, y: np.ndarray, data_range: float, window: str) -> float:
    """Mean SSIM of two 3D arrays, from the paper's formula with scipy's filters (float64)."""
    if window == "gaussian":  # 11 taps: radius int(truncate * sigma + 0.5) = 5
        filt, r = (lambda v: gaussian_filter(v, sigma=1.5, truncate=5 / 1.5)), 5
    else:
        filt, r = (lambda v: uniform_filter(v, size=7)), 3
    mx, my = filt(x), filt(y)
    vx, vy, cxy = filt(x * x) - mx**2, filt(y * y) - my**2, filt(x * y) - mx * my
    c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(s[r:-r, r:-r, r:-r].mean())  # valid positions only


def test_ssim_of_a_volume_with_itself_is_one() -> None:
    x = volumes()
    mask = (torch.rand(2, 1, 13, 13, 13, generator=torch.Generator().manual_seed(1)) > 0.3).float()
    for kwargs in ({}, {"sigma": None, "window_size": 7}, {"mask": mask}):
        torch.testing.assert_close(ssim_3d(x, x.clone(), 4.0, **kwargs), torch.ones(2, 2))


@pytest.mark.parametrize("window", ["gaussian", "box"])
def test_ssim_matches_the_formula_with_scipy_filters(window: str) -> None:
    x = volumes(seed=0)
    y = 0.8 * x + 0.3 * volumes(seed=1) + 0.1
    kwargs = {} if window == "gaussian" else {"sigma": None, "window_size": 7}
    got = ssim_3d(x, y, 3.0, **kwargs)
    assert got.shape == (2, 2)
    for i in range(2):
        for k in range(2):
            want = reference_ssim(x[i, k].double().numpy(), y[i, k].double().numpy(), 3.0, window)
            assert got[i, k].item() == pytest.approx(want, abs=1e-5)


def test_ssim_of_one_window_is_the_global_formula() -> None:
    # A 7³ volume under a 7³ box has one valid position: SSIM of the whole volume, eq. 13
    # with population moments.
    x = volumes(n=1, c=1, side=7)
    y = 0.5 * x + 0.2
    a, b = x.double().numpy(), y.double().numpy()
    c1, c2 = (K1 * 2.0) ** 2, (K2 * 2.0) ** 2
    cov = ((a - a.mean()) * (b - b.mean())).mean()
    want = ((2 * a.mean() * b.mean() + c1) * (2 * cov + c2)) / (
        (a.mean() ** 2 + b.mean() ** 2 + c1) * (a.var() + b.var() + c2)
    )
    got = ssim_3d(x, y, 2.0, window_size=7, sigma=None)
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_ssim_drops_with_noise() -> None:
    x = volumes(n=1, c=1)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    scores = [ssim_3d(x, x + s * noise, 4.0).item() for s in (0.0, 0.05, 0.2, 1.0)]
    assert scores[0] == pytest.approx(1.0)
    assert scores[0] > scores[1] > scores[2] > scores[3]
    assert scores[3] < 0.5


def test_ssim_is_precise_on_raw_scanner_intensities() -> None:
    # Intensities in the thousands: float32 must agree with float64 (the shift before the sums).
    x = 1000.0 + 50.0 * volumes(n=1, c=1)
    y = x + 5.0 * volumes(n=1, c=1, seed=3)
    got = ssim_3d(x, y, 400.0).item()
    want = ssim_3d(x.double(), y.double(), 400.0).item()
    assert got == pytest.approx(want, abs=1e-5)


def test_ssim_mask_ignores_unobserved_voxels() -> None:
    x = volumes(n=1, c=1)
    mask = torch.ones_like(x)
    mask[..., :4] = 0.0  # the first 4 W slices unobserved
    y = x.clone()
    y[..., :4] = 50.0  # garbage where unobserved
    assert ssim_3d(x, y, 4.0).item() < 0.9
    assert ssim_3d(x, y, 4.0, mask).item() == pytest.approx(1.0)
    # A mask of ones is the plain definition; a volume with nothing observed is NaN.
    z = volumes(n=1, c=1, seed=5)
    torch.testing.assert_close(ssim_3d(x, z, 4.0, torch.ones_like(x)), ssim_3d(x, z, 4.0))
    assert math.isnan(ssim_3d(x, z, 4.0, torch.zeros_like(x)).item())


def test_psnr_of_a_constant_error() -> None:
    x = volumes(n=2, c=3, side=4)
    e, data_range = 0.1, 2.0
    got = psnr(x, x + e, data_range)
    want = 10 * math.log10(data_range**2 / e**2)  # 26.0206 dB
    assert got.shape == (2, 3)
    torch.testing.assert_close(got, torch.full((2, 3), want), atol=1e-3, rtol=0)
    # One range per volume and channel; identical volumes are +inf.
    per_volume = torch.tensor([[1.0, 2.0, 4.0], [1.0, 1.0, 1.0]])
    got = psnr(x, x + e, per_volume)
    assert got[0, 2].item() == pytest.approx(10 * math.log10(16 / e**2), abs=1e-3)
    assert torch.isinf(psnr(x, x, 1.0)).all()


def test_psnr_mask_counts_observed_voxels_only() -> None:
    x = torch.zeros(1, 1, 4, 4, 4)
    y = x.clone()
    y[..., :2] = 0.5  # error 0.5 on half the voxels, 0 on the rest
    mask = torch.zeros_like(x)
    mask[..., 1:3] = 1.0  # observed: one slice with error, one without -> MSE 0.125
    assert psnr(x, y, 1.0, mask).item() == pytest.approx(10 * math.log10(1 / 0.125), abs=1e-4)
    channel_mask = torch.ones(1, 1, 4, 4, 4)  # one mask for every channel
    assert psnr(x.repeat(1, 2, 1, 1, 1), y.repeat(1, 2, 1, 1, 1), 1.0, channel_mask).shape == (1, 2)


def test_volume_range_is_per_volume_and_observed() -> None:
    x = torch.zeros(1, 2, 2, 2, 2)
    x[0, 0, 0, 0, 0], x[0, 0, 1, 1, 1] = -1.0, 3.0
    mask = torch.ones_like(x)
    mask[0, 0, 1, 1, 1] = 0.0
    torch.testing.assert_close(volume_range(x), torch.tensor([[4.0, 1.0]]))  # constant -> 1
    torch.testing.assert_close(volume_range(x, mask), torch.tensor([[1.0, 1.0]]))


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda x: ssim_3d(x, x[:1], 1.0), r"x and y: expected one shape"),
        (lambda x: psnr(x[0], x[0], 1.0), r"psnr: x: expected \(N, C, D, H, W\)"),
        (lambda x: ssim_3d(x[..., :9], x[..., :9], 1.0), r"must be >= window_size 11"),
        (lambda x: psnr(x, x, 0.0), r"data_range: expected finite values > 0"),
        (lambda x: psnr(x, x, torch.ones(3, 3)), r"data_range: expected a number or one per"),
        (lambda x: psnr(x, x, 1.0, 0.5 * torch.ones_like(x)), r"mask: expected only 0 and 1"),
        (lambda x: psnr(x, x, 1.0, torch.ones(2, 2, 3, 3, 3)), r"mask: expected shape"),
        (lambda x: psnr(x, x * math.nan, 1.0), r"y: expected finite values"),
        (lambda x: psnr(x.long(), x.long(), 1.0), r"x: expected floating point"),
    ],
)
def test_bad_inputs_are_one_clear_error(call, match: str) -> None:
    with pytest.raises(DataError, match=match):
        call(volumes())


def test_bad_window_is_a_value_error() -> None:
    x = volumes()
    with pytest.raises(ValueError, match="window_size: expected an odd integer"):
        ssim_3d(x, x, 1.0, window_size=6)
    with pytest.raises(ValueError, match="sigma: expected > 0"):
        ssim_3d(x, x, 1.0, sigma=0.0)


class _Shifted(torch.nn.Module):
    """A stand-in model whose reconstruction is its input plus a constant."""

    def __init__(self, shift: float) -> None:
        super().__init__()
        self.shift = shift

    def forward(self, x: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(recon=x + self.shift)


def test_reconstruction_metrics_known_answers() -> None:
    x = volumes(n=3, c=2, side=12)
    metrics = volume_reconstruction_metrics(
        _Shifted(0.0), x, torch.device("cpu"), channel_names=["t1", "t2"], batch_size=2
    )
    assert set(metrics) == {
        "eval/ssim",
        "eval/ssim_t1",
        "eval/ssim_t2",
        "eval/psnr",
        "eval/psnr_t1",
        "eval/psnr_t2",
    }
    assert metrics["eval/ssim"] == pytest.approx(1.0) and math.isinf(metrics["eval/psnr"])
    # A constant error e: each volume's PSNR is 10 log10(range² / e²), L its own range.
    metrics = volume_reconstruction_metrics(_Shifted(0.1), x, torch.device("cpu"), prefix="val")
    ranges = volume_range(x).double()
    want = (10 * torch.log10(ranges**2 / 0.01)).mean(dim=0)
    assert metrics["val/psnr_ch0"] == pytest.approx(want[0].item(), abs=1e-3)
    assert metrics["val/ssim"] < 1.0
    # `index` scores a split in place; masks of ones are the plain definition.
    split = torch.tensor([2, 0])
    picked = volume_reconstruction_metrics(
        _Shifted(0.1), x, torch.device("cpu"), index=split, masks=torch.ones_like(x)
    )
    assert picked == pytest.approx(volume_reconstruction_metrics(_Shifted(0.1), x[split], "cpu"))
    # Volumes smaller than the 11³ window: PSNR only.
    small = volume_reconstruction_metrics(_Shifted(0.1), x[..., :8, :8, :8], torch.device("cpu"))
    assert set(small) == {"eval/psnr", "eval/psnr_ch0", "eval/psnr_ch1"}


def test_reconstruction_metrics_of_a_conv3d_model() -> None:
    torch.manual_seed(0)
    model = Conv3DVAE(input_shape=(2, 12, 12, 12), latent_dim=4, base_channels=4)
    model.train()
    metrics = volume_reconstruction_metrics(model, volumes(n=3, side=12), torch.device("cpu"))
    assert model.training  # its mode is given back
    assert all(math.isfinite(v) for v in metrics.values())
    assert -1.0 <= metrics["eval/ssim"] <= 1.0


def test_volume_scores_are_ssim_and_psnr_per_volume_and_channel_at_each_volumes_range() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 12, 12, 12)
    x[1] *= 4.0  # another range: each volume is scored against its own max − min
    recon = x + 0.1 * torch.randn_like(x)
    ssim, scores = volume_scores(x, recon)
    peak = volume_range(x)
    torch.testing.assert_close(ssim, ssim_3d(x, recon, peak))
    torch.testing.assert_close(scores, psnr(x, recon, peak))
    assert ssim.shape == scores.shape == (2, 3)
    # PSNR by hand: 10 log10(range² / MSE) of volume 1, channel 2
    mse = ((x[1, 2] - recon[1, 2]) ** 2).mean()
    by_hand = 10 * torch.log10((x[1, 2].max() - x[1, 2].min()) ** 2 / mse)
    assert scores[1, 2].item() == pytest.approx(by_hand.item(), rel=1e-5)
    small = x[:, :, :8, :8, :8]  # sides below the 11³ SSIM window: PSNR only
    ssim_small, psnr_small = volume_scores(small, small + 0.1)
    assert torch.isnan(ssim_small).all() and torch.isfinite(psnr_small).all()
