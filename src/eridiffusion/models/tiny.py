"""The ``tiny`` family: a small text-to-image model that trains from scratch on a laptop CPU.

It is built from the same classes as the real families (diffusers ``UNet2DConditionModel``, transformers
``CLIPTextModel`` + ``CLIPTokenizer``) so every code path the trainer, the LoRA tools and the sampler use is
exercised on it. The denoiser works in pixel space after a lossless ``patch_size`` x ``patch_size``
space-to-depth packing: a 32 px RGB image becomes a 16x16x12 tensor, which makes a CPU training step about
four times cheaper than convolving at full resolution, with no autoencoder to train first.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from eridiffusion.models.objectives import DDPMObjective
from eridiffusion.models.options import parse_model_options
from eridiffusion.models.prompts import PromptLimit
from eridiffusion.models.protocol import (
    Conditioning,
    module_device,
    module_dtype,
    require_size_multiple,
    underscored_lora_names,
)
from eridiffusion.models.token_ids import token_ids
from eridiffusion.models.tokenizer import DEFAULT_MAX_VOCAB, MIN_TOKENS, build_tokenizer, learn_tokenizer

FAMILY_FILE = "eri_family.json"


class TinyOptions(BaseModel):
    """Architecture knobs (``model.options`` in the YAML), in the spirit of a classic DiffusionConfig."""

    model_config = ConfigDict(extra="forbid")

    resolution: int = Field(default=32, ge=8, description="training/sampling image side in pixels")
    patch_size: int = Field(default=2, ge=1, description="space-to-depth factor before the UNet")
    channels: list[int] = Field(default=[32, 64, 64], min_length=1, description="UNet width per level")
    layers_per_block: int = Field(default=1, ge=1)
    attention_levels: list[bool] = Field(
        default=[False, True, True], description="cross-attention at each UNet level (attention resolutions)"
    )
    attention_head_dim: int = Field(default=8, ge=1)
    pooled_text: bool = Field(
        default=False,
        description="also add the attention-pooled prompt to the timestep embedding (every ResNet block)",
    )
    norm_num_groups: int = Field(default=8, ge=1)
    context_dim: int = Field(default=64, ge=8, description="text encoder width = cross-attention dim")
    text_layers: int = Field(default=2, ge=1)
    text_heads: int = Field(default=4, ge=1)
    max_tokens: int | None = Field(
        default=None,
        ge=4,
        description="tokens per prompt (start/end included); null: chosen from the training captions",
    )
    max_vocab: int = Field(
        default=DEFAULT_MAX_VOCAB, ge=1024, description="tokenizer size limit when learning from captions"
    )
    beta_schedule: Literal["linear", "cosine", "quadratic"] = "linear"
    beta_start: float = Field(default=0.0001, gt=0, lt=1, description="linear/quadratic schedules only")
    beta_end: float = Field(default=0.02, gt=0, lt=1, description="linear/quadratic schedules only")
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    latent: Literal["packed", "autoencoder"] = Field(
        default="packed", description="packed pixels (no training needed) or a learned AutoencoderKL"
    )
    vae_channels: list[int] = Field(default=[32, 64], min_length=1, description="autoencoder width per level")
    latent_channels: int = Field(default=4, ge=1)

    @property
    def input_factor(self) -> int:
        """Pixels per denoiser cell: the packing factor, or the autoencoder's down-sampling."""
        return self.patch_size if self.latent == "packed" else 2 ** (len(self.vae_channels) - 1)

    @property
    def input_channels(self) -> int:
        return 3 * self.patch_size**2 if self.latent == "packed" else self.latent_channels

    @property
    def size_multiple(self) -> int:
        return self.input_factor * 2 ** (len(self.channels) - 1)

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        """Models (and configs) from before ``max_tokens`` name the prompt length ``text_max_length``; it
        means the same, so they keep loading."""
        if isinstance(data, dict) and "text_max_length" in data:
            data = dict(data)
            legacy = data.pop("text_max_length")
            data.setdefault("max_tokens", legacy)
        return data

    @model_validator(mode="after")
    def _consistent(self) -> TinyOptions:
        if len(self.attention_levels) != len(self.channels):
            raise ValueError(
                f"attention_levels has {len(self.attention_levels)} entries but channels has "
                f"{len(self.channels)}; give one true/false per UNet level"
            )
        factor = self.size_multiple
        if self.resolution % factor:
            raise ValueError(
                f"resolution {self.resolution} must be a multiple of {factor} "
                "(packing or autoencoder factor x 2^(UNet levels - 1))"
            )
        if any(c % self.norm_num_groups for c in [*self.channels, *self.vae_channels]):
            raise ValueError(
                f"every channel count must be divisible by norm_num_groups={self.norm_num_groups}"
            )
        if self.context_dim % self.text_heads:
            raise ValueError(
                f"context_dim {self.context_dim} must be divisible by text_heads {self.text_heads}"
            )
        return self


