"""An unmodified A1111 client against `eri serve`: null means default, the model's own size by default,
A1111's png-info keys, info keys and checkpoint titles, the start-up endpoints, refresh, fields that would
change the image refused instead of ignored, and an interrupted txt2img answered with partial images."""

from __future__ import annotations

import base64
import io
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from eridiffusion.inference.generate import GenerateRequest, StopEarly
from eridiffusion.inference.generator import Generator, discover_models
from eridiffusion.models import build_family
from eridiffusion.serving import ServeSettings, create_app
from tests.conftest import TINY_OPTIONS
from tests.serving.waits import bounded

SMALL = {"width": 16, "height": 16, "steps": 2}
WEBUIAPI_DEFAULTS: dict[str, Any] = {
    "enable_hr": False,
    "denoising_strength": 0.7,
    "firstphase_width": 0,
    "firstphase_height": 0,
    "hr_scale": 2,
    "hr_upscaler": "Latent",
    "hr_second_pass_steps": 0,
    "hr_resize_x": 0,
    "hr_resize_y": 0,
    "prompt": "a red circle",
    "styles": [],
    "seed": -1,
    "subseed": -1,
    "subseed_strength": 0.0,
    "seed_resize_from_h": 0,
    "seed_resize_from_w": 0,
    "sampler_name": None,
    "batch_size": 1,
    "n_iter": 1,
    "steps": 2,
    "cfg_scale": 7.0,
    "width": 16,
    "height": 16,
    "restore_faces": False,
    "tiling": False,
    "do_not_save_samples": False,
    "do_not_save_grid": False,
    "negative_prompt": "",
    "eta": 1.0,
    "s_churn": 0,
    "s_tmax": 0,
    "s_tmin": 0,
    "s_noise": 1,
    "override_settings": {},
    "override_settings_restore_afterwards": True,
    "script_args": [],
    "script_name": None,
    "sampler_index": None,
    "send_images": True,
    "save_images": False,
    "alwayson_scripts": {},
}
"""The txt2img body the webuiapi client sends with its defaults (steps and size made small)."""


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("a1111")
    build_family("tiny", TINY_OPTIONS, seed=0).save_pretrained(root / "models" / "a")
    return root


def _generator(root: Path) -> Generator:
    roots = [root / "models"]
    return Generator(discover_models(roots), device="cpu", model_roots=roots)


@pytest.fixture
def client(root: Path) -> Iterator[TestClient]:
    with TestClient(create_app(_generator(root), ServeSettings(max_width=64, max_height=64))) as c:
        yield c


def _image(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_null_means_default_and_the_size_defaults_to_the_models(client: TestClient) -> None:
    nulls = dict.fromkeys(
        ("prompt", "negative_prompt", "sampler_index", "seed", "override_settings", "alwayson_scripts"), None
    )
    res = client.post("/sdapi/v1/txt2img", json={**nulls, "width": None, "height": None, "steps": 2})
    assert res.status_code == 200, res.text
    assert _image(res.json()["images"][0]).size == (16, 16)  # tiny is trained at 16 px, not 512
    info = json.loads(res.json()["info"])
    assert (info["width"], info["height"], info["sampler_name"]) == (16, 16, "Euler")


def test_webuiapi_default_body_works_and_info_has_the_keys_clients_read(client: TestClient) -> None:
    res = client.post("/sdapi/v1/txt2img", json=WEBUIAPI_DEFAULTS)
    assert res.status_code == 200, res.text
    info = json.loads(res.json()["info"])
    for key in ("sd_model_hash", "index_of_first_image", "extra_generation_params", "styles", "clip_skip"):
        assert key in info, key
    assert info["version"].startswith("eridiffusion") and info["index_of_first_image"] == 0
    title = client.get("/sdapi/v1/options").json()["sd_model_checkpoint"]
    assert title == client.get("/sdapi/v1/sd-models").json()[0]["title"] == f"a [{info['sd_model_hash']}]"
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": title}).status_code == 200


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("enable_hr", True, "hires fix (enable_hr) is not supported"),
        ("styles", ["cinematic"], "prompt styles are not supported"),
        ("subseed_strength", 0.5, "variation seeds"),
        ("restore_faces", True, "face restoration"),
        ("tiling", True, "tiling is not supported"),
        ("script_name", "x/y/z plot", "scripts (script_name)"),
        ("seed_resize_from_w", 64, "seed resize"),
    ],
)
def test_fields_that_would_change_the_image_are_refused(
    client: TestClient, field: str, value: Any, message: str
) -> None:
    for path, extra in (("txt2img", {}), ("img2img", {"init_images": ["x"]})):
        res = client.post(f"/sdapi/v1/{path}", json={**WEBUIAPI_DEFAULTS, **extra, field: value})
        assert res.status_code == 422 and message in res.json()["detail"], res.text


