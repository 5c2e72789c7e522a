"""The YAML config schema.

Every section is a strict pydantic model: an unknown key is an error (peers that silently ignore a typo such
as ``learning_rate`` vs ``lr`` cost users whole training runs). Field names follow ai-toolkit where one
exists so configs port with few edits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Strict(BaseModel):
    """Base for every section: unknown keys rejected, values validated on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


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
        default="fp32", description="storage dtype of frozen weights; trained parameters stay fp32"
    )
    prediction_type: Literal["epsilon", "v_prediction"] | None = Field(
        default=None, description="override the checkpoint's prediction type (SD1.5/SDXL); null keeps it"
    )


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


class EMAConfig(Strict):
    enabled: bool = False
    decay: float = Field(default=0.999, gt=0, lt=1)
    warmup: bool = Field(default=True, description="ramp decay as (1+n)/(10+n) so early EMA is not stale")


class OptimizerConfig(Strict):
    type: Literal["adamw", "adamw8bit", "sgd"] = "adamw"
    weight_decay: float = Field(default=0.01, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(default=1e-8, gt=0)


class TrainConfig(Strict):
    """Optimisation settings; one ``step`` is one optimizer update (after accumulation)."""

    steps: int = Field(default=1000, ge=1)
    batch_size: int = Field(default=4, ge=1)
    gradient_accumulation_steps: int = Field(default=1, ge=1)
    lr: float = Field(default=1e-4, gt=0)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    lr_scheduler: Literal["constant", "cosine", "linear"] = "constant"
    lr_warmup_steps: int = Field(default=0, ge=0)
    max_grad_norm: float | None = Field(default=1.0, gt=0, description="null disables clipping")
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = Field(
        default="auto", description="auto: bf16 on CUDA devices that support it, otherwise fp32"
    )
    gradient_checkpointing: bool = False
    loss: Literal["mse", "l1", "huber"] = "mse"
    huber_delta: float = Field(default=0.1, gt=0)
    min_snr_gamma: float | None = Field(default=None, gt=0, description="Hang et al. 2023; 5.0 is typical")
    ema: EMAConfig = Field(default_factory=EMAConfig)
    train_text_encoder: bool = True
    seed: int = 42
    device: str = Field(default="auto", description="auto, cpu, cuda, cuda:1, ...")


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
    resume: bool | str = Field(
        default=True, description="true: resume from the latest checkpoint if any; a path: resume from it"
    )


class SampleConfig(Strict):
    every: int | None = Field(default=None, ge=1, description="sample grid every N steps; null: only at end")
    prompts: list[str] = Field(default_factory=list)
    negative_prompt: str = ""
    steps: int = Field(default=25, ge=1)
    guidance_scale: float = Field(default=4.0, ge=0)
    sampler: str = "ddim"
    seed: int = 0
    images_per_prompt: int = Field(default=4, ge=1)


class LoggingConfig(Strict):
    tensorboard: bool = True
    log_every: int = Field(default=10, ge=1)
    progress: bool = True


class SyntheticConfig(Strict):
    """Generate the dataset folder if it is missing (the embedded quickstart needs no downloads)."""

    kind: Literal["shapes"] = "shapes"
    n: int = Field(default=2000, ge=1)
    resolution: int = Field(default=32, ge=8)
    seed: int = 0


class DatasetConfig(Strict):
    folder_path: str
    caption_ext: str = "txt"
    resolution: int = Field(default=512, ge=8)
    caption_dropout_rate: float = Field(default=0.0, ge=0, le=1)
    flip_x: bool = False
    num_repeats: int = Field(default=1, ge=1)
    synthetic: SyntheticConfig | None = None


class EvalConfig(Strict):
    prompts_file: str | None = Field(default=None, description="one prompt per line; default: dataset's")
    images_per_prompt: int = Field(default=8, ge=1)
    steps: int = Field(default=25, ge=1)
    guidance_scale: float = Field(default=4.0, ge=0)
    sampler: str = "ddim"
    seed: int = 1234


class JobConfig(Strict):
    """A whole training job: ``eri train`` reads one of these."""

    name: str = Field(pattern=r"^[A-Za-z0-9._-]+$")
    output_dir: str = "output"
    model: ModelConfig = Field(default_factory=ModelConfig)
    network: NetworkConfig | None = None
    train: TrainConfig = Field(default_factory=TrainConfig)
    save: SaveConfig = Field(default_factory=SaveConfig)
    sample: SampleConfig = Field(default_factory=SampleConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    datasets: list[DatasetConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _one_resolution(self) -> JobConfig:
        """Square-crop training at one resolution for now; mixed sizes need buckets."""
        sizes = {d.resolution for d in self.datasets}
        if len(sizes) > 1:
            raise ValueError(f"all datasets must share one resolution for now, got {sorted(sizes)}")
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name
