"""The pack inside a real ComfyUI: every example workflow converted by ComfyUI's own page and run by its server.

Runs when COMFYUI_PATH points at a ComfyUI checkout (see comfy_host.py; .ci/run uses the unmodified 0.3.64 tree
in ../shared/hosts). Each shipped workflow is loaded into the host's frontend in headless Chromium, turned
into a prompt there, shrunk (size and steps only) and queued through /prompt. The spec and request the
sampler reports must be exactly what `bench --preset NAME` runs, so each workflow reproduces its preset.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import comfy_examples as examples
import comfy_host
import pytest
from comfy_host import load_workflow

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "example_workflows"
ALL_WORKFLOWS = sorted(EXAMPLES.glob("*.json"))
WORKFLOWS = [p for p in ALL_WORKFLOWS  # KSampler ones: see tests/test_comfy_model_patches.py; stream ones: below
             if not p.stem.startswith((examples.NATIVE_PREFIX, examples.STREAM_PREFIX))]
TEST_SIZE, TEST_STEPS = 64, 3

pytestmark = pytest.mark.skipif(not comfy_host.COMFYUI_PATH, reason=comfy_host.SKIP_REASON)


LORA = "ink.safetensors"


def _write_lora(models: Path) -> None:
    """A LoRA in ComfyUI's models/loras for the SD 1.5 checkpoint the workflows use (same random architecture)."""
    from sdaccel.optim.testing.lora import random_lora
    from sdaccel.optim.testing.random_weights import build_pipeline

    pipe = build_pipeline(examples.SD15.family, tiny=True)
    for name in [LORA] + sorted({plan.lora for plan in examples.plans() if plan.lora}):  # + the few-step LoRAs
        random_lora(pipe, models / "loras" / name)


VIDEO_FRAMES, VIDEO_SIZE = 6, 64


def _write_video(path: Path) -> None:
    """A short clip in ComfyUI's input folder under the name the stream workflows' Load Video holds."""
    import av
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (VIDEO_SIZE, VIDEO_SIZE * 2, 3), dtype=np.uint8)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=12)
        stream.width = stream.height = VIDEO_SIZE
        stream.pix_fmt = "yuv420p"
        for i in range(VIDEO_FRAMES):  # a pattern sliding sideways
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(base[:, i * 4:i * 4 + VIDEO_SIZE]), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def _write_extra(models: Path) -> None:
    _write_lora(models)
    _write_video(models.parent / "input" / examples.VIDEO_NAME)


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    models = {name: model.family for name, model in examples.MODELS.items()}
    yield from comfy_host.start_server(tmp_path_factory.mktemp("comfy-base"), models, write_extra=_write_extra)


@pytest.fixture(scope="module")
def frontend(comfy):
    yield from comfy_host.open_frontend(comfy)


@pytest.fixture(scope="module")
def object_info(comfy):
    return comfy.request("/object_info", timeout=120)


# What the tests change in a shipped workflow, by node type: the sampler's size and step count, and the Winograd
# node's compiled transforms (twelve one-time inductor compiles, 7 minutes on two cores with a cold cache; the
# compiled path runs in tests/test_winograd.py). The expected spec gets the same changes.
SHRINK = {"SDAccelSampler": {"width": TEST_SIZE, "height": TEST_SIZE, "steps": TEST_STEPS},
          "SDAccelWinograd": {"fused_transforms": False}}


def _shrink(prompt: dict) -> dict:
    """A copy with SHRINK applied; nothing else changes."""
    out = json.loads(json.dumps(prompt))
    for node in out.values():
        node["inputs"].update(SHRINK.get(node["class_type"], {}))
    return out


def _node(prompt: dict, class_type: str) -> str:
    return next(node_id for node_id, node in prompt.items() if node["class_type"] == class_type)


def _prompt(frontend, name: str) -> dict:
    return _shrink(frontend.prompt(load_workflow(EXAMPLES / f"{name}.json")))


