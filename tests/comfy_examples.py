"""Builds the shipped ComfyUI example workflows (`example_workflows/*.json`) from the bench presets.

Each workflow is the graph form of one `bench --preset NAME`: a loader, one toggle node per optimization
the preset adds (with the preset's field values over the engine defaults), the CFG cutoff when the
preset sets it, a sampler with the preset's step count, a Save Image node and a note saying what it
shows. Widget values are laid out from the nodes' own INPUT_TYPES, so the files cannot drift from the
nodes; `tests/test_comfy_workflows.py` checks that the shipped files equal this output.

    python tests/comfy_examples.py          # rewrite example_workflows/
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = ROOT / "example_workflows"

BASELINE_STEPS = 50  # the study's baseline; step presets scale it (steps-30 = 30 of 50)
SEED = 42
PROMPT = "a lighthouse on a cliff at dawn, soft light, detailed, sharp focus"
NEGATIVE = "blurry, low quality, watermark"
TAIYI_PROMPT = "长城, 清晨, 朦胧, 唯美, 插画"


@dataclass(frozen=True)
class Model:
    """A checkpoint a workflow names in its loader, and the files its VAE toggles name."""

    ckpt_name: str
    family: str  # what the tests load in its place (tiny random weights)
    size: int
    cfg: float
    hint: str
    tiny_vae: str = ""
    fp16_fix_vae: str = ""


SD15 = Model("v1-5-pruned-emaonly.safetensors", "sd15", 512, 7.0, "any SD 1.x checkpoint (or SD 2.x / SDXL: set "
             "the size to its native one)", tiny_vae="taesd_decoder.pth")
SDXL = Model("sd_xl_base_1.0.safetensors", "sdxl-base", 1024, 5.0, "an SDXL base checkpoint",
             tiny_vae="taesdxl_decoder.pth", fp16_fix_vae="sdxl_vae_fp16_fix.safetensors")
SDXL_REFINER = Model("sd_xl_refiner_1.0.safetensors", "sdxl-refiner", 1024, 5.0, "the SDXL refiner")
SDXL_LIGHTNING = Model("sdxl_lightning_4step.safetensors", "sdxl-base", 1024, 1.0, "an SDXL-Lightning or Hyper-SD "
                       "4-step checkpoint (ByteDance/SDXL-Lightning sdxl_lightning_4step.safetensors)")
TAIYI = Model("diffusers/Taiyi-Stable-Diffusion-1B-Chinese-v0.1", "taiyi", 512, 7.0,
              "Taiyi-Stable-Diffusion-1B-Chinese-v0.1 (a diffusers folder in models/diffusers, or a single file)")
SD_TURBO = Model("sd_turbo.safetensors", "sd-turbo", 512, 0.0, "SD-Turbo (stabilityai/sd-turbo, sd_turbo.safetensors; "
                 "or SD 1.5 with an LCM-LoRA through an SDAccel LoRA node)", tiny_vae="taesd_decoder.pth")
MODELS = {m.ckpt_name: m for m in (SD15, SDXL, SDXL_REFINER, TAIYI, SDXL_LIGHTNING, SD_TURBO)}
_PRESET_MODELS = {"lightning": SDXL_LIGHTNING}
_LORA_HINT = {"lcm-lora-sdv1-5.safetensors": "the LCM-LoRA for SD 1.5 (latent-consistency/lcm-lora-sdv1-5, saved as "
              "lcm-lora-sdv1-5.safetensors) in models/loras",
              "tcd-sd15-lora.safetensors": "the TCD-LoRA for SD 1.5 (h1t/TCD-SD15, saved as tcd-sd15-lora.safetensors) "
              "in models/loras"}
SAMPLER_REQUEST = ("scheduler", "steps", "cfg")  # request fields a preset sets that the sampler node holds

_SDXL_PRESETS = {"vae-fp16-fix", "refiner-ensemble"}  # presets that only make sense on SDXL
_VAE_FILE_HINT = {"taesd_decoder.pth": "taesd_decoder.pth (+ taesd_encoder.pth) from github.com/madebyollin/taesd "
                  "in models/vae_approx",
                  "taesdxl_decoder.pth": "taesdxl_decoder.pth (+ taesdxl_encoder.pth) from github.com/madebyollin/"
                  "taesd in models/vae_approx",
                  "sdxl_vae_fp16_fix.safetensors": "the fp16-fix VAE (madebyollin/sdxl-vae-fp16-fix, saved as "
                  "sdxl_vae_fp16_fix.safetensors) in models/vae"}
_FALLBACK_NOTE = ("Options this machine cannot run (CUDA-only ones on a CPU, say) fall back and are named in the "
                  "stats notes under the sampler.")


@dataclass(frozen=True)
class Plan:
    """One example workflow: which preset (or unit) it reproduces and how."""

    name: str
    title: str
    description: str
    model: Model
    optimizations: tuple  # (kind, {field: value}) in the preset's order
    request: dict
    steps: int
    ensemble: bool = False
    prompt: str = PROMPT
    negative: str = NEGATIVE
    reproduces: str = ""
    lora: str = ""  # a LoRA file (models/loras) the workflow merges at strength 1 before sampling


def _for_users(description: str) -> str:
    """A preset description without its benchmark-only remarks (workflows use real weights)."""
    return re.sub(r"\s*\([^()]*random weights[^()]*\)", "", description)


def plans() -> list[Plan]:
    """Every example workflow: one per bench preset, one per unit no preset uses, and the Taiyi one."""
    from sdaccel.optim.bench.presets import PRESETS
    from sdaccel.optim.core.registry import all_units

    out = [Plan("baseline", "Baseline", PRESETS["baseline"].description, SD15, (), {}, BASELINE_STEPS,
                reproduces="bench --preset baseline")]
    for name, preset in PRESETS.items():
        if name == "baseline":
            continue
        steps = BASELINE_STEPS if preset.steps_scale is None else max(1, round(BASELINE_STEPS * preset.steps_scale))
        steps = preset.request.get("steps", steps)
        model = _PRESET_MODELS.get(name, SDXL if name in _SDXL_PRESETS else SD15)
        out.append(Plan(name, name, _for_users(preset.description), model, tuple(preset.optimizations),
                        dict(preset.request), steps, ensemble=preset.runner == "ensemble",
                        reproduces=f"bench --preset {name}", lora=preset.lora))
    used = {kind for plan in out for kind, _ in plan.optimizations}
    for kind, unit in all_units().items():
        if kind not in used and kind != "precision":
            out.append(Plan(kind.replace("_", "-"), unit.title, " ".join((unit.config_cls.__doc__ or "").split()),
                            SD15, ((kind, {}),), {}, BASELINE_STEPS,
                            reproduces=f"the {unit.title} unit at its defaults (no bench preset yet)"))
    out.append(Plan("taiyi-chinese-prompt", "Taiyi, Chinese prompt", "Taiyi Stable Diffusion (Chinese BERT text "
                    "encoder, SD1 UNet) with a Chinese prompt; every SDAccel toggle works on it as on SD 1.5",
                    TAIYI, (), {}, BASELINE_STEPS, prompt=TAIYI_PROMPT, negative="",
                    reproduces="generate --checkpoint taiyi --prompt '" + TAIYI_PROMPT + "'"))
    return out


def _input(name: str, kind: str, widget: bool = False) -> dict:
    """A node's input slot; `widget`: a widget turned into an input (its value comes over the link)."""
    return {"name": name, "type": kind, "link": None, **({"widget": {"name": name}} if widget else {})}


