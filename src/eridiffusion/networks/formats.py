"""Adapter files: kohya-style (ComfyUI, A1111/Forge, diffusers all read it) and diffusers/peft layouts.

kohya keys are ``<prefix>_<module path with dots as underscores>.<tensor>``, e.g.
``lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight`` with a scalar
``.alpha`` beside it so loaders scale the update by alpha/rank. LoHa/LoKr tensors keep their LyCORIS names
(``hada_w1_a``, ``lokr_w1``...), DoRA adds ``dora_scale``. The family decides the prefix and module naming
(:meth:`ModelFamily.lora_key_names`), so SDXL/Flux can use the layouts their loaders expect.

Files trained on a model's original layout (kohya's Flux ``lora_unet_double_blocks_0_img_attn_qkv``, BFL's
fused q/k/v) load through the family's :class:`~eridiffusion.models.protocol.AdapterAliases`: each fused
layer's LoRA is split by output rows into LoRAs of the diffusers layers it stands for (:func:`split_fused`),
so applying, converting and continuing training see only our own layers.

Applying a file for inference merges ``weight x delta`` into the base weights with the small pure functions
below (one per adapter kind), so any file whose layers we recognise works, whatever tool wrote it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as save_bytes
from safetensors.torch import save_file
from torch import nn

from eridiffusion.models.protocol import AdapterAliases, FusedLayer, ModelFamily
from eridiffusion.networks.compat import compatibility_warnings
from eridiffusion.networks.layouts import original_layout_tensors, swap_halves
from eridiffusion.networks.metadata import weight_hashes
from eridiffusion.networks.peft_scales import adapter_weights_file, folder_scales, header_scales, scale_alpha

logger = logging.getLogger(__name__)
_WARNED: set[str] = set()

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# peft parameter name -> kohya/LyCORIS tensor name
_PEFT_TO_KOHYA = {
    "lora_A.weight": "lora_down.weight",
    "lora_B.weight": "lora_up.weight",
    "lora_magnitude_vector": "dora_scale",
    **{n: n for n in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")},
    **{n: n for n in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")},
}
_KOHYA_TO_PEFT = {v: k for k, v in _PEFT_TO_KOHYA.items()}


@dataclass
class ModuleAdapter:
    """One adapted layer: its tensors in kohya names, alpha, and the kind they imply."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    alpha: float | None = None

    @property
    def kind(self) -> str:
        names = set(self.tensors)
        if any(n.startswith("hada_") for n in names):
            return "loha"
        if any(n.startswith("lokr_") for n in names):
            return "lokr"
        return "dora" if "dora_scale" in names else "lora"

    @property
    def rank(self) -> int:
        t = self.tensors
        if "lora_down.weight" in t:
            return t["lora_down.weight"].shape[0]
        if "hada_w1_b" in t:
            return t["hada_w1_b"].shape[0]
        for name in ("lokr_w2_a", "lokr_w1_a"):
            if name in t:
                return t[name].shape[1]
        return 1

    def scale(self) -> float:
        """alpha / rank, the multiplier kohya-format loaders apply; 1 when no alpha is stored."""
        if self.alpha is None:
            return 1.0
        if self.kind == "lokr" and "lokr_w2_a" not in self.tensors and "lokr_w1_a" not in self.tensors:
            return 1.0  # LyCORIS: full-matrix LoKr factors are not rank-scaled
        return self.alpha / self.rank


@dataclass
class AdapterFile:
    """An adapter file mapped onto a family: ``(component, module path) -> ModuleAdapter``."""

    modules: dict[tuple[str, str], ModuleAdapter]
    metadata: dict[str, str]
    unmatched: list[str]


_ADAPTER_PARTS = ("lora_", "hada_", "lokr_")


def is_adaptable(component: str) -> bool:
    """Adapters live in the denoiser and the text encoders (never in VAEs), as in every LoRA format."""
    return component == "denoiser" or component.startswith("text_encoder")


def _layers(family: ModelFamily) -> dict[tuple[str, str], nn.Module]:
    """Every Linear/Conv2d by (component, path); peft's wrappers and adapter sub-layers are looked through."""
    found = {}
    for component, module in family.modules().items():
        if not is_adaptable(component):
            continue
        for path, layer in module.named_modules():
            if not isinstance(layer, nn.Linear | nn.Conv2d):
                continue
            if any(part.startswith(_ADAPTER_PARTS) for part in path.split(".")):
                continue
            found[(component, path.replace(".base_layer", ""))] = layer
    return found


