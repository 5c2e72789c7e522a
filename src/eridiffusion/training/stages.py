"""What a stage is while it runs: its trained parameter groups and optimizers, its data, its EMA, how a
micro-batch becomes a loss for its kind, when it ends, and how its result is made permanent.

A single-stage job is a one-step pipeline whose outputs sit at the top of the run folder (the model, or the
adapter file ``NAME.safetensors``); the steps of a ``pipeline`` write theirs under ``stages/<n>-<name>``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from eridiffusion.config.schema import VAL_METRIC, GroupConfig, JobConfig, OptimizerConfig, StageConfig
from eridiffusion.data.cache import EncoderOffload, encoder_names, prepare_caches
from eridiffusion.data.loader import Batch, ImageSource, TrainingData, open_sources
from eridiffusion.data.validation import split_datasets
from eridiffusion.inference.evaluate import (
    RECONSTRUCTION_IMAGES,
    EvalSettings,
    evaluate_into,
    evaluate_reconstructions,
    prompts_path,
    read_prompts,
)
from eridiffusion.models import ModelFamily
from eridiffusion.models.quantize import quantised_layers, quantize_module, weight_bytes
from eridiffusion.models.stable_diffusion import STORAGE_DTYPES
from eridiffusion.networks import attach_network, export_network, merge_adapters
from eridiffusion.training.autoencoder import (
    AutoencoderLossConfig,
    PatchDiscriminator,
    calibration_latents,
    discriminator_loss,
    generator_loss,
    latent_channel_statistics,
    latent_scaling_factor,
)
from eridiffusion.training.bf16_weights import bf16_optimizer
from eridiffusion.training.block_swap import BlockSwap, start_block_swap
from eridiffusion.training.checkpoint import TrainState, atomic_write_dir
from eridiffusion.training.class_images import fill_class_images
from eridiffusion.training.ema import EMA
from eridiffusion.training.engine import Engine
from eridiffusion.training.optim import build_optimizer, eval_mode
from eridiffusion.training.pipeline import StagePlan, stage_datasets
from eridiffusion.training.preservation import OutputPreservation
from eridiffusion.training.step import ParamGroup, diffusion_loss, optimizer_step, step_generator
from eridiffusion.training.validation import Validator

logger = logging.getLogger(__name__)


def single_stage_plan(cfg: JobConfig, family: ModelFamily) -> StagePlan:
    """A job without ``pipeline`` as the one step it is: train the adapter, or the family's trainable
    components, for ``train.steps`` on the job's datasets."""
    t = cfg.train
    trainable = ["lora"] if cfg.network is not None else list(family.trainable_modules(t.train_text_encoder))
    stage = StageConfig(name=cfg.name, trainable=trainable, network=cfg.network, max_steps=t.steps)
    return StagePlan(0, stage, t.steps, 0, t.batch_size, single=True)


class OptimizerSet:
    """The optimizers of a stage's groups behind the one state dict a checkpoint holds."""

    def __init__(self, groups: list[ParamGroup]) -> None:
        self.optimizers = {g.name: g.optimizer for g in groups}

    def state_dict(self) -> dict[str, Any]:
        return {name: opt.state_dict() for name, opt in self.optimizers.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(self.optimizers) == {"model"} and "model" not in state:  # written before groups had names
            state = {"model": state}
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state[name])


@dataclass
class LiveStage:
    """The running stage's objects."""

    plan: StagePlan
    groups: list[ParamGroup]
    data: TrainingData
    discriminator: PatchDiscriminator | None
    ema: EMA | None
    offload: EncoderOffload
    out_dir: Path
    batches: Iterator[Batch] | None = None
    """Micro-batches from the stage's current position (opened by :meth:`open_batches`)."""
    block_swap: BlockSwap | None = None
    """``train.blocks_to_swap``'s hooks on the denoiser, removed by :meth:`end` once the stage is done."""
    validator: Validator | None = None
    """The stage's held-out images and how they are scored; None without any."""
    preservation: OutputPreservation | None = None
    """``train.diff_output_preservation`` on an adapter step."""

    def open_batches(self, start: int, num_workers: int, pin_memory: bool, per_step: int) -> None:
        """Micro-batches ``start`` onwards, up to the stage's last possible one (workers build them ahead)."""
        self.batches = self.data.iterate(start, self.plan.steps * per_step, num_workers, pin_memory)

    def next_batch(self) -> Batch:
        assert self.batches is not None, "open_batches first"
        return next(self.batches)

    def close(self) -> None:
        if self.batches is not None:
            self.batches.close()

    def end(self) -> None:
        """After the stage's result is written: unhook the block swap (its blocks stay on the host)."""
        if self.block_swap is not None:
            self.block_swap.remove()
            self.block_swap = None

    def params(self) -> dict[str, nn.Parameter]:
        return {k: p for g in self.groups for k, p in g.params.items()}

    def ema_params(self) -> dict[str, nn.Parameter]:
        """What the EMA averages: the model's trained weights; a discriminator is only a training aid."""
        return {k: p for g in self.groups if g.name != "discriminator" for k, p in g.params.items()}

    def optimizers(self) -> OptimizerSet:
        return OptimizerSet(self.groups)

    def group(self, name: str) -> list[ParamGroup]:
        return [g for g in self.groups if g.name == name]

    @contextlib.contextmanager
    def eval_weights(self) -> Iterator[None]:
        """The weights to sample, evaluate and export with: schedule-free optimizers swap in their averaged
        iterate for the block (a no-op for the others)."""
        with contextlib.ExitStack() as stack:
            for g in self.groups:
                stack.enter_context(eval_mode(g.optimizer))
            yield


