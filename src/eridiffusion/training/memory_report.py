"""What ``eri plan`` reports: the :class:`MemoryEstimate` of a traced step, its text, and the advice for a
step that does not fit.

The card must hold more than the traced peak: the CUDA context and kernels (outside
``max_memory_allocated``) and the caching allocator's slack are added before the ``--gpu-gb`` check.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

GIB = 2**30
CUDA_CONTEXT_GIB = 0.75
"""CUDA context and kernels, outside ``max_memory_allocated`` (0.5-1 GiB on current drivers)."""
FRAGMENTATION = 0.05
"""Caching-allocator slack on top of the live bytes."""


@dataclass
class MemoryEstimate:
    """Peak device bytes of one training step, split by what holds them (at the moment of the peak)."""

    arch: str
    model: str
    resolution: int
    batch_size: int
    precision: str
    weights_dtype: str
    quantize: str
    gradient_checkpointing: bool
    adapter: str
    text_encoders: str
    vae: str
    optimizer: str
    blocks_to_swap: int
    weights: int
    trainable: int
    grads: int
    optimizer_state: int
    caches: int
    activations: int
    peak: int
    preparing: int
    """Weights on the device while the caches are built: the encoders the caches replace, alone (the
    trainer places the denoiser after they leave), at their stored size."""
    trace_seconds: float
    gpu_gb: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def required_gib(self) -> float:
        """What the card must have: the peak plus allocator slack plus the CUDA context."""
        return self.peak * (1 + FRAGMENTATION) / GIB + CUDA_CONTEXT_GIB

    @property
    def fits(self) -> bool | None:
        return None if self.gpu_gb is None else self.required_gib <= self.gpu_gb

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(required_gib=round(self.required_gib, 3), fits=self.fits)
        return out


def format_estimate(e: MemoryEstimate) -> str:
    """The estimate as the lines ``eri plan`` prints."""

    def gib(n: float) -> str:
        return f"{n / GIB:7.2f} GiB"

    lines = [
        f"memory plan: {e.arch} ({e.model}) at {e.resolution} px, batch {e.batch_size}, "
        f"{e.precision} autocast, frozen weights {e.weights_dtype}, quantised base {e.quantize}",
        f"  adapter {e.adapter}; gradient checkpointing {'on' if e.gradient_checkpointing else 'off'}; "
        f"optimizer {e.optimizer}; text encoders {e.text_encoders}; VAE {e.vae}",
        f"  peak device memory of a training step: {gib(e.peak)}",
        f"    weights (frozen, on the device) {gib(e.weights)}",
        f"    trained weights                 {gib(e.trainable)}",
        f"    gradients                       {gib(e.grads)}",
        f"    optimizer state                 {gib(e.optimizer_state)}",
        f"    caches (batch, autocast copies) {gib(e.caches)}",
        f"    activations and temporaries     {gib(e.activations)}",
        f"  while building caches: {gib(e.preparing)} of encoder weights on the device (before the denoiser)",
        f"  needs about {e.required_gib:.1f} GiB with the CUDA context and allocator slack "
        f"(traced in {e.trace_seconds:.1f} s)",
    ]
    lines += [f"  note: {n}" for n in e.notes]
    if e.fits is not None:
        verdict = "fits" if e.fits else "does NOT fit"
        lines.append(f"  {verdict} a {e.gpu_gb:g} GiB GPU")
        if not e.fits:
            lines.append(f"  to lower it: {'; '.join(_advice(e))}")
        if e.preparing / GIB + CUDA_CONTEXT_GIB > e.gpu_gb:
            lines.append(
                f"  warning: building the caches puts {e.preparing / GIB:.1f} GiB of encoder weights on the "
                "device (model.quantize_text_encoders shrinks them; the verdict covers the step)"
            )
    return "\n".join(lines)


def _advice(e: MemoryEstimate) -> list[str]:
    """The memory options this config does not use yet, biggest saving first."""
    out = []
    if e.weights_dtype == "fp32":
        out.append("model.dtype: bf16")
    if "on the device" in e.text_encoders or "on the device" in e.vae:
        out.append("datasets[].cache_latents_to_disk / cache_text_embeddings (encoders leave the device)")
    if not e.gradient_checkpointing:
        out.append("train.gradient_checkpointing: true")
    full = e.adapter.startswith("none")
    if e.quantize.startswith("none") and not full:
        out.append("a quantised base (model.quantize.weights: fp8 / int8 / nf4)")
    if e.arch in ("sd3", "flux") and not e.blocks_to_swap:
        out.append("train.blocks_to_swap: N")
    if e.optimizer == "adamw" and full:
        out.append("train.optimizer.type: adamw8bit")
    if full:
        out.append("a LoRA (network:) instead of a full fine-tune")
    out.append("a smaller batch or resolution")
    return out
