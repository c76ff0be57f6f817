"""The benchmark's own claims: it measures the loop's own train step on each experiment's own
configuration, its like-for-like model is the same model built from torch.nn's layers, its
reference is the seed plan's own model, and steps it compares are timed in turns."""

import pytest
import torch

from vaelab import bench, runtime
from vaelab.models.layers import LeakyReLUDropout, PolyphaseConv1d, PolyphaseConvTranspose1d

FAST_LAYERS = {PolyphaseConv1d, PolyphaseConvTranspose1d, LeakyReLUDropout}


def test_the_stock_layers_config_builds_the_same_model_from_torch_nn(tmp_path):
    fast = bench.Parts(bench.compose_experiment(bench.SEED000, tmp_path)).model
    stock_cfg = bench.compose_experiment(bench.SEED000, tmp_path, ("model.stock_layers=true",))
    stock = bench.Parts(stock_cfg).model
    kinds = {type(m) for m in stock.modules()}
    assert not FAST_LAYERS & kinds
    assert torch.nn.ConvTranspose1d in kinds and torch.nn.Dropout in kinds
    assert {type(m) for m in fast.modules()} >= FAST_LAYERS
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


def test_a_supervised_experiments_step_gets_its_batchs_targets(tmp_path):
    # make bench steps every experiment: seed 004 Exp3's loss needs the batch's known factors.
    overrides = ("dataset.size=16", "model.base_channels=4", "model.latent_dim=8")
    parts = bench.Parts(bench.compose_experiment("mri3d_supervised", tmp_path, overrides))
    assert parts.targets is not None and parts.targets.shape == (len(parts.data.values), 4)
    before = [p.detach().clone() for p in parts.model.parameters()]
    parts.step(torch.arange(4), epoch=0.0)
    assert any(not torch.equal(a, p) for a, p in zip(before, parts.model.parameters(), strict=True))


def test_the_bench_covers_every_experiment_file():
    files = sorted(p.stem for p in (bench.CONF_DIR / "experiment").glob("*.yaml"))
    assert bench.EXPERIMENTS == files and bench.SEED000 in files


def test_the_seed_plans_model_is_seed_001s_own(tmp_path):
    # Seed 001's decoder starts every branch at 8 steps and pads or crops it to T; its FLOPs
    # at 745 x 7 are the 11.6 GFLOP per batch-64 step that issue 12 measured.
    cfg = bench.compose_experiment(bench.SEED000, tmp_path)
    parts = bench.Parts(cfg)
    plan = bench.SeedPlanParts(parts, cfg)
    model = plan.model
    assert (model.fc.out_features, model.merge.kernel_size) == (64 * 4 * 8, (1,))
    assert not any(type(m) in FAST_LAYERS for m in model.modules())
    outputs = model(torch.randn(2, 745, 7))
    assert [tuple(t.shape) for t in outputs] == [(2, 745, 7), (2, 32), (2, 32)] + [(2, 745, 7)] * 4
    batch, epoch = torch.arange(2), float(cfg.trainer.epochs)
    flops_at_2 = bench.count_flops(plan.step, batch, epoch)
    assert 32 * flops_at_2 / 1e9 == pytest.approx(11.6, abs=0.05)
    before = [p.detach().clone() for p in model.parameters()]
    plan.step(batch, epoch)
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))


def test_steps_are_timed_in_turns_batch_by_batch():
    calls = []
    steppers = {name: (lambda b, e, name=name: calls.append((name, int(b)))) for name in "ab"}
    seconds, other_cores = bench.timed_steps(steppers, list(torch.arange(4)), 1.0, warmup=1)
    assert calls == [(name, i) for i in range(4) for name in "ab"]
    assert [len(s) for s in seconds.values()] == [3, 3]  # the warm-up batch is left out
    assert other_cores >= 0 or other_cores != other_cores  # NaN without /proc/stat


def test_the_bench_measures_the_precisions_the_host_runs_natively(monkeypatch):
    monkeypatch.setattr(runtime, "cpu_flags", lambda: {"avx2", "avx512f"})
    assert bench.host_precisions() == ["32"]
    monkeypatch.setattr(runtime, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    assert bench.host_precisions() == ["32", "bf16-mixed"]
    assert set(bench.MATMUL_DTYPES) == set(runtime.PRECISIONS)
    rate, n = bench.matmul_peak(sizes=(64,), repeats=1, dtype=torch.bfloat16)
    assert rate > 0 and n == 64


def test_the_summary_gives_each_precision_its_ratio_and_share_of_its_own_peak():
    figures = {"step": 0.2, "samples_per_second": 320.0, "ratio_to_plan": 1.25}
    figures |= {"ratio_same_precision": 0.9, "flops": 32e9, "plan_flops": 11.6e9}
    speeds = {
        "batch": 64,
        "plan_step": 0.25,
        "precisions": {"32": figures | {"step": 0.4}, "bf16-mixed": figures | {"other_cores": 0}},
    }
    speeds["precisions"]["32"]["other_cores"] = 0.5
    compile_figures = {"compile_seconds": 60.0, "compiled_step": 0.3, "eager_step": 0.2}
    compile_figures |= {"precision": "bf16-mixed", "break_even_steps": float("inf")}
    compile_figures |= {"run_steps": 600, "pays": False}
    loop = {"full": 1.0, "bare": 0.9, "overhead": 0.11, "other_cores": 0.1}
    info = {"torch threads": 2, "torch": "2.13", "CPU": "EPYC", "precision=auto": "bf16-mixed (x)"}
    peaks = {"32": (100.0, 2048), "bf16-mixed": (200.0, 2048)}
    rows = bench.summary((1.0, 2.0), info, peaks, speeds, {"speedup": 1.3}, compile_figures, loop)
    table = {name.strip(): (value, note) for name, value, note in rows}
    assert table["seed plan's model, 32"][0] == "256.0 samples/s"
    assert table["train step, bf16-mixed"][0] == "320.0 samples/s"
    # 32 GFLOP in 0.4 s against 100 GFLOP/s at 32; in 0.2 s against 200 at bf16: 80% both.
    shares = [value for name, value, _ in rows if name.strip() == "share of matmul peak"]
    assert shares == ["80%", "80%"]
    assert "does not pay in a 600-step" in table["break-even"][1]
