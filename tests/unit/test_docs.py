"""The README's config reference covers every key the schema accepts (docs drift is a bug)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from eridiffusion.config.schema import JobConfig
from eridiffusion.models.tiny import TinyOptions

README = (Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8")


def _submodel(annotation: object) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _submodel(arg)
        if found is not None:
            return found
    return None


def _paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name, field in model.model_fields.items():
        sub = _submodel(field.annotation)
        path = prefix + name
        if sub is None:
            out.append(path)
        else:
            sep = "[]." if "list" in str(field.annotation) else "."
            out.extend(_paths(sub, path + sep))
    return out


def test_every_config_key_is_documented() -> None:
    missing = [p for p in _paths(JobConfig) if f"`{p}`" not in README]
    assert not missing, f"README config reference lacks: {missing}"


def test_every_tiny_option_is_documented() -> None:
    missing = [k for k in TinyOptions.model_fields if f"`{k}`" not in README]
    assert not missing, f"README tiny options table lacks: {missing}"
