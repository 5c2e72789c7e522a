"""``model.options`` validation shared by every family: errors name the YAML path like the config loader."""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

Options = TypeVar("Options", bound=BaseModel)


def parse_model_options(cls: type[Options], options: dict[str, Any], where: str = "model.options") -> Options:
    """Validate ``options`` against a family's options model; one ValueError lists every problem."""
    try:
        return cls.model_validate(options)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            loc = ".".join(str(p) for p in e["loc"])
            msg = (
                "unknown key; allowed keys here: " + ", ".join(sorted(cls.model_fields))
                if e["type"] == "extra_forbidden"
                else e["msg"]
            )
            lines.append(f"  {where}.{loc}: {msg}" if loc else f"  {where}: {msg}")
        raise ValueError("invalid model options:\n" + "\n".join(lines)) from None
