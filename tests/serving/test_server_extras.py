"""`eri serve` extras on tiny models: A1111 inpaint options, model hashes, live previews, memory gauges and
graceful shutdown."""

from __future__ import annotations

import base64
import hashlib
import io
import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import uvicorn
from fastapi.testclient import TestClient
from PIL import Image

from eridiffusion.inference.generator import Generator, discover_models
from eridiffusion.models import build_family
from eridiffusion.serving import ServeSettings, create_app
from tests.conftest import TINY_OPTIONS
from tests.serving.waits import wait_until

SIZE, LO, HI = 64, 24, 40
"""Images are SIZE px square; the inpainting mask is the square [LO, HI) x [LO, HI)."""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("serve_extras")
    build_family("tiny", TINY_OPTIONS, seed=0).save_pretrained(root / "models" / "a")
    build_family("sd15", {"preset": "tiny"}, seed=0).save_single_file(root / "models" / "one.safetensors")
    return root


def _generator(model_dir: Path) -> Generator:
    return Generator(discover_models([model_dir / "models"]), device="cpu")


@pytest.fixture
def client(model_dir: Path) -> Iterator[TestClient]:
    with TestClient(create_app(_generator(model_dir), ServeSettings(max_queue=8))) as c:
        yield c


def _b64png(array: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _image(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64)))).astype(int)


START = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
MASK = np.zeros((SIZE, SIZE), dtype=np.uint8)
MASK[LO:HI, LO:HI] = 255


def _inpaint(client: TestClient, model: str = "a", **options: Any) -> np.ndarray:
    """A1111 inpainting; ``a`` is tiny (lossless packed latents), ``one`` an SD1.5 with a lossy VAE."""
    body = {
        "init_images": [_b64png(START)],
        "mask": _b64png(MASK),
        "prompt": "a red circle",
        "width": SIZE,
        "height": SIZE,
        "steps": 4,
        "seed": 2,
        "denoising_strength": 0.6,
        "mask_blur": 0,
        "inpainting_fill": 1,
        "inpaint_full_res": False,
        "override_settings": {"sd_model_checkpoint": model},
        **options,
    }
    response = client.post("/sdapi/v1/img2img", json=body)
    assert response.status_code == 200, response.text
    return _image(response.json()["images"][0])


def _distance_to_mask() -> np.ndarray:
    """Chebyshev distance of each pixel to the masked square."""
    ys, xs = np.mgrid[:SIZE, :SIZE]
    return np.maximum(np.maximum(LO - ys, ys - HI + 1), np.maximum(LO - xs, xs - HI + 1)).clip(0)


def test_mask_blur_softens_the_paste_around_the_mask_only(client: TestClient) -> None:
    """On SD1.5 the kept latents decode to other pixels than the start image's, so the blurred paste
    shows: generated pixels blend in around the mask, within the blur kernel's reach only."""
    sharp = _inpaint(client, "one")
    soft = _inpaint(client, "one", mask_blur=2)
    start, dist = START.astype(int), _distance_to_mask()
    assert np.array_equal(sharp[dist > 0], start[dist > 0])  # no blur: only the mask changes
    ring = (dist > 0) & (dist <= 2)
    assert np.abs(soft[ring] - start[ring]).mean() > 2  # the blurred edge blends generated pixels in
    far = dist > int(2.5 * 2 + 0.5)
    assert np.array_equal(soft[far], start[far])  # beyond the kernel nothing moves
    x_only = _inpaint(client, "one", mask_blur=None, mask_blur_x=2, mask_blur_y=0)
    cols = np.mgrid[:SIZE, :SIZE][1]
    above = (cols >= LO) & (cols < HI) & (dist > 0)  # straight above/below the square: no vertical blur
    assert np.array_equal(x_only[above], start[above])


