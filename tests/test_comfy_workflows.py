"""The shipped example workflows, without ComfyUI: generated from the presets, well-formed, and runnable.

Each UI-format workflow is turned into a prompt the way ComfyUI's frontend does (positional widget
values, the control value after seed widgets, notes dropped) and executed with our node classes on
tiny checkpoints (sizes and steps overridden here, never in the shipped files). The pipe reaching the
sampler must be exactly the spec the bench preset builds, so each workflow reproduces its preset.
"""

from __future__ import annotations

from pathlib import Path

import comfy_examples as examples
import pytest
import torch
from comfy_runner import (
    SINKS,
    VIRTUAL_NODES,
    link_inputs,
    load_workflow,
    override,
    run_prompt,
    ui_to_api,
    widget_inputs,
)
from sdaccel.nodes import NODE_CLASS_MAPPINGS
from sdaccel.nodes.host import USE_PATH
from sdaccel.nodes.pipe import SDAccelPipe
from sdaccel.nodes.toggles import node_id
from sdaccel.optim.bench.presets import PRESETS
from sdaccel.optim.core.registry import all_units
from sdaccel.optim.spec.ensemble import EnsembleSpec
from sdaccel.optim.spec.pipeline import GenerationRequest, PipelineSpec

EXAMPLES = Path(__file__).resolve().parent.parent / "example_workflows"
WORKFLOWS = sorted(EXAMPLES.glob("*.json"))
TEST_SIZE, TEST_STEPS = 64, 3
REGENERATE = "run `python tests/comfy_examples.py` to regenerate example_workflows/"


def _types(class_type: str):
    if class_type in SINKS:
        return SINKS[class_type]
    cls = NODE_CLASS_MAPPINGS.get(class_type)
    return cls.INPUT_TYPES() if cls is not None else None


def _prompt(path: Path) -> dict:
    return ui_to_api(load_workflow(path), _types)


def test_shipped_workflows_are_the_generated_ones():
    """Presets or node inputs changed without the workflows following would fail here."""
    plans = examples.plans()
    assert sorted(p.name + ".json" for p in plans) == [p.name for p in WORKFLOWS], REGENERATE
    for plan in plans:
        shipped = (EXAMPLES / f"{plan.name}.json").read_text(encoding="utf-8")
        assert shipped == examples.dumps(examples.build(plan)), f"{plan.name}.json is stale: {REGENERATE}"


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
    notes = [n for n in nodes.values() if n["type"] in VIRTUAL_NODES]
    assert len(notes) == 1 and "Reproduces" in notes[0]["widgets_values"][0]
    assert sum(n["type"] == "SaveImage" for n in nodes.values()) == 1
    for link_id, src, src_slot, dst, dst_slot, kind in workflow["links"]:
        assert nodes[src]["outputs"][src_slot]["type"] == kind and link_id in nodes[src]["outputs"][src_slot]["links"]
        assert nodes[dst]["inputs"][dst_slot]["type"] == kind and nodes[dst]["inputs"][dst_slot]["link"] == link_id
    for node in nodes.values():
        if node["type"] in VIRTUAL_NODES or node["type"] in SINKS:
            continue
        types = NODE_CLASS_MAPPINGS[node["type"]].INPUT_TYPES()
        expected = sum(2 if control else 1 for _, _, control in widget_inputs(types))
        assert len(node["widgets_values"]) == expected, node["type"]
        assert [i["name"] for i in node["inputs"]] == [name for name, _ in link_inputs(types)]


def test_seed_is_followed_by_its_control_value():
    """The frontend stores 'fixed'/'randomize' after a seed; the runner must skip it, not shift the inputs."""
    prompt = _prompt(EXAMPLES / "baseline.json")
    sampler = next(n for n in prompt.values() if n["class_type"] == "SDAccelSampler")["inputs"]
    assert sampler["seed"] == examples.SEED and sampler["scheduler"] == "auto" and sampler["batch_size"] == 1
    assert sampler["keep_loaded"] is True and "control_after_generate" not in sampler


def _expected(path: Path, pipe: SDAccelPipe) -> tuple[PipelineSpec, GenerationRequest]:
    """What the bench runs for this workflow's preset, from the same model: (spec, request).

    The one intended difference: where the bench decodes with random-weight VAEs ('synthetic'), the
    workflow names the weight file a user puts in ComfyUI's model folders.
    """
    plan = {p.name: p for p in examples.plans()}[path.stem]
    base = pipe.specs()[0]
    spec = PipelineSpec(model=base.model, device=base.device)
    request = GenerationRequest(steps=examples.BASELINE_STEPS)
    preset = PRESETS.get(path.stem)
    if preset is not None:
        spec, request = preset.apply(spec, request)
    else:
        for kind, fields in plan.optimizations:
            spec = spec.with_optimization(all_units()[kind].config_cls(**fields))
    vae = spec.optimization("vae")
    if vae is not None and vae.path == "synthetic":
        spec = spec.with_optimization(vae.with_(**examples.user_values("vae", vae.to_dict(), plan.model)))
        assert spec.optimization("vae").path in (plan.model.tiny_vae, plan.model.fp16_fix_vae)
    return spec, request


