"""Multi-stage training pipelines: ``pipeline.steps`` run in order, each with its own trainable components,
optimizers, LR schedules and end rule.

A stage starts from the model the previous stage left (saved under ``stages/<n>-<name>/model`` so a resumed
run can rebuild it), trains the components it lists while everything else is frozen, and ends by its
``transition``. Checkpoints carry the pipeline position (stage, stage step, micro-batch, the watched metric)
so a killed run resumes mid-stage exactly where it stopped; the pipeline config is stored with them and a
changed one is refused with the paths that differ.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from eridiffusion.config.schema import DatasetConfig, GroupConfig, JobConfig, OptimizerConfig, StageConfig
from eridiffusion.data.cache import EncoderOffload, encoder_names, prepare_caches
from eridiffusion.data.folder import IMAGE_EXTENSIONS
from eridiffusion.data.loader import TrainingData
from eridiffusion.data.vocabulary import job_captions, warn_caption_truncation
from eridiffusion.device import resolve_device
from eridiffusion.inference.evaluate import EvalSettings, evaluate_into, prompts_path, read_prompts
from eridiffusion.models import ModelFamily, load_family
from eridiffusion.networks import attach_network, export_network, merge_adapters
from eridiffusion.networks.adapters import lora_parameter_count
from eridiffusion.progress import progress_bar
from eridiffusion.training.autoencoder import (
    AutoencoderLossConfig,
    PatchDiscriminator,
    calibration_latents,
    discriminator_loss,
    generator_loss,
    latent_channel_statistics,
    latent_scaling_factor,
)
from eridiffusion.training.checkpoint import CheckpointManager, TrainState, atomic_write_dir
from eridiffusion.training.ema import EMA
from eridiffusion.training.loop import (
    NonFiniteLossError,
    TrainResult,
    _Logger,
    diffusion_loss,
    load_or_build,
    save_samples,
    step_generator,
)
from eridiffusion.training.optim import build_optimizer
from eridiffusion.training.schedules import lr_factor

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
    """What a resumed pipeline must agree with: the steps (after defaults), model and datasets."""
    assert cfg.pipeline is not None
    return json.loads(
        json.dumps(
            {
                "steps": [s.model_dump(mode="json") for s in cfg.pipeline.steps],
                "model": cfg.model.model_dump(mode="json"),
                "datasets": [d.model_dump(mode="json") for d in cfg.datasets],
                "seed": cfg.train.seed,
                "ema": cfg.train.ema.model_dump(mode="json"),
            }
        )
    )


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
    generated = generated or {}
    for i, d in enumerate(datasets):
        if d.folder_path is None:  # tar shards: counted when they are indexed at train time
            continue
        folder = Path(d.folder_path)
        if folder.is_dir():
            found = sum(1 for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
            if not found and d.synthetic is None:
                problems.append(f"{where}[{i}].folder_path: no images in '{folder}'")
            images += found * d.num_repeats
        elif d.synthetic is not None:
            images += d.synthetic.n * d.num_repeats
        elif str(folder) in generated:
            images += generated[str(folder)] * d.num_repeats
        else:
            problems.append(f"{where}[{i}].folder_path: '{folder}' does not exist")
    return images, problems


def stage_parameter_counts(family: ModelFamily, stage: StageConfig) -> dict[str, int]:
    """Trainable parameters per component of a stage, computed without changing the model."""
    counts = {}
    for comp in stage.trainable:
        if comp == "lora":
            assert stage.network is not None
            counts[comp] = lora_parameter_count(family.modules()["denoiser"], stage.network)
        elif comp == "discriminator":
            counts[comp] = sum(
                p.numel() for p in PatchDiscriminator(stage.autoencoder.disc_channels).parameters()
            )
        else:
            counts[comp] = sum(p.numel() for p in family.modules()[comp].parameters())
    return counts


def _stage_datasets(cfg: JobConfig, stage: StageConfig) -> list[DatasetConfig]:
    """The step's datasets; an autoencoder step trains on pixels, so latent/text caches do not apply."""
    datasets = stage.datasets or cfg.datasets
    if stage.kind == "autoencoder":
        off = {"cache_latents_to_disk": False, "cache_text_embeddings": False}
        return [d.model_copy(update=off) for d in datasets]
    return datasets


