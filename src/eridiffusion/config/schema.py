"""The YAML config schema.

Every section is a strict pydantic model: an unknown key is an error (peers that silently ignore a typo such
as ``learning_rate`` vs ``lr`` cost users whole training runs). Field names follow ai-toolkit where one
exists so configs port with few edits. The dataset sections live in :mod:`eridiffusion.config.datasets`;
:class:`DatasetConfig` is importable from here as well, beside the :class:`JobConfig` that holds it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from eridiffusion.config.base import Strict
from eridiffusion.config.datasets import DatasetConfig


class ModelConfig(Strict):
    """Which model to train and how to build or load it."""

    arch: Literal["tiny", "sd15", "sdxl", "sd3", "flux"] | None = Field(
        default=None, description="model family; null: detect it from name_or_path's files"
    )
    name_or_path: str | None = Field(
        default=None,
        description="local diffusers folder or single .safetensors file; null builds from scratch",
    )
    options: dict[str, Any] = Field(
        default_factory=dict, description="family-specific architecture options, validated by the family"
    )
    vae_path: str | None = Field(default=None, description="separate VAE (folder or .safetensors)")
    clip_l_path: str | None = Field(default=None, description="separate CLIP-L text encoder")
    clip_g_path: str | None = Field(default=None, description="separate CLIP-G text encoder (SDXL, SD3)")
    t5_path: str | None = Field(default=None, description="separate T5-XXL text encoder (SD3, Flux)")
    dtype: Literal["fp32", "bf16", "fp16"] = Field(
        default="fp32", description="storage dtype of frozen weights; trained ones: train.weights_dtype"
    )
    prediction_type: Literal["epsilon", "v_prediction"] | None = Field(
        default=None, description="override the checkpoint's prediction type (SD1.5/SDXL); null keeps it"
    )
    quantize: Literal["none", "fp8", "int8", "int4", "nf4"] = Field(
        default="none",
        description="weight-only quantisation of the frozen denoiser for adapter training: fp8 / int8 "
        "(torchao), nf4 (bitsandbytes); also written {weights: ..., text_encoders: ...}",
    )
    quantize_text_encoders: Literal["none", "fp8", "int8", "int4", "nf4"] = Field(
        default="none", description="the same for the frozen text encoders (ai-toolkit's quantize_te)"
    )

    @model_validator(mode="before")
    @classmethod
    def _quantize_mapping(cls, data: Any) -> Any:
        """``quantize: {weights: nf4, text_encoders: int8}`` is the two flat keys."""
        if isinstance(data, dict) and isinstance(data.get("quantize"), dict):
            q = dict(data["quantize"])
            unknown = set(q) - {"weights", "text_encoders"}
            if unknown:
                allowed = "allowed: weights, text_encoders"
                raise ValueError(f"quantize: unknown key(s) {sorted(unknown)}; {allowed}")
            data = {**data, "quantize": q.get("weights", "none")}
            if "text_encoders" in q:
                data["quantize_text_encoders"] = q["text_encoders"]
        return data


class NetworkConfig(Strict):
    """Adapter to train instead of the full model (absent = full fine-tune). Names follow ai-toolkit/kohya."""

    type: Literal["lora", "loha", "lokr", "dora"] = "lora"
    linear: int = Field(default=16, ge=1, description="rank of adapted Linear layers")
    linear_alpha: float = Field(default=16.0, gt=0, description="alpha; the update is scaled by alpha/rank")
    conv: int | None = Field(default=None, ge=1, description="rank for k>1 convolutions (LoCon); null: none")
    conv_alpha: float | None = Field(default=None, gt=0, description="alpha for convolutions; null: = conv")
    target: Literal["attention", "attention_mlp", "all_linear"] = "attention_mlp"
    only_if_contains: list[str] = Field(
        default_factory=list, description="adapt only layers naming one of these"
    )
    ignore_if_contains: list[str] = Field(default_factory=list, description="never adapt layers naming these")
    dropout: float = Field(default=0.0, ge=0, lt=1, description="LoRA dropout / LoHa-LoKr module dropout")
    lokr_factor: int = Field(default=-1, description="LoKr decompose factor (-1: automatic)")
    init_from: str | None = Field(default=None, description="adapter file to continue training from")
    components: list[Literal["denoiser", "text_encoder"]] | None = Field(
        default=None,
        min_length=1,
        description="what gets adapters (text_encoder: every text encoder); null: the denoiser, and the "
        "text encoders too when train.train_text_encoder in a single-stage run",
    )

    def adapts(self, train_text_encoder: bool) -> tuple[bool, bool]:
        """(denoiser, text encoders) adapted; ``train_text_encoder`` is the job's choice when
        ``components`` is unset (a pipeline step passes False: its text encoders keep their weights)."""
        if self.components is None:
            return True, train_text_encoder
        return "denoiser" in self.components, "text_encoder" in self.components


class EMAConfig(Strict):
    enabled: bool = False
    decay: float = Field(default=0.999, gt=0, lt=1)
    warmup: bool = Field(default=True, description="ramp decay as (1+n)/(10+n) so early EMA is not stale")


OptimizerName = Literal[
    "adamw", "adamw8bit", "sgd", "prodigy", "adafactor", "lion", "lion8bit", "adamw_schedulefree", "came"
]
SchedulerName = Literal[
    "constant",
    "constant_with_warmup",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "inverse_sqrt",
]
SCHEDULE_FREE: frozenset[str] = frozenset({"adamw_schedulefree"})
"""Optimizers that replace the LR schedule with their own averaging (Defazio et al. 2024)."""
CHUNKED_STEP_REFUSED: dict[str, str] = {
    "prodigy": "its step-size estimate pools every weight of a step, and bf16 weights are stepped a slice "
    "at a time; use adamw, adamw8bit, adafactor, lion, came or sgd, or train.weights_dtype: fp32",
    "adamw_schedulefree": "its averaging keeps per-step counters for all weights together, and bf16 "
    "weights are stepped a slice at a time; use adamw or adafactor, or train.weights_dtype: fp32",
}
"""Optimizers that cannot step bf16 weights slice by slice (``train.weights_dtype: bf16``), and why."""


def schedule_conflict(optimizer: str, params: dict[str, Any], scheduler: str, warmup: int) -> str | None:
    """Why this optimizer cannot take an external LR schedule, or None when it can.

    Schedule-free AdamW and Adafactor's relative step size compute the step size themselves; a schedule
    multiplied on top would silently change what the user asked for, so it is refused instead.
    """
    owner = None
    if optimizer in SCHEDULE_FREE:
        owner = f"{optimizer} is schedule-free (it averages its iterates instead of decaying the LR)"
    elif optimizer == "adafactor" and params.get("relative_step"):
        owner = "adafactor with params.relative_step: true computes its own step size"
    if owner is None or (scheduler in ("constant", "constant_with_warmup") and warmup == 0):
        return None
    return (
        f"{owner}, so it takes no LR schedule: set lr_scheduler: constant and lr_warmup_steps: 0 "
        "(warm up with optimizer params.warmup_steps for schedule-free AdamW)"
    )


class OptimizerConfig(Strict):
    """Optimizer settings; ``params`` go to the optimizer's constructor as written (checked against it)."""

    type: OptimizerName = "adamw"
    weight_decay: float = Field(default=0.01, ge=0)
    betas: tuple[float, float] = Field(
        default=(0.9, 0.999), description="Adam-style betas; Lion/Prodigy use their own unless set here"
    )
    eps: float = Field(default=1e-8, gt=0)
    params: dict[str, Any] = Field(
        default_factory=dict,
        description="extra constructor arguments, e.g. {d_coef: 2} for prodigy or {relative_step: true}",
    )


