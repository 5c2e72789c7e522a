"""The header text of exported adapter files: kohya's ``ss_*`` training keys and ModelSpec ``modelspec.*``.

A1111/Forge's LoRA browser, ComfyUI-Manager, civitai's uploader and kohya's own tools read these keys (base
model version, resolution, steps, epochs, network args, dataset tag frequency, session id, hashes), so a
file trained here shows the same details as one trained with sd-scripts. The ModelSpec keys follow
Stability AI's ModelSpec 1.0.1 (architecture, implementation, title, resolution, date). All values are
strings, as the safetensors header requires; nested values are JSON text as kohya writes them.
"""

from __future__ import annotations

import datetime
import hashlib
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from eridiffusion.config.schema import JobConfig

BASE_MODEL_VERSION = {
    "sd15": "sd_v1",
    "sdxl": "sdxl_base_v1-0",
    "sd3": "sd3",
    "flux": "flux1",
    "tiny": "eri_tiny",
}
"""kohya's ``ss_base_model_version`` for each family."""

IMPLEMENTATION = {
    "sd15": "diffusers",
    "sdxl": "https://github.com/Stability-AI/generative-models",
    "sd3": "diffusers",
    "flux": "https://github.com/black-forest-labs/flux",
    "tiny": "https://github.com/eridiffusion/eridiffusion",
}
"""ModelSpec ``implementation`` as sd-scripts writes it for a LoRA of each family."""

MODELSPEC_FIELDS = ("title", "author", "description", "license", "tags", "usage_hint", "trigger_phrase")
"""``save.metadata`` keys written as ``modelspec.<key>`` rather than as given."""


@dataclass(frozen=True)
class RunCounters:
    """What the training loop knows at export time and the config does not."""

    steps: int
    """Optimizer steps done."""
    epoch: int
    """Current epoch (0-based, as the loop counts it)."""
    batches_per_epoch: int
    """``TrainingData.batches_per_epoch``."""
    captions: Sequence[Sequence[str]]
    """Per dataset, its captions after trigger substitution (``TrainingData.captions``)."""
    session_id: int
    """Random id drawn once per run (kept across resume), kohya's ``ss_session_id``."""
    started_at: float
    """Unix time the run started."""
    finished_at: float | None = None
    """Unix time of this export (None: not known)."""


def modelspec_architecture(cfg: JobConfig, arch: str) -> str:
    """ModelSpec id of the base architecture plus the adapter kind, e.g. ``flux-1-dev/lora``."""
    name = (cfg.model.name_or_path or "").lower()
    if arch == "sdxl":
        base = "stable-diffusion-xl-v1-base"
    elif arch == "sd3":
        variant = "5-large" if "3.5-large" in name else "5-medium" if "3.5-medium" in name else "m"
        base = f"stable-diffusion-3-{variant}"
    elif arch == "flux":
        base = "flux-1-schnell" if "schnell" in name else "flux-1-dev" if "dev" in name else "flux-1"
    elif arch == "sd15":
        base = "stable-diffusion-v1"
    else:
        base = f"eri-{arch}"
    kind = cfg.network.type if cfg.network else "lora"
    return f"{base}/{'lycoris' if kind in ('loha', 'lokr') else 'lora'}"


def tag_frequency(captions: Sequence[str]) -> dict[str, int]:
    """How often each comma-separated tag occurs (kohya's ``ss_tag_frequency`` for one folder)."""
    counts: Counter[str] = Counter()
    for caption in captions:
        counts.update(tag.strip() for tag in caption.split(",") if tag.strip())
    return dict(counts)


