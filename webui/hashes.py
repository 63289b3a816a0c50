"""A1111's model hash of a checkpoint file (sha256; `sd_model_hash` is its first 10 hex digits), computed once.

Hashing a 2-7 GB checkpoint takes seconds, so it is done lazily, by the first response that reports it, and kept
per (path, modification time, size): the next requests reuse it, a file replaced in place is hashed afresh.
Diffusers folders and synthetic models have no file to hash: None, as A1111 gives for a hash it does not know.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from pathlib import Path

log = logging.getLogger(__name__)

SHORT_HASH_CHARS = 10  # A1111's `sd_model_hash` and the "[hash]" of its checkpoint titles
_CHUNK = 1 << 20
_MAX_FILES = 256

_known: dict[tuple, str] = {}
_lock = threading.Lock()  # one hash at a time: two requests for a new file never read it twice


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _key(path) -> tuple | None:
    try:
        found = Path(path)
        stat = found.stat()
    except (OSError, ValueError):
        return None  # synthetic:<family>, or a file gone since it was listed
    if not found.is_file():
        return None  # a diffusers folder
    return str(found.resolve()), stat.st_mtime_ns, stat.st_size


def sha256_of(path) -> str | None:
    """The checkpoint file's sha256 (hashed on first use, then cached), or None when `path` is no file."""
    key = _key(path)
    if key is None:
        return None
    with _lock:
        if key not in _known:
            try:
                value = file_sha256(key[0])
            except OSError as exc:
                log.warning("could not hash %s for sd_model_hash: %s", path, exc)
                return None
            if len(_known) >= _MAX_FILES:
                _known.pop(next(iter(_known)))
            _known[key] = value
        return _known[key]


def short_hash(path) -> str | None:
    """A1111's `sd_model_hash`: the first 10 hex digits of the file's sha256."""
    full = sha256_of(path)
    return full[:SHORT_HASH_CHARS] if full else None


def known_sha256(path) -> str | None:
    """The sha256 if it was computed already (never hashes): for listings of every checkpoint."""
    key = _key(path)
    with _lock:
        return _known.get(key) if key else None
