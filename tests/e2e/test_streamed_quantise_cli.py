"""`eri train` of a LoRA on an int8 base read from an original single file: the base is quantised while it
loads (never held whole in bf16), and training on it is the same, loss for loss, as loading the file whole
and quantising after."""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

import eridiffusion.models as models
from eridiffusion.cli import main
from eridiffusion.models import build_family
from tests.conftest import write_yaml
from tests.e2e.test_flow_cli import flow_job


@contextlib.contextmanager
def _load_whole(*_args: object) -> Iterator[None]:
    """Stands in for ``quantising_loads``: the loaders read as before, and training quantises after."""
    yield


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_lora_on_an_int8_base_streamed_from_a_single_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpoint = tmp_path / "sd3-tiny.safetensors"
    build_family("sd3", {"preset": "tiny"}, seed=1).save_single_file(checkpoint)
    job = flow_job(tmp_path, "sd3")
    job["model"] = {
        "name_or_path": str(checkpoint),
        "dtype": "bf16",
        "quantize": {"weights": "int8", "text_encoders": "int8"},
    }
    job["network"] = {"type": "lora", "linear": 4, "linear_alpha": 4}
    job["train"]["train_text_encoder"] = False
    job["sample"]["prompts"] = []
    job["eval"]["sampler"] = "flow_euler"
    config = write_yaml(tmp_path / "job.yaml", job)
    assert main(["validate", str(config)]) == 0  # planning on the meta device reads and quantises nothing
    with caplog.at_level("INFO"):
        assert main(["train", str(config)]) == 0
    assert re.search(r"transformer: \d+ layers quantised to int8 while loading", caplog.text)
    assert re.search(r"text_encoder_3: \d+ layers quantised to int8 while loading", caplog.text)
    assert "layers quantised to int8, " not in caplog.text  # training did not quantise a second time
    streamed = _losses(tmp_path / "output" / "sd3")
    assert (tmp_path / "output" / "sd3" / "sd3.safetensors").is_file()
    caplog.clear()
    with caplog.at_level("INFO"):  # the adapter as it ships: on the full-precision base
        assert main(["eval", str(config), "--json"]) == 0
    assert "while loading" not in caplog.text

    caplog.clear()
    monkeypatch.setattr(models, "quantising_loads", _load_whole)
    job["output_dir"] = str(tmp_path / "whole")
    with caplog.at_level("INFO"):
        assert main(["train", str(write_yaml(tmp_path / "whole.yaml", job))]) == 0
    assert re.search(r"denoiser: \d+ layers quantised to int8, ", caplog.text)
    assert "while loading" not in caplog.text
    assert _losses(tmp_path / "whole" / "sd3") == streamed
