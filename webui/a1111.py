"""A1111's `/sdapi/v1` request and response bodies, translated to and from the engine's specs.

Clients written for A1111 (its Python API clients, painting-app plugins, chat bots) send A1111's field names
and read A1111's answers: base64 PNGs, the `info` JSON string, the echoed `parameters`. The engine's own field
descriptions check every value, so a bad one is refused with the A1111 field's name, before anything runs.
A1111 fields SDAccel does not implement are accepted (clients send them all); a non-default value of one is
reported in `info`'s notes instead of being silently dropped. SDAccel's optimizations come the way A1111
extensions get their arguments: `alwayson_scripts: {"sdaccel": {"args": [...]}}`, each arg a preset name or an
optimization as `{"kind": ..., <fields>}`.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import random
import time
from dataclasses import dataclass, field

from ..optim.models.schedulers import SCHEDULER_TITLES, normalise_scheduler
from ..optim.spec.errors import ConfigError, SDAccelError

SCRIPT_NAME = "sdaccel"
# A1111 field -> engine GenerationRequest field
REQUEST_FIELDS = {"prompt": "prompt", "negative_prompt": "negative_prompt", "steps": "steps", "cfg_scale": "cfg",
                  "width": "width", "height": "height", "batch_size": "batch_size", "seed": "seed",
                  "sampler_name": "scheduler", "denoising_strength": "strength"}
_ENGINE_TO_A1111 = {v: k for k, v in REQUEST_FIELDS.items()}
# What A1111 uses when a field is left out (txt2img; img2img differs in denoising_strength only)
DEFAULTS = {"prompt": "", "negative_prompt": "", "steps": 50, "cfg_scale": 7.0, "width": 512, "height": 512,
            "batch_size": 1, "n_iter": 1, "seed": -1, "sampler_name": "Euler a", "scheduler": "Automatic",
            "denoising_strength": 0.75}
# A1111 fields SDAccel does not implement, with the value at which they change nothing: another value is noted
NOT_IMPLEMENTED = {"styles": [], "subseed": -1, "subseed_strength": 0, "seed_resize_from_h": -1,
                   "seed_resize_from_w": -1, "restore_faces": False, "tiling": False, "eta": 0, "s_churn": 0,
                   "s_noise": 1, "s_min_uncond": 0, "s_tmin": 0, "enable_hr": False, "refiner_checkpoint": None,
                   "mask": None, "script_name": None, "script_args": [], "save_images": False,
                   "initial_noise_multiplier": 1, "image_cfg_scale": None, "include_init_images": False,
                   "firstpass_image": None, "disable_extra_networks": False}
# A1111 fields accepted as they come: defaults, or settings that only matter with a feature noted above
ACCEPTED = {"do_not_save_samples", "do_not_save_grid", "override_settings_restore_afterwards", "sampler_index",
            "s_tmax", "refiner_switch_at", "firstphase_width", "firstphase_height", "hr_scale", "hr_upscaler",
            "hr_second_pass_steps", "hr_resize_x", "hr_resize_y", "hr_checkpoint_name", "hr_sampler_name",
            "hr_scheduler", "hr_prompt", "hr_negative_prompt", "hr_additional_modules",
            "force_task_id", "infotext", "comments", "mask_blur", "mask_blur_x", "mask_blur_y", "mask_round",
            "inpainting_fill", "inpaint_full_res", "inpaint_full_res_padding", "inpainting_mask_invert",
            "latent_mask", "resize_mode", "send_images", "alwayson_scripts", "override_settings", "init_images",
            "user"}
_SCHEDULER_SUFFIX = {"karras": "_karras", "sgm uniform": "_trailing"}  # SGM Uniform: what Lightning asks for


class PayloadError(SDAccelError):
    """A request body A1111's schema (or the engine) cannot take; `field` is the A1111 name, for a 422."""

    def __init__(self, field: str, message: str):
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}" if field else message)

    def detail(self) -> list[dict]:
        """FastAPI's 422 body, as A1111 (pydantic) sends it."""
        loc = ["body"] + ([part for part in self.field.split(".")] if self.field else [])
        return [{"loc": loc, "msg": self.message, "type": "value_error"}]