def _split_peft_key(key: str) -> tuple[str, str, str]:
    """``component.path.lora_A.weight`` -> (component, path, ``lora_A.weight``)."""
    component, _, rest = key.partition(".")
    for suffix in sorted(_PEFT_TO_KOHYA, key=len, reverse=True):
        if rest.endswith("." + suffix):
            return component, rest[: -len(suffix) - 1], suffix
    raise ValueError(f"not an adapter tensor name: {key!r}")


def _dora_to_kohya(magnitude: torch.Tensor) -> torch.Tensor:
    """peft keeps (out,) for Linear and (1, out, 1, 1) for Conv2d; kohya/ComfyUI expect (out, 1[, 1, 1])."""
    out = magnitude.numel()
    return magnitude.reshape(out, 1) if magnitude.dim() == 1 else magnitude.reshape(out, 1, 1, 1)


def _dora_to_peft(scale: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    return scale.reshape(-1) if isinstance(layer, nn.Linear) else scale.reshape(1, -1, 1, 1)


def _full_lokr(module_tensors: set[str]) -> bool:
    """LoKr with both factors stored whole: kohya/ComfyUI apply no alpha/rank scale to those."""
    return any(n.startswith("lokr_") for n in module_tensors) and not any(
        n.endswith(("_a", "_b")) for n in module_tensors if n.startswith("lokr_")
    )


def save_adapter(
    family: ModelFamily,
    state: dict[str, torch.Tensor],
    alphas: dict[tuple[str, str], tuple[float, int]],
    path: Path,
    fmt: str,
    dtype: str,
    metadata: dict[str, str],
) -> Path:
    """Write ``state`` (peft-named, from :func:`adapter_state`) as a kohya or diffusers file, atomically."""
    out: dict[str, torch.Tensor] = {}
    params_of: dict[tuple[str, str], set[str]] = {}
    for key in state:
        component, module_path, param = _split_peft_key(key)
        params_of.setdefault((component, module_path), set()).add(param)
    original: set[tuple[str, str]] = set()
    if fmt == "kohya" and all(p == {"lora_A.weight", "lora_B.weight"} for p in params_of.values()):
        # plain LoRA: Flux/SD3 layers in sd-scripts' original-layout names (what diffusers, ComfyUI and
        # Forge all read); LyCORIS kinds keep our per-layer names, which fused layers cannot hold
        loras = {
            (c, m): (state[f"{c}.{m}.lora_A.weight"], state[f"{c}.{m}.lora_B.weight"]) for c, m in params_of
        }
        fused, original = original_layout_tensors(family, _layers(family), loras, alphas)
        out.update(fused)
    for key, value in state.items():
        component, module_path, param = _split_peft_key(key)
        if (component, module_path) in original:
            continue
        kohya_base, diffusers_base = family.lora_key_names(component, module_path)
        alpha, rank = alphas[(component, module_path)]
        if fmt == "kohya":
            tensor = _dora_to_kohya(value) if param == "lora_magnitude_vector" else value
            if param == "lokr_w2" and _full_lokr(params_of[(component, module_path)]):
                tensor = tensor * (alpha / rank)  # peft scales full LoKr by alpha/r; the format does not
            out[f"{kohya_base}.{_PEFT_TO_KOHYA[param]}"] = tensor
            out[f"{kohya_base}.alpha"] = torch.tensor(float(alpha))
        elif fmt == "diffusers":
            if param not in ("lora_A.weight", "lora_B.weight"):
                raise ValueError("save.format: diffusers holds plain LoRA only; use kohya for loha/lokr/dora")
            # diffusers applies no alpha: fold alpha/rank into lora_B so the file means the same thing
            factor = alpha / rank if param == "lora_B.weight" else 1.0
            out[f"{diffusers_base}.{param}"] = value * factor
        else:
            raise ValueError(f"unknown adapter format {fmt!r}; use kohya or diffusers")
    out = {k: v.detach().to(DTYPES[dtype]).contiguous().cpu() for k, v in out.items()}
    for note in compatibility_warnings(fmt, out):
        if note not in _WARNED:  # once per process, not at every checkpoint
            _WARNED.add(note)
            logger.warning("%s: %s", path.name, note)
    meta = {**metadata, "format": "pt", "eri_format": fmt}
    if any(k.startswith("ss_") for k in meta):  # kohya-style files carry hashes of these very weights
        training = {k: v for k, v in meta.items() if k.startswith("ss_")}
        meta.update(weight_hashes(save_bytes(out, metadata=training)))
    tmp = path.with_name(f".tmp-{path.name}")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, tmp, metadata=meta)
    tmp.replace(path)
    return path


