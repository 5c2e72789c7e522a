"""ControlNet on the tiny SD1.5 / SDXL presets: residuals reach the UNet only when and where they should,
sampling matches diffusers' ControlNet pipeline, and loading from folders and single files is offline."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import (
    ControlNetModel,
    FluxControlNetModel,
    SD3ControlNetModel,
    StableDiffusionControlNetPipeline,
)
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from eridiffusion.inference.controlnet import ControlUnit, control_active
from eridiffusion.inference.generate import GenerateRequest, initial_noise, sample
from eridiffusion.inference.samplers import make_scheduler
from eridiffusion.models import build_family
from eridiffusion.models.flow_common import FlowTransformerFamily
from eridiffusion.models.ldm_layout import unet_key_to_ldm
from eridiffusion.models.sd3 import SD3Family
from eridiffusion.models.stable_diffusion import StableDiffusionFamily
from tests.conftest import TINY_OPTIONS


def tiny_sd(arch: str) -> StableDiffusionFamily:
    family = build_family(arch, {"preset": "tiny"}, seed=0)
    assert isinstance(family, StableDiffusionFamily)
    for m in family.modules().values():
        m.eval()
    return family


def random_controlnet(family: StableDiffusionFamily, seed: int = 0) -> ControlNetModel:
    """A ControlNet copied from the UNet whose zero-initialised layers (the zero convolutions and the
    control image embedding's last conv) are random, so the control image changes the output."""
    net = ControlNetModel.from_unet(family.unet)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.startswith(
                ("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding")
            ):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return net.eval()


def control_image(seed: int = 0, size: int = 32) -> torch.Tensor:
    """A control image as the request takes it: (3, H, W) in [-1, 1]."""
    return torch.rand((3, size, size), generator=torch.Generator().manual_seed(seed)) * 2 - 1


def request(*units: ControlUnit, steps: int = 3) -> GenerateRequest:
    return GenerateRequest(
        prompts=["a red circle"],
        steps=steps,
        guidance_scale=4.0,
        sampler="ddim",
        seed=5,
        controls=list(units),
    )


def run(
    family: StableDiffusionFamily, req: GenerateRequest, net: ControlNetModel | None = None
) -> torch.Tensor:
    return sample(family, req, torch.device("cpu"), controlnets={"cn": net} if net is not None else None)


@pytest.fixture(scope="module")
def sd15() -> StableDiffusionFamily:
    return tiny_sd("sd15")


def test_control_window_counts_steps_like_diffusers() -> None:
    assert [control_active(i, 4, 0.0, 1.0) for i in range(4)] == [True] * 4
    assert [control_active(i, 4, 0.25, 0.75) for i in range(4)] == [False, True, True, False]
    assert not any(control_active(i, 4, 0.5, 0.5) for i in range(4))


def test_unit_follows_an_inpainting_crop() -> None:
    image = control_image(size=32)
    torch.testing.assert_close(
        ControlUnit("cn", image).cropped((8, 4, 24, 20), (32, 32)).image, image[:, 4:20, 8:24]
    )
    small = ControlUnit("cn", control_image(size=16)).cropped((0, 0, 16, 32), (32, 32))
    assert small.image.shape == (3, 32, 16)  # resized to the full output first, then cut


def test_zero_scale_and_fresh_controlnet_change_nothing(sd15: StableDiffusionFamily) -> None:
    plain = run(sd15, request())
    fresh = ControlNetModel.from_unet(sd15.unet).eval()  # zero convolutions: residuals are exactly 0
    torch.testing.assert_close(run(sd15, request(ControlUnit("cn", control_image())), fresh), plain)
    trained = random_controlnet(sd15)
    zero = ControlUnit("cn", control_image(), scale=0.0)
    torch.testing.assert_close(run(sd15, request(zero), trained), plain, rtol=0, atol=0)


def test_controlnet_and_its_image_steer_the_output(sd15: StableDiffusionFamily) -> None:
    net = random_controlnet(sd15)
    plain = run(sd15, request())
    a = run(sd15, request(ControlUnit("cn", control_image(0))), net)
    b = run(sd15, request(ControlUnit("cn", control_image(1))), net)
    assert (a - plain).abs().max() > 1e-3
    assert (a - b).abs().max() > 1e-3
    # a control image at another size is resized to the output size
    big = torch.nn.functional.interpolate(control_image(0)[None], size=(64, 64), mode="nearest")[0]
    assert run(sd15, request(ControlUnit("cn", big)), net).shape == a.shape


def test_guidance_window(sd15: StableDiffusionFamily) -> None:
    net = random_controlnet(sd15)
    plain = run(sd15, request(steps=4))
    never = ControlUnit("cn", control_image(), guidance_start=0.5, guidance_end=0.5)
    torch.testing.assert_close(run(sd15, request(never, steps=4), net), plain, rtol=0, atol=0)
    always = run(sd15, request(ControlUnit("cn", control_image()), steps=4), net)
    # DDIM's last step (t = 0) ignores the model on SD's schedule, so the late window holds two steps
    late = run(sd15, request(ControlUnit("cn", control_image(), guidance_start=0.5), steps=4), net)
    assert (late - plain).abs().max() > 1e-4 and (late - always).abs().max() > 1e-4
    with pytest.raises(ValueError, match="0 <= start <= end <= 1"):
        run(sd15, request(ControlUnit("cn", control_image(), guidance_start=0.8, guidance_end=0.2)), net)


def test_two_units_add_up(sd15: StableDiffusionFamily) -> None:
    """Two half-weight units of one ControlNet and image are one full-weight unit (residuals add)."""
    net = random_controlnet(sd15)
    full = run(sd15, request(ControlUnit("cn", control_image())), net)
    halves = run(
        sd15, request(ControlUnit("cn", control_image(), 0.5), ControlUnit("cn", control_image(), 0.5)), net
    )
    torch.testing.assert_close(halves, full, rtol=0, atol=1e-5)


def test_sampling_matches_diffusers_controlnet_pipeline(sd15: StableDiffusionFamily) -> None:
    """Same weights, scheduler, noise and control image: our txt2img with a ControlNet (CFG on both
    halves, scale and guidance window) reproduces StableDiffusionControlNetPipeline."""
    net = random_controlnet(sd15)
    image = control_image(3)
    req = request(ControlUnit("cn", image, scale=0.7, guidance_start=0.0, guidance_end=0.75), steps=4)
    ours = (run(sd15, req, net) + 1) / 2
    pipe = StableDiffusionControlNetPipeline(
        vae=sd15.vae,
        text_encoder=sd15.text_encoders["text_encoder"],
        tokenizer=sd15.tokenizers["tokenizer"],
        unet=sd15.unet,
        controlnet=net,
        scheduler=make_scheduler("ddim", sd15.objective.scheduler_config()),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    cond, uncond = sd15.encode_prompt(["a red circle"]), sd15.encode_prompt([""])
    theirs = pipe(
        prompt_embeds=cond["context"],
        negative_prompt_embeds=uncond["context"],
        image=((image + 1) / 2)[None],
        height=32,
        width=32,
        num_inference_steps=4,
        guidance_scale=4.0,
        controlnet_conditioning_scale=0.7,
        control_guidance_start=0.0,
        control_guidance_end=0.75,
        latents=initial_noise(sd15.latent_shape(32, 32), [5]),
        output_type="pt",
    ).images
    torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-4)


def test_sdxl_controlnet_runs_with_size_conditioning() -> None:
    sdxl = tiny_sd("sdxl")
    net = random_controlnet(sdxl)
    plain = run(sdxl, request(steps=2))
    out = run(sdxl, request(ControlUnit("cn", control_image()), steps=2), net)
    assert out.shape == plain.shape == (1, 3, 32, 32)
    assert torch.isfinite(out).all() and (out - plain).abs().max() > 1e-3


def test_loading_folder_and_single_file(sd15: StableDiffusionFamily, tmp_path: Path) -> None:
    net = random_controlnet(sd15)
    net.save_pretrained(tmp_path / "cn")
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "cn.safetensors"))
    expected = run(sd15, request(ControlUnit("cn", control_image())), net)
    for source in (tmp_path / "cn", tmp_path / "cn.safetensors"):
        loaded = sd15.load_controlnet(source)
        torch.testing.assert_close(run(sd15, request(ControlUnit("cn", control_image())), loaded), expected)


