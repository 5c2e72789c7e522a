"""The training loop: read it top to bottom.

Determinism and exact resume come from three choices: batch *k* is a pure function of (seed, k) (see
:mod:`eridiffusion.data.loader`), every step draws its noise, timesteps and caption dropout from a generator
seeded by (seed, step, micro-batch), and the LR is a pure function of the step. A checkpoint therefore only
needs the weights, the optimizer, the EMA and a few counters.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from eridiffusion.config.load import dump_config
from eridiffusion.config.schema import JobConfig
from eridiffusion.data.cache import prepare_caches
from eridiffusion.data.loader import Batch, TrainingData, open_sources
from eridiffusion.data.vocabulary import job_captions, warn_caption_truncation
from eridiffusion.device import resolve_device
from eridiffusion.inference.generate import GenerateRequest, make_grid, sample, to_pil, upscale_nearest
from eridiffusion.inference.samplers import check_sampler
from eridiffusion.models import ModelFamily, build_family, load_family
from eridiffusion.networks import attach_network, export_network
from eridiffusion.progress import progress_bar
from eridiffusion.training.checkpoint import CheckpointManager, TrainState, atomic_write_dir
from eridiffusion.training.ema import EMA
from eridiffusion.training.losses import min_snr_weights, per_sample_loss
from eridiffusion.training.optim import build_optimizer
from eridiffusion.training.schedules import lr_factor

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Loss became NaN/inf; the weights of this step were not applied and earlier checkpoints are kept."""


@dataclass
class TrainResult:
    run_dir: Path
    final_step: int
    output: Path
    """The final model folder, or the adapter file for network runs."""
    last_loss: float | None
    resumed_from: Path | None


