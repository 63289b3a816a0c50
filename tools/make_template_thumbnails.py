"""Draw the template browser's thumbnail of every example workflow: `example_workflows/<name>.jpg`.

ComfyUI's frontend (1.27) asks for `<name>.jpg` beside each custom-node template's JSON and titles the card with
the file name, so the thumbnail carries what the card cannot: the readable title and group from
`js/sdaccel_templates.json` (which also sets the cards' order), the workflow's key settings read from its
nodes, and its place in the list. Text on a plain background, no artwork. The title is also stored as the
JPEG's comment, where tests read it back.

    .venv/bin/python tools/make_template_thumbnails.py       # rewrite example_workflows/*.jpg
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "example_workflows"
INDEX = ROOT / "js" / "sdaccel_templates.json"
SIZE = 320  # pixels, square: the card shows it 256 wide
MARGIN = 16
FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
COMMENT_PREFIX = "SDAccel template: "
BACKGROUND, TEXT, MUTED = (24, 28, 36), (238, 240, 244), (170, 178, 192)
GROUP_COLOURS = [(62, 120, 178), (70, 150, 110), (170, 110, 60), (140, 90, 170), (60, 140, 150), (180, 80, 90),
                 (120, 130, 60), (90, 100, 180), (160, 120, 40), (80, 130, 90), (110, 110, 120)]
NOTE_NODES = ("Note", "MarkdownNote")
NOT_SHOWN = {"ckpt_name", "path", "config_dir", "prompt", "negative_prompt", "calibration_dir", "spill_dir"}


def load_index() -> list[dict]:
    """[{"name", "title", "group", "group_index", "position"}] in the order the cards are shown."""
    entries = []
    for group_index, group in enumerate(json.loads(INDEX.read_text(encoding="utf-8"))["groups"]):
        for name, title in group["templates"]:
            entries.append({"name": name, "title": title, "group": group["group"], "group_index": group_index,
                            "position": len(entries) + 1})
    return entries


def font(size: int, bold: bool = False):
    path = FONT_DIR / ("DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf")
    return ImageFont.truetype(str(path), size) if path.exists() else ImageFont.load_default(size)


def wrap(draw: ImageDraw.ImageDraw, text: str, face, width: int) -> list[str]:
    """`text` in lines no wider than `width` pixels (a word too long for a line is cut with an ellipsis)."""
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if draw.textlength(candidate, font=face) <= width:
            line = candidate
            continue
        if line:
            lines.append(line)
        while draw.textlength(word, font=face) > width and len(word) > 1:
            word = word[:-2] + "…"
        line = word
    return lines + [line] if line else lines


def _widgets(node_type: str) -> list[tuple[str, object]]:
    """(name, default) of the node's widget inputs in the order its UI-format `widgets_values` holds them ([] for
    a core node); a list's default is its first choice."""
    from sdaccel.nodes import NODE_CLASS_MAPPINGS

    cls = NODE_CLASS_MAPPINGS.get(node_type)
    if cls is None:
        return []
    declared = cls.INPUT_TYPES()
    widgets = []
    for section in ("required", "optional"):
        for name, spec in declared.get(section, {}).items():
            kind, options = spec[0], (spec[1] if len(spec) > 1 else {})
            if isinstance(kind, list):
                widgets.append((name, options.get("default", kind[0] if kind else None)))
            elif kind in ("INT", "FLOAT", "STRING", "BOOLEAN"):
                widgets.append((name, options.get("default")))
    return widgets


def _values(node: dict, changed_only: bool = False) -> dict:
    """The node's widget values by name (only those that differ from the node's defaults with `changed_only`)."""
    values = list(node.get("widgets_values") or [])
    widgets = _widgets(node["type"])
    names = [name for name, _ in widgets]
    if "seed" in names and len(values) == len(names) + 1:
        del values[names.index("seed") + 1]  # the seed's "control after generate" value
    if len(names) != len(values):
        return {}
    return {name: value for (name, default), value in zip(widgets, values) if not changed_only or value != default}


