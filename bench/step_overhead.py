"""Our LoRA training step against the step of diffusers' ``train_text_to_image_lora.py`` example, on the same
tiny SD1.5, data, batch and rank, timed in interleaved pairs (the machine is shared: alternating the two keeps
load changes from favouring either side).

    python bench/step_overhead.py --pairs 40 --out step_overhead.json

"ours" is the trainer's real step (:func:`eridiffusion.training.stages.train_step`: the next micro-batch from
the loader, tokenising, VAE encode, noise, UNet, loss, backward, clip, AdamW, zero_grad). "diffusers" is the
example's inner loop written out here: VAE encode + sample, randn_like noise, randint timesteps,
``add_noise``, text encoder on pre-tokenised ids (the example tokenises in its dataset transform), UNet with a
peft LoRA added by ``unet.add_adapter``, MSE, backward, ``clip_grad_norm_``, AdamW, zero_grad, and the
example's per-step ``loss.item()``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from report import emit  # bench/report.py, beside this script

from eridiffusion.config import validate_config
from eridiffusion.data.shapes import write_shapes_dataset
from eridiffusion.training.checkpoint import TrainState
from eridiffusion.training.engine import create_engine
from eridiffusion.training.loop import load_or_build
from eridiffusion.training.stages import setup_stage, single_stage_plan, train_step


def ours(folder: Path, batch: int, rank: int, seed: int):  # noqa: ANN201
    cfg = validate_config(
        {
            "name": "bench",
            "output_dir": str(folder / "out"),
            "model": {"arch": "sd15", "options": {"preset": "tiny"}},
            "network": {"type": "lora", "linear": rank, "linear_alpha": rank, "target": "attention"},
            "train": {"batch_size": batch, "seed": seed, "train_text_encoder": False, "device": "cpu"},
            "logging": {"progress": False, "tensorboard": False},
            "datasets": [{"folder_path": str(folder / "data"), "resolution": 32, "enable_buckets": False}],
        }
    )
    engine = create_engine(cfg.train)
    family = load_or_build(cfg).to(engine.device)
    plan = single_stage_plan(cfg, family)
    live = setup_stage(cfg, family, plan, engine, folder / "out")
    live.open_batches(0, 0, False, 1)
    state = TrainState()

    def step() -> None:
        train_step(cfg, family, live, state, engine, "bench")
        state.stage_step += 1

    return step, live, family, cfg


def diffusers_example(folder: Path, batch: int, rank: int, seed: int, live, cfg):  # noqa: ANN001, ANN201
    from diffusers import DDPMScheduler
    from peft import LoraConfig

    family = load_or_build(cfg)  # the same random weights (same seed)
    unet, vae = family.unet, family.vae
    (text_encoder,) = family.text_encoders.values()
    (tokenizer,) = family.tokenizers.values()
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    unet.requires_grad_(False)
    lora = LoraConfig(
        r=rank,
        lora_alpha=rank,
        init_lora_weights="gaussian",
        target_modules=["to_k", "to_q", "to_v", "to_out.0"],
    )
    unet.add_adapter(lora)
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012
    )
    batches = [live.data.batch(k) for k in range(8)]  # the loader's own batches, collated once
    ids = [
        tokenizer(
            b.captions,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        for b in batches
    ]
    unet.train()
    n = {"i": 0}

    def step() -> None:
        i = n["i"] % len(batches)
        n["i"] += 1
        latents = vae.encode(batches[i].pixels).latent_dist.sample() * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, 1000, (latents.shape[0],), device=latents.device).long()
        noisy = scheduler.add_noise(latents, noise, timesteps)
        context = text_encoder(ids[i], return_dict=False)[0]
        pred = unet(noisy, timesteps, context, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
        loss.item()  # the example logs train_loss every step
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()

    return step


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_shapes_dataset(folder / "data", n=64, resolution=32, seed=0)
        our_step, live, _, cfg = ours(folder, args.batch_size, args.rank, seed=0)
        ref_step = diffusers_example(folder, args.batch_size, args.rank, 0, live, cfg)
        for _ in range(args.warmup):
            our_step()
            ref_step()
        times: dict[str, list[float]] = {"ours": [], "diffusers": []}
        for i in range(args.pairs):  # alternate which side goes first, so neither always runs warmer
            order = [("ours", our_step), ("diffusers", ref_step)]
            for name, fn in order if i % 2 == 0 else order[::-1]:
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
    ratios = [a / b for a, b in zip(times["ours"], times["diffusers"], strict=True)]
    result = {
        "bench": "lora step, tiny SD1.5 (preset tiny), 32 px, CPU",
        "batch_size": args.batch_size,
        "rank": args.rank,
        "threads": args.threads,
        "pairs": args.pairs,
        "torch": torch.__version__,
        **{f"{name}_s": {"min": min(v), "median": statistics.median(v)} for name, v in times.items()},
        "ratio_ours_over_diffusers": {
            "min": min(ratios),
            "median": statistics.median(ratios),
            "of_medians": statistics.median(times["ours"]) / statistics.median(times["diffusers"]),
        },
    }
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
