"""Writing a file so that it is either complete or absent: the one way SDAccel writes outputs."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; it replaces `path` when the block ends, and is removed if the block
    fails (a full disk, Ctrl+C), so no half-written image, report or weight file is ever left.

    The temporary name keeps the suffix: writers that choose the format by it (matplotlib) still work.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.partial{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
