"""SD3.5 and Flux.1 loading, conversion and sampling parity with diffusers, fully offline on tiny presets.

Single files are written in the original layouts (Stability's ``model.diffusion_model.joint_blocks``, BFL's
``double_blocks``/``single_blocks``, LDM VAE keys) by our own export, then loaded back and compared with
the diffusers modules they came from, and with diffusers' own single-file loader where it handles the size.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from accelerate import init_empty_weights
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from diffusers.loaders.single_file_utils import (
    convert_flux_transformer_checkpoint_to_diffusers,
    convert_sd3_transformer_checkpoint_to_diffusers,
    infer_diffusers_model_type,
)
from safetensors.torch import save_file

from eridiffusion.config.schema import ModelConfig
from eridiffusion.inference.generate import GenerateRequest, sample
from eridiffusion.models import build_family, detect_arch, load_family
from eridiffusion.models.flow_common import FlowTransformerFamily, parse_flow_options
from eridiffusion.models.flux import FluxFamily, latent_image_ids, pack_latents, unpack_latents
from eridiffusion.models.ldm_layout import vae_to_ldm
from eridiffusion.models.sd3 import SD3Family
from eridiffusion.models.stable_diffusion import load_preset
from tests.conftest import TINY_OPTIONS

CONFIGS = Path(__file__).parents[2] / "configs"
PROMPTS = ["a red circle", ""]


def _eval(family: FlowTransformerFamily) -> FlowTransformerFamily:
    for m in family.modules().values():
        m.eval()
    return family


@pytest.fixture(scope="module")
def sd3() -> SD3Family:
    return _eval(build_family("sd3", {"preset": "tiny"}, seed=0))


@pytest.fixture(scope="module")
def flux() -> FluxFamily:
    return _eval(build_family("flux", {"preset": "tiny"}, seed=0))


@pytest.fixture(scope="module")
def schnell() -> FluxFamily:
    return _eval(build_family("flux", {"preset": "tiny_schnell"}, seed=0))


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory, sd3: SD3Family, flux: FluxFamily) -> dict[str, Path]:
    """Diffusers folders and single files of the tiny models, written once for the module."""
    root = tmp_path_factory.mktemp("flow")
    paths = {"sd3_dir": root / "sd3", "flux_dir": root / "flux"}
    sd3.save_pretrained(paths["sd3_dir"])
    flux.save_pretrained(paths["flux_dir"])
    paths["sd3_file"] = root / "sd3.safetensors"
    sd3.save_single_file(paths["sd3_file"])
    paths["flux_file"] = root / "flux1-tiny.safetensors"
    flux.save_single_file(paths["flux_file"])
    paths["ae"] = root / "ae.safetensors"  # BFL's VAE file: LDM keys without a prefix
    vae = vae_to_ldm(flux.vae.state_dict(), dict(flux.vae.config))
    save_file(
        {k.removeprefix("first_stage_model."): v.contiguous() for k, v in vae.items()}, str(paths["ae"])
    )
    return paths


def _same_weights(a: FlowTransformerFamily, b: FlowTransformerFamily) -> None:
    assert a.modules().keys() == b.modules().keys()
    for name, module in a.modules().items():
        sa, sb = module.state_dict(), b.modules()[name].state_dict()
        assert sa.keys() == sb.keys(), name
        for key in sa:
            assert torch.equal(sa[key], sb[key]), f"{name}.{key}"


@torch.no_grad()
def _outputs(family: FlowTransformerFamily) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    z = torch.randn(2, *family.latent_shape(32, 32), generator=g)
    return family.predict(z, torch.tensor([150.0, 800.0]), family.encode_prompt(PROMPTS))


# --- diffusers folders --------------------------------------------------------------------------------


@pytest.mark.parametrize(("arch", "pipeline"), [("sd3", StableDiffusion3Pipeline), ("flux", FluxPipeline)])
def test_folder_round_trip_is_exact_and_diffusers_reads_it(
    arch: str, pipeline: type, saved: dict[str, Path], request: pytest.FixtureRequest
) -> None:
    family = request.getfixturevalue(arch)
    folder = saved[f"{arch}_dir"]
    assert detect_arch(folder) == arch
    loaded = _eval(load_family(folder))
    _same_weights(family, loaded)
    assert loaded.options == family.options
    assert loaded.objective.scheduler_config() == family.objective.scheduler_config()
    for name, tok in family.tokenizers.items():
        assert loaded.tokenizers[name](PROMPTS).input_ids == tok(PROMPTS).input_ids
    torch.testing.assert_close(_outputs(loaded), _outputs(family), rtol=0, atol=0)
    pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    assert type(pipe) is pipeline and isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert pipe.scheduler.config.shift == family.objective.shift


def test_load_applies_training_options_but_refuses_a_preset(saved: dict[str, Path]) -> None:
    cfg = ModelConfig(options={"shift": 2.0, "timestep_sampling": "uniform", "loss_weighting": "cosmap"})
    flux = load_family(saved["flux_dir"], cfg)
    assert flux.objective.shift == 2.0 and not flux.objective.dynamic_shift
    assert flux.objective.timestep_sampling == "uniform" and flux.objective.loss_weighting == "cosmap"
    assert flux.default_resolution() == 32  # kept from the saved options
    with pytest.raises(ValueError, match="preset only applies when building from scratch"):
        load_family(saved["sd3_dir"], ModelConfig(options={"preset": "tiny"}))
    with pytest.raises(ValueError, match="model.options.shfit: unknown key"):
        load_family(saved["sd3_dir"], ModelConfig(options={"shfit": 2.0}))
    with pytest.raises(ValueError, match="model.clip_g_path: flux has no such text encoder"):
        load_family(saved["flux_dir"], ModelConfig(clip_g_path=str(saved["flux_dir"])))


def test_tiny_family_still_refuses_options_when_loading(tmp_path: Path) -> None:
    build_family("tiny", TINY_OPTIONS).save_pretrained(tmp_path / "t")
    with pytest.raises(ValueError, match="model.options only applies when building from scratch"):
        load_family(tmp_path / "t", ModelConfig(options={"resolution": 16}))


# --- single files ---------------------------------------------------------------------------------------


def test_sd3_single_file_matches_the_model_and_diffusers_own_loader(
    sd3: SD3Family, saved: dict[str, Path]
) -> None:
    path = saved["sd3_file"]
    assert detect_arch(path) == "sd3" and not FluxFamily.detect(path)
    loaded = _eval(load_family(path))
    _same_weights(sd3, loaded)
    assert loaded.default_resolution() == 32 and loaded.options.t5_max_length == 16  # the matched preset
    torch.testing.assert_close(_outputs(loaded), _outputs(sd3))
    # diffusers' own single-file loaders, given our folder's configs, read the file identically
    theirs = SD3Transformer2DModel.from_single_file(
        str(path), config=str(saved["sd3_dir"]), subfolder="transformer", local_files_only=True
    )
    vae = AutoencoderKL.from_single_file(
        str(path), config=str(saved["sd3_dir"]), subfolder="vae", local_files_only=True
    )
    for ours, other in ((loaded.transformer, theirs), (loaded.vae, vae)):
        assert all(torch.equal(v, other.state_dict()[k]) for k, v in ours.state_dict().items())


def test_sd3_single_file_without_text_encoders_takes_component_paths(
    sd3: SD3Family, saved: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = {k: v for k, v in sd3.to_original_state_dict().items() if not k.startswith("text_encoders.")}
    path = tmp_path / "sd3.5_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    with pytest.raises(ValueError, match=r"has no text_encoder weights .*set model.clip_l_path"):
        load_family(path)
    # diffusers folders as component paths: encoders and their real tokenizer folders, no warning
    folder = str(saved["sd3_dir"])
    with caplog.at_level(logging.WARNING):
        loaded = load_family(path, ModelConfig(clip_l_path=folder, clip_g_path=folder, t5_path=folder))
    assert "does NOT match" not in caplog.text
    _same_weights(sd3, _eval(loaded))
    # ComfyUI-style lone text encoder files (plain transformers names): loaded, with a tokenizer warning
    lone = tmp_path / "clip_g.safetensors"
    te2 = sd3.text_encoders["text_encoder_2"].state_dict()
    save_file({k: v.contiguous() for k, v in te2.items()}, str(lone))
    with caplog.at_level(logging.WARNING):
        loaded = load_family(path, ModelConfig(clip_l_path=folder, clip_g_path=str(lone), t5_path=folder))
    assert "model.clip_g_path" in caplog.text and "does NOT match" in caplog.text
    _same_weights(sd3, _eval(loaded))


def test_flux_bfl_file_with_separate_vae_and_text_encoders(
    flux: FluxFamily, saved: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    path = saved["flux_file"]
    keys = set(flux.to_original_state_dict())
    assert {"img_in.weight", "guidance_in.in_layer.weight", "double_blocks.0.img_attn.qkv.weight"} <= keys
    assert detect_arch(path) == "flux" and not SD3Family.detect(path)
    with pytest.raises(ValueError, match="has no VAE weights .*set model.vae_path"):
        load_family(path)
    folder = str(saved["flux_dir"])
    with caplog.at_level(logging.WARNING):
        loaded = _eval(
            load_family(path, ModelConfig(vae_path=str(saved["ae"]), clip_l_path=folder, t5_path=folder))
        )
    assert "does NOT match" not in caplog.text
    _same_weights(flux, loaded)
    torch.testing.assert_close(_outputs(loaded), _outputs(flux))


def test_flux_comfyui_all_in_one_file_loads_alone(flux: FluxFamily, tmp_path: Path) -> None:
    state = {f"model.diffusion_model.{k}": v for k, v in flux.to_original_state_dict().items()}
    state.update(
        {
            f"vae.{k.removeprefix('first_stage_model.')}": v
            for k, v in vae_to_ldm(flux.vae.state_dict(), dict(flux.vae.config)).items()
        }
    )
    state.update(flux._encoders_to_original())
    path = tmp_path / "flux_aio.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    assert detect_arch(path) == "flux"
    _same_weights(flux, _eval(load_family(path)))


def test_single_file_of_another_size_or_kind_is_a_clear_error(flux: FluxFamily, tmp_path: Path) -> None:
    state = flux.to_original_state_dict()
    state["img_in.weight"] = torch.zeros(8, 64)
    bad = tmp_path / "odd.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(bad))
    with pytest.raises(ValueError, match="matches none of the shipped presets"):
        load_family(bad, ModelConfig(arch="flux"))
    other = tmp_path / "lora.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, str(other))
    with pytest.raises(ValueError, match="cannot tell which model family"):
        load_family(other)
    with pytest.raises(ValueError, match="has no sd3 transformer weights"):
        load_family(bad, ModelConfig(arch="sd3"))


# --- key conversion at the real sizes ------------------------------------------------------------------


def _real_state(cls: type, preset: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A real-size transformer's names and row counts, each tensor one column wide (cheap but exact for
    conversions, which only cut and join rows)."""
    config = load_preset(cls.arch, preset)["transformer"]
    with init_empty_weights(include_buffers=True):
        meta = cls.transformer_class.from_config(config).state_dict()
    g = torch.Generator().manual_seed(0)
    fake = {k: torch.randn(v.shape[0], *([1] if v.dim() > 1 else []), generator=g) for k, v in meta.items()}
    return dict(config), fake


