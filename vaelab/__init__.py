"""vaelab: Hydra-driven sweeps for variational autoencoders that do not collapse."""

# Registers the ${vaelab.bundled:...} config resolver before any config is composed.
from vaelab import config  # noqa: F401

__version__ = "0.1.0"