def _alias_index(family: ModelFamily, layers: dict[tuple[str, str], nn.Module]) -> dict[str, FusedLayer]:
    """The family's original-layout adapter names whose layers this model has (schnell has no guidance
    embedder, a smaller model fewer blocks: their names stay unmatched and are reported)."""
    if not isinstance(family, AdapterAliases):
        return {}
    return {
        name: target
        for name, target in family.adapter_aliases().items()
        if all((target.component, p) in layers for p in target.module_paths)
    }


def _drop_unused_rank(
    up: torch.Tensor, down: torch.Tensor, alpha: float | None
) -> tuple[torch.Tensor, torch.Tensor, float | None]:
    """A part of a block-diagonal fused LoRA (kohya's ``split_qkv`` files store q/k/v as one rank-3r LoRA
    whose ``up`` is zero outside each part's r columns) kept at its own rank; alpha follows the rank so
    alpha/rank, and with it the update, is unchanged."""
    if up.dim() != 2:
        return up, down, alpha
    used = up.abs().sum(dim=0) != 0
    if bool(used.all()) or not bool(used.any()):
        return up, down, alpha
    scaled = None if alpha is None else alpha * int(used.sum()) / down.shape[0]
    return up[:, used], down[used], scaled


def split_fused(
    name: str, adapter: ModuleAdapter, target: FusedLayer, rows: list[int]
) -> dict[tuple[str, str], ModuleAdapter]:
    """One adapter of a fused original-layout layer as adapters of the layers it stands for.

    The update of a fused Linear is ``(alpha/rank) up @ down``; its output rows are the parts' rows
    stacked, so part i's update is ``(alpha/rank) up_i @ down`` with ``up_i`` part i's rows of ``up``
    and ``down``/alpha shared. DoRA's magnitude and norm are per output row too, so ``dora_scale`` splits
    the same way. LoHa/LoKr updates do not split by rows of a factor, so those are refused."""
    if adapter.kind not in ("lora", "dora"):
        raise ValueError(
            f"'{name}': {adapter.kind} adapters on the original layout's fused layers are not supported "
            "(only LoRA/DoRA split into diffusers' separate layers); convert the file to diffusers names"
        )
    t = adapter.tensors
    unknown = sorted(set(t) - {"lora_up.weight", "lora_down.weight", "dora_scale"})
    missing = [n for n in ("lora_up.weight", "lora_down.weight") if n not in t]
    if unknown or missing:
        raise ValueError(f"'{name}': unexpected LoRA tensors {unknown}, missing {missing}")
    if t["lora_up.weight"].shape[0] != sum(rows):
        raise ValueError(
            f"'{name}': lora_up has {t['lora_up.weight'].shape[0]} output rows but the layers it stands for "
            f"({', '.join(target.module_paths)}) have {sum(rows)}; is it for another model size?"
        )
    row_tensors = {n: t[n] for n in ("lora_up.weight", "dora_scale") if n in t}
    if target.swap_halves:
        row_tensors = {n: swap_halves(v) for n, v in row_tensors.items()}
    pieces = {n: torch.split(v, rows, dim=0) for n, v in row_tensors.items()}
    # a plain-LoRA part with zero rows of up (our files leave parts the network did not target, such as
    # proj_mlp under ``attention``, at zero) changes nothing: leaving it out keeps network.init_from exact
    used = [bool(up.any()) or "dora_scale" in pieces for up in pieces["lora_up.weight"]]
    out: dict[tuple[str, str], ModuleAdapter] = {}
    for i, module_path in enumerate(target.module_paths):
        if any(used) and not used[i]:
            continue
        up, down, alpha = _drop_unused_rank(pieces["lora_up.weight"][i], t["lora_down.weight"], adapter.alpha)
        # clones: safetensors refuses to save tensors that share memory
        part = {"lora_up.weight": up.clone(), "lora_down.weight": down.clone()}
        if "dora_scale" in pieces:
            part["dora_scale"] = pieces["dora_scale"][i].clone()
        out[(target.component, module_path)] = ModuleAdapter(part, alpha)
    return out


