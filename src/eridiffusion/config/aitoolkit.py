"""Configs from the ecosystem, translated before validation: ai-toolkit job files and familiar key names.

An ai-toolkit job file (``job: extension``, ``config: {name, process: [{type: sd_trainer, ...}]}``) is
rewritten key by key into an eri config. Every key lands in one of four places, and the translation says
which for each (the list is printed once by the CLI):

* moved: ``save.save_every -> save.every`` (keys with the same name and meaning pass through silently);
* accepted because its value is what eri does anyway: ``train_unet: true``, ``push_to_hub: false``;
* ignored because it only concerns ai-toolkit's UI or the look of sample images, never the trained weights
  (``sqlite_db_path``, ``sample.width``); each is listed with the reason;
* refused: a key that would change training and has no equivalent is an error naming it and what to do.
  Nothing is dropped silently (ai-toolkit and sd-scripts ignoring typos is what the schema exists to avoid).

Native eri configs get the same aliases (``is_sdxl``, ``gradient_accumulation``, ``optimizer: adamw8bit``
as a string, ``learning_rate``, ``max_train_steps``, ``float16``...), so configs written from the README of
older versions or from peers' habits load as they are.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from eridiffusion.config.keymap import (
    ARCH_FLAGS,
    DTYPES,
    MIXED_PRECISION,
    OPTIMIZER_NAMES,
    QUANTIZE,
    SAMPLERS,
    SECTIONS,
    TIMESTEP_TYPES,
    UNSUPPORTED_ARCH_FLAGS,
    Handler,
    Translation,
    TranslationError,
    cosmetic,
    lookup,
    move,
    only,
)
from eridiffusion.config.schema import DatasetConfig, EMAConfig, NetworkConfig

PROCESS_TYPES = ("sd_trainer", "ui_trainer", "diffusion_trainer")


def _optimizer(t: Translation, src: str, section: str, value: Any) -> None:
    if isinstance(value, dict):
        t.put(
            src, f"{section}.optimizer", {**t.out.get("train", {}).get("optimizer", {}), **value}, note=False
        )
        return
    try:
        name = lookup(OPTIMIZER_NAMES, "optimizer")(value)
    except ValueError as exc:
        t.refuse(src, str(exc))
        return
    t.put(src, f"{section}.optimizer.type", name)


def _optimizer_params(t: Translation, src: str, section: str, value: Any) -> None:
    if not isinstance(value, dict):
        t.refuse(src, "must be a mapping of optimizer arguments")
        return
    for key, v in value.items():
        shared = key in ("weight_decay", "betas", "eps")
        dst = f"{section}.optimizer.{key}" if shared else f"{section}.optimizer.params.{key}"
        t.put(f"{src}.{key}", dst, list(v) if isinstance(v, tuple) else v)


def _ema(t: Translation, src: str, section: str, value: Any) -> None:
    names = {"use_ema": "enabled", "ema_decay": "decay"}
    for key, v in (value or {}).items():
        if key in names:
            t.put(f"{src}.{key}", f"{section}.ema.{names[key]}", v)
        elif key in EMAConfig.model_fields:
            t.put(f"{src}.{key}", f"{section}.ema.{key}", v, note=False)
        else:
            t.refuse(f"{src}.{key}", "no equivalent in train.ema (enabled, decay, warmup); remove it")


def _arch_flag(t: Translation, src: str, section: str, value: Any) -> None:
    key = src.rsplit(".", 1)[-1]
    if value:
        t.put(src, f"{section}.arch", ARCH_FLAGS[key])
    else:
        t.ignore(src, "false says nothing about the family")


def _unsupported_arch(t: Translation, src: str, section: str, value: Any) -> None:
    key = src.rsplit(".", 1)[-1]
    if value:
        t.refuse(src, f"{UNSUPPORTED_ARCH_FLAGS[key]} models are not supported; eri trains tiny, sd15, sdxl, "
                 "sd3 and flux")  # fmt: skip
    else:
        t.ignore(src, "false")


def _quantize(t: Translation, src: str, section: str, model: dict[str, Any]) -> None:
    """``quantize`` (bool or a type) and ``qtype`` (the type, default qfloat8) read together; likewise
    ``quantize_te`` and ``qtype_te`` for the text encoders."""
    for key, qkey, target in (
        ("quantize", "qtype", "quantize"),
        ("quantize_te", "qtype_te", "quantize_text_encoders"),
    ):
        if key == "quantize" and isinstance(model.get(key), dict):
            continue  # eri's own {weights, text_encoders} form: the schema reads it
        flag, qtype = model.pop(key, None), model.pop(qkey, None)
        if qtype is not None and flag is not True:
            t.ignore(f"{src}.{qkey}", f"applies only with {key}: true")
        if flag is None:
            continue
        value = (qtype or "qfloat8") if flag is True else "none" if flag is False else flag
        where = f"{src}.{key}" + (f"/{qkey}" if flag is True and qtype is not None else "")
        move(target, lookup(QUANTIZE, "quantize type"))(t, where, section, value)


def _timestep_type(t: Translation, src: str, section: str, value: Any) -> None:
    try:
        t.put(src, "model.options.timestep_sampling", lookup(TIMESTEP_TYPES, "timestep_type")(value))
    except ValueError as exc:
        t.refuse(src, f"{exc}; eri's flow families offer model.options.timestep_sampling: logit_normal, "
                 "uniform, mode")  # fmt: skip


def _network_type(t: Translation, src: str, section: str, value: Any) -> None:
    kind = str(value).lower()
    if kind == "locon":
        t.put(src, f"{section}.type", "lora")
        t.notes.append(f"{src}: LoCon is lora with network.conv set")
    elif kind in NetworkConfig.model_fields["type"].annotation.__args__:
        t.put(src, f"{section}.type", kind, note=False)
    else:
        t.refuse(src, f"network type {value!r} is not supported; use lora, loha, lokr or dora")


def _network_kwargs(t: Translation, src: str, section: str, value: Any) -> None:
    for key, v in (value or {}).items():
        if key in ("only_if_contains", "ignore_if_contains"):
            t.put(f"{src}.{key}", f"{section}.{key}", v)
        else:
            t.refuse(f"{src}.{key}", "no equivalent; eri's network keys are listed in the README")


SAMPLE_PROMPT_KEYS = {"prompt", "neg", "negative_prompt", "width", "height", "seed", "guidance_scale", "cfg",
                      "sample_steps", "steps"}  # fmt: skip


def _sample_prompts(t: Translation, src: str, section: str, value: Any) -> None:
    """ai-toolkit's ``samples: [{prompt: ..., width: ..., seed: ...}]`` (or plain strings): each becomes a
    sample.prompts row with its own settings; keys with no equivalent are reported, not dropped silently."""
    prompts: list[Any] = []
    for i, item in enumerate(value or []):
        prompt = item.get("prompt") if isinstance(item, dict) else item
        if not isinstance(prompt, str):
            t.refuse(f"{src}[{i}]", "needs a prompt")
            continue
        if not isinstance(item, dict):
            prompts.append(item)
            continue
        extra = sorted(set(item) - SAMPLE_PROMPT_KEYS)
        if extra:
            t.ignore(f"{src}[{i}].{'/'.join(extra)}", "per-prompt setting with no eri equivalent")
        kept = {k: v for k, v in item.items() if k in SAMPLE_PROMPT_KEYS}
        prompts.append(kept if set(kept) != {"prompt"} else prompt)
    t.put(src, f"{section}.prompts", prompts, note=not src.endswith(".prompts") or prompts != value)


def _disable_sampling(t: Translation, src: str, section: str, value: Any) -> None:
    if value:
        t.disable_sampling = True
        t.notes.append(f"{src} -> sample.prompts = []")
    else:
        t.ignore(src, "false")


def _logging_wandb(t: Translation, src: str, section: str, value: Any) -> None:
    """``use_wandb: true`` -> ``logging.wandb`` with its defaults (project eridiffusion, online)."""
    if value:
        t.put(src, "logging.wandb", {})
    else:
        t.ignore(src, "false")


def _switch(on: str, off: str, what: str) -> Any:
    """A true/false flag of another tool as the value of an eri setting (kohya's ``full_bf16: true``)."""

    def convert(value: Any) -> str:
        if not isinstance(value, bool):
            raise ValueError(f"{what} takes true or false, got {value!r}")
        return on if value else off

    return convert


def _train_unet(t: Translation, src: str, section: str, value: Any) -> None:
    """``train_unet: false`` (with ``train_text_encoder: true``) trains an adapter on the text encoders only:
    eri's ``network.components: [text_encoder]``, set in :func:`_finish` once the network section is known."""
    if value is True:
        t.notes.append(f"{src}: True is what eri does anyway")
    elif value is False:
        t.text_encoder_only = src
    else:
        t.refuse(src, f"takes true or false, got {value!r}")


UI = "ai-toolkit UI bookkeeping"
NO_SAMPLE_FIRST = "eri samples every sample.every steps and at the end, never before training"

MODEL_KEYS: dict[str, Handler] = {
    **dict.fromkeys(ARCH_FLAGS, _arch_flag),
    **dict.fromkeys(UNSUPPORTED_ARCH_FLAGS, _unsupported_arch),
    "low_vram": cosmetic("memory option only; eri's is model.dtype"),
    "model_kwargs": only(
        ({},), "no equivalent; family options go in model.options", "empty: nothing to apply"
    ),
    "dtype": move("dtype", lookup(DTYPES, "dtype")),
}
NETWORK_KEYS: dict[str, Handler] = {
    "type": _network_type,
    "network_kwargs": _network_kwargs,
    "pretrained_lora_path": move("init_from"),
    "lokr_full_rank": cosmetic("used only by ai-toolkit's lokr; eri's LoKr uses network.lokr_factor"),
}
TRAIN_KEYS: dict[str, Handler] = {
    "optimizer": _optimizer,
    "optimizer_params": _optimizer_params,
    "learning_rate": move("lr"),
    "max_train_steps": move("steps"),
    "gradient_accumulation": move("gradient_accumulation_steps"),
    "ema_config": _ema,
    "dtype": move("mixed_precision", lambda v: MIXED_PRECISION[lookup(DTYPES, "dtype")(v)]),
    "train_unet": _train_unet,
    "noise_scheduler": cosmetic("the model family fixes its noise objective (flow matching for sd3/flux)"),
    "timestep_type": _timestep_type,
    "content_or_style": only("balanced", "no equivalent; use model.options.timestep_sampling instead"),
    "linear_timesteps": only(False, "no equivalent; remove it or set false"),
    "skip_first_sample": cosmetic(NO_SAMPLE_FIRST),
    "force_first_sample": cosmetic(NO_SAMPLE_FIRST),
    "disable_sampling": _disable_sampling,
    "unload_text_encoder": only(False, "no equivalent; use datasets[].cache_text_embeddings"),
    "cache_text_embeddings": cosmetic("set per dataset in eri: datasets[].cache_text_embeddings"),
    "bypass_guidance_embedding": only(False, "no equivalent in eri's Flux training; set it false"),
    "switch_boundary_every": cosmetic("applies only to two-expert video models"),
    "full_bf16": move("weights_dtype", _switch("bf16", "fp32", "full_bf16")),  # kohya's flag
    "stochastic_rounding": move("weights_rounding", _switch("stochastic", "nearest", "stochastic_rounding")),
    "loss_type": move("loss"),
    "snr_gamma": move("min_snr_gamma"),
}
SAVE_KEYS: dict[str, Handler] = {
    "save_every": move("every"),
    "max_step_saves_to_keep": move("keep"),
    "dtype": move("dtype", lookup(DTYPES, "dtype")),
    "save_format": move("format", lookup({"diffusers": "diffusers", "safetensors": "kohya"}, "save_format")),
    "push_to_hub": only(False, "eri never uploads; set push_to_hub: false and upload with `hf upload`"),
    "hf_repo_id": cosmetic("applies only with push_to_hub: true"),
    "hf_private": cosmetic("applies only with push_to_hub: true"),
}
SAMPLE_KEYS: dict[str, Handler] = {
    "sampler": move("sampler", lambda v: SAMPLERS.get(str(v).lower(), v)),
    "sample_every": move("every"),
    "sample_steps": move("steps"),
    "neg": move("negative_prompt"),
    "samples": _sample_prompts,
    "prompts": _sample_prompts,
    "walk_seed": move("walk_seed"),
    "sample_start_step": cosmetic(NO_SAMPLE_FIRST),
    "width": move("width"),
    "height": move("height"),
    "num_frames": only(1, "video sampling is not supported; set num_frames: 1"),
    "fps": cosmetic("video only"),
}
LOGGING_KEYS: dict[str, Handler] = {
    "use_wandb": _logging_wandb,
    "verbose": cosmetic("use `eri -v` for debug logging"),
    "project_name": cosmetic("W&B only"),
    "run_name": cosmetic("W&B only"),
}
DATASET_KEYS: dict[str, Handler] = {
    "loss_multiplier": move("loss_weight"),
    "cache_latents": move("cache_latents_to_disk"),
    "network_weight": only(1, "no equivalent (eri trains each set at full adapter strength); remove it"),
    "control_path": only(
        (None, ""), "control images are not supported for training; remove it", "empty: nothing to apply"
    ),
    "mask_min_value": move("unmasked_weight"),
    "conditioning_data_dir": move("mask_path"),  # kohya's folder of masks for --masked_loss
    "invert_mask": only(False, "no equivalent; invert the mask images (white = trained)"),
    "default_caption": only(
        ("", None), "no equivalent; write a caption file per image", "empty: nothing to apply"
    ),
    "flip_y": only(False, "vertical flips are not supported; set flip_y: false"),
    "controls": only(
        ([],), "control images are not supported for training; remove them", "empty: nothing to apply"
    ),
    "shrink_video_to_frames": cosmetic("video only"),
    "num_frames": only(1, "video datasets are not supported; set num_frames: 1"),
    "do_i2v": cosmetic("video only"),
}
PROCESS_KEYS: dict[str, Handler] = {
    "training_folder": move("/output_dir"),
    "device": move("/train.device"),
    "sqlite_db_path": cosmetic(UI),
    "performance_log_every": cosmetic("performance stats in the terminal; eri logs steps_per_s"),
    "log_dir": cosmetic("eri writes TensorBoard logs under the run folder"),
}
ALIASES: dict[str, dict[str, Handler]] = {
    "model": MODEL_KEYS,
    "network": NETWORK_KEYS,
    "train": TRAIN_KEYS,
    "save": SAVE_KEYS,
    "sample": SAMPLE_KEYS,
    "logging": LOGGING_KEYS,
}


def _section(
    t: Translation,
    src: str,
    section: str,
    data: Any,
    table: dict[str, Handler],
    model: type[BaseModel],
    strict: bool,
) -> None:
    """Walk one section: table keys are translated, schema keys pass through, the rest is refused (strict)
    or left for the schema to report (native configs)."""
    if not isinstance(data, dict):
        t.put(src, section, data, note=False)  # the schema reports a section that is not a mapping
        return
    data = dict(data)
    if section == "model":
        _quantize(t, src, section, data)
    t.out.setdefault(section, {})
    for key, value in data.items():
        where = f"{src}.{key}"
        if key in table:
            table[key](t, where, section, value)
        elif key in model.model_fields or not strict:
            t.put(where, f"{section}.{key}", value, note=False)
        else:
            t.refuse(where, f"no equivalent in eri's {section.split('[')[0]} section; remove it "
                     f"(keys there: {', '.join(sorted(model.model_fields))})")  # fmt: skip


def _datasets(t: Translation, src: str, data: Any, strict: bool) -> None:
    if not isinstance(data, list):
        t.put(src, "datasets", data, note=False)
        return
    out = []
    for i, item in enumerate(data):
        label = f"datasets[{i}]"
        sub = Translation()
        _section(sub, f"{src}[{i}]", label, item, DATASET_KEYS, DatasetConfig, strict)
        out.append(sub.out.get(label, item))
        t.notes += sub.notes
        t.problems += sub.problems
    t.put(src, "datasets", out, note=False)


def translate_native(data: dict[str, Any]) -> Translation:
    """Aliases in an eri config (``is_sdxl``, ``learning_rate``, ``optimizer: adamw8bit``...)."""
    t = Translation()
    for key, value in data.items():
        if key in ALIASES:
            _section(t, key, key, value, ALIASES[key], SECTIONS[key], strict=False)
        elif key == "datasets":
            _datasets(t, key, value, strict=False)
        else:
            t.put(key, key, value, note=False)
    _finish(t, foreign=False)
    return t


def is_aitoolkit(data: dict[str, Any]) -> bool:
    return "config" in data and (
        "job" in data or isinstance(data.get("config"), dict) and "process" in data["config"]
    )


def translate_aitoolkit(data: dict[str, Any]) -> Translation:
    """An ai-toolkit job file as an eri config; ``problems`` lists every key with no equivalent."""
    t = Translation()
    if data.get("job") != "extension":
        t.refuse("job", f"{data.get('job')!r} is not an ai-toolkit training job (job: extension); eri only "
                 "trains")  # fmt: skip
    for key in sorted(set(data) - {"job", "config", "meta"}):
        t.refuse(key, "not part of an ai-toolkit job file (job, config, meta)")
    config = data.get("config") if isinstance(data.get("config"), dict) else {}
    for key in sorted(set(config) - {"name", "process"}):
        t.refuse(f"config.{key}", "no equivalent; put settings inside the process")
    if "name" in config:
        t.put("config.name", "name", config["name"])
    processes = config.get("process")
    if not isinstance(processes, list) or len(processes) != 1 or not isinstance(processes[0], dict):
        t.refuse("config.process", "needs exactly one process (eri runs one training job per file; split it)")
        return t
    process = processes[0]
    src = "config.process[0]"
    if process.get("type") not in PROCESS_TYPES:
        t.refuse(
            f"{src}.type", f"{process.get('type')!r} is not a trainer eri reads; use one of {PROCESS_TYPES}"
        )
    for key, value in process.items():
        where = f"{src}.{key}"
        if key in ("type", "trigger_word"):
            continue
        if key in ALIASES:
            _section(t, where, key, value, ALIASES[key], SECTIONS[key], strict=True)
        elif key == "datasets":
            _datasets(t, where, value, strict=True)
        elif key in PROCESS_KEYS:
            PROCESS_KEYS[key](t, where, "", value)
        else:
            t.refuse(where, "no equivalent in eri; remove it (see the README's ai-toolkit table)")
    trigger = process.get("trigger_word")
    if trigger:
        for i, d in enumerate(t.out.get("datasets", [])):
            if isinstance(d, dict) and not d.get("trigger_word"):
                d["trigger_word"] = trigger
                t.notes.append(f"{src}.trigger_word -> datasets[{i}].trigger_word = {trigger!r}")
    if "sample" in t.out and "images_per_prompt" not in t.out["sample"]:
        t.put(f"{src}.sample", "sample.images_per_prompt", 1)  # ai-toolkit draws one image per prompt
    meta = data.get("meta")
    if isinstance(meta, dict):
        for key, value in meta.items():
            text = str(value).replace("[name]", str(config.get("name", "")))
            t.put(f"meta.{key}", f"save.metadata.{key}", text)
    _finish(t, foreign=True)
    return t


def _finish(t: Translation, foreign: bool) -> None:
    """What needs the whole file read: sampling switched off, a text-encoder-only adapter, and ai-toolkit's
    defaults where they differ from eri's (an ai-toolkit LoRA leaves the text encoders alone unless asked)."""
    if t.disable_sampling:
        t.out.setdefault("sample", {})["prompts"] = []
    if foreign and "train_text_encoder" not in t.out.get("train", {}):
        t.out.setdefault("train", {})["train_text_encoder"] = False
        t.notes.append("train.train_text_encoder: unset, so False as in ai-toolkit (eri's default is True)")
    if t.text_encoder_only is not None:
        src = t.text_encoder_only
        if not isinstance(t.out.get("network"), dict):
            t.refuse(src, "false trains only the text encoders, which eri does with an adapter: add a "
                     "network section, or set train_unet: true for a full fine-tune")  # fmt: skip
        elif t.out.get("train", {}).get("train_text_encoder", True) is not True:  # eri's own default: on
            t.refuse(src, "false with train_text_encoder unset or false would train nothing; set "
                     "train_text_encoder: true to train a text-encoder adapter")  # fmt: skip
        else:
            t.put(src, "network.components", ["text_encoder"])
    for key in [k for k, v in t.out.items() if v == {} and k in SECTIONS and k != "network"]:
        del t.out[key]


def translate(data: dict[str, Any]) -> tuple[dict[str, Any], list[str], bool]:
    """(eri config, what was done with each translated key, whether it was an ai-toolkit file).

    Raises :class:`TranslationError` listing every key that has no equivalent.
    """
    foreign = is_aitoolkit(data)
    t = translate_aitoolkit(data) if foreign else translate_native(data)
    if t.problems:
        kind = "ai-toolkit job file" if foreign else "config"
        raise TranslationError(
            f"{len(t.problems)} key(s) of this {kind} have no equivalent in eri:\n"
            + "\n".join(f"  {p}" for p in t.problems)
        )
    return t.out, t.notes, foreign