def test_pack_loads_and_serves_its_nodes_extension_and_templates(comfy, object_info, frontend):
    from sdaccel.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

    log = comfy.log.read_text(encoding="utf-8", errors="replace")
    ours = [line for line in log.splitlines() if line.rstrip().endswith("custom_nodes/sdaccel")]
    assert ours and not any("IMPORT FAILED" in line for line in ours), log[-6000:]
    for node_type, cls in NODE_CLASS_MAPPINGS.items():
        info = object_info[node_type]
        assert info["category"] == cls.CATEGORY and info["display_name"] == NODE_DISPLAY_NAME_MAPPINGS[node_type]
    choices = object_info["SDAccelLoader"]["input"]["required"]["ckpt_name"][0]
    assert set(examples.MODELS) <= set(choices) and choices[-1] == "(use path)"
    assert "/extensions/sdaccel/sdaccel_stats.js" in comfy.request("/extensions")
    templates = comfy.request("/workflow_templates")
    assert sorted(templates["sdaccel"]) == sorted(p.stem for p in ALL_WORKFLOWS)
    assert comfy.request("/api/workflow_templates/sdaccel/fastest.json") == load_workflow(EXAMPLES / "fastest.json")
    assert not frontend.our_errors(), frontend.our_errors()  # the page ran our extension without an error


def _expected(name: str, reported_spec: dict):
    """(spec, request) `bench --preset NAME` runs on the model the workflow loaded (its path as ComfyUI found it)."""
    from sdaccel.optim.bench.presets import PRESETS
    from sdaccel.optim.spec.lora import LoraRef
    from sdaccel.optim.spec.optimization import config_class
    from sdaccel.optim.spec.pipeline import GenerationRequest, PipelineSpec

    plan = {p.name: p for p in examples.plans()}[name]
    base = PipelineSpec.from_dict(reported_spec.get("base", reported_spec))
    spec = PipelineSpec(model=base.model, device=base.device)
    request = GenerationRequest(steps=examples.BASELINE_STEPS)
    if name in PRESETS:
        spec, request = PRESETS[name].apply(spec, request)
    else:
        for kind, fields in plan.optimizations:
            spec = spec.with_optimization(config_class(kind)(**fields))
    vae = spec.optimization("vae")
    if vae is not None and vae.path == "synthetic":  # the bench's random VAE is a file the user downloads
        wanted = examples.user_values("vae", vae.to_dict(), plan.model)["path"]
        found = base.optimization("vae").path
        assert Path(found).name == wanted, (found, wanted)
        spec = spec.with_optimization(vae.with_(path=found))
    winograd = spec.optimization("winograd")
    if winograd is not None:
        spec = spec.with_optimization(winograd.with_(**SHRINK["SDAccelWinograd"]))
    if plan.lora:  # the LoRA file the workflow names, as ComfyUI found it in models/loras
        found = base.loras[0].path
        assert Path(found).name == plan.lora, (found, plan.lora)
        spec = spec.with_(loras=(LoraRef(found, 1.0),))
    return spec, request


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_example_workflow_runs_and_reproduces_its_bench_preset(comfy, frontend, path):
    from sdaccel.nodes.sampler import SDAccelSampler
    from sdaccel.optim.bench.presets import PRESETS
    from sdaccel.optim.spec.ensemble import EnsembleSpec
    from sdaccel.optim.spec.pipeline import PipelineSpec

    shipped = frontend.prompt(load_workflow(path))
    prompt = _shrink(shipped)
    entry, seconds = comfy.run(prompt)
    status = entry["status"]
    assert status["status_str"] == "success", json.dumps(status["messages"], indent=1)[-4000:]
    save, sampler = _node(prompt, "SaveImage"), _node(prompt, "SDAccelSampler")
    images = entry["outputs"][save]["images"]
    assert len(images) == 1
    from PIL import Image

    with Image.open(comfy.base / "output" / images[0]["subfolder"] / images[0]["filename"]) as image:
        assert image.size == (TEST_SIZE, TEST_SIZE)
    stats = entry["outputs"][sampler]["sdaccel_stats"][0]
    assert any("it/s" in line for line in stats["lines"]) and stats["summary"]
    fell_back = [n for n in stats["notes"] if "unavailable" in n]
    assert (stats["toggles"] == stats["requested"]) == (not fell_back), (stats["toggles"], fell_back)

    # what ran is what the bench preset runs: every toggle value, the CFG cutoff and the step count
    spec, request = _expected(path.stem, stats["spec"])
    if path.stem == "refiner-ensemble":
        ran = EnsembleSpec.from_dict(stats["spec"])
        assert ran.base == spec and ran.switch_at == 0.9
        assert Path(ran.refiner.model.path).name == examples.SDXL_REFINER.ckpt_name
    else:
        assert PipelineSpec.from_dict(stats["spec"]) == spec
    sampler_fields = set(SDAccelSampler.FIELD_NAMES)
    ran_request = {k: v for k, v in stats["request"].items() if k not in sampler_fields | {"img2img"}}
    assert ran_request == {k: v for k, v in request.to_dict().items() if k not in sampler_fields}
    assert shipped[sampler]["inputs"]["steps"] == request.steps
    for name in ("scheduler", "cfg"):  # a few-step preset's scheduler and guidance live in the sampler
        if name in getattr(PRESETS.get(path.stem), "request", {}):
            assert shipped[sampler]["inputs"][name] == getattr(request, name) == stats["request"][name]
    assert stats["request"]["width"] == TEST_SIZE and stats["request"]["steps"] == TEST_STEPS
    comfy.timings[path.stem] = {"wall_s": round(seconds, 2), "run_s": stats["total_s"], "toggles": stats["toggles"],
                                "notes": stats["notes"]}


