"""The benchmark's own claims: it measures the loop's own train step on each experiment's own
configuration, and its like-for-like model is the same model built from torch.nn's layers."""

import torch

from vaelab import bench
from vaelab.models.layers import Dropout, PolyphaseConvTranspose1d


def test_the_stock_layers_config_builds_the_same_model_from_torch_nn(tmp_path):
    fast = bench.Parts(bench.compose_experiment(bench.SEED000, tmp_path)).model
    stock_cfg = bench.compose_experiment(bench.SEED000, tmp_path, ("model.stock_layers=true",))
    stock = bench.Parts(stock_cfg).model
    kinds = {type(m) for m in stock.modules()}
    assert PolyphaseConvTranspose1d not in kinds and Dropout not in kinds
    assert torch.nn.ConvTranspose1d in kinds and torch.nn.Dropout in kinds
    assert {type(m) for m in fast.modules()} >= {PolyphaseConvTranspose1d, Dropout}
    # Both built after the same seed: the same weights, and the same outputs in eval mode.
    for (name, a), (_, b) in zip(
        fast.state_dict().items(), stock.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    x = torch.randn(2, *fast.input_shape)
    fast.eval()
    stock.eval()
    with torch.no_grad():
        fast_out, stock_out = fast(x), stock(x)
    torch.testing.assert_close(fast_out.recon, stock_out.recon, rtol=1e-4, atol=1e-5)


def test_the_seed_000_figure_is_the_experiments_own_shape_batch_and_step(tmp_path):
    cfg = bench.compose_experiment(bench.SEED000, tmp_path)
    assert cfg.dataset.n_patients == bench.FEW_SAMPLES["n_patients"]
    assert (cfg.dataset.seq_len, cfg.trainer.batch_size) == (745, 64)  # seed 000's
    parts = bench.Parts(cfg)
    before = [p.detach().clone() for p in parts.model.parameters()]
    parts.step(torch.arange(4), epoch=float(cfg.trainer.epochs))  # vaelab.loop.train_step
    changed = [not torch.equal(a, p) for a, p in zip(before, parts.model.parameters(), strict=True)]
    assert any(changed)


def test_step_speed_measures_the_experiments_own_shape(tmp_path):
    cfg = bench.compose_experiment("mnist1d", tmp_path)
    assert cfg.dataset.n_samples == bench.FEW_SAMPLES["n_samples"]
    figures = bench.step_speed(cfg, warmup=1, steps=2, flops=True)
    assert figures["model"] == "MLPVAE" and figures["shape"] == "40x1"
    assert figures["batch"] == cfg.trainer.batch_size
    assert figures["samples_per_second"] == figures["batch"] / figures["step"] > 0
    # A dense VAE's step: forward and backward of every Linear, 6 FLOPs per weight and sample
    # at least (2 forward, 4 backward), so the counter sees the whole step.
    weights = sum(p.numel() for n, p in bench.Parts(cfg).model.named_parameters() if "weight" in n)
    assert figures["flops"] >= 4 * weights * figures["batch"]


def test_the_bench_covers_every_experiment_file():
    files = sorted(p.stem for p in (bench.CONF_DIR / "experiment").glob("*.yaml"))
    assert bench.EXPERIMENTS == files and bench.SEED000 in files
