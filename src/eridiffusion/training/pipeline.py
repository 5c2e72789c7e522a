"""Planning multi-stage pipelines: ``pipeline.steps`` run in order, each with its own trainable components,
optimizers, LR schedules and end rule. This module resolves and checks the plan (``eri validate`` prints it);
:mod:`eridiffusion.training.loop` runs it.

A stage starts from the model the previous stage left (saved under ``stages/<n>-<name>/model`` so a resumed
run can rebuild it), trains the components it lists while everything else is frozen, and ends by its
``transition``. Checkpoints carry the pipeline position (stage, stage step, micro-batch, the watched metric)
so a killed run resumes mid-stage exactly where it stopped; the pipeline config is stored with them and a
changed one is refused with the paths that differ.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eridiffusion.config.schema import DatasetConfig, JobConfig, StageConfig
from eridiffusion.data.cache import encoder_names
from eridiffusion.data.folder import IMAGE_EXTENSIONS, beside_masks
from eridiffusion.data.validation import held_out_count
from eridiffusion.models import ModelFamily
from eridiffusion.networks.adapters import lora_parameter_count
from eridiffusion.networks.formats import is_adaptable
from eridiffusion.training.autoencoder import PatchDiscriminator

logger = logging.getLogger(__name__)

TRAINING_ONLY = {"discriminator", "lora"}
"""Components a stage may train that are not part of the model itself."""


@dataclass
class StagePlan:
    index: int
    config: StageConfig
    steps: int
    """Optimizer steps at most (max_steps, or n_epochs worth of batches)."""
    images: int
    batch_size: int
    """Per process."""
    single: bool = False
    """The job's only step (a config without ``pipeline``): its outputs sit at the top of the run folder."""


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(data, list):
        out = {}
        for i, v in enumerate(data):
            out.update(_flatten(v, f"{prefix}[{i}]"))
        return out
    return {prefix: data}


def pipeline_snapshot(cfg: JobConfig) -> dict[str, Any]:
    """What a resumed pipeline must agree with: the steps (after defaults), model and datasets, and the
    validation settings when a step ends on val/loss (they decide when it ends)."""
    assert cfg.pipeline is not None
    snapshot = {
        "steps": [s.model_dump(mode="json") for s in cfg.pipeline.steps],
        "model": cfg.model.model_dump(mode="json"),
        "datasets": [d.model_dump(mode="json") for d in cfg.datasets],
        "seed": cfg.train.seed,
        "ema": cfg.train.ema.model_dump(mode="json"),
    }
    if any(s.transition.watches_validation for s in cfg.pipeline.steps):
        snapshot["validation"] = cfg.validation.model_dump(mode="json")
    return json.loads(json.dumps(snapshot))