def read_adapter_file(path: Path, family: ModelFamily) -> AdapterFile:
    """Parse a kohya/LyCORIS, diffusers or peft adapter file (or peft/diffusers folder) and map its layers
    onto ``family``; peft-style layers take their alpha from the file's header or adapter_config.json."""
    if not path.exists():
        raise FileNotFoundError(f"adapter file '{path}' does not exist")
    path = adapter_weights_file(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except Exception as exc:
        raise ValueError(f"'{path}' is not a readable safetensors file ({exc})") from exc
    scales = {**header_scales(metadata, f"'{path}'"), **folder_scales(path)}
    layers = _layers(family)
    kohya_index: dict[str, tuple[str, str]] = {}
    diffusers_index: dict[str, tuple[str, str]] = {}
    for component, module_path in layers:
        kohya_base, diffusers_base = family.lora_key_names(component, module_path)
        kohya_index[kohya_base] = (component, module_path)
        diffusers_index[diffusers_base] = (component, module_path)
        # diffusers' save_lora_weights under transformers >= 5 writes CLIP keys without ``text_model.``
        diffusers_index[diffusers_base.replace(".text_model.", ".", 1)] = (component, module_path)
        diffusers_index[f"base_model.model.{module_path}"] = (component, module_path)
    aliases = _alias_index(family, layers)

    modules: dict[tuple[str, str], ModuleAdapter] = {}
    fused: dict[str, ModuleAdapter] = {}
    unmatched: list[str] = []
    peft_named: dict[str, ModuleAdapter] = {}  # file layer name -> entry, for alphas kept in configs
    for key, value in tensors.items():
        base, _, tensor_name = key.partition(".")
        if base in kohya_index or base in aliases:
            if base in kohya_index:
                entry = modules.setdefault(kohya_index[base], ModuleAdapter())
            else:
                entry = fused.setdefault(base, ModuleAdapter())
            if tensor_name == "alpha":
                entry.alpha = float(value)
            else:
                entry.tensors[tensor_name] = value.float()
            continue
        matched = False
        for suffix in ("lora_A.weight", "lora_B.weight", "lora_A.default.weight", "lora_B.default.weight"):
            if not key.endswith("." + suffix):
                continue
            name = key[: -len(suffix) - 1]
            kohya_name = "lora_down.weight" if "lora_A" in suffix else "lora_up.weight"
            if name in diffusers_index:
                entry = modules.setdefault(diffusers_index[name], ModuleAdapter())
            elif name in aliases:
                entry = fused.setdefault(name, ModuleAdapter())
            else:
                continue
            entry.tensors[kohya_name] = value.float()
            peft_named[name] = entry
            matched = True
        if not matched:
            unmatched.append(key)
    for name, entry in peft_named.items():
        if "lora_down.weight" in entry.tensors:
            entry.alpha = scale_alpha(scales, name, entry.rank)
    for name, entry in fused.items():
        target = aliases[name]
        rows = [layers[(target.component, p)].weight.shape[0] for p in target.module_paths]
        for module_key, part in split_fused(name, entry, target, rows).items():
            if module_key in modules:
                raise ValueError(
                    f"'{path}': '{name}' and another entry of the file both adapt {module_key[1]}; "
                    "the file mixes two layouts for one layer"
                )
            modules[module_key] = part
    if not modules:
        raise ValueError(
            f"no tensor of '{path}' matches a layer of this {family.arch} model (e.g. {list(tensors)[:3]}); "
            "is it an adapter for another model family?"
        )
    if unmatched:
        logger.warning(
            "%s: %d tensors match no layer of this model and were ignored, e.g. %s",
            path,
            len(unmatched),
            unmatched[:3],
        )
    return AdapterFile(modules, metadata, unmatched)


# --- deltas: one pure function per adapter kind -----------------------------------------------------


def _as_matrix(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1)


def lora_delta(t: dict[str, torch.Tensor], shape: torch.Size) -> torch.Tensor:
    """Hu et al. 2021: up @ down (convolutions flattened over in_channels x kernel)."""
    return (_as_matrix(t["lora_up.weight"]) @ _as_matrix(t["lora_down.weight"])).reshape(shape)


def loha_delta(t: dict[str, torch.Tensor], shape: torch.Size) -> torch.Tensor:
    """Hyeon-Woo et al. 2022 (FedPara / LyCORIS LoHa): Hadamard product of two low-rank products."""
    return ((t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])).reshape(shape)


