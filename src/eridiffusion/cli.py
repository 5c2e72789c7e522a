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
from eridiffusion.cli_inference import add_inference_commands
from eridiffusion.config import ConfigError, JobConfig, load_config, unsupported_settings
from eridiffusion.config.load import import_config

if TYPE_CHECKING:
    pass

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
        captions=args.captions,
    )
    print(
        f"{n} images with captions in {args.out_dir} "
        f"(evaluation prompts: {args.out_dir}/held_out_prompts.txt)"
    )
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
        # the adapter file as it ships: on the full-precision base (loading would quantise it)
        full = cfg.model.model_copy(update={"quantize": "none", "quantize_text_encoders": "none"})
        family, evaluated = load_or_build(cfg.model_copy(update={"model": full})), str(adapter)
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
        finals = ", ".join(f"{k[6:]} {v:.4f}" for k, v in s.items() if k.startswith("final_"))
        print(f"  {name}: {s['steps']} steps in {s['seconds']:.0f} s; {finals}")
        for prefix, what in (("eval_", "prompt adherence"), ("recon_", "reconstructions against captions")):
            cut = len(prefix)
            scores = ", ".join(f"{k[cut:]} {100 * v:.1f}%" for k, v in s.items() if k.startswith(prefix))
            if scores:
                print(f"    {what} ({run_dir / 'stages'}/*-{name}/eval.json): {scores}")


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
    shapes.add_argument(
        "--captions",
        choices=["full", "varied"],
        default="full",
        help="varied: size and position words each in half the captions (default: always)",
    )
    shapes.set_defaults(func=cmd_data)

    add_inference_commands(sub)

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
    # third-party import-time chatter (torchao probing for CUDA kernels on a CPU build, torch pytree notices)
    noisy_loggers = ("diffusers", "transformers", "urllib3", "PIL", "bitsandbytes", "torchao")
    for noisy in (*noisy_loggers, "torch.utils._pytree"):
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