def _short(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def key_settings(workflow: dict) -> list[str]:
    """The model, the size, steps and CFG, then each toggle or patch with the widgets it changes from its defaults."""
    from sdaccel.nodes import NODE_DISPLAY_NAME_MAPPINGS

    lines, toggles = [], []
    for node in workflow["nodes"]:
        kind, values = node["type"], node.get("widgets_values") or []
        if kind in NOTE_NODES or kind in ("CLIPTextEncode", "VAEDecode", "SaveImage", "LoadImage",
                                          "ControlNetApplyAdvanced"):
            continue
        if kind in ("SDAccelLoader", "CheckpointLoaderSimple"):
            model = str(values[0]).rsplit("/", 1)[-1]
            lines.append(f"model: {model.removesuffix('.safetensors').removesuffix('.ckpt')}")
        elif kind == "EmptyLatentImage":
            lines.append(f"{values[0]}x{values[1]}")
        elif kind == "KSampler":
            lines.append(f"KSampler: {values[2]} steps, CFG {values[3]}, {values[4]}/{values[5]}")
        elif kind == "LoraLoader":
            lines.append(f"LoRA: strength {values[1]}")
        elif kind == "ControlNetLoader":
            lines.append("ControlNet on the prompts")
        elif kind in ("SDAccelSampler", "SDAccelSamplerImg2Img"):
            fields = _values(node)
            size = f"{fields['width']}x{fields['height']}, " if "width" in fields else ""
            lines.append(f"{size}{fields.get('steps')} steps, CFG {fields.get('cfg')}")
        else:
            label = NODE_DISPLAY_NAME_MAPPINGS.get(kind, kind).removeprefix("SDAccel ")
            fields = {k: v for k, v in _values(node, changed_only=True).items() if k not in NOT_SHOWN}
            shown = ", ".join(f"{k}={_short(v)}" for k, v in fields.items())
            toggles.append(f"{label}: {shown}" if shown else f"{label} (defaults)")
    return lines + toggles


def thumbnail(entry: dict, workflow: dict, count: int) -> Image.Image:
    image = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
    draw = ImageDraw.Draw(image)
    colour = GROUP_COLOURS[entry["group_index"] % len(GROUP_COLOURS)]
    draw.rectangle((0, 0, SIZE, 34), fill=colour)
    small, body, title = font(13), font(14), font(25, bold=True)
    draw.text((MARGIN, 9), entry["group"], font=small, fill=TEXT)
    place = f"{entry['position']}/{count}"
    draw.text((SIZE - MARGIN - draw.textlength(place, font=small), 9), place, font=small, fill=TEXT)
    y = 46
    lines = wrap(draw, entry["title"], title, SIZE - 2 * MARGIN)
    if len(lines) > 2:  # a long title in a smaller face
        title = font(19, bold=True)
        lines = wrap(draw, entry["title"], title, SIZE - 2 * MARGIN)
    for line in lines[:3]:
        draw.text((MARGIN, y), line, font=title, fill=TEXT)
        y += title.size + 6
    y += 8
    draw.line((MARGIN, y, SIZE - MARGIN, y), fill=colour, width=2)
    y += 10
    for setting in key_settings(workflow):
        for line in wrap(draw, setting, body, SIZE - 2 * MARGIN):
            if y > SIZE - MARGIN - 18:
                return image
            draw.text((MARGIN, y), line, font=body, fill=MUTED)
            y += 19
    return image


def main() -> int:
    entries = load_index()
    names = [e["name"] for e in entries]
    shipped = sorted(p.stem for p in EXAMPLES.glob("*.json"))
    missing, stale = sorted(set(shipped) - set(names)), sorted(set(names) - set(shipped))
    if missing or stale or len(names) != len(set(names)):
        print(f"{INDEX.relative_to(ROOT)} does not match example_workflows/: add {missing}, remove {stale} "
              "(each workflow once)", file=sys.stderr)
        return 1
    for stale_jpg in EXAMPLES.glob("*.jpg"):
        if stale_jpg.stem not in names:
            stale_jpg.unlink()
    for entry in entries:
        workflow = json.loads((EXAMPLES / f"{entry['name']}.json").read_text(encoding="utf-8"))
        thumbnail(entry, workflow, len(entries)).save(EXAMPLES / f"{entry['name']}.jpg", quality=85, optimize=True,
                                                      comment=COMMENT_PREFIX + entry["title"])
    print(f"wrote {len(entries)} thumbnails into {EXAMPLES.relative_to(ROOT)}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
