"""One optimizer step, for every kind of stage.

A stage kind (diffusion, autoencoder + discriminator, adapter) only says how a micro-batch becomes a loss
(:func:`diffusion_loss`, the autoencoder's generator and discriminator losses); :func:`optimizer_step` does
the rest the same way for all of them: autocast, backward over the accumulated micro-batches, gradient sync
across processes, the non-finite check, clipping, the optimizer and the zeroing of gradients.

Host syncs are what makes a small step slow on a GPU, so a step makes exactly one: the loss, the gradient
norms and any metrics travel to the host together, after backward and before the optimizer, which is also the
last moment a non-finite step can still be refused.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from eridiffusion.config.schema import JobConfig
from eridiffusion.data.loader import Batch
from eridiffusion.data.masks import resize_loss_mask
from eridiffusion.device import is_out_of_memory, release_memory
from eridiffusion.models import Conditioning, ModelFamily
from eridiffusion.training.engine import Engine
from eridiffusion.training.losses import min_snr_weights, per_sample_loss
from eridiffusion.training.noise import perturbed, shape_noise
from eridiffusion.training.preservation import OutputPreservation
from eridiffusion.training.schedules import ScheduleSettings, scheduled_lr

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Loss became NaN/inf; the weights of this step were not applied and earlier checkpoints are kept."""


def step_generator(seed: int, step: int, micro: int) -> torch.Generator:
    """The CPU generator of one micro-batch: noise, timesteps and caption dropout are a pure function of
    (seed, step, micro-batch), which is what makes resume exact."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 1009 + micro) % (2**63))


def draw_noise(shape: tuple[int, ...], gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """Gaussian noise made on ``device``: on a GPU a generator there, seeded from ``gen``, saves the host
    draw and the copy; on the CPU the draw is ``gen``'s own, so CPU runs keep their exact sequence."""
    if device.type == "cpu":
        return torch.randn(shape, generator=gen)
    seed = int(torch.randint(0, 2**62, (1,), generator=gen))
    return torch.randn(shape, generator=torch.Generator(device).manual_seed(seed), device=device)


