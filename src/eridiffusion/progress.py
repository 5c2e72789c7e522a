"""One progress-bar policy for every long loop (training, pipeline steps, cache building)."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


def progress_bar(total: int, desc: str, enabled: bool = True, initial: int = 0) -> tqdm:
    """A tqdm bar that redraws 5x a second on a terminal but only every 30 s when stderr is a file or a CI
    log, where every redraw is a new line that floods the output."""
    return tqdm(
        total=total,
        initial=initial,
        disable=not enabled,
        desc=desc,
        dynamic_ncols=True,
        mininterval=0.2 if sys.stderr.isatty() else 30.0,
    )
