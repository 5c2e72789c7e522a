"""The one way every benchmark script reports: indented JSON on stdout, and the same text in ``--out``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def emit(report: dict[str, Any], out: Path | str | None) -> None:
    """Print ``report`` and, when ``out`` is given, write it there too (the JSON that RESULTS.md quotes)."""
    text = json.dumps(report, indent=1)
    print(text)
    if out:
        Path(out).write_text(text + "\n", encoding="utf-8")