class DistributedConfig(Strict):
    """How several processes (``eri train --num-processes N`` or ``accelerate launch``) share the work."""

    strategy: Literal["ddp", "fsdp"] = Field(
        default="ddp",
        description="ddp: every process holds the whole model and gradients are averaged; fsdp: weights, "
        "gradients and optimizer state are sharded across processes (full fine-tunes of large models)",
    )
    fsdp_sharding: Literal["full_shard", "shard_grad_op"] = Field(
        default="full_shard",
        description="full_shard frees gathered weights after each block's forward (least memory); "
        "shard_grad_op keeps them until backward (faster, more memory)",
    )


class TrainConfig(Strict):
    """Optimisation settings; one ``step`` is one optimizer update (after accumulation)."""

    steps: int = Field(default=1000, ge=1)
    batch_size: int = Field(default=4, ge=1)
    gradient_accumulation_steps: int = Field(default=1, ge=1)
    lr: float = Field(default=1e-4, gt=0)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    lr_scheduler: SchedulerName = "constant"
    lr_warmup_steps: int = Field(default=0, ge=0, description="linear warmup before any schedule")
    lr_cycles: int = Field(default=1, ge=1, description="cosine_with_restarts: number of cosine cycles")
    lr_power: float = Field(default=1.0, gt=0, description="polynomial: decay exponent (1 = linear)")
    max_grad_norm: float | None = Field(default=1.0, gt=0, description="null disables clipping")
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = Field(
        default="auto", description="auto: bf16 on CUDA devices that support it, otherwise fp32"
    )

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, value: Any) -> Any:
        """YAML reads a bare ``no`` as false: ``mixed_precision: no`` means no mixed precision."""
        return "no" if value is False else value

    gradient_checkpointing: bool = False
    weights_dtype: Literal["fp32", "bf16"] = Field(
        default="fp32", description="dtype of fully trained weights; bf16 halves weights and gradients"
    )
    weights_rounding: Literal["stochastic", "kahan", "nearest"] = Field(
        default="stochastic", description="how bf16 trained weights take each fp32 optimizer update"
    )
    blocks_to_swap: int = Field(
        default=0, ge=0, description="denoiser blocks kept on the host between uses (flux, sd3 adapter jobs)"
    )
    loss: Literal["mse", "l1", "huber"] = "mse"
    huber_delta: float = Field(default=0.1, gt=0)
    min_snr_gamma: float | None = Field(default=None, gt=0, description="Hang et al. 2023; 5.0 is typical")
    noise_offset: float = Field(
        default=0.0, ge=0, description="per-channel noise offset (eps/v models); 0.05-0.1"
    )
    multires_noise_iterations: int = Field(default=0, ge=0, description="pyramid noise levels (eps/v); 6-10")
    multires_noise_discount: float = Field(
        default=0.3, gt=0, le=1, description="per-level weight of pyramid noise"
    )
    ip_noise_gamma: float = Field(default=0.0, ge=0, description="input perturbation (Ning et al. 2023); 0.1")
    ema: EMAConfig = Field(default_factory=EMAConfig)
    diff_output_preservation: bool = Field(
        default=False,
        description="adapters: on the caption with the trigger word replaced by the class word, match the "
        "frozen base's prediction (ai-toolkit's DOP)",
    )
    diff_output_preservation_multiplier: float = Field(
        default=1.0, gt=0, description="weight of the output-preservation loss"
    )
    diff_output_preservation_class: str | None = Field(
        default=None, description="the word that replaces the trigger word ('' removes it), e.g. person"
    )
    train_text_encoder: bool = True
    seed: int = 42
    device: str = Field(default="auto", description="auto, cpu, cuda, cuda:1, ...")
    num_workers: int = Field(default=0, ge=0, description="data loading processes; 0 loads in the trainer")
    distributed: DistributedConfig = Field(
        default_factory=DistributedConfig, description="multi-process training (one process: ignored)"
    )

    @model_validator(mode="after")
    def _preservation_class(self) -> TrainConfig:
        if self.diff_output_preservation and self.diff_output_preservation_class is None:
            raise ValueError(
                "train.diff_output_preservation needs train.diff_output_preservation_class: the word that "
                "replaces the trigger word (e.g. person; '' removes the trigger)"
            )
        return self

    @model_validator(mode="after")
    def _schedule_allowed(self) -> TrainConfig:
        o = self.optimizer
        problem = schedule_conflict(o.type, o.params, self.lr_scheduler, self.lr_warmup_steps)
        if problem:
            raise ValueError(f"train.optimizer.type {problem}")
        if self.weights_dtype == "bf16":
            if o.type in CHUNKED_STEP_REFUSED:
                raise ValueError(
                    f"train.optimizer.type {o.type} with weights_dtype bf16: {CHUNKED_STEP_REFUSED[o.type]}"
                )
            if self.mixed_precision in ("no", "fp16"):
                raise ValueError(
                    f"train.weights_dtype bf16 computes in bf16; set train.mixed_precision to bf16 or auto "
                    f"(not {self.mixed_precision}), or weights_dtype: fp32"
                )
        return self