@pytest.mark.parametrize("plan", examples.stream_plans(), ids=lambda p: p.name)
def test_stream_workflow_streams_a_video_as_its_bench_row_does(comfy, frontend, plan):
    """Core Load Video -> Get Video Components -> SDAccel Stream -> Create Video -> Save Video in the real ComfyUI:
    one output frame per input frame at the video's size, and the spec and settings `bench stream`'s row runs."""
    import av
    from sdaccel.optim.bench.stream import VARIANTS, StreamBenchSettings, row_settings
    from sdaccel.optim.spec.optimization import config_class
    from sdaccel.optim.spec.pipeline import PipelineSpec
    from sdaccel.optim.stream.settings import StreamSettings

    prompt = frontend.prompt(load_workflow(EXAMPLES / f"{examples.STREAM_PREFIX}{plan.name}.json"))
    entry, seconds = comfy.run(prompt)
    status = entry["status"]
    assert status["status_str"] == "success", json.dumps(status["messages"], indent=1)[-4000:]
    stats = entry["outputs"][_node(prompt, "SDAccelStream")]["sdaccel_stats"][0]
    summary = stats["stream"]
    assert summary["frames_in"] == summary["frames_out"] == VIDEO_FRAMES and summary["fps"] > 0, summary
    assert stats["summary"] and any("fps" in line for line in stats["lines"]), stats["lines"]

    ran = PipelineSpec.from_dict(stats["spec"])
    spec = PipelineSpec(model=ran.model, device=ran.device)
    assert Path(ran.model.path).name == examples.SD_TURBO.ckpt_name
    for kind, fields in VARIANTS[plan.variant].optimizations:
        config = config_class(kind)(**fields)
        if kind == "vae":  # the bench's random Tiny VAE is the file the user downloads
            assert Path(ran.optimization("vae").path).name == examples.SD_TURBO.tiny_vae
            config = config.with_(path=ran.optimization("vae").path)
        spec = spec.with_optimization(config)
    assert ran == spec
    bench = row_settings(plan.variant, StreamBenchSettings())  # what the bench row runs, at the video's size
    assert StreamSettings.from_dict(stats["settings"]) == bench.with_(width=VIDEO_SIZE, height=VIDEO_SIZE)

    saved = entry["outputs"][_node(prompt, "SaveVideo")]["images"][0]
    with av.open(str(comfy.base / "output" / saved["subfolder"] / saved["filename"])) as video:
        decoded = [frame.to_ndarray(format="rgb24") for frame in video.decode(video=0)]
    assert len(decoded) == VIDEO_FRAMES and decoded[0].shape == (VIDEO_SIZE, VIDEO_SIZE, 3)
    comfy.timings[f"{examples.STREAM_PREFIX}{plan.name}"] = {"wall_s": round(seconds, 2), "fps": summary["fps"]}


