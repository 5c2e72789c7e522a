"""eri bench measures a real step: FLOPs counted, timings and memory positive, JSON-serialisable."""

from __future__ import annotations

import json

from eridiffusion.cli import main
from eridiffusion.training.bench import run_bench
from tests.conftest import TINY_OPTIONS


def test_run_bench_reports_a_measured_step() -> None:
    r = run_bench("tiny", TINY_OPTIONS, batch_size=2, resolution=None, steps=1, device_name="cpu")
    assert r.resolution == 16 and r.batch_size == 2 and r.steps == 1
    assert r.flops_per_step > 1e6 and r.step_time_s > 0 and r.samples_per_s > 0
    assert 0 < r.params_trained < r.params_total  # the text encoder is not trained here
    assert r.mfu is None  # no known peak for a CPU


def test_cli_bench_prints_json(capsys) -> None:
    assert main(["bench", "--options", json.dumps(TINY_OPTIONS), "--steps", "1", "--peak-tflops", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["arch"] == "tiny" and out["mfu"] is not None and out["mfu"] > 0
