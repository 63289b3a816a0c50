"""The shipped example workflows, without ComfyUI: generated from the presets and well-formed.

That each one runs in ComfyUI and reproduces its bench preset is checked in the real host
(tests/test_comfy_real_host.py: ComfyUI's own page converts it, ComfyUI's server runs it).
"""

from __future__ import annotations

from pathlib import Path

import comfy_examples as examples
import pytest
from comfy_examples import NOTE_NODES, link_inputs, widget_inputs
from comfy_host import load_workflow
from sdaccel.nodes import NODE_CLASS_MAPPINGS
from sdaccel.nodes.toggles import node_id
from sdaccel.optim.bench.presets import PRESETS
from sdaccel.optim.core.registry import all_units

EXAMPLES = Path(__file__).resolve().parent.parent / "example_workflows"
WORKFLOWS = sorted(EXAMPLES.glob("*.json"))
REGENERATE = "run `python tests/comfy_examples.py` to regenerate example_workflows/"


def test_shipped_workflows_are_the_generated_ones():
    """Presets or node inputs changed without the workflows following would fail here."""
    generated = {f"{p.name}.json": examples.build(p) for p in examples.plans()}
    generated.update({f"{examples.NATIVE_PREFIX}{p.name}.json": examples.build_native(p)
                      for p in examples.native_plans()})
    generated.update({f"{examples.STREAM_PREFIX}{p.name}.json": examples.build_stream(p)
                      for p in examples.stream_plans()})
    assert sorted(generated) == [p.name for p in WORKFLOWS], REGENERATE
    for name, workflow in generated.items():
        shipped = (EXAMPLES / name).read_text(encoding="utf-8")
        assert shipped == examples.dumps(workflow), f"{name} is stale: {REGENERATE}"


def test_ksampler_workflows_cover_every_model_patch_and_a_lora():
    native = [load_workflow(p) for p in WORKFLOWS if p.stem.startswith(examples.NATIVE_PREFIX)]
    used = {node["type"] for workflow in native for node in workflow["nodes"]}
    patches = {name for name, cls in NODE_CLASS_MAPPINGS.items() if cls.CATEGORY == "sdaccel/model_patches"}
    assert patches and patches <= used and {"KSampler", "LoraLoader", "CheckpointLoaderSimple"} <= used
    assert not used & {"SDAccelLoader", "SDAccelSampler"}  # ComfyUI's own model and sampler only


def test_stream_workflows_run_bench_streams_rows_on_a_loaded_video():
    from sdaccel.optim.bench.stream import TURBO_VARIANTS, VARIANTS

    for plan in examples.stream_plans():
        workflow = load_workflow(EXAMPLES / f"{examples.STREAM_PREFIX}{plan.name}.json")
        types = [node["type"] for node in workflow["nodes"]]
        assert plan.variant in TURBO_VARIANTS and VARIANTS[plan.variant].changes is not None  # a stream row
        assert {"SDAccelLoader", "LoadVideo", "GetVideoComponents", "SDAccelStream", "CreateVideo",
                "SaveVideo"} <= set(types)
        toggles = {node_id(kind) for kind, _ in VARIANTS[plan.variant].optimizations}
        assert toggles == set(types) & {node_id(kind) for kind in all_units()}, plan.name
        create = next(n for n in workflow["nodes"] if n["type"] == "CreateVideo")
        fps = next(i for i in create["inputs"] if i["name"] == "fps")
        source = next(link for link in workflow["links"] if link[0] == fps["link"])
        assert types[source[1] - 1] == "GetVideoComponents" and source[2] == 2  # the video's own frame rate


def test_every_preset_every_toggle_and_taiyi_have_a_workflow():
    names = {p.stem for p in WORKFLOWS}
    assert set(PRESETS) <= names
    assert {"baseline", "fastest", "under-4gb", "under-6gb", "under-8gb", "refiner-ensemble", "winograd",
            "taiyi-chinese-prompt"} <= names
    used = {node["type"] for path in WORKFLOWS for node in load_workflow(path)["nodes"]}
    toggles = {node_id(kind) for kind in all_units() if kind != "precision"} | {"SDAccelPrecision", "SDAccelCFGCutoff"}
    assert toggles <= used, f"toggle nodes in no workflow: {sorted(toggles - used)}"
    taiyi = load_workflow(EXAMPLES / "taiyi-chinese-prompt.json")
    sampler = next(n for n in taiyi["nodes"] if n["type"] == "SDAccelSampler")
    assert sampler["widgets_values"][0] == "长城, 清晨, 朦胧, 唯美, 插画"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_is_well_formed_ui_format(path):
    workflow = load_workflow(path)
    assert workflow["version"] == 0.4 and {"nodes", "links", "last_node_id", "last_link_id"} <= set(workflow)
    nodes = {n["id"]: n for n in workflow["nodes"]}
    assert len(nodes) == len(workflow["nodes"]) and workflow["last_node_id"] == max(nodes)
    notes = [n for n in nodes.values() if n["type"] in NOTE_NODES]
    assert len(notes) == 1 and "Reproduces" in notes[0]["widgets_values"][0]
    assert sum(n["type"] in ("SaveImage", "SaveVideo") for n in nodes.values()) == 1
    for link_id, src, src_slot, dst, dst_slot, kind in workflow["links"]:
        assert nodes[src]["outputs"][src_slot]["type"] == kind and link_id in nodes[src]["outputs"][src_slot]["links"]
        assert nodes[dst]["inputs"][dst_slot]["type"] == kind and nodes[dst]["inputs"][dst_slot]["link"] == link_id
    for node in nodes.values():
        if node["type"] in NOTE_NODES or node["type"] == "SaveImage":
            continue
        core = {**examples.CORE_NODES, **examples.STREAM_CORE_NODES}
        if node["type"] in core:  # ComfyUI's own nodes: their widgets are checked by its page
            links, outputs = core[node["type"]]
            assert [i["name"] for i in node["inputs"]] == [name for name, *_ in links]
            assert [o["type"] for o in node["outputs"]] == [kind for _, kind in outputs]
            continue
        types = NODE_CLASS_MAPPINGS[node["type"]].INPUT_TYPES()
        expected = sum(2 if control else 1 for _, _, control in widget_inputs(types))
        assert len(node["widgets_values"]) == expected, node["type"]
        assert [i["name"] for i in node["inputs"]] == [name for name, _ in link_inputs(types)]
