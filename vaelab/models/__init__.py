"""VAE models: plain nn.Modules built by `instantiate(cfg.model, input_shape=...)`."""