def _group_config(cfg: JobConfig, stage: StageConfig, component: str) -> GroupConfig:
    if component in stage.optimizers:
        return stage.optimizers[component]
    if "default" in stage.optimizers:
        return stage.optimizers["default"]
    t, o = cfg.train, cfg.train.optimizer
    return GroupConfig(
        type=o.type,
        lr=t.lr,
        weight_decay=o.weight_decay,
        betas=o.betas,
        eps=o.eps,
        params=o.params,
        lr_scheduler=t.lr_scheduler,
        lr_warmup_steps=t.lr_warmup_steps,
        lr_cycles=t.lr_cycles,
        lr_power=t.lr_power,
    )


def _make_group(
    name: str, params: dict[str, nn.Parameter], g: GroupConfig, where: str, rounding: str, seed: int
) -> ParamGroup:
    fields = {"type", "weight_decay", "betas", "eps", "params"}
    opt_cfg = OptimizerConfig(**{k: v for k, v in g.model_dump().items() if k in fields})
    optimizer = build_optimizer(params, opt_cfg, g.lr, where)
    # bf16 trained weights (train.weights_dtype) take their updates through fp32, rounded back
    optimizer = bf16_optimizer(optimizer, g.type, rounding, seed, where)
    return ParamGroup(name, params, optimizer, g.lr, g)


def _check_fsdp(engine: Engine, cfg: JobConfig, stage: StageConfig) -> None:
    if engine.strategy != "fsdp":
        return
    why = None
    if "lora" in stage.trainable:
        why = "adapters are small: train them with train.distributed.strategy: ddp"
    elif stage.kind == "autoencoder":
        why = "autoencoder steps train with ddp"
    elif cfg.train.weights_dtype == "bf16":
        why = "train.weights_dtype bf16 is not supported with fsdp yet; use ddp or weights_dtype: fp32"
    elif (stage.ema or cfg.train.ema).enabled:
        why = "EMA is not supported with fsdp yet; turn train.ema off or use ddp"
    if why:
        raise ValueError(f"train.distributed.strategy fsdp: pipeline step {stage.name}: {why}")


def _quantize_base(cfg: JobConfig, family: ModelFamily, trained: set[str]) -> None:
    """``model.quantize`` / ``quantize_text_encoders``: the frozen base of an adapter job, on the host."""
    _, text_names = encoder_names(family)
    modules = family.modules()
    kinds = {"denoiser": cfg.model.quantize, **dict.fromkeys(text_names, cfg.model.quantize_text_encoders)}
    for name, kind in kinds.items():
        if kind == "none" or name in trained or name not in modules:
            continue
        if quantised_layers(modules[name]):  # the loader quantised it while reading (models.streamed_loading)
            continue
        before = weight_bytes([modules[name]])
        n = quantize_module(modules[name], kind)
        after = weight_bytes([modules[name]])
        logger.info(
            "%s: %d layers quantised to %s, %.1f -> %.1f MB", name, n, kind, before / 2**20, after / 2**20
        )


