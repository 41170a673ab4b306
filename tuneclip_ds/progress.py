"""Progress bars on a terminal only: in a log file each redraw of a bar is a carriage-return fragment."""

from __future__ import annotations

import sys

from tqdm import tqdm


def progress_bar(iterable=None, *, show: bool = True, **kwargs) -> tqdm:
    """A tqdm bar on stderr when ``show`` and stderr is a terminal; a silent one otherwise."""
    return tqdm(iterable, disable=not (show and sys.stderr.isatty()), **kwargs)
