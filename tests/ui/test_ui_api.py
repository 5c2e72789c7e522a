"""eri ui's JSON routes on run folders written by real ``eri train`` runs: listing, detail, live metrics,
downloads, start (validate first) / stop / resume with real subprocesses, confinement and auth."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from eridiffusion.cli import EXIT_USER_ERROR, main
from eridiffusion.ui import UISettings, create_ui_app
from tests.conftest import tiny_job, write_yaml
from tests.ui.helpers import job_config, wait_for

JOB_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 4-step run ``t`` with sample grids, trained by ``eri train`` (in-process)."""
    root = tmp_path_factory.mktemp("ui")
    job = tiny_job(root, sample={"prompts": ["a red circle"], "steps": 2, "images_per_prompt": 1, "every": 2})
    assert main(["train", str(write_yaml(root / "job.yaml", job))]) == 0
    return root


def client(root: Path, **kw: object) -> TestClient:
    settings = UISettings(runs=root / "output", configs=root / "configs", env=JOB_ENV, **kw)  # type: ignore[arg-type]
    return TestClient(create_ui_app(settings))


def test_lists_a_finished_run_with_its_metrics_samples_checkpoints_and_model(trained: Path) -> None:
    with client(trained) as c:
        (run,) = c.get("/api/runs").json()["runs"]
        assert run["name"] == "t" and run["family"] == "tiny" and run["status"] == "finished"
        assert run["step"] == 4 and isinstance(run["last_loss"], float) and run["started"]
        d = c.get("/api/runs/t").json()
        assert [s["step"] for s in d["samples"]] == [2, 4]
        assert [c["step"] for c in d["checkpoints"]] == [2, 4]
        assert all(c["size"] > 0 and "trainable.safetensors" in c["files"] for c in d["checkpoints"])
        assert d["config"].startswith("name: t") and d["stages"] == []
        assert [(f["path"], f["folder"]) for f in d["downloads"]] == [("model", True)]

        first = c.get("/api/runs/t/metrics").json()
        assert [r["step"] for r in first["rows"]] == [1, 2, 3, 4] and "loss" in first["rows"][0]
        again = c.get("/api/runs/t/metrics", params={"offset": first["offset"]}).json()
        assert again["rows"] == [] and again["offset"] == first["offset"]  # live polling asks from there

        png = c.get("/api/runs/t/files/samples/step_000004.png")
        assert png.status_code == 200 and png.headers["content-type"] == "image/png"
        assert png.content.startswith(b"\x89PNG")
        model = c.get("/api/runs/t/files/model")
        assert model.status_code == 200 and model.headers["content-type"] == "application/zip"
        names = zipfile.ZipFile(io.BytesIO(model.content)).namelist()
        assert "eri_family.json" in names and any(n.startswith("unet/") for n in names)
        log = c.get("/api/runs/t/log").text
        assert "not started from the UI" in log


def test_the_page_and_its_scripts_are_served(trained: Path) -> None:
    with client(trained) as c:
        page = c.get("/")
        assert page.status_code == 200 and 'id="loss-chart"' in page.text and "/static/app.js" in page.text
        assert c.get("/static/app.js").headers["content-type"].startswith("text/javascript")
        assert c.get("/static/style.css").status_code == 200


def test_a_running_status_whose_trainer_is_gone_reads_as_interrupted(tmp_path: Path) -> None:
    run = tmp_path / "output" / "killed"
    run.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run / "run.json").write_text(
        json.dumps({"run_id": "x", "status": "running", "pid": dead.pid, "step": 7})
    )
    with client(tmp_path) as c:
        (listed,) = c.get("/api/runs").json()["runs"]
        assert listed["status"] == "interrupted" and listed["step"] == 7
        stop = c.post("/api/runs/killed/stop")
        assert stop.status_code == 409 and "not running" in stop.json()["detail"]


