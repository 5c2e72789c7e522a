"""``eri`` command line: train | validate | plan | generate | serve | ui | eval | convert | merge | bench |
data | quickstart.

Each sub-command parses its own arguments into plain values and calls one library function; nothing
downstream sees argparse objects.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from eridiffusion import __version__
from eridiffusion.config import ConfigError, JobConfig, load_config, unsupported_settings
from eridiffusion.config.load import import_config

if TYPE_CHECKING:
    from eridiffusion.inference.memory import MemoryOptions

logger = logging.getLogger("eridiffusion")

EXIT_USER_ERROR = 2
EXIT_NONFINITE = 3


def embedded_config_path(name: str = "quickstart") -> Path:
    return Path(str(resources.files("eridiffusion") / "configs" / f"{name}.yaml"))


def _load(config: str, overrides: list[str], refuse_unsupported: bool = True) -> JobConfig:
    """Load (translating ai-toolkit files and aliases, the mapping printed once to stderr) and, unless told
    otherwise, refuse settings training cannot honour yet before any weight is read."""
    path = embedded_config_path() if config == "quickstart" and not Path(config).exists() else Path(config)
    notes: list[str] = []
    cfg = load_config(path, overrides, notes)
    if notes:
        print("\n".join(notes), file=sys.stderr)
    problems = unsupported_settings(cfg) if refuse_unsupported else []
    if problems:
        raise ConfigError(f"{path}: cannot train this config yet:\n" + "\n".join(f"  {p}" for p in problems))
    return cfg


def cmd_train(args: argparse.Namespace) -> int:
    from eridiffusion.training.engine import launched_world_size
    from eridiffusion.training.loop import train

    cfg = _load(args.config, args.overrides)
    if args.num_processes > 1 and launched_world_size() == 1:
        return _launch(args.num_processes, ["train", args.config, *args.overrides])
    if launched_world_size() > 1 and int(os.environ.get("RANK", "0")) != 0:
        logging.getLogger().setLevel(logging.WARNING)  # one process speaks for the run
    result = train(cfg)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    if result.already_finished:
        print(f"{cfg.name} already finished ({result.final_step} steps); nothing to do")
        print("  to train again, set save.resume: false (the finished run is moved aside) or change name")
    else:
        loss = "n/a" if result.last_loss is None else f"{result.last_loss:.4f}"
        print(f"trained {cfg.name}: {result.final_step} steps, final loss {loss}")
    print(f"output: {result.output}")
    return 0


def _launch(processes: int, argv: list[str]) -> int:
    """``eri train --num-processes N``: this command in N processes on this machine, with the environment
    ``torchrun`` / ``accelerate launch`` would set (RANK, WORLD_SIZE, a free MASTER_PORT on 127.0.0.1).

    Unlike torchrun it hands back the failing process's own exit code (2 for a user error, 3 for a NaN loss)
    and stops the others as soon as one fails, without a launcher traceback over the real message."""
    import socket
    import subprocess
    import time

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    base = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(processes)}
    base.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
    print(f"launching {processes} processes (ranks 0-{processes - 1}, port {port})", file=sys.stderr)
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "eridiffusion.cli", *argv],
            env={**base, "RANK": str(r), "LOCAL_RANK": str(r), "LOCAL_WORLD_SIZE": str(processes)},
        )
        for r in range(processes)
    ]
    import signal

    def forward(signum: int, _frame: object) -> None:  # a stop request reaches every process
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, forward)
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [c for c in codes if c not in (None, 0)]
            if failed or all(c == 0 for c in codes):
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            p.wait()
    return failed[0] if failed else 0


def cmd_validate(args: argparse.Namespace) -> int:
    from eridiffusion.training.plan import describe_plan

    cfg = _load(args.config, args.overrides, refuse_unsupported=False)  # describe_plan lists them all
    print(describe_plan(cfg))
    return print_memory_plan(cfg, args) if args.memory else 0


def cmd_config_import(args: argparse.Namespace) -> int:
    print("\n".join(import_config(Path(args.file), Path(args.to), args.force)))
    return 0


def add_plan_args(p: argparse.ArgumentParser) -> None:
    """The options of the memory estimate (``eri plan``; ``eri validate --memory`` takes the same)."""
    p.add_argument("--gpu-gb", type=float, default=None, help="say whether the step fits a GPU of this size")
    p.add_argument("--preset", default=None, help="architecture preset (default: the config's / real size)")
    p.add_argument("--resolution", type=int, default=None, help="image side (default: the datasets' largest)")
    p.add_argument(
        "--quantize", choices=["none", "fp8", "int8", "nf4"], default=None, help="frozen base storage"
    )
    p.add_argument(
        "--quantize-text-encoders", choices=["none", "fp8", "int8", "nf4"], default=None, help="text encoders"
    )
    p.add_argument("--blocks-to-swap", type=int, default=None, help="transformer blocks kept on the host")
    p.add_argument("--json", action="store_true", help="print the estimate as JSON")


def print_memory_plan(cfg: JobConfig, args: argparse.Namespace) -> int:
    """Trace one training step of ``cfg`` on fake tensors and print its peak device memory (no GPU needed);
    exit 1 when ``--gpu-gb`` is given and the step does not fit."""
    from eridiffusion.training.memory_plan import estimate_memory
    from eridiffusion.training.memory_report import format_estimate

    if args.blocks_to_swap is not None and args.blocks_to_swap < 0:
        raise ValueError("--blocks-to-swap must be >= 0")
    estimate = estimate_memory(
        cfg,
        gpu_gb=args.gpu_gb,
        preset=args.preset,
        quantize=args.quantize,
        quantize_text_encoders=args.quantize_text_encoders,
        blocks_to_swap=args.blocks_to_swap,
        resolution=args.resolution,
    )
    print(json.dumps(estimate.as_dict(), indent=1) if args.json else format_estimate(estimate))
    return 1 if estimate.fits is False else 0


def cmd_plan(args: argparse.Namespace) -> int:
    return print_memory_plan(_load(args.config, args.overrides), args)


def cmd_data(args: argparse.Namespace) -> int:
    from eridiffusion.data.shapes import write_shapes_dataset

    n = write_shapes_dataset(
        Path(args.out_dir),
        n=args.n,
        resolution=args.resolution,
        seed=args.seed,
        colours=args.colours.split(",") if args.colours else None,
        held_out=args.held_out,
    )
    print(
        f"{n} images with captions in {args.out_dir} "
        f"(evaluation prompts: {args.out_dir}/held_out_prompts.txt)"
    )
    return 0


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


def run_eval(cfg: JobConfig, model: str | None, prompts_file: str | None, n: int | None) -> dict:
    """Score a run's result: its model folder, or for adapter runs its base model plus its adapter file."""
    from eridiffusion.device import resolve_device
    from eridiffusion.inference.evaluate import EvalSettings, evaluate_into, prompts_path, read_prompts
    from eridiffusion.models import load_family
    from eridiffusion.networks import apply_adapter_files
    from eridiffusion.training.loop import load_or_build

    path = prompts_path(cfg.eval, cfg.datasets, prompts_file)
    prompts = read_prompts(path)
    settings = EvalSettings.from_config(cfg.eval, n)
    device = resolve_device(cfg.train.device, "train.device")
    if model:
        family, evaluated = load_family(model), model
    elif cfg.network is not None:
        adapter = cfg.run_dir / f"{cfg.name}.safetensors"
        family, evaluated = load_or_build(cfg), str(adapter)
        apply_adapter_files(family, [(adapter, 1.0)])
    else:
        evaluated = str(cfg.run_dir / "model")
        family = load_family(evaluated)
    family.to(device)
    return evaluate_into(family, path, prompts, settings, device, cfg.run_dir, model=evaluated)