class _Graph:
    """Accumulates nodes and links in ComfyUI's UI (LiteGraph) workflow format."""

    def __init__(self):
        self.nodes: list[dict] = []
        self.links: list[list] = []

    def add(self, node_type: str, widgets_values: list, *, pos, size, inputs=(), outputs=(), title=None,
            extra=None) -> int:
        node_id = len(self.nodes) + 1
        node = {"id": node_id, "type": node_type, "pos": list(pos), "size": list(size), "flags": {},
                "order": len(self.nodes), "mode": 0,
                "inputs": [_input(*i) for i in inputs],
                "outputs": [{"name": n, "type": t, "links": [], "slot_index": i} for i, (n, t) in enumerate(outputs)],
                "properties": {"Node name for S&R": node_type}, "widgets_values": widgets_values}
        if title:
            node["title"] = title
        node.update(extra or {})
        self.nodes.append(node)
        return node_id

    def link(self, src: int, src_slot: int, dst: int, dst_slot: int) -> None:
        link_id = len(self.links) + 1
        out = self.nodes[src - 1]["outputs"][src_slot]
        inp = self.nodes[dst - 1]["inputs"][dst_slot]
        out["links"].append(link_id)
        inp["link"] = link_id
        self.links.append([link_id, src, src_slot, dst, dst_slot, out["type"]])

    def workflow(self) -> dict:
        return {"last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": self.nodes,
                "links": self.links, "groups": [], "config": {},
                "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}}, "version": 0.4}


# How ComfyUI's UI format stores a node's inputs: declared widget types become `widgets_values` in declaration
# order, a seed-like INT is followed by its "control after generate" value, the rest are link slots. Whether
# the real frontend reads the files back this way is checked by tests/test_comfy_real_host.py, which converts
# every shipped workflow in ComfyUI's own page and compares what ran with the bench preset.
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
NOTE_NODES = {"Note", "MarkdownNote"}  # frontend-only nodes, never sent to the server


def _declared(input_types: dict) -> list[tuple[str, tuple]]:
    out = []
    for section in ("required", "optional"):
        out.extend((name, tuple(spec)) for name, spec in (input_types.get(section) or {}).items())
    return out


def _is_widget(spec: tuple) -> bool:
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return not options.get("forceInput") and (isinstance(spec[0], (list, tuple)) or spec[0] in WIDGET_TYPES)


def _has_control(name: str, spec: tuple) -> bool:
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    flag = options.get("control_after_generate")
    if spec[0] == "INT":
        return bool(flag) if flag is not None else name in ("seed", "noise_seed")
    return bool(flag)


def widget_inputs(input_types: dict) -> list[tuple[str, tuple, bool]]:
    """(name, spec, followed by a control value) for every widget input, in the UI format's order."""
    return [(name, spec, _has_control(name, spec)) for name, spec in _declared(input_types) if _is_widget(spec)]


def link_inputs(input_types: dict) -> list[tuple[str, tuple]]:
    return [(name, spec) for name, spec in _declared(input_types) if not _is_widget(spec)]


def widget_values(node_cls, values: dict) -> list:
    """widgets_values in the order ComfyUI's frontend lays them out (a control value after seed widgets)."""
    out = []
    for name, spec, has_control in widget_inputs(node_cls.INPUT_TYPES()):
        out.append(values[name] if name in values else spec[1].get("default"))
        if has_control:
            out.append("fixed")
    return out


def _links_in(node_cls) -> list[tuple[str, str]]:
    return [(name, spec[0]) for name, spec in link_inputs(node_cls.INPUT_TYPES())]


def _outputs(node_cls) -> list[tuple[str, str]]:
    names = getattr(node_cls, "RETURN_NAMES", None) or node_cls.RETURN_TYPES
    return list(zip(names, node_cls.RETURN_TYPES))


def _loader(graph: _Graph, mappings, model: Model, pos, title=None) -> int:
    cls = mappings["SDAccelLoader"]
    return graph.add("SDAccelLoader", widget_values(cls, {"ckpt_name": model.ckpt_name}), pos=pos, size=(340, 200),
                     outputs=_outputs(cls), title=title)


def _add_toggles(graph: _Graph, mappings, pipe: int, optimizations, model: Model, x: int, y: int):
    """One toggle node per (kind, fields) after `pipe`, left to right: (the last node, its x, the VAE files named)."""
    from sdaccel.nodes.toggles import node_id

    vae_files = []
    for kind, fields in optimizations:
        cls = mappings[node_id(kind)]
        values = user_values(kind, fields, model)
        if kind == "vae" and values.get("path"):
            vae_files.append(values["path"])
        x += 380
        toggle = graph.add(node_id(kind), widget_values(cls, values), pos=(x, y),
                           size=(340, 60 + 26 * len(cls.INPUT_TYPES()["required"])), inputs=_links_in(cls),
                           outputs=_outputs(cls))
        graph.link(pipe, 0, toggle, 0)
        pipe = toggle
    return pipe, x, vae_files


def user_values(kind: str, fields: dict, model: Model) -> dict:
    """A preset's fields as a user's workflow holds them (benchmark-only random weights become files)."""
    values = dict(fields)
    if kind == "vae" and values.get("path") == "synthetic":  # benchmarks use random weights; users bring files
        values["path"] = model.tiny_vae if values.get("variant") == "tiny" else model.fp16_fix_vae
    return values


def build(plan: Plan) -> dict:
    """The UI-format workflow for one plan."""
    from sdaccel.nodes import NODE_CLASS_MAPPINGS as mappings
    from sdaccel.optim.core.registry import all_units

    graph = _Graph()
    x, y = 40, 240
    pipe = _loader(graph, mappings, plan.model, (x, y), title="Base model" if plan.ensemble else None)
    if plan.ensemble:
        refiner = _loader(graph, mappings, SDXL_REFINER, (x, y + 260), title="Refiner model")
        x += 380
        cls = mappings["SDAccelRefinerEnsemble"]
        ensemble = graph.add("SDAccelRefinerEnsemble", widget_values(cls, {"switch_at": 0.9}), pos=(x, y),
                             size=(320, 100), inputs=_links_in(cls), outputs=_outputs(cls))
        graph.link(pipe, 0, ensemble, 0)
        graph.link(refiner, 0, ensemble, 1)
        pipe = ensemble
    if plan.lora:
        cls = mappings["SDAccelLora"]
        x += 380
        lora = graph.add("SDAccelLora", widget_values(cls, {"lora_name": plan.lora, "strength": 1.0}), pos=(x, y),
                         size=(340, 130), inputs=_links_in(cls), outputs=_outputs(cls))
        graph.link(pipe, 0, lora, 0)
        pipe = lora
    order = list(all_units())
    pipe, x, vae_files = _add_toggles(graph, mappings, pipe, sorted(plan.optimizations,
                                                                    key=lambda kv: order.index(kv[0])),
                                      plan.model, x, y)
    cutoff_values = {k: v for k, v in plan.request.items() if k not in SAMPLER_REQUEST}
    if cutoff_values:
        cls = mappings["SDAccelCFGCutoff"]
        x += 380
        cutoff = graph.add("SDAccelCFGCutoff", widget_values(cls, cutoff_values), pos=(x, y), size=(340, 110),
                           inputs=_links_in(cls), outputs=_outputs(cls))
        graph.link(pipe, 0, cutoff, 0)
        pipe = cutoff
    cls = mappings["SDAccelSampler"]
    x += 380
    sampler_values = {"prompt": plan.prompt, "negative_prompt": plan.negative, "width": plan.model.size,
                      "height": plan.model.size, "steps": plan.steps, "cfg": plan.model.cfg, "seed": SEED,
                      **{k: v for k, v in plan.request.items() if k in SAMPLER_REQUEST}}
    sampler = graph.add("SDAccelSampler", widget_values(cls, sampler_values), pos=(x, y), size=(400, 440),
                        inputs=_links_in(cls), outputs=_outputs(cls))
    graph.link(pipe, 0, sampler, 0)
    save = graph.add("SaveImage", [f"sdaccel/{plan.name}"], pos=(x + 440, y), size=(400, 440),
                     inputs=[("images", "IMAGE")])
    graph.link(sampler, 0, save, 0)
    graph.add("Note", [note_text(plan, vae_files)], pos=(40, 20), size=(720, 180),
              extra={"color": "#432", "bgcolor": "#653"})
    return graph.workflow()


# -- KSampler graphs: ComfyUI's core nodes with SDAccel's MODEL patches --------------------------------------------
NATIVE_PREFIX = "ksampler-"
NATIVE_STEPS = 20
LORA_NAME = "your_lora.safetensors"  # a placeholder the user replaces with a file from models/loras
CONTROLNET_NAME = "your_controlnet.safetensors"  # the same for models/controlnet (an SD 1.5 ControlNet)
CONTROL_IMAGE = "example.png"  # ComfyUI's own input/example.png; the user loads their control image instead
# The core nodes' widgets in the order ComfyUI's UI format stores them (its page converting these files in
# tests/test_comfy_model_patches.py checks the order), their link inputs and their outputs.
CORE_NODES = {
    "CheckpointLoaderSimple": ((), (("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE"))),
    "LoraLoader": ((("model", "MODEL"), ("clip", "CLIP")), (("MODEL", "MODEL"), ("CLIP", "CLIP"))),
    "CLIPTextEncode": ((("clip", "CLIP"),), (("CONDITIONING", "CONDITIONING"),)),
    "EmptyLatentImage": ((), (("LATENT", "LATENT"),)),
    "KSampler": ((("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                  ("latent_image", "LATENT")), (("LATENT", "LATENT"),)),
    "VAEDecode": ((("samples", "LATENT"), ("vae", "VAE")), (("IMAGE", "IMAGE"),)),
    "SaveImage": ((("images", "IMAGE"),), ()),
    "ControlNetLoader": ((), (("CONTROL_NET", "CONTROL_NET"),)),
    "LoadImage": ((), (("IMAGE", "IMAGE"), ("MASK", "MASK"))),
    "ControlNetApplyAdvanced": ((("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                                 ("control_net", "CONTROL_NET"), ("image", "IMAGE"), ("vae", "VAE")),
                                (("positive", "CONDITIONING"), ("negative", "CONDITIONING"))),
}
_PATCH_DEFAULTS = {"SDAccelWinogradModel": {}, "SDAccelDeepCacheModel": {"cache_interval": 3},
                   "SDAccelCFGCutoffModel": {"cfg_cutoff": 0.5}, "SDAccelCompileModel": {"backend": "openvino"},
                   "SDAccelPrecisionModel": {"dtype": "half"}, "SDAccelAttentionModel": {"backend": "auto"}}


@dataclass(frozen=True)
class NativePlan:
    """A KSampler graph: which SDAccel MODEL patches sit between the model and KSampler, and whether a LoRA does."""

    name: str
    title: str
    description: str
    patches: tuple  # node types, in wiring order
    lora: bool = False
    controlnet: bool = False  # core ControlNetLoader + LoadImage + ControlNetApplyAdvanced on the prompts


def native_plans() -> list[NativePlan]:
    return [
        NativePlan("baseline", "KSampler baseline", "Core nodes only: the image and time every patch is compared with",
                   ()),
        NativePlan("winograd", "KSampler + Winograd", "Winograd convolution on ComfyUI's own model: the same image "
                   "to fp32 rounding, fewer multiplications on a CPU", ("SDAccelWinogradModel",)),
        NativePlan("deepcache", "KSampler + DeepCache", "DeepCache on ComfyUI's own UNet, interval 3: the deep "
                   "features of every third step reused in between (changes the image)", ("SDAccelDeepCacheModel",)),
        NativePlan("cfg-cutoff", "KSampler + CFG cutoff", "Guidance stopped after half the steps: the later steps "
                   "skip the negative prompt's pass (changes the image)", ("SDAccelCFGCutoffModel",)),
        NativePlan("compile-openvino", "KSampler + OpenVINO", "ComfyUI's own model compiled by OpenVINO for the CPU "
                   "(pip install openvino): the same image within fp32 rounding, a pause to convert on the first "
                   "run", ("SDAccelCompileModel",)),
        NativePlan("precision-bf16", "KSampler + bf16", "ComfyUI's own model in bf16 on a CPU with AVX512-BF16 or AMX "
                   "(fp32 kept, with a note, on one without): the weights converted once per run instead of in every "
                   "layer call as ModelComputeDtype does (changes the image slightly)", ("SDAccelPrecisionModel",)),
        NativePlan("attention", "KSampler + pytorch attention", "ComfyUI's pytorch attention for this model instead of "
                   "its CPU default (sub-quadratic): the same image to fp32 rounding", ("SDAccelAttentionModel",)),
        NativePlan("fastest", "KSampler fastest", "pytorch attention, bf16 (on CPUs that have it), DeepCache and the "
                   "CFG cutoff together on ComfyUI's own model (Winograd is left out: it runs in fp32 only)",
                   ("SDAccelAttentionModel", "SDAccelPrecisionModel", "SDAccelDeepCacheModel",
                    "SDAccelCFGCutoffModel")),
        NativePlan("lora-winograd", "KSampler + LoRA + Winograd", "A core LoraLoader before the Winograd patch: the "
                   "transformed filters follow the LoRA's weights, at any strength", ("SDAccelWinogradModel",),
                   lora=True),
        NativePlan("controlnet", "KSampler + ControlNet + Winograd + DeepCache", "A core ControlNet on the prompts: "
                   "Winograd honours its residuals (the same image to fp32 rounding); DeepCache steps aside while a "
                   "ControlNet is applied, and says so in the log", ("SDAccelWinogradModel", "SDAccelDeepCacheModel"),
                   controlnet=True),
    ]


def build_native(plan: NativePlan) -> dict:
    from sdaccel.nodes import NODE_CLASS_MAPPINGS as mappings

    graph = _Graph()

    def core(node_type, values, pos, size, title=None):
        links, outputs = CORE_NODES[node_type]
        return graph.add(node_type, values, pos=pos, size=size, inputs=links, outputs=outputs, title=title)

    x, y = 40, 240
    ckpt = core("CheckpointLoaderSimple", [SD15.ckpt_name], (x, y), (320, 100))
    model, clip = (ckpt, 0), (ckpt, 1)
    if plan.lora:
        lora = core("LoraLoader", [LORA_NAME, 1.0, 1.0], (x, y + 160), (320, 130))
        graph.link(ckpt, 0, lora, 0)
        graph.link(ckpt, 1, lora, 1)
        model, clip = (lora, 0), (lora, 1)
    positive = core("CLIPTextEncode", [PROMPT], (x + 380, y), (400, 160), title="Positive")
    negative = core("CLIPTextEncode", [NEGATIVE], (x + 380, y + 200), (400, 160), title="Negative")
    graph.link(*clip, positive, 0)
    graph.link(*clip, negative, 0)
    latent = core("EmptyLatentImage", [SD15.size, SD15.size, 1], (x + 380, y + 400), (320, 110))
    conditioning = (positive, 0), (negative, 0)
    if plan.controlnet:
        loader = core("ControlNetLoader", [CONTROLNET_NAME], (x, y + 330), (320, 60))
        image = core("LoadImage", [CONTROL_IMAGE, "image"], (x, y + 420), (320, 320), title="Control image")
        apply = core("ControlNetApplyAdvanced", [1.0, 0.0, 1.0], (x + 380, y + 560), (320, 190))
        graph.link(positive, 0, apply, 0)
        graph.link(negative, 0, apply, 1)
        graph.link(loader, 0, apply, 2)
        graph.link(image, 0, apply, 3)
        conditioning = (apply, 0), (apply, 1)
    px = x + 820
    for node_type in plan.patches:
        cls = mappings[node_type]
        patch = graph.add(node_type, widget_values(cls, _PATCH_DEFAULTS[node_type]), pos=(px, y),
                          size=(340, 60 + 26 * len(cls.INPUT_TYPES()["required"])), inputs=_links_in(cls),
                          outputs=_outputs(cls))
        graph.link(*model, patch, 0)
        model = (patch, 0)
        px += 380
    sampler = core("KSampler", [SEED, "fixed", NATIVE_STEPS, SD15.cfg, "euler", "normal", 1.0], (px, y), (320, 270))
    graph.link(*model, sampler, 0)
    graph.link(*conditioning[0], sampler, 1)
    graph.link(*conditioning[1], sampler, 2)
    graph.link(latent, 0, sampler, 3)
    decode = core("VAEDecode", [], (px + 360, y), (220, 50))
    graph.link(sampler, 0, decode, 0)
    graph.link(ckpt, 2, decode, 1)
    save = core("SaveImage", [f"sdaccel/{NATIVE_PREFIX}{plan.name}"], (px + 620, y), (400, 440))
    graph.link(decode, 0, save, 0)
    lines = [f"SDAccel: {plan.title}", "", plan.description.rstrip(".") + ".", "",
             f"Reproduces the `{plan.name}` configuration with ComfyUI's own Load Checkpoint and KSampler "
             f"({NATIVE_STEPS} steps, {SD15.size}x{SD15.size}, CFG {SD15.cfg}); compare its time with the "
             "ksampler-baseline workflow's.",
             f"To run: pick {SD15.hint} in Load Checkpoint" + (" and your LoRA in Load LoRA" if plan.lora else "")
             + (", an SD 1.5 ControlNet in Load ControlNet Model and its control image" if plan.controlnet else "")
             + ". Each patch writes what it did and the time per step to the ComfyUI log after every run."]
    graph.add("Note", ["\n".join(lines)], pos=(40, 20), size=(720, 180), extra={"color": "#432", "bgcolor": "#653"})
    return graph.workflow()


# -- Stream graphs: a video's frames through SDAccel Stream, as `bench stream`'s rows run them ---------------------
STREAM_PREFIX = "stream-"
VIDEO_NAME = "your_video.mp4"  # a placeholder: the user picks (or uploads) a video in Load Video
STREAM_CORE_NODES = {
    "LoadVideo": ((), (("VIDEO", "VIDEO"),)),
    "GetVideoComponents": ((("video", "VIDEO"),), (("images", "IMAGE"), ("audio", "AUDIO"), ("fps", "FLOAT"))),
    "CreateVideo": ((("images", "IMAGE"), ("audio", "AUDIO"), ("fps", "FLOAT", True)), (("VIDEO", "VIDEO"),)),
    "SaveVideo": ((("video", "VIDEO"),), ()),
}


@dataclass(frozen=True)
class StreamPlan:
    """A stream graph: the `bench stream` row (its toggles and settings) it reproduces on a video."""

    name: str
    variant: str  # a row of optim/bench/stream.py
    description: str


def stream_plans() -> list[StreamPlan]:
    batch = ("A video's frames through SD-Turbo with Stream Batch: one UNet call advances every frame in flight; the "
             "prompt, the noise and the scheduler's coefficients are computed once")
    return [StreamPlan("batch", "stream-batch", batch),
            StreamPlan("tiny-vae", "tiny-vae", batch + ". The Tiny VAE (TAESD) encodes and decodes each frame: far "
                       "faster frames, slightly softer"),
            StreamPlan("openvino", "openvino", batch + ". The Tiny VAE, and the UNet compiled by OpenVINO for the "
                       "CPU: the same frames within fp32 rounding, a pause to convert on the first run")]


def stream_settings(plan: StreamPlan) -> dict:
    """The SDAccel Stream node's values: the settings `bench stream`'s row runs (the size is the video's)."""
    from sdaccel.optim.bench.stream import StreamBenchSettings, row_settings

    fields = row_settings(plan.variant, StreamBenchSettings()).to_dict()
    return {k: v for k, v in fields.items() if k not in ("width", "height", "queue_size", "queue_policy", "resize")}


def build_stream(plan: StreamPlan) -> dict:
    from sdaccel.nodes import NODE_CLASS_MAPPINGS as mappings
    from sdaccel.optim.bench.stream import VARIANTS

    variant = VARIANTS[plan.variant]
    graph = _Graph()

    def core(node_type, values, pos, size, title=None):
        links, outputs = STREAM_CORE_NODES[node_type]
        return graph.add(node_type, values, pos=pos, size=size, inputs=links, outputs=outputs, title=title)

    x, y = 40, 240
    pipe = _loader(graph, mappings, SD_TURBO, (x, y))
    pipe, x, vae_files = _add_toggles(graph, mappings, pipe, variant.optimizations, SD_TURBO, x, y)
    video = core("LoadVideo", [VIDEO_NAME, "image"], (40, y + 260), (320, 360), title="Your video")
    frames = core("GetVideoComponents", [], (40, y + 660), (320, 90))
    graph.link(video, 0, frames, 0)
    cls = mappings["SDAccelStream"]
    x += 380
    stream = graph.add("SDAccelStream", widget_values(cls, stream_settings(plan)), pos=(x, y), size=(400, 520),
                       inputs=_links_in(cls), outputs=_outputs(cls))
    graph.link(pipe, 0, stream, 0)
    graph.link(frames, 0, stream, 1)
    create = core("CreateVideo", [30.0], (x + 440, y), (300, 100))
    graph.link(stream, 0, create, 0)
    graph.link(frames, 2, create, 2)  # the source's frame rate
    save = core("SaveVideo", [f"sdaccel/{STREAM_PREFIX}{plan.name}", "auto", "auto"], (x + 440, y + 140),
                (400, 440))
    graph.link(create, 0, save, 0)
    needs = [_VAE_FILE_HINT[f] for f in vae_files] + (["openvino (pip install openvino)"]
                                                      if any(k == "compile" for k, _ in variant.optimizations)
                                                      else [])
    lines = [f"SDAccel: stream, {plan.name}", "", plan.description.rstrip(".") + ".", "",
             f"Reproduces the `{plan.variant}` row of `python -m sdaccel bench stream` on your video: "
             f"{SD_TURBO.hint.split(' (')[0]}, Stream Batch, {stream_settings(plan)['steps']} steps per frame, "
             f"strength {stream_settings(plan)['strength']}, no guidance; the frames keep the video's size "
             f"(the benchmark's: {SD_TURBO.size}x{SD_TURBO.size}).",
             f"To run: pick {SD_TURBO.hint} in the loader and a video in Load Video"
             + (f"; needs {', '.join(needs)}" if needs else "") + ". The stream node shows frames per second, "
             "latency and skipped frames after a run; compare them with the stream-batch workflow's."]
    graph.add("Note", ["\n".join(lines)], pos=(40, 20), size=(720, 180), extra={"color": "#432", "bgcolor": "#653"})
    return graph.workflow()


def note_text(plan: Plan, vae_files: list[str]) -> str:
    if plan.ensemble:
        pick = f"{plan.model.hint} in the base loader and {SDXL_REFINER.hint} in the refiner loader"
    else:
        pick = f"{plan.model.hint} in the loader"
    cfg = plan.request.get("cfg", plan.model.cfg)
    needs = [_VAE_FILE_HINT[f] for f in vae_files] + ([_LORA_HINT[plan.lora]] if plan.lora else [])
    lines = [f"SDAccel: {plan.title}", "", plan.description.rstrip(".") + ".", "",
             f"Reproduces `python -m sdaccel {plan.reproduces}` as a graph ({plan.steps} steps, "
             f"{plan.model.size}x{plan.model.size}, CFG {cfg}).",
             f"To run: pick {pick}" + (f"; needs {', '.join(needs)}" if needs else "") + ".",
             "After a run the sampler shows time, it/s, peak memory and the active toggles; compare them with the "
             "baseline workflow. " + _FALLBACK_NOTE]
    return "\n".join(lines)


def dumps(workflow: dict) -> str:
    return json.dumps(workflow, indent=2, ensure_ascii=False) + "\n"


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    OUT_DIR.mkdir(exist_ok=True)
    wanted = set()
    for plan in plans():
        path = OUT_DIR / f"{plan.name}.json"
        path.write_text(dumps(build(plan)), encoding="utf-8")
        wanted.add(path.name)
    for plan in native_plans():
        path = OUT_DIR / f"{NATIVE_PREFIX}{plan.name}.json"
        path.write_text(dumps(build_native(plan)), encoding="utf-8")
        wanted.add(path.name)
    for plan in stream_plans():
        path = OUT_DIR / f"{STREAM_PREFIX}{plan.name}.json"
        path.write_text(dumps(build_stream(plan)), encoding="utf-8")
        wanted.add(path.name)
    for stale in OUT_DIR.glob("*.json"):
        if stale.name not in wanted:
            stale.unlink()
    print(f"wrote {len(wanted)} workflows to {OUT_DIR}")


if __name__ == "__main__":
    main()
