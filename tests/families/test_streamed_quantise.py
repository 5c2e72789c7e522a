"""Quantise while loading (``models.streamed_loading``): the streamed model is the load-then-quantise model,
tensor for tensor, from diffusers folders and original single files of the tiny presets, for torchao int8 /
fp8 and bitsandbytes nf4 on the CPU; and the live tensor bytes while loading stay well under the bf16 size,
where loading first and quantising after passes it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import FluxTransformer2DModel
from safetensors.torch import load_file, save_file
from torch import nn

from eridiffusion.config.schema import ModelConfig
from eridiffusion.models import build_family, load_family
from eridiffusion.models.flux import FluxFamily
from eridiffusion.models.lazy_weights import LazyTensor, materialize
from eridiffusion.models.protocol import ModelFamily
from eridiffusion.models.quantize import quantised_layers, quantize_module
from eridiffusion.models.stable_diffusion import load_preset
from eridiffusion.models.streamed_loading import load_pretrained, quantising_loads, read_single_file
from eridiffusion.training.memory_trace import LiveMemory


class HostBytes(LiveMemory):
    """Live bytes of real tensors, counted once per storage: meta and lazy stand-ins hold no memory, and a
    quantised weight's wrapper tensor is counted through its inner tensors (also operator outputs)."""

    def __init__(self) -> None:
        super().__init__(block=1)

    def _add(self, t: torch.Tensor, category: str, nbytes: int | None = None) -> None:
        if t.is_meta or isinstance(t, LazyTensor) or hasattr(t, "__tensor_flatten__"):
            return
        super()._add(t, category, nbytes)


def _payload(t: torch.Tensor) -> list[torch.Tensor]:
    """The stored tensors behind ``t`` (a torchao weight's int8/fp8 data and scales)."""
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return [x for n in names for x in _payload(getattr(t, n))]
    return [t]


def _assert_same(a: nn.Module, b: nn.Module, what: str) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys(), f"{what}: {sorted(set(sa) ^ set(sb))[:4]}"
    for key, x in sa.items():
        y = sb[key]
        assert type(x) is type(y) and x.dtype == y.dtype, f"{what}.{key}: {type(x)} {x.dtype} / {type(y)}"
        for px, py in zip(_payload(x), _payload(y), strict=True):
            assert torch.equal(px, py), f"{what}.{key} differs"


def _predict(family: ModelFamily) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    noisy = torch.randn((1, *family.latent_shape(32, 32)), generator=gen)
    with torch.no_grad():
        cond = family.encode_prompt(["a red circle"])
        return family.predict(noisy, torch.tensor([500]), cond).float()


def _saved(arch: str, layout: str, root: Path) -> tuple[Path, dict[str, Any]]:
    """The tiny preset written as a diffusers folder or an original single file (Flux's holds only the
    transformer: its VAE and text encoders then come from the folder, as with BFL's release)."""
    family = build_family(arch, {"preset": "tiny"}, seed=0)
    family.save_pretrained(root / "folder")
    if layout == "folder":
        return root / "folder", {}
    family.save_single_file(root / "model.safetensors")
    extra = (
        {k: str(root / "folder") for k in ("vae_path", "clip_l_path", "t5_path")} if arch == "flux" else {}
    )
    return root / "model.safetensors", extra


@pytest.mark.parametrize(
    ("arch", "layout", "kind"),
    [
        ("flux", "single", "int8"),
        ("flux", "folder", "nf4"),
        ("sd3", "single", "int8"),
        ("sd3", "folder", "fp8"),
        ("sdxl", "single", "nf4"),
        ("sdxl", "folder", "int8"),
    ],
)
def test_streamed_model_equals_load_then_quantise(arch: str, layout: str, kind: str, tmp_path: Path) -> None:
    path, extra = _saved(arch, layout, tmp_path)
    streamed = load_family(
        path, ModelConfig(dtype="bf16", quantize=kind, quantize_text_encoders=kind, **extra)
    )
    eager = load_family(path, ModelConfig(dtype="bf16", **extra))
    for name, module in eager.modules().items():
        if name != "vae":
            quantize_module(module, kind)
    for name, module in eager.modules().items():
        assert (quantised_layers(streamed.modules()[name]) > 0) == (name != "vae"), name
        _assert_same(module, streamed.modules()[name], name)
    if kind != "nf4":  # bitsandbytes' CPU 4-bit matmul needs wider layers than the tiny presets have
        assert torch.equal(_predict(streamed), _predict(eager))