def _print_eval(report: dict) -> None:
    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{100 * x:.1f}%"

    print(
        f"prompt adherence on {report['n']} images ({report['prompts_file']}): "
        f"colour {pct(report['colour_accuracy'])}, shape {pct(report['shape_accuracy'])}, "
        f"both {pct(report['both_accuracy'])}"
    )
    print(f"grid: {report['grid']}")


def cmd_eval(args: argparse.Namespace) -> int:
    cfg = _load(args.config, args.overrides)
    report = run_eval(cfg, args.model, args.prompts, args.n)
    _print_eval(report)
    if args.json:
        print(json.dumps({k: report[k] for k in ("n", "colour_accuracy", "shape_accuracy", "both_accuracy")}))
    return 0


def print_pipeline_summary(run_dir: Path) -> None:
    """One line per pipeline step: its length, time, last metrics and, where scored, prompt adherence."""
    summary = json.loads((run_dir / "pipeline_summary.json").read_text(encoding="utf-8"))
    for name, s in summary.items():
        scores = ", ".join(f"{k[5:]} {100 * v:.1f}%" for k, v in s.items() if k.startswith("eval_"))
        finals = ", ".join(f"{k[6:]} {v:.4f}" for k, v in s.items() if k.startswith("final_"))
        print(f"  {name}: {s['steps']} steps in {s['seconds']:.0f} s; {finals}")
        if scores:
            print(f"    prompt adherence ({run_dir / 'stages'}/*-{name}/eval.json): {scores}")


