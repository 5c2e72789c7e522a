"""No input is a 500: JSON numbers JSON-the-spec forbids (NaN, Infinity), lone surrogates, broken data
URLs, wrong types and huge values answer 4xx with a message, before any generation runs, and the server
stays healthy. A bounded fuzz runs every field of every endpoint through a fixed list of bad values."""

from __future__ import annotations

import base64
import copy
import io
import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from eridiffusion.inference.generator import Generator, discover_models
from eridiffusion.models import build_family
from eridiffusion.serving import ServeSettings, create_app
from tests.conftest import TINY_OPTIONS

SMALL = {"width": 16, "height": 16, "steps": 2}


def _png() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


IMAGE = _png()


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    root = tmp_path_factory.mktemp("bad_input")
    build_family("tiny", TINY_OPTIONS, seed=0).save_pretrained(root / "models" / "a")
    (root / "loras").mkdir()
    gen = Generator(discover_models([root / "models"]), device="cpu", lora_dirs=[root / "loras"])
    settings = ServeSettings(max_width=64, max_height=64, max_steps=4, max_images=2, max_prompt_chars=100)
    with TestClient(create_app(gen, settings), raise_server_exceptions=False) as c:
        yield c


def _post_raw(client: TestClient, path: str, body: Any) -> Any:
    """POST ``body`` as Python's json writes it: NaN / Infinity literals and escaped lone surrogates."""
    raw = json.dumps(body, allow_nan=True)
    return client.post(path, content=raw.encode(), headers={"content-type": "application/json"})


def _batches(client: TestClient) -> float:
    match = re.search(r"^eri_batch_size_count (\S+)$", client.get("/metrics").text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


@pytest.mark.parametrize(
    ("path", "body", "message"),
    [
        ("/v1/generate", {"prompt": "x", "steps": float("nan")}, "finite number"),
        ("/v1/generate", {"prompt": "x", "width": float("inf")}, "finite number"),
        ("/v1/generate", {"prompt": "x", "strength": float("nan")}, "finite number"),
        ("/v1/generate", {"prompt": "x", "cfg_scale": float("nan"), **SMALL}, "finite number"),
        ("/sdapi/v1/txt2img", {"cfg_scale": float("nan"), "sampler_name": "DDIM", **SMALL}, "finite number"),
        ("/sdapi/v1/img2img", {"init_images": [IMAGE], "denoising_strength": float("nan")}, "finite number"),
        ("/sdapi/v1/options", {"show_progress_every_n_steps": float("-inf")}, "finite number"),
        ("/v1/generate", {"prompt": "x", "cfg_scale": 1e308, **SMALL}, "less than or equal to 100"),
        ("/sdapi/v1/txt2img", {"cfg_scale": -1e308, **SMALL}, "greater than or equal to -100"),
        (
            "/sdapi/v1/txt2img",
            {
                **SMALL,
                "alwayson_scripts": {
                    "controlnet": {"args": [{"model": "m", "image": IMAGE, "weight": 1e308}]}
                },
            },
            "weight 1e+308 is outside",
        ),
        ("/v1/generate", {"prompt": "a \ud800", **SMALL}, "lone UTF-16 surrogate"),
        ("/sdapi/v1/txt2img", {"negative_prompt": "\udfff b", **SMALL}, "lone UTF-16 surrogate"),
        ("/v1/generate", {"prompt": "x", **SMALL, "init_image": "data:image/png;base64"}, "without the ','"),
        ("/sdapi/v1/png-info", {"image": "data:image/png"}, "without the ','"),
        ("/sdapi/v1/png-info", {"image": "data:image/png;base64,!!"}, "not a base64 image"),
    ],
)
def test_bad_values_answer_422_before_anything_runs(
    client: TestClient, path: str, body: dict[str, Any], message: str
) -> None:
    before = _batches(client)
    res = _post_raw(client, path, body)
    assert res.status_code == 422 and message in res.text, res.text
    assert _batches(client) == before


A1111_UNIT = {"enabled": True, "module": "none", "model": "edges", "image": IMAGE, "weight": 1.0}
BODIES: dict[str, dict[str, Any]] = {
    "/v1/generate": {
        "prompt": "a",
        **SMALL,
        "seed": 1,
        "sampler": "ddim",
        "loras": [{"name": "x", "weight": 1.0}],
        "controlnet": {"model": "edges", "image": IMAGE, "scale": 1.0},
    },
    "/v1/jobs": {"prompt": ["a"], **SMALL, "n": 1, "init_image": IMAGE, "strength": 0.5, "mask": IMAGE},
    "/sdapi/v1/txt2img": {
        "prompt": "a",
        **SMALL,
        "seed": 1,
        "sampler_name": "DDIM",
        "batch_size": 1,
        "override_settings": {"sd_model_checkpoint": "a"},
        "alwayson_scripts": {"controlnet": {"args": [A1111_UNIT]}},
    },
    "/sdapi/v1/img2img": {
        "init_images": [IMAGE],
        "mask": IMAGE,
        **SMALL,
        "denoising_strength": 0.5,
        "mask_blur": 1,
        "inpainting_fill": 1,
        "inpaint_full_res_padding": 2,
    },
    "/sdapi/v1/options": {"sd_model_checkpoint": "a", "show_progress_every_n_steps": 2},
    "/sdapi/v1/png-info": {"image": IMAGE},
}
BAD_VALUES: list[Any] = [
    "text",
    "",
    -1,
    0,
    2**70,
    -(2**70),
    1e308,
    float("nan"),
    float("inf"),
    None,
    True,
    [],
    {},
    [None],
    "\ud800",
    "🙂" * 50,
    "x" * 500,
    "data:image/png;base64",
    "data:,",
    "!!!!",
    base64.b64encode(b"not an image").decode(),
    "../../etc/passwd",
]


def _fields(body: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every path into ``body``: keys of objects and indices of lists, nested."""
    items = body.items() if isinstance(body, dict) else enumerate(body) if isinstance(body, list) else ()
    for key, value in items:
        yield (*prefix, key)
        yield from _fields(value, (*prefix, key))


def _with(body: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    out = copy.deepcopy(body)
    node = out
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return out


def test_fuzz_every_field_of_every_endpoint_answers_4xx_with_a_message(client: TestClient) -> None:
    """Each field of each body gets each bad value (plus an unknown field and a non-object body):
    never a 5xx, every 4xx has a non-empty ``detail``; the server still generates afterwards."""
    failures = []
    for path, body in BODIES.items():
        cases = [_with(body, f, v) for f in _fields(body) for v in BAD_VALUES]
        cases += [{**body, "zz_unknown": "x"}, [], "text", 3, None]
        for case in cases:
            res = _post_raw(client, path, case)
            if res.status_code >= 500 or (res.status_code >= 400 and not res.json().get("detail")):
                failures.append(
                    (path, json.dumps(case, allow_nan=True)[:200], res.status_code, res.text[:200])
                )
    for path in ("/sdapi/v1/progress?skip_current_image=maybe", "/v1/jobs/%00", "/v1/jobs/" + "x" * 3000):
        res = client.get(path)
        if res.status_code >= 500:
            failures.append((path, "", res.status_code, res.text[:200]))
    assert not failures, "\n".join(map(str, failures[:20]))
    assert client.get("/health").json()["status"] == "ok"
    ok = client.post("/v1/generate", json={"prompt": "a red circle", **SMALL})
    assert ok.status_code == 200 and len(ok.json()["images"]) == 1