@pytest.mark.parametrize(("preset", "model_type"), [("dev", "flux-dev"), ("schnell", "flux-schnell")])
def test_flux_conversion_equals_diffusers_at_the_release_width(preset: str, model_type: str) -> None:
    config, fake = _real_state(FluxFamily, preset)
    original = FluxFamily.transformer_to_original(fake, config)
    assert ("guidance_in.in_layer.weight" in original) == (preset == "dev")
    theirs = convert_flux_transformer_checkpoint_to_diffusers(dict(original))
    ours = FluxFamily.transformer_from_original(original, config)
    assert theirs.keys() == ours.keys() == fake.keys()
    assert all(torch.equal(theirs[k], fake[k]) and torch.equal(ours[k], fake[k]) for k in fake)
    with init_empty_weights(include_buffers=True):
        meta = FluxTransformer2DModel.from_config(config).state_dict()
    assert infer_diffusers_model_type(FluxFamily.transformer_to_original(meta, config)) == model_type


@pytest.mark.parametrize(("preset", "model_type"), [("medium", "sd35_medium"), ("large", "sd35_large")])
def test_sd3_export_inverts_diffusers_conversion_at_release_sizes(preset: str, model_type: str) -> None:
    config, fake = _real_state(SD3Family, preset)
    original = SD3Family.transformer_to_original(fake, config)
    back = convert_sd3_transformer_checkpoint_to_diffusers(dict(original))
    assert back.keys() == fake.keys() and all(torch.equal(back[k], fake[k]) for k in fake)
    with init_empty_weights(include_buffers=True):
        meta = SD3Transformer2DModel.from_config(config).state_dict()
    prefixed = {
        f"model.diffusion_model.{k}": v for k, v in SD3Family.transformer_to_original(meta, config).items()
    }
    assert infer_diffusers_model_type(prefixed) == model_type