def resolve_precision(setting: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype or None for full fp32. ``auto`` picks bf16 only where it is fast and safe."""
    if setting == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    return {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}[setting]


def config_fingerprint(cfg: JobConfig) -> str:
    """Hash of the settings that change the weights a run produces (not steps, saving, sampling, logging)."""
    data = cfg.model_dump(mode="json", exclude={"save", "sample", "logging", "eval", "output_dir", "name"})
    data["train"].pop("steps", None)
    data["train"].pop("num_workers", None)  # the batch sequence is the same for any worker count
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def step_generator(seed: int, step: int, micro: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 1009 + micro) % (2**63))


def load_or_build(cfg: JobConfig) -> ModelFamily:
    if cfg.model.name_or_path:  # load_family refuses model.options for families that only build with them
        return load_family(cfg.model.name_or_path, cfg.model)
    if cfg.model.arch is None:
        raise ValueError("set model.arch to build a model from scratch, or model.name_or_path to load one")
    options = dict(cfg.model.options)
    if cfg.model.prediction_type is not None:  # the override applies to models built from scratch too
        options["prediction_type"] = cfg.model.prediction_type
    # the tokenizer of a from-scratch model learns the job's caption words (the same captions, the same one)
    return build_family(cfg.model.arch, options, seed=cfg.train.seed, captions=job_captions(cfg))


def diffusion_loss(
    family: ModelFamily, batch: Batch, cfg: JobConfig, gen: torch.Generator, device: torch.device
) -> torch.Tensor:
    """One micro-batch's loss: noise the images, predict, regress the objective's target."""
    n = len(batch)
    drop = torch.rand(n, generator=gen) < batch.dropout_rates
    captions = ["" if d else c for c, d in zip(batch.captions, drop.tolist(), strict=True)]
    # cached latents / text embeddings (datasets[].cache_*) stand in for the encoders when present
    if batch.latents is not None:
        x0 = batch.latents.to(device)
    else:
        x0 = family.encode_images(batch.pixels.to(device))
    noise = torch.randn(x0.shape, generator=gen).to(device)
    # the latent size lets resolution-dependent schedules (Flux's shift) follow the batch's image size
    timesteps = family.objective.sample_timesteps(n, gen, latent_shape=tuple(x0.shape[1:])).to(device)
    target = family.objective.make_target(x0, noise, timesteps)
    if batch.cond is not None:
        cond = batch.cached_conditioning(drop, device)
    else:
        cond = family.encode_prompt(captions)
    size_cond = batch.size_conditioning()
    if size_cond is not None:  # SDXL's micro-conditioning; families without it ignore the entry
        cond["size_conditioning"] = size_cond.to(device)
    pred = family.predict(target.noisy, timesteps, cond)
    losses = per_sample_loss(pred, target.target, cfg.train.loss, cfg.train.huber_delta)
    if cfg.train.min_snr_gamma is not None:
        weights = min_snr_weights(target.snr, cfg.train.min_snr_gamma, family.objective.prediction_type)
        losses = losses * weights.to(losses.device)
    if target.weight is not None:  # the objective's own weighting (flow matching's loss_weighting)
        losses = losses * target.weight.to(losses.device)
    losses = losses * batch.loss_weights.to(losses.device)  # datasets[].loss_weight (e.g. for reg images)
    return losses.mean()


STORAGE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def store_frozen_weights(family: ModelFamily, trained: set[str], storage: str) -> None:
    """``model.dtype``: components nothing trains (VAE, frozen text encoders, an adapter's base model) are
    kept in bf16/fp16 to halve their memory; trained ones stay fp32 so the optimizer updates full-precision
    weights. Families cast inputs to each component's dtype."""
    for name, module in family.modules().items():
        target = torch.float32 if name in trained else STORAGE_DTYPES[storage]
        if any(p.dtype != target for p in module.parameters() if p.is_floating_point()):
            module.to(dtype=target)


def trainable_parameters(family: ModelFamily, cfg: JobConfig) -> dict[str, nn.Parameter]:
    """Freeze everything, then unfreeze what this run trains; names are ``component.param``."""
    trainable = family.trainable_modules(cfg.train.train_text_encoder)
    store_frozen_weights(family, set(trainable), cfg.model.dtype)
    params: dict[str, nn.Parameter] = {}
    for name, module in family.modules().items():
        is_trained = name in trainable
        module.train(is_trained)
        for pname, p in module.named_parameters():
            p.requires_grad_(is_trained)
            if is_trained:
                params[f"{name}.{pname}"] = p
        if is_trained and cfg.train.gradient_checkpointing:
            # diffusers models and transformers models name the switch differently
            if hasattr(module, "enable_gradient_checkpointing"):
                module.enable_gradient_checkpointing()
            elif hasattr(module, "gradient_checkpointing_enable"):
                module.gradient_checkpointing_enable()
    return params


class _Logger:
    """TensorBoard scalars plus a metrics.jsonl that tests and scripts can read without TensorBoard."""

    def __init__(self, run_dir: Path, tensorboard: bool) -> None:
        self.jsonl = (run_dir / "metrics.jsonl").open("a", encoding="utf-8")
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "logs"))

    def log(self, step: int, values: dict[str, float], group: str = "train") -> None:
        """``group`` prefixes TensorBoard tags (pipelines log each step under its own name)."""
        self.jsonl.write(
            json.dumps({"step": step, **({"stage": group} if group != "train" else {}), **values}) + "\n"
        )
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(f"{group}/{k}", v, step)

    def close(self) -> None:
        self.jsonl.close()
        if self.tb is not None:
            self.tb.close()


@contextlib.contextmanager
def ema_weights(ema: EMA | None, params: dict[str, nn.Parameter]) -> Iterator[None]:
    """Temporarily evaluate with the EMA weights (sampling, final export)."""
    if ema is not None:
        ema.swap_into(params)
    try:
        yield
    finally:
        if ema is not None:
            ema.swap_into(params)


def save_samples(family: ModelFamily, cfg: JobConfig, step: int, device: torch.device) -> Path | None:
    s = cfg.sample
    if not s.prompts:
        return None
    req = GenerateRequest(
        prompts=s.prompts,
        negative_prompt=s.negative_prompt,
        steps=s.steps,
        guidance_scale=s.guidance_scale,
        sampler=s.sampler,
        seed=s.seed,
        images_per_prompt=s.images_per_prompt,
    )
    modes = {name: m.training for name, m in family.modules().items()}
    for m in family.modules().values():
        m.eval()
    with torch.random.fork_rng(devices=[]):
        images = [upscale_nearest(im) for im in to_pil(sample(family, req, device))]
    for name, m in family.modules().items():
        m.train(modes[name])
    path = cfg.run_dir / "samples" / f"step_{step:06d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    make_grid(images, columns=s.images_per_prompt).save(path)
    return path


