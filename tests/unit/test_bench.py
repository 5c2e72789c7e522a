"""eri bench measures a real step honestly: CPU attention is counted, model FLOPs leave out the frozen
encoders and checkpoint recomputation (hardware FLOPs keep them), MFU needs a named peak, and the speed
options do what they say."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from eridiffusion.cli import main
from eridiffusion.training.bench import (
    DEVICE_PEAKS,
    _tf32,
    device_peak,
    flop_counter,
    prepare_denoiser,
    run_bench,
)
from tests.conftest import TINY_OPTIONS


def test_cpu_attention_flops_are_counted() -> None:
    b, h, s, d = 1, 2, 8, 4
    q, k, v = (torch.randn(b, h, s, d, requires_grad=True) for _ in range(3))
    with FlopCounterMode(display=False) as plain:
        F.scaled_dot_product_attention(q, k, v)
    with flop_counter() as ours:
        out = F.scaled_dot_product_attention(q, k, v)
    assert plain.get_total_flops() == 0  # torch's counter has no formula for the CPU kernel
    product = 2 * b * h * s * s * d  # one (s x d) @ (d x s) product; a multiply-add is 2 FLOPs
    assert ours.get_total_flops() == 2 * product  # Q K^T, then P V
    with flop_counter() as backward:
        out.sum().backward()
    # torch's formula for flash kernels (the GPU's too): Q K^T recomputed, then dV, dP, dQ, dK
    assert backward.get_total_flops() == 5 * product


def test_model_flops_leave_out_encoders_and_recomputation() -> None:
    plain = run_bench("sd3", {"preset": "tiny"}, 2, None, 1, "cpu", "no", False)
    checkpointed = run_bench("sd3", {"preset": "tiny"}, 2, None, 1, "cpu", "no", True)
    assert plain.model_flops_per_step == checkpointed.model_flops_per_step > 0
    # the frozen VAE / text encoders run in the step: hardware FLOPs count them, model FLOPs do not
    assert plain.hardware_flops_per_step > plain.model_flops_per_step
    # checkpointing recomputes the denoiser's forward in backward: more hardware FLOPs, same model FLOPs
    assert checkpointed.hardware_flops_per_step > plain.hardware_flops_per_step
    assert plain.mfu is None and plain.peak_source is None  # no peak for a CPU


def test_device_peaks_name_their_source() -> None:
    assert device_peak(torch.device("cpu"), torch.bfloat16, None) == (None, None)
    assert device_peak(torch.device("cpu"), None, 50.0) == (50.0, "given with --peak-tflops")
    names = {"NVIDIA H100 PCIe": 756.0, "NVIDIA H100 80GB HBM3": 989.0, "NVIDIA A10": 125.0}
    for name, tflops in {**names, "NVIDIA L40S": 362.0, "NVIDIA A100-SXM4-80GB": 312.0}.items():
        found = next(p for p in DEVICE_PEAKS if p.match in name)
        assert found.tflops == tflops and "datasheet" in found.source


def test_speed_options_change_what_they_should() -> None:
    conv = nn.Sequential(nn.Conv2d(4, 8, 3), nn.Linear(2, 2))
    prepare_denoiser(conv, channels_last=True)
    assert conv[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert not conv[0].weight.is_contiguous()
    prepare_denoiser(conv, compile=True)
    assert conv._compiled_call_impl is not None  # compiled in place: the family keeps calling this object
    before = torch.get_float32_matmul_precision()
    with _tf32(True):
        assert torch.get_float32_matmul_precision() == "high"
    assert torch.get_float32_matmul_precision() == before


@pytest.mark.parametrize("flags", [[], ["--channels-last", "--tf32"]])
def test_cli_bench_prints_json(capsys: pytest.CaptureFixture[str], flags: list[str]) -> None:
    args = ["bench", "--options", json.dumps(TINY_OPTIONS), "--steps", "1", "--peak-tflops", "1", *flags]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["arch"] == "tiny" and out["mfu"] is not None and out["mfu"] > 0
    assert out["model_flops_per_step"] > 1e6 and out["hardware_flops_per_step"] >= out["model_flops_per_step"]
    assert out["peak_source"] == "given with --peak-tflops"
    assert out["channels_last"] == ("--channels-last" in flags) and out["tf32"] == ("--tf32" in flags)
    assert 0 < out["params_trained"] < out["params_total"]  # the text encoder is not trained here