def test_real_presets_have_the_published_sizes() -> None:
    expected = {("sd3", "medium"): 2.24e9, ("sd3", "large"): 8.06e9, ("flux", "dev"): 11.90e9}
    for (arch, name), params in expected.items():
        cls = SD3Family if arch == "sd3" else FluxFamily
        with init_empty_weights(include_buffers=True):
            model = cls.transformer_class.from_config(load_preset(arch, name)["transformer"])
        assert sum(p.numel() for p in model.parameters()) == pytest.approx(params, rel=0.01)


# --- Flux specifics -------------------------------------------------------------------------------------


def test_flux_packing_round_trips_and_matches_diffusers() -> None:
    x = torch.randn(2, 16, 6, 10)
    packed = pack_latents(x)
    assert packed.shape == (2, 15, 64)
    torch.testing.assert_close(packed, FluxPipeline._pack_latents(x, 2, 16, 6, 10), rtol=0, atol=0)
    torch.testing.assert_close(unpack_latents(packed, 6, 10), x, rtol=0, atol=0)
    ids = FluxPipeline._prepare_latent_image_ids(2, 3, 5, torch.device("cpu"), torch.float32)
    torch.testing.assert_close(latent_image_ids(3, 5), ids, rtol=0, atol=0)


def test_guidance_embedding_only_in_dev(flux: FluxFamily, schnell: FluxFamily) -> None:
    assert any(k.startswith("time_text_embed.guidance_embedder") for k in flux.transformer.state_dict())
    assert not any("guidance" in k for k in schnell.transformer.state_dict())
    assert not any(k.startswith("guidance_in") for k in schnell.to_original_state_dict())
    assert schnell.embedded_guidance(3.5, 2) is None
    assert torch.equal(flux.embedded_guidance(3.5, 2)["guidance"], torch.tensor([3.5, 3.5]))
    z = torch.randn(1, *flux.latent_shape(32, 32))
    t = torch.tensor([500.0])
    with torch.no_grad():
        cond = flux.encode_prompt(["a red circle"])
        default = flux.predict(z, t, cond)  # training feeds options.train_guidance = 1.0
        torch.testing.assert_close(default, flux.predict(z, t, {**cond, "guidance": torch.tensor([1.0])}))
        assert not torch.allclose(default, flux.predict(z, t, {**cond, "guidance": torch.tensor([4.0])}))