def train(cfg: JobConfig, on_step: Callable[[TrainState], None] | None = None) -> TrainResult:
    """Run (or resume) the job described by ``cfg``; returns where the final model was written."""
    if cfg.pipeline is not None:
        from eridiffusion.training.pipeline import run_pipeline  # pipeline builds on this module

        return run_pipeline(cfg, on_step)
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg), encoding="utf-8")
    device = resolve_device(cfg.train.device, "train.device")
    amp_dtype = resolve_precision(cfg.train.mixed_precision, device)
    t = cfg.train

    sources = open_sources(cfg.datasets)  # scan first: a bad path fails before a model loads
    family = load_or_build(cfg).to(device)
    if cfg.sample.prompts:  # a wrong sampler would otherwise only fail at the first sample grid
        try:
            check_sampler(cfg.sample.sampler, family.objective.prediction_type)
        except ValueError as exc:
            raise ValueError(f"sample.sampler: {exc}") from None
    for i, d in enumerate(cfg.datasets):
        for resolution in d.resolutions:
            try:
                family.check_size(resolution, resolution)
            except ValueError as exc:
                raise ValueError(f"datasets[{i}].resolution: {exc}") from None
    data = TrainingData(cfg.datasets, t.batch_size, t.seed, family.size_multiple(), sources)
    if data.skipped:
        logger.warning("%d unreadable image(s) skipped; training on %d", data.skipped, len(data))
    warn_caption_truncation(family, [c for captions in data.captions for c in captions])
    if cfg.network is not None:
        store_frozen_weights(family, set(), cfg.model.dtype)
        params = attach_network(family, cfg.network, t.train_text_encoder, seed=t.seed)
        for name, module in family.trainable_modules(t.train_text_encoder).items():
            module.train(True)
            if (
                name == "denoiser"
                and t.gradient_checkpointing
                and hasattr(module, "enable_gradient_checkpointing")
            ):
                module.enable_gradient_checkpointing()
    else:
        params = trainable_parameters(family, cfg)
    export = _exporter(
        family, cfg, state_info={"eri_base_model": cfg.model.name_or_path or f"scratch:{family.arch}"}
    )
    offload = prepare_caches(data, family, device, cfg.logging.progress)
    optimizer = build_optimizer(params, t.optimizer, t.lr)
    ema = EMA(params, t.ema.decay, t.ema.warmup) if t.ema.enabled else None
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 and device.type == "cuda" else None

    ckpts = CheckpointManager(run_dir / "checkpoints", cfg.save.keep)
    ckpts.clean_partial()
    state = TrainState(config_hash=config_fingerprint(cfg))
    resumed_from = _resume(cfg, ckpts, state, params, optimizer, ema)

    log = _Logger(run_dir, cfg.logging.tensorboard)
    bar = progress_bar(t.steps, cfg.name, cfg.logging.progress, state.step)
    autocast = (
        torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
    )
    batches = data.iterate(state.micro_batches, t.steps * t.gradient_accumulation_steps, t.num_workers)
    started, started_step = time.perf_counter(), state.step
    try:
        for step in range(state.step, t.steps):
            lr = t.lr * lr_factor(step, t.steps, t.lr_scheduler, t.lr_warmup_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            total = 0.0
            for micro in range(t.gradient_accumulation_steps):
                batch = next(batches)
                state.micro_batches += 1
                state.epoch = batch.epoch
                with autocast:
                    loss = diffusion_loss(family, batch, cfg, step_generator(t.seed, step, micro), device)
                if not torch.isfinite(loss):
                    raise NonFiniteLossError(
                        f"loss is {loss.item()} at step {step + 1}; the step was not applied. "
                        f"Last good checkpoint: {ckpts.latest() or 'none'}. Try a lower train.lr, "
                        "train.max_grad_norm, or mixed_precision: no"
                    )
                scaled = loss / t.gradient_accumulation_steps
                (scaler.scale(scaled) if scaler else scaled).backward()
                total += loss.item() / t.gradient_accumulation_steps
            if scaler:
                scaler.unscale_(optimizer)
            grad_norm = (
                torch.nn.utils.clip_grad_norm_(list(params.values()), t.max_grad_norm).item()
                if t.max_grad_norm
                else float("nan")
            )
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update(params)
                state.ema_updates = ema.num_updates
            state.step = step + 1
            state.last_loss = total

            bar.update(1)
            bar.set_postfix(loss=f"{total:.4f}", lr=f"{lr:.2e}", refresh=False)
            if state.step % cfg.logging.log_every == 0 or state.step == t.steps:
                rate = (state.step - started_step) / max(1e-9, time.perf_counter() - started)
                log.log(
                    state.step,
                    {
                        "loss": total,
                        "lr": lr,
                        "grad_norm": grad_norm,
                        "steps_per_s": rate,
                        "epoch": state.epoch,
                    },
                )
            if cfg.sample.every and state.step % cfg.sample.every == 0 and state.step < t.steps:
                with ema_weights(ema, params), offload.restored():
                    save_samples(family, cfg, state.step, device)
            if state.step % cfg.save.every == 0 or state.step == t.steps:
                ckpts.save(
                    state,
                    {k: p.detach().float() for k, p in params.items()},
                    optimizer,
                    ema.state_dict() if ema else None,
                    extra=(lambda folder: export(folder, steps=state.step)) if export else None,
                )
            if on_step is not None:
                on_step(state)
    finally:
        batches.close()
        bar.close()
        log.close()

    with ema_weights(ema, params), offload.restored():
        save_samples(family, cfg, state.step, device)
        if cfg.network is not None:
            output = _export_path(cfg, run_dir)
            export(run_dir, steps=state.step)
        else:
            output = atomic_write_dir(run_dir / "model", family.save_pretrained)
    return TrainResult(run_dir, state.step, output, state.last_loss, resumed_from)


def _export_path(cfg: JobConfig, folder: Path) -> Path:
    return folder / f"{cfg.name}.safetensors"


def _exporter(family: ModelFamily, cfg: JobConfig, state_info: dict[str, str]) -> Callable[..., None] | None:
    """For adapter runs: a function writing the usable adapter file (kohya/diffusers layout) to a folder."""
    if cfg.network is None:
        return None
    net = cfg.network

    def write(folder: Path, steps: int | None = None) -> None:
        info = {**state_info, "eri_config_hash": config_fingerprint(cfg)}
        if steps is not None:
            info["eri_steps"] = str(steps)
        export_network(family, net, _export_path(cfg, folder), cfg.save.format, cfg.save.dtype, info)

    return write


def _resume(
    cfg: JobConfig,
    ckpts: CheckpointManager,
    state: TrainState,
    params: dict[str, nn.Parameter],
    optimizer: torch.optim.Optimizer,
    ema: EMA | None,
) -> Path | None:
    """Load the checkpoint ``save.resume`` points at (or the latest) into the live objects."""
    if cfg.save.resume is False:
        return None
    path = Path(cfg.save.resume) if isinstance(cfg.save.resume, str) else ckpts.latest()
    if path is None:
        return None
    if not path.is_dir():
        raise FileNotFoundError(f"save.resume: checkpoint '{path}' does not exist")
    saved, weights, opt_state, ema_state = CheckpointManager.load(path)
    if saved.config_hash != state.config_hash:
        logger.warning(
            "resuming %s with a changed config (fingerprint %s -> %s); results will differ from "
            "an uninterrupted run",
            path,
            saved.config_hash,
            state.config_hash,
        )
    missing = set(params) - set(weights)
    if missing:
        raise RuntimeError(
            f"checkpoint '{path}' does not match this model: {len(missing)} trainable tensors "
            f"missing, e.g. {sorted(missing)[:3]}"
        )
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(weights[name].to(p.dtype))
    optimizer.load_state_dict(opt_state)
    if ema is not None:
        if ema_state is None:
            raise RuntimeError(f"checkpoint '{path}' has no EMA weights but train.ema.enabled is true")
        ema.load_state_dict(ema_state, saved.ema_updates)
    state.step, state.micro_batches, state.epoch = saved.step, saved.micro_batches, saved.epoch
    state.ema_updates, state.last_loss = saved.ema_updates, saved.last_loss
    logger.info("resumed from %s at step %d", path, state.step)
    return path