def test_lora_node_offers_models_loras_and_the_sampler_merges_it(comfy, frontend, object_info):
    import numpy as np
    from PIL import Image

    assert LORA in object_info["SDAccelLora"]["input"]["required"]["lora_name"][0]  # ComfyUI's models/loras
    plain = _prompt(frontend, "baseline")
    sampler, save = _node(plain, "SDAccelSampler"), _node(plain, "SaveImage")
    with_lora = json.loads(json.dumps(plain))
    with_lora["lora"] = {"class_type": "SDAccelLora", "inputs": {"pipe": plain[sampler]["inputs"]["pipe"],
                                                                   "lora_name": LORA, "strength": 0.8, "path": ""}}
    with_lora[sampler]["inputs"]["pipe"] = ["lora", 0]

    def image_and_stats(prompt):
        entry, _ = comfy.run(prompt)
        assert entry["status"]["status_str"] == "success", json.dumps(entry["status"]["messages"], indent=1)[-3000:]
        found = entry["outputs"][save]["images"][0]
        with Image.open(comfy.base / "output" / found["subfolder"] / found["filename"]) as image:
            return np.asarray(image.convert("RGB")), entry["outputs"][sampler]["sdaccel_stats"][0]

    base_image, _ = image_and_stats(plain)
    lora_image, stats = image_and_stats(with_lora)
    assert not np.array_equal(base_image, lora_image)
    assert any(note.startswith(f"LoRA {LORA} x0.8:") for note in stats["notes"]), stats["notes"]
    assert f"lora({LORA}:0.8)" in stats["requested"]
    rerun = json.loads(json.dumps(plain))  # keep_loaded flipped: ComfyUI runs the sampler again, same image
    rerun[sampler]["inputs"]["keep_loaded"] = not plain[sampler]["inputs"]["keep_loaded"]
    again, _ = image_and_stats(rerun)
    assert np.array_equal(again, base_image)  # bypassed: the checkpoint's own weights, restored exactly


def test_identical_prompt_is_served_from_comfyuis_cache(comfy, frontend):
    prompt = _prompt(frontend, "baseline")
    comfy.run(prompt)
    again, seconds = comfy.run(prompt)
    assert again["status"]["status_str"] == "success"
    cached = [data for event, data in again["status"]["messages"] if event == "execution_cached"]
    assert cached and _node(prompt, "SDAccelSampler") in cached[0]["nodes"]
    comfy.timings["baseline_cached_wall_s"] = round(seconds, 2)


