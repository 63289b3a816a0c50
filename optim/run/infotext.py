"""The A1111-style `parameters` text and PNG files every front-end writes, so any tool reads the settings back.

A1111, its API clients and "PNG Info" tabs parse `parameters`: prompt, `Negative prompt: ...`, then one
`Key: value, ...` line. SDAccel's own choices go into that line as `SDAccel: <labels>`, and the whole spec and
stats into a second text chunk, `sdaccel` (JSON).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from ..spec.fields import describe
from .files import atomic_path


def _printable(text: str) -> str:
    """A file name that is not valid UTF-8 (Linux allows it) as text PNG metadata can hold."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def parameters_text(spec, request, stats, index: int = 0, *, seed: int | None = None) -> str:
    """A1111's infotext for image `index` of a run (`seed`: the batch's first seed, default the request's)."""
    first = request.seed if seed is None else seed
    text = request.prompt
    if request.negative_prompt:
        text += f"\nNegative prompt: {request.negative_prompt}"
    text += (f"\nSteps: {stats.steps}, Sampler: {stats.scheduler}, CFG scale: {stats.cfg}, "
             f"Seed: {(first + index) % 2**64}, Size: {stats.width}x{stats.height}, "
             f"Model: {_printable(Path(spec.specs()[0].model.path).stem)}, Family: {stats.family}")
    if request.is_img2img:
        text += f", Denoising strength: {request.strength}"
    if stats.optimizations:
        text += f", SDAccel: \"{'; '.join(stats.optimizations)}\""
    return text


def run_metadata(spec, request, stats) -> str:
    """The `sdaccel` PNG chunk: the spec, the request (without an in-memory image) and the run's statistics."""
    body = {info.name: getattr(request, info.name) for info in describe(type(request)) if info.name != "init_image"}
    return json.dumps({"spec": spec.to_dict(), "request": body, "applied": stats.applied,
                       "stats": stats.to_dict()}, default=str)


def _pnginfo(texts: dict):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in texts.items():
        info.add_itxt(key, value)
    return info


def save_png(image, path: Path, texts: dict) -> None:
    """Write `image` with text chunks `texts`; never leaves a half-written file, even on Ctrl+C."""
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=_pnginfo(texts))


def png_bytes(image, texts: dict) -> bytes:
    """`image` as PNG bytes with text chunks `texts` (what the A1111 API returns, base64-encoded)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=_pnginfo(texts))
    return buffer.getvalue()