@dataclass
class ParsedRequest:
    """What a `/sdapi/v1/txt2img|img2img` body asks for, in engine terms."""

    request: object  # GenerationRequest as the body gives it (presets are applied when the job is planned)
    n_iter: int = 1
    optimizations: list = field(default_factory=list)  # OptimizationConfig instances
    presets: list = field(default_factory=list)  # preset names (applied with their request changes)
    checkpoint: str | None = None  # override_settings.sd_model_checkpoint
    send_images: bool = True
    notes: list = field(default_factory=list)
    echo: dict = field(default_factory=dict)  # the body with A1111's defaults filled in (`parameters`)


def samplers() -> list[dict]:
    """`/sdapi/v1/samplers`: the schedulers SDAccel runs, under A1111's names."""
    return [{"name": title, "aliases": [key], "options": {}} for key, title in SCHEDULER_TITLES.items()]


def _engine_field_to_a1111(error: ConfigError) -> str:
    name = error.field.rsplit(".", 1)[-1]
    return _ENGINE_TO_A1111.get(name, error.field)


def _scheduler(sampler: str, scheduler: str) -> str:
    """A1111 1.9+ splits "DPM++ 2M Karras" into sampler "DPM++ 2M" and scheduler "Karras"; both spellings work."""
    if not isinstance(sampler, str):
        raise PayloadError("sampler_name", f"expected text, got {type(sampler).__name__}")
    try:
        key = normalise_scheduler(sampler)
    except ConfigError as exc:
        raise PayloadError("sampler_name", f"unknown sampler {sampler!r}; SDAccel runs: "
                           f"{', '.join(SCHEDULER_TITLES.values())}") from exc
    extra = str(scheduler or "Automatic").strip().lower()
    if extra in ("automatic", "auto", ""):
        return key
    suffix = _SCHEDULER_SUFFIX.get(extra)
    if suffix and key.endswith(suffix):
        return key
    if suffix and key + suffix in SCHEDULER_TITLES:
        return key + suffix
    raise PayloadError("scheduler", f"{scheduler!r} with {sampler!r} is not available; use Automatic, or a sampler "
                       f"with its schedule in the name ({', '.join(SCHEDULER_TITLES.values())})")


def decode_image(data, field_name: str):
    """A PIL image from A1111's base64 string (a `data:image/png;base64,` prefix allowed)."""
    from PIL import Image, UnidentifiedImageError

    if not isinstance(data, str) or not data:
        raise PayloadError(field_name, "expected a base64-encoded image")
    text = data.split(",", 1)[1] if data.startswith("data:") else data
    try:
        raw = base64.b64decode(text, validate=True)
        image = Image.open(io.BytesIO(raw))
        image.load()
    except (binascii.Error, ValueError) as exc:
        raise PayloadError(field_name, f"is not valid base64 ({exc})") from exc
    except (UnidentifiedImageError, OSError) as exc:
        raise PayloadError(field_name, "is not an image PIL can read (send a PNG, JPEG or WebP)") from exc
    return image.convert("RGB")


def _accordion_args(args: list, where: str) -> tuple[list, dict]:
    """[enabled, winograd, channels_last, cfg_cutoff, deepcache]: what SDAccel's A1111 accordion sends
    (extension/accordion.py); shorter lists leave the rest off."""
    from ..extension.accordion import Choice
    from ..optim.spec.optimization import config_class

    names = Choice.ORDER
    if len(args) > len(names):
        raise PayloadError(where, f"the accordion takes {len(names)} arguments ({', '.join(names)}), got {len(args)}")
    for i, (name, value) in enumerate(zip(names[:3], args)):
        if not isinstance(value, bool):
            raise PayloadError(f"{where}.{i}", f"{name} must be true or false")
    cutoff = args[3] if len(args) > 3 else 1.0
    if isinstance(cutoff, bool) or not isinstance(cutoff, (int, float)) or not 0 <= cutoff <= 1:
        raise PayloadError(f"{where}.3", f"cfg_cutoff must be a number from 0 to 1, got {cutoff!r}")
    interval = args[4] if len(args) > 4 else 1
    if isinstance(interval, bool) or not isinstance(interval, (int, float)) or interval != int(interval) \
            or not 1 <= interval <= 20:
        raise PayloadError(f"{where}.4", f"deepcache must be a whole number of steps from 1 (off) to 20, "
                                         f"got {interval!r}")
    choice = Choice.from_args(args)
    if not choice.enabled:
        return [], {}
    configs = [config_class("winograd")(fused_transforms=False)] if choice.winograd else []  # as the accordion
    configs += [config_class("channels_last")()] if choice.channels_last else []
    configs += [config_class("deepcache")(cache_interval=choice.deepcache)] if choice.deepcache > 1 else []
    return configs, ({"cfg_cutoff": choice.cfg_cutoff} if choice.cfg_cutoff < 1 else {})


