"""Shared by the LoRA interoperability tests: tiny models of every family and one denoiser call."""

from __future__ import annotations

import torch

from eridiffusion.models import ModelFamily, build_family
from tests.conftest import TINY_OPTIONS


def eval_family(family: ModelFamily) -> ModelFamily:
    for module in family.modules().values():
        module.eval()
    return family


def tiny_family(arch: str) -> ModelFamily:
    """The tiny preset of ``arch`` (the tiny family's test options), in eval mode, seed 0."""
    return eval_family(build_family(arch, TINY_OPTIONS if arch == "tiny" else {"preset": "tiny"}, seed=0))


@torch.no_grad()
def denoise(family: ModelFamily) -> torch.Tensor:
    """One fixed denoiser prediction at the family's default size, prompts through the text encoders."""
    size = family.default_resolution()
    g = torch.Generator().manual_seed(3)
    z = torch.randn(2, *family.latent_shape(size, size), generator=g)
    t = torch.tensor([150.0, 800.0]) if family.arch in ("flux", "sd3") else torch.tensor([150, 800])
    return family.predict(z, t, family.encode_prompt(["a red circle", "a blue square"]))