def _stage_data(cfg: JobConfig, stage: StageConfig, index: int, family: ModelFamily) -> TrainingData:
    batch = stage.batch_size or cfg.train.batch_size
    return TrainingData(
        _stage_datasets(cfg, stage), batch, cfg.train.seed + 1000 * index, family.size_multiple()
    )


def _cache_problems(family: ModelFamily, stage: StageConfig, where: str, cfg: JobConfig) -> list[str]:
    """A cache stands in for an encoder, so the encoder must stay frozen for the whole step."""
    if stage.kind == "autoencoder":
        return []
    datasets = _stage_datasets(cfg, stage)
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


class _OptimizerSet:
    """Several named optimizers behind the one state_dict the checkpoint manager saves."""

    def __init__(self, optimizers: dict[str, torch.optim.Optimizer]) -> None:
        self.optimizers = optimizers

    def state_dict(self) -> dict[str, Any]:
        return {name: opt.state_dict() for name, opt in self.optimizers.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state[name])


@dataclass
class _Stage:
    """Live objects of the running stage."""

    plan: StagePlan
    groups: dict[str, dict[str, nn.Parameter]]
    group_cfgs: dict[str, GroupConfig]
    optimizers: _OptimizerSet
    data: TrainingData
    discriminator: PatchDiscriminator | None
    ema: EMA | None
    offload: EncoderOffload

    def params(self) -> dict[str, nn.Parameter]:
        return {k: p for group in self.groups.values() for k, p in group.items()}

    def ema_params(self) -> dict[str, nn.Parameter]:
        """What the EMA averages: the model's trainable weights; a discriminator is only a training aid."""
        return {k: p for c, group in self.groups.items() if c != "discriminator" for k, p in group.items()}

    def adopt_ema(self) -> None:
        """Make the averaged weights the step's result (what is saved, sampled and passed on)."""
        if self.ema is not None:
            self.ema.swap_into(self.ema_params())


def _group_config(cfg: JobConfig, stage: StageConfig, component: str) -> GroupConfig:
    if component in stage.optimizers:
        return stage.optimizers[component]
    if "default" in stage.optimizers:
        return stage.optimizers["default"]
    o = cfg.train.optimizer
    return GroupConfig(
        type=o.type,
        lr=cfg.train.lr,
        weight_decay=o.weight_decay,
        betas=o.betas,
        eps=o.eps,
        lr_scheduler=cfg.train.lr_scheduler,
        lr_warmup_steps=cfg.train.lr_warmup_steps,
    )


def _build_group_optimizer(params: dict[str, nn.Parameter], g: GroupConfig) -> torch.optim.Optimizer:
    return build_optimizer(
        params, OptimizerConfig(type=g.type, weight_decay=g.weight_decay, betas=g.betas, eps=g.eps), g.lr
    )


