"""The benchmark's own claims: like-for-like models, and a step figure for every experiment."""

import torch

from vaelab import bench
from vaelab.models.multiscale_conv1d import Dropout, PolyphaseConvTranspose1d


def test_stock_layers_model_is_the_same_model_built_from_torch_nn():
    torch.manual_seed(0)
    fast = bench.seed000_model()
    torch.manual_seed(0)
    stock = bench.seed000_model(stock_layers=True)
    kinds = {type(m) for m in stock.modules()}
    assert PolyphaseConvTranspose1d not in kinds and Dropout not in kinds
    assert torch.nn.ConvTranspose1d in kinds and torch.nn.Dropout in kinds
    assert {type(m) for m in fast.modules()} >= {PolyphaseConvTranspose1d, Dropout}
    x = torch.randn(2, *bench.INPUT_SHAPE)
    fast.eval()
    stock.eval()
    with torch.no_grad():
        fast_out, stock_out = fast(x), stock(x)
    torch.testing.assert_close(fast_out.mu, stock_out.mu, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast_out.recon, stock_out.recon, rtol=1e-4, atol=1e-5)


def test_experiment_step_speed_measures_the_experiments_own_shape(tmp_path):
    cfg = bench.compose_experiment("mnist1d", tmp_path)
    assert cfg.dataset.n_samples == bench.FEW_SAMPLES["n_samples"]
    figures = bench.experiment_step_speed(cfg, warmup=1, steps=2)
    assert figures["model"] == "MLPVAE" and figures["shape"] == "40x1"
    assert figures["batch"] == cfg.trainer.batch_size
    assert figures["samples_per_second"] == figures["batch"] / figures["step"] > 0
