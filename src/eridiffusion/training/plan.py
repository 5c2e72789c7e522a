"""``eri validate``: check what a run needs and describe it, without training."""

from __future__ import annotations

import torch

from eridiffusion.config.load import ConfigError
from eridiffusion.config.schema import JobConfig
from eridiffusion.data.masks import mask_notes
from eridiffusion.data.vocabulary import job_captions
from eridiffusion.inference.samplers import check_sampler
from eridiffusion.models.meta import weightless_loading
from eridiffusion.models.prompts import find_truncations
from eridiffusion.models.protocol import ModelFamily
from eridiffusion.networks import attach_network
from eridiffusion.training.block_swap import swap_problem, swapped_blocks
from eridiffusion.training.loop import load_or_build
from eridiffusion.training.losses import min_snr_problem
from eridiffusion.training.pipeline import StagePlan, plan_stages, stage_parameter_counts
from eridiffusion.training.preflight import preflight_problems
from eridiffusion.training.preservation import describe as describe_preservation
from eridiffusion.training.validation import planned_validation


def describe_plan(cfg: JobConfig) -> str:
    """The plan as text; raises ConfigError listing every problem found.

    Weight-free checks run first (see :mod:`preflight`) and stop the plan before any model is read. The
    model is then built on the meta device: from scratch, or from a diffusers folder's config files
    (shapes only, no memory, full size in a second); a single-file checkpoint is read as training reads it.
    """
    images, problems = preflight_problems(cfg)
    if problems:
        raise ConfigError("config problems:\n" + "\n".join(f"  {p}" for p in problems))
    family = None
    try:
        with torch.device("meta"), weightless_loading():
            family = load_or_build(cfg)
    except (ValueError, FileNotFoundError) as exc:
        problems.append(f"model: {exc}")
    if family is not None:
        problems += _family_problems(cfg, family)
    adapter_params = 0
    if family is not None and cfg.network is not None and cfg.pipeline is None and not problems:
        try:  # on meta weights: finds targets matching nothing and init_from files that do not fit
            with torch.device("meta"):
                adapted = attach_network(family, cfg.network, cfg.train.train_text_encoder, cfg.train.seed)
            adapter_params = sum(p.numel() for p in adapted.values())
        except (ValueError, FileNotFoundError) as exc:
            problems.append(str(exc) if str(exc).startswith("network") else f"network: {exc}")
    plans = []
    if family is not None and cfg.pipeline is not None:
        plans, stage_problems = plan_stages(cfg, family)
        problems += stage_problems
    if problems:
        raise ConfigError("config problems:\n" + "\n".join(f"  {p}" for p in problems))
    notes = planned_validation(cfg)[0] + describe_preservation(cfg) + _caption_notes(cfg, family)
    notes += mask_notes(cfg.datasets)
    if cfg.pipeline is not None:
        return "\n".join([_describe_pipeline(cfg, family, plans), *notes])

    t = cfg.train
    trainable = family.trainable_modules(t.train_text_encoder)
    # base weights only: adapter tensors (named lora_*, hada_*, lokr_*) are counted on the network line
    counts = {
        name: sum(p.numel() for pname, p in m.named_parameters() if not _is_adapter_tensor(pname))
        for name, m in family.modules().items()
    }
    per_step = t.batch_size * t.gradient_accumulation_steps
    lines = [
        f"job {cfg.name}: {family.arch} -> {cfg.run_dir}",
        f"  model: {cfg.model.name_or_path or 'built from scratch'}; objective "
        f"{family.objective.prediction_type}",
    ]
    net = cfg.network
    role = "adapted" if net is not None else "trained"
    for name, n in counts.items():
        lines.append(f"    {name}: {n:,} params ({role if name in trainable else 'frozen'})")
    if net is not None:
        lines.append(
            f"  network: {net.type} rank {net.linear} (alpha {net.linear_alpha:g}"
            + (f", conv rank {net.conv}" if net.conv else "")
            + f"): {adapter_params:,} params trained"
        )
    lines += [
        f"  data: {images} images per epoch in {len(cfg.datasets)} dataset(s)",
        f"  steps: {t.steps} x {per_step} images = {t.steps * per_step / max(1, images):.1f} epochs",
        f"  optimizer: {t.optimizer.type} lr {t.lr:g}, {t.lr_scheduler} schedule, warmup {t.lr_warmup_steps}",
        f"  checkpoints every {cfg.save.every} steps, keeping {cfg.save.keep}",
        *_swap_line(cfg, family),
        *notes,
    ]
    return "\n".join(lines)


def _swap_line(cfg: JobConfig, family: ModelFamily) -> list[str]:
    n = cfg.train.blocks_to_swap
    if not n:
        return []
    blocks = swapped_blocks(family, n)
    return [f"  block swap: the last {len(blocks)} denoiser blocks take turns in 2 places on the device"]


def _caption_notes(cfg: JobConfig, family: ModelFamily) -> list[str]:
    """The data scan's warning about captions the text encoders would cut, for the plan's reader."""
    return [
        f"  warning: {t.message('distinct captions')}" for t in find_truncations(family, job_captions(cfg))
    ]


def _describe_pipeline(cfg: JobConfig, family: ModelFamily, plans: list[StagePlan]) -> str:
    lines = [f"job {cfg.name}: {family.arch} pipeline of {len(plans)} step(s) -> {cfg.run_dir}"]
    total = 0
    for plan in plans:
        stage = plan.config
        counts = stage_parameter_counts(family, stage)
        total += plan.steps
        rule = stage.transition
        ends = {
            "steps": f"after {plan.steps} steps",
            "epoch": f"after {stage.n_epochs} epoch(s)",
            "loss_threshold": f"when smoothed {rule.metric} < {rule.threshold} for {rule.patience} "
            f"step(s) (from step {rule.min_steps}; at most {plan.steps})",
        }[rule.type]
        lines.append(
            f"  [{plan.index}] {stage.name} ({stage.kind}): {plan.images} images, batch "
            f"{plan.batch_size}, up to {plan.steps} steps; ends {ends}"
        )
        for comp, n in counts.items():
            lines.append(f"      trains {comp}: {n:,} params")
        frozen = sorted(set(family.modules()) - set(stage.trainable))
        lines.append(f"      frozen: {', '.join(frozen) or 'nothing'}")
    lines.append(f"  total: up to {total} optimizer steps; checkpoints every {cfg.save.every} steps")
    return "\n".join(lines)


def _family_problems(cfg: JobConfig, family: ModelFamily) -> list[str]:
    """What training checks once the model exists: sampler vs objective, image sizes vs the model."""
    problems = []
    if cfg.sample.prompts and cfg.sample.sampler:
        try:
            check_sampler(cfg.sample.sampler, family.objective.prediction_type)
        except ValueError as exc:
            problems.append(f"sample.sampler: {exc}")
    snr_problem = min_snr_problem(family.objective.prediction_type)
    if cfg.train.min_snr_gamma is not None and snr_problem:
        problems.append(snr_problem)
    swap = swap_problem(family, cfg.train.blocks_to_swap)
    if swap:
        problems.append(swap)
    for i, d in enumerate(cfg.datasets):
        for resolution in d.resolutions:
            try:
                family.check_size(resolution, resolution)
            except ValueError as exc:
                problems.append(f"datasets[{i}].resolution: {exc}")
    return problems


def _is_adapter_tensor(name: str) -> bool:
    return any(part.startswith(("lora_", "hada_", "lokr_")) for part in name.split("."))