def test_clear_errors(sd15: StableDiffusionFamily, tmp_path: Path) -> None:
    net = random_controlnet(sd15)
    tiny = build_family("tiny", TINY_OPTIONS, seed=0)
    with pytest.raises(ValueError, match="tiny has no ControlNet support"):
        sample(tiny, request(ControlUnit("cn", control_image(size=16))), controlnets={"cn": net})
    with pytest.raises(ValueError, match="'cn' was not loaded"):
        run(sd15, request(ControlUnit("cn", control_image())))
    with pytest.raises(ValueError, match=r"control image must be \(3, H, W\)"):
        run(sd15, request(ControlUnit("cn", control_image()[:1])), net)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sd15.load_controlnet(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        sd15.load_controlnet(tmp_path / "empty")
    Image.new("RGB", (4, 4)).save(tmp_path / "x.png")
    with pytest.raises(ValueError, match="neither a diffusers folder nor a .safetensors"):
        sd15.load_controlnet(tmp_path / "x.png")
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, str(tmp_path / "lora.safetensors"))
    with pytest.raises(ValueError, match="holds no ControlNet weights"):
        sd15.load_controlnet(tmp_path / "lora.safetensors")
    # an SD1.5 ControlNet on SDXL
    net.save_pretrained(tmp_path / "sd15cn")
    with pytest.raises(ValueError, match="made for another base model"):
        tiny_sd("sdxl").load_controlnet(tmp_path / "sd15cn")