def test_fill_modes_start_the_masked_area_differently(client: TestClient) -> None:
    results = [_inpaint(client, inpainting_fill=k) for k in range(4)]
    inside = _distance_to_mask() == 0
    for i in range(4):
        for j in range(i + 1, 4):
            assert np.abs(results[i][inside] - results[j][inside]).mean() > 1, (i, j)
        assert np.array_equal(results[i][~inside], START.astype(int)[~inside])
    # "fill" paints the hole with the colours around it before denoising; the start image's own hole
    # content survives more under "original"
    hole = START.astype(int)[inside]
    assert np.abs(results[1][inside] - hole).mean() < np.abs(results[0][inside] - hole).mean()
    assert (
        client.post("/sdapi/v1/img2img", json={"init_images": ["x"], "inpainting_fill": 4}).status_code == 422
    )


def test_only_masked_leaves_everything_outside_the_padded_box_bit_exact(client: TestClient) -> None:
    whole = _inpaint(client, "one", mask_blur=2)
    only = _inpaint(client, "one", mask_blur=2, inpaint_full_res=True, inpaint_full_res_padding=4)
    start, dist = START.astype(int), _distance_to_mask()
    outside_box = dist > int(2.5 * 2 + 0.5) + 4
    assert outside_box.sum() > 0 and np.array_equal(only[outside_box], start[outside_box])
    inside = dist == 0
    assert np.abs(only[inside] - start[inside]).mean() > 5
    assert np.abs(only[inside] - whole[inside]).mean() > 1  # the crop was inpainted at ~3.5x the pixels


def test_sd_models_lists_hashes_of_files_and_folders_computed_once(
    client: TestClient, model_dir: Path
) -> None:
    models = {m["model_name"]: m for m in client.get("/sdapi/v1/sd-models").json()}
    single = model_dir / "models" / "one.safetensors"
    sha = hashlib.sha256(single.read_bytes()).hexdigest()
    assert models["one"]["sha256"] == sha and models["one"]["hash"] == sha[:10]
    assert models["one"]["title"] == f"one [{sha[:10]}]"
    folder = models["a"]
    assert re.fullmatch(r"[0-9a-f]{64}", folder["sha256"]) and folder["hash"] == folder["sha256"][:10]
    hashes = client.app.state.server.hashes  # type: ignore[attr-defined]
    computed = hashes.computed
    assert client.get("/sdapi/v1/sd-models").json()[0]["sha256"] == folder["sha256"]
    assert hashes.computed == computed  # cached
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": folder["title"]}).status_code == 200
    # a changed weight file (new mtime and size) is hashed again, to a new value
    weights = sorted((model_dir / "models" / "a").rglob("*.safetensors"))[0]
    backup = weights.read_bytes()
    try:
        weights.write_bytes(backup + b"\0")
        changed = {m["model_name"]: m for m in client.get("/sdapi/v1/sd-models").json()}["a"]
        assert changed["sha256"] != folder["sha256"] and hashes.computed == computed + 1
    finally:
        weights.write_bytes(backup)
        os.utime(weights)


class _Pause:
    """Wraps Generator.generate so the job stops inside ``on_step`` at ``step`` until released."""

    def __init__(self, gen: Generator, step: int) -> None:
        self.reached, self.release = threading.Event(), threading.Event()
        self.real, self.step = gen.generate, step
        gen.generate = self  # type: ignore[method-assign]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        inner = kwargs["on_step"]

        def on_step(i: int, n: int) -> None:
            inner(i, n)
            if i == self.step:
                self.reached.set()
                assert self.release.wait(30)

        return self.real(*args, **{**kwargs, "on_step": on_step})