def test_png_info_splits_the_size_as_a1111_does(client: TestClient) -> None:
    out = client.post("/sdapi/v1/txt2img", json={**SMALL, "prompt": "a", "seed": 5}).json()
    params = client.post("/sdapi/v1/png-info", json={"image": out["images"][0]}).json()["parameters"]
    assert (params["Size-1"], params["Size-2"], params["Seed"]) == ("16", "16", "5") and "Size" not in params


def test_start_up_endpoints_answer(client: TestClient) -> None:
    for path in ("sd-vae", "upscalers", "prompt-styles", "hypernetworks", "face-restorers", "script-info"):
        assert client.get(f"/sdapi/v1/{path}").json() == [], path
    assert client.get("/sdapi/v1/embeddings").json() == {"loaded": {}, "skipped": {}}
    assert client.get("/sdapi/v1/scripts").json() == {"txt2img": [], "img2img": []}
    memory = client.get("/sdapi/v1/memory").json()
    assert memory["ram"]["total"] > 0 and "cuda" in memory
    assert client.get("/sdapi/v1/cmd-flags").json()["api"] is True
    for path in ("refresh-loras", "refresh-vae", "skip"):
        assert client.post(f"/sdapi/v1/{path}").status_code == 200, path


def test_refresh_checkpoints_finds_a_new_model(root: Path) -> None:
    with TestClient(create_app(_generator(root))) as c:
        assert [m["model_name"] for m in c.get("/sdapi/v1/sd-models").json()] == ["a"]
        build_family("tiny", TINY_OPTIONS, seed=1).save_pretrained(root / "models" / "b")
        assert c.post("/sdapi/v1/refresh-checkpoints").status_code == 200
        assert [m["model_name"] for m in c.get("/sdapi/v1/sd-models").json()] == ["a", "b"]
        res = c.post("/sdapi/v1/txt2img", json={**SMALL, "override_settings": {"sd_model_checkpoint": "b"}})
        assert res.status_code == 200 and json.loads(res.json()["info"])["sd_model_name"] == "b"


def test_interrupted_txt2img_answers_200_with_the_partial_images(root: Path) -> None:
    gen = _generator(root)
    armed, reached, release = threading.Event(), threading.Event(), threading.Event()
    real = gen.generate

    def paused(*args: Any, **kwargs: Any) -> Any:
        inner = kwargs["on_step"]

        def on_step(i: int, n: int) -> None:
            inner(i, n)
            if i == 2 and armed.is_set():
                reached.set()
                assert release.wait(20), "never released"

        return real(*args, **{**kwargs, "on_step": on_step})

    gen.generate = paused  # type: ignore[method-assign]
    body = {**SMALL, "steps": 8, "prompt": "a red circle", "seed": 3, "sampler_name": "Euler"}
    with TestClient(create_app(gen)) as c:
        full = np.asarray(_image(c.post("/sdapi/v1/txt2img", json=body).json()["images"][0])).astype(int)
        armed.set()
        answer: dict[str, Any] = {}
        thread = threading.Thread(target=lambda: answer.update(res=c.post("/sdapi/v1/txt2img", json=body)))
        thread.start()
        try:
            assert reached.wait(20), "the job never reached step 2"
            assert bounded(lambda: c.post("/sdapi/v1/interrupt"), 5, "interrupt").status_code == 200
            assert c.get("/sdapi/v1/progress").json()["state"]["interrupted"] is True
        finally:
            release.set()
            thread.join(30)
    res = answer["res"]
    assert res.status_code == 200, res.text
    partial = np.asarray(_image(res.json()["images"][0])).astype(int)

    def stop_after_3(i: int, n: int) -> None:
        if i == 3:  # interrupted while paused after step 2: the engine stops at the next step
            raise StopEarly

    req = GenerateRequest(
        ["a red circle"], steps=8, guidance_scale=7.0, sampler="Euler", seed=3, height=16, width=16
    )
    expected = np.asarray(real(req, on_step=stop_after_3).images[0]).astype(int)
    assert np.array_equal(partial, expected) and not np.array_equal(partial, full)
