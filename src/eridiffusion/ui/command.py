"""The ``eri ui`` sub-command: its arguments and how it starts the app."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def add_ui_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ui", help="web page to start, watch, stop and resume training runs")
    p.add_argument("--runs", default="output", help="runs folder (jobs started here train into it)")
    p.add_argument("--configs", default="configs", help="configs the page offers; uploads are saved here")
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 exposes it to the network: set --api-key")
    p.add_argument("--port", type=int, default=7861)
    p.add_argument(
        "--api-key",
        default=None,
        help="require this key (Basic-auth password in a browser) on every route but /health "
        "(default: $ERI_API_KEY, else none; empty: refused)",
    )
    p.add_argument(
        "--gpus", type=int, default=None, help="jobs training at once (default: CUDA devices, or 1)"
    )
    p.set_defaults(func=cmd_ui)


def _default_slots() -> int:
    import torch

    return max(1, torch.cuda.device_count())


def cmd_ui(args: argparse.Namespace) -> int:
    import uvicorn

    from eridiffusion.ui.app import UISettings, create_ui_app

    runs, configs = Path(args.runs), Path(args.configs)
    if runs.exists() and not runs.is_dir():
        raise FileExistsError(f"--runs '{runs}' is a file, not a folder")
    if args.gpus is not None and args.gpus < 1:
        raise ValueError(f"--gpus must be at least 1, got {args.gpus}")
    settings = UISettings(
        runs=runs,
        configs=configs,
        api_key=args.api_key if args.api_key is not None else os.environ.get("ERI_API_KEY"),
        slots=args.gpus or _default_slots(),
    )
    app = create_ui_app(settings)
    print(
        f"eri ui: runs in {runs.resolve()}, configs in {configs.resolve()} on http://{args.host}:{args.port}"
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
