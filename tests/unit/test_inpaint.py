"""A1111's inpaint options as pure functions: mask blur, crop box, fill, latent fills, paste back."""

from __future__ import annotations

import pytest
import torch

from eridiffusion.inference.inpaint import (
    InpaintOptions,
    crop_box,
    fill_latents,
    fill_masked,
    gaussian_blur,
    prepare,
)


def _square_mask(size: int = 32, lo: int = 12, hi: int = 20) -> torch.Tensor:
    mask = torch.zeros(1, size, size)
    mask[:, lo:hi, lo:hi] = 1
    return mask


def test_blur_keeps_mass_spreads_the_edge_and_reaches_no_further_than_its_kernel() -> None:
    mask = _square_mask()
    blurred = gaussian_blur(mask, 2, 2)
    assert torch.allclose(blurred.sum(), mask.sum(), rtol=1e-4)
    assert 0 < blurred[0, 16, 11] < 1 and 0 < blurred[0, 16, 20] < 1  # soft just outside the square
    radius = int(2.5 * 2 + 0.5)
    assert blurred[0, :, : 12 - radius].abs().max() == 0 and blurred[0, :, 20 + radius :].abs().max() == 0
    only_x = gaussian_blur(mask, 2, 0)
    assert only_x[0, 11, 16] == 0 and only_x[0, 16, 11] > 0  # mask_blur_y 0: no vertical spread


def test_crop_box_pads_widens_to_the_aspect_ratio_and_stays_inside() -> None:
    mask = _square_mask()
    assert crop_box(mask, 0, 32, 32) == (12, 12, 20, 20)
    assert crop_box(mask, 4, 32, 32) == (8, 8, 24, 24)
    assert crop_box(mask, 0, 64, 32) == (8, 12, 24, 20)  # 2:1 output: the box is widened to 16x8
    corner = torch.zeros(1, 32, 32)
    corner[:, :4, :4] = 1
    assert crop_box(corner, 2, 32, 16) == (0, 0, 12, 6)  # widened to 2:1 away from the border
    assert crop_box(torch.zeros(1, 8, 8), 3, 8, 8) is None


def test_fill_takes_the_colour_around_the_mask() -> None:
    image = torch.zeros(3, 32, 32)
    image[0], image[1], image[2] = 0.5, -0.25, 0.75
    mask = _square_mask()
    noisy = image.clone()
    noisy[:, 12:20, 12:20] = torch.rand(3, 8, 8)
    filled = fill_masked(noisy, mask)
    assert torch.allclose(filled, image, atol=1e-5)
    assert torch.equal(fill_masked(noisy, torch.ones(1, 32, 32)), torch.zeros(3, 32, 32))


def test_latent_fills_touch_only_the_masked_latents() -> None:
    x0, noise = torch.ones(1, 4, 8, 8), torch.full((1, 4, 8, 8), 3.0)
    keep = torch.ones(1, 1, 8, 8)
    keep[..., :4] = 0
    noised = fill_latents(x0, noise, keep, InpaintOptions(fill="latent_noise"))
    zeroed = fill_latents(x0, noise, keep, InpaintOptions(fill="latent_nothing"))
    assert (noised[..., :4] == 3).all() and (zeroed[..., :4] == 0).all()
    assert (noised[..., 4:] == 1).all() and (zeroed[..., 4:] == 1).all()
    assert torch.equal(fill_latents(x0, noise, keep, InpaintOptions(fill="fill")), x0)


def test_full_res_plan_crops_scales_and_pastes_only_inside_the_box() -> None:
    image = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    options = InpaintOptions(mask_blur_x=1, mask_blur_y=1, full_res=True, full_res_padding=2)
    plan = prepare(image, _square_mask(), options)
    assert plan.box is not None
    x1, y1, x2, y2 = plan.box
    assert plan.init_image.shape == (3, 32, 32) and plan.mask.shape == (1, 32, 32)
    # the crop fills the whole working image: the mask is far larger there than in the original
    assert plan.mask.mean() > 3 * _square_mask().mean()
    out = plan.paste(torch.full((2, 3, 32, 32), 0.3))
    outside = torch.ones(32, 32, dtype=torch.bool)
    outside[y1:y2, x1:x2] = False
    assert torch.equal(out[:, :, outside], image[None].expand(2, -1, -1, -1)[:, :, outside])
    assert torch.allclose(out[:, :, 16, 16], torch.tensor(0.3))


def test_options_are_checked() -> None:
    with pytest.raises(ValueError, match="fill"):
        InpaintOptions(fill="smudge")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=">= 0"):
        InpaintOptions(mask_blur_x=-1)