def _alwayson(scripts) -> tuple[list, list, list, dict]:
    from ..optim.bench.presets import PRESETS
    from ..optim.spec.optimization import config_class

    if scripts in (None, {}):
        return [], [], [], {}
    if not isinstance(scripts, dict):
        raise PayloadError("alwayson_scripts", "expected an object of script name -> {\"args\": [...]}")
    configs, presets, notes, request_changes = [], [], [], {}
    for name, entry in scripts.items():
        if str(name).lower() != SCRIPT_NAME:
            notes.append(f"alwayson_scripts.{name}: no such script here (SDAccel's is {SCRIPT_NAME!r}); ignored")
            continue
        where = f"alwayson_scripts.{name}.args"
        args = entry.get("args", []) if isinstance(entry, dict) else entry
        if not isinstance(args, list):
            raise PayloadError(where, "expected a list of preset names and {\"kind\": ...} optimizations")
        if args and isinstance(args[0], bool):  # the A1111 accordion's own arguments: the same request works there
            accordion, extra = _accordion_args(args, where)
            configs.extend(accordion)
            request_changes.update(extra)
            continue
        for i, arg in enumerate(args):
            if isinstance(arg, str):
                if arg not in PRESETS:
                    raise PayloadError(f"{where}.{i}", f"unknown preset {arg!r}; known: {', '.join(PRESETS)}")
                presets.append(arg)
            elif isinstance(arg, dict) and "kind" in arg:
                body = {k: v for k, v in arg.items() if k != "kind"}
                try:
                    configs.append(config_class(str(arg["kind"])).from_dict(body))
                except ConfigError as exc:
                    raise PayloadError(f"{where}.{i}", str(exc)) from exc
            else:
                raise PayloadError(f"{where}.{i}", f"expected a preset name or {{\"kind\": ...}}, got {arg!r:.60}")
    return configs, presets, notes, request_changes


def _check_type(body: dict, name: str, kinds, what: str):
    value = body.get(name)
    if value is not None and (not isinstance(value, kinds) or isinstance(value, bool) and bool not in kinds):
        raise PayloadError(name, f"expected {what}, got {type(value).__name__} {value!r:.40}")
    return value


def parse(body, *, img2img: bool = False) -> ParsedRequest:
    """Translate an A1111 txt2img/img2img body; raises PayloadError naming the A1111 field at fault."""
    from ..optim.spec.pipeline import GenerationRequest

    if not isinstance(body, dict):
        raise PayloadError("", f"expected a JSON object, got {type(body).__name__}")
    merged = {**DEFAULTS, **({"denoising_strength": 0.75} if img2img else {}), **body}
    for name in ("prompt", "negative_prompt", "sampler_name", "scheduler"):
        _check_type(merged, name, (str,), "text")
    for name in ("steps", "width", "height", "batch_size", "n_iter", "seed"):
        _check_type(merged, name, (int,), "a whole number")
    for name in ("cfg_scale", "denoising_strength"):
        _check_type(merged, name, (int, float), "a number")
    notes = [f"{name}={body[name]!r:.40} is not implemented by SDAccel; ignored"
             for name, neutral in NOT_IMPLEMENTED.items()
             if name in body and body[name] not in (None, "", neutral)]
    unknown = sorted(set(body) - set(DEFAULTS) - set(NOT_IMPLEMENTED) - ACCEPTED)
    if unknown:
        notes.append(f"unknown field(s) {', '.join(unknown)}; ignored")
    sampler = merged["sampler_name"] if merged.get("sampler_name") is not None else merged.get("sampler_index")
    scheduler = _scheduler(sampler or "Euler a", merged.get("scheduler") or "Automatic")
    seed = merged["seed"] if merged["seed"] is not None else -1
    if seed < 0:
        seed = random.SystemRandom().randrange(2**32)  # A1111 draws a 32-bit seed for -1
    n_iter = merged["n_iter"] if merged["n_iter"] is not None else 1
    if n_iter < 1 or n_iter > 100:
        raise PayloadError("n_iter", f"{n_iter} is out of range; use 1 to 100")
    fields = {"prompt": merged["prompt"] or "", "negative_prompt": merged["negative_prompt"] or "",
              "steps": merged["steps"], "cfg": merged["cfg_scale"], "width": merged["width"],
              "height": merged["height"], "batch_size": merged["batch_size"], "seed": seed, "scheduler": scheduler}
    if img2img:
        images = merged.get("init_images")
        if not isinstance(images, list) or not images:
            raise PayloadError("init_images", "img2img needs one base64 image in init_images")
        if len(images) > 1:
            notes.append(f"init_images holds {len(images)} images; SDAccel uses the first")
        fields["init_image"] = decode_image(images[0], "init_images.0")
        fields["strength"] = merged["denoising_strength"]
    configs, presets, script_notes, changes = _alwayson(merged.get("alwayson_scripts"))
    try:
        request = GenerationRequest(**fields, **changes)
    except ConfigError as exc:
        raise PayloadError(_engine_field_to_a1111(exc), str(exc).split(": ", 1)[-1]) from exc
    overrides = merged.get("override_settings") or {}
    if not isinstance(overrides, dict):
        raise PayloadError("override_settings", "expected an object of setting name -> value")
    checkpoint = overrides.get("sd_model_checkpoint")
    for key in overrides:
        if key != "sd_model_checkpoint":
            notes.append(f"override_settings.{key} is not implemented by SDAccel; ignored")
    send = merged.get("send_images", True)
    echo = {k: v for k, v in merged.items() if k not in ("init_images",)}
    echo["seed"] = seed
    return ParsedRequest(request=request, n_iter=n_iter, optimizations=configs, presets=presets,
                         checkpoint=checkpoint, send_images=send is not False, notes=notes + script_notes, echo=echo)


