"""SD1.5 / SDXL: offline loading from diffusers folders and original single files, detection, conditioning.

Every model here is a ``tiny`` preset (the real architectures with a few channels) built with random
weights; single files are written with our diffusers -> original key mapping and must load both with our
loader and with diffusers' own ``from_single_file`` to the same weights.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.loaders.single_file_utils import (
    CHECKPOINT_KEY_NAMES,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    infer_diffusers_model_type,
)
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from eridiffusion.config.schema import ModelConfig
from eridiffusion.models import build_family, detect_arch, load_family
from eridiffusion.models.ldm_layout import (
    clip_to_ldm,
    open_clip_to_ldm,
    to_ldm_state_dict,
    unet_to_ldm,
    vae_to_ldm,
)
from eridiffusion.models.sd15 import SD15Family
from eridiffusion.models.sdxl import SDXLFamily, time_ids
from eridiffusion.models.stable_diffusion import (
    StableDiffusionFamily,
    build_text_model,
    load_preset,
    local_tokenizer,
    objective_from_scheduler,
)

PROMPTS = ["a red circle", ""]
ARCHS = ["sd15", "sdxl"]


def _eval(family: StableDiffusionFamily) -> StableDiffusionFamily:
    for m in family.modules().values():
        m.eval()
    return family


def _tiny(arch: str, seed: int = 0) -> StableDiffusionFamily:
    family = build_family(arch, {"preset": "tiny"}, seed=seed)
    assert isinstance(family, StableDiffusionFamily)
    return _eval(family)


def _inputs(family: StableDiffusionFamily) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand((2, 3, 32, 32), generator=g) * 2 - 1
    latents = torch.randn((2, *family.latent_shape(32, 32)), generator=g)
    return pixels, latents, torch.tensor([10, 700])


@torch.no_grad()
def _outputs(family: StableDiffusionFamily) -> dict[str, torch.Tensor]:
    """Every component's output on fixed inputs: UNet, VAE both ways, each text encoder."""
    pixels, latents, t = _inputs(family)
    ids = torch.arange(16).view(1, 16) % 600
    out = {
        "unet": family.predict(latents, t, family.encode_prompt(PROMPTS)),
        "encode": family.encode_images(pixels),
        "decode": family.decode_latents(latents),
    }
    for name, encoder in family.text_encoders.items():
        out[name] = encoder(ids).last_hidden_state
    return out


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=f"{k} differs")


@pytest.fixture(scope="module", params=ARCHS)
def saved(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, Path]:
    """(arch, diffusers folder, original-layout single file) of one tiny model, written once per arch."""
    arch = request.param
    root = tmp_path_factory.mktemp(arch)
    family = _tiny(arch)
    family.save_pretrained(root / "folder")
    family.save_single_file(root / "model.safetensors")
    return arch, root / "folder", root / "model.safetensors"


# --- diffusers folders ----------------------------------------------------------------------------------


def test_folder_is_a_diffusers_pipeline_and_round_trips(saved: tuple[str, Path, Path]) -> None:
    arch, folder, _ = saved
    index = json.loads((folder / "model_index.json").read_text())
    pipeline = {"sd15": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline}[arch]
    assert index["_class_name"] == pipeline.__name__
    assert detect_arch(folder) == arch
    ours = _eval(load_family(folder))
    assert ours.arch == arch
    _assert_same(_outputs(_tiny(arch)), _outputs(ours))
    # diffusers' own pipeline reads the same folder offline, with the same weights
    pipe = pipeline.from_pretrained(folder, local_files_only=True)
    for name in ("unet", "vae", *ours.text_encoders):
        theirs, mine = (
            getattr(pipe, name).state_dict(),
            ours.modules()["denoiser" if name == "unet" else name].state_dict(),
        )
        assert theirs.keys() == mine.keys()
        assert all(torch.equal(theirs[k], mine[k]) for k in mine)


