"""Progress bars, one policy for every entry point: ``progress=None`` (the default) shows a tqdm bar only
when stderr is a terminal, so logs piped to a file get no carriage-return lines; True/False force it."""
from __future__ import annotations

import sys
from typing import Any, Optional


def progress_enabled(progress: Optional[bool]) -> bool:
    """True/False force the bar; None: on only when stderr is a terminal (a piped log gets no bar)."""
    if progress is None:
        isatty = getattr(sys.stderr, "isatty", None)
        return bool(isatty and isatty())
    return bool(progress)


def progress_bar(progress: Optional[bool], **kw: Any):
    """A tqdm bar on stderr when :func:`progress_enabled`, else None (call ``.update``/``.close`` when not None)."""
    if not progress_enabled(progress):
        return None
    from tqdm.auto import tqdm
    return tqdm(file=sys.stderr, dynamic_ncols=True, **kw)
