"""``eri validate``: check what a run needs and describe it, without training."""

from __future__ import annotations

from eridiffusion.config.load import ConfigError, unsupported_settings
from eridiffusion.config.schema import JobConfig, OptimizerConfig
from eridiffusion.inference.samplers import check_sampler, resolve_sampler
from eridiffusion.models.protocol import ModelFamily
from eridiffusion.training.loop import load_or_build
from eridiffusion.training.optim import optimizer_problems
from eridiffusion.training.pipeline import StagePlan, estimate_images, plan_stages, stage_parameter_counts


def describe_plan(cfg: JobConfig) -> str:
    """The plan as text; raises ConfigError listing every problem found."""
    images, problems = estimate_images(cfg.datasets, "datasets")
    problems += _optimizer_problems(cfg) + unsupported_settings(cfg)
    for where, name in (("sample.sampler", cfg.sample.sampler), ("eval.sampler", cfg.eval.sampler)):
        try:
            resolve_sampler(name)
        except ValueError as exc:
            problems.append(f"{where}: {exc}")
    family = None
    try:
        family = load_or_build(cfg)
    except (ValueError, FileNotFoundError) as exc:
        problems.append(f"model: {exc}")
    if family is not None and cfg.sample.prompts:
        try:
            check_sampler(cfg.sample.sampler, family.objective.prediction_type)
        except ValueError as exc:
            problems.append(f"sample.sampler: {exc}")
    plans = []
    if family is not None and cfg.pipeline is not None:
        plans, stage_problems = plan_stages(cfg, family)
        problems += stage_problems
    if problems:
        raise ConfigError("config problems:\n" + "\n".join(f"  {p}" for p in problems))
    if cfg.pipeline is not None:
        return _describe_pipeline(cfg, family, plans)

    t = cfg.train
    trainable = family.trainable_modules(t.train_text_encoder)
    counts = {name: sum(p.numel() for p in m.parameters()) for name, m in family.modules().items()}
    per_step = t.batch_size * t.gradient_accumulation_steps
    lines = [
        f"job {cfg.name}: {family.arch} -> {cfg.run_dir}",
        f"  model: {cfg.model.name_or_path or 'built from scratch'}; objective "
        f"{family.objective.prediction_type}",
    ]
    for name, n in counts.items():
        lines.append(f"    {name}: {n:,} params ({'trained' if name in trainable else 'frozen'})")
    lines += [
        f"  data: {images} images per epoch in {len(cfg.datasets)} dataset(s)",
        f"  steps: {t.steps} x {per_step} images = {t.steps * per_step / max(1, images):.1f} epochs",
        f"  optimizer: {t.optimizer.type} lr {t.lr:g}, {t.lr_scheduler} schedule, warmup {t.lr_warmup_steps}",
        f"  checkpoints every {cfg.save.every} steps, keeping {cfg.save.keep}",
    ]
    return "\n".join(lines)


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


def _optimizer_problems(cfg: JobConfig) -> list[str]:
    """Missing optimizer packages and constructor arguments the optimizer does not take, per YAML path."""
    problems = optimizer_problems(cfg.train.optimizer)
    for i, stage in enumerate(cfg.pipeline.steps if cfg.pipeline else []):
        for comp, g in stage.optimizers.items():
            group = OptimizerConfig(type=g.type, params=g.params)
            problems += optimizer_problems(group, f"pipeline.steps[{i}].optimizers.{comp}")
    return problems