def test_only_the_named_components_are_quantised(tmp_path: Path) -> None:
    """The rest of a single file streams too (it is read lazily) but loads exactly as before, down to the
    family's own casts: T5's ``wo`` projections stay fp32 under fp16."""
    path, _ = _saved("sd3", "single", tmp_path)
    family = load_family(path, ModelConfig(dtype="fp16", quantize="int8"))
    eager = load_family(path, ModelConfig(dtype="fp16"))
    counts = {name: quantised_layers(m) for name, m in family.modules().items()}
    assert counts["denoiser"] > 0 and sum(counts.values()) == counts["denoiser"]
    for name, module in eager.modules().items():
        if name != "denoiser":
            _assert_same(module, family.modules()[name], name)
    t5 = family.modules()["text_encoder_3"]
    assert {p.dtype for n, p in t5.named_parameters() if ".wo." in n} == {torch.float32}


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """A Flux transformer with 3 double and 6 single blocks (width 128), saved in bf16; its bf16 bytes."""
    config = dict(load_preset("flux", "tiny")["transformer"])
    config.update(num_layers=3, num_single_layers=6, num_attention_heads=4, attention_head_dim=32)
    config["axes_dims_rope"] = [8, 12, 12]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = FluxTransformer2DModel.from_config(config).to(torch.bfloat16)
    folder = tmp_path_factory.mktemp("flux_blocks")
    model.save_pretrained(folder)
    return folder, sum(p.numel() * p.element_size() for p in model.parameters())


@pytest.mark.parametrize(("kind", "limit"), [("int8", 0.75), ("nf4", 0.5)])
def test_peak_bytes_while_loading_stay_below_the_bf16_size(
    kind: str, limit: float, flux_folder: tuple[Path, int]
) -> None:
    folder, bf16 = flux_folder
    streamed = HostBytes()
    with quantising_loads(kind, "none", torch.bfloat16), streamed:
        model = load_pretrained(FluxTransformer2DModel, folder, "transformer", torch.bfloat16, None)
    eager = HostBytes()
    with eager:
        whole = FluxTransformer2DModel.from_pretrained(folder, torch_dtype=torch.bfloat16)
        quantize_module(whole, kind)
    assert quantised_layers(model) == quantised_layers(whole) == 3 * 12 + 6 * 7  # q/k/v/out/MLP, per stream
    print(f"{kind}: peak {streamed.peak / bf16:.2f} x bf16 streamed, {eager.peak / bf16:.2f} x loaded whole")
    assert streamed.peak < limit * bf16 < eager.peak
    assert abs(streamed.current - eager.current) < 0.01 * bf16  # the same model in the end


def test_single_file_streams_too(tmp_path: Path) -> None:
    """An fp32 original-layout file (fused q/k/v/MLP tensors): the streamed peak is under the bf16 size,
    while reading the file whole costs its fp32 size plus the bf16 copy."""
    path, _ = _saved("flux", "single", tmp_path)
    skip = {s.module for s in FluxFamily.slots}
    peaks = {}
    for kind in ("none", "int8"):
        live = HostBytes()
        with quantising_loads(kind, "none", torch.bfloat16), live:
            parts = FluxFamily._from_single_file(path, torch.bfloat16, skip_vae=True, skip_text=skip)
        peaks[kind] = live.peak
    bf16 = sum(p.numel() * 2 for p in load_file(str(path)).values())
    assert quantised_layers(parts.transformer) > 0
    assert peaks["int8"] < bf16 < peaks["none"]


def test_missing_weights_name_the_folder(flux_folder: tuple[Path, int], tmp_path: Path) -> None:
    folder, _ = flux_folder
    broken = tmp_path / "transformer"
    broken.mkdir()
    (broken / "config.json").write_text((folder / "config.json").read_text())
    state = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    del state["proj_out.weight"]
    save_file(state, str(broken / "diffusion_pytorch_model.safetensors"))
    match = rf"{broken}: the weights have no proj_out.weight"
    with quantising_loads("int8", "none", torch.bfloat16), pytest.raises(ValueError, match=match):
        load_pretrained(FluxTransformer2DModel, broken, "transformer", torch.bfloat16, None)


def test_unreadable_files_are_named(tmp_path: Path) -> None:
    good = tmp_path / "good.safetensors"
    save_file({"w": torch.ones(64, 64)}, str(good))
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(good.read_bytes()[:-100])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\xff" * 64)
    with quantising_loads("int8", "none", torch.bfloat16):
        state = read_single_file(truncated)
        with pytest.raises(ValueError, match=rf"'{truncated}' is truncated: w ends past the end"):
            materialize(state["w"])
        with pytest.raises(ValueError, match=rf"'{garbage}' is not a readable .safetensors file"):
            read_single_file(garbage)
        assert torch.equal(materialize(read_single_file(good)["w"]), torch.ones(64, 64))


@pytest.mark.parametrize("variant", [None, "fp16"])
def test_sharded_and_variant_folders_stream(
    variant: str | None, flux_folder: tuple[Path, int], tmp_path: Path
) -> None:
    """Shards listed by the folder's index file (``*.safetensors.index[.fp16].json``), ``fp16`` variants."""
    whole = FluxTransformer2DModel.from_pretrained(flux_folder[0], torch_dtype=torch.bfloat16)
    whole.save_pretrained(tmp_path, max_shard_size="2MB", variant=variant)
    assert len(list(tmp_path.glob("*.safetensors"))) > 3 and list(tmp_path.glob("*.index*.json"))
    with quantising_loads("int8", "none", torch.bfloat16):
        streamed = load_pretrained(FluxTransformer2DModel, tmp_path, "transformer", torch.bfloat16, variant)
    quantize_module(whole, "int8")
    _assert_same(whole, streamed, "transformer")
