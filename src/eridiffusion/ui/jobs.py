"""Training jobs started from the UI: ``eri validate`` first, then ``eri train`` as a subprocess, one job at
a time per GPU (``slots``), the rest waiting in a queue.

A job is an ``eri train`` run like any other: it writes its run folder, and stopping it is the CLI's graceful
stop (SIGTERM: finish the step, checkpoint, exit 130). Jobs run in their own session, so restarting the UI
leaves training alone; the page reads the run folder either way. Each job's output goes to
``RUNS/.eri-ui/logs/NAME.log`` (appended across resumes, and outside the run folder, which a fresh run may
move aside).
"""

from __future__ import annotations

import collections
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

VALIDATE_TIMEOUT_S = 600.0


class JobError(Exception):
    """A job that cannot be queued; ``status`` is the HTTP status the UI answers with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Job:
    id: str
    run: str
    config: Path
    args: list[str]
    state: str = "queued"
    """queued, running, finished, stopped (exit 130), failed or cancelled (stopped while queued)."""
    returncode: int | None = None
    slot: int | None = None
    queued: float = field(default_factory=time.time)
    started: float | None = None
    ended: float | None = None
    stop_requested: bool = False
    proc: subprocess.Popen | None = field(default=None, repr=False)

    def public(self) -> dict[str, object]:
        return {
            "id": self.id,
            "run": self.run,
            "config": self.config.name,
            "state": self.state,
            "returncode": self.returncode,
            "slot": self.slot,
            "pid": self.proc.pid if self.proc is not None and self.state == "running" else 0,
        }


def eri_command(*args: str) -> list[str]:
    """``eri ARGS`` with this interpreter (the UI and its jobs use the same install)."""
    return [sys.executable, "-m", "eridiffusion.cli", *args]


def validate(config: Path, overrides: list[str], env: dict[str, str] | None = None) -> tuple[bool, str]:
    """Run ``eri validate``: (ok, the plan or the problems it printed)."""
    try:
        done = subprocess.run(
            eri_command("validate", str(config), *overrides),
            capture_output=True,
            text=True,
            env=env,
            timeout=VALIDATE_TIMEOUT_S,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        return False, f"eri validate took longer than {VALIDATE_TIMEOUT_S:.0f} s"
    if done.returncode == 0:
        return True, done.stdout.strip()
    return False, (done.stderr.strip() or done.stdout.strip() or f"eri validate exited {done.returncode}")


class JobQueue:
    """Jobs in arrival order; ``slots`` worker threads each run one at a time (slot i sees GPU i alone
    when there are several)."""

    def __init__(self, runs: Path, slots: int = 1, env: dict[str, str] | None = None) -> None:
        if slots < 1:
            raise ValueError(f"slots must be at least 1, got {slots}")
        self.runs = runs
        self.slots = slots
        self.env = dict(os.environ if env is None else env)
        self.jobs: dict[str, Job] = {}
        self._waiting: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._workers = [
            threading.Thread(target=self._work, args=(i,), name=f"eri-ui-job-{i}", daemon=True)
            for i in range(slots)
        ]
        for w in self._workers:
            w.start()

    def log_path(self, run: str) -> Path:
        return self.runs / ".eri-ui" / "logs" / f"{run}.log"

    def active(self, run: str) -> Job | None:
        """The queued or running job of run ``run``, if any."""
        with self._cond:
            for job in self.jobs.values():
                if job.run == run and job.state in ("queued", "running"):
                    return job
        return None

    def submit(self, run: str, config: Path, overrides: list[str]) -> Job:
        """Queue ``eri train CONFIG OVERRIDES`` for run ``run`` (409 while that run has a job already)."""
        with self._cond:
            if self._closed:
                raise JobError(503, "the UI is shutting down")
            if self.active(run) is not None:
                raise JobError(409, f"run {run!r} already has a queued or running job; stop it first")
            job = Job(uuid.uuid4().hex[:8], run, config, ["train", str(config), *overrides])
            self.jobs[job.id] = job
            self._waiting.append(job)
            self._cond.notify()
        return job

    def stop(self, job: Job) -> None:
        """A queued job is cancelled; a running one gets SIGTERM (checkpoint, then exit 130)."""
        with self._cond:
            job.stop_requested = True
            if job.state == "queued":
                self._waiting.remove(job)
                job.state, job.ended = "cancelled", time.time()
                return
            proc = job.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)

    def wait(self, job: Job, timeout: float) -> bool:
        """Wait up to ``timeout`` s for ``job`` to end; whether it did."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while job.state in ("queued", "running"):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def list(self) -> list[dict[str, object]]:
        with self._cond:
            return [j.public() for j in sorted(self.jobs.values(), key=lambda j: j.queued, reverse=True)]

    def close(self, stop_running: bool = False, timeout: float = 60.0) -> None:
        """Drop queued jobs; with ``stop_running`` also stop the running ones and wait for them."""
        with self._cond:
            self._closed = True
            while self._waiting:
                job = self._waiting.popleft()
                job.state, job.ended = "cancelled", time.time()
            running = [j for j in self.jobs.values() if j.state == "running"]
            self._cond.notify_all()
        for job in running:
            if stop_running:
                self.stop(job)
            else:
                logger.warning(
                    "job %s (run %s) keeps training in pid %s", job.id, job.run, job.proc and job.proc.pid
                )
        if stop_running:
            for w in self._workers:
                w.join(timeout)

    def _work(self, slot: int) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                job = self._waiting.popleft()
                job.state, job.slot, job.started = "running", slot, time.time()
                env = dict(self.env)
                if self.slots > 1:
                    env["CUDA_VISIBLE_DEVICES"] = str(slot)
                log = self.log_path(job.run)
                log.parent.mkdir(parents=True, exist_ok=True)
                out = log.open("a", encoding="utf-8")
                out.write(f"== {time.strftime('%Y-%m-%d %H:%M:%S')} eri {' '.join(job.args)}\n")
                out.flush()
                try:
                    job.proc = subprocess.Popen(
                        eri_command(*job.args),
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                        env=env,
                        start_new_session=True,
                    )
                except OSError as exc:
                    out.write(f"could not start: {exc}\n")
                    out.close()
                    job.state, job.ended = "failed", time.time()
                    continue
            code = job.proc.wait()
            out.close()
            with self._cond:
                job.returncode, job.ended = code, time.time()
                job.state = "finished" if code == 0 else "stopped" if code == 130 else "failed"
                self._cond.notify_all()