# --- sampling parity with diffusers' pipelines ---------------------------------------------------------


def _pipeline_images(family: FlowTransformerFamily, guidance: float) -> torch.Tensor:
    parts: dict[str, Any] = {
        "transformer": family.transformer,
        "vae": family.vae,
        "scheduler": FlowMatchEulerDiscreteScheduler(**family.objective.scheduler_config()),
        **family.text_encoders,
        **family.tokenizers,
    }
    cls = StableDiffusion3Pipeline if isinstance(family, SD3Family) else FluxPipeline
    pipe = cls(**parts)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        prompt=["a red circle"],
        height=32,
        width=32,
        num_inference_steps=3,
        guidance_scale=guidance,
        generator=[torch.Generator().manual_seed(5)],
        max_sequence_length=16,
        output_type="pt",
    )
    return out.images


@pytest.mark.parametrize(("arch", "guidance"), [("sd3", 4.0), ("flux", 3.5), ("schnell", 1.0)])
def test_sampling_matches_diffusers_pipelines(
    arch: str, guidance: float, request: pytest.FixtureRequest
) -> None:
    """Same weights and seed: our sampler reproduces StableDiffusion3Pipeline (CFG, shift 3) and
    FluxPipeline (embedded guidance, mu from the token count, sigmas to 1/N)."""
    family = request.getfixturevalue(arch)
    req = GenerateRequest(
        prompts=["a red circle"], steps=3, guidance_scale=guidance, sampler="flow_euler", seed=5
    )
    ours = (sample(family, req, torch.device("cpu")) + 1) / 2
    torch.testing.assert_close(ours, _pipeline_images(family, guidance), rtol=0, atol=2e-4)