def cmd_quickstart(args: argparse.Namespace) -> int:
    """The embedded default: synthetic data, train tiny from scratch, evaluate, sample grid."""
    from eridiffusion.training.loop import train

    cfg = load_config(embedded_config_path(), args.overrides)
    result = train(cfg)
    print(
        f"trained {cfg.name}: {result.final_step} steps, final loss {result.last_loss:.4f}; "
        f"samples in {cfg.run_dir / 'samples'}"
    )
    if cfg.pipeline is not None:
        print_pipeline_summary(cfg.run_dir)
        print("final model:")
    _print_eval(run_eval(cfg, None, None, None))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from eridiffusion.models import load_family
    from eridiffusion.networks.formats import convert_adapter_file

    family = load_family(args.model)
    out = convert_adapter_file(family, Path(args.src), Path(args.dst), args.to, args.dtype)
    print(f"wrote {out} ({args.to} layout)")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from eridiffusion.models import load_family
    from eridiffusion.models.protocol import SingleFileExport
    from eridiffusion.networks import apply_adapter_files, parse_adapter_arg
    from eridiffusion.training.checkpoint import atomic_write_dir

    family = load_family(args.model)
    apply_adapter_files(family, [parse_adapter_arg(x) for x in args.lora])
    out = Path(args.out)
    if out.suffix == ".safetensors":
        if not isinstance(family, SingleFileExport):
            raise ValueError(f"the {family.arch} family has no single-file layout; give --out a folder")
        tmp = out.with_name(f".tmp-{out.name}")
        family.save_single_file(tmp)
        tmp.replace(out)
    else:
        atomic_write_dir(out, family.save_pretrained)
    print(f"wrote merged model to {out}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from eridiffusion.training.bench import as_dict, run_bench

    options = json.loads(args.options) if args.options else {}
    result = as_dict(
        run_bench(
            args.arch,
            options,
            args.batch_size,
            args.resolution,
            args.steps,
            args.device,
            args.mixed_precision,
            args.gradient_checkpointing,
            args.peak_tflops,
            compile=args.compile,
            channels_last=args.channels_last,
            tf32=args.tf32,
        )
    )
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    print(text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eri", description="Train and serve image diffusion models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"eri (eridiffusion) {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> None:
        p.add_argument("config", help="YAML config file ('quickstart' = the embedded default)")
        p.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. train.steps=100")

    p = sub.add_parser("train", help="train (or resume) the job in CONFIG")
    with_config(p)
    p.add_argument(
        "--num-processes",
        type=int,
        default=1,
        metavar="N",
        help="train in N processes (one per GPU; gloo on CPU); see README 'Several GPUs'",
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("validate", help="check CONFIG and print the training plan without training")
    with_config(p)
    p.add_argument("--memory", action="store_true", help="also estimate the step's peak GPU memory")
    add_plan_args(p)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("config", help="config files from other trainers")
    config_sub = p.add_subparsers(dest="action", required=True)
    imp = config_sub.add_parser("import", help="translate an ai-toolkit job file into an eri config")
    imp.add_argument("file", help="ai-toolkit job file (job: extension) or an eri config using aliases")
    imp.add_argument("--to", required=True, help="eri config to write")
    imp.add_argument("--force", action="store_true", help="overwrite --to if it exists")
    imp.set_defaults(func=cmd_config_import)

    p = sub.add_parser("plan", help="peak GPU memory of a training step of CONFIG, estimated without a GPU")
    with_config(p)
    add_plan_args(p)
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("quickstart", help="the embedded default: train tiny on synthetic shapes, then eval")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides for the embedded config")
    p.set_defaults(func=cmd_quickstart)

    p = sub.add_parser("data", help="make datasets")
    data_sub = p.add_subparsers(dest="kind", required=True)
    shapes = data_sub.add_parser("shapes", help="synthetic coloured shapes with captions (image + .txt)")
    shapes.add_argument("out_dir")
    shapes.add_argument("--n", type=int, default=2000)
    shapes.add_argument("--resolution", type=int, default=32)
    shapes.add_argument("--seed", type=int, default=0)
    shapes.add_argument(
        "--colours", default=None, help="comma-separated colours, e.g. black for a new-concept set"
    )
    shapes.add_argument(
        "--held-out", action="append", default=None, help="'colour shape' never drawn; repeat for several"
    )
    shapes.set_defaults(func=cmd_data)

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

    from eridiffusion.ui.command import add_ui_command

    add_ui_command(sub)

    p = sub.add_parser("convert", help="rewrite an adapter file in another layout (kohya <-> diffusers)")
    p.add_argument("src", help="adapter file (kohya/ComfyUI, LyCORIS, diffusers or peft layout)")
    p.add_argument("dst", help="output .safetensors")
    p.add_argument("--model", required=True, help="base model the adapter belongs to (names its layers)")
    p.add_argument("--to", choices=["kohya", "diffusers"], default="kohya")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp16")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("merge", help="bake adapter files into a base model and write a full model")
    p.add_argument("--model", required=True, help="base model folder or file")
    p.add_argument("--lora", action="append", required=True, help="adapter file[:weight]; repeat to stack")
    p.add_argument("--out", required=True, help="output folder, or a .safetensors file (original layout)")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("bench", help="time training steps of a family/preset (random weights), JSON out")
    p.add_argument("--arch", default="tiny", help="model family")
    p.add_argument("--options", default=None, help='model.options as JSON, e.g. \'{"preset": "full"}\'')
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--resolution", type=int, default=None, help="default: the family's")
    p.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up step")
    p.add_argument("--device", default="auto")
    p.add_argument("--mixed-precision", default="auto", choices=["auto", "no", "fp16", "bf16"])
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument(
        "--peak-tflops", type=float, default=None, help="device peak for MFU (known GPUs, bf16/fp16: auto)"
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the denoiser (untimed compile step)")
    p.add_argument("--channels-last", action="store_true", help="NHWC weights for the denoiser (UNets)")
    p.add_argument("--tf32", action="store_true", help="allow TF32 for fp32 matmuls/convolutions (CUDA)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("eval", help="prompt adherence (colour/shape) of a trained tiny model")
    with_config(p)
    p.add_argument("--model", default=None, help="model folder (default: output/NAME/model)")
    p.add_argument("--prompts", default=None, help="prompts file (default: dataset's held_out_prompts.txt)")
    p.add_argument("--n", type=int, default=None, help="images per prompt")
    p.add_argument("--json", action="store_true", help="also print the scores as one JSON line")
    p.set_defaults(func=cmd_eval)
    return parser


def _quiet_libraries() -> None:
    """Offline by default, and no per-file progress bars from transformers/diffusers saves."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    tlog.disable_progress_bar()
    dlog.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    for noisy in ("diffusers", "transformers", "urllib3", "PIL", "bitsandbytes"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    from eridiffusion.data.folder import DatasetError
    from eridiffusion.training.checkpoint import CheckpointError, DiskFullError
    from eridiffusion.training.step import NonFiniteLossError, OutOfMemoryStop
    from eridiffusion.training.stop import EXIT_STOPPED, TrainingStopped

    try:
        return args.func(args)
    except NonFiniteLossError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_NONFINITE
    except TrainingStopped as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_STOPPED
    except (
        ConfigError,
        DatasetError,
        FileNotFoundError,
        FileExistsError,
        ValueError,
        CheckpointError,
        DiskFullError,
        OutOfMemoryStop,
    ) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