def changed_paths(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    a, b = _flatten(old), _flatten(new)
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def generated_folders(cfg: JobConfig) -> dict[str, int]:
    """Folders some dataset entry of the job generates (``synthetic``), with their image counts: a later
    pipeline step may read such a folder without repeating the ``synthetic`` section."""
    lists = [cfg.datasets, *(s.datasets or [] for s in (cfg.pipeline.steps if cfg.pipeline else []))]
    return {
        str(Path(d.folder_path)): d.synthetic.n
        for datasets in lists
        for d in datasets
        if d.synthetic is not None and d.folder_path is not None
    }


def estimate_images(
    datasets: list[DatasetConfig], where: str, generated: dict[str, int] | None = None
) -> tuple[int, list[str]]:
    """Images per epoch (with repeats) without reading or generating anything; (count, problems)."""
    images, problems = 0, []
    for i, d in enumerate(datasets):
        found = folder_images(d, generated)
        if found is None:  # tar shards: counted when they are indexed at train time
            continue
        if d.mask_path is not None and not Path(d.mask_path).is_dir():
            problems.append(f"{where}[{i}].mask_path: '{d.mask_path}' is not a folder of mask images")
        folder = Path(str(d.folder_path))
        if d.class_prompt is not None:  # filled up to num_class_images by the base model at train time
            images += max(found, d.num_class_images) * d.num_repeats
            if folder.exists() and not folder.is_dir():
                problems.append(f"{where}[{i}].folder_path: '{folder}' is a file; class images need a folder")
            continue
        if found == 0 and not folder.is_dir() and d.synthetic is None:
            problems.append(f"{where}[{i}].folder_path: '{folder}' does not exist")
        elif found == 0 and d.synthetic is None:
            problems.append(f"{where}[{i}].folder_path: no images in '{folder}'")
        if not d.is_val:  # validation images are never trained on
            images += (found - held_out_count(found, d.validation_split)) * d.num_repeats
    return images, problems


def folder_images(d: DatasetConfig, generated: dict[str, int] | None = None) -> int | None:
    """Images a folder dataset holds (or will hold, once generated), from file names alone; None for
    shards and 0 for a missing folder."""
    if d.folder_path is None:
        return None
    folder = Path(d.folder_path)
    if folder.is_dir():
        files = [p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS]
        return len(files) - len(set(beside_masks(files).values()))  # loss masks are not images
    if d.synthetic is not None:
        return d.synthetic.n
    return (generated or {}).get(str(folder), 0)


def stage_parameter_counts(family: ModelFamily, stage: StageConfig) -> dict[str, int]:
    """Trainable parameters per component of a stage, computed without changing the model."""
    counts = {}
    for comp in stage.trainable:
        if comp == "lora":
            assert stage.network is not None
            denoiser, text = stage.network.adapts(False)  # a pipeline step adapts what components says
            counts[comp] = sum(
                lora_parameter_count(module, stage.network)
                for name, module in family.modules().items()
                if is_adaptable(name) and (denoiser if name == "denoiser" else text)
            )
        elif comp == "discriminator":
            counts[comp] = sum(
                p.numel() for p in PatchDiscriminator(stage.autoencoder.disc_channels).parameters()
            )
        else:
            counts[comp] = sum(p.numel() for p in family.modules()[comp].parameters())
    return counts


def stage_datasets(cfg: JobConfig, stage: StageConfig) -> list[DatasetConfig]:
    """The step's datasets; an autoencoder step trains on pixels, so latent/text caches do not apply."""
    datasets = stage.datasets or cfg.datasets
    if stage.kind == "autoencoder":
        off = {"cache_latents_to_disk": False, "cache_text_embeddings": False}
        return [d.model_copy(update=off) for d in datasets]
    return datasets


def _cache_problems(family: ModelFamily, stage: StageConfig, where: str, cfg: JobConfig) -> list[str]:
    """A cache stands in for an encoder, so the encoder must stay frozen for the whole step."""
    if stage.kind == "autoencoder":
        return []
    datasets = stage_datasets(cfg, stage)
    image_names, text_names = encoder_names(family)
    problems = []
    if any(d.cache_latents_to_disk for d in datasets):
        trained = sorted(set(stage.trainable) & set(image_names))
        if trained:
            problems.append(
                f"{where}: cache_latents_to_disk needs a frozen {'/'.join(trained)}; this step trains it"
            )
    if any(d.cache_text_embeddings for d in datasets):
        trained = sorted(set(stage.trainable) & set(text_names))
        if trained:
            problems.append(
                f"{where}: cache_text_embeddings needs frozen text encoders; this step trains "
                f"{', '.join(trained)} (turn the text cache off for this step)"
            )
    return problems


def plan_stages(cfg: JobConfig, family: ModelFamily) -> tuple[list[StagePlan], list[str]]:
    """Resolve each stage's length and check its components against the model; (plans, problems)."""
    assert cfg.pipeline is not None
    plans, problems = [], []
    components = set(family.modules())
    generated = generated_folders(cfg)
    for i, stage in enumerate(cfg.pipeline.steps):
        where = f"pipeline.steps[{i}] ({stage.name})"
        for comp in [*stage.trainable, *stage.frozen]:
            if comp not in components | TRAINING_ONLY:
                problems.append(
                    f"{where}: unknown component {comp!r}; this {family.arch} model has "
                    f"{sorted(components | TRAINING_ONLY)}"
                )
        if stage.kind == "autoencoder" and "vae" not in components:
            problems.append(
                f"{where}: kind autoencoder needs a model with a vae "
                "(tiny: model.options.latent: autoencoder)"
            )
        if stage.autoencoder.latent_norm == "channel" and family.arch != "tiny":
            problems.append(
                f"{where}: autoencoder.latent_norm channel is read by the tiny family only; "
                f"{family.arch} uses the global scaling_factor"
            )
        if stage.kind == "autoencoder" and set(stage.trainable) - {"vae", "discriminator"}:
            problems.append(f"{where}: an autoencoder step trains only vae and discriminator")
        problems += _cache_problems(family, stage, where, cfg)
        if "discriminator" in stage.trainable and not stage.autoencoder.discriminator:
            problems.append(f"{where}: trainable discriminator needs autoencoder.discriminator: true")
        datasets = stage.datasets or cfg.datasets
        images, data_problems = estimate_images(datasets, f"{where}.datasets", generated)
        problems += data_problems
        batch = stage.batch_size or cfg.train.batch_size
        if images < batch:
            problems.append(f"{where}: batch size {batch} is larger than its {images} images")
            continue
        per_step = 1 if stage.kind == "autoencoder" else cfg.train.gradient_accumulation_steps
        steps = stage.max_steps or max(1, stage.n_epochs * (images // batch) // per_step)
        plans.append(StagePlan(i, stage, steps, images, batch))
    return plans, problems
