"""Fine-tuning (seed 003's second stage): trainer.init_from, trainer.freeze and class-weighted
sampling, through the real `train` on tiny data, and the conv_lstm_finetune experiment."""

from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from vaelab.artifacts import load_initial_weights
from vaelab.config import build
from vaelab.data.base import SampleSet
from vaelab.data.prepare import prepare
from vaelab.errors import ConfigError
from vaelab.loop import class_balanced_weights, epoch_batches, freeze, trainable_parameters
from vaelab.models.conv_lstm import ConvLSTMVAE
from vaelab.models.mlp import MLPVAE
from vaelab.train import train

CONF = Path(__file__).resolve().parents[1] / "conf"
# A tiny MLP run with BatchNorm in every hidden block; no end-of-run report (not tested here).
QUICK = [
    "trainer.device=cpu",
    "trainer.patience=null",
    "trainer.batch_size=8",
    "trainer.precision=32",
    "dataset=vitals_synthetic",
    "dataset.n_patients=24",
    "dataset.seq_len=48",
    "model=mlp",
    "model.hidden_dims=[16,8]",
    "model.latent_dim=4",
    "evaluation.downstream=false",
    "evaluation.iwae_samples=0",
]
PRETRAIN_COMMAND = "python -m vaelab.train experiment=conv_lstm_vitals run_name=conv_lstm_pretrain"

pytestmark = pytest.mark.usefixtures("one_thread")


def compose_train(root: Path, overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF)):
        return compose("train", overrides=[f"paths.output_root={root}", *overrides])


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """One tiny finished MLP run named `pretrain`: its root, config and best checkpoint."""
    base = tmp_path_factory.mktemp("pretrain")
    cfg = compose_train(base / "multirun", [*QUICK, "trainer.epochs=1", "run_name=pretrain"])
    train(cfg, base / "run")
    return cfg, base / "run" / "checkpoints" / "model.pt"