def test_impossible_combination_reaches_the_error_panel_and_the_server_goes_on(comfy, frontend, object_info):
    from sdaccel.optim.core.registry import all_units

    prompt = _prompt(frontend, "baseline")
    loader, sampler = _node(prompt, "SDAccelLoader"), _node(prompt, "SDAccelSampler")
    prompt["90"] = {"class_type": "SDAccelCompile", "inputs": {"pipe": [loader, 0]}}
    prompt["91"] = {"class_type": "SDAccelOffload", "inputs": {"pipe": ["90", 0], "mode": "staged"}}
    for node_id, node_type in (("90", "SDAccelCompile"), ("91", "SDAccelOffload")):
        for name, spec in object_info[node_type]["input"]["required"].items():
            if len(spec) > 1 and "default" in spec[1]:
                prompt[node_id]["inputs"].setdefault(name, spec[1]["default"])
    prompt[sampler]["inputs"]["pipe"] = ["91", 0]
    entry, _ = comfy.run(prompt)
    assert entry["status"]["status_str"] == "error"
    errors = [data for event, data in entry["status"]["messages"] if event == "execution_error"]
    assert errors and errors[0]["node_type"] == "SDAccelOffload"
    assert all_units()["offload"].config_cls.conflicts["compile"] in errors[0]["exception_message"]
    assert errors[0]["exception_type"].endswith("ConflictError")
    ok, _ = comfy.run(_prompt(frontend, "channels-last"))
    assert ok["status"]["status_str"] == "success"


def test_interrupt_stops_the_run_and_the_pipeline_stays_usable(comfy, frontend):
    prompt = _prompt(frontend, "freeu")
    sampler = _node(prompt, "SDAccelSampler")
    prompt[sampler]["inputs"].update({"steps": 200, "width": 512, "height": 512, "seed": 7})
    prompt_id = comfy.queue(prompt)
    deadline = time.monotonic() + 120
    while not comfy.request("/queue")["queue_running"]:
        assert time.monotonic() < deadline, "the prompt never started"
        time.sleep(0.1)
    time.sleep(1.0)  # a few steps into the 200 (a tiny model, already loaded)
    comfy.request("/interrupt", {})
    entry = comfy.wait(prompt_id)
    events = [event for event, _ in entry["status"]["messages"]]
    assert "execution_interrupted" in events and "execution_error" not in events, events
    after = _prompt(frontend, "freeu")
    after[sampler]["inputs"]["seed"] = 8  # not a prompt ComfyUI has cached
    ok, _ = comfy.run(after)
    assert ok["status"]["status_str"] == "success"
    summary = ok["outputs"][sampler]["sdaccel_stats"][0]["summary"]
    assert "cache hit" in summary  # the interrupted run left the prepared pipeline in place


def test_comfyui_unload_models_releases_sdaccel_pipelines(comfy, frontend):
    held = comfy.request("/sdaccel/pipelines")
    assert held["pipelines"] and held["tracked_by_comfyui"] >= 1
    comfy.request("/free", {"unload_models": True})
    deadline = time.monotonic() + 30
    while comfy.request("/sdaccel/pipelines")["pipelines"]:
        assert time.monotonic() < deadline, comfy.log_tail()
        time.sleep(0.25)
    assert comfy.request("/sdaccel/pipelines")["tracked_by_comfyui"] == 0
    log = comfy.log_tail(20000)
    assert "releasing" in log and "Traceback" not in log[log.index("releasing"):]
    # ComfyUI's worker survived the unload and SDAccel loads again on the next run
    prompt = _prompt(frontend, "baseline")
    prompt[_node(prompt, "SDAccelSampler")]["inputs"]["seed"] = 9
    entry, _ = comfy.run(prompt)
    assert entry["status"]["status_str"] == "success"
    assert "cache loaded" in entry["outputs"][_node(prompt, "SDAccelSampler")]["sdaccel_stats"][0]["summary"]
    assert comfy.request("/sdaccel/pipelines")["tracked_by_comfyui"] == 1


# ---------------------------------------------------------------- the stats badge, seen in the page

# The sampler node's widgets, set the way a user would set them in the page (by name)
_SET_WIDGETS = """([id, values]) => {
  const node = window.app.graph.getNodeById(id);
  for (const [name, value] of Object.entries(values)) {
    const widget = node.widgets.find((w) => w.name === name);
    if (!widget) throw new Error(`no widget ${name} on node ${id}`);
    widget.value = value;
  }
}"""
# True once the sampler's badge has lines (the extension sets node.sdaccelBadge while it draws the node)
_BADGE_DRAWN = """(id) => {
  const canvas = window.app.canvas, node = window.app.graph.getNodeById(id);
  canvas.centerOnNode(node);
  canvas.draw(true, true);
  return node.sdaccelBadge?.lines?.length > 0;
}"""

