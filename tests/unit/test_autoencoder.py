"""Autoencoder objective pieces: discriminator, hinge loss, latent scale calibration, tiny AE option."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image

from eridiffusion.models import build_family
from eridiffusion.training.autoencoder import (
    AutoencoderLossConfig,
    PatchDiscriminator,
    calibration_latents,
    discriminator_loss,
    generator_loss,
    latent_channel_statistics,
    latent_scaling_factor,
)
from tests.conftest import TINY_OPTIONS


def _vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8,
        latent_channels=4,
    )


def test_patch_discriminator_gives_one_logit_per_patch() -> None:
    disc = PatchDiscriminator(channels=8, layers=2)
    assert disc(torch.zeros(3, 3, 32, 32)).shape == (3, 1, 8, 8)


def test_hinge_loss_values() -> None:
    class Const(PatchDiscriminator):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean(dim=(1, 2, 3), keepdim=True)

    disc = Const(channels=8)
    real, fake = torch.full((2, 3, 4, 4), 2.0), torch.full((2, 3, 4, 4), -0.5)
    loss, metrics = discriminator_loss(disc, real, fake)
    # real logit 2 -> relu(1-2)=0 ; fake logit -0.5 -> relu(1-0.5)=0.5 ; mean of the two halves
    assert loss.item() == pytest.approx(0.25)
    assert float(metrics["d_real"]) == pytest.approx(2.0) and float(metrics["d_fake"]) == pytest.approx(-0.5)


def test_generator_loss_adds_adversarial_term_only_after_disc_start() -> None:
    vae, disc = _vae(), PatchDiscriminator(channels=8)
    pixels = torch.rand(2, 3, 16, 16) * 2 - 1
    cfg = AutoencoderLossConfig(kl_weight=1e-6, disc_weight=0.5, disc_start=3)
    before, recon, m0 = generator_loss(vae, pixels, disc, 2, cfg, torch.Generator().manual_seed(0))
    assert "g_adv" not in m0 and recon.shape == pixels.shape and not recon.requires_grad
    after, _, m1 = generator_loss(vae, pixels, disc, 3, cfg, torch.Generator().manual_seed(0))
    assert after.item() == pytest.approx(before.item() + 0.5 * float(m1["g_adv"]), rel=1e-5)
    assert float(m0["rec_loss"]) == pytest.approx(float(m1["rec_loss"]))


def test_mse_weight_adds_the_squared_error_to_the_reconstruction_loss() -> None:
    vae = _vae()
    pixels = torch.rand(2, 3, 16, 16) * 2 - 1
    l1_only = AutoencoderLossConfig(kl_weight=0.0)
    with_mse = AutoencoderLossConfig(kl_weight=0.0, mse_weight=2.0)
    _, recon, m0 = generator_loss(vae, pixels, None, 0, l1_only, torch.Generator().manual_seed(0))
    _, _, m1 = generator_loss(vae, pixels, None, 0, with_mse, torch.Generator().manual_seed(0))
    mse = torch.nn.functional.mse_loss(recon, pixels).item()
    assert float(m1["rec_loss"]) == pytest.approx(float(m0["rec_loss"]) + 2.0 * mse, rel=1e-5)


def test_latent_scaling_factor_whitens_latents() -> None:
    vae = _vae()
    pixels = torch.rand(4, 3, 16, 16) * 2 - 1
    latents = calibration_latents(vae, [pixels[:2], pixels[2:]])  # batch by batch, same as all at once
    with torch.no_grad():
        assert torch.allclose(latents, vae.encode(pixels).latent_dist.mean, atol=1e-6)
    scale = latent_scaling_factor(latents)
    assert (latents * scale).std().item() == pytest.approx(1.0, rel=1e-4)


def test_channel_statistics_standardise_each_channel_and_tiny_reads_them() -> None:
    fam = build_family("tiny", {**TINY_OPTIONS, "latent": "autoencoder", "vae_channels": [16, 32]}, seed=0)
    assert fam.vae is not None
    pixels = torch.rand(6, 3, 16, 16) * 2 - 1
    latents = calibration_latents(fam.vae, [pixels])
    mean, std = latent_channel_statistics(latents)
    fam.vae.register_to_config(scaling_factor=1.0, latents_mean=mean, latents_std=std)
    with torch.no_grad():
        z = fam.encode_images(pixels)
        assert torch.allclose(z.mean(dim=(0, 2, 3)), torch.zeros(len(mean)), atol=1e-5)
        assert torch.allclose(z.std(dim=(0, 2, 3)), torch.ones(len(mean)), atol=1e-4)
        # decoding undoes the standardisation: the same image as decoding the raw posterior mean
        assert torch.allclose(fam.decode_latents(z), fam.vae.decode(latents).sample, atol=1e-5)


def test_tiny_autoencoder_option_encodes_to_latents_and_back() -> None:
    fam = build_family("tiny", {**TINY_OPTIONS, "latent": "autoencoder", "vae_channels": [16, 32]}, seed=0)
    assert set(fam.modules()) == {"denoiser", "text_encoder", "vae"}
    assert fam.latent_shape(16, 16) == (4, 8, 8) and fam.size_multiple() == 4
    with torch.no_grad():
        z = fam.encode_images(torch.zeros(1, 3, 16, 16))
        assert fam.decode_latents(z).shape == (1, 3, 16, 16)
    with pytest.raises(ValueError, match="multiple of 8"):  # 2^(3 vae levels - 1) x 2^(2 UNet levels - 1)
        build_family(
            "tiny",
            {**TINY_OPTIONS, "resolution": 20, "latent": "autoencoder", "vae_channels": [16, 16, 32]},
            seed=0,
        )


def test_reconstruction_eval_of_a_lossless_codec_scores_what_the_sources_score(tmp_path: Path) -> None:
    """Packed pixels round-trip exactly, so the reconstructions score the same as the sources, error 0."""
    from eridiffusion.data.shapes import caption_for, render_shape, sample_specs
    from eridiffusion.inference.evaluate import evaluate_reconstructions

    fam = build_family("tiny", {**TINY_OPTIONS, "resolution": 32}, seed=0)
    specs = sample_specs(12, seed=0)
    pixels = (
        torch.stack(
            [torch.from_numpy(np.asarray(render_shape(s, 32), dtype=np.float32)) for s in specs]
        ).permute(0, 3, 1, 2)
        / 127.5
        - 1
    )
    report = evaluate_reconstructions(fam, pixels, [caption_for(s) for s in specs], tmp_path)
    assert report["mse"] == 0.0
    assert report["colour_accuracy"] == report["source_images"]["colour"] == 1.0
    assert report["shape_accuracy"] == report["source_images"]["shape"]
    assert json.loads((tmp_path / "eval.json").read_text())["n"] == 12
    grid = Image.open(tmp_path / "eval_grid.png")
    assert grid.size == (8 * 64, 4 * 64)  # 12 images in rows of 8: sources, reconstructions, twice
