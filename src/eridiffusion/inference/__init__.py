"""Sampling: sampler registry, txt2img and PNG metadata."""