def _unfreeze(
    cfg: JobConfig, family: ModelFamily, plan: StagePlan, engine: Engine
) -> tuple[dict[str, dict[str, nn.Parameter]], PatchDiscriminator | None]:
    """Freeze the model, then make this stage's components trainable; parameters per component."""
    stage, t = plan.config, cfg.train
    modules = family.modules()
    for module in modules.values():
        module.requires_grad_(False)
        module.eval()
    trained = {c for c in stage.trainable if c in modules}
    weights = STORAGE_DTYPES[t.weights_dtype]  # train.weights_dtype: bf16 stores trained weights in bf16 too
    for name, module in modules.items():  # model.dtype: frozen weights stored in bf16/fp16 to save memory
        target = weights if name in trained else STORAGE_DTYPES[cfg.model.dtype]
        if any(p.dtype != target for p in module.parameters() if p.is_floating_point()):
            module.to(dtype=target)
    if plan.single and cfg.network is not None:
        _quantize_base(cfg, family, trained)
    per_comp: dict[str, dict[str, nn.Parameter]] = {}
    disc = None
    for comp in stage.trainable:
        if comp == "lora":
            assert stage.network is not None
            job_text = t.train_text_encoder if plan.single else False
            per_comp[comp] = attach_network(family, stage.network, job_text, seed=t.seed + plan.index)
            denoiser, text = stage.network.adapts(job_text)
            adapted = set(family.trainable_modules(text)) - (set() if denoiser else {"denoiser"})
            for name in adapted:
                modules[name].train(True)
            trained |= adapted | {"denoiser"}  # backward runs through the denoiser to any adapter
        elif comp == "discriminator":
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(t.seed + plan.index)
                disc = PatchDiscriminator(stage.autoencoder.disc_channels).to(engine.device)
            per_comp[comp] = {f"discriminator.{n}": p for n, p in disc.named_parameters()}
        else:
            module = modules[comp]
            module.train(True)
            module.requires_grad_(True)
            if engine.strategy == "fsdp":
                engine.shard(module, cfg.train.distributed.fsdp_sharding == "full_shard")
            per_comp[comp] = {f"{comp}.{n}": p for n, p in module.named_parameters()}
    if t.gradient_checkpointing:
        for name in trained:
            module = modules[name]  # diffusers and transformers models name the switch differently
            if hasattr(module, "enable_gradient_checkpointing"):
                module.enable_gradient_checkpointing()
            elif hasattr(module, "gradient_checkpointing_enable"):
                module.gradient_checkpointing_enable()
    return per_comp, disc


def trainable_parameters(family: ModelFamily, cfg: JobConfig) -> dict[str, nn.Parameter]:
    """What a single-stage job trains, after freezing the rest (for tools and tests that step by hand)."""
    per_comp, _ = _unfreeze(cfg, family, single_stage_plan(cfg, family), Engine(torch.device("cpu"), None))
    return {k: p for params in per_comp.values() for k, p in params.items()}


def _place(
    cfg: JobConfig, family: ModelFamily, data: TrainingData, engine: Engine
) -> tuple[EncoderOffload, BlockSwap | None]:
    """Move the model to the device in the order that keeps its peak lowest: with caches, only the encoders
    go first, encode every image and caption, and leave again for good when every batch comes from the
    cache; then the rest (the denoiser) follows. The encoders and the denoiser are never on the device
    together unless a batch still needs an encoder. Blocks that ``train.blocks_to_swap`` keeps on the host
    never go to the device here: they visit it only while they run."""
    modules = family.modules()
    image_names, text_names = encoder_names(family)
    needed = (image_names if any(d.cache_latents_to_disk for d in data.configs) else []) + (
        text_names if any(d.cache_text_embeddings for d in data.configs) else []
    )
    for name in needed:
        modules[name].to(engine.device)
    with engine.main_first():  # the main process computes the caches, the others read them
        offload = prepare_caches(data, family, engine.device, cfg.logging.progress and engine.is_main)
    swap = start_block_swap(cfg, family, engine.device)
    for name, module in modules.items():
        if name not in offload.names:
            if swap is not None:
                swap.place(module)
            else:
                module.to(engine.device)
    return offload, swap


