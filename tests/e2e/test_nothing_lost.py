"""Nothing a user trained is lost: finished runs, fresh runs in used folders, damaged checkpoints, a full
disk, interrupted final writes, and config files that are not what they seem. Each case was reproduced
against the old trainer before it was fixed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from eridiffusion.cli import EXIT_USER_ERROR, main
from eridiffusion.training import checkpoint, loop
from eridiffusion.training.checkpoint import CheckpointManager, TrainState
from eridiffusion.training.runs import tidy_run_folder
from tests.conftest import tiny_job, write_yaml
from tests.e2e.test_pipeline import _model_weights, pipeline_job


def _ckpts(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir())


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_rerunning_a_finished_pipeline_changes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = write_yaml(tmp_path / "p.yaml", pipeline_job(tmp_path))
    assert main(["train", str(cfg)]) == 0
    run = tmp_path / "output" / "p"
    before = _snapshot(run / "model")
    capsys.readouterr()
    assert main(["train", str(cfg)]) == 0
    assert "already finished" in capsys.readouterr().out
    assert _snapshot(run / "model") == before  # not replaced by a freshly built, untrained model


def test_a_kill_during_the_final_model_write_resumes_to_the_trained_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    whole = write_yaml(tmp_path / "w.yaml", pipeline_job(tmp_path, name="whole"))
    assert main(["train", str(whole)]) == 0
    crash = write_yaml(tmp_path / "c.yaml", pipeline_job(tmp_path, name="crash"))
    run = tmp_path / "output" / "crash"
    real = loop.atomic_write_dir

    def killed_in_final_write(final: Path, write):  # noqa: ANN001, ANN202
        if final == run / "model":
            tmp = final.parent / f".tmp-model-{os.getpid()}"
            tmp.mkdir()
            write(tmp)  # half done: the files are there, the rename never happens
            raise KeyboardInterrupt
        return real(final, write)

    monkeypatch.setattr(loop, "atomic_write_dir", killed_in_final_write)
    with pytest.raises(KeyboardInterrupt):
        main(["train", str(crash)])
    assert list(run.glob(".tmp-model-*")) and not (run / "model").exists()
    monkeypatch.setattr(loop, "atomic_write_dir", real)
    assert main(["train", str(crash)]) == 0
    assert not list(run.glob(".tmp-*"))  # the interrupted write was cleaned up on start
    a, b = _model_weights(tmp_path / "output" / "whole"), _model_weights(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_fresh_run_in_a_used_folder_moves_the_old_run_aside(tmp_path: Path, caplog) -> None:
    """resume: false must neither rotate away its own new checkpoints (an old run's higher step numbers
    sorted after them) nor leave the old run where a later plain `eri train` would resume it."""
    cfg = write_yaml(tmp_path / "job.yaml", tiny_job(tmp_path))
    assert main(["train", str(cfg), "train.steps=6", "save.keep=3"]) == 0
    run = tmp_path / "output" / "t"
    old = _snapshot(run / "checkpoints")
    with caplog.at_level("WARNING"):
        assert main(["train", str(cfg), "save.resume=false", "train.steps=2", "save.every=1"]) == 0
    (moved,) = (tmp_path / "output").glob("t.previous-*")
    assert str(moved) in caplog.text
    assert _snapshot(moved / "checkpoints") == old  # the old run, whole
    assert _ckpts(run) == ["step_000001", "step_000002"]  # the new run's own, not rotated away
    assert main(["train", str(cfg), "train.steps=3", "save.every=1"]) == 0  # resumes the new run
    state = json.loads((run / "checkpoints" / "step_000003" / "state.json").read_text())
    assert state["step"] == 3 and state["micro_batches"] == 3


def test_rotation_only_deletes_checkpoints_of_the_saving_run(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoints"
    other = CheckpointManager(folder, keep=5, run_id="old")
    for step in (40, 50, 60):
        other.save(TrainState(step=step, run_id="old"), {"w": torch.zeros(2)}, {}, None)
    mine = CheckpointManager(folder, keep=2, run_id="new")
    for step in (10, 20, 30):
        mine.save(TrainState(step=step, run_id="new"), {"w": torch.ones(2)}, {}, None)
    names = [p.name for p in mine.list()]
    assert names == ["step_000020", "step_000030", "step_000040", "step_000050", "step_000060"]


def _damage(path: Path, how: str) -> None:
    if how == "truncated":
        data = (path / "trainable.safetensors").read_bytes()
        (path / "trainable.safetensors").write_bytes(data[: len(data) // 3])
    elif how == "missing":
        (path / "optimizer.pt").unlink()
    else:
        (path / "state.json").write_text("{not json")


@pytest.mark.parametrize("how", ["truncated", "missing", "bad_json"])
def test_a_damaged_newest_checkpoint_falls_back_and_is_kept(tmp_path: Path, caplog, how: str) -> None:
    cfg = write_yaml(tmp_path / "job.yaml", tiny_job(tmp_path))
    assert main(["train", str(cfg), "save.keep=3"]) == 0
    run = tmp_path / "output" / "t"
    _damage(run / "checkpoints" / "step_000004", how)
    with caplog.at_level("WARNING"):
        assert main(["train", str(cfg), "save.keep=3", "train.steps=6"]) == 0
    assert "step_000004" in caplog.text and "unreadable" in caplog.text
    assert (run / "checkpoints" / "step_000004.damaged").is_dir()  # kept, renamed, never deleted
    state = json.loads((run / "checkpoints" / "step_000006" / "state.json").read_text())
    assert state["step"] == 6


def test_no_readable_checkpoint_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = write_yaml(tmp_path / "job.yaml", tiny_job(tmp_path))
    assert main(["train", str(cfg)]) == 0
    run = tmp_path / "output" / "t"
    for path in (run / "checkpoints").iterdir():
        _damage(path, "truncated")
    assert main(["train", str(cfg), "train.steps=6"]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "no readable checkpoint" in err and "Traceback" not in err
    assert len(list((run / "checkpoints").glob("*.damaged"))) == 2


def test_disk_full_during_a_checkpoint_keeps_the_previous_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    calls = {"n": 0}
    real_save = torch.save

    def full_on_second(obj, f):  # noqa: ANN001, ANN202
        calls["n"] += 1
        if calls["n"] == 2:  # what torch's C++ writer raises on ENOSPC (the errno is lost)
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos; basic_ios::clear")
        return real_save(obj, f)

    monkeypatch.setattr(checkpoint.torch, "save", full_on_second)
    cfg = write_yaml(tmp_path / "job.yaml", tiny_job(tmp_path))
    assert main(["train", str(cfg)]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "no space left on device at" in err and "MB needed" in err and "Traceback" not in err
    run = tmp_path / "output" / "t"
    assert _ckpts(run) == ["step_000002"]  # the previous checkpoint, intact, and no temp folder
    CheckpointManager.load(run / "checkpoints" / "step_000002")


def _tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        return False
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    return done.returncode == 0


def test_a_really_full_disk_is_reported_before_writing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """On a real file system 1.6 x one checkpoint's size: the first checkpoint fits, the second does not."""
    job = tiny_job(tmp_path, name="t")
    job["logging"]["tensorboard"] = False
    cfg = write_yaml(tmp_path / "job.yaml", job)
    assert main(["train", str(cfg), "train.steps=1", "save.every=1"]) == 0
    size = sum(
        p.stat().st_size for p in (tmp_path / "output" / "t" / "checkpoints").rglob("*") if p.is_file()
    )
    disk = tmp_path / "disk"
    if not _tmpfs(disk, f"{int(size * 1.6) // 1024}k"):
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    try:
        assert (
            main(["train", str(cfg), f"output_dir={disk}", "save.every=1", "save.keep=5"]) == EXIT_USER_ERROR
        )
        err = capsys.readouterr().err
        assert "no space left on device at" in err and "Traceback" not in err
        assert _ckpts(disk / "t") == ["step_000001"]  # no half-written second one
        CheckpointManager.load(disk / "t" / "checkpoints" / "step_000001")
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_leftovers_of_an_interrupted_write_are_recovered_on_start(tmp_path: Path) -> None:
    cfg = write_yaml(tmp_path / "job.yaml", tiny_job(tmp_path))
    assert main(["train", str(cfg), "train.steps=2"]) == 0
    run = tmp_path / "output" / "t"
    model = _snapshot(run / "model")

    def interrupted() -> None:  # killed after the old copy moved out and before the new one moved in
        (run / "model").rename(run / ".tmp-old-model-999")
        (run / ".tmp-model-999").mkdir()
        (run / ".tmp-model-999" / "half.bin").write_bytes(b"x")

    interrupted()
    tidy_run_folder(run)
    assert _snapshot(run / "model") == model and not list(run.glob(".tmp-*"))  # the old copy is back
    interrupted()
    assert main(["train", str(cfg), "train.steps=3"]) == 0
    assert not list(run.glob(".tmp-*")) and (run / "model").is_dir()