def diffusion_loss(
    family: ModelFamily,
    batch: Batch,
    cfg: JobConfig,
    gen: torch.Generator,
    device: torch.device,
    preservation: OutputPreservation | None = None,
    metrics: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """One micro-batch's loss: noise the images, predict, regress the objective's target.

    Random draws are made for every row of the whole micro-batch (``batch.global_size``) and this process
    keeps its rows, so a process's share of a batch is trained exactly as in a one-process run of the whole.
    With ``preservation`` each row adds its output-preservation term (``train.diff_output_preservation``),
    whose share of the loss is put in ``metrics["preservation_loss"]`` when ``metrics`` is given.
    """
    n = len(batch)
    n_all = batch.global_size or n
    rows = slice(batch.offset, batch.offset + n)
    drop = torch.rand(n_all, generator=gen)[rows] < batch.dropout_rates
    kept = ["" if d else c for c, d in zip(batch.captions, drop.tolist(), strict=True)]

    def conditioning() -> Conditioning:
        if batch.cond is not None:
            return batch.cached_conditioning(drop, device)
        return family.encode_prompt(kept)

    preserve = None if preservation is None else functools.partial(preservation.per_sample, family, kept)
    return loss_after_dropout(family, batch, cfg, gen, device, conditioning, preserve, metrics)


ExtraLoss = Callable[[torch.Tensor, torch.Tensor, Conditioning], torch.Tensor]
"""(noisy input, timesteps, conditioning from the data) -> an extra loss per row, weighted by the rows'
loss weights as the main loss is (output preservation)."""


def loss_after_dropout(
    family: ModelFamily,
    batch: Batch,
    cfg: JobConfig,
    gen: torch.Generator,
    device: torch.device,
    conditioning: Callable[[], Conditioning],
    extra_loss: ExtraLoss | None = None,
    metrics: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """:func:`diffusion_loss` after the caption-dropout draw; ``conditioning`` gives the batch's text
    conditioning when the step needs it (after the latents, as the memory plan traces it too)."""
    n = len(batch)
    n_all = batch.global_size or n
    rows = slice(batch.offset, batch.offset + n)
    # cached latents / text embeddings (datasets[].cache_*) stand in for the encoders when present
    if batch.latents is not None:
        x0 = batch.latents.to(device, non_blocking=True)
    else:
        x0 = family.encode_images(batch.pixels.to(device, non_blocking=True))
    noise = draw_noise((n_all, *x0.shape[1:]), gen, device)[rows].to(device)
    # the latent size lets resolution-dependent schedules (Flux's shift) follow the batch's image size
    timesteps = family.objective.sample_timesteps(n_all, gen, latent_shape=tuple(x0.shape[1:]))[rows]
    timesteps = timesteps.to(device)
    noise = shape_noise(noise, n_all, rows, gen, cfg.train)
    target = family.objective.make_target(x0, noise, timesteps)
    if cfg.train.ip_noise_gamma:  # the input is noised a little more than the target says (exposure bias)
        more = perturbed(noise, n_all, rows, gen, cfg.train)
        target = dataclasses.replace(target, noisy=family.objective.make_target(x0, more, timesteps).noisy)
    cond = conditioning()
    size_cond = batch.size_conditioning()
    extra: Conditioning = {}
    if size_cond is not None:  # SDXL's micro-conditioning; families without it ignore the entry
        extra["size_conditioning"] = size_cond.to(device)
    cond.update(extra)
    pred = family.predict(target.noisy, timesteps, cond)
    mask = None  # datasets' loss masks (data/masks.py), averaged down to the prediction's size
    if batch.loss_mask is not None:
        mask = resize_loss_mask(batch.loss_mask.to(pred.device, torch.float32), tuple(pred.shape[-2:]))
    losses = per_sample_loss(pred, target.target, cfg.train.loss, cfg.train.huber_delta, mask)
    if cfg.train.min_snr_gamma is not None:
        weights = min_snr_weights(target.snr, cfg.train.min_snr_gamma, family.objective.prediction_type)
        losses = losses * weights.to(losses.device)
    if target.weight is not None:  # the objective's own weighting (flow matching's loss_weighting)
        losses = losses * target.weight.to(losses.device)
    weights = batch.loss_weights.to(losses.device)  # datasets[].loss_weight (e.g. for reg images)
    losses = losses * weights
    if extra_loss is not None:
        more = extra_loss(target.noisy, timesteps, extra).to(losses.device) * weights
        losses = losses + more
        if metrics is not None:
            metrics["preservation_loss"] = _batch_mean(more, batch).detach()
    return _batch_mean(losses, batch)


def _batch_mean(losses: torch.Tensor, batch: Batch) -> torch.Tensor:
    """The rows' share of the batch's mean loss: the mean, or for a process's share (or an out-of-memory
    piece) its part of the whole batch's mean times the processes that average it back."""
    if batch.global_size is None:
        return losses.mean()
    return losses.sum() * (batch.shares / batch.global_size)


@dataclass
class ParamGroup:
    """Parameters stepped by one optimizer with one LR schedule (a pipeline component, or the whole model
    of a single-stage run)."""

    name: str
    params: dict[str, nn.Parameter]
    optimizer: torch.optim.Optimizer
    lr: float
    schedule: ScheduleSettings
    """lr_scheduler, lr_warmup_steps, lr_cycles, lr_power (the group's config section)."""

    def set_lr(self, step: int, total_steps: int) -> float:
        lr = scheduled_lr(step, total_steps, self.lr, self.schedule)
        if self.optimizer.param_groups[0].get("lr") is None:  # Adafactor's relative step: it owns the LR
            return float("nan")
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr


MicroLoss = Callable[[int, int, int], tuple[torch.Tensor, dict[str, torch.Tensor]]]
"""(micro-batch index, part, parts) -> (loss of that part of the micro-batch, detached metrics to log)."""


class OutOfMemoryStop(RuntimeError):
    """The device ran out of memory even with one image per forward pass."""


def _backward_pass(
    engine: Engine, micro_loss: MicroLoss, micro_batches: int, parts: int
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward and backward over every micro-batch, each in ``parts`` pieces; the loss and metrics."""
    total = torch.zeros((), device=engine.device)
    sums: dict[str, torch.Tensor] = {}
    for micro in range(micro_batches):
        for part in range(parts):
            with engine.autocast():
                loss, metrics = micro_loss(micro, part, parts)
            engine.backward(loss / micro_batches)
            total = total + loss.detach().float() / micro_batches
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0) + v.detach().float().to(engine.device) / (micro_batches * parts)
    return total, sums


def _free_after_oom(engine: Engine, groups: list[ParamGroup]) -> None:
    for g in groups:
        g.optimizer.zero_grad(set_to_none=True)
    release_memory(engine.device)


def optimizer_step(
    engine: Engine,
    groups: list[ParamGroup],
    micro_loss: MicroLoss,
    micro_batches: int,
    max_grad_norm: float | None,
    where: str,
    max_parts: int = 1,
) -> dict[str, float]:
    """Backward over ``micro_batches`` micro-batches, then clip and step every group; returns the metrics
    (``loss``, the micro-batches' other metrics, ``grad_norm`` per group) as floats.

    Out of device memory, the same step is redone with every micro-batch in twice as many pieces (the same
    samples and noise, so the same step), up to ``max_parts`` pieces (one image each); the piece count
    stays for the rest of the run (``engine.parts``). Raises :class:`NonFiniteLossError` before any weight
    changes when the loss or a gradient norm is not finite (with fp16's loss scaler an overflow is the
    scaler's to skip, as usual). ``where`` names the step in messages.
    """
    while True:
        parts = min(engine.parts, max_parts)
        try:
            total, sums = _backward_pass(engine, micro_loss, micro_batches, parts)
            break
        except RuntimeError as exc:
            if not is_out_of_memory(exc) or engine.strategy == "fsdp":
                raise
            oom = str(exc).splitlines()[0][:200]
        _free_after_oom(engine, groups)  # outside the except block: its traceback holds the step's tensors
        if parts * 2 > max_parts:
            raise OutOfMemoryStop(
                f"out of memory {where} even with {parts} piece(s) per micro-batch ({oom}). Lower the "
                "resolution or batch size, turn on train.gradient_checkpointing, use a quantised base "
                "(model.quantize) or offload; `eri validate CONFIG --memory` estimates what fits"
            )
        engine.parts = parts * 2
        logger.warning(
            "out of memory %s: redoing the step with each micro-batch in %d pieces", where, parts * 2
        )
    names = list(sums)
    params = [p for g in groups for p in g.params.values()]
    # gradients and the scalars are averaged over processes together (one collective)
    scalars = engine.sync_gradients(params, torch.stack([total, *(sums[k] for k in names)]))
    engine.unscale(g.optimizer for g in groups)
    norms = [
        engine.clip_grad_norm(list(g.params.values()), max_grad_norm)
        if max_grad_norm
        else total.new_zeros(())
        for g in groups
    ]
    values = torch.cat([scalars, torch.stack(norms).to(scalars)]).tolist()  # the step's one host sync
    loss_value, metric_values = values[0], values[1 : 1 + len(names)]
    norm_values = values[1 + len(names) :]
    if not math.isfinite(loss_value) or (
        engine.scaler is None and not all(math.isfinite(v) for v in norm_values)
    ):
        for g in groups:
            g.optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLossError(
            f"loss is {loss_value} {where}; the step was not applied (gradient norm "
            f"{', '.join(f'{v:g}' for v in norm_values) if max_grad_norm else 'not computed'})"
        )
    for g in groups:
        engine.optimizer_step(g.optimizer)
        g.optimizer.zero_grad(set_to_none=True)
    engine.update_scaler()
    out = {**dict(zip(names, metric_values, strict=True)), "loss": loss_value}
    if max_grad_norm:
        if len(groups) == 1:
            out["grad_norm"] = norm_values[0]
        else:
            out.update({f"grad_norm/{g.name}": v for g, v in zip(groups, norm_values, strict=True)})
    return out
