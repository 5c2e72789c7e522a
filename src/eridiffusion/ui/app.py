"""The FastAPI app behind ``eri ui``: a page to start, watch, stop and resume training runs.

The page (``static/``, plain HTML + JS, no build step) talks to the JSON routes under ``/api``. Auth is
``eri serve``'s (:mod:`eridiffusion.serving.security`): with a key, every route but ``/health`` needs it,
and a browser is asked for it as a Basic-auth password. A path from the browser names a file inside the
runs folder or the configs folder only (:func:`~eridiffusion.ui.runs.resolve_inside`).
"""

from __future__ import annotations

import os
import re
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from eridiffusion.config import ConfigError, load_config
from eridiffusion.serving.security import BodyLimit, SafeJSONResponse, install_error_handlers, require_key
from eridiffusion.ui.jobs import Job, JobError, JobQueue, validate
from eridiffusion.ui.runs import (
    NotFound,
    is_trainer,
    list_runs,
    read_json,
    read_metrics,
    resolve_inside,
    run_detail,
    run_folder,
    run_status,
    tail,
)
from eridiffusion.ui.zipstream import zip_folder

CONFIG_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,100}\.ya?ml$")
STOP_GRACE_S = 30.0
"""How long a resume waits for the stopped job of the same run to exit."""
STATIC = {"app.js": "text/javascript", "style.css": "text/css"}


@dataclass
class UISettings:
    runs: Path
    """Where runs are read from and where jobs started here write (their ``output_dir``)."""
    configs: Path
    """Configs the page can pick from; uploads are saved here."""
    api_key: str | None = None
    slots: int = 1
    """Jobs that train at once (one per GPU)."""
    env: dict[str, str] | None = None
    """Environment of the jobs (default: the UI's)."""
    max_body_bytes: int = 2 * 2**20
    stop_jobs_on_exit: bool = False
    extra_overrides: list[str] = field(default_factory=list)
    """Appended to every job's command line (tests shorten runs with them)."""

    def __post_init__(self) -> None:
        if self.api_key == "":
            raise ValueError("the API key is empty, which would serve without authentication")


class StartRequest(BaseModel):
    config: str = Field(description="a config file name in the configs folder")


class Upload(BaseModel):
    name: str = Field(max_length=120, description="file name, e.g. my_lora.yaml")
    text: str = Field(max_length=1_000_000, description="the YAML text")


def shown_status(status: str, job: Job | None) -> str:
    """The run folder's status, or what the UI's job for it is doing while the folder does not say yet:
    queued, starting (before run.json says running) or stopping (after a stop, before the process exits)."""
    if job is None or status == "running":
        return status
    if job.state == "queued":
        return "queued"
    return "stopping" if job.stop_requested else "starting"


def _not_found(exc: NotFound) -> HTTPException:
    return HTTPException(404, detail=str(exc))


