"""Two objectives to minimise together (Binh and Korn 1997): a Pareto front to find."""

import hydra
from omegaconf import DictConfig


@hydra.main(config_path="multi-objective-conf", config_name="config")
def binh_and_korn(cfg: DictConfig) -> tuple[float, float]:
    """4x² + 4y² and (x − 5)² + (y − 5)²."""
    return 4 * cfg.x**2 + 4 * cfg.y**2, (cfg.x - 5) ** 2 + (cfg.y - 5) ** 2


if __name__ == "__main__":
    binh_and_korn()
