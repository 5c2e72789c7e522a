"""ControlNet through `eri serve`: the native ``controlnet`` field, the A1111 extension's
``alwayson_scripts`` units and its ``/controlnet/*`` lists, batching and errors, on a tiny SD1.5 model."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from safetensors.torch import save_file

from eridiffusion.inference.controlnet import ControlUnit
from eridiffusion.inference.generate import GenerateRequest
from eridiffusion.inference.generator import Generator, discover_models
from eridiffusion.models import build_family
from eridiffusion.serving import ServeSettings, create_app
from eridiffusion.serving.engine import Job, batch_key
from tests.conftest import TINY_OPTIONS
from tests.families.test_controlnet import random_controlnet, tiny_sd

BASE = {"prompt": "a red circle", "width": 32, "height": 32, "steps": 2, "seed": 3}


def _b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _hint(seed: int) -> str:
    rng = np.random.default_rng(seed)
    return _b64(Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)))


def _pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")).astype(int)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cn")
    family = tiny_sd("sd15")
    family.save_pretrained(root / "models" / "sd")
    build_family("tiny", TINY_OPTIONS, seed=0).save_pretrained(root / "models" / "tiny")
    net = random_controlnet(family)
    net.save_pretrained(root / "controlnets" / "edges")
    state = {k: v.contiguous() for k, v in random_controlnet(family, seed=1).state_dict().items()}
    save_file(state, str(root / "controlnets" / "depth.safetensors"))
    return root


@pytest.fixture
def client(root: Path) -> Iterator[TestClient]:
    generator = Generator(
        discover_models([root / "models"]), device="cpu", controlnet_dirs=[root / "controlnets"]
    )
    with TestClient(create_app(generator, ServeSettings(max_width=64, max_height=64))) as c:
        yield c


def _native(client: TestClient, **extra: Any) -> dict[str, Any]:
    res = client.post("/v1/generate", json={**BASE, "model": "sd", "sampler": "ddim", **extra})
    assert res.status_code == 200, res.text
    return res.json()


def _a1111(client: TestClient, path: str = "txt2img", **extra: Any) -> Any:
    body = {
        **BASE,
        "sampler_name": "DDIM",
        "cfg_scale": 4.0,
        "override_settings": {"sd_model_checkpoint": "sd"},
        **extra,
    }
    return client.post(f"/sdapi/v1/{path}", json=body)


def test_lists(client: TestClient) -> None:
    assert client.get("/controlnet/model_list").json() == {"model_list": ["depth", "edges"]}
    assert client.get("/v1/controlnets").json() == {"controlnets": ["depth", "edges"]}
    assert client.get("/controlnet/module_list").json()["module_list"] == ["none"]


def test_native_controlnet_steers_and_scale_zero_does_not(client: TestClient) -> None:
    plain = _pixels(_native(client)["images"][0])
    unit = {"model": "edges", "image": _hint(0)}
    steered = _native(client, controlnet=unit)
    assert np.abs(_pixels(steered["images"][0]) - plain).max() > 2
    assert 'ControlNet 0: "Module: none, Model: edges, Weight: 1' in steered["parameters"][0]
    other = _native(client, controlnet={**unit, "image": _hint(1)})
    assert np.abs(_pixels(other["images"][0]) - _pixels(steered["images"][0])).max() > 2
    zero = _native(client, controlnet={**unit, "scale": 0.0})
    assert np.array_equal(_pixels(zero["images"][0]), plain)
    # a single-file ControlNet, and two units at once
    both = _native(client, controlnet=[unit, {"model": "depth", "image": _hint(1), "guidance_end": 0.5}])
    assert "ControlNet 1" in both["parameters"][0]


def test_a1111_alwayson_scripts_match_native(client: TestClient) -> None:
    image = _hint(0)
    native = _native(client, cfg_scale=4.0, controlnet={"model": "edges", "image": image, "scale": 0.8})
    units = [
        {"enabled": False, "model": "depth", "image": _hint(1)},
        {"enabled": True, "module": "none", "model": "edges [abc123]", "image": image, "weight": 0.8},
        {"enabled": True, "model": "None"},
    ]
    res = _a1111(client, alwayson_scripts={"controlnet": {"args": units}})
    assert res.status_code == 200, res.text
    out = res.json()
    assert np.array_equal(_pixels(out["images"][0]), _pixels(native["images"][0]))
    info = client.post("/sdapi/v1/png-info", json={"image": out["images"][0]}).json()
    assert info["parameters"]["ControlNet 0"].startswith("Module: none, Model: edges [abc123], Weight: 0.8")
    assert info["parameters"]["Model"] == "sd"
    # img2img: a unit without an image takes the start image ("input_image" is the older field name)
    init = _hint(2)
    for unit in ({"model": "edges"}, {"model": "edges", "input_image": init}):
        res = _a1111(client, "img2img", init_images=[init], alwayson_scripts={"ControlNet": {"args": [unit]}})
        assert res.status_code == 200, res.text


@pytest.mark.parametrize(
    ("unit", "message"),
    [
        ({"model": "edges", "image": "x", "module": "canny"}, "preprocessor 'canny' is not available"),
        ({"model": "edges"}, "ControlNet unit 0 has no image"),
        ({"model": "edges", "image": "IMG", "guidance_start": 0.9, "guidance_end": 0.1}, "start <= end"),
        ({"model": "edges", "image": "IMG", "resize_mode": 2}, "'Resize and Fill' is not supported"),
        ({"model": "edges", "image": "IMG", "control_mode": 2}, "only control_mode 'Balanced'"),
    ],
)
def test_a1111_unit_errors_answer_422(client: TestClient, unit: dict[str, Any], message: str) -> None:
    unit = {k: _hint(0) if v == "IMG" else v for k, v in unit.items()}
    res = _a1111(client, alwayson_scripts={"controlnet": {"args": [unit]}})
    assert res.status_code == 422 and message in res.text, res.text


def test_unknown_controlnet_answers_404(client: TestClient) -> None:
    res = _a1111(client, alwayson_scripts={"controlnet": {"args": [{"model": "nope", "image": _hint(0)}]}})
    assert res.status_code == 404 and res.json() == {"detail": "unknown ControlNet 'nope'"}


def test_native_errors_answer_422(client: TestClient) -> None:
    unit = {"model": "edges", "image": _hint(0)}
    res = client.post(
        "/v1/generate", json={**BASE, "width": 16, "height": 16, "model": "tiny", "controlnet": unit}
    )
    assert res.status_code == 422 and "tiny has no ControlNet support" in res.text
    res = client.post("/v1/generate", json={**BASE, "model": "sd", "controlnet": {**unit, "image": "!!"}})
    assert res.status_code == 422 and "controlnet 0 image is not a base64 image" in res.text
    res = client.post("/v1/generate", json={**BASE, "model": "sd", "controlnet": {"model": "edges"}})
    assert res.status_code == 422


def test_only_equal_controlnet_inputs_share_a_batch() -> None:
    def job(image: torch.Tensor | None, scale: float = 1.0) -> Job:
        controls = [] if image is None else [ControlUnit("edges", image.clone(), scale)]
        return Job(GenerateRequest(prompts=["x"], sampler="ddim", controls=controls), "sd", [])

    a, b = torch.zeros(3, 8, 8), torch.ones(3, 8, 8)
    assert batch_key(job(a)) == batch_key(job(a))
    assert len({batch_key(job(a)), batch_key(job(b)), batch_key(job(None)), batch_key(job(a, 0.5))}) == 4
