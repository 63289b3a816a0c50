"""Turns ComfyUI UI-format workflows into prompts and, without ComfyUI, into calls of our node classes.

`ui_to_api` does what ComfyUI's frontend does before queueing: drop note nodes, follow links (through
bypassed nodes), and map the positional `widgets_values` onto input names in INPUT_TYPES order,
skipping the extra "control after generate" value that follows seed widgets. The real-host test feeds
it ComfyUI's own /object_info; the in-process runner feeds it our INPUT_TYPES and then executes the
prompt the way ComfyUI's executor does: only nodes that feed an output, inputs validated against their
declarations, each node called under torch.inference_mode(), `{"ui", "result"}` returns unpacked.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
VIRTUAL_NODES = {"Note", "MarkdownNote"}  # frontend-only nodes, never sent to the server
MODE_NEVER, MODE_BYPASS = 2, 4
# ComfyUI core output nodes the examples end in, with their INPUT_TYPES (for the in-process runner)
SINKS = {"SaveImage": {"required": {"images": ("IMAGE",), "filename_prefix": ("STRING", {"default": "ComfyUI"})}},
         "PreviewImage": {"required": {"images": ("IMAGE",)}}}


def load_workflow(path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _ordered(input_types: dict) -> list[tuple[str, tuple]]:
    out = []
    for section in ("required", "optional"):
        out.extend((name, tuple(spec)) for name, spec in (input_types.get(section) or {}).items())
    return out


def _is_widget(spec: tuple) -> bool:
    kind = spec[0]
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if options.get("forceInput"):
        return False
    return isinstance(kind, (list, tuple)) or kind in WIDGET_TYPES


def _has_control(name: str, spec: tuple) -> bool:
    """ComfyUI's frontend adds a 'control after generate' widget to seed-like INT inputs (and flagged combos)."""
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    flag = options.get("control_after_generate")
    if spec[0] == "INT":
        return bool(flag) if flag is not None else name in ("seed", "noise_seed")
    return bool(flag)


def widget_inputs(input_types: dict) -> list[tuple[str, tuple, bool]]:
    """(name, spec, followed by a control value) for every widget, in the frontend's order."""
    return [(name, spec, _has_control(name, spec)) for name, spec in _ordered(input_types) if _is_widget(spec)]


def link_inputs(input_types: dict) -> list[tuple[str, tuple]]:
    return [(name, spec) for name, spec in _ordered(input_types) if not _is_widget(spec)]


def combo_choices(spec: tuple) -> list | None:
    if isinstance(spec[0], (list, tuple)):
        return list(spec[0])
    if spec[0] == "COMBO" and len(spec) > 1:
        return list(spec[1].get("options", []))
    return None


def ui_to_api(workflow: dict, input_types: Callable[[str], dict]) -> dict:
    """The /prompt body (API format) for a UI-format workflow; `input_types(class_type)` gives INPUT_TYPES."""
    nodes = {node["id"]: node for node in workflow["nodes"]}
    links = {link[0]: link for link in workflow["links"]}

    def skipped(node) -> bool:
        return node["type"] in VIRTUAL_NODES or node.get("mode", 0) == MODE_NEVER

    def source(link_id):
        """(node id, slot) feeding a link, looking through bypassed nodes; None if nothing real feeds it."""
        _, src, slot, _dst, _dst_slot, kind = links[link_id]
        node = nodes[src]
        if skipped(node):
            return None
        if node.get("mode", 0) == MODE_BYPASS:
            for inp in node.get("inputs", []):
                if inp.get("link") is not None and inp["type"] == kind:
                    return source(inp["link"])
            return None
        return str(src), slot

    prompt = {}
    for node in workflow["nodes"]:
        if skipped(node) or node.get("mode", 0) == MODE_BYPASS:
            continue
        types = input_types(node["type"])
        if types is None:
            raise KeyError(f"node {node['id']}: unknown node type {node['type']!r}")
        inputs: dict = {}
        given = node.get("widgets_values", [])
        if isinstance(given, dict):
            inputs.update({name: given[name] for name, _, _ in widget_inputs(types) if name in given})
        else:
            index = 0
            for name, _spec, has_control in widget_inputs(types):
                if index >= len(given):
                    break
                inputs[name] = given[index]
                index += 2 if has_control else 1
        for inp in node.get("inputs", []):
            if inp.get("link") is not None:
                found = source(inp["link"])
                if found is not None:
                    inputs[inp["name"]] = [found[0], found[1]]
                else:
                    inputs.pop(inp["name"], None)
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs,
                                   "_meta": {"title": node.get("title", node["type"])}}
    return prompt


def override(prompt: dict, changes: Callable[[str, dict], dict]) -> dict:
    """A copy of `prompt` with `changes(class_type, inputs)` merged into each node's inputs."""
    out = {}
    for node_id, node in prompt.items():
        inputs = dict(node["inputs"])
        inputs.update(changes(node["class_type"], inputs) or {})
        out[node_id] = {**node, "inputs": inputs}
    return out


# ---------------------------------------------------------------- in-process execution


class ValidationError(ValueError):
    """An input ComfyUI's own validation would reject before running anything."""


@dataclass
class Outcome:
    results: dict = field(default_factory=dict)  # node id -> output tuple
    ui: dict = field(default_factory=dict)  # node id -> the node's "ui" dict
    saved: dict = field(default_factory=dict)  # sink node id -> IMAGE tensor it received
    executed: list = field(default_factory=list)  # node ids in execution order


