"""SDAccel's MODEL patches in a real ComfyUI: core CheckpointLoaderSimple -> LoraLoader -> patch -> KSampler.

The checkpoint is an SD 1.5 ComfyUI's own loader recognises (shipped text encoder and VAE, a shallow UNet;
`build_host_shaped_sd15`), the LoRA a kohya-format file over the UNet's convolutions and queries. KSampler's
latent is saved by core SaveLatent and compared in full precision. ComfyUI caches node outputs, so a prompt meant
to run again is queued after POST /free, which empties that cache.

The engine-level facts (the hooks on ComfyUI's own modules, filters following LoRA strengths, DeepCache against
its definition) are checked in-process, with ComfyUI's own classes, by `comfy_native_check.py`.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import comfy_examples as examples
import comfy_host
import pytest
from comfy_host import load_workflow

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "example_workflows"
NATIVE_WORKFLOWS = sorted(EXAMPLES.glob(f"{examples.NATIVE_PREFIX}*.json"))
CHECKPOINT, LORA = examples.SD15.ckpt_name, examples.LORA_NAME  # the names the KSampler workflows hold
CONTROLNET, CONTROL_IMAGE = examples.CONTROLNET_NAME, examples.CONTROL_IMAGE
STEPS = 4

pytestmark = pytest.mark.skipif(not comfy_host.COMFYUI_PATH, reason=comfy_host.SKIP_REASON)


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    yield from comfy_host.start_server(tmp_path_factory.mktemp("comfy-patches"), {},
                                       lambda models: comfy_host.write_host_models(models, CHECKPOINT, LORA,
                                                                                   CONTROLNET, CONTROL_IMAGE))


@pytest.fixture(scope="module")
def frontend(comfy):
    yield from comfy_host.open_frontend(comfy)


def graph(patch: dict | None = None, *, lora: float | None = 0.8, seed: int = 7, sampler: str = "euler",
          scheduler: str = "normal", steps: int = STEPS, prefix: str = "run", patch_first: bool = False) -> dict:
    """A core KSampler prompt; `patch` = {"class_type": ..., "inputs": {...}} goes between the LoRA and KSampler
    (between the checkpoint and the LoRA with `patch_first`)."""
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse at dusk", "clip": ["1", 1]}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "7": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "seed": seed, "steps": steps, "cfg": 7.0,
                                                  "sampler_name": sampler, "scheduler": scheduler,
                                                  "positive": ["3", 0], "negative": ["4", 0],
                                                  "latent_image": ["5", 0], "denoise": 1.0}},
        "9": {"class_type": "SaveLatent", "inputs": {"samples": ["7", 0], "filename_prefix": f"latents/{prefix}"}},
    }
    model = ["1", 0]

    def add_patch(model):
        if patch is None:
            return model
        prompt["6"] = {"class_type": patch["class_type"], "inputs": {"model": model, **patch["inputs"]}}
        return ["6", 0]

    if patch_first:
        model = add_patch(model)
    if lora is not None:
        prompt["2"] = {"class_type": "LoraLoader", "inputs": {"model": model, "clip": ["1", 1], "lora_name": LORA,
                                                              "strength_model": lora, "strength_clip": 0.0}}
        model = ["2", 0]
    if not patch_first:
        model = add_patch(model)
    prompt["7"]["inputs"]["model"] = model
    return prompt


def run_latent(comfy, prompt: dict, *, fresh: bool = True):
    """Run `prompt` and return KSampler's latent; afresh (ComfyUI's output cache emptied first) unless `fresh` is
    False, when the nodes whose inputs did not change keep their outputs, as in a user's re-queue."""
    import torch
    from safetensors.torch import load_file

    if fresh:
        comfy.request("/free", {"free_memory": True})
        time.sleep(0.5)  # /free is a flag the queue worker reads before the next prompt
    entry, _ = comfy.run(prompt)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[-3000:]
    saved = entry["outputs"]["9"]["latents"][0]
    path = comfy.base / "output" / saved["subfolder"] / saved["filename"]
    return load_file(str(path))["latent_tensor"].to(torch.float64)


def rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def log_lines(comfy, title: str) -> list[str]:
    return [line for line in comfy.log.read_text(errors="replace").splitlines() if f"{title}:" in line]


WINOGRAD = {"class_type": "SDAccelWinogradModel",
            "inputs": {"tile": "f4", "fused_transforms": False, "filter_cache_mb": 0, "calibration_dir": ""}}


def test_native_patches_on_comfyuis_own_unet_in_process(comfy):
    """The engine's hooks on ComfyUI's UNetModel, loaded by ComfyUI's loaders, in ComfyUI's venv."""
    out = subprocess.run([comfy_host.host_python(Path(comfy_host.COMFYUI_PATH)), str(ROOT / "tests" /
                          "comfy_native_check.py"), str(Path(comfy_host.COMFYUI_PATH).resolve()), str(ROOT),
                          str(comfy.base / "models" / "checkpoints" / CHECKPOINT),
                          str(comfy.base / "models" / "loras" / LORA)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    facts = json.loads(out.stdout.strip().splitlines()[-1])
    assert facts["unet_class"] == "comfy.ldm.modules.diffusionmodules.openaimodel.UNetModel"
    layers = facts["winograd_counters"]["winograd_layers"]
    assert layers > 0 and facts["hooked_forwards_during_run"] == layers
    assert facts["winograd_counters"]["winograd_winograd_calls"] == layers
    assert facts["winograd_rel_error"] < 1e-4 and facts["instance_forwards_after"] == 0 and facts["rerun_equal_base"]
    # filters follow ComfyUI's LoRA weight patching, strength after strength (no stale filters on 0.8 -> 0.3 -> 0.8)
    assert [r["strength"] for r in facts["lora"]] == [0.8, 0.3, 0.8]
    for row in facts["lora"]:
        assert row["rel_error"] < 1e-4 and row["differs_from_base"] > 1e-2 and row["winograd_calls"] == layers, row
    assert facts["after_lora_equal_base"]
    assert facts["deepcache_1_modes"] == ["full"] * 3 and facts["deepcache_1_equal_base"]
    assert facts["deepcache_2_modes"] == ["full", "cached", "full"]
    assert facts["deepcache_cached_rel_error"] < 1e-6 and facts["deepcache_cached_differs_from_full"] > 1e-3
    assert facts["deepcache_1_instance_forwards_after"] == 0 == facts["deepcache_2_instance_forwards_after"]
    assert "cache_branch_id" in facts["branch_error"] and "Use 0.." in facts["branch_error"]
    assert "input_blocks" in facts["dit_error"] and "bypass this node" in facts["dit_error"]


def test_patch_nodes_are_listed_under_sdaccel_model_patches(comfy):
    info = comfy.request("/object_info", timeout=120)
    for node in ("SDAccelWinogradModel", "SDAccelDeepCacheModel", "SDAccelCFGCutoffModel", "SDAccelCompileModel",
                 "SDAccelPrecisionModel", "SDAccelAttentionModel"):
        assert info[node]["category"] == "sdaccel/model_patches"
        assert info[node]["input"]["required"]["model"][0] == "MODEL" and info[node]["output"] == ["MODEL"]


def test_winograd_gives_the_unpatched_image_with_each_lora_strength_and_goes_away_when_bypassed(comfy):
    results = {}
    for strength in (0.8, 0.3):
        base = run_latent(comfy, graph(lora=strength))
        patched = run_latent(comfy, graph(WINOGRAD, lora=strength))
        assert rel(patched, base) < 1e-4, (strength, rel(patched, base))
        results[strength] = (base, patched)
    assert rel(results[0.8][0], results[0.3][0]) > 1e-3  # the LoRA strength shows in the image
    # apply / remove / apply: each image equals its first run (bypassed = exactly the unpatched image)
    assert run_latent(comfy, graph(lora=0.3)).equal(results[0.3][0])
    assert run_latent(comfy, graph(WINOGRAD, lora=0.3)).equal(results[0.3][1])
    assert run_latent(comfy, graph(lora=0.3)).equal(results[0.3][0])
    lines = log_lines(comfy, "SDAccel Winograd (model)")
    assert any(re.search(r"[1-9]\d* Winograd and 0 F\.conv2d calls over [1-9]\d* convolutions", line)
               for line in lines), lines
    assert any("s per step over 4 steps" in line for line in lines), lines


COMPILE = {"class_type": "SDAccelCompileModel",
           "inputs": {"backend": "openvino", "dynamic": False, "openvino_precision": "f32",
                      "on_weight_change": "recompile"}}


def compile_counts(comfy, since: int) -> list[tuple[int, int, int]]:
    """(compiled calls, uncompiled calls, graphs built) of each compile report logged after line `since`."""
    pattern = r"(\d+) compiled and (\d+) uncompiled model calls; (\d+) graph"
    return [tuple(map(int, m.groups())) for line in log_lines(comfy, "SDAccel Compile (model)")[since:]
            if (m := re.search(pattern, line))]


def test_compile_gives_the_unpatched_image_and_follows_a_lora_strength_change(comfy):
    """OpenVINO on ComfyUI's own model. Placed before the LoRA, the patch's output stays cached on a re-queue with
    another strength while ComfyUI patches the weights in place: the baked graph must notice and recompile."""
    base = {s: run_latent(comfy, graph(lora=s)) for s in (0.8, 0.3)}
    since = len(log_lines(comfy, "SDAccel Compile (model)"))
    first = run_latent(comfy, graph(COMPILE, lora=0.8, patch_first=True))
    second = run_latent(comfy, graph(COMPILE, lora=0.3, patch_first=True), fresh=False)
    third = run_latent(comfy, graph(COMPILE, lora=0.3, patch_first=True), fresh=False)  # nothing changed
    assert rel(first, base[0.8]) < 1e-4 and rel(second, base[0.3]) < 1e-4, (rel(first, base[0.8]),
                                                                            rel(second, base[0.3]))
    counts = compile_counts(comfy, since)
    calls = 2 * STEPS  # ComfyUI batches cond and uncond: one call per step (two if it splits them)
    assert [c[1] for c in counts] == [0, 0] and all(c[0] in (STEPS, calls) for c in counts), counts
    assert counts[0][2] == 1 and counts[1][2] == 1, counts  # built, then rebuilt for the new weights
    assert any("recompiled with the new weights" in line for line in log_lines(comfy, "SDAccel Compile (model)"))
    assert len(counts) == 2 and third.equal(second)  # an unchanged re-queue is served from ComfyUI's cache
    assert run_latent(comfy, graph(lora=0.3)).equal(base[0.3])  # bypassed: the unpatched image


INDUCTOR = {"class_type": "SDAccelCompileModel",
            "inputs": {"backend": "inductor", "dynamic": False, "openvino_precision": "f32",
                       "on_weight_change": "recompile"}}


def test_inductor_compile_gives_the_unpatched_image_and_recompiles_for_a_new_lora_strength(comfy):
    """torch.compile (inductor, weights frozen in) on ComfyUI's own model, kept small (2 steps, two compiles): the
    same image as unpatched, and the frozen graph rebuilt when a re-queue changes the LoRA strength in place."""
    steps = 2
    base = {s: run_latent(comfy, graph(lora=s, steps=steps)) for s in (0.8, 0.3)}
    since = len(log_lines(comfy, "SDAccel Compile (model)"))
    first = run_latent(comfy, graph(INDUCTOR, lora=0.8, steps=steps, patch_first=True))
    second = run_latent(comfy, graph(INDUCTOR, lora=0.3, steps=steps, patch_first=True), fresh=False)
    assert rel(first, base[0.8]) < 1e-4 and rel(second, base[0.3]) < 1e-4, (rel(first, base[0.8]),
                                                                            rel(second, base[0.3]))
    counts = compile_counts(comfy, since)
    assert len(counts) == 2 and [c[1] for c in counts] == [0, 0], counts  # every call ran the compiled graph
    # built, then rebuilt; inductor counts each graph dynamo makes of ComfyUI's forward (its graph breaks: ~30-50)
    assert all(c[0] in (steps, 2 * steps) and c[2] >= 1 for c in counts), counts
    lines = log_lines(comfy, "SDAccel Compile (model)")[since:]
    assert any("SDAccel Compile (model): inductor: " in line for line in lines), lines  # the stats line
    assert any("recompiled with the new weights" in line for line in lines), lines
    assert any("s per step over 2 steps" in line for line in lines), lines


def with_controlnet(prompt: dict, strength: float = 1.0) -> dict:
    """`prompt` with a core ControlNet (ControlNetLoader, LoadImage, ControlNetApplyAdvanced) on both prompts."""
    prompt["10"] = {"class_type": "ControlNetLoader", "inputs": {"control_net_name": CONTROLNET}}
    prompt["11"] = {"class_type": "LoadImage", "inputs": {"image": CONTROL_IMAGE}}
    prompt["12"] = {"class_type": "ControlNetApplyAdvanced",
                    "inputs": {"positive": ["3", 0], "negative": ["4", 0], "control_net": ["10", 0],
                               "image": ["11", 0], "strength": strength, "start_percent": 0.0, "end_percent": 1.0}}
    prompt["7"]["inputs"].update(positive=["12", 0], negative=["12", 1])
    return prompt


DEEPCACHE_2 = {"class_type": "SDAccelDeepCacheModel",
               "inputs": {"cache_interval": 2, "cache_branch_id": 0, "start_step": 0, "end_step": 0}}


def test_with_a_controlnet_each_patch_honours_its_residuals_or_steps_aside_and_says_so(comfy):
    """A random ControlNet in the original format through ComfyUI's core loader and apply node. Winograd honours
    the residuals (same image to fp32 rounding); DeepCache and Compile step aside (exactly the unpatched image)
    and the log says why."""
    controlled = run_latent(comfy, with_controlnet(graph()))
    assert rel(controlled, run_latent(comfy, graph())) > 1e-3  # the ControlNet acts on the image
    titles = ("SDAccel DeepCache (model)", "SDAccel Compile (model)")
    before = {title: len(log_lines(comfy, title)) for title in titles}
    assert rel(run_latent(comfy, with_controlnet(graph(WINOGRAD))), controlled) < 1e-4
    assert run_latent(comfy, with_controlnet(graph(DEEPCACHE_2))).equal(controlled)
    assert run_latent(comfy, with_controlnet(graph(COMPILE))).equal(controlled)
    deepcache = log_lines(comfy, titles[0])[before[titles[0]]:]
    assert any("DeepCache stepped aside: a ControlNet is applied" in line for line in deepcache), deepcache
    assert any(re.search(r"0 of [1-9]\d* UNet calls reused", line) for line in deepcache), deepcache
    compiled = log_lines(comfy, titles[1])[before[titles[1]]:]
    assert any("calls ran eager because a ControlNet is applied" in line for line in compiled), compiled
    assert any(re.search(r"0 compiled and [1-9]\d* uncompiled model calls", line) for line in compiled), compiled


@pytest.mark.parametrize("sampler,scheduler", [("euler", "normal"), ("dpmpp_2m", "karras"), ("heun", "simple")])
def test_cfg_cutoff_skips_the_unconditional_pass_after_the_cutoff(comfy, sampler, scheduler):
    cutoff = {"class_type": "SDAccelCFGCutoffModel", "inputs": {"cfg_cutoff": 0.5, "cfg_cutoff_step": -1}}
    never = {"class_type": "SDAccelCFGCutoffModel", "inputs": {"cfg_cutoff": 1.0, "cfg_cutoff_step": -1}}
    base = run_latent(comfy, graph(sampler=sampler, scheduler=scheduler))
    assert run_latent(comfy, graph(never, sampler=sampler, scheduler=scheduler)).equal(base)
    before = len(log_lines(comfy, "SDAccel CFG Cutoff (model)"))
    cut = run_latent(comfy, graph(cutoff, sampler=sampler, scheduler=scheduler))
    assert rel(cut, base) > 1e-4  # the last steps ran unguided
    line = next(line for line in log_lines(comfy, "SDAccel CFG Cutoff (model)")[before:] if "model calls" in line)
    guided, unguided = map(int, re.search(r"(\d+) model calls with guidance, (\d+) without", line).groups())
    calls_per_step = 2 if sampler == "heun" else 1  # heun evaluates the model twice per step (once on the last)
    assert guided >= 2 and unguided >= 1 and guided + unguided <= calls_per_step * STEPS, line
    assert "guidance on the first 2 of 4 steps" in line


def test_deepcache_reuses_features_and_interval_one_is_the_unpatched_image(comfy):
    def deepcache(interval: int) -> dict:
        return {"class_type": "SDAccelDeepCacheModel",
                "inputs": {"cache_interval": interval, "cache_branch_id": 0, "start_step": 0, "end_step": 0}}

    base = run_latent(comfy, graph())
    assert run_latent(comfy, graph(deepcache(1))).equal(base)
    before = len(log_lines(comfy, "SDAccel DeepCache (model)"))
    cached = run_latent(comfy, graph(deepcache(2), steps=6))
    assert cached.isfinite().all()
    line = next(line for line in log_lines(comfy, "SDAccel DeepCache (model)")[before:] if "UNet calls" in line)
    reused, calls = map(int, re.search(r"(\d+) of (\d+) UNet calls reused", line).groups())
    assert calls in (6, 12) and reused == calls // 2, line  # one call per step, or cond and uncond apart
    assert run_latent(comfy, graph()).equal(base)  # bypassed again: the unpatched image


def test_deepcache_keeps_reusing_steps_after_the_cfg_cutoff(comfy):
    """DeepCache (interval 2) then CFG Cutoff (50%) on 8 steps: half the UNet calls reused, before the cutoff and
    after it (the cond-only batch starts afresh with one full step), and the unconditional pass skipped after it."""
    prompt = graph({"class_type": "SDAccelDeepCacheModel",
                    "inputs": {"cache_interval": 2, "cache_branch_id": 0, "start_step": 0, "end_step": 0}}, steps=8)
    prompt["8"] = {"class_type": "SDAccelCFGCutoffModel",
                   "inputs": {"model": ["6", 0], "cfg_cutoff": 0.5, "cfg_cutoff_step": -1}}
    prompt["7"]["inputs"]["model"] = ["8", 0]
    before = {title: len(log_lines(comfy, title)) for title in ("SDAccel DeepCache (model)",
                                                                "SDAccel CFG Cutoff (model)")}
    assert run_latent(comfy, prompt).isfinite().all()
    cfg_line = log_lines(comfy, "SDAccel CFG Cutoff (model)")[before["SDAccel CFG Cutoff (model)"]:]
    assert any("4 model calls with guidance, 4 without" in line for line in cfg_line), cfg_line
    line = next(line for line in log_lines(comfy, "SDAccel DeepCache (model)")[before["SDAccel DeepCache (model)"]:]
                if "UNet calls" in line)
    reused, calls = map(int, re.search(r"(\d+) of (\d+) UNet calls reused", line).groups())
    # one call per step (cond and uncond batched; 4 + 4) or cond and uncond apart (8 + 4): either way every other
    # call of each kind is reused, after the cutoff too (a cache that stopped there would reuse 2 of 8 or 4 of 12)
    assert calls in (8, 12) and reused == calls // 2, line


def test_a_patch_the_model_cannot_take_fails_on_its_node_and_the_server_goes_on(comfy):
    bad = {"class_type": "SDAccelDeepCacheModel",
           "inputs": {"cache_interval": 2, "cache_branch_id": 30, "start_step": 0, "end_step": 0}}
    comfy.request("/free", {"free_memory": True})
    entry, _ = comfy.run(graph(bad))
    assert entry["status"]["status_str"] == "error"
    error = next(m[1] for m in entry["status"]["messages"] if m[0] == "execution_error")
    assert error["node_type"] == "SDAccelDeepCacheModel" and "cache_branch_id" in error["exception_message"]
    assert "Use 0.." in error["exception_message"]
    assert run_latent(comfy, graph(lora=None)).isfinite().all()


def native_bf16() -> bool:
    from sdaccel.optim.run.capabilities import cpu_has_native

    return cpu_has_native("bfloat16")


def test_precision_half_gives_comfyuis_own_compute_dtype_image_and_channels_last_the_unpatched_one(comfy):
    """bf16 weights converted once per run compute what ComfyUI's ModelComputeDtype bf16 computes by casting in
    every call; channels-last alone is lossless; bypassed, the model is as before; each re-queue repeats itself."""
    half = {"class_type": "SDAccelPrecisionModel", "inputs": {"dtype": "half", "channels_last": False}}
    base = run_latent(comfy, graph(prefix="prec-base"))
    ours = run_latent(comfy, graph(half, prefix="prec-half"))
    said = log_lines(comfy, "SDAccel Precision (model)")
    if native_bf16():
        theirs = run_latent(comfy, graph({"class_type": "ModelComputeDtype", "inputs": {"dtype": "bf16"}},
                                         prefix="prec-core"))
        assert rel(ours, theirs) < 1e-6, rel(ours, theirs)  # the same numbers
        assert 1e-4 < rel(ours, base) < 0.1  # bf16 changes the latent, slightly
        assert any("weights bfloat16" in line for line in said), said
    else:  # half keeps fp32 here, and says so
        assert ours.equal(base) and any("no native half precision" in line for line in said), said
    layout = {"class_type": "SDAccelPrecisionModel", "inputs": {"dtype": "fp32", "channels_last": True}}
    assert rel(run_latent(comfy, graph(layout, prefix="prec-cl")), base) < 1e-5
    assert any("channels-last:" in line for line in log_lines(comfy, "SDAccel Precision (model)"))
    assert run_latent(comfy, graph(prefix="prec-bypassed")).equal(base)
    assert run_latent(comfy, graph(half, prefix="prec-again")).equal(ours)


def test_attention_pytorch_gives_the_unpatched_image_and_goes_away_when_bypassed(comfy):
    base = run_latent(comfy, graph(prefix="attn-base"))  # ComfyUI's CPU default: sub-quadratic attention
    patch = {"class_type": "SDAccelAttentionModel", "inputs": {"backend": "pytorch"}}
    out = run_latent(comfy, graph(patch, prefix="attn"))
    assert rel(out, base) < 1e-4 and not out.equal(base)  # another attention function, the same attention
    said = log_lines(comfy, "SDAccel Attention (model)")
    assert any(re.search(r"\b[1-9]\d* attention calls through ComfyUI's pytorch attention", line)
               for line in said[-2:]), said
    assert run_latent(comfy, graph(prefix="attn-bypassed")).equal(base)


def write_tiny_sd3_dit(path: Path) -> Path:
    """A diffusion-model file ComfyUI's own detection takes for SD3 (an MMDiT: joint blocks, patch embedder), at a
    toy width: the keys and shapes its `detect_unet_config` reads, nothing more (the rest it leaves at zero)."""
    import torch
    from safetensors.torch import save_file

    depth, hidden = 2, 128  # SD3 ties the width to the depth: 64 per block
    tensors = {"x_embedder.proj.weight": torch.zeros(hidden, 16, 2, 2), "x_embedder.proj.bias": torch.zeros(hidden),
               "pos_embed": torch.zeros(1, 64, hidden), "context_embedder.weight": torch.zeros(hidden, 32),
               "context_embedder.bias": torch.zeros(hidden), "y_embedder.mlp.0.weight": torch.zeros(hidden, 32),
               "final_layer.linear.weight": torch.zeros(2 * 2 * 16, hidden)}
    for i in range(depth):
        tensors[f"joint_blocks.{i}.context_block.attn.qkv.weight"] = torch.zeros(3 * hidden, hidden)
        tensors[f"joint_blocks.{i}.x_block.attn.qkv.weight"] = torch.zeros(3 * hidden, hidden)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


@pytest.mark.parametrize("patch", ["SDAccelWinogradModel", "SDAccelDeepCacheModel", "SDAccelCompileModel",
                                   "SDAccelPrecisionModel", "SDAccelAttentionModel"])
def test_a_patch_on_a_dit_fails_on_its_node_with_a_clear_error_and_the_server_goes_on(comfy, patch):
    """An SD3-style DiT from core UNETLoader has no LDM UNet: the patch node says so, and what to do."""
    name = "sdaccel-test-tiny-sd3.safetensors"
    if not (comfy.base / "models" / "diffusion_models" / name).exists():
        write_tiny_sd3_dit(comfy.base / "models" / "diffusion_models" / name)
    from sdaccel.optim.bench.comfyui import widget_defaults

    prompt = graph({"class_type": patch, "inputs": widget_defaults(comfy, patch)}, lora=None, prefix="dit")
    prompt["10"] = {"class_type": "UNETLoader", "inputs": {"unet_name": name, "weight_dtype": "default"}}
    prompt["6"]["inputs"]["model"] = ["10", 0]
    comfy.request("/free", {"free_memory": True})
    entry, _ = comfy.run(prompt)
    assert entry["status"]["status_str"] == "error", entry["status"]
    error = next(m[1] for m in entry["status"]["messages"] if m[0] == "execution_error")
    assert error["node_id"] == "6" and error["node_type"] == patch, error
    message = error["exception_message"]
    assert "input_blocks" in message and "bypass this node" in message, message
    assert "(SD3)" in message and "mmdit" in message.lower(), message  # names what it was given
    assert run_latent(comfy, graph(lora=None, prefix="after-dit")).isfinite().all()  # the server goes on


def test_interrupt_mid_run_removes_every_hook(comfy):
    base = run_latent(comfy, graph(lora=None, prefix="int-base"))
    comfy.request("/free", {"free_memory": True})
    time.sleep(0.5)
    prompt_id = comfy.queue(graph(WINOGRAD, lora=None, steps=200, prefix="int"))
    deadline = time.monotonic() + 180
    while not re.search(r"\b[1-9]\d*/200\b", comfy.log_tail(2000)) and time.monotonic() < deadline:
        time.sleep(0.2)  # until KSampler's progress bar shows steps done
    comfy.request("/interrupt", {})
    entry = comfy.wait(prompt_id)
    assert any(m[0] == "execution_interrupted" for m in entry["status"]["messages"]), entry["status"]
    # a hook left behind would put this unpatched run through Winograd: it must be the exact unpatched latent
    assert run_latent(comfy, graph(lora=None, prefix="int-after")).equal(base)


def test_a_first_use_calibration_shows_itself_stops_on_interrupt_and_keeps_only_whole_shapes(comfy, tmp_path):
    """Winograd's default (tile auto) measures each new convolution shape once: ComfyUI's Cancel stops it between
    two candidates of one shape (not after the whole table), and nothing half-measured is kept."""
    folder = tmp_path / "calibration"
    auto = {"class_type": "SDAccelWinogradModel",
            "inputs": {"tile": "auto", "fused_transforms": False, "filter_cache_mb": 0, "calibration_dir": str(folder)}}
    big = graph(auto, lora=None, prefix="cal-int")
    big["5"]["inputs"].update(width=512, height=512)  # seconds per shape at this size: the interrupt lands inside
    comfy.request("/free", {"free_memory": True})
    time.sleep(0.5)
    start = len(comfy.log.read_text(errors="replace"))
    prompt_id = comfy.queue(big)

    def since_start() -> str:
        return comfy.log.read_text(errors="replace")[start:]

    deadline = time.monotonic() + 180
    while "winograd: measuring" not in since_start() and time.monotonic() < deadline:
        time.sleep(0.1)
    comfy.request("/interrupt", {})
    entry = comfy.wait(prompt_id)
    assert any(m[0] == "execution_interrupted" for m in entry["status"]["messages"]), entry["status"]
    started, measured = since_start().count("winograd: measuring"), since_start().count("winograd: measured")
    assert started >= 1 and measured < started, since_start()[-3000:]  # stopped inside a shape
    kept = json.loads(next(folder.glob("winograd-*.json")).read_text())["shapes"] if folder.exists() else {}
    assert len(kept) == measured  # the shape being measured when Cancel came is not in the table

    base = run_latent(comfy, graph(lora=None, prefix="cal-base"))
    out = run_latent(comfy, graph(auto, lora=None, prefix="cal-ok"))  # the next run measures and completes
    assert rel(out, base) < 1e-4
    said = [line for line in log_lines(comfy, "SDAccel Winograd (model)") if "new convolution shapes" in line]
    assert said and re.search(r"measured [1-9]\d* new convolution shapes on this CPU", said[-1]), said
    assert len(json.loads(next(folder.glob("winograd-*.json")).read_text())["shapes"]) > len(kept)


# What the tests change in a shipped KSampler workflow: the size and steps, and one fixed Winograd tile (the
# default "auto" measures every new convolution shape once per machine first)
NATIVE_SHRINK = {"EmptyLatentImage": {"width": 64, "height": 64}, "KSampler": {"steps": 3},
                 "SDAccelWinogradModel": {"tile": "f4", "fused_transforms": False}}


@pytest.mark.parametrize("path", NATIVE_WORKFLOWS, ids=lambda p: p.stem)
def test_ksampler_workflow_is_converted_by_comfyuis_page_and_runs(comfy, frontend, path):
    prompt = frontend.prompt(load_workflow(path))
    kinds = sorted(node["class_type"] for node in prompt.values())
    shipped = sorted(n["type"] for n in load_workflow(path)["nodes"] if n["type"] not in examples.NOTE_NODES)
    assert kinds == shipped
    patches = [node for node in prompt.values() if node["class_type"].startswith("SDAccel")]
    for node in prompt.values():
        node["inputs"].update(NATIVE_SHRINK.get(node["class_type"], {}))
    sampler = next(node for node in prompt.values() if node["class_type"] == "KSampler")["inputs"]
    assert (sampler["sampler_name"], sampler["scheduler"], sampler["seed"]) == ("euler", "normal", examples.SEED)
    comfy.request("/free", {"free_memory": True})
    time.sleep(0.5)
    before = comfy.log.read_text(errors="replace").count("s per step over")
    entry, _ = comfy.run(prompt)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[-3000:]
    save = next(node_id for node_id, node in prompt.items() if node["class_type"] == "SaveImage")
    assert len(entry["outputs"][save]["images"]) == 1
    after = comfy.log.read_text(errors="replace").count("s per step over")
    assert after - before == len(patches)  # every patch reported its run