# --- transformer ControlNets (SD3, Flux) ------------------------------------------------------------------


def flow_controlnet(family: FlowTransformerFamily, seed: int = 0) -> nn.Module:
    """A one-block ControlNet for a tiny SD3 / Flux transformer, zero-initialised layers made random."""
    config = dict(family.transformer.config)
    if isinstance(family, SD3Family):
        net = SD3ControlNetModel.from_config({**config, "num_layers": 1, "extra_conditioning_channels": 0})
        random_prefixes: tuple[str, ...] = ("controlnet_blocks", "pos_embed_input")
    else:
        net = FluxControlNetModel.from_config({**config, "num_layers": 1, "num_single_layers": 1})
        random_prefixes = ("controlnet_blocks", "controlnet_single_blocks", "controlnet_x_embedder")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.startswith(random_prefixes):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return net.eval()


@pytest.mark.parametrize("arch", ["sd3", "flux"])
def test_transformer_controlnets(arch: str, tmp_path: Path) -> None:
    family = build_family(arch, {"preset": "tiny"}, seed=0)
    assert isinstance(family, FlowTransformerFamily)
    for m in family.modules().values():
        m.eval()
    net = flow_controlnet(family)

    def flow(*units: ControlUnit, controlnet: nn.Module = net) -> torch.Tensor:
        req = GenerateRequest(
            prompts=["a red circle"], steps=2, sampler="flow_euler", seed=5, controls=list(units)
        )
        return sample(family, req, torch.device("cpu"), controlnets={"cn": controlnet})

    plain = flow()
    torch.testing.assert_close(flow(ControlUnit("cn", control_image(), scale=0.0)), plain, rtol=0, atol=0)
    a, b = flow(ControlUnit("cn", control_image(0))), flow(ControlUnit("cn", control_image(1)))
    assert (a - plain).abs().max() > 1e-3 and (a - b).abs().max() > 1e-3
    net.save_pretrained(tmp_path / "cn")
    loaded = family.load_controlnet(tmp_path / "cn")
    torch.testing.assert_close(flow(ControlUnit("cn", control_image(0)), controlnet=loaded), a)
    with pytest.raises(ValueError, match="loads from a diffusers folder"):
        family.load_controlnet(tmp_path / "cn" / "diffusion_pytorch_model.safetensors")
    random_controlnet(tiny_sd("sd15")).save_pretrained(tmp_path / "unet_cn")
    with pytest.raises(ValueError, match="is a ControlNetModel, not a"):
        family.load_controlnet(tmp_path / "unet_cn")


def _to_original_layout(net: ControlNetModel, unet_config: dict) -> dict[str, torch.Tensor]:
    """A diffusers ControlNet in the original ``control_model.*`` layout A1111's extension loads (the
    UNet encoder under its original names, ``zero_convs``, ``middle_block_out``, ``input_hint_block``)."""
    out = {}
    for key, value in net.state_dict().items():
        if key.startswith("controlnet_down_blocks."):
            i, param = key.split(".")[1:]
            new = f"zero_convs.{i}.0.{param}"
        elif key.startswith("controlnet_mid_block."):
            new = f"middle_block_out.0.{key.split('.')[-1]}"
        elif key.startswith("controlnet_cond_embedding."):
            part, param = key.removeprefix("controlnet_cond_embedding.").rsplit(".", 1)
            fixed = {"conv_in": 0, "conv_out": 14}
            index = fixed[part] if part in fixed else 2 * (int(part.split(".")[1]) + 1)
            new = f"input_hint_block.{index}.{param}"
        else:
            new = unet_key_to_ldm(key, unet_config)
        out[f"control_model.{new}"] = value.contiguous()
    return out


def test_single_file_in_the_original_layout(sd15: StableDiffusionFamily, tmp_path: Path) -> None:
    net = random_controlnet(sd15)
    save_file(_to_original_layout(net, dict(sd15.unet.config)), str(tmp_path / "control_tiny.safetensors"))
    loaded = sd15.load_controlnet(tmp_path / "control_tiny.safetensors")
    theirs = loaded.state_dict()
    for key, value in net.state_dict().items():
        torch.testing.assert_close(theirs[key], value, rtol=0, atol=0, msg=key)