def test_paths_from_the_browser_stay_inside_the_runs_and_configs_folders(
    trained: Path, tmp_path: Path
) -> None:
    secret = tmp_path / "secret.yaml"
    secret.write_text("name: secret\n")
    runs = trained / "output"
    (runs / "t" / "samples" / "leak.png").unlink(missing_ok=True)
    (runs / "t" / "samples" / "leak.png").symlink_to(secret)
    (runs / "outside").unlink(missing_ok=True)
    (runs / "outside").symlink_to(tmp_path, target_is_directory=True)
    (tmp_path / "run.json").write_text("{}")
    (trained / "configs").mkdir(exist_ok=True)
    (trained / "configs" / "link.yaml").unlink(missing_ok=True)
    (trained / "configs" / "link.yaml").symlink_to(secret)
    try:
        with client(trained) as c:
            assert [r["name"] for r in c.get("/api/runs").json()["runs"]] == ["t"]
            refused = [
                "/api/runs/t/files/samples/leak.png",
                "/api/runs/t/files/%2e%2e/%2e%2e/job.yaml",
                "/api/runs/t/files/%2Fetc%2Fpasswd",
                "/api/runs/t/files/samples/%2e%2e/%2e%2e/%2e%2e/job.yaml",
                "/api/runs/outside",
                "/api/runs/outside/files/run.json",
                "/api/runs/%2e%2e/metrics",
                "/api/configs/link.yaml",
                "/api/configs/%2e%2e%2fjob.yaml",
            ]
            missing = [
                "/api/runs/t/files/samples/step_000099.png",
                "/api/runs/nope",
                "/api/configs/nope.yaml",
            ]
            for url in refused + missing:
                r = c.get(url)
                assert r.status_code == 404, url
                assert r.json()["detail"].startswith("not found: "), (url, r.text)
                assert str(tmp_path) not in r.text and "name: secret" not in r.text
            started = c.post("/api/jobs", json={"config": "../job.yaml"})
            assert started.status_code == 404 and started.json()["detail"].startswith("not found: ")
    finally:
        (runs / "outside").unlink()
        (runs / "t" / "samples" / "leak.png").unlink()


def test_every_route_but_health_needs_the_key(trained: Path) -> None:
    with client(trained, api_key="s3cret") as c:
        assert c.get("/health").status_code == 200
        for url in (
            "/",
            "/static/app.js",
            "/api/runs",
            "/api/runs/t",
            "/api/runs/t/files/model",
            "/api/configs",
        ):
            r = c.get(url)
            assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Basic"), url
        assert c.post("/api/runs/t/stop").status_code == 401
        assert c.post("/api/jobs", json={"config": "job.yaml"}).status_code == 401
        basic = base64.b64encode(b"anyone:s3cret").decode()
        for headers in (
            {"Authorization": "Bearer s3cret"},
            {"X-API-Key": "s3cret"},
            {"Authorization": f"Basic {basic}"},
        ):
            assert c.get("/api/runs", headers=headers).status_code == 200
        assert c.get("/api/runs", headers={"Authorization": "Bearer wrong"}).status_code == 401
    with pytest.raises(ValueError, match="empty"):
        UISettings(runs=trained, configs=trained, api_key="")


def test_uploaded_configs_are_checked_and_saved_in_the_configs_folder(tmp_path: Path) -> None:
    with client(tmp_path) as c:
        assert c.get("/api/configs").json() == {"configs": []}
        for bad in ("../x.yaml", "x.txt", ".hidden.yaml", "a/b.yaml"):
            r = c.post("/api/configs", json={"name": bad, "text": "name: x\n"})
            assert r.status_code == 422 and "name:" in r.json()["detail"], bad
        assert c.post("/api/configs", json={"name": "mine.yaml", "text": "name: x\n"}).status_code == 200
        assert c.post("/api/configs", json={"name": "mine.yaml", "text": "name: x\n"}).status_code == 200
        clash = c.post("/api/configs", json={"name": "mine.yaml", "text": "name: y\n"})
        assert clash.status_code == 409 and "rename" in clash.json()["detail"]
        assert c.get("/api/configs").json() == {"configs": ["mine.yaml"]}
        assert c.get("/api/configs/mine.yaml").text == "name: x\n"
    assert not (tmp_path / "x.txt").exists()


def test_validate_problems_are_answered_and_nothing_starts(tmp_path: Path) -> None:
    job = tiny_job(tmp_path)
    job["datasets"][0] = {"folder_path": str(tmp_path / "no-such-folder"), "resolution": 16}
    (tmp_path / "configs").mkdir()
    write_yaml(tmp_path / "configs" / "bad.yaml", job)
    (tmp_path / "configs" / "broken.yaml").write_text("name: t\ntrain: {stepz: 3}\n")
    write_yaml(tmp_path / "configs" / "up.yaml", {**tiny_job(tmp_path), "name": ".."})
    with client(tmp_path) as c:
        r = c.post("/api/jobs", json={"config": "bad.yaml"})
        assert r.status_code == 422 and "no-such-folder" in r.json()["detail"]
        r = c.post("/api/jobs", json={"config": "broken.yaml"})
        assert r.status_code == 422 and "train.stepz" in r.json()["detail"]
        r = c.post("/api/jobs", json={"config": "up.yaml"})
        assert r.status_code == 422 and "names no folder of its own" in r.json()["detail"]  # the schema's
        assert c.get("/api/jobs").json() == {"jobs": []}
    assert not (tmp_path / "output" / "t").exists()