def test_live_preview_in_progress_while_a_job_runs(model_dir: Path) -> None:
    gen = _generator(model_dir)
    pause = _Pause(gen, step=3)
    with TestClient(create_app(gen)) as c:
        assert c.get("/sdapi/v1/options").json()["live_previews_enable"] is False
        job = c.post("/v1/jobs", json={"prompt": "a", "steps": 6, "width": 16, "height": 16, "model": "a"})
        assert pause.reached.wait(30)
        assert c.get("/sdapi/v1/progress").json()["current_image"] is None  # previews are opt-in
        pause.release.set()
        _wait_done(c, job.json()["id"])

        options = {"live_previews_enable": True, "show_progress_every_n_steps": 1}
        assert c.post("/sdapi/v1/options", json=options).json()["live_previews_enable"] is True
        pause.reached.clear()
        pause.release.clear()
        job = c.post("/v1/jobs", json={"prompt": "a", "steps": 6, "width": 16, "height": 16, "model": "a"})
        assert pause.reached.wait(30)
        progress = c.get("/sdapi/v1/progress").json()
        assert progress["state"]["sampling_step"] == 3
        preview = Image.open(io.BytesIO(base64.b64decode(progress["current_image"])))
        assert preview.size == (16, 16)
        skipped = c.get("/sdapi/v1/progress", params={"skip_current_image": True}).json()
        assert skipped["current_image"] is None and skipped["state"]["sampling_step"] == 3
        pause.release.set()
        _wait_done(c, job.json()["id"])
        assert c.get("/sdapi/v1/progress").json()["current_image"] is None  # idle


def _wait_done(c: TestClient, job_id: str) -> None:
    finished = ("done", "failed", "cancelled")
    wait_until(lambda: c.get(f"/v1/jobs/{job_id}").json()["state"] in finished, 30, f"job {job_id}")


def _gauge(text: str, name: str) -> float:
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert match, name
    return float(match.group(1))


def test_memory_gauges(client: TestClient) -> None:
    assert _gauge(client.get("/metrics").text, "eri_model_cache_bytes") == 0
    client.post("/v1/generate", json={"prompt": "a", "steps": 2, "width": 16, "height": 16, "model": "a"})
    text = client.get("/metrics").text
    server = client.app.state.server  # type: ignore[attr-defined]
    assert _gauge(text, "eri_model_cache_bytes") == server.generator.cache.total_bytes > 0
    assert 10 * 2**20 < _gauge(text, "eri_process_resident_bytes") < 64 * 2**30
    assert ("eri_cuda_allocated_bytes" in text) == ("eri_cuda_reserved_bytes" in text)


def test_graceful_shutdown_finishes_accepted_jobs_and_refuses_new_ones(model_dir: Path) -> None:
    gen = _generator(model_dir)
    real = gen.generate

    def slow(*args: Any, **kwargs: Any) -> Any:
        inner = kwargs["on_step"]

        def on_step(i: int, n: int) -> None:
            time.sleep(0.15)
            inner(i, n)

        return real(*args, **{**kwargs, "on_step": on_step})

    gen.generate = slow  # type: ignore[method-assign]
    app = create_app(gen, ServeSettings(max_queue=8))
    server = uvicorn.Server(uvicorn.Config(app, port=0, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started, 20, "uvicorn start")
    port = server.servers[0].sockets[0].getsockname()[1]
    body = {"prompt": "a", "steps": 5, "width": 16, "height": 16, "model": "a"}
    queue = app.state.server.queue
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
        background = [http.post("/v1/jobs", json={**body, "seed": s}).json()["id"] for s in (1, 2)]
        waiting: dict[str, Any] = {}
        in_flight = threading.Thread(
            target=lambda: waiting.update(http.post("/v1/generate", json={**body, "seed": 3}).json())
        )
        in_flight.start()
        wait_until(lambda: queue.current is not None, 30, "a job running")
        server.should_exit = True
        # the drain starts once open connections are done: from then on new work answers 503
        wait_until(lambda: queue.closing, 30, "shutdown draining")
        refused = TestClient(app).post("/v1/generate", json=body)  # in-process: the socket is closed
        assert refused.status_code == 503 and "shutting down" in refused.text
        assert TestClient(app).get("/health").status_code == 503
        in_flight.join(30)
        thread.join(30)
    assert not in_flight.is_alive(), "the in-flight request was not answered within 30 s"
    assert not thread.is_alive(), "the server did not stop within 30 s"
    assert waiting["seeds"] == [3] and len(waiting["images"]) == 1  # the in-flight request was answered
    for job_id in background:
        job = queue.jobs[job_id]
        assert job.state == "done" and len(job.future.result().images) == 1
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
