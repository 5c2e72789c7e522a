"""``eri generate`` and ``eri serve``: the two commands that only run models (the server's and the CLI's
shared ``Generator``), with the memory options they share."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from eridiffusion.inference.memory import MemoryOptions

logger = logging.getLogger("eridiffusion")


def add_memory_args(p: argparse.ArgumentParser) -> None:
    """The memory options ``eri generate`` and ``eri serve`` share (see inference.memory)."""
    g = p.add_argument_group("memory", "trade speed for lower peak memory")
    g.add_argument("--attention-slicing", default=None, help="auto, max or a slice size (UNet models)")
    g.add_argument("--vae-slicing", action="store_true", help="decode a batch one image at a time")
    g.add_argument("--vae-tiling", action="store_true", help="decode large images in blended tiles")
    g.add_argument("--vae-tile-size", type=int, default=None, help="tile side in pixels (default: VAE's)")
    g.add_argument(
        "--cpu-offload", action="store_true", help="keep models on the CPU, each on the device while it runs"
    )
    g.add_argument(
        "--no-vae-upcast",
        dest="vae_upcast",
        action="store_false",
        help="fail instead of redoing an fp16 VAE decode that overflowed in fp32",
    )


def memory_options(args: argparse.Namespace) -> MemoryOptions:
    from eridiffusion.inference.memory import MemoryOptions, parse_attention_slicing

    return MemoryOptions(
        attention_slicing=parse_attention_slicing(args.attention_slicing),
        vae_slicing=args.vae_slicing,
        vae_tiling=args.vae_tiling,
        vae_tile_size=args.vae_tile_size,
        cpu_offload=args.cpu_offload,
        vae_upcast=args.vae_upcast,
    )


def cmd_generate(args: argparse.Namespace) -> int:
    from PIL import Image

    from eridiffusion.inference.generate import GenerateRequest, png_info
    from eridiffusion.inference.generator import Generator, pil_to_mask, pil_to_pixels
    from eridiffusion.networks import parse_adapter_arg

    model = Path(args.model)
    loras = [(str(path), weight) for path, weight in map(parse_adapter_arg, args.lora)]
    lora_dirs = [Path(d) for d in args.lora_dir] or list(dict.fromkeys(Path(p).parent for p, _ in loras))
    for d in lora_dirs:
        if not d.is_dir():
            raise FileNotFoundError(f"--lora-dir '{d}' is not a folder")
    generator = Generator(
        {model.name: model},
        device=args.device,
        memory=memory_options(args),
        lora_dirs=lora_dirs,
        allow_paths=True,
    )
    req = GenerateRequest(
        prompts=args.prompt,
        negative_prompt=args.negative,
        steps=args.steps,
        guidance_scale=args.cfg,
        sampler=args.sampler or "",
        seed=args.seed,
        height=args.height,
        width=args.width,
        images_per_prompt=args.n,
        strength=args.strength,
        long_prompts=args.long_prompts,
    )
    if args.mask and not args.init_image:
        raise ValueError("--mask needs --init-image (inpainting repaints part of a start image)")
    if args.init_image:
        start = Image.open(args.init_image)
        width, height = args.width or start.width, args.height or start.height
        req.width, req.height = width, height
        req.init_image = pil_to_pixels(start, width, height)
        req.mask = pil_to_mask(Image.open(args.mask), width, height) if args.mask else None
    if bool(args.controlnet) != bool(args.control_image):
        raise ValueError(
            "--controlnet and --control-image go together (a ControlNet needs its control image)"
        )
    if args.controlnet:
        from eridiffusion.inference.controlnet import ControlUnit

        hint = Image.open(args.control_image)
        size = (req.width, req.height) if req.width and req.height else hint.size
        unit = ControlUnit(
            args.controlnet,
            pil_to_pixels(hint, *size),
            args.control_scale,
            args.control_start,
            args.control_end,
        )
        unit.check()
        req.controls = [unit]
    result = generator.generate(req, loras=loras)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i, (img, seed, parameters) in enumerate(
        zip(result.images, result.seeds, result.parameters, strict=True)
    ):
        path = out / f"{i:04d}-{seed}.png"
        img.save(path, pnginfo=png_info(parameters))
        print(path)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from eridiffusion.inference.generator import Generator, discover_models
    from eridiffusion.serving import ServeSettings, create_app

    settings = ServeSettings(
        max_width=args.max_size,
        max_height=args.max_size,
        max_steps=args.max_steps,
        max_images=args.max_images,
        max_queue=args.max_queue,
        api_key=args.api_key if args.api_key is not None else os.environ.get("ERI_API_KEY"),
        max_body_bytes=int(args.max_body_mb * 2**20),
        max_image_pixels=int(args.max_image_mp * 1e6),
        public_docs=args.public_docs,
    )
    budget = int(args.memory_budget_gb * 2**30) if args.memory_budget_gb else None
    roots = [Path(m) for m in args.model]
    generator = Generator(
        discover_models(roots),
        model_roots=roots,
        device=args.device,
        memory_budget_bytes=budget,
        max_models=args.max_models,
        lora_dirs=[Path(d) for d in args.lora_dir],
        controlnet_dirs=[Path(d) for d in args.controlnet_dir],
        memory=memory_options(args),
    )
    print(f"serving {sorted(generator.models)} on http://{args.host}:{args.port} (docs: /docs)")
    uvicorn.run(create_app(generator, settings), host=args.host, port=args.port, log_level="info")
    return 0


def add_inference_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``generate`` and ``serve`` on the ``eri`` parser."""
    p = sub.add_parser("generate", help="txt2img / img2img / inpaint with a model folder or file")
    p.add_argument("--model", required=True, help="model folder (e.g. output/NAME/model)")
    p.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    p.add_argument("--negative", default="", help="negative prompt")
    p.add_argument(
        "--long-prompts",
        choices=["truncate", "chunk"],
        default="truncate",
        help="prompts past the text encoder's limit: cut them (with a warning) or, SD1.5/SDXL, encode them "
        "in 75-token chunks as A1111 does",
    )
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--cfg", type=float, default=4.0, help="classifier-free guidance scale")
    p.add_argument(
        "--sampler", default=None, help="ddim, euler, dpmpp_2m, flow_euler, ... (default: the model's)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n", type=int, default=1, help="images per prompt (seeds seed, seed+1, ...)")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--lora", action="append", default=[], help="adapter file[:weight]; repeat to stack")
    p.add_argument(
        "--lora-dir",
        action="append",
        default=[],
        help="folder where <lora:NAME:...> prompt tags find NAME.safetensors (default: the --lora folders)",
    )
    p.add_argument("--init-image", default=None, help="img2img start image (size defaults to its own)")
    p.add_argument("--strength", type=float, default=0.75, help="img2img: share of the schedule re-run")
    p.add_argument("--mask", default=None, help="inpaint mask image: white is repainted, black kept")
    p.add_argument("--controlnet", default=None, help="ControlNet: diffusers folder or .safetensors file")
    p.add_argument(
        "--control-image",
        default=None,
        help="preprocessed control image (edges, depth...); resized to the output",
    )
    p.add_argument("--control-scale", type=float, default=1.0, help="ControlNet conditioning scale")
    p.add_argument("--control-start", type=float, default=0.0, help="share of the steps before it applies")
    p.add_argument("--control-end", type=float, default=1.0, help="share of the steps after which it stops")
    p.add_argument("--out", default="generated", help="output folder")
    add_memory_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("serve", help="HTTP API: native /v1 and A1111-compatible /sdapi/v1 (FastAPI)")
    p.add_argument(
        "--model", action="append", required=True, help="model folder/file, or a folder of them; repeatable"
    )
    p.add_argument("--lora-dir", action="append", default=[], help="folder of LoRA files listed by /loras")
    p.add_argument(
        "--controlnet-dir",
        action="append",
        default=[],
        help="folder of ControlNets (diffusers folders, .safetensors) listed by /controlnet/model_list",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860, help="A1111's default port")
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--api-key",
        default=None,
        help="require this key on every route but /health (default: $ERI_API_KEY, else none; empty: refused)",
    )
    p.add_argument("--public-docs", action="store_true", help="serve /docs and /openapi.json without the key")
    p.add_argument("--max-body-mb", type=float, default=32, help="larger request bodies answer 413")
    p.add_argument(
        "--max-image-mp",
        type=float,
        default=16.8,
        help="megapixels of an uploaded image, read from its header",
    )
    p.add_argument("--max-models", type=int, default=2, help="models (with their LoRA sets) kept loaded")
    p.add_argument("--memory-budget-gb", type=float, default=None, help="evict models beyond this")
    p.add_argument("--max-queue", type=int, default=8, help="waiting jobs before answering 429")
    p.add_argument("--max-size", type=int, default=2048, help="largest width/height")
    p.add_argument("--max-steps", type=int, default=150)
    p.add_argument("--max-images", type=int, default=8, help="largest batch per request")
    add_memory_args(p)
    p.set_defaults(func=cmd_serve)
