"""Progress bars, one policy for every entry point: ``progress=None`` (the default) shows a tqdm bar only
when stderr is a terminal, so logs piped to a file get no carriage-return lines; True/False force it."""
from __future__ import annotations

import sys
from typing import Iterable, Optional


def progress_enabled(progress: Optional[bool]) -> bool:
    """The resolved setting: ``progress`` when given, else whether stderr is a terminal."""
    if progress is None:
        stream = sys.stderr
        return bool(getattr(stream, "isatty", lambda: False)())
    return bool(progress)


def progress_bar(progress: Optional[bool], *, total: Optional[int] = None, desc: str = "",
                 unit: str = "it", iterable: Optional[Iterable] = None):
    """A tqdm bar (or None when disabled).  Call ``.update(k)`` and ``.close()`` on it when not None."""
    if not progress_enabled(progress):
        return None
    from tqdm.auto import tqdm
    return tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr)
