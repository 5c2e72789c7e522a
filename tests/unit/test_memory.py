"""Memory options give the image generated without them (exactly, or close where the method is approximate),
on tiny SD1.5 / SDXL models; the fp16 VAE rescue turns an overflowing decode into a finite one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from eridiffusion.inference.generate import GenerateRequest, sample
from eridiffusion.inference.generator import Generator
from eridiffusion.inference.memory import (
    MemoryOptions,
    apply_memory_options,
    decode,
    offload_of,
    parse_attention_slicing,
)
from eridiffusion.models import build_family
from eridiffusion.models.protocol import ModelFamily

CPU = torch.device("cpu")


def _family(arch: str) -> ModelFamily:
    return build_family(arch, {"preset": "tiny"}, seed=0)


def _req(size: int = 64, n: int = 2, **kw: object) -> GenerateRequest:
    return GenerateRequest(
        ["a red circle"], steps=2, seed=3, height=size, width=size, images_per_prompt=n, **kw
    )


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def arch(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def reference(arch: str) -> torch.Tensor:
    return sample(_family(arch), _req(), CPU)


def _with(arch: str, options: MemoryOptions) -> torch.Tensor:
    family = _family(arch)
    apply_memory_options(family, options, CPU)
    return sample(family, _req(), CPU, memory=options)


def test_attention_slicing_gives_the_same_image(arch: str, reference: torch.Tensor) -> None:
    for slicing in ("auto", "max", 1):
        assert torch.allclose(_with(arch, MemoryOptions(attention_slicing=slicing)), reference, atol=1e-4)


def test_vae_slicing_decodes_one_image_at_a_time_with_the_same_result(
    arch: str, reference: torch.Tensor
) -> None:
    family = _family(arch)
    calls: list[int] = []
    real = family.decode_latents
    family.decode_latents = lambda z: calls.append(z.shape[0]) or real(z)  # type: ignore[method-assign]
    out = sample(family, _req(), CPU, memory=MemoryOptions(vae_slicing=True))
    assert calls == [1, 1]
    assert torch.allclose(out, reference, atol=1e-5)


def test_cpu_offload_moves_components_in_order_and_changes_nothing(
    arch: str, reference: torch.Tensor
) -> None:
    family = _family(arch)
    apply_memory_options(family, MemoryOptions(cpu_offload=True), CPU)
    offload = offload_of(family)
    assert offload is not None
    out = sample(family, _req(), CPU)
    assert torch.equal(out, reference)
    # text encoders first (positive and negative prompt), then the denoiser, then the VAE
    assert offload.loads[-2:] == ["denoiser", "vae"]
    assert all(name.startswith("text_encoder") for name in offload.loads[:-2])
    assert offload.resident == "vae"
    offload.release()
    assert offload.resident is None
    before = len(offload.loads)
    sample(family, _req(init_image=torch.zeros(3, 64, 64), strength=0.5), CPU)
    loads = offload.loads[before:]
    assert loads[0] == "vae" and loads[-2:] == ["denoiser", "vae"]  # img2img encodes the start first


def test_vae_tiling_on_an_image_larger_than_the_tile_is_close_to_untiled(arch: str) -> None:
    """Tiles are decoded apart and blended, so only structure is compared: same size, same mean colour,
    strongly correlated pixels (a random-weight VAE is far more sensitive to tiling than a trained one)."""
    family = _family(arch)
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    plain = decode(family, z)
    apply_memory_options(family, MemoryOptions(vae_tiling=True, vae_tile_size=64), CPU)
    tiled_calls: list[int] = []
    real = family.vae.tiled_decode  # type: ignore[attr-defined]
    family.vae.tiled_decode = lambda t, **kw: tiled_calls.append(1) or real(t, **kw)  # type: ignore[attr-defined]
    tiled = decode(family, z)
    assert tiled_calls and tiled.shape == plain.shape == (1, 3, 128, 128)
    assert (tiled.mean((2, 3)) - plain.mean((2, 3))).abs().max() < 0.05
    assert torch.corrcoef(torch.stack([tiled.flatten(), plain.flatten()]))[0, 1] > 0.7


def _overflowing_fp16(arch: str) -> ModelFamily:
    family = _family(arch)
    family.vae.half()  # type: ignore[attr-defined]
    family.vae.register_to_config(force_upcast=False)  # type: ignore[attr-defined]
    with torch.no_grad():
        # weights still finite in fp16 (max 65504), but their sums over 36 inputs are not
        weight = family.vae.decoder.conv_in.weight  # type: ignore[attr-defined]
        weight.copy_(weight.sign() * 6e4)
    return family


def test_fp16_vae_overflow_is_decoded_again_in_fp32(arch: str) -> None:
    z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    family = _overflowing_fp16(arch)
    with torch.no_grad():
        assert not torch.isfinite(family.decode_latents(z)).all()
    with pytest.raises(ValueError, match="overflowed"):
        decode(family, z, MemoryOptions(vae_upcast=False))
    out = decode(family, z, MemoryOptions(vae_upcast=True))
    assert torch.isfinite(out).all() and family.vae.dtype == torch.float32  # type: ignore[attr-defined]


def test_memory_options_through_the_generator(tmp_path: Path) -> None:
    _family("sd15").save_pretrained(tmp_path / "m")
    req = _req(n=1)
    plain = Generator({"m": tmp_path / "m"}, device="cpu").generate(req).images[0]
    options = MemoryOptions(attention_slicing="auto", vae_slicing=True, cpu_offload=True)
    gen = Generator({"m": tmp_path / "m"}, device="cpu", memory=options)
    low = gen.generate(req).images[0]
    family = gen.cache.get(tmp_path / "m")
    offload = offload_of(family)
    assert offload is not None and offload.resident is None  # released after the generation
    diff = torch.tensor(list(low.getdata())) - torch.tensor(list(plain.getdata()))
    assert diff.abs().max() <= 1


def test_option_parsing_and_checks() -> None:
    assert parse_attention_slicing("off") is None and parse_attention_slicing("4") == 4
    assert parse_attention_slicing("Auto") == "auto"
    with pytest.raises(ValueError, match="attention slicing"):
        MemoryOptions(attention_slicing="half")
    with pytest.raises(ValueError, match="tile size"):
        MemoryOptions(vae_tile_size=0)
