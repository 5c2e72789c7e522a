"""Several processes on the CPU (gloo): `eri train --num-processes 2` against one process.

Each process trains on its half of every micro-batch, so 2 processes with batch b must give the weights of
one process with batch 2b; a killed 2-process run must resume to the weights of an uninterrupted one.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import tiny_job, write_yaml

# each test starts several interpreters (about 10-60 s on 2 cores): `make test-slow`, which .ci/run runs
pytestmark = pytest.mark.slow

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def eri(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "eridiffusion.cli", *args],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoints" / f"step_{step:06d}" / "trainable.safetensors")


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], rtol: float) -> None:
    """Every tensor within ``rtol`` relative (and 1e-8 absolute, for weights that only hold rounding noise,
    such as an attention key bias whose true gradient is zero)."""
    assert a.keys() == b.keys()
    worst = max(((a[k] - b[k]).abs() - rtol * b[k].abs()).max().item() for k in a)
    print(f"largest difference beyond {rtol:g} relative: {worst:.2e}")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=1e-8)


def test_two_processes_equal_one_process_with_twice_the_batch(tmp_path: Path) -> None:
    job = tiny_job(tmp_path)
    # SGD: Adam divides each gradient by its own running size, so a parameter whose true gradient is zero
    # (an attention key bias) would turn float rounding noise into full-size updates and hide the comparison
    job["train"].update(steps=3, optimizer={"type": "sgd"}, lr=0.05)
    one = write_yaml(tmp_path / "one.yaml", {**job, "name": "one"})
    two = write_yaml(tmp_path / "two.yaml", {**job, "name": "two"})
    r1 = eri("train", str(one), "train.batch_size=8", "save.every=3")
    assert r1.returncode == 0, r1.stderr
    r2 = eri("train", "--num-processes", "2", str(two), "train.batch_size=4", "save.every=3")
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert r2.stdout.count("trained two: 3 steps") == 1  # only the main process reports
    out = tmp_path / "output"
    assert_close(weights(out / "two", 3), weights(out / "one", 3), rtol=1e-5)
    loss_one = (out / "one" / "metrics.jsonl").read_text().splitlines()
    loss_two = (out / "two" / "metrics.jsonl").read_text().splitlines()
    assert len(loss_one) == len(loss_two) == 3  # one writer: no duplicated lines from the second process


def test_killed_two_process_run_resumes_to_the_uninterrupted_weights(tmp_path: Path) -> None:
    job = tiny_job(tmp_path)
    job["train"].update(steps=16, batch_size=4)
    job["save"] = {"every": 2, "keep": 3}
    whole = write_yaml(tmp_path / "whole.yaml", {**job, "name": "whole"})
    crash = write_yaml(tmp_path / "crash.yaml", {**job, "name": "crash"})
    assert eri("train", "--num-processes", "2", str(whole)).returncode == 0

    proc = subprocess.Popen(
        [sys.executable, "-m", "eridiffusion.cli", "train", "--num-processes", "2", str(crash)],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    ckpts = tmp_path / "output" / "crash" / "checkpoints"
    deadline = time.monotonic() + 180
    while not (ckpts / "step_000004").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both trainers, mid-run
    proc.wait(timeout=30)
    assert not (ckpts / "step_000016").exists(), "the run finished before it could be killed"

    resumed = eri("train", "--num-processes", "2", str(crash))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    out = tmp_path / "output"
    a, b = weights(out / "whole", 16), weights(out / "crash", 16)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_two_process_checkpoint_resumes_in_one_process(tmp_path: Path) -> None:
    job = tiny_job(tmp_path)
    job["train"].update(steps=2, batch_size=4)
    cfg = write_yaml(tmp_path / "job.yaml", job)
    assert eri("train", "--num-processes", "2", str(cfg)).returncode == 0
    longer = eri("train", str(cfg), "train.steps=4")
    assert longer.returncode == 0, longer.stderr
    assert "2-process checkpoint with 1 processes" in longer.stderr
    assert (tmp_path / "output" / "t" / "checkpoints" / "step_000004").is_dir()


def test_fsdp_full_fine_tune_trains_checkpoints_and_resumes(tmp_path: Path) -> None:
    """FSDP2 over gloo: the sharded run matches one process (SGD, as above), its checkpoints hold whole
    tensors, and a run stopped at step 2 and resumed ends bit-identical to an uninterrupted one."""
    job = tiny_job(tmp_path)
    job["train"].update(steps=4, batch_size=4, lr=0.05, optimizer={"type": "sgd"}, ema={"enabled": False})
    job["train"]["distributed"] = {"strategy": "fsdp"}
    job["save"] = {"every": 2, "keep": 5}
    cfgs = {n: write_yaml(tmp_path / f"{n}.yaml", {**job, "name": n}) for n in ("one", "whole", "split")}
    assert eri("train", str(cfgs["one"]), "train.batch_size=8").returncode == 0
    whole = eri("train", "--num-processes", "2", str(cfgs["whole"]))
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert eri("train", "--num-processes", "2", str(cfgs["split"]), "train.steps=2").returncode == 0
    resumed = eri("train", "--num-processes", "2", str(cfgs["split"]))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    out = tmp_path / "output"
    assert_close(weights(out / "whole", 4), weights(out / "one", 4), rtol=1e-5)
    a, b = weights(out / "whole", 4), weights(out / "split", 4)
    assert all(torch.equal(a[k], b[k]) for k in a)
    unet = load_file(next((out / "whole" / "model" / "unet").glob("*.safetensors")))
    assert torch.equal(unet["conv_in.weight"], a["denoiser.conv_in.weight"])  # a whole model was written


def test_fsdp_refuses_adapters_with_a_message(tmp_path: Path) -> None:
    job = tiny_job(tmp_path)
    job["network"] = {"type": "lora", "linear": 2}
    job["train"]["distributed"] = {"strategy": "fsdp"}
    r = eri("train", "--num-processes", "2", str(write_yaml(tmp_path / "j.yaml", job)))
    assert r.returncode == 2 and "train.distributed.strategy fsdp" in r.stderr and "ddp" in r.stderr
    assert "Traceback" not in r.stderr