def lokr_delta(t: dict[str, torch.Tensor], shape: torch.Size) -> torch.Tensor:
    """LyCORIS LoKr: Kronecker product of two factors, each stored full or as a low-rank pair."""
    w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
    if "lokr_w2" in t:
        w2 = t["lokr_w2"]
    else:
        w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]
        if len(shape) == 4:
            w2 = w2.reshape(w2.shape[0], -1, *shape[2:])
    if w2.dim() == 4:
        w1 = w1.unsqueeze(2).unsqueeze(3)
    return torch.kron(w1, w2).reshape(shape)


def merged_weight(adapter: ModuleAdapter, weight: torch.Tensor, multiplier: float) -> torch.Tensor:
    """The base weight with ``multiplier`` x the adapter's update applied (DoRA: Liu et al. 2024)."""
    w = weight.float()
    kind = adapter.kind
    t = adapter.tensors
    if kind == "loha":
        delta = loha_delta(t, w.shape)
    elif kind == "lokr":
        delta = lokr_delta(t, w.shape)
    else:
        delta = lora_delta(t, w.shape)
    updated = w + adapter.scale() * delta
    if kind == "dora":
        # magnitude x direction, the norm taken per output channel as peft and ComfyUI do
        norm = updated.flatten(1).norm(dim=1).reshape(-1, *([1] * (w.dim() - 1)))
        updated = t["dora_scale"].reshape(-1, *([1] * (w.dim() - 1))) * updated / norm
    return w + multiplier * (updated - w)


@torch.no_grad()
def apply_adapter(
    family: ModelFamily, adapter: AdapterFile, multiplier: float = 1.0, te_multiplier: float | None = None
) -> int:
    """Merge ``adapter`` into ``family``'s weights, the text encoders' layers with ``te_multiplier`` when
    given (A1111's separate te/unet weights); returns the number of layers changed."""
    layers = _layers(family)
    for key, module_adapter in adapter.modules.items():
        layer = layers[key]
        m = multiplier if key[0] == "denoiser" or te_multiplier is None else te_multiplier
        layer.weight.copy_(merged_weight(module_adapter, layer.weight, m).to(layer.weight.dtype))
    return len(adapter.modules)


def peft_state_from_file(
    adapter: AdapterFile, family: ModelFamily, alphas: dict[tuple[str, str], tuple[float, int]]
) -> dict[str, torch.Tensor]:
    """Tensors in :func:`adapter_state` naming, to continue training from a file; ``alphas`` are those of
    the adapters injected to receive them (full LoKr factors carry peft's alpha/rank folded out; a LoRA's
    ``up`` is rescaled where the file's alpha/rank differs from the adapter's)."""
    layers = _layers(family)
    state: dict[str, torch.Tensor] = {}
    for key, module_adapter in adapter.modules.items():
        component, module_path = key
        full_lokr = _full_lokr(set(module_adapter.tensors))
        for name, tensor in module_adapter.tensors.items():
            value = tensor
            if name == "dora_scale":
                value = _dora_to_peft(tensor, layers[key])
            elif name == "lokr_w2" and full_lokr and key in alphas:
                alpha, rank = alphas[key]
                value = tensor / (alpha / rank)
            elif name == "lora_up.weight" and key in alphas:
                # the file's alpha/rank may differ from the receiving adapter's (alpha folded into up, as
                # diffusers files and fused original-layout layers store it): keep the update itself
                alpha, rank = alphas[key]
                value = tensor * (module_adapter.scale() / (alpha / rank))
            state[f"{component}.{module_path}.{_KOHYA_TO_PEFT[name]}"] = value
    return state


def convert_adapter_file(family: ModelFamily, src: Path, dst: Path, fmt: str, dtype: str = "fp16") -> Path:
    """Rewrite an adapter file in another layout (kohya <-> diffusers), keeping its header."""
    adapter = read_adapter_file(src, family)
    alphas = {
        key: (m.alpha if m.alpha is not None else float(m.rank), m.rank) for key, m in adapter.modules.items()
    }
    state = peft_state_from_file(adapter, family, alphas)
    return save_adapter(
        family, state, alphas, dst, fmt, dtype, {**adapter.metadata, "eri_converted_from": src.name}
    )


def describe(metadata: dict[str, str]) -> dict[str, object]:
    """Our header fields decoded (the training config is stored as JSON text)."""
    out: dict[str, object] = dict(metadata)
    if "eri_network" in out:
        out["eri_network"] = json.loads(metadata["eri_network"])
    return out
