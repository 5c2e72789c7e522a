"""``eri ui``: a web page to start training jobs from configs, watch loss, LR and samples live, stop and
resume them, and download what they trained. It reads run folders, so runs started from the CLI show too."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from eridiffusion.ui.app import UISettings, create_ui_app

__all__ = ["UISettings", "create_ui_app"]


def __getattr__(name: str) -> object:
    """FastAPI is imported only when the app is built (``eri --help`` stays fast)."""
    if name in __all__:
        from eridiffusion.ui import app

        return getattr(app, name)
    raise AttributeError(name)
