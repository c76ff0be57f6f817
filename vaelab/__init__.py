"""vaelab: Hydra-driven sweeps for variational autoencoders that do not collapse."""

__version__ = "0.1.0"