def _dataset_keys(cfg: JobConfig, captions: Sequence[Sequence[str]]) -> dict[str, str]:
    dirs: dict[str, dict[str, int]] = {}
    reg_dirs: dict[str, dict[str, int]] = {}
    tags: dict[str, dict[str, int]] = {}
    train_images = reg_images = 0
    for d, caps in zip(cfg.datasets, captions, strict=True):
        name = Path(str(d.folder_path if d.folder_path is not None else d.shards)).name
        entry = {"n_repeats": d.num_repeats, "img_count": len(caps)}
        (reg_dirs if d.is_reg else dirs)[name] = entry
        if d.is_reg:
            reg_images += len(caps) * d.num_repeats
        else:
            train_images += len(caps) * d.num_repeats
            tags[name] = tag_frequency(caps)
    return {
        "ss_num_train_images": str(train_images),
        "ss_num_reg_images": str(reg_images),
        "ss_dataset_dirs": json.dumps(dirs),
        "ss_reg_dataset_dirs": json.dumps(reg_dirs),
        "ss_tag_frequency": json.dumps(tags),
    }


def _optimizer_text(cfg: JobConfig) -> str:
    o = cfg.train.optimizer
    args = {"weight_decay": o.weight_decay, "betas": list(o.betas), "eps": o.eps, **o.params}
    return f"{o.type}({','.join(f'{k}={v}' for k, v in args.items())})"


