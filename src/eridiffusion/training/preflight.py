"""Checks of a job that need no model weights: what ``eri train`` would refuse, found in a second.

``eri validate`` runs them first and stops there when any fails, so a typo never costs a model load;
the training loop calls :func:`check_before_loading` for the same reason. Everything here reads only the
config, the dataset folders' file names and model folders' config files (to tell the family).
"""

from __future__ import annotations

from pathlib import Path

from eridiffusion.config.load import ConfigError, unsupported_settings
from eridiffusion.config.schema import JobConfig, OptimizerConfig
from eridiffusion.device import resolve_device
from eridiffusion.inference.samplers import check_sampler, resolve_sampler
from eridiffusion.models import FAMILIES, detect_arch
from eridiffusion.models.hub import resolve_model_path
from eridiffusion.training.block_swap import config_problem
from eridiffusion.training.losses import min_snr_problem
from eridiffusion.training.optim import optimizer_problems
from eridiffusion.training.pipeline import estimate_images
from eridiffusion.training.validation import planned_validation


def planned_arch(cfg: JobConfig) -> tuple[str | None, list[str]]:
    """The family the job will use, from ``model.arch`` or the model's own files; (arch, problems)."""
    if cfg.model.name_or_path:
        try:
            path = resolve_model_path(cfg.model.name_or_path)
        except FileNotFoundError as exc:
            return None, [str(exc)]
        if cfg.model.arch is not None:
            return cfg.model.arch, []
        try:
            return detect_arch(Path(path)), []
        except ValueError as exc:
            return None, [f"model.name_or_path: {exc}"]
    if cfg.model.arch is None:
        return None, [
            "model.arch: set it to build a model from scratch, or set model.name_or_path to load one"
        ]
    return cfg.model.arch, []


def _objective_problems(cfg: JobConfig, arch: str) -> list[str]:
    """Settings that only fit some objectives, judged from the family alone (flow families are flow)."""
    if not FAMILIES[arch].flow_matching:
        return []
    problems = []
    snr_problem = min_snr_problem("flow")
    if cfg.train.min_snr_gamma is not None and snr_problem:
        problems.append(snr_problem)
    for key in ("noise_offset", "multires_noise_iterations"):
        if getattr(cfg.train, key):
            problems.append(
                f"train.{key}: shapes the noise of epsilon/v-prediction models; a flow-matching {arch} model "
                "interpolates between image and noise, where it would only shift the target (remove it)"
            )
    if cfg.sample.prompts and cfg.sample.sampler:
        try:
            check_sampler(cfg.sample.sampler, "flow")
        except ValueError as exc:
            problems.append(f"sample.sampler: {exc}")
    return problems


def _optimizer_problems(cfg: JobConfig) -> list[str]:
    """Missing optimizer packages and constructor arguments the optimizer does not take, per YAML path."""
    problems = optimizer_problems(cfg.train.optimizer)
    for i, stage in enumerate(cfg.pipeline.steps if cfg.pipeline else []):
        for comp, g in stage.optimizers.items():
            problems += optimizer_problems(
                OptimizerConfig(type=g.type), f"pipeline.steps[{i}].optimizers.{comp}"
            )
    return problems


def _data_problems(cfg: JobConfig, images: int) -> list[str]:
    problems = []
    t = cfg.train
    single = cfg.pipeline is None
    if single and images and t.batch_size > images and not any(d.shards for d in cfg.datasets):
        problems.append(
            f"train.batch_size: {t.batch_size} is larger than the {images} image(s) per epoch of the "
            f"datasets; set train.batch_size to at most {images} (or raise datasets[].num_repeats)"
        )
    if single and t.train_text_encoder and (cfg.network is None or cfg.network.adapts(True)[1]):
        for i, d in enumerate(cfg.datasets):
            if d.cache_text_embeddings:
                problems.append(
                    f"datasets[{i}].cache_text_embeddings: the text encoder is trained "
                    "(train.train_text_encoder: true), so its embeddings change every step; set "
                    "train.train_text_encoder: false or turn the cache off"
                )
    return problems + _text_adapter_cache_problems(cfg)


def _text_adapter_cache_problems(cfg: JobConfig) -> list[str]:
    """``network.components: [text_encoder]`` changes the text embeddings every step, like a trained text
    encoder, so they cannot come from a cache."""
    problems = []
    single = cfg.pipeline is None and not cfg.train.train_text_encoder  # else reported as a trained encoder
    jobs = [("network", cfg.network, cfg.datasets, "datasets")] if single else []
    for i, stage in enumerate(cfg.pipeline.steps if cfg.pipeline else []):
        where = f"pipeline.steps[{i}].datasets" if stage.datasets else "datasets"
        jobs.append((f"pipeline.steps[{i}].network", stage.network, stage.datasets or cfg.datasets, where))
    for key, network, datasets, where in jobs:
        if network is None or network.components is None or "text_encoder" not in network.components:
            continue
        for j, d in enumerate(datasets):
            if d.cache_text_embeddings:
                problems.append(
                    f"{where}[{j}].cache_text_embeddings: {key}.components adapts the text encoders, so "
                    "their embeddings change every step; turn the cache off or leave text_encoder out"
                )
    return problems


def preflight_problems(cfg: JobConfig) -> tuple[int, list[str]]:
    """(images per epoch, every problem found without loading a weight), each naming its YAML path."""
    images, problems = estimate_images(cfg.datasets, "datasets")
    for where, name in (("sample.sampler", cfg.sample.sampler), ("eval.sampler", cfg.eval.sampler)):
        if name is None:  # the family's default
            continue
        try:
            resolve_sampler(name)
        except ValueError as exc:
            problems.append(f"{where}: {exc}")
    try:
        resolve_device(cfg.train.device, "train.device")
    except ValueError as exc:
        problems.append(str(exc))
    problems += _optimizer_problems(cfg) + unsupported_settings(cfg) + _data_problems(cfg, images)
    swap = config_problem(cfg, cfg.train.blocks_to_swap)
    if swap:
        problems.append(swap)
    problems += planned_validation(cfg)[1]
    arch, arch_problems = planned_arch(cfg)
    problems += arch_problems
    if arch is not None and arch in FAMILIES:
        problems += _objective_problems(cfg, arch)
    return images, problems


def check_before_loading(cfg: JobConfig) -> None:
    """Raise one ConfigError listing every weight-free problem (the training loop calls this first)."""
    _, problems = preflight_problems(cfg)
    if problems:
        raise ConfigError("config problems:\n" + "\n".join(f"  {p}" for p in problems))
