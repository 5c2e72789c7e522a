"""What the flow-matching transformer families (SD3.5 in :mod:`.sd3`, Flux.1 in :mod:`.flux`) share.

A family here is a :class:`FlowTransformerFamily` subclass that only states what differs: its transformer
class, its text encoders (:class:`EncoderSlot`), how prompts become conditioning, how its transformer is
called, and its original single-file key layout. Everything else lives once in this module:

* **options** -- ``model.options`` (:class:`FlowOptions`): the preset to build and the flow-matching
  training settings (timestep density, shift, loss weighting), which also apply when loading a model;
* **latent space** -- the 16-channel KL autoencoder, ``(mean - shift_factor) * scaling_factor`` (the
  posterior mean, not a sample, so a training step stays a pure function of its seeded generator);
* **text encoders** -- CLIP (penultimate hidden states and pooled/projected output) and T5 encoders with
  their tokenizers, built locally from presets for random-init models (:mod:`.flow_text`);
* **loading** -- a local diffusers folder (``model_index.json``) or an original single ``.safetensors``
  file, whose transformer, VAE and text encoders are matched against the shipped presets by names and
  shapes; ``vae_path`` / ``clip_l_path`` / ``clip_g_path`` / ``t5_path`` replace components;
* **saving** -- a diffusers pipeline folder (read by :func:`eridiffusion.models.load_family` and by
  diffusers' own pipelines) and the original single-file layout via the table-driven maps of
  :mod:`.key_rules`.

Presets, the preset-matching instantiation and the LDM VAE conversion are shared with SD1.5/SDXL and
come from :mod:`.stable_diffusion`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import diffusers
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
from diffusers.models.modeling_utils import ModelMixin
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import save_file
from torch import nn
from transformers import (
    PreTrainedTokenizerBase,
    T5EncoderModel,
)

from eridiffusion.config.schema import ModelConfig
from eridiffusion.models.flow_text import (
    EncoderSlot,
    TextModel,
    build_text_model,
    clip_embeddings,
    fallback_tokenizer,
    has_tokenizer_files,
    load_tokenizer,
    local_tokenizer,
    t5_embeddings,
    text_keys,
    text_to_original,
)
from eridiffusion.models.key_rules import KeyRule, strip_prefix
from eridiffusion.models.ldm_layout import LDM_UNET_PREFIX, LDM_VAE_PREFIX
from eridiffusion.models.objectives import FlowMatchObjective
from eridiffusion.models.options import parse_model_options
from eridiffusion.models.prompts import PromptLimit
from eridiffusion.models.protocol import (
    Conditioning,
    FusedLayer,
    require_size_multiple,
    underscored_lora_names,
)
from eridiffusion.models.quantize import quantised_layers
from eridiffusion.models.stable_diffusion import (
    STORAGE_DTYPES,
    VAELatents,
    instantiate,
    load_preset,
    load_vae,
    preset_names,
    safetensors_keys,
    vae_from_state,
    weights_variant,
)
from eridiffusion.models.streamed_loading import load_pretrained, read_single_file
from eridiffusion.models.tiny import FAMILY_FILE

logger = logging.getLogger(__name__)

TRANSFORMER_PREFIX = LDM_UNET_PREFIX
"""``model.diffusion_model.``: where SD3.5 and ComfyUI-style Flux single files keep the transformer."""
VAE_PREFIXES = (LDM_VAE_PREFIX, "vae.")
F_ = TypeVar("F_", bound="FlowTransformerFamily")


# --- options ----------------------------------------------------------------------------------------------


class FlowOptions(BaseModel):
    """``model.options`` of sd3/flux. ``preset`` only applies when building from scratch; the training
    settings below also apply to a loaded model (null keeps the model's own scheduler settings)."""

    model_config = ConfigDict(extra="forbid")

    preset: str | None = Field(default=None, description="preset to build from scratch (see presets/)")
    resolution: int | None = Field(default=None, ge=8, description="default image side; null: the preset's")
    timestep_sampling: Literal["logit_normal", "uniform", "mode"] = Field(
        default="logit_normal", description="density of training timesteps (Esser et al. 2024)"
    )
    logit_mean: float = 0.0
    logit_std: float = Field(default=1.0, gt=0)
    mode_scale: float = Field(default=1.29, description="heavy-tail scale of the 'mode' density")
    shift: float | None = Field(
        default=None, gt=0, description="fixed timestep shift for training and sampling; null: the model's"
    )
    loss_weighting: Literal["none", "sigma_sqrt", "cosmap"] = "none"
    t5_max_length: int | None = Field(default=None, ge=1, description="T5 tokens per prompt; null: preset's")


Opts = TypeVar("Opts", bound=FlowOptions)


def parse_flow_options(cls: type[Opts], options: dict[str, Any], where: str = "model.options") -> Opts:
    """Validate ``model.options``; errors name the YAML path like the main config loader does."""
    return parse_model_options(cls, options, where)


# --- the family -------------------------------------------------------------------------------------------


@dataclass
class _Parts:
    transformer: ModelMixin
    vae: AutoencoderKL | None
    encoders: dict[str, TextModel] = field(default_factory=dict)
    tokenizers: dict[str, PreTrainedTokenizerBase] = field(default_factory=dict)
    scheduler: dict[str, Any] = field(default_factory=dict)
    preset: dict[str, Any] | None = None
    """The preset the weights matched (single files) or were built from; its defaults fill the options."""
    saved_options: dict[str, Any] = field(default_factory=dict)


class FlowTransformerFamily(VAELatents):
    """Transformer + 16-channel VAE + CLIP/T5 text encoders, trained with flow matching."""

    arch: ClassVar[str]
    pipeline_class: ClassVar[str]
    """diffusers pipeline class written to / recognised in ``model_index.json``."""
    transformer_class: ClassVar[type[ModelMixin]]
    slots: ClassVar[tuple[EncoderSlot, ...]]
    options_class: ClassVar[type[FlowOptions]] = FlowOptions
    default_preset: ClassVar[str]
    full_range_sigmas: ClassVar[bool] = False
    """Sample with sigmas linspace(1, 1/N, N) like the reference pipeline (Flux), not the scheduler's."""
    single_file_marker: ClassVar[str]
    """A transformer key (without prefix) only this family's single files have."""
    single_file_excludes: ClassVar[tuple[str, ...]] = ()
    """Keys of look-alike architectures (later versions) that must not be claimed."""

    def __init__(
        self,
        transformer: ModelMixin,
        vae: AutoencoderKL,
        text_encoders: dict[str, TextModel],
        tokenizers: dict[str, PreTrainedTokenizerBase],
        options: FlowOptions,
        scheduler: dict[str, Any],
    ) -> None:
        self.transformer = transformer
        self.vae = vae
        self.text_encoders = text_encoders
        self.tokenizers = tokenizers
        self.options = options
        self.scheduler = {k: v for k, v in scheduler.items() if not k.startswith("_")}
        self.objective = self._objective()

    # subclass hooks -------------------------------------------------------------------------------------
    @classmethod
    def transformer_to_original(
        cls, state: dict[str, torch.Tensor], config: dict[str, Any]
    ) -> dict[str, Any]:
        """diffusers transformer keys -> the original release's keys (no prefix)."""
        raise NotImplementedError

    @classmethod
    def transformer_from_original(
        cls, state: dict[str, torch.Tensor], config: dict[str, Any]
    ) -> dict[str, torch.Tensor]:
        """The original release's transformer keys (no prefix) -> diffusers keys."""
        raise NotImplementedError

    @classmethod
    def original_rules(cls, config: dict[str, Any]) -> list[KeyRule]:
        """The original layout's :class:`KeyRule` table for a transformer of ``config`` (adapter aliases
        read it, so fused-layer knowledge lives in one table)."""
        raise NotImplementedError

    @classmethod
    def fallback_defaults(cls, transformer: ModelMixin) -> dict[str, Any]:
        """``resolution`` / ``t5_max_length`` of a loaded model that matches no preset."""
        raise NotImplementedError

    @classmethod
    def preset_fits(cls, state: dict[str, torch.Tensor], config: dict[str, Any]) -> bool:
        """A cheap look at a few original-layout shapes, so only plausible presets are instantiated (a
        real-size SD3 builds a 900 MB position table even on the meta device)."""
        raise NotImplementedError

    def encode_prompt(self, prompts: list[str]) -> Conditioning:
        raise NotImplementedError

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        raise NotImplementedError

    # objective ------------------------------------------------------------------------------------------
    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def token_patch(self) -> int:
        """Latent pixels per transformer token side (2 for SD3's patch embedding and Flux's 2x2 packing)."""
        return 2

    def _objective(self) -> FlowMatchObjective:
        o, s = self.options, self.scheduler
        size = self.default_resolution() // self.vae_scale_factor // self.token_patch
        return FlowMatchObjective(
            timestep_sampling=o.timestep_sampling,
            logit_mean=o.logit_mean,
            logit_std=o.logit_std,
            mode_scale=o.mode_scale,
            shift=o.shift if o.shift is not None else float(s.get("shift", 1.0)),
            dynamic_shift=o.shift is None and bool(s.get("use_dynamic_shifting", False)),
            base_shift=float(s.get("base_shift") or 0.5),
            max_shift=float(s.get("max_shift") or 1.15),
            base_image_seq_len=int(s.get("base_image_seq_len", 256)),
            max_image_seq_len=int(s.get("max_image_seq_len", 4096)),
            loss_weighting=o.loss_weighting,
            patch_size=self.token_patch,
            default_image_seq_len=size * size,
            full_range_sigmas=self.full_range_sigmas,
            num_train_timesteps=int(s.get("num_train_timesteps", 1000)),
        )

    # construction ---------------------------------------------------------------------------------------
    @classmethod
    def build(cls: type[F_], options: dict[str, Any], seed: int = 0) -> F_:
        """Random-initialised model of a preset; ``seed`` makes the initial weights reproducible.

        The tokenizers are genuine ``CLIPTokenizer`` / ``T5Tokenizer`` objects built locally (the real
        vocabularies cannot be downloaded here); they are saved with the model.
        """
        opts = parse_flow_options(cls.options_class, options)
        name = opts.preset or cls.default_preset
        if name not in preset_names(cls.arch):
            raise ValueError(
                f"model.options.preset: {cls.arch} has no preset {name!r}; "
                f"choose one of {preset_names(cls.arch)}"
            )
        preset = load_preset(cls.arch, name)
        opts = cls._with_defaults(opts.model_copy(update={"preset": name}), preset)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            transformer = cls.transformer_class.from_config(preset["transformer"])
            vae = AutoencoderKL.from_config(preset["vae"])
            encoders = {s.module: build_text_model(s, preset[s.module]) for s in cls.slots}
        tokenizers = {
            s.tokenizer: local_tokenizer(s, encoders[s.module], int(opts.t5_max_length or 256))
            for s in cls.slots
        }
        return cls(transformer, vae, encoders, tokenizers, opts, preset["scheduler"])

    @classmethod
    def _with_defaults(cls, opts: Opts, defaults: dict[str, Any]) -> Opts:
        update = {k: defaults[k] for k in ("resolution", "t5_max_length") if getattr(opts, k) is None}
        return opts.model_copy(update=update)

    @classmethod
    def load(cls: type[F_], path: Path, cfg: ModelConfig) -> F_:
        """A local diffusers folder or original single file, plus component overrides; fully offline.
        ``model.options`` (except ``preset``) sets the training options of the loaded model."""
        opts = parse_flow_options(cls.options_class, cfg.options)
        if opts.preset is not None:
            raise ValueError("model.options.preset only applies when building from scratch; remove it")
        dtype = STORAGE_DTYPES[cfg.dtype]
        overrides = {s.module: getattr(cfg, s.override) for s in cls.slots if getattr(cfg, s.override)}
        wrong = [k for k in ("clip_l_path", "clip_g_path", "t5_path") if getattr(cfg, k)]
        wrong = [k for k in wrong if k not in {s.override for s in cls.slots}]
        if wrong:
            raise ValueError(f"model.{wrong[0]}: {cls.arch} has no such text encoder; remove the key")
        if path.is_dir():
            parts = cls._from_folder(path, dtype, skip_vae=bool(cfg.vae_path), skip_text=set(overrides))
        elif path.suffix == ".safetensors":
            parts = cls._from_single_file(path, dtype, skip_vae=bool(cfg.vae_path), skip_text=set(overrides))
        else:
            raise ValueError(
                f"model.name_or_path: '{path}' is neither a diffusers folder nor a .safetensors file "
                "(pickled .ckpt files are not loaded; convert them to .safetensors first)"
            )
        if cfg.vae_path:
            parts.vae = load_vae(cls.arch, Path(cfg.vae_path), dtype)
        # a folder we wrote carries its options (preset included, as a record); the YAML's override them
        explicit = opts.model_dump(exclude_unset=True)
        opts = cls.options_class.model_validate({**parts.saved_options, **explicit})
        defaults = parts.preset or cls.fallback_defaults(parts.transformer)
        opts = cls._with_defaults(opts, defaults)
        for slot in cls.slots:
            if slot.module in overrides:
                model, tok = load_encoder_override(
                    cls.arch, slot, Path(overrides[slot.module]), dtype, int(opts.t5_max_length or 256)
                )
                parts.encoders[slot.module], parts.tokenizers[slot.tokenizer] = model, tok
            elif slot.tokenizer not in parts.tokenizers:
                parts.tokenizers[slot.tokenizer] = fallback_tokenizer(
                    path, slot, parts.encoders[slot.module], int(opts.t5_max_length or 256)
                )
        assert parts.vae is not None
        return cls(parts.transformer, parts.vae, parts.encoders, parts.tokenizers, opts, parts.scheduler)

    @classmethod
    def _matching_preset(cls, transformer: ModelMixin) -> dict[str, Any] | None:
        """The shipped preset whose transformer config this model has (its resolution/T5 defaults)."""
        config = {k: v for k, v in transformer.config.items() if not k.startswith("_")}
        ours = json.loads(json.dumps(config, default=str))
        for name in preset_names(cls.arch):
            preset = load_preset(cls.arch, name)
            if all(ours.get(k) == v for k, v in preset["transformer"].items() if not k.startswith("_")):
                return preset
        return None

    @classmethod
    def _from_folder(cls, path: Path, dtype: torch.dtype, skip_vae: bool, skip_text: set[str]) -> _Parts:
        index_file = path / "model_index.json"
        if not index_file.is_file():
            raise FileNotFoundError(
                f"'{path}' is not a diffusers model folder (no model_index.json); point "
                "model.name_or_path at one, or at a single .safetensors checkpoint"
            )
        folder = _component_folder(path, "transformer")
        transformer = load_pretrained(
            cls.transformer_class, folder, "transformer", dtype, weights_variant(folder)
        )
        vae = None
        if not skip_vae:
            folder = _component_folder(path, "vae")
            vae = AutoencoderKL.from_pretrained(folder, torch_dtype=dtype, variant=weights_variant(folder))
        parts = _Parts(transformer, vae)
        for slot in cls.slots:
            if slot.module in skip_text:
                continue
            folder = path / slot.module
            if not (folder / "config.json").is_file():
                raise FileNotFoundError(
                    f"diffusers folder '{path}' has no {slot.module}/config.json; set model.{slot.override}"
                )
            parts.encoders[slot.module] = _cast(
                load_pretrained(slot.model_class, folder, slot.module, dtype, weights_variant(folder)), dtype
            )
            if has_tokenizer_files(path / slot.tokenizer, slot.kind):
                parts.tokenizers[slot.tokenizer] = load_tokenizer(path / slot.tokenizer, slot)
        scheduler_file = path / "scheduler" / "scheduler_config.json"
        parts.scheduler = (
            json.loads(scheduler_file.read_text(encoding="utf-8"))
            if scheduler_file.is_file()
            else load_preset(cls.arch, cls.default_preset)["scheduler"]
        )
        meta = path / FAMILY_FILE
        if meta.is_file():
            parts.saved_options = json.loads(meta.read_text(encoding="utf-8")).get("options", {})
        parts.preset = cls._matching_preset(transformer)
        return parts

    @classmethod
    def _from_single_file(cls, path: Path, dtype: torch.dtype, skip_vae: bool, skip_text: set[str]) -> _Parts:
        keys = safetensors_keys(path)
        if not cls._is_own_single_file(keys):
            raise ValueError(
                f"'{path}' has no {cls.arch} transformer weights ({cls.single_file_marker}), so it is not an "
                f"original-layout {cls.arch} checkpoint (a LoRA, a lone VAE or text encoder?)"
            )
        state = read_single_file(path)
        others = (*VAE_PREFIXES, "text_encoders.", "conditioner.", "cond_stage_model.")
        if any(k.startswith(TRANSFORMER_PREFIX) for k in keys):
            tstate = strip_prefix(state, TRANSFORMER_PREFIX)
        else:
            tstate = {k: v for k, v in state.items() if not k.startswith(others)}
        presets = {n: load_preset(cls.arch, n) for n in preset_names(cls.arch)}
        candidates = {
            n: p["transformer"] for n, p in presets.items() if cls.preset_fits(tstate, p["transformer"])
        }
        if not candidates:
            raise ValueError(
                f"'{path}': its {cls.arch} transformer matches none of the shipped presets "
                f"({', '.join(presets)}); load its diffusers folder instead (model.name_or_path)"
            )
        transformer = instantiate(
            "transformer",
            path,
            cls.arch,
            cls.transformer_class.from_config,
            candidates,
            lambda config, _model: cls.transformer_from_original(dict(tstate), config),
        )
        vae = None
        if not skip_vae:
            prefix = next((p for p in VAE_PREFIXES if any(k.startswith(p) for k in keys)), None)
            if prefix is None:
                raise ValueError(
                    f"'{path}' has no VAE weights ({LDM_VAE_PREFIX}*); set model.vae_path to the VAE "
                    "(a diffusers folder or a .safetensors file such as the release's ae.safetensors)"
                )
            vae = vae_from_state(cls.arch, path, strip_prefix(state, prefix))
        preset = cls._matching_preset(transformer)
        parts = _Parts(
            _cast(transformer, dtype), _cast(vae, dtype) if vae is not None else None, preset=preset
        )
        for slot in cls.slots:
            if slot.module in skip_text:
                continue
            if not any(k.startswith(slot.original_prefix) for k in keys):
                raise ValueError(
                    f"'{path}' has no {slot.module} weights ({slot.original_prefix}*); "
                    f"set model.{slot.override}"
                )
            sub = {k: v for k, v in state.items() if k.startswith(slot.original_prefix)}
            parts.encoders[slot.module] = _cast(_instantiate_text(cls.arch, slot, path, sub, presets), dtype)
        parts.scheduler = (preset or presets[cls.default_preset])["scheduler"]
        return parts

    @classmethod
    def _is_own_single_file(cls, keys: list[str]) -> bool:
        flat = {k.removeprefix(TRANSFORMER_PREFIX) for k in keys}
        return cls.single_file_marker in flat and not any(
            e in k for k in flat for e in cls.single_file_excludes
        )

    @classmethod
    def detect(cls, path: Path) -> bool:
        """A diffusers folder whose ``model_index.json`` names our pipeline, or a single file holding this
        family's transformer in the original layout."""
        if path.is_dir():
            index = path / "model_index.json"
            if not index.is_file():
                return False
            return json.loads(index.read_text(encoding="utf-8")).get("_class_name") == cls.pipeline_class
        if path.suffix != ".safetensors" or not path.is_file():
            return False
        return cls._is_own_single_file(safetensors_keys(path))

    # saving ---------------------------------------------------------------------------------------------
    def save_pretrained(self, path: Path) -> None:
        """A diffusers pipeline folder (every component, tokenizers, the scheduler, ``model_index.json``)
        that both :func:`load_family` and diffusers' ``from_pretrained`` read, plus our options."""
        path.mkdir(parents=True, exist_ok=True)
        self.transformer.save_pretrained(path / "transformer")
        self.vae.save_pretrained(path / "vae")
        index: dict[str, Any] = {
            "_class_name": self.pipeline_class,
            "_diffusers_version": diffusers.__version__,
            "transformer": ["diffusers", self.transformer_class.__name__],
            "vae": ["diffusers", "AutoencoderKL"],
            "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
            "image_encoder": [None, None],
            "feature_extractor": [None, None],
        }
        for slot in self.slots:
            self.text_encoders[slot.module].save_pretrained(path / slot.module)
            self.tokenizers[slot.tokenizer].save_pretrained(path / slot.tokenizer)
            index[slot.module] = ["transformers", slot.model_class.__name__]
            index[slot.tokenizer] = [
                "transformers",
                "CLIPTokenizer" if slot.kind == "clip" else "T5TokenizerFast",
            ]
        FlowMatchEulerDiscreteScheduler(**self.objective.scheduler_config()).save_pretrained(
            path / "scheduler"
        )
        (path / "model_index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        meta = {"arch": self.arch, "options": self.options.model_dump()}
        (path / FAMILY_FILE).write_text(json.dumps(meta, indent=1), encoding="utf-8")

    def to_original_state_dict(self) -> dict[str, torch.Tensor]:
        """The model in the original single-file layout (the inverse of the single-file loader)."""
        raise NotImplementedError

    def save_single_file(self, path: Path) -> None:
        """One ``.safetensors`` in the original layout (what ComfyUI, Forge and the reference code read)."""
        state = {k: v.detach().contiguous().cpu() for k, v in self.to_original_state_dict().items()}
        save_file(state, str(path), metadata={"format": "pt", "eri_arch": self.arch})

    def _encoders_to_original(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for slot in self.slots:
            out.update(text_to_original(slot, self.text_encoders[slot.module]))
        return out

    # ModelFamily ----------------------------------------------------------------------------------------
    def modules(self) -> dict[str, nn.Module]:
        return {"denoiser": self.transformer, "vae": self.vae, **self.text_encoders}

    def trainable_modules(self, train_text_encoder: bool) -> dict[str, nn.Module]:
        mods: dict[str, nn.Module] = {"denoiser": self.transformer}
        if train_text_encoder:
            mods.update({s.module: self.text_encoders[s.module] for s in self.slots if s.trainable})
        return mods

    def default_resolution(self) -> int:
        return int(self.options.resolution or 1024)

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        f = self.vae_scale_factor
        return int(self.vae.config.latent_channels), height // f, width // f

    def size_multiple(self) -> int:
        return self.vae_scale_factor * self.token_patch

    def check_size(self, height: int, width: int) -> None:
        """Latents must split into whole transformer tokens: VAE factor x token patch (16 for real sizes)."""
        require_size_multiple(self.arch, self.size_multiple(), height, width)

    def lora_key_names(self, component: str, module_path: str) -> tuple[str, str]:
        """kohya-style ``lora_transformer_*`` / ``lora_te{1,2,3}_*`` (OneTrainer's naming, which ComfyUI
        reads for SD3 and Flux) and diffusers' ``transformer.*`` / ``text_encoder*.*``."""
        if component == "denoiser":
            return underscored_lora_names("lora_transformer", "transformer", module_path)
        slot = next(s for s in self.slots if s.module == component)
        if slot.kind == "clip" and not module_path.startswith(("text_model.", "text_projection")):
            module_path = f"text_model.{module_path}"  # transformers >= 5.6 flattened CLIPTextModel
        return underscored_lora_names(slot.kohya_prefix, slot.module, module_path)

    def adapter_aliases(self) -> dict[str, FusedLayer]:
        """The original layout's Linear names as kohya (``lora_unet_*``, what sd-scripts and most CivitAI
        files use) and peft-style (``diffusion_model.*``) adapter files spell them, read off the same
        :meth:`original_rules` as single-file conversion: a fused q/k/v rule becomes a multi-part layer."""
        aliases: dict[str, FusedLayer] = {}
        for rule in self.original_rules(dict(self.transformer.config)):
            if not rule.original.endswith(".weight"):
                continue
            module = rule.original.removesuffix(".weight")
            paths = tuple(name.removesuffix(".weight") for name in rule.diffusers)
            layer = FusedLayer("denoiser", paths, swap_halves=rule.swap)
            aliases[f"lora_unet_{module.replace('.', '_')}"] = layer
            aliases[f"diffusion_model.{module}"] = layer
        return aliases

    def to(self: F_, device: torch.device | str, dtype: torch.dtype | None = None) -> F_:
        for module in self.modules().values():
            module.to(device=device, dtype=dtype)
        return self

    # helpers for subclasses -----------------------------------------------------------------------------
    def _vae_for_use(self) -> AutoencoderKL:
        """The 16-channel VAEs overflow in fp16 (their config says ``force_upcast``): keep them fp32 then."""
        if self.vae.dtype == torch.float16 and self.vae.config.get("force_upcast", False):
            self.vae.float()
        return self.vae

    @property
    def t5_length(self) -> int:
        """T5 tokens per prompt: ``t5_max_length``, or 256 (Flux schnell's) when a model does not say."""
        return int(self.options.t5_max_length or 256)

    def prompt_limits(self) -> list[PromptLimit]:
        return [
            PromptLimit(
                s.tokenizer,
                self.tokenizers[s.tokenizer],
                self.t5_length
                if s.kind == "t5"
                else self.text_encoders[s.module].config.max_position_embeddings,
            )
            for s in self.slots
        ]

    def _clip_outputs(self, prompts: list[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [
            clip_embeddings(self.text_encoders[s.module], self.tokenizers[s.tokenizer], prompts)
            for s in self.slots
            if s.kind == "clip"
        ]

    def _t5_output(self, prompts: list[str]) -> torch.Tensor:
        slot = next(s for s in self.slots if s.kind == "t5")
        return t5_embeddings(
            self.text_encoders[slot.module],
            self.tokenizers[slot.tokenizer],
            prompts,
            self.t5_length,
        )


def pad_to_width(x: torch.Tensor, width: int) -> torch.Tensor:
    """Zero-pad the feature dimension (SD3 joins CLIP's 2048 features with T5's 4096 this way)."""
    return F.pad(x, (0, width - x.shape[-1]))


def _component_folder(path: Path, name: str) -> Path:
    folder = path / name
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"diffusers folder '{path}' has no {name}/config.json")
    return folder


M = TypeVar("M", bound=nn.Module)


def _cast(module: M, dtype: torch.dtype) -> M:
    """Storage dtype of a loaded component; T5's ``wo`` projections stay fp32 under fp16 (they overflow,
    which is why transformers keeps them in fp32 too). A component quantised while loading is left as
    it is: it was stored in ``dtype`` as it was read."""
    if quantised_layers(module):
        return module
    if any(p.dtype != dtype for p in module.parameters()):
        module.to(dtype)
    if dtype == torch.float16 and isinstance(module, T5EncoderModel):
        for name, sub in module.named_modules():
            if name.endswith(".wo"):
                sub.float()
    return module


def _instantiate_text(
    arch: str,
    slot: EncoderSlot,
    source: Path,
    state: dict[str, torch.Tensor],
    presets: dict[str, dict[str, Any]],
) -> TextModel:
    width = _embedding_width(slot, state)
    configs = {n: p[slot.module] for n, p in presets.items()}
    fitting = {n: c for n, c in configs.items() if c.get("hidden_size", c.get("d_model")) == width}
    model = instantiate(
        slot.module,
        source,
        arch,
        lambda config: build_text_model(slot, config),
        fitting or configs,
        lambda _config, model: text_keys(slot, state, model),
    )
    if isinstance(model, T5EncoderModel):
        model.set_input_embeddings(model.shared)  # assigned tensors are two Parameters: tie them again
    return model


def _embedding_width(slot: EncoderSlot, state: dict[str, torch.Tensor]) -> int | None:
    ends = ("token_embedding.weight",) if slot.kind == "clip" else ("shared.weight", "embed_tokens.weight")
    return next((int(v.shape[-1]) for k, v in state.items() if k.endswith(ends)), None)


def load_encoder_override(
    arch: str, slot: EncoderSlot, path: Path, dtype: torch.dtype, t5_max_length: int
) -> tuple[TextModel, PreTrainedTokenizerBase]:
    """``model.clip_l_path`` / ``clip_g_path`` / ``t5_path``: a diffusers folder (``text_encoder_N/`` +
    ``tokenizer_N/``), a transformers folder (config, weights and tokenizer together) or a single
    ``.safetensors`` file (original prefix or plain transformers names, as ComfyUI's text encoder files)."""
    if not path.exists():
        raise FileNotFoundError(f"model.{slot.override}: '{path}' does not exist")
    if path.is_dir():
        nested = path / slot.module
        folder = nested if (nested / "config.json").is_file() else path
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(
                f"model.{slot.override}: '{path}' has no config.json (nor {slot.module}/)"
            )
        model = _cast(
            load_pretrained(slot.model_class, folder, slot.module, dtype, weights_variant(folder)), dtype
        )
        for tok_dir in (path / slot.tokenizer, folder, path):
            if has_tokenizer_files(tok_dir, slot.kind):
                return model, load_tokenizer(tok_dir, slot)
        return model, fallback_tokenizer(path, slot, model, t5_max_length)
    state = read_single_file(path)
    presets = {n: load_preset(arch, n) for n in preset_names(arch)}
    model = _cast(_instantiate_text(arch, slot, path, state, presets), dtype)
    return model, fallback_tokenizer(path, slot, model, t5_max_length)