def _rows(c: TestClient) -> int:
    r = c.get("/api/runs/t/metrics")
    return len(r.json()["rows"]) if r.status_code == 200 else 0


def _job(c: TestClient, job_id: str | None = None) -> dict:
    """The job ``job_id``, or the newest one."""
    jobs = c.get("/api/jobs").json()["jobs"]
    return next(j for j in jobs if j["id"] == job_id) if job_id else jobs[0]


@pytest.mark.slow
def test_start_stop_and_resume_a_job_through_the_api(tmp_path: Path) -> None:
    """A real ``eri train`` subprocess: started after validation, stopped gracefully (checkpoint, exit 130,
    status interrupted), resumed from its own config.yaml to the end. (~35 s: two validations and two trainer
    start-ups; the browser test runs the same flow in the default suite.)"""
    job_config(tmp_path, steps=80)
    with client(tmp_path, stop_jobs_on_exit=True) as c:
        started = c.post("/api/jobs", json={"config": "job.yaml"})
        assert started.status_code == 200, started.text
        assert started.json()["job"]["run"] == "t" and "job t: tiny" in started.json()["plan"]
        again = c.post("/api/jobs", json={"config": "job.yaml"})
        assert again.status_code == 409 and "already" in again.json()["detail"]
        wait_for(lambda: _rows(c) >= 3, 120, "3 logged steps")
        listed = c.get("/api/runs").json()["runs"][0]
        assert listed["status"] == "running" and listed["pid"] > 0
        assert c.post("/api/runs/t/resume").status_code == 409  # not while it runs
        assert c.post("/api/runs/t/stop").status_code == 200
        wait_for(lambda: _job(c)["state"] != "running", 120, "the job to end")
        assert _job(c)["state"] == "stopped" and _job(c)["returncode"] == 130
        d = c.get("/api/runs/t").json()
        assert d["status"] == "interrupted" and 0 < d["step"] < 80
        assert [ck["step"] for ck in d["checkpoints"]] == [d["step"]]
        assert "stopped at step" in c.get("/api/runs/t/log").text

        resumed = c.post("/api/runs/t/resume")
        assert resumed.status_code == 200, resumed.text
        wait_for(
            lambda: _job(c)["state"] != "running" and _job(c)["state"] != "queued", 180, "the resumed job"
        )
        assert _job(c)["state"] == "finished", c.get("/api/runs/t/log").text[-2000:]
        d = c.get("/api/runs/t").json()
        assert d["status"] == "finished" and d["step"] == 80
        steps = [r["step"] for r in c.get("/api/runs/t/metrics").json()["rows"]]
        assert steps[-1] == 80 and set(range(1, 81)) <= set(steps)
        assert c.post("/api/runs/t/stop").status_code == 409
        assert c.post("/api/runs/t/resume").status_code == 409


