"""trainer.precision (issue 12): what `auto` picks and why, 16-mixed only on CUDA, a bf16 run's
diagnostics against a float32 run of the same seed, the float16 gradient scaler, and the
precision a run records in MLflow."""

import mlflow
import pytest
import torch

from vaelab import runtime
from vaelab.data.vitals_synthetic import generate_vitals
from vaelab.diagnostics import ACTIVE_UNIT_THRESHOLD, Diagnostics, active_units, diagnose
from vaelab.errors import ConfigError
from vaelab.loop import StepPrecision, TrainerSettings, compiled, train_step
from vaelab.losses import ElboLoss
from vaelab.models.multiscale_conv1d import MultiScaleConv1DVAE
from vaelab.runtime import Precision, resolve_precision
from vaelab.train import train

CPU = torch.device("cpu")


@pytest.fixture
def cpu_without_bf16(monkeypatch):
    """A CPU with AVX-512 but no bf16 instructions (Skylake-X, Zen 3), whatever runs the test."""
    monkeypatch.setattr(runtime, "cpu_flags", lambda: {"avx2", "avx512f", "avx512bw"})


def test_auto_falls_back_to_float32_on_a_cpu_without_native_bf16(cpu_without_bf16):
    precision = resolve_precision("auto", CPU)
    assert precision.name == "32" and precision.autocast_dtype is None
    assert "no native bf16" in precision.reason and precision.reason.startswith("auto")
    # Asked for explicitly, bf16-mixed is honoured on such a host (it is only slower).
    assert resolve_precision("bf16-mixed", CPU).name == "bf16-mixed"


@pytest.mark.parametrize("flag", ["avx512_bf16", "amx_bf16", "bf16"])
def test_auto_takes_bf16_where_the_cpu_has_it(monkeypatch, flag):
    monkeypatch.setattr(runtime, "cpu_flags", lambda: {"avx2", flag})
    precision = resolve_precision("auto", CPU)
    assert precision.name == "bf16-mixed" and precision.autocast_dtype == torch.bfloat16
    assert flag in precision.reason


def test_auto_on_a_gpu_without_native_bf16_is_float32(monkeypatch):
    # A pre-Ampere GPU (a T4) only emulates bf16; auto never picks 16-mixed on its own.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    precision = resolve_precision("auto", torch.device("cuda:0"))
    assert (precision.name, precision.device_type) == ("32", "cuda")
    assert "Tesla T4 has no native bf16" in precision.reason
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation: True)
    assert resolve_precision("auto", torch.device("cuda:0")).name == "bf16-mixed"


def test_precision_names_are_lightnings_and_16_mixed_needs_cuda():
    assert resolve_precision(32, CPU).name == "32"  # YAML's `precision: 32` is an int
    assert resolve_precision("32-true", CPU).name == "32"
    with pytest.raises(ConfigError, match="trainer.precision=bf16: expected one of auto, 32"):
        resolve_precision("bf16", CPU)
    with pytest.raises(ConfigError, match="16-mixed needs a CUDA device.*use bf16-mixed or 32"):
        resolve_precision("16-mixed", CPU)
    optimizer = torch.optim.AdamW
    with pytest.raises(ConfigError, match="16-mixed needs CUDA, and trainer.device=cpu"):
        TrainerSettings(optimizer=optimizer, precision="16-mixed", device="cpu")
    if not torch.cuda.is_available():  # refused before the run starts, not when it resolves
        with pytest.raises(ConfigError, match="trainer.device=auto runs on the CPU here"):
            TrainerSettings(optimizer=optimizer, precision="16-mixed")
    with pytest.raises(ConfigError, match="trainer.precision=fp8"):
        TrainerSettings(optimizer=optimizer, precision="fp8")
    assert TrainerSettings(optimizer=optimizer, precision=32).precision == "32"


def tiny_vitals() -> tuple[torch.Tensor, torch.Tensor]:
    """48 generated patients of 300 hours x 7 vitals, standardised, unobserved entries 0."""
    samples = generate_vitals(n_patients=48, seq_len=300, seed=0)
    x, mask = torch.as_tensor(samples.values), torch.as_tensor(samples.masks)
    mean = (x * mask).sum((0, 1)) / mask.sum((0, 1))
    x = (x - mean) * mask
    return (x / x.std((0, 1))).float(), mask.float()


def trained_diagnostics(precision: str, steps: int = 16) -> Diagnostics:
    """A narrow seed 000 model trained `steps` steps at `precision` from seed 0, then
    validated the way the loop validates (vaelab.diagnostics.diagnose, eval mode)."""
    x, mask = tiny_vitals()
    torch.manual_seed(0)
    model = MultiScaleConv1DVAE((300, 7), latent_dim=4, base_channels=8)
    loss = ElboLoss(free_bits=0.25, branch_weight=0.8)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    step_precision = StepPrecision(Precision(precision, "cpu", "test"))
    batches = torch.Generator().manual_seed(1)
    for step in range(steps):
        batch = torch.randint(32, (8,), generator=batches)
        model.train()
        train_step(
            model, loss, optimizer, x[batch], mask[batch], 1.0, step / 4, 5.0, step_precision
        )
        assert not torch.is_autocast_enabled("cpu")  # autocast ends with the step
    return diagnose(model, x[32:], mask[32:], loss, 1.0, 16, CPU)


