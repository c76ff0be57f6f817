"""Every conf/model/*.yaml: composes, builds its model, and spells out the class defaults."""

import inspect
import re

import pytest
import torch
from hydra.utils import execution_whitelist, instantiate
from omegaconf import OmegaConf

from vaelab.models.conv3d import Conv3DVAE
from vaelab.models.conv_lstm import ConvLSTMVAE
from vaelab.models.lstm import LSTMVAE
from vaelab.models.mlp import MLPVAE
from vaelab.models.multiscale_conv1d import MultiScaleConv1DVAE
from vaelab.models.vqvae import VQVAE

pytestmark = pytest.mark.usefixtures("one_thread")

VOLUME = (4, 32, 32, 32)  # seed 004's four modalities, shrunk from 128³ for the CPU

# Each config group option with its class and a sample shape small enough for one CPU forward.
CONFIGS = {
    "mlp": (MLPVAE, (20,)),
    "multiscale_conv1d": (MultiScaleConv1DVAE, (300, 3)),
    "lstm": (LSTMVAE, (40, 3)),
    "conv_lstm": (ConvLSTMVAE, (256, 4)),
    "conv3d": (Conv3DVAE, VOLUME),
    "vqvae": (VQVAE, (40, 1)),
}


def test_every_model_config_is_tested(conf_dir) -> None:
    assert {path.stem for path in (conf_dir / "model").glob("*.yaml")} == set(CONFIGS)


@pytest.mark.parametrize("option", list(CONFIGS))
def test_yaml_composes_builds_and_matches_class_defaults(compose_config, option: str) -> None:
    torch.manual_seed(0)
    cls, shape = CONFIGS[option]
    cfg = compose_config([f"model={option}"])
    with execution_whitelist(["vaelab.*"]):
        model = instantiate(cfg.model, input_shape=shape)
    assert type(model) is cls and model.input_shape == shape
    # The YAML spells out every argument, with the class's own default, so that building from
    # code and from config give the same model.
    keys = OmegaConf.to_container(cfg.model)
    keys.pop("_target_")
    params = inspect.signature(cls).parameters
    assert set(keys) == set(params) - {"input_shape"}
    for key, value in keys.items():
        default = params[key].default
        assert value == (list(default) if isinstance(default, tuple) else default), key
    out = model.eval()(torch.randn(1, *shape))
    assert out.recon.shape == (1, *shape) and out.mu.shape == (1, model.latent_dim)


@pytest.mark.parametrize("option", list(CONFIGS))
def test_yaml_comments_every_key(conf_dir, option: str) -> None:
    lines = (conf_dir / "model" / f"{option}.yaml").read_text().splitlines()
    assert lines[0].startswith("#")  # the header naming the paper or seed
    for i, line in enumerate(lines):
        if re.match(r"^[a-z_]+:", line) and not line.startswith("_target_"):
            assert "  # " in line or lines[i - 1].startswith("#"), line