# Redraw the canvas, recording every fillText call, and read back the pixels under the badge
_DRAW_AND_READ = """(id) => {
  const canvas = window.app.canvas, node = window.app.graph.getNodeById(id);
  canvas.centerOnNode(node);
  const ctx = canvas.canvas.getContext("2d");
  const drawn = [];
  const fillText = ctx.fillText;
  ctx.fillText = function (text, ...rest) { drawn.push(String(text)); return fillText.call(this, text, ...rest); };
  try { canvas.draw(true, true); } finally { ctx.fillText = fillText; }
  const scale = canvas.ds.scale, [ox, oy] = canvas.ds.offset, ratio = window.devicePixelRatio || 1;
  const x = Math.round((node.pos[0] + ox) * scale * ratio), w = Math.round(node.size[0] * scale * ratio);
  const badge = node.sdaccelBadge;  // set by the extension while it draws: its lines and box in node space
  if (!badge) return {drawn, lines: null};
  const y = Math.round((node.pos[1] + badge.y + oy) * scale * ratio);
  const h = Math.round(badge.height * scale * ratio);
  const pixels = ctx.getImageData(x, y, w, h).data;
  let text = 0, panel = 0;
  for (let i = 0; i < pixels.length; i += 4) {
    const [r, g, b] = [pixels[i], pixels[i + 1], pixels[i + 2]];
    if (g > 150 && g > r + 30 && g > b + 20) text++;         // the badge's green text (#9fe0a8)
    else if (r < 45 && g < 45 && b < 55) panel++;             // its dark panel
  }
  return {drawn, lines: badge.lines, wrapped: badge.drawn, text, panel, area: w * h,
          box: {x: x / ratio, y: y / ratio, width: w / ratio, height: h / ratio}};
}"""


def test_stats_badge_is_drawn_on_the_sampler_in_comfyuis_page(comfy, frontend, tmp_path):
    """Queue from the page itself; ComfyUI sends the sampler's UI output over its websocket; the badge appears."""
    page = frontend.page
    workflow = load_workflow(EXAMPLES / "channels-last.json")
    frontend.load(workflow)
    sampler = next(node["id"] for node in workflow["nodes"] if node["type"] == "SDAccelSampler")
    page.evaluate(_SET_WIDGETS, [sampler, {"width": TEST_SIZE, "height": TEST_SIZE, "steps": TEST_STEPS,
                                           "seed": 1234}])
    page.evaluate("async () => { await window.app.queuePrompt(0, 1); }")
    page.wait_for_function(_BADGE_DRAWN, arg=sampler, timeout=comfy_host.RUN_TIMEOUT_S * 1000, polling=500)
    seen = page.evaluate(_DRAW_AND_READ, sampler)
    assert seen["lines"] and any("it/s" in line for line in seen["lines"]), seen["lines"]
    assert any(line.startswith("toggles: ") and "channels_last" in line for line in seen["lines"]), seen["lines"]
    assert all(line in seen["drawn"] for line in seen["wrapped"]), (seen["wrapped"], seen["drawn"][:40])
    assert seen["text"] > 50 and seen["panel"] > seen["area"] // 4, seen  # painted, not only computed
    shot = tmp_path / "comfyui-stats-badge.png"
    page.screenshot(path=str(shot))
    keep = os.environ.get("SDACCEL_SCREENSHOT_DIR")  # set to results/ to refresh the committed screenshot
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        (Path(keep) / shot.name).write_bytes(shot.read_bytes())
    assert not frontend.our_errors(), frontend.our_errors()
