"""`eri serve`'s app on a tiny model: native API, A1111 surface, auth, limits, queue, concurrency."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import uvicorn
from fastapi.testclient import TestClient
from PIL import Image

from eridiffusion.inference.generate import GenerateRequest
from eridiffusion.inference.generator import Generator, discover_models
from eridiffusion.models import build_family
from eridiffusion.serving import ServeSettings, create_app
from tests.conftest import TINY_OPTIONS
from tests.serving.waits import Gate, bounded, wait_until

SMALL = {"width": 16, "height": 16, "steps": 2}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("serve")
    for seed, name in ((0, "a"), (1, "b")):
        build_family("tiny", TINY_OPTIONS, seed=seed).save_pretrained(root / "models" / name)
    (root / "loras").mkdir()
    return root


def _generator(model_dir: Path) -> Generator:
    return Generator(discover_models([model_dir / "models"]), device="cpu", lora_dirs=[model_dir / "loras"])


@pytest.fixture
def client(model_dir: Path) -> Iterator[TestClient]:
    settings = ServeSettings(max_width=64, max_height=64, max_steps=10, max_images=4, max_prompt_chars=50)
    with TestClient(create_app(_generator(model_dir), settings)) as c:
        yield c


def _image(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_health_openapi_and_metrics(client: TestClient) -> None:
    assert client.get("/health").json()["models"] == ["a", "b"]
    paths = client.get("/openapi.json").json()["paths"]
    for p in ("/v1/generate", "/v1/jobs", "/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/sdapi/v1/options"):
        assert p in paths
    client.post("/v1/generate", json={"prompt": "a red circle", **SMALL, "seed": 1})
    client.post("/v1/generate", json={"prompt": "x", "steps": 999})
    text = client.get("/metrics").text
    assert 'eri_request_latency_seconds_count{endpoint="/v1/generate"} 1.0' in text
    assert "eri_batch_size_count 1.0" in text and "eri_queue_depth 0.0" in text
    assert "eri_model_cache_bytes" in text


def test_native_generate_returns_pngs_with_parameters_and_seeds_reproduce(client: TestClient) -> None:
    body = {
        "prompt": ["a red circle", "a blue square"],
        "n": 2,
        "seed": 11,
        "negative_prompt": "blur",
        **SMALL,
    }
    out = client.post("/v1/generate", json=body).json()
    assert out["seeds"] == [11, 12, 13, 14] and out["model"] == "a" and out["sampler"] == "DDIM"
    images = [_image(b) for b in out["images"]]
    assert images[0].size == (16, 16)
    assert images[2].info["parameters"].startswith("a blue square\nNegative prompt: blur\nSteps: 2")
    again = client.post("/v1/generate", json={**body, "prompt": "a blue square", "n": 1, "seed": 13}).json()
    assert np.array_equal(np.asarray(_image(again["images"][0])), np.asarray(images[2]))
    other = client.post("/v1/generate", json={**body, "model": "b"}).json()
    assert other["model"] == "b" and other["images"][0] != out["images"][0]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"width": 128}, "size above"),
        ({"steps": 11}, "steps 11"),
        ({"n": 5}, "5 images"),
        ({"prompt": "x" * 51}, "longer than 50"),
        ({"sampler": "nope"}, "unknown sampler"),
        ({"width": 17}, "multiple"),
        ({"steps": 0}, "greater than"),
        ({"colour": "red"}, "Extra inputs"),
    ],
)
def test_invalid_requests_answer_422(client: TestClient, body: dict[str, Any], message: str) -> None:
    response = client.post("/v1/generate", json={"prompt": "a red circle", **SMALL, **body})
    assert response.status_code == 422
    assert message in json.dumps(response.json())


def test_api_key_is_required_when_set(model_dir: Path) -> None:
    app = create_app(_generator(model_dir), ServeSettings(api_key="s3cret"))
    with TestClient(app) as c:
        assert c.get("/health").status_code == 200
        assert c.get("/sdapi/v1/sd-models").status_code == 401
        assert c.get("/metrics", headers={"X-API-Key": "wrong"}).status_code == 401
        assert c.get("/sdapi/v1/sd-models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/v1/models", headers={"X-API-Key": "s3cret"}).status_code == 200
        assert c.get("/sdapi/v1/samplers", auth=("user", "s3cret")).status_code == 200


def test_a1111_txt2img_and_png_info(client: TestClient) -> None:
    body = {"prompt": "a red circle", "seed": 3, "sampler_name": "Euler a", "batch_size": 2, "cfg_scale": 5}
    out = client.post(
        "/sdapi/v1/txt2img", json={**body, **SMALL, "styles": [], "restore_faces": False}
    ).json()
    assert len(out["images"]) == 2 and out["parameters"]["prompt"] == "a red circle"
    info = json.loads(out["info"])
    assert info["all_seeds"] == [3, 4] and info["sampler_name"] == "Euler a" and info["sd_model_name"] == "a"
    assert info["infotexts"][1].endswith(
        "Steps: 2, Sampler: Euler a, CFG scale: 5, Seed: 4, Size: 16x16, Model: a"
    )
    png = client.post(
        "/sdapi/v1/png-info", json={"image": "data:image/png;base64," + out["images"][1]}
    ).json()
    assert png["parameters"]["Seed"] == "4" and png["parameters"]["Prompt"] == "a red circle"
    assert client.post("/sdapi/v1/png-info", json={"image": "not base64!"}).status_code == 422
    karras = client.post(
        "/sdapi/v1/txt2img", json={**SMALL, "sampler_name": "DPM++ 2M", "scheduler": "Karras"}
    )
    assert json.loads(karras.json()["info"])["sampler_name"] == "DPM++ 2M Karras"


def test_a1111_options_models_and_lists(client: TestClient) -> None:
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"].startswith("a [")
    assert (
        client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "b.safetensors [abc]"}).status_code
        == 200
    )
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"].startswith("b [")
    info = json.loads(client.post("/sdapi/v1/txt2img", json=SMALL).json()["info"])
    assert info["sd_model_name"] == "b"
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "zzz"}).status_code == 404
    assert [m["model_name"] for m in client.get("/sdapi/v1/sd-models").json()] == ["a", "b"]
    assert "DPM++ 2M Karras" in [s["name"] for s in client.get("/sdapi/v1/samplers").json()]
    assert [s["label"] for s in client.get("/sdapi/v1/schedulers").json()] == ["Automatic", "Karras"]
    assert client.get("/sdapi/v1/loras").json() == []
    idle = client.get("/sdapi/v1/progress").json()
    assert idle["progress"] == 0.0 and idle["state"]["job_count"] == 0
    assert client.post("/sdapi/v1/interrupt").json() == {"interrupted": None}


def test_queue_limit_429_progress_interrupt_and_jobs(model_dir: Path) -> None:
    gen = _generator(model_dir)
    with TestClient(create_app(gen, ServeSettings(max_queue=1))) as c, Gate(gen) as gate:
        running = c.post("/v1/jobs", json={"prompt": "a", **SMALL}).json()
        assert gate.started.wait(10), "the first job never started"
        queued = c.post("/v1/jobs", json={"prompt": "b", **SMALL, "seed": 4})
        assert queued.status_code == 202
        # beyond the limit: answered at once; a queue that took it would block here behind the gate
        full = bounded(
            lambda: c.post("/v1/generate", json={"prompt": "c", **SMALL}), 5, "request over the limit"
        )
        assert full.status_code == 429 and int(full.headers["Retry-After"]) >= 1
        over = bounded(lambda: c.post("/sdapi/v1/txt2img", json=SMALL), 5, "A1111 request over the limit")
        assert over.status_code == 429
        progress = c.get("/sdapi/v1/progress").json()
        assert progress["state"]["job"] == running["id"] and progress["state"]["job_count"] == 2
        assert c.post("/sdapi/v1/interrupt").json() == {"interrupted": running["id"]}
        # interrupted before its first sampling step: no partial images to give, so it ends cancelled
        job_url = f"/v1/jobs/{running['id']}"
        wait_until(lambda: c.get(job_url).json()["state"] == "cancelled", 10, "the interrupted job ending")
        gate.open.set()
        queued_id = queued.json()["id"]
        wait_until(lambda: c.get(f"/v1/jobs/{queued_id}").json()["state"] == "done", 30, "queued job done")
        assert c.get(f"/v1/jobs/{running['id']}").json()["state"] == "cancelled"
        done = c.get(f"/v1/jobs/{queued_id}").json()
        assert done["progress"] == 1.0 and done["result"]["seeds"] == [4]
        assert c.delete("/v1/jobs/nope").status_code == 404
        assert 'eri_errors_total{kind="queue_full"} 2.0' in c.get("/metrics").text


def test_concurrent_requests_over_loopback_are_neither_lost_nor_mixed(model_dir: Path) -> None:
    gen = _generator(model_dir)
    server = uvicorn.Server(
        uvicorn.Config(create_app(gen, ServeSettings(max_queue=16)), port=0, log_level="error")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started, 20, "uvicorn start")
    port = server.servers[0].sockets[0].getsockname()[1]
    prompts = ["a red circle", "a blue square", "a green triangle"]
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:

            def call(i: int) -> tuple[int, dict[str, Any]]:
                body = {"prompt": prompts[i % 3], "seed": 100 + i, **SMALL}
                return i, http.post("/v1/generate", json=body).json()

            start = time.monotonic()
            with ThreadPoolExecutor(6) as pool:
                results = dict(pool.map(call, range(6)))
            assert time.monotonic() - start < 30
    finally:
        server.should_exit = True
        thread.join(10)
    assert len({r["id"] for r in results.values()}) == 6
    for i, r in results.items():
        assert r["seeds"] == [100 + i] and r["prompts"] == [prompts[i % 3]]
        expected = gen.generate(
            GenerateRequest([prompts[i % 3]], steps=2, sampler="", seed=100 + i, height=16, width=16)
        )
        got = np.asarray(_image(r["images"][0])).astype(int)
        # batched with other requests: equal to the image generated alone up to float rounding (1/255)
        assert np.abs(got - np.asarray(expected.images[0])).max() <= 1
        others = [np.asarray(_image(o["images"][0])).astype(int) for j, o in results.items() if j != i]
        assert all(np.abs(got - o).mean() > 10 for o in others)


def _b64png(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_img2img_and_inpaint_native_and_a1111(client: TestClient) -> None:
    rng = np.random.default_rng(0)
    start = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    mask = np.zeros((16, 16), dtype=np.uint8)
    mask[:, :8] = 255  # repaint the left half, keep the right half
    init, mask_b64 = _b64png(start), _b64png(Image.fromarray(mask))
    body = {"prompt": "a red circle", "steps": 4, "seed": 2, "init_image": init}
    low = np.asarray(_image(client.post("/v1/generate", json={**body, "strength": 0.25}).json()["images"][0]))
    high = np.asarray(_image(client.post("/v1/generate", json={**body, "strength": 1.0}).json()["images"][0]))
    ref = np.asarray(start).astype(int)
    assert low.shape == (16, 16, 3) and np.abs(low - ref).mean() < np.abs(high - ref).mean()
    inpaint = client.post("/v1/generate", json={**body, "strength": 1.0, "mask": mask_b64}).json()
    painted = np.asarray(_image(inpaint["images"][0]))
    assert np.array_equal(painted[:, 8:], np.asarray(start)[:, 8:])  # tiny's latents are lossless
    assert not np.array_equal(painted[:, :8], np.asarray(start)[:, :8])
    a1111 = {"init_images": [init], "mask": mask_b64, "inpainting_mask_invert": 1, "mask_blur": 0, "steps": 4}
    out = client.post("/sdapi/v1/img2img", json={**a1111, "width": 16, "height": 16, "seed": 2}).json()
    inverted = np.asarray(_image(out["images"][0]))
    assert np.array_equal(inverted[:, :8], np.asarray(start)[:, :8])
    assert json.loads(out["info"])["denoising_strength"] == 0.75
    assert client.post("/v1/generate", json={**body, "init_image": "%%%"}).status_code == 422
    assert client.post("/v1/generate", json={"prompt": "a", **SMALL, "mask": mask_b64}).status_code == 422
    assert client.post("/sdapi/v1/img2img", json={"init_images": []}).status_code == 422


def test_compatible_waiting_jobs_share_one_batch(model_dir: Path) -> None:
    gen = _generator(model_dir)
    with TestClient(create_app(gen, ServeSettings(max_queue=8))) as c, Gate(gen) as gate:
        first = c.post("/v1/jobs", json={"prompt": "a", **SMALL}).json()
        assert gate.started.wait(10), "the first job never started"
        same = [
            c.post("/v1/jobs", json={"prompt": p, **SMALL, "seed": 20 + k}).json()
            for k, p in enumerate("xyz")
        ]
        other = c.post("/v1/jobs", json={"prompt": "x", **SMALL, "steps": 3}).json()
        gate.open.set()
        ids = [first["id"], *(j["id"] for j in same), other["id"]]
        wait_until(
            lambda: all(c.get(f"/v1/jobs/{i}").json()["state"] == "done" for i in ids), 30, "all jobs done"
        )
        metrics = c.get("/metrics").text
        assert "eri_batch_size_count 3.0" in metrics and "eri_batch_size_sum 5.0" in metrics
        for k, job in enumerate(same):
            result = c.get(f"/v1/jobs/{job['id']}").json()["result"]
            assert result["seeds"] == [20 + k] and result["prompts"] == ["xyz"[k]]
            assert f"Seed: {20 + k}," in result["parameters"][0]
            alone = gate.real(
                GenerateRequest(["xyz"[k]], steps=2, sampler="", seed=20 + k, height=16, width=16)
            )
            got = np.asarray(_image(result["images"][0])).astype(int)
            assert np.abs(got - np.asarray(alone.images[0])).max() <= 1
