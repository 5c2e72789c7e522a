"""Out of device memory while generating: a batch of jobs is split into single jobs (same seeds, same
images); a job too big alone answers 503 with what to change, and the server keeps serving. The device
error is injected: the generator refuses requests of more than ``limit`` images, as a full GPU would."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from fastapi.testclient import TestClient

from eridiffusion.inference.generate import GenerateRequest
from eridiffusion.serving import ServeSettings, create_app
from tests.serving.test_server import SMALL, _generator, _image, model_dir  # noqa: F401 (fixture)
from tests.serving.waits import Gate, wait_until


def _limit(gen, limit: int) -> dict[str, int]:  # noqa: ANN001
    real = gen.generate
    seen = {"ooms": 0}

    def generate(req: GenerateRequest, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        if len(req.prompts) * req.images_per_prompt > limit:
            seen["ooms"] += 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB (injected)")
        return real(req, *args, **kwargs)

    gen.generate = generate
    return seen


def test_a_batch_that_does_not_fit_runs_job_by_job(model_dir: Path) -> None:  # noqa: F811
    gen = _generator(model_dir)
    seen = _limit(gen, limit=1)
    with TestClient(create_app(gen, ServeSettings(max_queue=8))) as c, Gate(gen) as gate:
        first = c.post("/v1/jobs", json={"prompt": "a", **SMALL}).json()
        assert gate.started.wait(10), "the first job never started"
        waiting = [
            c.post("/v1/jobs", json={"prompt": p, **SMALL, "seed": 5 + k}).json() for k, p in enumerate("xy")
        ]
        gate.open.set()
        ids = [first["id"], *(j["id"] for j in waiting)]
        wait_until(
            lambda: all(c.get(f"/v1/jobs/{i}").json()["state"] == "done" for i in ids), 30, "jobs done"
        )
        assert seen["ooms"] == 1  # the two waiting jobs were batched, failed together, then ran alone
        for k, job in enumerate(waiting):
            got = np.asarray(_image(c.get(f"/v1/jobs/{job['id']}").json()["result"]["images"][0])).astype(int)
            alone = gate.real(
                GenerateRequest(["xy"[k]], steps=2, sampler="", seed=5 + k, height=16, width=16)
            )
            assert np.abs(got - np.asarray(alone.images[0])).max() <= 1


def test_a_job_too_big_alone_answers_503_and_the_server_stays_up(model_dir: Path) -> None:  # noqa: F811
    gen = _generator(model_dir)
    _limit(gen, limit=1)
    with TestClient(create_app(gen, ServeSettings())) as c:
        r = c.post("/v1/generate", json={"prompt": "a", **SMALL, "n": 2})
        assert (
            r.status_code == 503
            and "out of device memory generating 2 image(s) at 16x16" in r.json()["detail"]
        )
        assert "Retry-After" in r.headers
        r = c.post(
            "/sdapi/v1/txt2img", json={"prompt": "a", "steps": 2, "width": 16, "height": 16, "batch_size": 2}
        )
        assert r.status_code == 503
        assert c.get("/health").status_code == 200
        assert c.post("/v1/generate", json={"prompt": "a", **SMALL}).status_code == 200
        assert 'eri_errors_total{kind="out_of_memory"} 2.0' in c.get("/metrics").text
