"""The sphere x² + y², minimised by the plugin tests; `error=true` makes every job fail."""

import hydra
from omegaconf import DictConfig


@hydra.main(config_path="conf", config_name="config")
def sphere(cfg: DictConfig) -> float:
    """x² + y², or the failure the failure-rate test looks for."""
    if cfg.error:
        raise RuntimeError("cfg.error is True")
    return cfg.x**2 + cfg.y**2


if __name__ == "__main__":
    sphere()