def _setup_stage(cfg: JobConfig, family: ModelFamily, plan: StagePlan, device: torch.device) -> _Stage:
    stage = plan.config
    for module in family.modules().values():
        module.requires_grad_(False)
        module.eval()
    groups: dict[str, dict[str, nn.Parameter]] = {}
    disc = None
    for comp in stage.trainable:
        if comp == "lora":
            assert stage.network is not None
            groups[comp] = attach_network(
                family, stage.network, train_text_encoder=False, seed=cfg.train.seed + plan.index
            )
            family.modules()["denoiser"].train(True)
        elif comp == "discriminator":
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.train.seed + plan.index)
                disc = PatchDiscriminator(stage.autoencoder.disc_channels).to(device)
            groups[comp] = {f"discriminator.{n}": p for n, p in disc.named_parameters()}
        else:
            module = family.modules()[comp]
            module.train(True)
            module.requires_grad_(True)
            groups[comp] = {f"{comp}.{n}": p for n, p in module.named_parameters()}
    group_cfgs = {comp: _group_config(cfg, stage, comp) for comp in groups}
    optimizers = {comp: _build_group_optimizer(params, group_cfgs[comp]) for comp, params in groups.items()}
    data = _stage_data(cfg, stage, plan.index, family)
    if stage.n_epochs is not None:
        # the plan estimated epochs from file counts; the loader knows the real batches per epoch (weights,
        # regularisation balance, buckets), and the length also sets the LR schedule
        per_step = 1 if stage.kind == "autoencoder" else cfg.train.gradient_accumulation_steps
        batches = stage.n_epochs * data.batches_per_epoch
        plan = dataclasses.replace(plan, steps=max(1, -(-batches // per_step)))
    offload = prepare_caches(data, family, device, cfg.logging.progress)
    ema_cfg = stage.ema or cfg.train.ema
    live = _Stage(plan, groups, group_cfgs, _OptimizerSet(optimizers), data, disc, None, offload)
    if ema_cfg.enabled:
        live.ema = EMA(live.ema_params(), ema_cfg.decay, ema_cfg.warmup)
    return live


def _stage_dir(run_dir: Path, plan: StagePlan) -> Path:
    return run_dir / "stages" / f"{plan.index}-{plan.config.name}"


def _model_at_stage(cfg: JobConfig, plans: list[StagePlan], index: int) -> ModelFamily:
    """The model a stage starts from: the job's base for the first, the previous stage's output after."""
    if index == 0:
        return load_or_build(cfg)
    previous = _stage_dir(cfg.run_dir, plans[index - 1]) / "model"
    if not previous.is_dir():
        raise RuntimeError(
            f"cannot resume stage {index}: the output of the previous stage ({previous}) is "
            "missing; delete the checkpoints to restart the pipeline"
        )
    return load_family(previous, cfg.model.model_copy(update={"name_or_path": str(previous), "options": {}}))


def _transition_done(
    plan: StagePlan, state: TrainState, metrics: dict[str, float], data: TrainingData
) -> bool:
    """Apply the stage's end rule after one optimizer step (updates the watched metric in ``state``)."""
    stage, rule = plan.config, plan.config.transition
    if state.stage_step >= plan.steps:
        return True
    if rule.type == "epoch":
        return state.stage_micro_batches >= stage.n_epochs * data.batches_per_epoch
    if rule.type == "loss_threshold":
        if rule.metric not in metrics:
            raise ValueError(
                f"pipeline step {stage.name}: transition.metric {rule.metric!r} is not logged "
                f"by a {stage.kind} step; choose one of {sorted(metrics)}"
            )
        value = metrics[rule.metric]
        smoothed = (
            value
            if "value" not in state.watch
            else rule.smoothing * state.watch["value"] + (1 - rule.smoothing) * value
        )
        below = smoothed < rule.threshold and state.stage_step >= rule.min_steps
        state.watch = {"value": smoothed, "count": state.watch.get("count", 0) + 1 if below else 0}
        return state.watch["count"] >= rule.patience
    return False


def _train_step(
    cfg: JobConfig, family: ModelFamily, live: _Stage, state: TrainState, device: torch.device
) -> dict[str, float]:
    """One optimizer step of the running stage; returns its metrics."""
    stage = live.plan.config
    for comp, opt in live.optimizers.optimizers.items():
        g = live.group_cfgs[comp]
        for group in opt.param_groups:
            group["lr"] = g.lr * lr_factor(
                state.stage_step, live.plan.steps, g.lr_scheduler, g.lr_warmup_steps
            )
    seed = cfg.train.seed + 7919 * live.plan.index
    clip = cfg.train.max_grad_norm
    if stage.kind == "autoencoder":
        batch = live.data.batch(state.stage_micro_batches)
        state.stage_micro_batches += 1
        gen = step_generator(seed, state.stage_step, 0)
        pixels = batch.pixels.to(device)
        vae = family.modules()["vae"]
        a = stage.autoencoder
        loss_cfg = AutoencoderLossConfig(a.kl_weight, a.disc_weight, a.disc_start, a.mse_weight)
        loss, recon, metrics = generator_loss(
            vae, pixels, live.discriminator, state.stage_step, loss_cfg, gen
        )
        _check_finite(loss, state)
        loss.backward()
        _clip_and_step(live, ["vae"], clip)
        if live.discriminator is not None and state.stage_step >= a.disc_start:
            d_loss, d_metrics = discriminator_loss(live.discriminator, pixels, recon)
            _check_finite(d_loss, state)
            d_loss.backward()
            _clip_and_step(live, ["discriminator"], clip)
            metrics.update(d_metrics)
        return metrics
    total = 0.0
    accumulation = cfg.train.gradient_accumulation_steps
    for micro in range(accumulation):
        batch = live.data.batch(state.stage_micro_batches)
        state.stage_micro_batches += 1
        loss = diffusion_loss(family, batch, cfg, step_generator(seed, state.stage_step, micro), device)
        _check_finite(loss, state)
        (loss / accumulation).backward()
        total += loss.item() / accumulation
    _clip_and_step(live, list(live.groups), clip)
    return {"loss": total}


def _update_ema(live: _Stage, state: TrainState) -> None:
    if live.ema is not None:
        live.ema.update(live.ema_params())
        state.ema_updates = live.ema.num_updates


def _check_finite(loss: torch.Tensor, state: TrainState) -> None:
    if not torch.isfinite(loss):
        raise NonFiniteLossError(
            f"loss is {loss.item()} in pipeline step {state.stage_name!r} at its step "
            f"{state.stage_step + 1}; the step was not applied, earlier checkpoints kept"
        )


def _clip_and_step(live: _Stage, comps: list[str], max_norm: float | None) -> None:
    for comp in comps:
        params = list(live.groups[comp].values())
        if max_norm:
            torch.nn.utils.clip_grad_norm_(params, max_norm)
        live.optimizers.optimizers[comp].step()
        live.optimizers.optimizers[comp].zero_grad(set_to_none=True)


def _finish_stage(cfg: JobConfig, family: ModelFamily, live: _Stage, device: torch.device) -> Path:
    """Make the stage's result permanent: calibrate latents, export/merge adapters, save the model."""
    stage, out = live.plan.config, _stage_dir(cfg.run_dir, live.plan)
    if stage.kind == "autoencoder":
        vae = family.modules()["vae"]
        vae.eval()
        # a few hundred images: one batch would make per-channel statistics noisy
        count = min(live.data.batches_per_epoch, max(1, 256 // live.plan.batch_size))
        latents = calibration_latents(vae, (live.data.batch(k).pixels.to(device) for k in range(count)))
        if stage.autoencoder.latent_norm == "channel":
            mean, std = latent_channel_statistics(latents)
            vae.register_to_config(scaling_factor=1.0, latents_mean=mean, latents_std=std)
        else:
            vae.register_to_config(scaling_factor=latent_scaling_factor(latents))
    if "lora" in stage.trainable:
        assert stage.network is not None
        export_network(
            family,
            stage.network,
            out / f"{stage.name}.safetensors",
            cfg.save.format,
            cfg.save.dtype,
            {"eri_stage": stage.name, "eri_base_model": "previous pipeline step"},
        )
        merge_adapters(family)
    atomic_write_dir(out / "model", family.save_pretrained)
    return out


def _evaluate_stage(
    cfg: JobConfig, family: ModelFamily, live: _Stage, device: torch.device
) -> dict[str, float]:
    """Prompt adherence of the step's result; the report and grid go beside the step's model."""
    e = live.plan.config.eval
    assert e is not None
    path = prompts_path(e, _stage_datasets(cfg, live.plan.config))
    settings, out = EvalSettings.from_config(e), _stage_dir(cfg.run_dir, live.plan)
    report = evaluate_into(family, path, read_prompts(path), settings, device, out)
    scores = {k: report[f"{k}_accuracy"] for k in ("colour", "shape", "both")}
    return {f"eval_{k}": v for k, v in scores.items() if v is not None}


def _resume_stage(
    live: _Stage,
    saved: tuple[TrainState, dict[str, torch.Tensor], dict[str, Any], dict[str, torch.Tensor] | None],
    path: Path | None,
) -> None:
    state, weights, opt_state, ema_state = saved
    with torch.no_grad():
        for name, p in live.params().items():
            p.copy_(weights[name].to(p.dtype))
    live.optimizers.load_state_dict(opt_state)
    if live.ema is not None:
        if ema_state is None:
            raise RuntimeError(f"checkpoint '{path}' has no EMA weights but this pipeline step uses EMA")
        live.ema.load_state_dict(ema_state, state.ema_updates)


def _run_stage(
    cfg: JobConfig,
    family: ModelFamily,
    live: _Stage,
    state: TrainState,
    device: torch.device,
    ckpts: CheckpointManager,
    log: _Logger,
    on_step: Callable[[TrainState], None] | None,
) -> dict[str, float]:
    """Optimizer steps until the stage's transition fires; returns the last step's metrics."""
    plan = live.plan
    bar = progress_bar(plan.steps, f"{cfg.name}/{plan.config.name}", cfg.logging.progress, state.stage_step)
    metrics: dict[str, float] = {}
    try:
        done = False
        while not done:
            metrics = _train_step(cfg, family, live, state, device)
            _update_ema(live, state)
            state.stage_step += 1
            state.step += 1
            state.last_loss = metrics.get("loss", state.last_loss)
            done = _transition_done(plan, state, metrics, live.data)
            bar.update(1)
            bar.set_postfix({k: f"{v:.4f}" for k, v in list(metrics.items())[:3]}, refresh=False)
            if state.stage_step % cfg.logging.log_every == 0 or done:
                log.log(state.step, {**metrics, "stage_step": state.stage_step}, group=plan.config.name)
            if state.step % cfg.save.every == 0 and not done:
                trainable = {k: p.detach().float() for k, p in live.params().items()}
                ema_state = live.ema.state_dict() if live.ema is not None else None
                ckpts.save(state, trainable, live.optimizers, ema_state)
            if on_step is not None:
                on_step(state)
    finally:
        bar.close()
    return metrics


def run_pipeline(cfg: JobConfig, on_step: Callable[[TrainState], None] | None = None) -> TrainResult:
    """Run (or resume) every stage of ``cfg.pipeline`` in order."""
    assert cfg.pipeline is not None
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.train.device, "train.device")
    snapshot = pipeline_snapshot(cfg)
    ckpts = CheckpointManager(run_dir / "checkpoints", cfg.save.keep)
    ckpts.clean_partial()
    state = TrainState(pipeline=snapshot)
    resume = (
        ckpts.latest() if cfg.save.resume is True else (Path(cfg.save.resume) if cfg.save.resume else None)
    )
    saved = None
    if resume is not None:
        saved = CheckpointManager.load(resume)
        changed = changed_paths(saved[0].pipeline, snapshot)
        if changed:
            raise ValueError(
                f"the pipeline config changed since checkpoint {resume}: {', '.join(changed[:8])}"
                "; restore it, or train into a new output folder (change `name`)"
            )
        state = saved[0]

    family = load_or_build(cfg)
    warn_caption_truncation(family, job_captions(cfg))
    plans, problems = plan_stages(cfg, family)
    if problems:
        raise ValueError("pipeline problems:\n" + "\n".join(f"  {p}" for p in problems))
    log = _Logger(run_dir, cfg.logging.tensorboard)
    try:
        for plan in plans[state.stage :]:
            family = _model_at_stage(cfg, plans, plan.index).to(device)
            live = _setup_stage(cfg, family, plan, device)
            if saved is not None and state.stage == plan.index and state.stage_step > 0:
                _resume_stage(live, saved, resume)
                logger.info("resumed pipeline step %s at its step %d", plan.config.name, state.stage_step)
            saved = None
            state.stage_name = plan.config.name
            started = time.perf_counter()
            metrics = _run_stage(cfg, family, live, state, device, ckpts, log, on_step)
            seconds = round(time.perf_counter() - started, 2)
            live.adopt_ema()
            with live.offload.restored():
                _finish_stage(cfg, family, live, device)
                if plan.config.kind == "diffusion":
                    save_samples(family, cfg, state.step, device)
                scores = _evaluate_stage(cfg, family, live, device) if plan.config.eval else {}
            state.stages_done[plan.config.name] = {
                "steps": state.stage_step,
                "seconds": seconds,
                "finish_seconds": round(time.perf_counter() - started - seconds, 2),
                **{f"final_{k}": v for k, v in metrics.items()},
                **scores,
            }
            state.stage, state.stage_step, state.stage_micro_batches, state.watch = plan.index + 1, 0, 0, {}
            state.ema_updates = 0
            ckpts.save(state, {}, _OptimizerSet({}), None)  # a stage boundary: the next starts fresh
    finally:
        log.close()
    final = atomic_write_dir(run_dir / "model", family.save_pretrained)
    (run_dir / "pipeline_summary.json").write_text(json.dumps(state.stages_done, indent=1), encoding="utf-8")
    for name, summary in state.stages_done.items():
        logger.info("pipeline step %s: %s", name, ", ".join(f"{k} {v:g}" for k, v in summary.items()))
    return TrainResult(run_dir, state.step, final, state.last_loss, resume)