def test_sizes_are_checked(sd3: SD3Family, flux: FluxFamily) -> None:
    assert sd3.size_multiple() == 4 and flux.size_multiple() == 4  # tiny VAE factor 2 x 2x2 patches
    with pytest.raises(ValueError, match="width 30 must be a positive multiple of 4 for flux"):
        flux.check_size(32, 30)
    with pytest.raises(ValueError, match="height 68 exceeds this sd3 model's maximum of 64 px"):
        sd3.check_size(68, 32)


def test_adapter_key_names(sd3: SD3Family, flux: FluxFamily) -> None:
    assert sd3.lora_key_names("denoiser", "transformer_blocks.0.attn.to_q") == (
        "lora_transformer_transformer_blocks_0_attn_to_q",
        "transformer.transformer_blocks.0.attn.to_q",
    )
    assert flux.lora_key_names("text_encoder", "encoder.layers.0.self_attn.q_proj") == (
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
    )
    assert sd3.lora_key_names("text_encoder_2", "text_model.encoder.layers.1.mlp.fc1")[0] == (
        "lora_te2_text_model_encoder_layers_1_mlp_fc1"
    )
    assert flux.lora_key_names("text_encoder_2", "encoder.block.0.layer.0.SelfAttention.q")[0] == (
        "lora_te3_encoder_block_0_layer_0_SelfAttention_q"
    )


@pytest.mark.parametrize(
    ("name", "arch"), [("sd35_medium_finetune.yaml", "sd3"), ("flux_dev_finetune.yaml", "flux")]
)
def test_example_config_options_are_valid_for_the_family(name: str, arch: str) -> None:
    data = yaml.safe_load((CONFIGS / name).read_text(encoding="utf-8"))
    assert data["model"]["arch"] == arch
    cls = SD3Family if arch == "sd3" else FluxFamily
    parse_flow_options(cls.options_class, data["model"].get("options", {}))
    assert data["sample"]["sampler"] == "flow_euler"


def test_every_flow_option_is_documented() -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8")
    fields = {*SD3Family.options_class.model_fields, *FluxFamily.options_class.model_fields}
    missing = sorted(k for k in fields if f"`{k}`" not in readme)
    assert not missing, f"README sd3/flux options table lacks: {missing}"