def _tiny_checkpoints(prompt: dict, checkpoints) -> dict:
    """Shipped checkpoint name -> a tiny checkpoint of the same family (and layout) written for the tests."""
    out = {}
    for node in prompt.values():
        if node["class_type"] == "SDAccelLoader":
            name = node["inputs"]["ckpt_name"]
            layout = "diffusers" if name.startswith("diffusers/") else "single"
            out[name] = checkpoints.get(examples.MODELS[name].family, layout=layout).path
    return out


def _node(prompt: dict, class_type: str) -> str:
    return next(node_id for node_id, node in prompt.items() if node["class_type"] == class_type)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_builds_exactly_what_its_bench_preset_runs(path, checkpoints):
    """Only the checkpoint is swapped: every toggle value, the CFG cutoff and the steps are the shipped ones."""
    shipped = _prompt(path)
    tiny = _tiny_checkpoints(shipped, checkpoints)
    prompt = override(shipped, lambda t, inputs: {"ckpt_name": USE_PATH, "path": tiny[inputs["ckpt_name"]]}
                      if t == "SDAccelLoader" else {})
    sampler = prompt[_node(prompt, "SDAccelSampler")]
    pipe_id = sampler["inputs"]["pipe"][0]
    pipe = run_prompt(prompt, NODE_CLASS_MAPPINGS, targets=[pipe_id]).results[pipe_id][0]
    spec, request = _expected(path, pipe)
    assert pipe.specs()[0] == spec
    assert pipe.request(steps=sampler["inputs"]["steps"]) == request
    if path.stem == "refiner-ensemble":
        assert isinstance(pipe.spec, EnsembleSpec) and pipe.spec.switch_at == 0.9
        assert pipe.spec.refiner.model.path == tiny[examples.SDXL_REFINER.ckpt_name]
    else:
        assert isinstance(pipe.spec, PipelineSpec)


@pytest.fixture(scope="module")
def engine_cache():
    from sdaccel.nodes.generation import engine_cache as cache_fn

    cache = cache_fn()
    cache.clear()
    yield cache
    cache.clear()


def _compiles(path: Path) -> bool:
    return any(node["type"] == "SDAccelCompile" for node in load_workflow(path)["nodes"])


# Compiling takes 15-80 s per workflow on two cores: those run with -m slow (and on the real host);
# test_comfy_nodes.py compiles once under inference mode in the default run.
RUNNABLE = [pytest.param(p, id=p.stem, marks=[pytest.mark.slow] if _compiles(p) else []) for p in WORKFLOWS]


@pytest.mark.parametrize("path", RUNNABLE)
def test_workflow_runs_in_process_on_tiny_models(path, checkpoints, engine_cache, tmp_path):
    shipped = _prompt(path)
    tiny = _tiny_checkpoints(shipped, checkpoints)

    def small(class_type: str, inputs: dict) -> dict:
        if class_type == "SDAccelLoader":
            return {"ckpt_name": USE_PATH, "path": tiny[inputs["ckpt_name"]]}
        if class_type == "SDAccelSampler":
            return {"width": TEST_SIZE, "height": TEST_SIZE, "steps": TEST_STEPS}
        if class_type == "SDAccelVAE" and inputs["variant"] != "default":
            return {"path": "synthetic"}  # no TAESD / fp16-fix weights here; the bench uses the same
        if class_type == "SDAccelOffload":
            return {"spill_dir": str(tmp_path)}
        if class_type == "SDAccelWinograd":
            return {"calibration_dir": str(tmp_path)}
        return {}

    outcome = run_prompt(override(shipped, small), NODE_CLASS_MAPPINGS)
    sampler_id, save_id = _node(shipped, "SDAccelSampler"), _node(shipped, "SaveImage")
    pipe = outcome.results[shipped[sampler_id]["inputs"]["pipe"][0]][0]
    image, latent, stats = outcome.results[sampler_id]
    assert outcome.saved[save_id] is image
    assert image.shape == (1, TEST_SIZE, TEST_SIZE, 3) and image.dtype == torch.float32
    assert set(latent) == {"samples"} and latent["samples"].shape[0] == 1
    assert latent["samples"].shape[-2:] == (TEST_SIZE // 8, TEST_SIZE // 8)
    family = examples.MODELS[shipped[_node(shipped, "SDAccelLoader")]["inputs"]["ckpt_name"]].family
    assert isinstance(stats, str) and stats.startswith(family) and f"{TEST_STEPS}/{TEST_STEPS} steps" in stats
    badge = outcome.ui[sampler_id]["sdaccel_stats"][0]
    assert badge["requested"] == pipe.toggles() and badge["total_s"] > 0
    fell_back = [n for n in badge["notes"] if "unavailable" in n]
    # the badge shows what ran: what was asked for, unless this machine lacked it (and a note says so)
    assert (badge["toggles"] == badge["requested"]) == (not fell_back), (badge["toggles"], fell_back)
    assert any("it/s" in line for line in badge["lines"]) and any("peak" in line for line in badge["lines"])