def test_folder_written_by_diffusers_keeps_its_scheduler_settings(tmp_path: Path) -> None:
    """A v-prediction SD folder as diffusers saves it: betas and prediction type come from its scheduler."""
    family = _tiny("sd15")
    scheduler = EulerDiscreteScheduler(
        beta_start=0.001, beta_end=0.015, beta_schedule="scaled_linear", prediction_type="v_prediction"
    )
    pipe = StableDiffusionPipeline(
        vae=family.vae,
        text_encoder=family.text_encoders["text_encoder"],
        tokenizer=family.tokenizers["tokenizer"],
        unet=family.unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = load_family(tmp_path / "pipe")
    config = loaded.objective.scheduler_config()
    assert config["prediction_type"] == "v_prediction"
    assert (config["beta_start"], config["beta_end"], config["beta_schedule"]) == (
        0.001,
        0.015,
        "scaled_linear",
    )
    override = ModelConfig(name_or_path=str(tmp_path / "pipe"), prediction_type="epsilon")
    assert load_family(tmp_path / "pipe", override).objective.prediction_type == "epsilon"


def test_storage_dtype_applies_to_every_component(saved: tuple[str, Path, Path]) -> None:
    arch, folder, single = saved
    for path in (folder, single):
        family = load_family(path, ModelConfig(name_or_path=str(path), dtype="bf16"))
        assert {m.dtype for m in family.modules().values()} == {torch.bfloat16}
        _, latents, t = _inputs(family)
        with torch.no_grad():
            out = family.predict(latents, t, family.encode_prompt(PROMPTS))
        assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


# --- original single files --------------------------------------------------------------------------------


def test_single_file_has_the_original_key_layout(saved: tuple[str, Path, Path]) -> None:
    arch, _, single = saved
    keys = set(load_file(single))
    expected = {
        "sd15": [
            "model.diffusion_model.input_blocks.0.0.weight",
            "model.diffusion_model.middle_block.1.proj_in.weight",
            "first_stage_model.decoder.up.3.block.0.conv1.weight",
            "first_stage_model.encoder.mid.attn_1.q.weight",
            "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
        ],
        "sdxl": [
            "model.diffusion_model.label_emb.0.0.weight",
            "model.diffusion_model.output_blocks.1.2.conv.weight",  # tiny: 1 resnet per level
            "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
            "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight",
            "conditioner.embedders.1.model.text_projection",
        ],
    }[arch]
    assert not [k for k in expected if k not in keys]
    assert all(
        k.startswith(("model.diffusion_model.", "first_stage_model.", "cond", "conditioner.")) for k in keys
    )


def test_single_file_parity_with_diffusers_classes(
    saved: tuple[str, Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    """Our single-file loader == the same weights loaded by diffusers/transformers from the folder, and
    diffusers' own ``from_single_file`` reads our file to the same UNet and VAE weights."""
    arch, folder, single = saved
    assert detect_arch(single) == arch
    with caplog.at_level(logging.WARNING):
        ours = _eval(load_family(single))
    assert "does NOT match the original CLIP tokenizer" in caplog.text and "clip_l_path" in caplog.text
    unet = UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    vae = AutoencoderKL.from_pretrained(folder / "vae").eval()
    _, latents, t = _inputs(ours)
    with torch.no_grad():
        cond = ours.encode_prompt(PROMPTS)
        added = {}
        if arch == "sdxl":
            added = {
                "added_cond_kwargs": {
                    "text_embeds": cond["pooled"],
                    "time_ids": time_ids((32, 32), (0, 0), (32, 32)).expand(2, 6),
                }
            }
        expected_unet = unet(latents, t, encoder_hidden_states=cond["context"], **added).sample
        torch.testing.assert_close(ours.predict(latents, t, cond), expected_unet, rtol=0, atol=0)
        expected_decode = vae.decode(latents / vae.config.scaling_factor).sample
        torch.testing.assert_close(ours.decode_latents(latents), expected_decode, rtol=0, atol=0)
        ids = torch.arange(16).view(1, 16) % 600
        classes = {"text_encoder": CLIPTextModel, "text_encoder_2": CLIPTextModelWithProjection}
        for name, encoder in ours.text_encoders.items():
            reference = classes[name].from_pretrained(folder / name).eval()
            torch.testing.assert_close(
                encoder(ids, output_hidden_states=True).hidden_states[-2],
                reference(ids, output_hidden_states=True).hidden_states[-2],
                rtol=0,
                atol=0,
            )
    for cls, name, mine in ((UNet2DConditionModel, "unet", ours.unet), (AutoencoderKL, "vae", ours.vae)):
        theirs = cls.from_single_file(str(single), config=str(folder), subfolder=name, local_files_only=True)
        reference = mine.state_dict()
        assert theirs.state_dict().keys() == reference.keys()
        assert all(torch.equal(v, reference[k]) for k, v in theirs.state_dict().items())


def test_single_file_with_component_overrides(
    saved: tuple[str, Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    """``clip_l_path`` / ``clip_g_path`` bring their tokenizers (no warning); ``vae_path`` swaps the VAE."""
    arch, folder, single = saved
    other = _tiny(arch, seed=7)
    other_dir = single.parent / "other"
    if not other_dir.exists():
        other.save_pretrained(other_dir)
    vae_file = single.parent / "vae.safetensors"
    save_file(
        {k: v.contiguous() for k, v in vae_to_ldm(other.vae.state_dict(), dict(other.vae.config)).items()},
        vae_file,
    )
    cfg = ModelConfig(
        name_or_path=str(single),
        vae_path=str(vae_file),
        clip_l_path=str(other_dir),
        clip_g_path=str(other_dir) if arch == "sdxl" else None,
    )
    with caplog.at_level(logging.WARNING):
        family = _eval(load_family(single, cfg))
    assert "does NOT match" not in caplog.text
    mine, theirs = _outputs(family), _outputs(other)
    for name in ("encode", "decode", *family.text_encoders):
        torch.testing.assert_close(mine[name], theirs[name], rtol=0, atol=0)
    # the UNet still comes from the single file
    _, latents, t = _inputs(family)
    with torch.no_grad():
        cond = other.encode_prompt(PROMPTS)
        torch.testing.assert_close(family.predict(latents, t, cond), _tiny(arch).predict(latents, t, cond))
    # a VAE folder works too
    with_vae_folder = load_family(single, ModelConfig(name_or_path=str(single), vae_path=str(other_dir)))
    reference = other.vae.state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in with_vae_folder.vae.state_dict().items())


# --- real-size key layouts (no weights: meta tensors) ---------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "sizes"),
    [
        (SD15Family, {"denoiser": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}),
        (
            SDXLFamily,
            {
                "denoiser": 2_567_463_684,
                "vae": 83_653_863,
                "text_encoder": 123_060_480,
                "text_encoder_2": 694_659_840,
            },
        ),
    ],
    ids=["sd15", "sdxl"],
)
def test_full_presets_are_the_published_architectures(cls: type[StableDiffusionFamily], sizes: dict) -> None:
    """Parameter counts of the real SD1.5 / SDXL base components, and a shape-only forward pass of the
    whole model on the meta device (prompt -> UNet -> VAE decode) at the native resolution."""
    preset = load_preset(cls.arch, "full")
    with torch.device("meta"):
        encoders = {s.module: build_text_model(s, preset[s.module]) for s in cls.text_slots}
        family = cls(
            UNet2DConditionModel.from_config(preset["unet"]),
            AutoencoderKL.from_config(preset["vae"]),
            encoders,
            {s.tokenizer: local_tokenizer(encoders[s.module]) for s in cls.text_slots},
            objective_from_scheduler(preset["scheduler"], None),
        )
    assert {k: sum(p.numel() for p in m.parameters()) for k, m in family.modules().items()} == sizes
    size = {"sd15": 512, "sdxl": 1024}[cls.arch]
    assert family.default_resolution() == size
    with torch.device("meta"):
        cond = family.encode_prompt(["a photo", ""])
        latents = torch.zeros(2, *family.latent_shape(size, size))
        assert latents.shape == (2, 4, size // 8, size // 8)
        assert family.predict(latents, torch.tensor([999, 0]), cond).shape == latents.shape
        assert family.decode_latents(latents).shape == (2, 3, size, size)


@pytest.mark.parametrize(("arch", "kind"), [("sd15", "v1"), ("sdxl", "xl_base")])
def test_full_size_key_mapping_matches_real_checkpoints(arch: str, kind: str) -> None:
    """On the real architectures: our original names are what diffusers recognises as SD1.5/SDXL, and
    diffusers' conversion maps them back to exactly the diffusers names."""
    preset = load_preset(arch, "full")
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(preset["unet"])
        vae = AutoencoderKL.from_config(preset["vae"])
    ldm_unet = unet_to_ldm(unet.state_dict(), preset["unet"])
    ldm_vae = vae_to_ldm(vae.state_dict(), preset["vae"])
    markers = (
        CHECKPOINT_KEY_NAMES[kind]
        if isinstance(CHECKPOINT_KEY_NAMES[kind], list)
        else [CHECKPOINT_KEY_NAMES[kind]]
    )
    unet_markers = [m for m in markers if m.startswith("model.diffusion_model.")]
    assert all(m in ldm_unet for m in unet_markers)
    assert set(convert_ldm_unet_checkpoint(ldm_unet, preset["unet"])) == set(unet.state_dict())
    assert set(convert_ldm_vae_checkpoint(ldm_vae, preset["vae"])) == set(vae.state_dict())
    if arch == "sdxl":
        # SDXL's UNet has 9 input blocks, 3 levels of attention depth [1, 2, 10]
        assert "model.diffusion_model.input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight" in ldm_unet
        assert "model.diffusion_model.output_blocks.2.2.conv.weight" in ldm_unet


def test_full_size_text_encoder_names_match_real_checkpoints() -> None:
    """The original SDXL CLIP-G / SD1.5 CLIP-L names diffusers keys its model detection on."""
    for cls, kind in ((SD15Family, "v1"), (SDXLFamily, "xl_base")):
        preset = load_preset(cls.arch, "full")
        state: dict[str, torch.Tensor] = {}
        for slot in cls.text_slots:
            with init_empty_weights():
                model = build_text_model(slot, preset[slot.module])
            convert = open_clip_to_ldm if slot.open_clip else clip_to_ldm
            state.update(convert(model.state_dict(), slot.ldm_prefix))
        if cls is SDXLFamily:
            assert CHECKPOINT_KEY_NAMES["xl_base"] in state
            assert CHECKPOINT_KEY_NAMES["clip_sdxl"] in state
        else:
            assert CHECKPOINT_KEY_NAMES["clip"] in state
        unet = load_preset(cls.arch, "full")["unet"]
        with init_empty_weights():
            state.update(unet_to_ldm(UNet2DConditionModel.from_config(unet).state_dict(), unet))
        assert infer_diffusers_model_type(state) == kind


# --- detection and errors ---------------------------------------------------------------------------------


def test_detection_and_clear_errors(saved: tuple[str, Path, Path], tmp_path: Path) -> None:
    arch, folder, single = saved
    other = {"sd15": "sdxl", "sdxl": "sd15"}[arch]
    assert detect_arch(folder) == arch and detect_arch(single) == arch
    # a file that is no checkpoint of any family
    stray = tmp_path / "stray.safetensors"
    save_file({"lora_unet_down_blocks_0.lora_down.weight": torch.zeros(2, 2)}, stray)
    with pytest.raises(ValueError, match="cannot tell which model family"):
        load_family(stray)
    with pytest.raises(ValueError, match=r"no model\.diffusion_model\.\* weights"):
        load_family(stray, ModelConfig(name_or_path=str(stray), arch="sd15"))
    # SD2.x (OpenCLIP text encoder under cond_stage_model.model) is neither family
    sd2 = tmp_path / "sd2.safetensors"
    save_file(
        {
            "model.diffusion_model.out.2.weight": torch.zeros(1),
            "cond_stage_model.model.ln_final.weight": torch.zeros(1),
        },
        sd2,
    )
    with pytest.raises(ValueError, match="cannot tell which model family"):
        detect_arch(sd2)
    # the wrong family named explicitly: the weights match none of its presets
    with pytest.raises(ValueError, match=f"no {other} architecture preset|has no text_encoder"):
        load_family(single, ModelConfig(name_or_path=str(single), arch=other))
    not_a_file = tmp_path / "model.ckpt"
    not_a_file.write_bytes(b"pickle")
    with pytest.raises(ValueError, match="neither a diffusers folder nor a .safetensors file"):
        load_family(not_a_file, ModelConfig(name_or_path=str(not_a_file), arch=arch))
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match="not a readable .safetensors file"):
        load_family(corrupt, ModelConfig(name_or_path=str(corrupt), arch=arch))


def test_options_and_component_paths_are_checked() -> None:
    with pytest.raises(
        ValueError, match=r"model\.options\.presett: unknown key; allowed keys here: prediction_type, preset"
    ):
        build_family("sd15", {"presett": "tiny"})
    with pytest.raises(ValueError, match=r"model\.options\.preset"):
        build_family("sdxl", {"preset": "huge"})
    assert (
        build_family("sd15", {"preset": "tiny", "prediction_type": "v_prediction"}).objective.prediction_type
        == "v_prediction"
    )


# --- SDXL conditioning -----------------------------------------------------------------------------------


def test_sdxl_conditioning_shapes_pooled_and_time_ids() -> None:
    family = _tiny("sdxl")
    assert isinstance(family, SDXLFamily)
    with torch.no_grad():
        cond = family.encode_prompt(["a red circle", "a blue square", ""])
    te1, te2 = family.text_encoders["text_encoder"].config, family.text_encoders["text_encoder_2"].config
    assert cond["context"].shape == (3, te1.max_position_embeddings, te1.hidden_size + te2.hidden_size)
    assert cond["context"].shape[-1] == family.unet.config.cross_attention_dim
    assert cond["pooled"].shape == (3, te2.projection_dim)
    # the empty prompt is all zeros (force_zeros_for_empty_prompt), the others are not
    assert not cond["context"][2].any() and not cond["pooled"][2].any()
    assert cond["context"][0].abs().sum() > 0 and cond["pooled"][0].abs().sum() > 0
    # time ids: original size, crop top-left, target size; the default is the generated size, no crop
    ids = time_ids((48, 40), (4, 2), (32, 32))
    assert ids.tolist() == [48, 40, 4, 2, 32, 32]
    cfg = family.unet.config
    assert (
        len(ids) * cfg.addition_time_embed_dim + te2.projection_dim
        == cfg.projection_class_embeddings_input_dim
    )
    _, latents, t = _inputs(family)
    cond = {k: v[:2] for k, v in cond.items()}
    with torch.no_grad():
        default = family.predict(latents, t, cond)
        explicit = family.predict(
            latents, t, {**cond, "time_ids": time_ids((32, 32), (0, 0), (32, 32)).expand(2, 6)}
        )
        cropped = family.predict(latents, t, {**cond, "time_ids": ids.expand(2, 6)})
    torch.testing.assert_close(default, explicit, rtol=0, atol=0)
    assert not torch.allclose(default, cropped)


def test_lora_key_names_follow_kohya() -> None:
    sd15, sdxl = _tiny("sd15"), _tiny("sdxl")
    assert sd15.lora_key_names("denoiser", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q") == (
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    )
    assert sd15.lora_key_names("text_encoder", "encoder.layers.0.mlp.fc1") == (
        "lora_te_text_model_encoder_layers_0_mlp_fc1",
        "text_encoder.text_model.encoder.layers.0.mlp.fc1",
    )
    # SDXL: kohya uses the original UNet's block names (tiny: layers_per_block 1 -> input_blocks 2k+1)
    assert sdxl.lora_key_names("denoiser", "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k")[
        0
    ] == ("lora_unet_input_blocks_3_1_transformer_blocks_1_attn2_to_k")
    assert (
        sdxl.lora_key_names("denoiser", "mid_block.attentions.0.proj_in")[0]
        == "lora_unet_middle_block_1_proj_in"
    )
    assert sdxl.lora_key_names("text_encoder", "encoder.layers.1.self_attn.q_proj")[0] == (
        "lora_te1_text_model_encoder_layers_1_self_attn_q_proj"
    )
    assert sdxl.lora_key_names("text_encoder_2", "text_model.encoder.layers.1.self_attn.q_proj")[0] == (
        "lora_te2_text_model_encoder_layers_1_self_attn_q_proj"
    )


def test_whole_model_ldm_state_covers_every_weight() -> None:
    for arch in ARCHS:
        family = _tiny(arch)
        n_weights = sum(len(m.state_dict()) for m in family.modules().values())
        state = to_ldm_state_dict(family)
        # CLIP-G's q/k/v fuse into one in_proj per layer (weight and bias): 4 fewer tensors per layer
        fused = 4 * family.text_encoders["text_encoder_2"].config.num_hidden_layers if arch == "sdxl" else 0
        assert len(state) == n_weights - fused