def test_a_config_that_is_a_folder_or_not_utf8_names_the_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "configs").mkdir()
    write_yaml(tmp_path / "configs" / "job.yaml", tiny_job(tmp_path))
    assert main(["train", str(tmp_path / "configs")]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "is a folder, not a config file" in err and "job.yaml" in err
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("name: caf\xe9\n".encode("latin-1"))
    assert main(["validate", str(latin1)]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "not UTF-8" in err and "line 1" in err and "codec" not in err


def test_resuming_with_other_captions_says_what_changed(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A from-scratch model's tokenizer learns the captions: new words change its embedding's shape."""
    cfg = write_yaml(tmp_path / "job.yaml", tiny_job(tmp_path))
    assert main(["train", str(cfg), "train.steps=2"]) == 0
    for i, caption in enumerate(sorted((tmp_path / "shapes").glob("*.txt"))):
        caption.write_text(f"zorblax quintessential flibbertigibbet number {i}")
    assert main(["train", str(cfg), "train.steps=4"]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "changed shape" in err and "captions" in err and "Traceback" not in err


def test_sigterm_stops_after_a_checkpoint_and_the_run_resumes(tmp_path: Path) -> None:
    """The first SIGTERM (or Ctrl-C) finishes the step, checkpoints, exits 130 and marks the run
    interrupted; the same command then resumes it to the end."""
    import signal
    import sys
    import time

    job = tiny_job(tmp_path)
    job["train"]["steps"] = 400
    job["save"] = {"every": 1000, "keep": 2}
    cfg = write_yaml(tmp_path / "job.yaml", job)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "eridiffusion.cli", "train", str(cfg)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "output" / "t" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 3) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "stopped at step" in err and "Traceback" not in err
    run = tmp_path / "output" / "t"
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "interrupted" and info["pid"] == 0
    (ckpt,) = _ckpts(run)
    assert int(ckpt.split("_")[1]) == info["step"] > 0  # saved although save.every is 1000
    done = subprocess.run(
        [*cmd, "train.steps=" + str(info["step"] + 2)], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((run / "run.json").read_text())["status"] == "finished"