def parse_options(options: dict[str, Any], where: str = "model.options") -> TinyOptions:
    """Validate ``model.options``; errors name the YAML path like the main config loader does."""
    return parse_model_options(TinyOptions, options, where)


class TinyFamily:
    """UNet + CLIP text encoder in packed pixel space, or in the latent space of a small AutoencoderKL."""

    arch = "tiny"

    def __init__(
        self,
        options: TinyOptions,
        unet: UNet2DConditionModel,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        vae: AutoencoderKL | None = None,
    ) -> None:
        if (vae is None) != (options.latent == "packed"):
            raise ValueError("a tiny model has an autoencoder exactly when options.latent is 'autoencoder'")
        self.options = options
        self.unet = unet
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.vae = vae
        self.objective = DDPMObjective(
            options.beta_schedule,
            options.prediction_type,
            beta_start=options.beta_start,
            beta_end=options.beta_end,
        )

    # construction ---------------------------------------------------------------------------------------
    @classmethod
    def build(
        cls, options: TinyOptions, tokenizer_dir: Path, seed: int = 0, captions: Sequence[str] | None = None
    ) -> TinyFamily:
        """Random-initialised model; ``seed`` makes the initial weights reproducible.

        With ``captions`` (the job's training captions) the tokenizer learns their words and, unless
        ``max_tokens`` is set, its prompt length; without them it has the built-in word list and 16 tokens.
        The same captions always give the same tokenizer, so a resumed run rebuilds the one it started with.
        """
        if captions:
            tokenizer = learn_tokenizer(tokenizer_dir, captions, options.max_vocab, options.max_tokens)
        else:
            tokenizer = build_tokenizer(tokenizer_dir, max_length=options.max_tokens or MIN_TOKENS)
        options = options.model_copy(update={"max_tokens": tokenizer.model_max_length})
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            text_encoder = CLIPTextModel(
                CLIPTextConfig(
                    vocab_size=len(tokenizer),
                    hidden_size=options.context_dim,
                    intermediate_size=options.context_dim * 2,
                    num_hidden_layers=options.text_layers,
                    num_attention_heads=options.text_heads,
                    max_position_embeddings=options.max_tokens,
                    bos_token_id=tokenizer.bos_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id,
                )
            )
            unet = UNet2DConditionModel(**_unet_kwargs(options))
            vae = AutoencoderKL(**_vae_kwargs(options)) if options.latent == "autoencoder" else None
        return cls(options, unet, text_encoder, tokenizer, vae)

    @classmethod
    def from_pretrained(cls, path: Path) -> TinyFamily:
        meta = json.loads((path / FAMILY_FILE).read_text(encoding="utf-8"))
        options = TinyOptions.model_validate(meta["options"])
        unet = UNet2DConditionModel.from_pretrained(path / "unet")
        text_encoder = CLIPTextModel.from_pretrained(path / "text_encoder")
        tokenizer = CLIPTokenizer.from_pretrained(path / "tokenizer")
        vae = AutoencoderKL.from_pretrained(path / "vae") if options.latent == "autoencoder" else None
        return cls(options, unet, text_encoder, tokenizer, vae)

    def save_pretrained(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self.unet.save_pretrained(path / "unet")
        self.text_encoder.save_pretrained(path / "text_encoder")
        self.tokenizer.save_pretrained(path / "tokenizer")
        if self.vae is not None:
            self.vae.save_pretrained(path / "vae")
        meta = {"arch": self.arch, "options": self.options.model_dump()}
        (path / FAMILY_FILE).write_text(json.dumps(meta, indent=1), encoding="utf-8")

    # ModelFamily ----------------------------------------------------------------------------------------
    def modules(self) -> dict[str, nn.Module]:
        mods: dict[str, nn.Module] = {"denoiser": self.unet, "text_encoder": self.text_encoder}
        if self.vae is not None:
            mods["vae"] = self.vae
        return mods

    def trainable_modules(self, train_text_encoder: bool) -> dict[str, nn.Module]:
        mods: dict[str, nn.Module] = {"denoiser": self.unet}
        if train_text_encoder:
            mods["text_encoder"] = self.text_encoder
        return mods

    def default_resolution(self) -> int:
        return self.options.resolution

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        f = self.options.input_factor
        return self.options.input_channels, height // f, width // f

    def size_multiple(self) -> int:
        """Packing (or the autoencoder), then one 2x down-sampling per UNet level after the first."""
        return self.options.size_multiple

    def check_size(self, height: int, width: int) -> None:
        require_size_multiple("this tiny model", self.size_multiple(), height, width)

    def encode_prompt(self, prompts: list[str]) -> Conditioning:
        ids = token_ids(self.tokenizer, prompts, self.max_tokens).to(module_device(self.text_encoder))
        return {"context": self.text_encoder(ids).last_hidden_state}

    @property
    def max_tokens(self) -> int:
        """Set by :meth:`build` (or read from the saved options), so never None on a model."""
        assert self.options.max_tokens is not None
        return self.options.max_tokens

    def prompt_limits(self) -> list[PromptLimit]:
        return [PromptLimit("tokenizer", self.tokenizer, self.max_tokens)]

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            return F.pixel_unshuffle(pixels, self.options.patch_size)
        # the posterior mean: deterministic latents, so data order alone fixes a training run
        latents = self.vae.encode(pixels.to(module_dtype(self.vae))).latent_dist.mean.float()
        mean, std = self._channel_stats(latents)
        return (latents - mean) / std * self.vae.config.scaling_factor

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            return F.pixel_shuffle(latents, self.options.patch_size)
        mean, std = self._channel_stats(latents)
        raw = latents / self.vae.config.scaling_factor * std + mean
        return self.vae.decode(raw.to(module_dtype(self.vae))).sample.float()

    def _channel_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel latent mean/std when an autoencoder step calibrated them (``latents_mean`` /
        ``latents_std`` in the VAE config, as diffusers stores them); else the identity."""
        assert self.vae is not None
        cfg = self.vae.config
        if cfg.get("latents_mean") is None or cfg.get("latents_std") is None:
            return torch.zeros((), device=like.device), torch.ones((), device=like.device)
        shape = (1, -1, 1, 1)
        mean = torch.tensor(cfg.latents_mean, device=like.device, dtype=like.dtype).reshape(shape)
        return mean, torch.tensor(cfg.latents_std, device=like.device, dtype=like.dtype).reshape(shape)

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        # a frozen text encoder may be stored in bf16/fp16 (model.dtype) while the UNet trains in fp32
        dtype = module_dtype(self.unet)
        context = cond["context"].to(dtype)
        return self.unet(noisy.to(dtype), timesteps, encoder_hidden_states=context).sample

    def lora_key_names(self, component: str, module_path: str) -> tuple[str, str]:
        prefixes = {"denoiser": ("lora_unet", "unet"), "text_encoder": ("lora_te", "text_encoder")}
        return underscored_lora_names(*prefixes[component], module_path)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> TinyFamily:
        for module in self.modules().values():
            module.to(device=device, dtype=dtype)
        return self


def _unet_kwargs(o: TinyOptions) -> dict[str, Any]:
    down = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in o.attention_levels]
    up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(o.attention_levels)]
    channels = o.input_channels
    pooled = o.pooled_text
    return {
        "sample_size": o.resolution // o.input_factor,
        "in_channels": channels,
        "out_channels": channels,
        "block_out_channels": tuple(o.channels),
        "down_block_types": tuple(down),
        "up_block_types": tuple(up),
        "mid_block_type": "UNetMidBlock2DCrossAttn" if o.attention_levels[-1] else None,
        "layers_per_block": o.layers_per_block,
        "cross_attention_dim": o.context_dim,
        "attention_head_dim": o.attention_head_dim,
        "norm_num_groups": o.norm_num_groups,
        # DeepFloyd IF's global path: the prompt, attention-pooled, joins the timestep embedding, so every
        # ResNet block at every resolution is modulated by it, not only the levels with cross-attention
        **({"addition_embed_type": "text", "addition_embed_type_num_heads": o.text_heads} if pooled else {}),
    }


def _vae_kwargs(o: TinyOptions) -> dict[str, Any]:
    levels = len(o.vae_channels)
    return {
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": o.latent_channels,
        "block_out_channels": tuple(o.vae_channels),
        "down_block_types": ("DownEncoderBlock2D",) * levels,
        "up_block_types": ("UpDecoderBlock2D",) * levels,
        "layers_per_block": 1,
        "norm_num_groups": o.norm_num_groups,
        "sample_size": o.resolution,
        # replaced by 1/std of real latents when an autoencoder stage finishes (see training.autoencoder)
        "scaling_factor": 1.0,
    }