def create_ui_app(settings: UISettings) -> FastAPI:
    """The UI app; ``eri ui`` runs it with uvicorn, tests with TestClient."""
    runs, configs = settings.runs.resolve(), settings.configs.resolve()
    runs.mkdir(parents=True, exist_ok=True)
    queue = JobQueue(runs, settings.slots, settings.env)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        queue.close(stop_running=settings.stop_jobs_on_exit)

    app = FastAPI(
        title="EriDiffusion UI",
        lifespan=lifespan,
        default_response_class=SafeJSONResponse,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.queue = queue
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    install_error_handlers(app)
    auth = [Depends(require_key(settings.api_key))]

    def config_file(name: str) -> Path:
        if not CONFIG_NAME.match(name):
            raise _not_found(NotFound(name))
        try:
            path = resolve_inside(configs, name)
        except NotFound as exc:
            raise _not_found(exc) from None
        if not path.is_file():
            raise _not_found(NotFound(name))
        return path

    def folder(name: str) -> Path:
        try:
            return run_folder(runs, name)
        except NotFound as exc:
            raise _not_found(exc) from None

    def start(run: str, config: Path) -> dict[str, Any]:
        """Validate, then queue; the problems ``eri validate`` found answer 422 and nothing starts."""
        if queue.active(run) is not None:
            raise HTTPException(409, detail=f"run {run!r} already has a queued or running job; stop it first")
        overrides = [f"output_dir={runs}", *settings.extra_overrides]
        ok, text = validate(config, overrides, queue.env)
        if not ok:
            raise HTTPException(422, detail=text)
        try:
            job = queue.submit(run, config, overrides)
        except JobError as exc:
            raise HTTPException(exc.status, detail=str(exc)) from None
        return {"job": job.public(), "plan": text}

    @app.get("/health", include_in_schema=False)
    def health() -> dict[str, Any]:
        return {"status": "ok"}

    @app.get("/", response_class=HTMLResponse, dependencies=auth)
    def index() -> HTMLResponse:
        return HTMLResponse(resources.files("eridiffusion.ui").joinpath("static/index.html").read_text())

    @app.get("/static/{name}", dependencies=auth)
    def static(name: str) -> Response:
        if name not in STATIC:
            raise _not_found(NotFound(name))
        text = resources.files("eridiffusion.ui").joinpath(f"static/{name}").read_text()
        return Response(text, media_type=STATIC[name])

    @app.get("/api/runs", dependencies=auth)
    def runs_list() -> dict[str, Any]:
        listed = list_runs(runs)
        for r in listed:
            r["status"] = shown_status(r["status"], queue.active(r["name"]))
        return {"runs": listed, "jobs": queue.list()}

    @app.get("/api/runs/{name}", dependencies=auth)
    def run_info(name: str) -> dict[str, Any]:
        try:
            detail = run_detail(runs, name)
        except NotFound as exc:
            raise _not_found(exc) from None
        job = queue.active(name)
        detail["job"] = job.public() if job is not None else None
        detail["status"] = shown_status(detail["status"], job)
        return detail

    @app.get("/api/runs/{name}/metrics", dependencies=auth)
    def metrics(name: str, offset: int = 0) -> dict[str, Any]:
        rows, nxt = read_metrics(folder(name) / "metrics.jsonl", offset)
        return {"rows": rows, "offset": nxt, "restart": offset > 0 and nxt < offset}

    @app.get("/api/runs/{name}/log", response_class=PlainTextResponse, dependencies=auth)
    def log(name: str, lines: int = 200) -> PlainTextResponse:
        folder(name)
        text = tail(queue.log_path(name), max(1, min(lines, 5000)))
        return PlainTextResponse(text or "(no log: this run was not started from the UI)")

    @app.get("/api/runs/{name}/files/{path:path}", dependencies=auth)
    def run_file(name: str, path: str) -> Response:
        try:
            target = resolve_inside(folder(name), path)
        except NotFound as exc:
            raise _not_found(exc) from None
        if target.is_dir():
            return StreamingResponse(
                zip_folder(target),
                media_type="application/zip",
                headers={"Content-Disposition": f'attachment; filename="{name}-{target.name}.zip"'},
            )
        media = "image/png" if target.suffix == ".png" else "application/octet-stream"
        if media == "image/png":
            return FileResponse(target, media_type=media)
        return FileResponse(target, media_type=media, filename=target.name)

    @app.post("/api/runs/{name}/stop", dependencies=auth)
    def stop(name: str) -> dict[str, Any]:
        """The UI's job gets SIGTERM (or leaves the queue); a run started elsewhere too, if its pid is a
        live ``eri train``."""
        run_dir = folder(name)
        job = queue.active(name)
        if job is not None:
            queue.stop(job)
            return {"stopping": name, "job": job.public()}
        info = read_json(run_dir / "run.json") or {}
        pid = int(info.get("pid") or 0)
        if run_status(info) != "running" or not is_trainer(pid):
            raise HTTPException(409, detail=f"run {name!r} is not running")
        os.kill(pid, signal.SIGTERM)
        return {"stopping": name, "pid": pid}

    @app.post("/api/runs/{name}/resume", dependencies=auth)
    def resume(name: str) -> dict[str, Any]:
        run_dir = folder(name)
        job = queue.active(name)
        if job is not None and job.stop_requested:  # a stopped job writes its status before it exits
            queue.wait(job, STOP_GRACE_S)
        status = run_status(read_json(run_dir / "run.json") or {})
        if status not in ("interrupted", "failed"):
            raise HTTPException(
                409, detail=f"run {name!r} is {status}; only an interrupted or failed run resumes"
            )
        if not (run_dir / "config.yaml").is_file():
            raise HTTPException(409, detail=f"run {name!r} has no config.yaml to resume from")
        return start(name, run_dir / "config.yaml")

    @app.get("/api/configs", dependencies=auth)
    def configs_list() -> dict[str, Any]:
        names = (
            sorted(p.name for p in configs.glob("*.y*ml") if CONFIG_NAME.match(p.name))
            if configs.is_dir()
            else []
        )
        return {"configs": names}

    @app.get("/api/configs/{name}", response_class=PlainTextResponse, dependencies=auth)
    def config_text(name: str) -> PlainTextResponse:
        return PlainTextResponse(config_file(name).read_text(encoding="utf-8", errors="replace"))

    @app.post("/api/configs", dependencies=auth)
    def upload(body: Upload) -> dict[str, Any]:
        if not CONFIG_NAME.match(body.name):
            raise HTTPException(
                422,
                detail="name: use letters, digits, '_', '-', '.' and end in .yaml or .yml, e.g. my_lora.yaml",
            )
        configs.mkdir(parents=True, exist_ok=True)
        target = configs / body.name
        if target.exists() and target.read_text(encoding="utf-8", errors="replace") != body.text:
            raise HTTPException(
                409, detail=f"a different {body.name} is in the configs folder; rename the upload"
            )
        target.write_text(body.text, encoding="utf-8")
        return {"config": body.name}

    @app.post("/api/jobs", dependencies=auth)
    def start_job(body: StartRequest) -> dict[str, Any]:
        path = config_file(body.config)
        try:
            cfg = load_config(path, [f"output_dir={runs}"])
        except (ConfigError, OSError, ValueError) as exc:
            raise HTTPException(422, detail=str(exc)) from None
        if cfg.name.startswith("."):  # '..' would put the run beside the runs folder, '.x' hides it
            raise HTTPException(422, detail=f"{body.config}: name {cfg.name!r} must not start with '.'")
        return start(cfg.name, path)

    @app.get("/api/jobs", dependencies=auth)
    def jobs() -> dict[str, Any]:
        return {"jobs": queue.list()}

    @app.post("/api/jobs/{job_id}/stop", dependencies=auth)
    def stop_job(job_id: str) -> dict[str, Any]:
        """Cancel a queued job (its run may have no folder yet) or stop a running one."""
        job = queue.jobs.get(job_id)
        if job is None:
            raise _not_found(NotFound(job_id))
        if job.state not in ("queued", "running"):
            raise HTTPException(409, detail=f"job {job_id} has ended ({job.state})")
        queue.stop(job)
        return {"job": job.public()}

    @app.exception_handler(StarletteHTTPException)
    def _http(request: Request, exc: Exception) -> SafeJSONResponse:
        """A URL no route matches reads like any other missing name (one 404 text for everything)."""
        assert isinstance(exc, StarletteHTTPException)
        detail = exc.detail
        if exc.status_code == 404 and detail == "Not Found":
            detail = str(NotFound(request.url.path))
        return SafeJSONResponse({"detail": detail}, status_code=exc.status_code, headers=exc.headers)

    return app
