"""What SD1.5 and SDXL share: UNet + KL autoencoder + CLIP text encoder(s), loaded offline.

A family here is a :class:`StableDiffusionFamily` subclass that only says what differs (its text encoders
and how their outputs condition the UNet). Everything else lives once in this module:

* **presets** -- real-size and ``tiny`` component configs shipped as package data
  (``presets/<arch>_<name>.json``), so a single ``.safetensors`` file loads with no hub access and tests
  build the real architectures with a few channels;
* **latent space** -- ``(z - shift) * scaling_factor`` of the VAE posterior mean (the mean, not a sample,
  so a training step stays a pure function of its seeded generator);
* **objective** -- DDPM with SD's betas (``scaled_linear`` 0.00085..0.012, our ``quadratic``), eps or v;
* **loading** -- a local diffusers folder (``model_index.json``), or a single file in the original LDM/SGM
  layout converted with diffusers' own ``convert_ldm_*`` functions, with ``vae_path`` / ``clip_l_path`` /
  ``clip_g_path`` replacing components;
* **saving** -- a diffusers folder (what :func:`eridiffusion.models.load_family` and diffusers pipelines
  read) and, via :func:`to_ldm_state_dict`, a single file in the original layout (what A1111, ComfyUI and
  kohya read), the reverse of diffusers' conversion.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import diffusers
import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from pydantic import BaseModel, ConfigDict
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from eridiffusion.config.schema import ModelConfig
from eridiffusion.models.controlnet import load_unet_controlnet, pack_unet_residuals, unet_residual_kwargs
from eridiffusion.models.ldm_layout import LDM_UNET_PREFIX, LDM_VAE_PREFIX, to_ldm_state_dict
from eridiffusion.models.objectives import BETA_SCHEDULES, DDPMObjective
from eridiffusion.models.options import parse_model_options
from eridiffusion.models.prompt_chunks import chunk_count, chunked_ids
from eridiffusion.models.prompts import PromptLimit
from eridiffusion.models.protocol import (
    Conditioning,
    module_device,
    module_dtype,
    require_size_multiple,
    underscored_lora_names,
)
from eridiffusion.models.quantize import quantised_layers
from eridiffusion.models.streamed_loading import assign_weights, load_pretrained, read_single_file
from eridiffusion.models.token_ids import token_ids
from eridiffusion.models.tokenizer import build_tokenizer

logger = logging.getLogger(__name__)

STORAGE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TextModel = CLIPTextModel | CLIPTextModelWithProjection
M = TypeVar("M", bound=nn.Module)


# --- presets and options ------------------------------------------------------------------------------


def preset_names(arch: str) -> list[str]:
    """Presets shipped for ``arch`` (``full``, ``tiny``...)."""
    folder = resources.files("eridiffusion.models") / "presets"
    return sorted(p.name[len(arch) + 1 : -5] for p in folder.iterdir() if p.name.startswith(f"{arch}_"))


def load_preset(arch: str, name: str) -> dict[str, Any]:
    """Component configs of one preset: ``unet``, ``vae``, ``text_encoder``[``_2``], ``scheduler``."""
    path = resources.files("eridiffusion.models") / "presets" / f"{arch}_{name}.json"
    if not path.is_file():
        raise ValueError(
            f"model.options.preset: {arch} has no preset {name!r}; choose one of {preset_names(arch)}"
        )
    return json.loads(path.read_text(encoding="utf-8"))


class SDOptions(BaseModel):
    """``model.options`` of sd15/sdxl when building from scratch (random init)."""

    model_config = ConfigDict(extra="forbid")

    preset: Literal["full", "tiny"] = "full"
    prediction_type: Literal["epsilon", "v_prediction"] | None = None


def parse_sd_options(options: dict[str, Any], where: str = "model.options") -> SDOptions:
    """Validate ``model.options``; errors name the YAML path like the main config loader does."""
    return parse_model_options(SDOptions, options, where)


def objective_from_scheduler(config: dict[str, Any], prediction_type: str | None) -> DDPMObjective:
    """Our DDPM objective from a diffusers scheduler config (or a preset's), with an optional override.
    The timestep spacing comes from the config too (what diffusers' pipeline would use on the folder);
    a preset (single files) names none and gets SD's own convention, "leading" with offset 1."""
    ours = {v: k for k, v in BETA_SCHEDULES.items()}
    schedule = config.get("beta_schedule", "quadratic")
    if schedule not in BETA_SCHEDULES:
        if schedule not in ours:
            raise ValueError(
                f"unsupported scheduler beta_schedule {schedule!r}; expected one of {sorted(ours)}"
            )
        schedule = ours[schedule]
    return DDPMObjective(
        schedule,
        prediction_type or config.get("prediction_type", "epsilon"),
        num_train_timesteps=int(config.get("num_train_timesteps", 1000)),
        beta_start=float(config.get("beta_start", 0.00085)),
        beta_end=float(config.get("beta_end", 0.012)),
        timestep_spacing=str(config.get("timestep_spacing", "leading")),
        steps_offset=int(config.get("steps_offset", 1)),
    )


# --- text encoder slots ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TextSlot:
    """One text encoder of a family and every place it can come from."""

    module: str
    """Component name in a diffusers folder and in :meth:`StableDiffusionFamily.modules`."""
    tokenizer: str
    model_class: type[TextModel]
    override: Literal["clip_l_path", "clip_g_path"]
    """The ``model.*`` key that replaces this encoder (and its tokenizer)."""
    ldm_prefix: str
    """Key prefix in an original single file."""
    open_clip: bool
    """True when the single file stores it in OpenCLIP's layout (fused qkv, ``resblocks``)."""


def _text_config(config: dict[str, Any]) -> CLIPTextConfig:
    return CLIPTextConfig.from_dict(
        {k: v for k, v in config.items() if k not in ("architectures", "model_type")}
    )


def build_text_model(slot: TextSlot, config: dict[str, Any]) -> TextModel:
    return slot.model_class(_text_config(config))


def _clip_from_ldm(
    slot: TextSlot, state: dict[str, torch.Tensor], model: TextModel
) -> dict[str, torch.Tensor]:
    """diffusers' own conversion of a single file's text encoder, then this transformers version's names."""
    if slot.open_clip:
        out = convert_open_clip_checkpoint(model, state, prefix=slot.ldm_prefix)
    else:
        out = convert_ldm_clip_checkpoint({k: v for k, v in state.items() if k.startswith(slot.ldm_prefix)})
    return match_text_keys(out, model)


def match_text_keys(state: dict[str, torch.Tensor], model: TextModel) -> dict[str, torch.Tensor]:
    """``text_model.``-prefixed or flat CLIP keys -> what ``model`` expects; drops the ``position_ids``
    buffer old checkpoints carry (it is not a weight)."""
    wrapped = hasattr(model, "text_model")
    out = {}
    for key, value in state.items():
        if key.endswith("position_ids"):
            continue
        flat = key.removeprefix("text_model.")
        out[f"text_model.{flat}" if wrapped and not flat.startswith("text_projection") else flat] = value
    return out


# --- the family -------------------------------------------------------------------------------------------


class VAELatents:
    """Latent encoding shared by the AutoencoderKL families (SD1.5/SDXL and SD3/Flux): posterior mean,
    then the VAE's own shift and scale. Subclasses provide ``vae`` and ``_vae_for_use()`` (the VAE on the
    device it should run on)."""

    vae: AutoencoderKL

    def _vae_for_use(self) -> AutoencoderKL:
        raise NotImplementedError

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """The VAE is never trained, so no graph is kept through it."""
        vae = self._vae_for_use()
        posterior = vae.encode(pixels.to(device=module_device(vae), dtype=module_dtype(vae))).latent_dist
        shift = self.vae.config.get("shift_factor") or 0.0
        return ((posterior.mean - shift) * self.vae.config.scaling_factor).float()

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self._vae_for_use()
        shift = self.vae.config.get("shift_factor") or 0.0
        z = latents / self.vae.config.scaling_factor + shift
        return vae.decode(z.to(device=module_device(vae), dtype=module_dtype(vae))).sample.float()


class StableDiffusionFamily(VAELatents):
    """UNet + VAE + CLIP text encoder(s); subclasses add ``encode_prompt`` / ``predict`` specifics."""

    arch: ClassVar[str]
    pipeline_class: ClassVar[str]
    """diffusers pipeline class written to / recognised in ``model_index.json``."""
    text_slots: ClassVar[tuple[TextSlot, ...]]
    ldm_marker: ClassVar[str]
    """A key prefix only this family's single files have."""

    def __init__(
        self,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        text_encoders: dict[str, TextModel],
        tokenizers: dict[str, CLIPTokenizer],
        objective: DDPMObjective,
        pipeline_config: dict[str, Any] | None = None,
    ) -> None:
        self.unet = unet
        self.vae = vae
        self.text_encoders = text_encoders
        self.tokenizers = tokenizers
        self.objective = objective
        self.pipeline_config = dict(pipeline_config or {})
        self._chunking = False
        """Set by :meth:`chunked_prompts`: long prompts are encoded in chunks instead of cut."""

    # construction ---------------------------------------------------------------------------------------
    @classmethod
    def build(cls, options: dict[str, Any], seed: int = 0) -> StableDiffusionFamily:
        """Random-initialised model of a preset; ``seed`` makes the initial weights reproducible.

        The tokenizer is a genuine ``CLIPTokenizer`` built locally (the real CLIP vocabulary cannot be
        downloaded here); it is saved with the model so a trained model keeps its own tokenizer.
        """
        opts = parse_sd_options(options)
        preset = load_preset(cls.arch, opts.preset)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            unet = UNet2DConditionModel.from_config(preset["unet"])
            vae = AutoencoderKL.from_config(preset["vae"])
            encoders = {s.module: build_text_model(s, preset[s.module]) for s in cls.text_slots}
        tokenizers = {s.tokenizer: local_tokenizer(encoders[s.module]) for s in cls.text_slots}
        objective = objective_from_scheduler(preset["scheduler"], opts.prediction_type)
        return cls(unet, vae, encoders, tokenizers, objective)

    @classmethod
    def load(cls, path: Path, cfg: ModelConfig) -> StableDiffusionFamily:
        """A local diffusers folder or original single file, plus component overrides; fully offline."""
        dtype = STORAGE_DTYPES[cfg.dtype]
        if cfg.clip_g_path and "clip_g_path" not in {s.override for s in cls.text_slots}:
            raise ValueError(f"model.clip_g_path: {cls.arch} has no CLIP-G text encoder; remove the key")
        if cfg.t5_path:
            raise ValueError(f"model.t5_path: {cls.arch} has no T5 text encoder; remove the key")
        overrides = {s.module: getattr(cfg, s.override) for s in cls.text_slots if getattr(cfg, s.override)}
        if path.is_dir():
            parts = _from_folder(cls, path, dtype, skip_vae=bool(cfg.vae_path), skip_text=set(overrides))
        elif path.suffix == ".safetensors":
            parts = _from_single_file(cls, path, dtype, skip_vae=bool(cfg.vae_path), skip_text=set(overrides))
        else:
            raise ValueError(
                f"model.name_or_path: '{path}' is neither a diffusers folder nor a .safetensors file "
                "(pickled .ckpt files are not loaded; convert them to .safetensors first)"
            )
        vae = load_vae(cls.arch, Path(cfg.vae_path), dtype) if cfg.vae_path else parts.vae
        if vae is None:
            raise ValueError(f"'{path}' holds no VAE; set model.vae_path")
        for slot in cls.text_slots:
            if slot.module in overrides:
                model, tok = _load_text_override(cls.arch, slot, Path(overrides[slot.module]), dtype)
                parts.text_encoders[slot.module], parts.tokenizers[slot.tokenizer] = model, tok
        objective = objective_from_scheduler(parts.scheduler, cfg.prediction_type or parts.prediction_type)
        return cls(parts.unet, vae, parts.text_encoders, parts.tokenizers, objective, parts.pipeline)

    @classmethod
    def detect(cls, path: Path) -> bool:
        """A diffusers folder whose ``model_index.json`` names our pipeline, or a single file whose keys
        carry this family's text-encoder prefix."""
        if path.is_dir():
            index = path / "model_index.json"
            if not index.is_file():
                return False
            return json.loads(index.read_text(encoding="utf-8")).get("_class_name") == cls.pipeline_class
        if path.suffix != ".safetensors" or not path.is_file():
            return False
        keys = safetensors_keys(path)
        return any(k.startswith(LDM_UNET_PREFIX) for k in keys) and any(
            k.startswith(cls.ldm_marker) for k in keys
        )

    def save_pretrained(self, path: Path) -> None:
        """A diffusers pipeline folder: every component, the tokenizer(s), the training scheduler and a
        ``model_index.json`` that both :func:`load_family` and diffusers' ``from_pretrained`` read."""
        path.mkdir(parents=True, exist_ok=True)
        self.unet.save_pretrained(path / "unet")
        self.vae.save_pretrained(path / "vae")
        index: dict[str, Any] = {
            "_class_name": self.pipeline_class,
            "_diffusers_version": diffusers.__version__,
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
            "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        }
        for slot in self.text_slots:
            self.text_encoders[slot.module].save_pretrained(path / slot.module)
            self.tokenizers[slot.tokenizer].save_pretrained(path / slot.tokenizer)
            index[slot.module] = ["transformers", slot.model_class.__name__]
            index[slot.tokenizer] = ["transformers", "CLIPTokenizer"]
        # the sampler diffusers' SD pipelines ship with, on the one config our own samplers use (betas,
        # prediction type, spacing), so diffusers' pipeline on this folder samples as we do
        scheduler = EulerDiscreteScheduler(**self.objective.scheduler_config())
        scheduler.save_pretrained(path / "scheduler")
        index.update(self.extra_index_entries())
        (path / "model_index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")

    def extra_index_entries(self) -> dict[str, Any]:
        """Pipeline-specific ``model_index.json`` entries (optional components, pipeline flags)."""
        return {}

    def save_single_file(self, path: Path) -> None:
        """One ``.safetensors`` in the original layout (A1111 / ComfyUI / kohya checkpoints)."""
        state = {k: v.detach().contiguous().cpu() for k, v in to_ldm_state_dict(self).items()}
        save_file(state, str(path), metadata={"format": "pt", "eri_arch": self.arch})

    # ModelFamily ----------------------------------------------------------------------------------------
    def modules(self) -> dict[str, nn.Module]:
        return {"denoiser": self.unet, "vae": self.vae, **self.text_encoders}

    def trainable_modules(self, train_text_encoder: bool) -> dict[str, nn.Module]:
        mods: dict[str, nn.Module] = {"denoiser": self.unet}
        if train_text_encoder:
            mods.update(self.text_encoders)
        return mods

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def default_resolution(self) -> int:
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        f = self.vae_scale_factor
        return int(self.unet.config.in_channels), height // f, width // f

    def size_multiple(self) -> int:
        """Latents must survive every UNet downsampling exactly: VAE factor x 2^(UNet levels - 1), i.e. 64
        for SD1.5 (8 x 8) and 32 for SDXL (8 x 4; its usual 64 px buckets are multiples of it)."""
        return self.vae_scale_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)

    def check_size(self, height: int, width: int) -> None:
        require_size_multiple(self.arch, self.size_multiple(), height, width)

    def lora_key_names(self, component: str, module_path: str) -> tuple[str, str]:
        """kohya / diffusers names of a layer. Text encoders keep CLIP's ``text_model.`` prefix, which
        transformers >= 5.6 dropped from ``CLIPTextModel`` but every LoRA file and loader still uses."""
        if component in self.text_encoders:
            if not hasattr(self.text_encoders[component], "text_model"):
                module_path = f"text_model.{module_path}"
            return underscored_lora_names(self.kohya_text_prefix(component), component, module_path)
        if component == "denoiser":
            return self.denoiser_lora_names(module_path)
        return underscored_lora_names(f"lora_{component}", component, module_path)

    def kohya_text_prefix(self, component: str) -> str:
        """``lora_te`` for a single text encoder; SDXL's are ``lora_te1`` / ``lora_te2``."""
        return "lora_te"

    def denoiser_lora_names(self, module_path: str) -> tuple[str, str]:
        """kohya trains SD1.x on diffusers' UNet, so its names are diffusers' with underscores."""
        return underscored_lora_names("lora_unet", "unet", module_path)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> StableDiffusionFamily:
        for module in self.modules().values():
            module.to(device=device, dtype=dtype)
        return self

    # helpers for subclasses -----------------------------------------------------------------------------
    def _vae_for_use(self) -> AutoencoderKL:
        """SDXL's VAE overflows in fp16 (its config says ``force_upcast``): keep it in fp32 then."""
        if self.vae.dtype == torch.float16 and self.vae.config.get("force_upcast", False):
            logger.info("%s VAE overflows in fp16 (force_upcast); keeping it in fp32", self.arch)
            self.vae.float()
        return self.vae

    @contextlib.contextmanager
    def chunked_prompts(self) -> Iterator[None]:
        """A1111-style long prompts (see :mod:`eridiffusion.models.prompt_chunks`) while active."""
        self._chunking = True
        try:
            yield
        finally:
            self._chunking = False

    def prompt_limits(self) -> list[PromptLimit]:
        if self._chunking:
            return []  # nothing is cut
        return [
            PromptLimit(
                s.tokenizer,
                self.tokenizers[s.tokenizer],
                self.text_encoders[s.module].config.max_position_embeddings,
            )
            for s in self.text_slots
        ]

    def _token_ids(self, slot: TextSlot, prompts: list[str]) -> torch.Tensor:
        """(B, length) ids cut at the encoder's window, or (B * chunks, length) while chunking; the
        encoders' outputs go through :func:`join_chunks` / :func:`first_chunk` either way."""
        encoder = self.text_encoders[slot.module]
        tokenizer, length = self.tokenizers[slot.tokenizer], encoder.config.max_position_embeddings
        if self._chunking:
            # every encoder of the family gets the same chunk count, so their hidden states line up
            chunks = max(chunk_count(self.tokenizers[s.tokenizer], prompts, length) for s in self.text_slots)
            return chunked_ids(tokenizer, prompts, length, chunks).to(module_device(encoder))
        return token_ids(tokenizer, prompts, length).to(module_device(encoder))

    def added_cond(self, noisy: torch.Tensor, cond: Conditioning) -> dict[str, torch.Tensor]:
        """The UNet's ``added_cond_kwargs`` (SDXL's pooled text and size ids); SD1.5 has none. A ControlNet
        copies the UNet's encoder, so it takes the same ones."""
        return {}

    def encode_prompt(self, prompts: list[str]) -> Conditioning:
        raise NotImplementedError

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The UNet in its own dtype (frozen weights may be stored in bf16/fp16 while inputs are fp32),
        plus the ControlNet residuals ``cond`` carries, if any."""
        dtype = module_dtype(self.unet)
        added = {k: v.to(dtype) for k, v in self.added_cond(noisy, cond).items()} or None
        return self.unet(
            noisy.to(dtype),
            timesteps,
            encoder_hidden_states=cond["context"].to(dtype),
            added_cond_kwargs=added,
            **unet_residual_kwargs(cond, dtype),
        ).sample

    # ControlNetSupport ----------------------------------------------------------------------------------
    def load_controlnet(self, path: Path) -> nn.Module:
        return load_unet_controlnet(path, self.unet, self.unet.dtype)

    def prepare_control_image(self, controlnet: nn.Module, image: torch.Tensor) -> torch.Tensor:
        """UNet ControlNets take the control image in [0, 1] (their training data was not normalised to
        the VAE's [-1, 1])."""
        return (image + 1) / 2

    def control_residuals(
        self,
        controlnet: nn.Module,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        cond: Conditioning,
        image: torch.Tensor,
        scale: float,
    ) -> Conditioning:
        dtype = controlnet.dtype
        added = {k: v.to(dtype) for k, v in self.added_cond(noisy, cond).items()} or None
        down, mid = controlnet(
            noisy.to(dtype),
            timesteps,
            encoder_hidden_states=cond["context"].to(dtype),
            controlnet_cond=image.to(dtype),
            conditioning_scale=scale,
            added_cond_kwargs=added,
            return_dict=False,
        )
        return pack_unet_residuals(down, mid)


def local_tokenizer(encoder: TextModel) -> CLIPTokenizer:
    """The locally built CLIP tokenizer, sized to the encoder's context length."""
    with tempfile.TemporaryDirectory() as tmp:
        tok = build_tokenizer(Path(tmp) / "tokenizer", max_length=encoder.config.max_position_embeddings)
    if len(tok) > encoder.config.vocab_size:
        raise ValueError(f"text encoder vocab_size {encoder.config.vocab_size} < tokenizer size {len(tok)}")
    return tok


# --- loading ----------------------------------------------------------------------------------------------


@dataclass
class _Parts:
    unet: UNet2DConditionModel
    vae: AutoencoderKL | None
    text_encoders: dict[str, TextModel]
    tokenizers: dict[str, CLIPTokenizer]
    scheduler: dict[str, Any]
    prediction_type: str | None
    pipeline: dict[str, Any]


def safetensors_keys(path: Path) -> list[str]:
    """Tensor names of a ``.safetensors`` file without reading the tensors."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"'{path}' is not a readable .safetensors file: {exc}") from None


def weights_variant(folder: Path) -> str | None:
    """``fp16`` when a component folder only ships ``*.fp16.safetensors`` weights (common in downloads)."""
    names = [p.name for p in folder.iterdir() if ".safetensors" in p.name or p.name.endswith(".bin")]
    if any(".fp16." not in n for n in names):
        return None
    return "fp16" if names else None


def _component_folder(path: Path, name: str) -> Path:
    folder = path / name
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"diffusers folder '{path}' has no {name}/config.json")
    return folder


def _from_folder(
    cls: type[StableDiffusionFamily], path: Path, dtype: torch.dtype, skip_vae: bool, skip_text: set[str]
) -> _Parts:
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise FileNotFoundError(
            f"'{path}' is not a diffusers model folder (no model_index.json); point model.name_or_path at "
            "one, or at a single .safetensors checkpoint"
        )
    index = json.loads(index_file.read_text(encoding="utf-8"))
    unet_dir = _component_folder(path, "unet")
    unet = load_pretrained(UNet2DConditionModel, unet_dir, "unet", dtype, weights_variant(unet_dir))
    vae = None
    if not skip_vae:
        vae_dir = _component_folder(path, "vae")
        vae = AutoencoderKL.from_pretrained(vae_dir, torch_dtype=dtype, variant=weights_variant(vae_dir))
    encoders: dict[str, TextModel] = {}
    tokenizers: dict[str, CLIPTokenizer] = {}
    for slot in cls.text_slots:
        if slot.module in skip_text:
            continue
        te_dir = _component_folder(path, slot.module)
        encoders[slot.module] = load_pretrained(
            slot.model_class, te_dir, slot.module, dtype, weights_variant(te_dir)
        )
        tokenizers[slot.tokenizer] = CLIPTokenizer.from_pretrained(path / slot.tokenizer)
    scheduler_file = path / "scheduler" / "scheduler_config.json"
    scheduler = (
        json.loads(scheduler_file.read_text(encoding="utf-8"))
        if scheduler_file.is_file()
        else load_preset(cls.arch, "full")["scheduler"]
    )
    pipeline = {k: v for k, v in index.items() if not k.startswith("_") and not isinstance(v, list)}
    return _Parts(unet, vae, encoders, tokenizers, scheduler, None, pipeline)


def instantiate(
    what: str,
    source: Path,
    arch: str,
    build: Callable[[dict[str, Any]], M],
    configs: dict[str, dict[str, Any]],
    convert: Callable[[dict[str, Any], M], dict[str, torch.Tensor]],
) -> M:
    """Build the component from the first preset whose names and shapes match the converted weights.

    Matching on the full state dict (not a few marker keys) makes a checkpoint of another architecture a
    clear error instead of a silently half-loaded model. The module is built on the meta device and the
    checkpoint tensors are assigned in, so a real-size model is never initialised twice.
    """
    problems = []
    for name, config in configs.items():
        with init_empty_weights():
            model = build(config)
        try:
            state = convert(config, model)
        except (KeyError, IndexError, ValueError) as exc:  # diffusers' converters assume their layout
            problems.append(f"{name}: cannot convert ({type(exc).__name__}: {exc})")
            continue
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in state.items()}
        if expected == got:
            assign_weights(model, state, what)
            return model.eval()
        missing, unexpected = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
        shapes = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
        problems.append(
            f"{name}: {len(missing)} missing (e.g. {missing[:2]}), {len(unexpected)} unexpected "
            f"(e.g. {unexpected[:2]}), {len(shapes)} of other shape (e.g. {shapes[:2]})"
        )
    raise ValueError(
        f"'{source}': its {what} weights match no {arch} architecture preset:\n  " + "\n  ".join(problems)
    )


def _presets(arch: str) -> dict[str, dict[str, Any]]:
    return {name: load_preset(arch, name) for name in preset_names(arch)}


def _unet_from_ldm(arch: str, source: Path, state: dict[str, torch.Tensor]) -> UNet2DConditionModel:
    return instantiate(
        "UNet",
        source,
        arch,
        UNet2DConditionModel.from_config,
        {n: p["unet"] for n, p in _presets(arch).items()},
        lambda config, _model: convert_ldm_unet_checkpoint(state, config),
    )


def vae_from_state(arch: str, source: Path, state: dict[str, torch.Tensor]) -> AutoencoderKL:
    """An LDM-layout VAE (with or without ``first_stage_model.``) or a diffusers-layout one."""
    diffusers_layout = any(k.startswith("encoder.down_blocks.") for k in state)
    return instantiate(
        "VAE",
        source,
        arch,
        AutoencoderKL.from_config,
        {n: p["vae"] for n, p in _presets(arch).items()},
        lambda config, _model: dict(state) if diffusers_layout else convert_ldm_vae_checkpoint(state, config),
    )


def _from_single_file(
    cls: type[StableDiffusionFamily], path: Path, dtype: torch.dtype, skip_vae: bool, skip_text: set[str]
) -> _Parts:
    keys = safetensors_keys(path)
    if not any(k.startswith(LDM_UNET_PREFIX) for k in keys):
        raise ValueError(
            f"'{path}' has no {LDM_UNET_PREFIX}* weights, so it is not an original-layout {cls.arch} "
            "checkpoint (a LoRA, a lone VAE or text encoder, or a diffusers-layout file?)"
        )
    state = read_single_file(path)
    unet = _unet_from_ldm(cls.arch, path, state)
    vae = None
    if not skip_vae:
        if not any(k.startswith(LDM_VAE_PREFIX) for k in keys):
            raise ValueError(f"'{path}' has no VAE weights ({LDM_VAE_PREFIX}*); set model.vae_path")
        vae = vae_from_state(cls.arch, path, {k: v for k, v in state.items() if k.startswith(LDM_VAE_PREFIX)})
    encoders: dict[str, TextModel] = {}
    tokenizers: dict[str, CLIPTokenizer] = {}
    presets = _presets(cls.arch)
    for slot in cls.text_slots:
        if slot.module in skip_text:
            continue
        if not any(k.startswith(slot.ldm_prefix) for k in keys):
            raise ValueError(
                f"'{path}' has no {slot.module} weights ({slot.ldm_prefix}*); set model.{slot.override}"
            )
        encoders[slot.module] = instantiate(
            slot.module,
            path,
            cls.arch,
            lambda config, s=slot: build_text_model(s, config),
            {n: p[slot.module] for n, p in presets.items()},
            lambda _config, model, s=slot: _clip_from_ldm(s, state, model),
        )
        tokenizers[slot.tokenizer] = _fallback_tokenizer(path, slot, encoders[slot.module])
    # newer v-prediction checkpoints (e.g. NoobAI-XL v-pred) flag themselves with an empty ``v_pred`` key
    prediction = "v_prediction" if "v_pred" in keys else None
    scheduler = load_preset(cls.arch, "full")["scheduler"]
    parts = _Parts(unet, vae, encoders, tokenizers, scheduler, prediction, {})
    _cast(parts, dtype)
    return parts


def _cast(parts: _Parts, dtype: torch.dtype) -> None:
    for module in [parts.unet, parts.vae, *parts.text_encoders.values()]:
        if module is not None and module.dtype != dtype and not quantised_layers(module):
            module.to(dtype)


def _fallback_tokenizer(source: Path, slot: TextSlot, encoder: TextModel) -> CLIPTokenizer:
    logger.warning(
        "%s: a single file carries no tokenizer, so %s uses a small CLIP vocabulary built locally that does "
        "NOT match the original CLIP tokenizer: the model will not follow prompts as it was trained to. Fix: "
        "set model.%s to a local diffusers folder with this text encoder and its tokenizer (e.g. the "
        "%s/ and %s/ folders of the diffusers release of this model).",
        source,
        slot.module,
        slot.override,
        slot.module,
        slot.tokenizer,
    )
    return local_tokenizer(encoder)


def load_vae(arch: str, path: Path, dtype: torch.dtype) -> AutoencoderKL:
    """``model.vae_path``: a diffusers folder (``vae/`` inside or the VAE folder itself) or a single file."""
    if not path.exists():
        raise FileNotFoundError(f"model.vae_path: '{path}' does not exist")
    if path.is_dir():
        folder = path / "vae" if (path / "vae" / "config.json").is_file() else path
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"model.vae_path: '{path}' has no config.json (nor vae/config.json)")
        return AutoencoderKL.from_pretrained(folder, torch_dtype=dtype, variant=weights_variant(folder))
    state = load_file(str(path))
    if any(k.startswith(LDM_UNET_PREFIX) for k in state):
        state = {k: v for k, v in state.items() if k.startswith(LDM_VAE_PREFIX)}
    vae = vae_from_state(arch, path, state)
    return vae if vae.dtype == dtype else vae.to(dtype)


def _load_text_override(
    arch: str, slot: TextSlot, path: Path, dtype: torch.dtype
) -> tuple[TextModel, CLIPTokenizer]:
    """``model.clip_l_path`` / ``clip_g_path``: a diffusers folder (``text_encoder[_2]/`` and
    ``tokenizer[_2]/``), a transformers CLIP folder (config, weights and vocab together) or a single
    ``.safetensors`` file (original or transformers layout; then the tokenizer falls back, with a warning)."""
    if not path.exists():
        raise FileNotFoundError(f"model.{slot.override}: '{path}' does not exist")
    if path.is_dir():
        nested = path / slot.module
        folder = nested if (nested / "config.json").is_file() else path
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(
                f"model.{slot.override}: '{path}' has no config.json (nor {slot.module}/)"
            )
        model = load_pretrained(slot.model_class, folder, slot.module, dtype, weights_variant(folder))
        for tok_dir in (path / slot.tokenizer, path / "tokenizer", folder):
            if any((tok_dir / name).is_file() for name in ("tokenizer.json", "vocab.json")):
                return model, CLIPTokenizer.from_pretrained(tok_dir)
        return model, _fallback_tokenizer(path, slot, model)
    state = read_single_file(path)
    presets = {n: p[slot.module] for n, p in _presets(arch).items()}
    original_layout = any(k.startswith(slot.ldm_prefix) for k in state)

    def convert(_config: dict[str, Any], model: TextModel) -> dict[str, torch.Tensor]:
        return _clip_from_ldm(slot, state, model) if original_layout else match_text_keys(state, model)

    model = instantiate(
        slot.module, path, arch, lambda config: build_text_model(slot, config), presets, convert
    )
    model = model if model.dtype == dtype or quantised_layers(model) else model.to(dtype)
    return model, _fallback_tokenizer(path, slot, model)
