"""Files shipped inside the package, named in configs as ${vaelab.bundled:<file name>}.

A config cannot name a file in the package by a path relative to where the user runs: the
resolver turns the bare name into the absolute path of vaelab/data/bundled/<name>, which is
what the resolved config, the MLflow params and the checkpoint then record.
"""

from pathlib import Path

from omegaconf import OmegaConf

from vaelab.errors import ConfigError

BUNDLED_DIR = Path(__file__).resolve().parent / "data" / "bundled"


def bundled_path(name: str) -> str:
    """The absolute path of the bundled file `name`; ConfigError naming the ones there are."""
    path = BUNDLED_DIR / name
    if Path(name).name != name or not path.is_file():
        there = sorted(p.name for p in BUNDLED_DIR.iterdir() if p.name != "README.md")
        raise ConfigError(f"${{vaelab.bundled:{name}}}: no such bundled file; there are {there}")
    return str(path)


# omegaconf 2.4 (with Hydra 1.4) deprecates register_new_resolver for this name.
OmegaConf.register_resolver("vaelab.bundled", bundled_path, replace=True)