def _check_value(node_id: str, name: str, spec: tuple, value, *, lenient_combos: set) -> None:
    where = f"node {node_id} input {name!r}"
    choices = combo_choices(spec)
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if choices is not None:
        if value not in choices and name not in lenient_combos:
            raise ValidationError(f"{where}: {value!r} not in {choices}")
        return
    kind = spec[0]
    if kind == "BOOLEAN" and not isinstance(value, bool):
        raise ValidationError(f"{where}: expected a boolean, got {value!r}")
    if kind == "STRING" and not isinstance(value, str):
        raise ValidationError(f"{where}: expected text, got {value!r}")
    if kind in ("INT", "FLOAT"):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind == "INT" and value != int(value)):
            raise ValidationError(f"{where}: expected {kind}, got {value!r}")
        if "min" in options and value < options["min"]:
            raise ValidationError(f"{where}: {value} below min {options['min']}")
        if "max" in options and value > options["max"]:
            raise ValidationError(f"{where}: {value} above max {options['max']}")


def run_prompt(prompt: dict, mappings: dict, *, targets=None, lenient_combos: set = frozenset(),
               on_node: Callable | None = None) -> Outcome:
    """Execute an API-format prompt with our node classes (and image sinks), as ComfyUI's executor would:
    the output nodes and what feeds them, or only `targets` (node ids) and what feeds those."""
    import torch

    outcome = Outcome()
    spec_of = {node_id: _types(node["class_type"], mappings) for node_id, node in prompt.items()}

    def evaluate(node_id: str):
        if node_id in outcome.results:
            return outcome.results[node_id]
        node = prompt[node_id]
        types = spec_of[node_id]
        kwargs = {}
        for name, spec in _ordered(types):
            if name not in node["inputs"]:
                if name in (types.get("required") or {}):
                    raise ValidationError(f"node {node_id}: required input {name!r} missing")
                continue
            value = node["inputs"][name]
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and value[0] in prompt:
                src, slot = value
                produced = _return_types(prompt[src]["class_type"], mappings)
                if produced[slot] != spec[0]:
                    raise ValidationError(f"node {node_id} input {name!r}: expects {spec[0]}, linked to "
                                          f"{produced[slot]}")
                kwargs[name] = evaluate(src)[slot]
            else:
                _check_value(node_id, name, spec, value, lenient_combos=lenient_combos)
                kwargs[name] = value
        class_type = node["class_type"]
        with torch.inference_mode():  # ComfyUI runs every node under inference mode
            if class_type in SINKS:
                images = kwargs["images"]
                _check_image(node_id, images)
                outcome.saved[node_id] = images
                out = ()
            else:
                cls = mappings[class_type]
                returned = getattr(cls(), cls.FUNCTION)(**kwargs)
                if isinstance(returned, dict):
                    if "ui" in returned:
                        outcome.ui[node_id] = returned["ui"]
                    returned = returned.get("result", ())
                out = tuple(returned)
                if len(out) != len(cls.RETURN_TYPES):
                    raise AssertionError(f"{class_type} returned {len(out)} values for {cls.RETURN_TYPES}")
        outcome.results[node_id] = out
        outcome.executed.append(node_id)
        if on_node is not None:
            on_node(node_id, class_type, out)
        return out

    outputs = list(targets) if targets is not None else [
        node_id for node_id, node in prompt.items()
        if node["class_type"] in SINKS or getattr(mappings.get(node["class_type"]), "OUTPUT_NODE", False)]
    if not outputs:
        raise ValidationError("prompt has no output node")
    for node_id in outputs:
        evaluate(node_id)
    return outcome


def _types(class_type: str, mappings: dict) -> dict:
    if class_type in SINKS:
        return SINKS[class_type]
    if class_type not in mappings:
        raise ValidationError(f"unknown node type {class_type!r}")
    return mappings[class_type].INPUT_TYPES()


def _return_types(class_type: str, mappings: dict) -> tuple:
    return () if class_type in SINKS else tuple(mappings[class_type].RETURN_TYPES)


def _check_image(node_id: str, images) -> None:
    import torch

    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[-1] != 3:
        got = getattr(images, "shape", images)
        raise AssertionError(f"node {node_id}: IMAGE must be a [B, H, W, 3] tensor, got {got}")
    if images.dtype != torch.float32 or not math.isfinite(float(images.sum())):
        raise AssertionError(f"node {node_id}: IMAGE must hold finite float32 values")
    if float(images.min()) < 0.0 or float(images.max()) > 1.0:
        raise AssertionError(f"node {node_id}: IMAGE values must lie in 0..1")


def input_types_from_object_info(object_info: dict) -> Callable[[str], dict | None]:
    """INPUT_TYPES lookups answered from a real ComfyUI's GET /object_info."""

    def lookup(class_type: str):
        info = object_info.get(class_type)
        if info is None:
            return None
        declared = info.get("input", {})
        order = info.get("input_order", {})
        out = {}
        for section in ("required", "optional"):
            specs = declared.get(section) or {}
            names = order.get(section) or list(specs)
            out[section] = {name: tuple(specs[name]) for name in names if name in specs}
        return out

    return lookup
