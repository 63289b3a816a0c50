"""The ComfyUI node pack without ComfyUI: imports, ids, inputs generated from the engine's fields, and
what the nodes do (toggles describe, samplers run, errors carry the engine's fix-it message).

Nothing here imports or imitates ComfyUI; the host integration is checked against a real ComfyUI in
test_comfy_real_host.py. Nodes are called under torch.inference_mode(), as ComfyUI calls them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from sdaccel.nodes import NODE_CLASS_MAPPINGS as NODES
from sdaccel.nodes import NODE_DISPLAY_NAME_MAPPINGS as NAMES
from sdaccel.nodes import host
from sdaccel.nodes.generation import STATS_KEY, badge_lines, engine_cache
from sdaccel.nodes.inputs import EMPTY, widget
from sdaccel.nodes.pipe import PIPE, SDAccelPipe
from sdaccel.nodes.toggles import node_id
from sdaccel.optim.core.registry import all_units
from sdaccel.optim.run.sampler import run
from sdaccel.optim.spec.errors import CheckpointError, ConfigError, ConflictError, GenerationInterrupted
from sdaccel.optim.spec.fields import describe
from sdaccel.optim.spec.model_ref import ModelRef
from sdaccel.optim.spec.pipeline import GenerationRequest, PipelineSpec

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = dict(prompt="a red fox", negative_prompt="", width=64, height=64, steps=3, cfg=7.0, seed=5,
              scheduler="auto", batch_size=1)
LOADER_DEFAULTS = dict(family="auto", prediction_type="auto", config_dir="", device="cpu")

# Node ids are forever: renaming one breaks every saved workflow. Extend this list, never edit it.
STABLE_IDS = ["SDAccelLoader", "SDAccelLora", "SDAccelPrecision", "SDAccelAttention", "SDAccelChannelsLast",
              "SDAccelWinograd", "SDAccelDeepCache", "SDAccelTome", "SDAccelFreeU", "SDAccelVAE", "SDAccelOffload",
              "SDAccelCompile",
              "SDAccelCFGCutoff", "SDAccelRefinerEnsemble", "SDAccelSampler", "SDAccelSamplerImg2Img",
              "SDAccelWinogradModel", "SDAccelDeepCacheModel", "SDAccelCFGCutoffModel",
              "SDAccelCompileModel", "SDAccelPrecisionModel", "SDAccelAttentionModel", "SDAccelFitToMemory",
              "SDAccelStream"]


def call(node_type: str, **inputs):
    """Call a node the way ComfyUI does: a fresh instance, its FUNCTION, under inference mode."""
    cls = NODES[node_type]
    with torch.inference_mode():
        return getattr(cls(), cls.FUNCTION)(**inputs)


def defaults(node_type: str) -> dict:
    """Every widget at its declared default (what a freshly added node holds)."""
    required = NODES[node_type].INPUT_TYPES()["required"]
    return {name: spec[1]["default"] for name, spec in required.items()
            if len(spec) > 1 and "default" in spec[1]}


def toggle(pipe, kind: str, **fields):
    node = node_id(kind)
    return call(node, pipe=pipe, **{**{k: v for k, v in defaults(node).items() if k != "pipe"}, **fields})[0]


def load(path: str, **fields) -> SDAccelPipe:
    return call("SDAccelLoader", ckpt_name=host.USE_PATH, path=path, **{**LOADER_DEFAULTS, **fields})[0]


@pytest.fixture
def shared_cache():
    """The process-wide cache the nodes use, emptied before and after."""
    cache = engine_cache()
    cache.clear()
    yield cache
    cache.clear()


# ---------------------------------------------------------------- the pack as ComfyUI imports it


def test_pack_imports_without_comfyui_and_does_no_work(tmp_path):
    """Import the repo root the way ComfyUI does (a path-named package), in a fresh interpreter."""
    code = f"""
import importlib.util, json, os, sys
before = set(os.listdir({str(tmp_path)!r}))
spec = importlib.util.spec_from_file_location({str(tmp_path / "pack")!r}, {str(ROOT / "__init__.py")!r},
                                              submodule_search_locations=[{str(ROOT)!r}])
module = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = module
spec.loader.exec_module(module)
print(json.dumps({{"ids": sorted(module.NODE_CLASS_MAPPINGS), "web": module.WEB_DIRECTORY,
                  "names": len(module.NODE_DISPLAY_NAME_MAPPINGS),
                  "comfy": sorted(m for m in sys.modules if m == "comfy" or m.startswith(("comfy.", "folder_paths"))),
                  "cuda_initialized": __import__("torch").cuda.is_initialized(),
                  "new_files": sorted(set(os.listdir({str(tmp_path)!r})) - before)}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info["ids"] == sorted(STABLE_IDS) and info["names"] == len(STABLE_IDS)
    assert info["web"] == "./js" and (ROOT / "js").is_dir()
    assert info["comfy"] == [] and not info["cuda_initialized"] and info["new_files"] == []


def test_node_ids_categories_and_names_are_stable():
    assert list(NODES) == STABLE_IDS
    assert set(NAMES) == set(NODES) and all(name.startswith("SDAccel ") for name in NAMES.values())
    for node_type, cls in NODES.items():
        assert cls.CATEGORY.startswith("sdaccel/"), node_type
        assert cls.DESCRIPTION and callable(getattr(cls, cls.FUNCTION)) and cls.RETURN_TYPES
        assert len(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES)) == len(cls.RETURN_TYPES)


def test_one_toggle_node_per_registered_unit():
    toggles = {n for n, cls in NODES.items() if getattr(cls, "KIND", "")}
    assert toggles == {node_id(kind) for kind in all_units()}
    for kind, unit in all_units().items():
        cls = NODES[node_id(kind)]
        assert cls.config_cls() is unit.config_cls and NAMES[node_id(kind)] == f"SDAccel {unit.title}"
        assert cls.RETURN_TYPES == (PIPE,) and cls.INPUT_TYPES()["required"]["pipe"][0] == PIPE


# ---------------------------------------------------------------- inputs are the engine's fields


def _assert_widget_matches(spec: tuple, info, *, empty: bool = False):
    kind, options = spec
    assert options["tooltip"].startswith(info.tooltip)
    if info.choices is not None:
        assert kind == list(info.choices) and options["default"] == info.default
        return
    expected = {bool: "BOOLEAN", int: "INT", float: "FLOAT", str: "STRING"}[info.kind]
    assert kind == expected, info.name
    default = info.default if info.default is not None else info.ui_default
    if empty and info.optional:
        assert options["min"] == EMPTY and options["default"] == EMPTY
    else:
        assert options["default"] == default
        if info.min is not None:
            assert options["min"] == info.min
    if info.max is not None:
        assert options["max"] == info.max
    if info.step is not None:
        assert options["step"] == info.step


@pytest.mark.parametrize("kind", list(all_units()))
def test_toggle_inputs_are_the_units_config_fields(kind):
    cls = NODES[node_id(kind)]
    types = cls.INPUT_TYPES()
    inputs = {**types["required"], **types.get("optional", {})}  # fields added later are optional inputs
    fields = [info for info in describe(all_units()[kind].config_cls) if info.ui]
    assert list(inputs) == ["pipe"] + [info.name for info in fields]
    for info in fields:
        _assert_widget_matches(inputs[info.name], info)


def test_sampler_loader_and_cutoff_inputs_are_the_engine_fields():
    request = {info.name: info for info in describe(GenerationRequest)}
    sampler = NODES["SDAccelSampler"].INPUT_TYPES()["required"]
    assert list(sampler) == ["pipe", "prompt", "negative_prompt", "width", "height", "steps", "cfg", "seed",
                             "scheduler", "batch_size", "keep_loaded"]
    for name in list(sampler)[1:-1]:
        _assert_widget_matches(sampler[name], request[name])
    img2img = NODES["SDAccelSamplerImg2Img"].INPUT_TYPES()["required"]
    assert list(img2img)[:2] == ["pipe", "image"] and img2img["image"][0] == "IMAGE" and "strength" in img2img
    _assert_widget_matches(img2img["strength"], request["strength"])
    cutoff = NODES["SDAccelCFGCutoff"].INPUT_TYPES()["required"]
    assert list(cutoff) == ["pipe", "cfg_cutoff", "cfg_cutoff_step"]
    _assert_widget_matches(cutoff["cfg_cutoff"], request["cfg_cutoff"])
    _assert_widget_matches(cutoff["cfg_cutoff_step"], request["cfg_cutoff_step"], empty=True)
    loader = NODES["SDAccelLoader"].INPUT_TYPES()["required"]
    model = {info.name: info for info in describe(ModelRef)}
    assert list(loader) == ["ckpt_name", "path", "family", "prediction_type", "config_dir", "device"]
    assert loader["ckpt_name"][0] == [host.USE_PATH]  # outside ComfyUI: no model folders to list
    for name in ("path", "family", "prediction_type", "config_dir"):
        _assert_widget_matches(loader[name], model[name])
    _assert_widget_matches(loader["device"], {i.name: i for i in describe(PipelineSpec)}["device"])


def test_widget_generation_covers_every_kind():
    infos = {i.name: i for i in describe(GenerationRequest)}
    assert widget(infos["seed"]) == ("INT", {"default": 0, "min": 0, "max": 2**64 - 1, "step": 1,
                                             "tooltip": infos["seed"].tooltip})
    assert widget(infos["width"])[1]["default"] == 512 and widget(infos["width"])[1]["step"] == 8
    assert widget(infos["cfg"])[0] == "FLOAT" and widget(infos["prompt"])[1]["multiline"] is True
    empty = widget(infos["cfg_cutoff_step"], empty=True)[1]
    assert empty["min"] == EMPTY and empty["default"] == EMPTY and "(-1 = empty)" in empty["tooltip"]
    assert widget(infos["cfg_cutoff_step"])[1]["min"] == 0  # without empty: the plain range


# ---------------------------------------------------------------- what the nodes do


def test_loader_describes_without_loading_and_names_bad_paths(checkpoints, shared_cache, tmp_path):
    ref = checkpoints.get("sd15")
    pipe = load(ref.path, family="sd15")
    assert pipe.spec.model == ModelRef(path=ref.path, family="sd15") and pipe.spec.device == "cpu"
    assert len(shared_cache) == 0
    with pytest.raises(CheckpointError, match="missing.safetensors"):
        load(str(tmp_path / "missing.safetensors"))
    with pytest.raises(ConfigError, match="path"):
        call("SDAccelLoader", ckpt_name=host.USE_PATH, path="", **LOADER_DEFAULTS)
    with pytest.raises(CheckpointError, match="v1-5-pruned-emaonly.safetensors"):
        call("SDAccelLoader", ckpt_name="v1-5-pruned-emaonly.safetensors", path="", **LOADER_DEFAULTS)
    assert load("synthetic-tiny:sd15").spec.model.is_synthetic


def test_toggles_clone_and_describe_in_canonical_order(shared_cache):
    base = load("synthetic-tiny:sd15")
    loads, applies = shared_cache.loads, shared_cache.applies
    a = toggle(toggle(base, "vae", slicing=True), "channels_last", unet=True)
    b = toggle(toggle(base, "channels_last", unet=True), "vae", slicing=True)
    assert (shared_cache.loads, shared_cache.applies, len(shared_cache)) == (loads, applies, 0)  # nothing loaded
    assert a == b and [c.kind for c in a.spec.optimizations] == ["precision", "channels_last", "vae"]
    assert base.spec.optimizations == PipelineSpec(model=base.spec.model, device="cpu").optimizations  # untouched
    again = toggle(a, "vae", tiling=True)
    assert again.spec.optimization("vae").tiling and not again.spec.optimization("vae").slicing  # replaced


def test_a_combination_that_cannot_work_raises_the_engines_fix_it_message():
    compiled = toggle(load("synthetic-tiny:sd15"), "compile")
    with pytest.raises(ConflictError) as caught:
        toggle(compiled, "offload", mode="staged")
    message = str(caught.value)
    assert "offload + compile" in message or "compile + offload" in message
    assert all_units()["offload"].config_cls.conflicts["compile"] in message
    with pytest.raises(ConfigError, match="cache_interval"):
        toggle(load("synthetic-tiny:sd15"), "deepcache", cache_interval=0)


def test_cfg_cutoff_node_sets_per_run_settings_and_minus_one_means_empty():
    pipe = call("SDAccelCFGCutoff", pipe=load("synthetic-tiny:sd15"), cfg_cutoff=0.5, cfg_cutoff_step=EMPTY)[0]
    assert dict(pipe.run_settings) == {"cfg_cutoff": 0.5, "cfg_cutoff_step": None}
    assert pipe.request(prompt="x").cfg_cutoff == 0.5 and pipe.spec.optimizations == load(
        "synthetic-tiny:sd15").spec.optimizations
    stepped = call("SDAccelCFGCutoff", pipe=pipe, cfg_cutoff=1.0, cfg_cutoff_step=2)[0]
    assert stepped.request().cfg_cutoff_step == 2 and "cfg_cutoff_step=2" in stepped.toggles()


def test_sampler_returns_comfy_types_equal_to_the_engine_run(checkpoints, shared_cache):
    pipe = toggle(load(checkpoints.get("sd15").path), "channels_last")
    out = call("SDAccelSampler", pipe=pipe, keep_loaded=True, **{**SAMPLE, "width": 72, "batch_size": 2})
    image, latent, stats = out["result"]
    assert image.shape == (2, 64, 72, 3) and image.dtype == torch.float32
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    reference = run(pipe.spec, GenerationRequest(**{**SAMPLE, "width": 72, "batch_size": 2}), cache=shared_cache)
    torch.testing.assert_close(image, reference.images_tensor)
    # LATENT holds the raw VAE latent: the diffusers latent divided by the VAE scaling factor
    torch.testing.assert_close(latent["samples"], reference.latents / reference.vae_scaling_factor)
    assert reference.vae_scaling_factor != 1.0 and latent["samples"].shape == (2, 4, 8, 9)
    assert stats.startswith("sd15 txt2img 72x64x2") and "channels_last" in stats
    badge = out["ui"][STATS_KEY][0]
    assert badge["toggles"] == ["channels_last"] and badge["lines"][2] == "toggles: channels_last"
    assert json.loads(json.dumps(out["ui"])) == out["ui"]  # JSON-native: reaches the browser unchanged


def test_img2img_passes_the_image_and_strength_to_the_engine(checkpoints, shared_cache):
    pipe = load(checkpoints.get("sd15").path)
    source = call("SDAccelSampler", pipe=pipe, keep_loaded=True, **{**SAMPLE, "width": 72})["result"][0]
    args = dict(prompt="a red fox", negative_prompt="", steps=4, cfg=7.0, seed=5, scheduler="euler",
                keep_loaded=True)
    weak = call("SDAccelSamplerImg2Img", pipe=pipe, image=source, strength=0.5, **args)["result"]
    strong = call("SDAccelSamplerImg2Img", pipe=pipe, image=source, strength=1.0, **args)["result"]
    assert weak[0].shape == source.shape == (1, 64, 72, 3)  # the source's size
    assert "img2img 72x64x1 Euler 2/4 steps" in weak[2] and "4/4 steps" in strong[2]
    reference = run(pipe.spec, GenerationRequest(prompt="a red fox", steps=4, cfg=7.0, seed=5, scheduler="euler",
                                                 init_image=source, strength=0.5), cache=shared_cache)
    torch.testing.assert_close(weak[0], reference.images_tensor)


def test_interrupt_stops_between_steps_and_leaves_the_pipeline_usable(checkpoints, shared_cache, monkeypatch):
    pipe = load(checkpoints.get("sd15").path)
    polls = []

    def interrupted_after_two_polls():
        polls.append(1)
        return len(polls) > 2

    monkeypatch.setattr(host, "interrupt_check", lambda: interrupted_after_two_polls)
    with pytest.raises(GenerationInterrupted) as caught:
        call("SDAccelSampler", pipe=pipe, keep_loaded=True, **SAMPLE)
    assert caught.value.step == 2 and len(polls) == 3  # polled before every step, stopped before the third
    monkeypatch.setattr(host, "interrupt_check", lambda: None)
    stats = call("SDAccelSampler", pipe=pipe, keep_loaded=True, **SAMPLE)["result"][2]
    assert "cache hit" in stats and "3/3 steps" in stats  # same prepared pipeline, not reloaded


def test_progress_is_reported_for_every_step(checkpoints, shared_cache, monkeypatch):
    seen = []
    monkeypatch.setattr(host, "progress_callback", lambda: lambda step, total: seen.append((step, total)))
    call("SDAccelSampler", pipe=load(checkpoints.get("sd15").path), keep_loaded=True, **SAMPLE)
    assert seen == [(1, 3), (2, 3), (3, 3)]


def test_keep_loaded_off_releases_the_prepared_pipeline(checkpoints, shared_cache):
    pipe = load(checkpoints.get("sd15").path)
    call("SDAccelSampler", pipe=pipe, keep_loaded=True, **SAMPLE)
    assert len(shared_cache) == 1
    call("SDAccelSampler", pipe=toggle(pipe, "freeu"), keep_loaded=False, **SAMPLE)
    assert len(shared_cache) == 0


def test_one_cache_entry_per_checkpoint_whatever_the_toggles(checkpoints, shared_cache):
    pipe = load(checkpoints.get("sd15").path)
    loads = shared_cache.loads
    for variant in (pipe, toggle(pipe, "channels_last"), toggle(pipe, "freeu"), pipe):
        call("SDAccelSampler", pipe=variant, keep_loaded=True, **SAMPLE)
    assert len(shared_cache) == 1 and shared_cache.loads == loads + 1  # read once, re-optimized in memory


def test_compile_runs_under_comfyuis_inference_mode(checkpoints, shared_cache):
    """Weights loaded inside inference mode break frozen compiled graphs; the sampler must avoid that."""
    pipe = toggle(load(checkpoints.get("sd15").path), "compile", backend="inductor", freezing=True)
    out = call("SDAccelSampler", pipe=pipe, keep_loaded=True, **{**SAMPLE, "steps": 2})
    assert out["result"][0].shape == (1, 64, 64, 3) and "compile (inductor): built" in out["result"][2]
    assert out["ui"][STATS_KEY][0]["toggles"] == ["compile(freezing=True)"]


def test_refiner_ensemble_node_runs_both_experts_and_toggles_reach_both(checkpoints, shared_cache):
    base, refiner = load(checkpoints.get("sdxl-base").path), load(checkpoints.get("sdxl-refiner").path)
    pipe = call("SDAccelRefinerEnsemble", base=base, refiner=refiner, switch_at=0.5)[0]
    pipe = toggle(pipe, "channels_last")
    assert pipe.spec.base.optimization("channels_last") and pipe.spec.refiner.optimization("channels_last")
    assert pipe.spec.refiner.model == refiner.spec.model and pipe.spec.switch_at == 0.5
    image, latent, stats = call("SDAccelSampler", pipe=pipe, keep_loaded=True, **{**SAMPLE, "steps": 4})["result"]
    assert image.shape == (1, 64, 64, 3) and stats.startswith("sdxl-base+sdxl-refiner ensemble(switch_at=0.5)")
    assert "refiner steps" in stats
    with pytest.raises(ConfigError, match="text-to-image"):
        call("SDAccelSamplerImg2Img", pipe=pipe, image=image, prompt="x", negative_prompt="", strength=0.5, steps=4,
             cfg=5.0, seed=1, scheduler="auto", keep_loaded=True)
    with pytest.raises(ConfigError, match="already an ensemble"):
        call("SDAccelRefinerEnsemble", base=pipe, refiner=refiner, switch_at=0.9)


def test_unavailable_options_fall_back_with_a_note_in_the_stats(checkpoints, shared_cache):
    pipe = toggle(load(checkpoints.get("sd15").path), "attention", backend="xformers")
    out = call("SDAccelSampler", pipe=pipe, keep_loaded=True, **SAMPLE)
    assert "note: " in out["result"][2] and "xformers" in out["result"][2]
    badge = out["ui"][STATS_KEY][0]
    assert any(line.startswith("note: ") for line in badge["lines"])
    # the badge and the stats show what ran (the sdpa fallback), not what was asked for
    assert badge["toggles"] == ["attention"] and badge["requested"] == ["attention(backend=xformers)"]
    assert "toggles: attention" in badge["lines"] and "opts attention |" not in out["result"][2]
    assert out["result"][2].split("\n")[0].endswith("opts attention")


def test_badge_lines_show_time_speed_memory_and_toggles(checkpoints, shared_cache):
    result = run(PipelineSpec(model=checkpoints.get("sd15"), device="cpu"), GenerationRequest(**SAMPLE),
                 cache=shared_cache)
    lines = badge_lines(result.stats, ["channels_last", "cfg_cutoff=0.5"])
    assert lines[0] == f"{result.stats.total_s:.2f} s  |  {result.stats.it_per_s:.2f} it/s  |  3/3 steps"
    assert lines[1].startswith(f"peak {result.stats.peak_mem_mb:.0f} MB (process RSS peak)")
    assert lines[2] == "toggles: channels_last, cfg_cutoff=0.5"


def test_host_helpers_answer_plainly_outside_comfyui():
    assert not host.in_comfyui()
    assert host.checkpoint_choices() == [host.USE_PATH] and host.resolve_checkpoint("x.safetensors") is None
    assert host.resolve_model_file("vae", "path", "taesd_decoder.pth") == "taesd_decoder.pth"
    assert host.progress_callback() is None and host.interrupt_check() is None
    assert host.register_routes(engine_cache) is False
    with pytest.raises(GenerationInterrupted):
        host.raise_interrupted(GenerationInterrupted(1, 3))


# ---------------------------------------------------------------- frontend extension and packaging


# The extension itself is checked in ComfyUI's page: tests/test_comfy_real_host.py (the badge test).


def test_pyproject_has_the_comfy_registry_table_and_ships_the_pack():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    comfy = project["tool"]["comfy"]
    assert comfy["PublisherId"] and comfy["DisplayName"] == "SDAccel" and "Icon" in comfy
    assert comfy["web"] == "js" and (ROOT / comfy["web"]).is_dir()
    setuptools = project["tool"]["setuptools"]
    assert "sdaccel.nodes" in setuptools["packages"]
    data = setuptools["package-data"]["sdaccel"]
    assert "js/*.js" in data and "example_workflows/*.json" in data


def test_readme_comfyui_section_lists_every_node_and_the_fastest_walkthrough():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("\n## ComfyUI\n"):]
    for node_type, cls in NODES.items():
        row = next((line for line in section.splitlines() if line.startswith(f"| `{node_type}` |")), None)
        assert row is not None, f"{node_type} missing from the README node table"
        assert NAMES[node_type] in row and cls.CATEGORY in row
        for name in cls.INPUT_TYPES()["required"]:
            assert name in row, f"README row of {node_type} lacks input {name}"
    assert "custom_nodes" in section and "ComfyUI-Manager" in section and "fastest" in section


def test_lora_node_adds_to_the_pipe_and_the_sampler_merges_it(checkpoints, shared_cache, tmp_path):
    from sdaccel.optim.spec.lora import LoraRef
    from sdaccel.optim.testing.lora import random_lora

    lora = random_lora(checkpoints.pipeline("sd15"), tmp_path / "style.safetensors")
    base = load(checkpoints.get("sd15").path)
    pipe = call("SDAccelLora", pipe=base, lora_name=host.USE_PATH, strength=0.7, path=str(lora))[0]
    assert pipe.spec.loras == (LoraRef(str(lora), 0.7),) and base.spec.loras == ()  # cloned, not changed
    assert "lora(style.safetensors:0.7)" in pipe.toggles()
    plain = call("SDAccelSampler", pipe=base, keep_loaded=True, **SAMPLE)["result"][0]
    merged = call("SDAccelSampler", pipe=pipe, keep_loaded=True, **SAMPLE)["result"][0]
    assert not torch.equal(plain, merged)
    torch.testing.assert_close(merged, run(pipe.spec, GenerationRequest(**SAMPLE), cache=shared_cache).images_tensor)
    bypassed = call("SDAccelSampler", pipe=base, keep_loaded=True, **SAMPLE)["result"][0]
    assert torch.equal(bypassed, plain)  # the node bypassed: the checkpoint's own image again
    with pytest.raises(CheckpointError, match="missing.safetensors"):
        call("SDAccelLora", pipe=base, lora_name=host.USE_PATH, strength=1.0,
             path=str(tmp_path / "missing.safetensors"))
    with pytest.raises(ConfigError, match="no LoRA chosen"):
        call("SDAccelLora", pipe=base, lora_name=host.USE_PATH, strength=1.0, path="")


def test_fit_to_memory_adds_the_planned_toggles_and_says_why(shared_cache, plan_dir):
    from sdaccel.nodes.pipe import SDAccelPipe
    from sdaccel.optim.spec.model_ref import ModelRef
    from sdaccel.optim.spec.pipeline import PipelineSpec

    base = SDAccelPipe(spec=PipelineSpec(model=ModelRef.synthetic("sd15", tiny=True), device="cpu"))
    pipe, plan = call("SDAccelFitToMemory", pipe=base, budget_gb=1000.0, width=64, height=64, steps=2,
                      quality="lossless", measure="when missing or stale", tiny_vae="")
    chosen = plan.splitlines()[0].removeprefix("choice: ")
    assert "lossless" in plan and "CHOSEN" in plan
    from sdaccel.optim.bench.presets import resolve_preset

    kinds = {c.kind for c in pipe.spec.optimizations} - {"precision"}  # (every spec has one; "auto" here)
    assert kinds == {c.kind for c in resolve_preset(chosen).configs()} - {"precision"}
    assert not {"deepcache", "tome", "vae"} & kinds  # lossless only
    assert [c.kind for c in base.spec.optimizations] == ["precision"]  # the input pipe is left as it was
    image = call("SDAccelSampler", pipe=pipe, keep_loaded=False, **{**SAMPLE, "steps": 2})["result"][0]
    assert image.shape == (1, 64, 64, 3)
    with pytest.raises(ConfigError, match="--measure"):
        call("SDAccelFitToMemory", pipe=base, budget_gb=1000.0, width=128, height=128, steps=2, quality="any",
             measure="never (fail instead)", tiny_vae="")


def test_stream_node_gives_one_image_per_frame_as_the_engine_streams_them(checkpoints, shared_cache):
    from sdaccel.nodes.pipe import SDAccelPipe
    from sdaccel.optim.spec.ensemble import EnsembleSpec
    from sdaccel.optim.spec.pipeline import PipelineSpec
    from sdaccel.optim.stream.pipeline import StreamPipeline
    from sdaccel.optim.stream.settings import StreamSettings

    gen = torch.Generator().manual_seed(0)
    frames = torch.rand(5, 64, 72, 3, generator=gen)  # 72 wide: the stream takes 72 (a multiple of 8)
    pipe = load(checkpoints.get("sd15").path)
    given = {**defaults("SDAccelStream"), "prompt": "ink", "steps": 2, "scheduler": "lcm", "cfg_mode": "self"}
    given.pop("pipe", None)
    out = call("SDAccelStream", pipe=pipe, images=frames, **given)
    images, text = out["result"]
    assert images.shape == (5, 64, 72, 3) and "fps" in text and "5 frames" in text
    assert out["ui"]["sdaccel_stats"][0]["stream"]["frames_out"] == 5
    settings = StreamSettings(width=72, height=64, **{k: v for k, v in given.items()
                                                       if k not in ("images",)})
    with torch.inference_mode(), shared_cache.use(pipe.spec) as prepared, \
            StreamPipeline(prepared, settings) as stream:
        expected = [o.image for i in range(5) for o in stream.push(frames[i:i + 1].permute(0, 3, 1, 2), i)]
        expected += [o.image for o in stream.flush()]
    assert torch.allclose(images, torch.stack(expected), atol=1e-5)
    with pytest.raises(ConfigError, match="images"):
        call("SDAccelStream", pipe=pipe, images=frames[0], **given)
    ensemble = SDAccelPipe(spec=EnsembleSpec(base=pipe.spec, refiner=PipelineSpec(model=pipe.spec.model)))
    with pytest.raises(ConfigError, match="refiner ensemble"):
        call("SDAccelStream", pipe=ensemble, images=frames, **given)
