"""A sphere in four dimensions whose search space is partly set in Python: z depends on x,
and w is a key the config does not have (suggested as `+w`, appended to each job's config)."""

import hydra
from omegaconf import DictConfig
from optuna.trial import Trial


# Hydra 1.4 instantiates hydra.sweeper.custom_search_space only when the app trusts it.
@hydra.main(
    config_path="custom-search-space",
    config_name="config",
    execution_whitelist="__main__.configure",
)
def four_dimensional_sphere(cfg: DictConfig) -> float:
    """w² + x² + y² + z²."""
    return cfg.w**2 + cfg.x**2 + cfg.y**2 + cfg.z**2


def configure(cfg: DictConfig, trial: Trial) -> None:
    """hydra.sweeper.custom_search_space: z within max_z_difference_from_x of x, w in [0, 1]."""
    x = trial.params["x"]
    spread = cfg.max_z_difference_from_x
    trial.suggest_float("z", x - spread, x + spread)
    trial.suggest_float("+w", 0.0, 1.0)


if __name__ == "__main__":
    four_dimensional_sphere()