def test_a_run_started_from_the_cli_is_watched_and_stopped_from_the_ui(tmp_path: Path) -> None:
    cfg = job_config(tmp_path, steps=400)
    proc = subprocess.Popen(
        [sys.executable, "-m", "eridiffusion.cli", "train", str(cfg)],
        env=JOB_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        with client(tmp_path) as c:
            wait_for(lambda: _rows(c) >= 2, 120, "2 logged steps")
            assert c.get("/api/runs").json()["runs"][0]["status"] == "running"
            assert c.post("/api/runs/t/stop").json()["pid"] == proc.pid
            _, err = proc.communicate(timeout=120)
            assert proc.returncode == 130, err[-2000:]
            assert c.get("/api/runs/t").json()["status"] == "interrupted"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_eri_ui_refuses_bad_options(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "file").write_text("x")
    assert main(["ui", "--runs", str(tmp_path / "file")]) == EXIT_USER_ERROR
    assert "--runs" in capsys.readouterr().err
    assert main(["ui", "--runs", str(tmp_path), "--api-key", ""]) == EXIT_USER_ERROR
    assert "empty" in capsys.readouterr().err
    assert main(["ui", "--runs", str(tmp_path), "--gpus", "0"]) == EXIT_USER_ERROR


def test_a_pipeline_run_shows_its_steps_transitions_eval_scores_and_adapter(tmp_path: Path) -> None:
    """Pipeline steps in order with their summaries, the concept step's eval scores and grid, metrics rows
    tagged by step (where the chart marks the transitions), and the LoRA file to download."""
    from tests.e2e.test_pipeline import pipeline_job

    job = pipeline_job(tmp_path, name="c")
    job["pipeline"]["steps"][2]["eval"] = {"images_per_prompt": 1, "steps": 2}
    assert main(["train", str(write_yaml(tmp_path / "c.yaml", job))]) == 0
    with client(tmp_path) as c:
        d = c.get("/api/runs/c").json()
        assert [(s["index"], s["name"], s["summary"]["steps"]) for s in d["stages"]] == [
            (0, "ae", 3),
            (1, "diffusion", 6),
            (2, "concept", 3),
        ]
        concept = d["stages"][2]
        assert {"colour_accuracy", "shape_accuracy", "both_accuracy"} <= set(concept["eval"])
        assert concept["eval_grid"] == "stages/2-concept/eval_grid.png"
        assert c.get(f"/api/runs/c/files/{concept['eval_grid']}").content.startswith(b"\x89PNG")
        assert d["stages"][0]["eval"] is None and "final_d_loss" in d["stages"][0]["summary"]
        downloads = {f["path"] for f in d["downloads"]}
        assert {"model", "stages/2-concept/concept.safetensors"} <= downloads
        lora = c.get("/api/runs/c/files/stages/2-concept/concept.safetensors")
        assert lora.status_code == 200 and "concept.safetensors" in lora.headers["content-disposition"]
        rows = c.get("/api/runs/c/metrics").json()["rows"]
        order = [r["stage"] for i, r in enumerate(rows) if i == 0 or rows[i - 1]["stage"] != r["stage"]]
        assert order == ["ae", "diffusion", "concept"]
        (listed,) = c.get("/api/runs").json()["runs"]
        assert listed["status"] == "finished" and listed["step"] == 12 and listed["last_loss"] is not None


def test_eri_ui_serves_on_the_port_with_the_key_it_was_given(tmp_path: Path) -> None:
    import socket

    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = ["ui", "--runs", str(tmp_path / "runs"), "--configs", str(tmp_path), "--port", str(port)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "eridiffusion.cli", *cmd, "--api-key", "k"],
        env=JOB_ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(f"{url}/health", timeout=2).status_code == 200
        except httpx.TransportError:
            assert proc.poll() is None, proc.communicate()[0]
            return False

    try:
        wait_for(up, 60, "eri ui to answer /health", every=0.3)
        assert httpx.get(f"{url}/api/runs", timeout=5).status_code == 401
        ok = httpx.get(f"{url}/api/runs", headers={"X-API-Key": "k"}, timeout=5)
        assert ok.status_code == 200 and ok.json()["runs"] == []
        assert (tmp_path / "runs").is_dir()
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert f"http://127.0.0.1:{port}" in out and "Traceback" not in out


@pytest.mark.slow
def test_one_job_trains_at_a_time_and_the_next_waits_in_the_queue(tmp_path: Path) -> None:
    """With one slot the second job waits (queued) while the first trains; a queued job is cancelled
    without ever starting, a running one stopped. (~20 s: two validations and a trainer start-up.)"""
    job_config(tmp_path, steps=400)
    other = tiny_job(tmp_path, name="u")
    write_yaml(tmp_path / "configs" / "other.yaml", other)
    with client(tmp_path, stop_jobs_on_exit=True) as c:
        first = c.post("/api/jobs", json={"config": "job.yaml"}).json()["job"]
        second = c.post("/api/jobs", json={"config": "other.yaml"}).json()["job"]
        wait_for(lambda: _rows(c) >= 1, 120, "the first job's first step")
        states = {j["run"]: j["state"] for j in c.get("/api/jobs").json()["jobs"]}
        assert states == {"t": "running", "u": "queued"}
        assert c.post(f"/api/jobs/{second['id']}/stop").json()["job"]["state"] == "cancelled"
        assert c.post(f"/api/jobs/{second['id']}/stop").status_code == 409
        assert c.post("/api/jobs/nope/stop").status_code == 404
        c.post(f"/api/jobs/{first['id']}/stop")
        wait_for(lambda: _job(c, first["id"])["state"] != "running", 120, "the first job to end")
        assert _job(c, first["id"])["state"] == "stopped"
    assert not (tmp_path / "output" / "u").exists()
