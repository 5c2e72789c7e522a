"""EriDiffusion: train and serve image diffusion models from one YAML config."""

__version__ = "0.1.0"
