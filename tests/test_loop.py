"""The pieces of the training loop: the batch a training split trains with, the shuffled batches
of an epoch, one optimiser step, and early stopping."""

import functools
import logging

import pytest
import torch

from vaelab.errors import ConfigError, DivergenceError
from vaelab.loop import EarlyStopping, TrainerSettings, compiled, epoch_batches, train_step
from vaelab.losses import ElboLoss
from vaelab.models.mlp import MLPVAE


def settings(**overrides) -> TrainerSettings:
    return TrainerSettings(optimizer=functools.partial(torch.optim.Adam, lr=1e-3), **overrides)


def test_a_split_smaller_than_the_batch_trains_several_steps_an_epoch(caplog):
    # 56 training samples at batch 64 used to be one optimiser step an epoch.
    with caplog.at_level(logging.WARNING, logger="vaelab.loop"):
        batch = settings(batch_size=64).batch_size_for(56)
    assert batch == 14
    assert len(epoch_batches(torch.arange(56), batch)) == 4
    assert "56 samples" in caplog.text and "batches of 14" in caplog.text


def test_a_split_of_many_batches_keeps_the_configured_batch(caplog):
    with caplog.at_level(logging.WARNING, logger="vaelab.loop"):
        assert settings(batch_size=64).batch_size_for(1257) == 64
    assert caplog.text == ""


@pytest.mark.parametrize(("n_train", "batch"), [(3, 2), (7, 2), (9, 2), (40, 10)])
def test_the_batch_never_drops_below_two(n_train, batch):
    assert settings(batch_size=64).batch_size_for(n_train) == batch


def test_min_steps_per_epoch_must_be_positive():
    with pytest.raises(ConfigError, match="min_steps_per_epoch"):
        settings(min_steps_per_epoch=0)


def test_epoch_batches_cover_the_split_once_without_a_batch_of_one():
    torch.manual_seed(0)
    batches = epoch_batches(torch.arange(100, 133), 8)  # 33 samples: 4 batches, 1 left over
    assert [len(b) for b in batches] == [8, 8, 8, 8]
    drawn = torch.cat(batches)
    assert len(set(drawn.tolist())) == 32 and set(drawn.tolist()) <= set(range(100, 133))


def test_one_train_step_changes_the_weights_and_a_nan_loss_stops_before_it():
    torch.manual_seed(0)
    model = MLPVAE((6,), latent_dim=2, hidden_dims=(8,))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.randn(8, 6)
    before = [p.detach().clone() for p in model.parameters()]
    terms = train_step(model, ElboLoss(), optimizer, x, torch.ones_like(x), 1.0, 0.5, 5.0)
    assert torch.isfinite(terms.total)
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    after = [p.detach().clone() for p in model.parameters()]
    x[0, 0] = torch.nan
    with pytest.raises(DivergenceError, match="training loss became nan at epoch 1.50"):
        train_step(model, ElboLoss(), optimizer, x, torch.ones_like(x), 1.0, 1.5, 5.0)
    assert all(torch.equal(a, p) for a, p in zip(after, model.parameters(), strict=True))


def test_early_stopping_counts_epochs_without_a_better_loss():
    stopping = EarlyStopping(patience=2)
    improved = [stopping.update(epoch, loss) for epoch, loss in enumerate([3.0, 2.0, 2.5, 2.1])]
    assert improved == [True, True, False, False]
    assert stopping.best_epoch == 1 and stopping.should_stop
    never = EarlyStopping(patience=None)
    for epoch in range(50):
        never.update(epoch, 1.0)
    assert not never.should_stop


def test_an_improvement_no_larger_than_min_delta_counts_as_none():
    # Seed 003: min_delta=0.001; here 0.1 so the figures read plainly.
    stopping = EarlyStopping(patience=2, min_delta=0.1)
    assert stopping.update(0, 1.0)
    assert not stopping.update(1, 0.95)  # 0.05 better: not enough
    assert stopping.best_epoch == 0 and stopping.best_loss == 1.0
    assert stopping.update(2, 0.85)  # 0.15 better than the best, 1.0: counts, resets patience
    assert (stopping.best_epoch, stopping.epochs_without_improvement) == (2, 0)
    assert not stopping.update(3, 0.76) and not stopping.update(4, 0.75)  # 0.09, then 0.10
    assert stopping.should_stop and stopping.best_epoch == 2
    # min_delta 0 keeps any decrease an improvement, as before
    plain = EarlyStopping(patience=1)
    assert plain.update(0, 1.0) and plain.update(1, 0.9999)


def test_min_delta_must_not_be_negative():
    with pytest.raises(ConfigError, match="trainer.min_delta must be ≥ 0, got -0.1"):
        settings(min_delta=-0.1)


def test_freeze_takes_a_list_of_patterns_or_one():
    assert settings(freeze="encoder_conv.*").freeze == ["encoder_conv.*"]
    assert settings(freeze=("a.*", "b")).freeze == ["a.*", "b"]
    assert settings().freeze == []


def test_epoch_batches_with_weights_draw_with_replacement_in_proportion():
    torch.manual_seed(0)
    index = torch.arange(10, 14)
    weights = torch.tensor([0.0, 1.0, 1.0, 2.0])  # sample 10 never, 13 twice as often
    drawn = torch.cat([b for _ in range(500) for b in epoch_batches(index, 2, weights)])
    counts = torch.bincount(drawn - 10, minlength=4)
    assert len(drawn) == 2000 and counts[0] == 0
    assert counts[3] / counts[1] == pytest.approx(2.0, rel=0.1)


@pytest.mark.slow
def test_a_compiled_train_step_trains_like_the_eager_one():
    # trainer.compile: the same step through torch.compile (inductor compiles C++ on the CPU,
    # ~20 s for this model, hence slow). fallback_random: the compiled code draws z from
    # torch's own generator, as eager does, rather than from inductor's. SGD, not Adam: Adam's
    # first steps move a parameter by ±lr whatever its gradient, so the rounding noise of a
    # bias before BatchNorm (gradient ~0) would flip its step.
    def two_steps(compile_model: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = MLPVAE((6,), latent_dim=2, hidden_dims=(8,))
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
        x = torch.randn(8, 6)
        step_model = compiled(model, compile_model)
        for epoch in (0.0, 0.5):
            train_step(step_model, ElboLoss(), optimizer, x, torch.ones_like(x), 1.0, epoch, 5.0)
        return [p.detach().clone() for p in model.parameters()]

    with torch._inductor.config.patch(fallback_random=True):
        weights = two_steps(True)
    for eager, compiled_weights in zip(two_steps(False), weights, strict=True):
        torch.testing.assert_close(compiled_weights, eager, rtol=1e-4, atol=1e-5)
