"""A1111's `<lora:name:strength>` prompt syntax: the tags taken out of the prompt and named files found.

The text encoder never sees the tags (as in A1111). A name is a LoRA file's stem under the given folders
(searched recursively, as A1111's Lora folder is); `<lora:name>` means strength 1, and A1111's
`<lora:name:te:unet>` form uses its first number for the whole LoRA (SDAccel merges one strength per file).
"""

from __future__ import annotations

import re
from pathlib import Path

from ..spec.errors import ConfigError

_TAG = re.compile(r"<lora:([^:>]+)(?::([^:>]*))?(?::[^>]*)?>")
_SUFFIXES = (".safetensors", ".ckpt", ".pt")


def split_lora_tags(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """(the prompt without its tags, [(name, strength)]); a strength that is not a number is a ConfigError."""
    found = []
    for match in _TAG.finditer(prompt or ""):
        name, strength = match.group(1).strip(), (match.group(2) or "").strip()
        try:
            found.append((name, float(strength) if strength else 1.0))
        except ValueError:
            raise ConfigError("prompt", f"{match.group(0)} has {strength!r} where a strength goes",
                              "write <lora:name:0.8> (or <lora:name> for strength 1)") from None
    clean = re.sub(r"\s+([,.;])", r"\1", re.sub(r"\s{2,}", " ", _TAG.sub("", prompt or ""))).strip(" ,")
    return clean, found


def find_lora(name: str, folders) -> Path | None:
    """The LoRA file called `name` (its stem, or its name with the suffix) under `folders`."""
    for folder in folders:
        root = Path(folder).expanduser()
        if not root.is_dir():
            continue
        for path in sorted(root.rglob("*")):
            if path.suffix.lower() in _SUFFIXES and name in (path.stem, path.name) and path.is_file():
                return path
    return None


def list_loras(folders) -> list[str]:
    """The names `<lora:name>` finds under `folders` (file stems, sorted, each once), for a picker."""
    names: set[str] = set()
    for folder in folders:
        root = Path(folder).expanduser()
        if root.is_dir():
            names.update(p.stem for p in root.rglob("*") if p.suffix.lower() in _SUFFIXES and p.is_file())
    return sorted(names, key=str.lower)


def with_lora_tag(prompt: str, name: str, strength: float) -> str:
    """`prompt` with `<lora:name:strength>` for `name` (an existing tag for it replaced, else one appended)."""
    if not name:
        raise ConfigError("LoRA", "none picked", "pick a LoRA from the list (files in the LoRA folder)")
    tag = f"<lora:{name}:{float(strength):g}>"
    pattern = re.compile(r"<lora:" + re.escape(name) + r"(?::[^>]*)?>")
    if pattern.search(prompt or ""):
        return pattern.sub(lambda _: tag, prompt, count=1)
    return f"{(prompt or '').rstrip()} {tag}".strip()