@pytest.mark.usefixtures("one_thread")
def test_a_bf16_run_diagnoses_like_a_float32_run_of_the_same_seed():
    # Both runs draw the same batches and the same dropout masks (one global generator), so
    # they differ only by bf16 rounding in the forward pass, which Adam turns into steps of
    # lr wherever a gradient is small: single latent dimensions drift (one's Var(mu) halved
    # in 16 steps on a 2-core EPYC) while the split's figures agree. Tolerances, at about twice
    # the differences seen there: the reconstruction terms 1% relative, the KL and the mean
    # Var(mu) over dimensions 15% and 20%, I(x; z) 0.1 nat, and the same active units.
    full, mixed = trained_diagnostics("32"), trained_diagnostics("bf16-mixed")
    # Validation runs outside autocast: its posterior means are float32 (the AU variance too).
    assert mixed.mu.dtype == mixed.logvar.dtype == torch.float32
    for name in ("loss", "recon", "nll", "recon_z0"):
        assert getattr(mixed, name) == pytest.approx(getattr(full, name), rel=1e-2), name
    for name, value in full.branch_recon.items():
        assert mixed.branch_recon[name] == pytest.approx(value, rel=1e-2), name
    assert mixed.kl_raw == pytest.approx(full.kl_raw, rel=0.15)
    assert mixed.mi == pytest.approx(full.mi, abs=0.1)
    var_full = full.mu.var(dim=0, unbiased=False)
    var_mixed = mixed.mu.var(dim=0, unbiased=False)
    assert var_mixed.mean().item() == pytest.approx(var_full.mean().item(), rel=0.2)
    # The same active units, on the same Var(mu) ≥ 0.01 threshold: meaningful because no
    # dimension of either run sits within a factor of 2 of it.
    for variances in (var_full, var_mixed):
        near = (variances > ACTIVE_UNIT_THRESHOLD / 2) & (variances < 2 * ACTIVE_UNIT_THRESHOLD)
        assert not near.any(), variances
    assert active_units(mixed.mu) == active_units(full.mu) > 0


def test_16_mixed_unscales_the_gradients_before_clipping_and_stepping():
    # CPU float16 autocast stands in for CUDA here (resolve_precision refuses it for runs).
    # With SGD the update is lr x the gradient: were the scaled gradients (x 65536) clipped or
    # stepped, the update would be far from the float32 one.
    def update(precision: str) -> torch.Tensor:
        torch.manual_seed(0)
        model = MultiScaleConv1DVAE((300, 3), latent_dim=2, base_channels=4, dropout=0.0)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        before = model.fc_mu.weight.detach().clone()
        x = torch.randn(4, 300, 3)
        step_precision = StepPrecision(Precision(precision, "cpu", "test"))
        # Mean reductions keep the activations' gradients x 65536 within float16's range.
        loss = ElboLoss(reduction="mean", kl_reduction="mean")
        train_step(model, loss, optimizer, x, torch.ones_like(x), 1.0, 0.0, 1e6, step_precision)
        if precision == "16-mixed":
            assert step_precision.scaler.get_scale() == 65536.0  # no overflow, no back-off
        return model.fc_mu.weight.detach() - before

    full, half = update("32"), update("16-mixed")
    assert full.abs().max() > 0
    torch.testing.assert_close(half, full, rtol=0.05, atol=1e-3 * full.abs().max().item())


def test_compiled_is_the_model_itself_unless_asked_and_shares_its_weights():
    model = torch.nn.Linear(3, 2)
    assert compiled(model, False) is model
    wrapped = compiled(model, True)  # compiles lazily, at its first call
    assert wrapped is not model
    assert [p.data_ptr() for p in wrapped.parameters()] == [
        p.data_ptr() for p in model.parameters()
    ]


@pytest.mark.parametrize("precision", ["auto", "32"])
def test_a_run_records_its_precision_and_why(compose_config, tiny, tmp_path, precision):
    cfg = compose_config([*tiny.mlp_run, f"trainer.precision={precision}", "trainer.epochs=1"])
    cfg.evaluation.downstream = False
    train(cfg, tmp_path / "run")
    client = mlflow.MlflowClient(cfg.tracking.uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    (run,) = client.search_runs([experiment.experiment_id])
    expected = resolve_precision(precision, CPU)
    params = run.data.params
    assert params["trainer.precision"] == precision
    assert params["trainer.precision_used"] == expected.name
    assert params["trainer.precision_reason"] == expected.reason