def response(results: list, spec, parsed: ParsedRequest, request, *, model_title: str,
             model_hash: str | None = None) -> dict:
    """A1111's TextToImageResponse: base64 PNGs (with their `parameters`), the echoed body, the `info` JSON.

    `results` are the batches that finished (fewer than n_iter after an interrupt). The prompt shown is the one
    sent, `<lora:...>` tags included, as A1111 shows it (so "send to txt2img" brings the LoRAs back); `request`
    is what the engine ran (the tags taken out)."""
    from ..optim.run.infotext import parameters_text, png_bytes, run_metadata

    sent = parsed.request.prompt
    shown = request.with_(prompt=sent) if sent != request.prompt else request
    images, infotexts, seeds = [], [], []
    for batch, result in enumerate(results):
        first = request.seed + batch * request.batch_size
        meta = run_metadata(spec, request, result.stats)
        for i, image in enumerate(result.images):
            text = parameters_text(spec, shown, result.stats, i, seed=first)
            infotexts.append(text)
            seeds.append((first + i) % 2**64)
            if parsed.send_images:
                images.append(base64.b64encode(png_bytes(image, {"parameters": text, "sdaccel": meta})).decode())
    stats = results[0].stats if results else None
    info = {"prompt": sent, "all_prompts": [sent] * len(seeds),
            "negative_prompt": request.negative_prompt, "all_negative_prompts": [request.negative_prompt] * len(seeds),
            "seed": request.seed, "all_seeds": seeds, "subseed": -1, "all_subseeds": [-1] * len(seeds),
            "subseed_strength": 0, "width": stats.width if stats else request.width,
            "height": stats.height if stats else request.height,
            "sampler_name": SCHEDULER_TITLES.get(request.scheduler, request.scheduler),
            "cfg_scale": stats.cfg if stats else request.cfg, "steps": stats.steps if stats else request.steps,
            "batch_size": request.batch_size, "restore_faces": False, "face_restoration_model": None,
            "sd_model_name": model_title.rsplit(".", 1)[0], "sd_model_hash": model_hash, "sd_vae_name": None,
            "sd_vae_hash": None, "seed_resize_from_w": -1, "seed_resize_from_h": -1,
            "denoising_strength": request.strength if request.is_img2img else None,
            "extra_generation_params": {}, "index_of_first_image": 0, "infotexts": infotexts, "styles": [],
            "job_timestamp": time.strftime("%Y%m%d%H%M%S"), "clip_skip": 1,
            "is_using_inpainting_conditioning": False, "version": "sdaccel",
            "sdaccel": {"stats": [r.stats.to_dict() for r in results], "notes": parsed.notes}}
    return {"images": images, "parameters": parsed.echo, "info": json.dumps(info, default=str)}