def checkpoint_model(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model"]


def test_frozen_blocks_stay_bit_identical_through_train_while_the_rest_trains(pretrained, tmp_path):
    _, start = pretrained
    cfg = compose_train(
        tmp_path / "multirun",
        [*QUICK, "trainer.epochs=2", f"trainer.init_from={start}", "trainer.freeze=[encoder.0.*]"],
    )
    train(cfg, tmp_path / "run")
    before = checkpoint_model(start)
    after = checkpoint_model(tmp_path / "run" / "checkpoints" / "last.pt")
    frozen = [key for key in before if key.startswith("encoder.0.")]
    # Linear + BatchNorm: weights, and the running statistics too (the block stays in eval)
    assert {"encoder.0.0.weight", "encoder.0.1.running_mean", "encoder.0.1.running_var"} <= set(
        frozen
    )
    for key in frozen:
        assert torch.equal(before[key], after[key]), key
    trained = [
        k for k in before if not k.startswith("encoder.0.") and before[k].is_floating_point()
    ]
    for key in trained:
        assert not torch.equal(before[key], after[key]), key  # weights and BN statistics moved

    client = mlflow.MlflowClient(cfg.tracking.uri)
    (run,) = client.search_runs([client.get_experiment_by_name("vaelab").experiment_id])
    n_frozen = sum(before[k].numel() for k in ("encoder.0.0.weight", "encoder.0.0.bias"))
    n_frozen += sum(before[k].numel() for k in ("encoder.0.1.weight", "encoder.0.1.bias"))
    params = run.data.params
    assert int(params["model.n_frozen_parameters"]) == n_frozen
    total = int(params["model.n_parameters"])
    assert int(params["model.n_trainable_parameters"]) == total - n_frozen
    assert params["init.source"] == run.data.tags["init.source"] == str(start.resolve())


def test_init_from_a_checkpoint_or_a_run_reproduces_the_pretrained_weights(pretrained):
    cfg, path = pretrained
    saved = checkpoint_model(path)
    config = OmegaConf.create(torch.load(path, weights_only=True)["config"]["model"])
    for source in (str(path), "run_name:pretrain"):
        torch.manual_seed(123)  # other initial weights than the pretrained run's
        model = build(config, input_shape=(48, 7))
        assert not torch.equal(model.state_dict()["fc_mu.weight"], saved["fc_mu.weight"])
        loaded = load_initial_weights(model, source, cfg.tracking.uri)
        state = model.state_dict()
        assert state.keys() == saved.keys()
        assert all(torch.equal(state[key], saved[key]) for key in saved), source
    assert loaded.run_name == "pretrain" and loaded.epoch == 0
    client = mlflow.MlflowClient(cfg.tracking.uri)
    assert client.get_run(loaded.run_id).info.run_name == "pretrain"
    # The run's id names the same checkpoint.
    by_id = load_initial_weights(
        build(config, input_shape=(48, 7)), loaded.run_id, cfg.tracking.uri
    )
    assert by_id.source == f"runs:/{loaded.run_id}/checkpoints/model.pt"
    assert by_id.run_name == "pretrain"


def test_init_from_refuses_a_checkpoint_of_another_shape_naming_the_keys(pretrained):
    cfg, path = pretrained
    wider = MLPVAE((48, 7), latent_dim=5, hidden_dims=(16, 8))
    with pytest.raises(ConfigError) as err:
        load_initial_weights(wider, str(path), cfg.tracking.uri)
    message = str(err.value)
    assert "fc_mu.weight (4, 8) -> (5, 8)" in message and "fc_logvar.bias (4,) -> (5,)" in message
    assert "MLPVAE" in message
    other = ConvLSTMVAE((48, 7), latent_dim=4, lstm_hidden=8)
    with pytest.raises(ConfigError, match="missing from the checkpoint: encoder_conv.0.weight"):
        load_initial_weights(other, str(path), cfg.tracking.uri)


def test_init_from_names_what_is_missing(pretrained, tmp_path):
    cfg, _ = pretrained
    model = MLPVAE((48, 7), latent_dim=4, hidden_dims=(16, 8))
    uri = cfg.tracking.uri
    with pytest.raises(ConfigError, match="no checkpoint file at .*nowhere/model.pt"):
        load_initial_weights(model, str(tmp_path / "nowhere" / "model.pt"), uri)
    with pytest.raises(ConfigError, match="MLflow run id.*no such run"):
        load_initial_weights(model, "0123456789abcdef0123456789abcdef", uri)
    with pytest.raises(ConfigError) as err:
        load_initial_weights(model, "run_name:conv_lstm_pretrain", uri, PRETRAIN_COMMAND)
    assert str(err.value).endswith(f"Record it first: {PRETRAIN_COMMAND}")
    assert "no FINISHED run named 'conv_lstm_pretrain'" in str(err.value)
    # No store at all: the same message, and no empty store made on the way.
    missing = f"sqlite:///{tmp_path}/elsewhere/mlflow.db"
    with pytest.raises(ConfigError, match="no FINISHED run named 'pretrain'"):
        load_initial_weights(model, "run_name:pretrain", missing)
    assert not (tmp_path / "elsewhere" / "mlflow.db").exists()
    assert load_initial_weights(model, None, uri) is None


def test_freeze_matches_parameter_names_and_keeps_frozen_batchnorm_in_eval():
    torch.manual_seed(0)
    model = MLPVAE((6,), latent_dim=2, hidden_dims=(8, 4))
    frozen, trainable = freeze(model, ["encoder.0.*"])
    assert frozen == 8 * 6 + 8 + 8 + 8  # Linear(6 -> 8) and BatchNorm1d(8): weight and bias
    assert trainable == sum(p.numel() for p in model.parameters()) - frozen
    names = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert names == {
        "encoder.0.0.weight",
        "encoder.0.0.bias",
        "encoder.0.1.weight",
        "encoder.0.1.bias",
    }
    optimised = {id(p) for p in trainable_parameters(model, torch.nn.Module())}
    assert optimised == {id(p) for p in model.parameters() if p.requires_grad}

    frozen_bn, trained_bn = model.encoder[0][1], model.encoder[1][1]
    stats = frozen_bn.running_mean.clone(), trained_bn.running_mean.clone()
    model.train()
    model(torch.randn(16, 6) * 3 + 1)
    assert not model.encoder[0].training and model.encoder[1].training
    assert torch.equal(frozen_bn.running_mean, stats[0])
    assert not torch.equal(trained_bn.running_mean, stats[1])


def test_freeze_refuses_a_pattern_that_matches_nothing_and_freezing_everything():
    model = MLPVAE((6,), latent_dim=2, hidden_dims=(8,))
    with pytest.raises(ConfigError) as err:
        freeze(model, ["encoder.*", "encoder_conv.*"])
    assert "['encoder_conv.*'] match no parameter of MLPVAE" in str(err.value)
    assert "top-level modules are encoder, fc_mu, fc_logvar, decoder" in str(err.value)
    freeze(model, ["*"])
    with pytest.raises(ConfigError, match="froze every parameter"):
        trainable_parameters(model, torch.nn.Module())


def labelled(labels: np.ndarray) -> SampleSet:
    n = len(labels)
    ids = np.array([f"s{i:04d}" for i in range(n)])
    values = np.random.default_rng(0).normal(size=(n, 3)).astype(np.float32)
    return SampleSet(values, None, ids, ids, ["a", "b", "c"], labels=labels, source="labelled")


def test_class_weighted_batches_draw_a_90_10_set_in_equal_proportions():
    labels = np.array([0] * 900 + [1] * 100)
    data = prepare(labelled(labels), 0.1, 0.1, seed=0)
    train_index = data.indices("train")
    train_labels = torch.as_tensor(labels)[train_index]
    assert 0.07 < train_labels.float().mean() < 0.13  # the training split keeps the imbalance
    weights = class_balanced_weights(data)
    assert len(weights) == len(train_index)
    counts = torch.bincount(train_labels)
    assert torch.allclose(weights, 1.0 / counts[train_labels].float())

    torch.manual_seed(0)
    drawn = torch.cat([b for _ in range(20) for b in epoch_batches(train_index, 50, weights)])
    share = torch.as_tensor(labels)[drawn].float().mean().item()
    # 20 epochs of 800 draws: the share of class 1 has sd 0.5 / sqrt(16000) = 0.004
    assert abs(share - 0.5) < 0.02, share
    assert len(drawn.unique()) < len(drawn)  # with replacement: the minority class repeats
    torch.manual_seed(0)
    uniform = torch.cat([b for _ in range(20) for b in epoch_batches(train_index, 50)])
    assert abs(torch.as_tensor(labels)[uniform].float().mean().item() - 0.1) < 0.03
    torch.manual_seed(0)
    again = torch.cat([b for _ in range(20) for b in epoch_batches(train_index, 50, weights)])
    assert torch.equal(again, drawn)  # the global generator's seed fixes the draws


def test_class_weighted_sampling_needs_labels():
    samples = labelled(np.zeros(40, dtype=int))
    samples.labels = None
    with pytest.raises(
        ConfigError, match="class_weighted_sampling=true needs class labels, and labelled"
    ):
        class_balanced_weights(prepare(samples, 0.1, 0.1, seed=0))


def test_conv_lstm_finetune_is_seed_003s_second_stage(compose_config):
    cfg = compose_config(["experiment=conv_lstm_finetune"])
    pre = compose_config(["experiment=conv_lstm_vitals"])
    assert cfg.model == pre.model and cfg.loss == pre.loss  # the pre-trained weights fit
    assert cfg.dataset.window == pre.dataset.window
    t = cfg.trainer
    assert t.init_from == "run_name:conv_lstm_pretrain"
    assert t.init_from_command == PRETRAIN_COMMAND
    assert list(t.freeze) == ["encoder_conv.*", "decoder_conv.*"]
    assert t.class_weighted_sampling is True
    assert (t.epochs, t.batch_size, t.lr, t.patience, t.min_delta) == (50, 16, 1e-4, 10, 0.001)
    assert cfg.tracking.experiment == "conv_lstm_finetune"
    # A sweep of it keeps the latent size the pre-trained weights have.
    swept = compose_config(
        ["experiment=conv_lstm_finetune", "hparams_search=collapse"], return_hydra_config=True
    )
    assert str(swept.hydra.sweeper.params["model.latent_dim"]) == "32"


def test_conv_lstm_finetune_runs_from_the_pretrained_run_by_name(compose_config, tmp_path):
    tiny = [
        "trainer.epochs=1",
        "trainer.patience=null",
        "trainer.device=cpu",
        "trainer.precision=32",
        "dataset.n_patients=8",
        "dataset.hours=0.25",
        "trainer.batch_size=8",
        "model.lstm_hidden=8",
        "evaluation.downstream=false",
        "evaluation.iwae_samples=0",
    ]
    finetune = compose_config(["experiment=conv_lstm_finetune", *tiny])
    with pytest.raises(ConfigError, match=f"Record it first: {PRETRAIN_COMMAND}$"):
        train(finetune, tmp_path / "too_early")

    pretrain = compose_config(["experiment=conv_lstm_vitals", "run_name=conv_lstm_pretrain", *tiny])
    train(pretrain, tmp_path / "pretrain")
    train(finetune, tmp_path / "finetune")

    client = mlflow.MlflowClient(finetune.tracking.uri)
    (pre_run,) = client.search_runs(
        [client.get_experiment_by_name("conv_lstm_vitals").experiment_id]
    )
    runs = client.search_runs(
        [client.get_experiment_by_name("conv_lstm_finetune").experiment_id],
        order_by=["attributes.start_time DESC"],
    )
    assert [r.info.status for r in runs] == ["FINISHED", "FAILED"]
    tags, params = runs[0].data.tags, runs[0].data.params
    assert tags["init.run_id"] == params["init.run_id"] == pre_run.info.run_id
    assert tags["init.run_name"] == "conv_lstm_pretrain"
    conv = {"encoder_conv.0.weight", "encoder_conv.2.bias", "decoder_conv.0.weight"}
    before = checkpoint_model(tmp_path / "pretrain" / "checkpoints" / "model.pt")
    after = checkpoint_model(tmp_path / "finetune" / "checkpoints" / "last.pt")
    assert all(torch.equal(before[key], after[key]) for key in conv)  # frozen
    assert not torch.equal(before["encoder_lstm.weight_hh_l0"], after["encoder_lstm.weight_hh_l0"])
    n_conv = sum(
        v.numel() for k, v in before.items() if k.startswith(("encoder_conv", "decoder_conv"))
    )
    assert int(params["model.n_frozen_parameters"]) == n_conv