def training_metadata(
    cfg: JobConfig, arch: str, prediction_type: str, counters: RunCounters
) -> dict[str, str]:
    """The ``ss_*`` and ``modelspec.*`` keys for an adapter trained by ``cfg``, as of ``counters``.

    Pass the result into ``export_network``'s ``info``; ``save_adapter`` adds the weight hashes.
    """
    t, net, first, base = cfg.train, cfg.network, cfg.datasets[0], cfg.model.name_or_path
    side = first.resolutions[0]
    when = counters.finished_at if counters.finished_at is not None else counters.started_at
    stamp = datetime.datetime.fromtimestamp(when, datetime.timezone.utc)
    extra = dict(cfg.save.metadata)
    network_args = {}
    if net is not None:
        network_args = {
            "algo": net.type,
            "conv_dim": net.conv,
            "conv_alpha": net.conv_alpha,
            "dropout": net.dropout,
            "target": net.target,
            **({"factor": net.lokr_factor} if net.type == "lokr" else {}),
        }
    meta = {
        "ss_session_id": str(counters.session_id),
        "ss_training_started_at": str(counters.started_at),
        "ss_training_finished_at": str(counters.finished_at) if counters.finished_at is not None else "None",
        "ss_output_name": cfg.name,
        "ss_base_model_version": BASE_MODEL_VERSION.get(arch, arch),
        "ss_sd_model_name": Path(base).name if base else f"scratch:{arch}",
        "ss_v2": "False",
        "ss_resolution": f"({side}, {side})",
        "ss_steps": str(counters.steps),
        "ss_max_train_steps": str(t.steps),
        "ss_epoch": str(counters.epoch + 1),
        "ss_num_epochs": str(-(-t.steps // max(1, counters.batches_per_epoch))),
        "ss_num_batches_per_epoch": str(counters.batches_per_epoch),
        "ss_batch_size_per_device": str(t.batch_size),
        "ss_gradient_accumulation_steps": str(t.gradient_accumulation_steps),
        "ss_gradient_checkpointing": str(t.gradient_checkpointing),
        "ss_learning_rate": str(t.lr),
        "ss_unet_lr": str(t.lr),
        "ss_text_encoder_lr": str(t.lr if t.train_text_encoder else 0.0),
        "ss_lr_scheduler": t.lr_scheduler,
        "ss_lr_warmup_steps": str(t.lr_warmup_steps),
        "ss_optimizer": _optimizer_text(cfg),
        "ss_max_grad_norm": str(t.max_grad_norm),
        "ss_mixed_precision": t.mixed_precision,
        "ss_seed": str(t.seed),
        "ss_min_snr_gamma": str(t.min_snr_gamma),
        "ss_loss_type": {"mse": "l2", "l1": "l1", "huber": "huber"}[t.loss],
        "ss_huber_c": str(t.huber_delta),
        "ss_caption_dropout_rate": str(first.caption_dropout_rate),
        "ss_cache_latents": str(first.cache_latents_to_disk),
        "ss_prior_loss_weight": str(next((d.loss_weight for d in cfg.datasets if d.is_reg), 1.0)),
        "ss_network_args": json.dumps(network_args),
        "ss_network_dropout": str(net.dropout if net else 0.0),
        "ss_training_comment": extra.pop("training_comment", ""),
        **_dataset_keys(cfg, counters.captions),
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": modelspec_architecture(cfg, arch),
        "modelspec.implementation": IMPLEMENTATION.get(arch, "diffusers"),
        "modelspec.title": extra.pop("title", cfg.name),
        "modelspec.resolution": f"{side}x{side}",
        "modelspec.date": stamp.isoformat(timespec="seconds"),
    }
    if arch != "flux":  # ModelSpec leaves prediction_type out for Flux, as sd-scripts does
        meta["modelspec.prediction_type"] = "v" if prediction_type == "v_prediction" else prediction_type
    triggers = sorted({d.trigger_word for d in cfg.datasets if d.trigger_word})
    if triggers:
        meta["modelspec.trigger_phrase"] = ", ".join(triggers)
    for key in MODELSPEC_FIELDS:
        if key in extra:
            meta[f"modelspec.{key}"] = extra.pop(key)
    return {**meta, **extra}


def weight_hashes(data: bytes) -> dict[str, str]:
    """sd-scripts' hashes of a saved file (``data``: its full bytes): ``sshs_model_hash`` is the SHA-256 of
    the tensor bytes after the header (what A1111's additional-networks shows), ``sshs_legacy_hash`` the
    first 8 hex digits of the SHA-256 of the 64 KiB at 1 MiB; ``modelspec.hash_sha256`` repeats the first."""
    header = int.from_bytes(data[:8], "little")
    model_hash = hashlib.sha256(data[8 + header :]).hexdigest()
    legacy = hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    return {
        "sshs_model_hash": model_hash,
        "sshs_legacy_hash": legacy,
        "modelspec.hash_sha256": f"0x{model_hash}",
    }


def model_card(cfg: JobConfig, arch: str, counters: RunCounters) -> str:
    """README.md for a full-model save: Hugging Face model-card front matter plus how it was trained.

    The same facts as the adapter header, for readers of a model folder (the Hub shows the front matter).
    """
    base = cfg.model.name_or_path
    triggers = sorted({d.trigger_word for d in cfg.datasets if d.trigger_word})
    images = sum(len(c) for c, d in zip(counters.captions, cfg.datasets, strict=True) if not d.is_reg)
    t = cfg.train
    front = ["---", "library_name: diffusers", f"tags: [eridiffusion, text-to-image, {arch}]"]
    if base:
        front.append(f"base_model: {base}")
    front.append("---")
    lines = [
        f"# {cfg.save.metadata.get('title', cfg.name)}",
        "",
        f"Trained with EriDiffusion (`eri train`): the {arch} family, "
        + (f"fine-tuned from `{base}`." if base else "built from scratch."),
        "",
        f"- steps: {counters.steps} of {t.steps} (epoch {counters.epoch + 1}), batch {t.batch_size} x "
        f"{t.gradient_accumulation_steps} accumulation",
        f"- optimizer: {_optimizer_text(cfg)}, lr {t.lr:g}, {t.lr_scheduler} schedule",
        f"- data: {images} training image(s) in {len(cfg.datasets)} dataset(s) at "
        f"{cfg.datasets[0].resolutions[0]} px",
        f"- seed: {t.seed}; session {counters.session_id}",
    ]
    if triggers:
        lines.append(f"- trigger word(s): {', '.join(triggers)}")
    if "description" in cfg.save.metadata:
        lines += ["", cfg.save.metadata["description"]]
    return "\n".join(front + [""] + lines) + "\n"
