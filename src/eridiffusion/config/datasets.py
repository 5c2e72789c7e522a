"""The ``datasets`` sections: where training images come from and how they are read, cropped and cached."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from eridiffusion.config.base import Strict


class SyntheticConfig(Strict):
    """Generate the dataset folder if it is missing (the embedded quickstart needs no downloads)."""

    kind: Literal["shapes"] = "shapes"
    n: int = Field(default=2000, ge=1)
    resolution: int = Field(default=32, ge=8)
    seed: int = 0
    colours: list[str] | None = Field(
        default=None, description="only these colours (may include new-concept ones: black); null: the six"
    )
    held_out: list[str] | None = Field(
        default=None, description="'colour shape' pairs never drawn; null: the default held-out pairs"
    )
    captions: Literal["full", "varied"] = Field(
        default="full", description="varied: size and position words each in half the captions"
    )


class DatasetConfig(Strict):
    """One source of training images: a folder (image + caption files or metadata.jsonl) or tar shards.

    Names follow ai-toolkit / kohya where they exist. Combinations that cannot work (random crops with a
    latent cache, shuffled tags with a text-embedding cache) are refused here, before any image is read.
    """

    folder_path: str | None = Field(default=None, description="folder of images with captions")
    shards: str | list[str] | None = Field(
        default=None, description="webdataset-style .tar shards: 'data/{000..009}.tar' or a list"
    )
    caption_ext: str = "txt"
    resolution: int | list[int] = Field(default=512, description="square side(s); several = multi-resolution")
    caption_dropout_rate: float = Field(default=0.0, ge=0, le=1)
    flip_x: bool = False
    num_repeats: int = Field(default=1, ge=1)
    weight: float = Field(default=1.0, gt=0, description="multiplies how often this set is drawn per epoch")
    is_reg: bool = Field(default=False, description="regularisation (prior-preservation) images")
    is_val: bool = Field(default=False, description="validation images: never trained on, only evaluated")
    validation_split: float = Field(
        default=0.0, ge=0, lt=1, description="fraction of this folder's images held out for validation"
    )
    loss_weight: float = Field(default=1.0, gt=0, description="loss multiplier (kohya's prior_loss_weight)")
    trigger_word: str | None = Field(default=None, description="replaces [trigger]; prepended if absent")
    shuffle_tokens: bool = Field(default=False, description="shuffle comma-separated caption tags")
    keep_tokens: int = Field(default=0, ge=0, description="leading tags kept in place when shuffling")
    crop: Literal["center", "random"] = "center"
    enable_buckets: bool = Field(default=True, description="aspect-ratio buckets instead of square crops")
    bucket_no_upscale: bool = Field(default=False, description="never enlarge an image to reach its bucket")
    bucket_step: int | None = Field(
        default=None, ge=1, description="bucket side step (kohya's bucket_reso_steps); null: model's multiple"
    )
    cache_latents_to_disk: bool = False
    cache_text_embeddings: bool = False
    cache_dir: str | None = Field(default=None, description="default: .eri_cache inside the dataset folder")
    synthetic: SyntheticConfig | None = None
    mask_path: str | None = Field(
        default=None, description="folder of loss masks named like the images (kohya's conditioning_data_dir)"
    )
    alpha_mask: bool = Field(
        default=False, description="each image's alpha channel is its loss mask (kohya, ai-toolkit)"
    )
    unmasked_weight: float = Field(
        default=0.0, ge=0, le=1, description="loss weight of black mask pixels (ai-toolkit's mask_min_value)"
    )
    normalize_masked_area_loss: bool = Field(
        default=False, description="divide a masked image's loss by its mean mask weight (as OneTrainer)"
    )
    class_prompt: str | None = Field(
        default=None,
        description="is_reg sets: generate missing class images from this prompt with the base model",
    )
    num_class_images: int = Field(
        default=100, ge=1, description="with class_prompt: fill folder_path up to this many images"
    )

    @model_validator(mode="before")
    @classmethod
    def _validation_aliases(cls, data: Any) -> Any:
        """OneTrainer's ``validation_concept`` and the spelled-out ``is_validation`` mean ``is_val``."""
        if isinstance(data, dict):
            for alias in ("is_validation", "validation_concept"):
                if alias in data:
                    if "is_val" in data:
                        raise ValueError(f"{alias} is an alias of is_val; keep one of them")
                    data = {**{k: v for k, v in data.items() if k != alias}, "is_val": data[alias]}
        return data

    @model_validator(mode="before")
    @classmethod
    def _diffusers_names(cls, data: Any) -> Any:
        """diffusers' DreamBooth spellings: ``class_data_dir`` is the class set's folder_path and
        ``prior_loss_weight`` its loss_weight."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for alias, name in (("class_data_dir", "folder_path"), ("prior_loss_weight", "loss_weight")):
            if alias in data:
                if name in data:
                    raise ValueError(f"{alias} and {name} name the same setting; give one of them")
                data[name] = data.pop(alias)
        return data

    @property
    def resolutions(self) -> list[int]:
        return [self.resolution] if isinstance(self.resolution, int) else list(self.resolution)

    @field_validator("resolution")
    @classmethod
    def _sizes(cls, value: int | list[int]) -> int | list[int]:
        """Checked on the field itself so the error names ``datasets[i].resolution``."""
        sizes = [value] if isinstance(value, int) else list(value)
        if not sizes or any(r < 8 for r in sizes):
            raise ValueError("must be >= 8 (or a non-empty list of such)")
        if len(set(sizes)) != len(sizes):
            raise ValueError("lists a size more than once; list each size once")
        return value

    @model_validator(mode="after")
    def _coherent(self) -> DatasetConfig:
        if (self.folder_path is None) == (self.shards is None):
            raise ValueError("set exactly one of folder_path (a folder of images) or shards (.tar files)")
        if self.synthetic is not None and self.folder_path is None:
            raise ValueError("synthetic needs folder_path (the folder it generates into)")
        if (self.bucket_no_upscale or self.bucket_step is not None) and not self.enable_buckets:
            raise ValueError("bucket_no_upscale and bucket_step need enable_buckets: true")
        if self.cache_latents_to_disk and self.crop == "random":
            raise ValueError(
                "crop: random gives a new crop every epoch, which a latent cache cannot hold; "
                "use crop: center or cache_latents_to_disk: false"
            )
        if self.cache_text_embeddings and self.shuffle_tokens:
            raise ValueError(
                "shuffle_tokens makes a new caption every epoch, which a text-embedding cache cannot hold; "
                "turn off one of shuffle_tokens or cache_text_embeddings"
            )
        if self.shards is not None and (self.mask_path is not None or self.alpha_mask):
            raise ValueError("loss masks (mask_path, alpha_mask) need folder_path; shards carry no masks")
        if self.mask_path is not None and self.alpha_mask:
            raise ValueError("set one of mask_path (mask images) or alpha_mask (the images' alpha channel)")
        if self.is_val and (self.is_reg or self.validation_split):
            raise ValueError("is_val: a validation set is neither is_reg nor split again (validation_split)")
        if self.validation_split and self.shards is not None:
            raise ValueError(
                "validation_split needs folder_path: streamed shards cannot be split; hold images out "
                "with a separate dataset entry with is_val: true"
            )
        if self.class_prompt is not None and (not self.is_reg or self.folder_path is None or self.synthetic):
            raise ValueError(
                "class_prompt generates regularisation images into folder_path: it needs is_reg: true and "
                "folder_path (class_data_dir), and no synthetic section"
            )
        if self.shards is not None and (self.cache_latents_to_disk or self.cache_text_embeddings):
            raise ValueError(
                "tar shards are streamed and never cached (they are meant for data larger than the disk "
                "cache); unpack them into a folder to use cache_latents_to_disk / cache_text_embeddings"
            )
        return self