class SaveConfig(Strict):
    format: Literal["kohya", "diffusers"] = Field(
        default="kohya",
        description="adapter file layout (kohya keys load in ComfyUI, A1111/Forge, diffusers)",
    )
    dtype: Literal["fp32", "bf16", "fp16"] = Field(
        default="fp16", description="dtype of exported adapter files"
    )
    every: int = Field(default=250, ge=1, description="save a checkpoint every N steps (and at the end)")
    keep: int = Field(default=3, ge=1, description="how many step checkpoints to keep")
    keep_best: int = Field(
        default=0, ge=0, description="also keep the N checkpoints of lowest val/loss (checkpoints/best/)"
    )
    resume: bool | str = Field(
        default=True, description="true: resume from the latest checkpoint if any; a path: resume from it"
    )
    metadata: dict[str, str] = Field(
        default_factory=dict, description="extra text metadata written into exported adapter files"
    )


class SamplePrompt(Strict):
    """One row of the sample grid with its own settings (ai-toolkit's ``samples`` list of dicts); unset
    fields take the ``sample`` section's. A plain string may carry kohya's flags instead."""

    prompt: str
    negative_prompt: str | None = None
    width: int | None = Field(default=None, ge=8)
    height: int | None = Field(default=None, ge=8)
    seed: int | None = None
    steps: int | None = Field(default=None, ge=1)
    guidance_scale: float | None = Field(default=None, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _aliases(cls, data: Any) -> Any:
        """ai-toolkit's and kohya's names for the same settings."""
        if isinstance(data, dict):
            names = {"neg": "negative_prompt", "cfg": "guidance_scale", "sample_steps": "steps"}
            data = {names.get(k, k): v for k, v in data.items()}
        return data

    @classmethod
    def from_line(cls, text: str) -> SamplePrompt:
        """kohya's prompt line: ``a cat --w 512 --h 768 --d 42 --l 7.5 --s 28 --n blurry, low quality``; a
        flag's value runs to the next flag, so a negative prompt may hold spaces and commas."""
        parts = text.split(" --")
        fields: dict[str, Any] = {"prompt": parts[0].strip()}
        for part in parts[1:]:
            flag, _, value = part.partition(" ")
            name = PROMPT_FLAGS.get(flag)
            if name is None:
                known = " ".join(f"--{f}" for f in PROMPT_FLAGS)
                raise ValueError(f"unknown flag --{flag} in {text!r}; known: {known}")
            fields[name] = value.strip()
        return cls.model_validate(fields)


PROMPT_FLAGS = {
    "w": "width",
    "h": "height",
    "d": "seed",
    "l": "guidance_scale",
    "s": "steps",
    "n": "negative_prompt",
}
"""kohya's sample prompt flags (sd-scripts' ``--sample_prompts`` file format)."""


class SampleConfig(Strict):
    every: int | None = Field(default=None, ge=1, description="sample grid every N steps; null: only at end")
    prompts: list[str | SamplePrompt] = Field(
        default_factory=list,
        description="one grid row each: a string (kohya flags --w --h --d --l --s --n allowed) or a mapping",
    )
    negative_prompt: str = ""
    steps: int = Field(default=25, ge=1)
    guidance_scale: float = Field(default=4.0, ge=0)
    sampler: str | None = Field(default=None, description="null: the family's (DDIM; Flow Euler for flow)")
    seed: int = 0
    images_per_prompt: int = Field(default=4, ge=1)
    width: int | None = Field(default=None, ge=8, description="null: the model's training size")
    height: int | None = Field(default=None, ge=8, description="null: the model's training size")
    walk_seed: bool = Field(default=False, description="row i starts at seed + i x images_per_prompt")

    @field_validator("prompts", mode="after")
    @classmethod
    def _prompt_flags(cls, prompts: list[str | SamplePrompt]) -> list[str | SamplePrompt]:
        """Read kohya's flags now, so a typo fails at load time naming sample.prompts."""
        return [SamplePrompt.from_line(p) if isinstance(p, str) and " --" in p else p for p in prompts]


class WandbConfig(Strict):
    """Weights & Biases logging (``pip install wandb``); the same scalars, sample grids and the config."""

    project: str = Field(default="eridiffusion", min_length=1)
    entity: str | None = None
    mode: Literal["online", "offline", "disabled"] = Field(
        default="online", description="offline writes a local run folder to sync later with `wandb sync`"
    )
    run_name: str | None = Field(default=None, description="null: the job's name")
    tags: list[str] = Field(default_factory=list)


class LoggingConfig(Strict):
    tensorboard: bool = True
    wandb: WandbConfig | None = Field(default=None, description="null: no W&B logging")
    log_every: int = Field(default=10, ge=1)
    progress: bool = True


class EvalConfig(Strict):
    prompts_file: str | None = Field(default=None, description="one prompt per line; default: dataset's")
    images_per_prompt: int = Field(default=8, ge=1)
    steps: int = Field(default=25, ge=1)
    guidance_scale: float = Field(default=4.0, ge=0)
    sampler: str = "ddim"
    seed: int = 1234


class GroupConfig(Strict):
    """Optimizer and LR schedule of one component group inside a pipeline step."""

    type: OptimizerName = "adamw"
    lr: float = Field(default=1e-4, gt=0)
    weight_decay: float = Field(default=0.01, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(default=1e-8, gt=0)
    params: dict[str, Any] = Field(
        default_factory=dict, description="extra optimizer constructor arguments (as train.optimizer.params)"
    )
    lr_scheduler: SchedulerName = "constant"
    lr_warmup_steps: int = Field(default=0, ge=0)
    lr_cycles: int = Field(default=1, ge=1, description="cosine_with_restarts: number of cosine cycles")
    lr_power: float = Field(default=1.0, gt=0, description="polynomial: decay exponent (1 = linear)")

    @model_validator(mode="after")
    def _schedule_allowed(self) -> GroupConfig:
        problem = schedule_conflict(self.type, self.params, self.lr_scheduler, self.lr_warmup_steps)
        if problem:
            raise ValueError(f"type {problem}")
        return self


VAL_METRIC = "val/loss"
"""The validation loss's name in logs, and as a ``loss_threshold`` transition's metric."""


class ValidationConfig(Strict):
    """How the held-out images (``datasets[].validation_split``, ``is_val`` sets) are scored: the same
    images, timesteps and noise at every evaluation, so the curve moves only when the weights do."""

    every: int | None = Field(
        default=None, ge=1, description="evaluate every N steps; null: only at the end of each step/stage"
    )
    timesteps: int = Field(default=8, ge=1, le=1000, description="fixed timesteps per image (quantiles)")
    seed: int | None = Field(default=None, description="seed of the fixed noise; null: train.seed")
    batch_size: int | None = Field(default=None, ge=1, description="images per forward; null: train's")
    use_ema: bool = Field(default=True, description="score the EMA weights when EMA is on")

    @model_validator(mode="before")
    @classmethod
    def _aliases(cls, data: Any) -> Any:
        """kohya's and SimpleTuner's names for the same settings."""
        if isinstance(data, dict):
            names = {
                "validate_every_n_steps": "every",
                "eval_steps_interval": "every",
                "validation_seed": "seed",
                "eval_timesteps": "timesteps",
            }
            renamed = [names.get(k, k) for k in data]
            dup = sorted({k for k in renamed if renamed.count(k) > 1})
            if dup:
                raise ValueError(f"{dup[0]} is given twice (once by an alias); keep one of them")
            data = {names.get(k, k): v for k, v in data.items()}
        return data


class TransitionConfig(Strict):
    """When a step ends: after its epochs, after its steps, or once a smoothed metric stays below a bound."""

    type: Literal["epoch", "steps", "loss_threshold"] = "steps"
    metric: str = Field(
        default="loss", description="logged metric watched by loss_threshold; val/loss: the validation loss"
    )
    threshold: float | None = Field(default=None, description="loss_threshold: end once metric < threshold")
    patience: int = Field(default=1, ge=1, description="consecutive logged values below the threshold")
    min_steps: int = Field(default=0, ge=0, description="never end a loss_threshold step before this")
    smoothing: float = Field(default=0.9, ge=0, lt=1, description="EMA smoothing of the watched metric")

    @property
    def watches_validation(self) -> bool:
        return self.type == "loss_threshold" and self.metric == VAL_METRIC

    @model_validator(mode="after")
    def _threshold_given(self) -> TransitionConfig:
        if self.type == "loss_threshold" and self.threshold is None:
            raise ValueError("transition.type loss_threshold needs transition.threshold")
        return self


class AutoencoderStageConfig(Strict):
    """Loss settings of an ``autoencoder`` step (reconstruction + KL + optional patch-GAN)."""

    kl_weight: float = Field(default=1e-6, ge=0)
    mse_weight: float = Field(
        default=0.0, ge=0, description="add this x MSE to the L1 reconstruction loss (punishes colour shifts)"
    )
    discriminator: bool = Field(default=False, description="train a patch-GAN discriminator alongside")
    disc_weight: float = Field(default=0.1, ge=0)
    disc_start: int = Field(default=0, ge=0, description="steps of this stage before the GAN terms start")
    disc_channels: int = Field(default=32, ge=8)
    latent_norm: Literal["global", "channel"] = Field(
        default="global",
        description="global: scaling_factor = 1/std (Stable Diffusion); channel: per-channel mean/std (tiny)",
    )


class StageConfig(Strict):
    """One step of a multi-stage pipeline (``pipeline.defaults`` are merged into it first)."""

    name: str = Field(pattern=r"^[A-Za-z0-9._-]+$")
    kind: Literal["diffusion", "autoencoder"] = "diffusion"
    trainable: list[str] = Field(
        min_length=1, description="components trained: denoiser, text_encoder, vae, discriminator, lora"
    )
    frozen: list[str] = Field(default_factory=list, description="components explicitly kept frozen")
    optimizers: dict[str, GroupConfig] = Field(
        default_factory=dict, description="per trainable component; missing ones use `default`"
    )
    max_steps: int | None = Field(default=None, ge=1)
    n_epochs: int | None = Field(default=None, ge=1)
    transition: TransitionConfig = Field(default_factory=TransitionConfig)
    batch_size: int | None = Field(default=None, ge=1, description="null: train.batch_size")
    network: NetworkConfig | None = Field(default=None, description="adapter for a `lora` component")
    autoencoder: AutoencoderStageConfig = Field(default_factory=AutoencoderStageConfig)
    datasets: list[DatasetConfig] | None = Field(default=None, description="null: the job's datasets")
    ema: EMAConfig | None = Field(
        default=None, description="null: train.ema; averages the trainable weights, not a discriminator"
    )
    eval: EvalConfig | None = Field(
        default=None, description="score the step's result (prompt adherence) into the pipeline summary"
    )

    @model_validator(mode="after")
    def _consistent(self) -> StageConfig:
        if (self.max_steps is None) == (self.n_epochs is None):
            raise ValueError("give exactly one of max_steps or n_epochs")
        both = set(self.trainable) & set(self.frozen)
        if both:
            raise ValueError(f"components both trainable and frozen: {sorted(both)}")
        if ("lora" in self.trainable) != (self.network is not None):
            raise ValueError("a `lora` trainable component and a `network` section go together")
        if self.transition.type == "epoch" and self.n_epochs is None:
            raise ValueError("transition.type epoch needs n_epochs")
        unknown = set(self.optimizers) - set(self.trainable) - {"default"}
        if unknown:
            raise ValueError(f"optimizers for components this step does not train: {sorted(unknown)}")
        return self


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        out[key] = (
            _deep_merge(out[key], value)
            if isinstance(value, dict) and isinstance(out.get(key), dict)
            else value
        )
    return out


class PipelineConfig(Strict):
    """Several training steps run in order; a config without ``pipeline`` is a single-stage run."""

    defaults: dict[str, Any] = Field(default_factory=dict, description="merged into every step")
    steps: list[StageConfig] = Field(min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _apply_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("steps"), list):
            defaults = data.get("defaults") or {}
            data = {
                **data,
                "steps": [_deep_merge(defaults, s) if isinstance(s, dict) else s for s in data["steps"]],
            }
        return data

    @model_validator(mode="after")
    def _unique_names(self) -> PipelineConfig:
        names = [s.name for s in self.steps]
        if len(set(names)) != len(names):
            raise ValueError(f"step names must be unique, got {names}")
        return self


class JobConfig(Strict):
    """A whole training job: ``eri train`` reads one of these."""

    name: str = Field(pattern=r"^[A-Za-z0-9._-]+$")
    output_dir: str = "output"

    @field_validator("name")
    @classmethod
    def _a_folder_of_its_own(cls, name: str) -> str:
        """``.`` or ``..`` would make the run folder output_dir itself or its parent (moved aside or filled
        with checkpoints): a run needs a folder of its own."""
        if set(name) == {"."}:
            raise ValueError(f"{name!r} names no folder of its own inside output_dir; choose a run name")
        return name

    model: ModelConfig = Field(default_factory=ModelConfig)
    network: NetworkConfig | None = None
    pipeline: PipelineConfig | None = None
    train: TrainConfig = Field(default_factory=TrainConfig)
    save: SaveConfig = Field(default_factory=SaveConfig)
    sample: SampleConfig = Field(default_factory=SampleConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    datasets: list[DatasetConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _not_only_regularisation(self) -> JobConfig:
        """Regularisation sets are drawn as often as the training sets, so at least one must exist."""
        if all(d.is_reg for d in self.datasets):
            raise ValueError("every dataset has is_reg: true; at least one must hold the images to learn")
        if all(d.is_reg or d.is_val for d in self.datasets):
            raise ValueError("every dataset has is_reg or is_val: true; one must hold images to train on")
        return self

    @model_validator(mode="after")
    def _validation_needs_a_set(self) -> JobConfig:
        """Validation settings without held-out images would silently do nothing."""
        lists = [self.datasets, *(s.datasets or [] for s in (self.pipeline.steps if self.pipeline else []))]
        if any(d.is_val or d.validation_split for ds in lists for d in ds):
            if self.save.keep_best and self.validation.every is None:
                raise ValueError(
                    "save.keep_best needs validation.every (without it val/loss is computed only at the end)"
                )
            return self
        how = "set datasets[i].validation_split: 0.1 or add a dataset with is_val: true"
        if self.save.keep_best:
            raise ValueError(f"save.keep_best ranks checkpoints by val/loss but no image is held out; {how}")
        if self.validation != ValidationConfig():  # the defaults, as dump_config writes them, are fine
            raise ValueError(f"validation: no dataset holds images out for it; {how}")
        return self

    @model_validator(mode="after")
    def _bf16_weights_trained_in_full(self) -> JobConfig:
        """``train.weights_dtype`` is the dtype of fully trained components; an adapter's few weights stay
        fp32, so the setting would do nothing there and is refused rather than ignored."""
        if self.train.weights_dtype != "bf16":
            return self
        if self.network is not None:
            raise ValueError(
                "train.weights_dtype bf16 is for full fine-tunes; an adapter (network) trains fp32 weights. "
                "Remove it (model.dtype: bf16 stores the frozen base in bf16)"
            )
        for i, step in enumerate(self.pipeline.steps if self.pipeline else []):
            if step.kind == "autoencoder":
                raise ValueError(
                    f"pipeline.steps[{i}] ({step.name}): train.weights_dtype bf16 covers diffusion steps; "
                    "train the autoencoder with weights_dtype: fp32"
                )
            for name, group in step.optimizers.items():
                if group.type in CHUNKED_STEP_REFUSED:
                    raise ValueError(
                        f"pipeline.steps[{i}].optimizers.{name}.type {group.type} with train.weights_dtype "
                        f"bf16: {CHUNKED_STEP_REFUSED[group.type]}"
                    )
        return self

    @model_validator(mode="after")
    def _preservation_trains_an_adapter(self) -> JobConfig:
        """Output preservation compares the model with its adapter on and off, so it needs an adapter and
        a trigger word to replace; in a pipeline it applies to the steps that train ``lora``."""
        if not self.train.diff_output_preservation:
            return self
        key = "train.diff_output_preservation"
        if self.pipeline is None:
            adapter_steps = [self.datasets] if self.network is not None else []
        else:
            steps = self.pipeline.steps
            adapter_steps = [s.datasets or self.datasets for s in steps if "lora" in s.trainable]
        if not adapter_steps:
            raise ValueError(
                f"{key} needs adapter training (a network section, or a pipeline step that trains lora): "
                "with no adapter to turn off there is no base to compare with; remove it for a full fine-tune"
            )
        if any(not any(d.trigger_word for d in datasets) for datasets in adapter_steps):
            raise ValueError(
                f"{key} replaces the trigger word by diff_output_preservation_class: set "
                "datasets[].trigger_word on the datasets the adapter learns"
            )
        if any(d.cache_text_embeddings for datasets in adapter_steps for d in datasets):
            raise ValueError(
                f"{key} encodes each caption again with the class word, which a text-embedding cache does "
                "not hold; set cache_text_embeddings: false on the adapter's datasets"
            )
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name
