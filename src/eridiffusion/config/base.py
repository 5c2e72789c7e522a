"""The base of every config section."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    """Base for every section: unknown keys rejected, values validated on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