def setup_stage(
    cfg: JobConfig,
    family: ModelFamily,
    plan: StagePlan,
    engine: Engine,
    out_dir: Path,
    sources: list[ImageSource] | None = None,
) -> LiveStage:
    """Unfreeze the stage's components, build its optimizers, data (each process's batch times the number
    of processes: every process takes its rows), caches and EMA."""
    stage = plan.config
    _check_fsdp(engine, cfg, stage)
    per_comp, disc = _unfreeze(cfg, family, plan, engine)  # on the host: casts, quantisation, adapters
    seed = cfg.train.seed + 1000 * plan.index
    datasets = stage_datasets(cfg, stage)
    where = "datasets" if plan.single or stage.datasets is None else f"pipeline.steps[{plan.index}].datasets"
    fill_class_images(cfg, family, datasets, engine, where)  # before the data reads the class folders
    # held-out images never reach the training data; the split depends on the run seed, not the stage's
    split = split_datasets(datasets, sources or open_sources(datasets), cfg.train.seed, where)
    data = TrainingData(
        split.train,
        plan.batch_size * engine.world,
        seed,
        family.size_multiple(),
        split.train_sources,
    )
    if data.skipped and engine.is_main:
        logger.warning("%d unreadable image(s) skipped; training on %d", data.skipped, len(data))
    if stage.n_epochs is not None:
        # the plan estimated epochs from file counts; the loader knows the real batches per epoch (weights,
        # regularisation balance, buckets), and the length also sets the LR schedule
        per_step = 1 if stage.kind == "autoencoder" else cfg.train.gradient_accumulation_steps
        batches = stage.n_epochs * data.batches_per_epoch
        plan = dataclasses.replace(plan, steps=max(1, -(-batches // per_step)))
    offload, swap = _place(cfg, family, data, engine)
    if plan.single:  # one optimizer, clipped jointly: a job without pipeline trains one group
        g = _group_config(cfg, stage, "default")
        every = {k: p for d in per_comp.values() for k, p in d.items()}
        groups = [_make_group("model", every, g, "train.optimizer", cfg.train.weights_rounding, seed)]
    else:
        where = f"pipeline.steps[{plan.index}].optimizers"
        groups = [
            _make_group(
                c, params, _group_config(cfg, stage, c), f"{where}.{c}", cfg.train.weights_rounding, seed
            )
            for c, params in per_comp.items()
        ]
    live = LiveStage(plan, groups, data, disc, None, offload, out_dir, block_swap=swap)
    live.validator = Validator.build(cfg, stage, split, family.size_multiple())
    live.preservation = OutputPreservation.for_stage(cfg, stage, datasets, family)
    ema_cfg = stage.ema or cfg.train.ema
    if ema_cfg.enabled:
        live.ema = EMA(live.ema_params(), ema_cfg.decay, ema_cfg.warmup)
    return live


def train_step(
    cfg: JobConfig, family: ModelFamily, live: LiveStage, state: TrainState, engine: Engine, where: str
) -> dict[str, float]:
    """One optimizer step of the running stage (through :func:`optimizer_step`); returns its metrics."""
    stage, t = live.plan.config, cfg.train
    lrs = {g.name: g.set_lr(state.stage_step, live.plan.steps) for g in live.groups}
    seed = t.seed + 7919 * live.plan.index
    if stage.kind == "autoencoder":
        metrics = _autoencoder_step(family, live, state, engine, seed, where, t.max_grad_norm)
    else:
        accumulation = t.gradient_accumulation_steps
        batches = [engine.share(live.next_batch()) for _ in range(accumulation)]
        state.epoch = batches[-1].epoch

        def micro_loss(micro: int, part: int, parts: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            gen = step_generator(seed, state.stage_step, micro)  # every part draws the whole batch's noise
            batch, extra = batches[micro].part(part, parts), {}
            loss = diffusion_loss(family, batch, cfg, gen, engine.device, live.preservation, extra)
            # a piece's terms add up to the micro-batch's; the step averages metrics over pieces
            return loss, {k: v * parts for k, v in extra.items()}

        smallest = min(len(b) for b in batches)
        metrics = optimizer_step(
            engine, live.groups, micro_loss, accumulation, t.max_grad_norm, where, max_parts=smallest
        )
        state.stage_micro_batches += accumulation
        state.micro_batches += accumulation
    if len(lrs) == 1:
        metrics["lr"] = next(iter(lrs.values()))
    else:
        metrics.update({f"lr/{name}": lr for name, lr in lrs.items()})
    if live.ema is not None:
        live.ema.update(live.ema_params())
        state.ema_updates = live.ema.num_updates
    return metrics


def _autoencoder_step(
    family: ModelFamily,
    live: LiveStage,
    state: TrainState,
    engine: Engine,
    seed: int,
    where: str,
    clip: float | None,
) -> dict[str, float]:
    """The autoencoder's update, then the discriminator's on the same batch (once the GAN terms start)."""
    a = live.plan.config.autoencoder
    batch = engine.share(live.next_batch())
    state.stage_micro_batches += 1
    state.micro_batches += 1
    state.epoch = batch.epoch
    pixels = batch.pixels.to(engine.device, non_blocking=True)
    vae = family.modules()["vae"]
    loss_cfg = AutoencoderLossConfig(a.kl_weight, a.disc_weight, a.disc_start, a.mse_weight)
    recon: list[torch.Tensor] = []

    def gen_loss(_micro: int, _part: int, _parts: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        gen = step_generator(seed, state.stage_step, 0)
        loss, out, metrics = generator_loss(vae, pixels, live.discriminator, state.stage_step, loss_cfg, gen)
        recon.append(out)
        return loss, metrics

    metrics = optimizer_step(engine, live.group("vae"), gen_loss, 1, clip, where)
    if live.discriminator is not None and state.stage_step >= a.disc_start:

        def disc_loss(_micro: int, _part: int, _parts: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            assert live.discriminator is not None
            return discriminator_loss(live.discriminator, pixels, recon[0])

        d = optimizer_step(engine, live.group("discriminator"), disc_loss, 1, clip, where)
        d.pop("loss")
        metrics.update({k if k.startswith("d_") else f"d_{k}": v for k, v in d.items()})
    return metrics


def transition_done(
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
            if rule.metric == VAL_METRIC:  # watched only at the steps validation runs
                return False
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


def finish_stage(
    cfg: JobConfig,
    family: ModelFamily,
    live: LiveStage,
    engine: Engine,
    export_info: dict[str, str],
    card: str | None = None,
) -> Path:
    """Make the stage's result permanent (main process): calibrate latents, export the adapter (merged into
    the model when a later step builds on it) or save the model; returns the stage's output."""
    stage, out = live.plan.config, live.out_dir
    if stage.kind == "autoencoder":
        vae = family.modules()["vae"]
        vae.eval()
        # a few hundred images: one batch would make per-channel statistics noisy
        count = min(live.data.batches_per_epoch, max(1, 256 // live.plan.batch_size))
        batches = (live.data.batch(k).pixels.to(engine.device) for k in range(count))
        latents = calibration_latents(vae, batches)
        if stage.autoencoder.latent_norm == "channel":
            mean, std = latent_channel_statistics(latents)
            vae.register_to_config(scaling_factor=1.0, latents_mean=mean, latents_std=std)
        else:
            vae.register_to_config(scaling_factor=latent_scaling_factor(latents))
    if "lora" in stage.trainable:
        assert stage.network is not None
        path = out / f"{stage.name}.safetensors"
        if engine.is_main:
            export_network(family, stage.network, path, cfg.save.format, cfg.save.dtype, export_info)
        if live.plan.single:
            return path
        merge_adapters(family)
    path = out / "model"

    def write(folder: Path) -> None:
        family.save_pretrained(folder)
        if card is not None:  # a model card beside the weights, as the Hub shows it
            (folder / "README.md").write_text(card, encoding="utf-8")

    if engine.is_main:
        atomic_write_dir(path, write)
    return path


def evaluate_stage(cfg: JobConfig, family: ModelFamily, live: LiveStage, engine: Engine) -> dict[str, float]:
    """Prompt adherence of the step's result as ``eval_*`` scores, or for an autoencoder step its
    reconstructions against their captions as ``recon_*``; the report and grid go beside the step's model."""
    e = live.plan.config.eval
    assert e is not None
    if live.plan.config.kind == "autoencoder":
        pixels, captions = reconstruction_batch(live.data, RECONSTRUCTION_IMAGES)
        report = evaluate_reconstructions(family, pixels.to(engine.device), captions, live.out_dir)
        prefix = "recon"
    else:
        path = prompts_path(e, stage_datasets(cfg, live.plan.config))
        settings = EvalSettings.from_config(e)
        report = evaluate_into(family, path, read_prompts(path), settings, engine.device, live.out_dir)
        prefix = "eval"
    scores = {k: report[f"{k}_accuracy"] for k in ("colour", "shape", "both")}
    return {f"{prefix}_{k}": v for k, v in scores.items() if v is not None}


def reconstruction_batch(data: TrainingData, limit: int) -> tuple[torch.Tensor, list[str]]:
    """The first ``limit`` images of the step's data in its fixed batch order (the ones the latent
    statistics were measured on), with their captions."""
    pixels: list[torch.Tensor] = []
    captions: list[str] = []
    for k in range(data.batches_per_epoch):
        batch = data.batch(k)
        assert batch.pixels is not None  # an autoencoder step never caches latents
        pixels.append(batch.pixels)
        captions += batch.captions
        if len(captions) >= limit:
            break
    return torch.cat(pixels)[:limit], captions[:limit]
