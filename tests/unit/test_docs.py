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


def _paths(model: type[BaseModel], prefix: str = "", top_sections: set[type] | None = None) -> list[str]:
    """Dotted paths of every key. A nested section that is also a top-level one (a pipeline step's `network`
    or `datasets`) is documented by its top-level rows, so it is listed once under its own path."""
    is_root = top_sections is None
    if top_sections is None:
        top_sections = {s for f in model.model_fields.values() if (s := _submodel(f.annotation)) is not None}
    out = []
    for name, field in model.model_fields.items():
        sub = _submodel(field.annotation)
        path = prefix + name
        if sub is None or (sub in top_sections and not is_root):
            out.append(path)
        else:
            text = str(field.annotation)
            sep = "[]." if "list" in text else ".<component>." if "dict" in text else "."
            out.extend(_paths(sub, path + sep, top_sections))
    return out


def test_every_config_key_is_documented() -> None:
    missing = [p for p in _paths(JobConfig) if f"`{p}`" not in README]
    assert not missing, f"README config reference lacks: {missing}"


def test_every_tiny_option_is_documented() -> None:
    missing = [k for k in TinyOptions.model_fields if f"`{k}`" not in README]
    assert not missing, f"README tiny options table lacks: {missing}"
