"""How the SDAccel tab's pipeline and the host's own model share one machine's memory (A1111/Forge).

The `sdaccel_tab_host_model` setting (Settings > SDAccel):
- `keep`: both stay loaded. Neither side reloads; the price is a second copy of the weights.
- `one-at-a-time`: a tab job takes the host's own queue (a host generation waits for it, and it for one) and
  unloads the host's model before it runs; the host's next generation releases the tab's pipelines before
  it reloads its model (A1111 and Forge reload by themselves at the start of a generation).
- `auto` (the default): `one-at-a-time` when the tab's pipeline, not loaded yet, would not fit beside the host's
  model in the memory free now (RAM on a CPU, the GPU's free memory on CUDA), `keep` otherwise.

The decision is plain Python (`decide`); the host's modules are imported only inside the functions that act.
"""

from __future__ import annotations

import contextlib
import gc
from pathlib import Path

from . import settings

MODES = next(s.choices for s in settings.SETTINGS if s.key == "sdaccel_tab_host_model")
HEADROOM = 1.3  # the pipeline's weights times this: activations, the VAE's decode, the allocator's slack
_state = {"unloaded": False}  # the tab unloaded the host's model and has not given the memory back yet


def say(line: str) -> None:
    """One line on the host's console, where the accordion's lines go too."""
    print(f"SDAccel: {line}", flush=True)


def weights_bytes(path, device: str = "cpu") -> int:
    """About what the engine's pipeline of the checkpoint at `path` holds: fp32 on a CPU, fp16 on a GPU. From
    a safetensors header (EMA copies left out); from the file sizes for a .ckpt or a diffusers folder."""
    from ..optim.models.checkpoint import open_checkpoint

    per_param = 4 if device == "cpu" else 2
    path = Path(path)
    if path.is_dir():
        files = [f for f in path.rglob("*") if f.suffix in (".safetensors", ".bin") and f.is_file()]
        return sum(f.stat().st_size for f in files) * (2 if per_param == 4 else 1)
    if path.suffix.lower() != ".safetensors":
        return path.stat().st_size
    meta = open_checkpoint(path).meta
    count = 0
    for key, info in meta.items():
        if key.startswith("model_ema.") or not info.dtype.startswith(("float", "bfloat")):
            continue
        size = 1
        for dim in info.shape:
            size *= dim
        count += size
    return count * per_param


def available_bytes(device: str = "cpu") -> int:
    """Memory free for a new pipeline now: the GPU's free memory on CUDA, else the machine's available RAM."""
    if device.startswith("cuda"):
        import torch

        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    try:
        import psutil
    except ImportError:  # both hosts install it; elsewhere Linux says it in /proc/meminfo
        try:
            for line in Path("/proc/meminfo").read_text(encoding="ascii").splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0  # unknown: `auto` then makes room whenever the tab has something to load
    return int(psutil.virtual_memory().available)


def decide(mode: str, *, needed: int, available: int) -> bool:
    """True when the tab should unload the host's model before it runs (`needed`: 0 when already loaded)."""
    if mode not in MODES:
        from ..optim.spec.errors import ConfigError

        raise ConfigError("sdaccel_tab_host_model", f"{mode!r} is not one of {', '.join(MODES)}",
                          "pick one in Settings > SDAccel")
    if mode == "keep":
        return False
    if mode == "one-at-a-time":
        return True
    return needed * HEADROOM > available


def _tab_device(session) -> str:
    from ..optim.run.capabilities import resolve_device

    return str(resolve_device(session.device))


def _specs_of(job, session) -> list:
    """The pipeline specs a tab job will load (an ensemble's two), or the selected checkpoint's for a job that
    does not say (the Bench sub-tab's)."""
    spec = getattr(job.work, "spec", None)
    if spec is None:
        spec, _ = session.spec()
    return [spec.base, spec.refiner] if hasattr(spec, "refiner") else [spec]


def _needed_bytes(specs, device: str) -> int:
    """What loading `specs` adds: nothing for one already in the cache or one of random weights."""
    from ..optim.run.cache import default_cache

    loaded = {entry.spec.model.identity() for entry in default_cache().entries() if entry.spec is not None}
    return sum(weights_bytes(spec.model.path, device) for spec in specs
               if not spec.model.is_synthetic and spec.model.identity() not in loaded)


def _modules_of(model) -> list:
    """The torch modules holding a host model's weights: A1111's model is one; Forge's keeps them in the
    patchers of `forge_objects` (unet, clip, vae)."""
    import torch

    if isinstance(model, torch.nn.Module):
        return [model]
    objects = getattr(model, "forge_objects", None)
    found = []
    for part in (vars(objects).values() if hasattr(objects, "__dict__") else ()):
        for holder in (part, getattr(part, "patcher", None)):
            module = getattr(holder, "model", None)
            if isinstance(module, torch.nn.Module):
                found.append(module)
    return found


def tensor_bytes(modules) -> int:
    """Bytes of the distinct tensors (parameters and buffers) of `modules`."""
    seen, total = set(), 0
    for module in modules:
        for tensor in list(module.parameters()) + list(module.buffers()):
            key = (tensor.device, tensor.data_ptr())
            if tensor.device.type == "meta" or key in seen:
                continue
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total


def unload_host_model() -> tuple[str, int] | None:
    """Free the host's loaded model: (the title of what was loaded, the bytes of its weights), or None when
    nothing was loaded. The host loads it again at the start of its next generation."""
    from modules import sd_models

    from ..optim.run.allocator import release_free_memory

    data = sd_models.model_data
    model = data.sd_model
    info = getattr(model, "sd_checkpoint_info", None)
    if model is None or info is None:  # nothing loaded (Forge's placeholder has no checkpoint info)
        return None
    weights = tensor_bytes(_modules_of(model))
    if hasattr(data, "forge_hash"):  # Forge: its memory manager holds the parts; a new hash makes it reload
        from backend import memory_management

        data.sd_model = sd_models.FakeInitialModel()
        data.forge_hash = ""
        memory_management.unload_all_models()
        memory_management.soft_empty_cache()
    else:  # A1111: off its list of loaded models, weights to the meta device
        from modules import sd_hijack

        if model in data.loaded_sd_models:
            data.loaded_sd_models.remove(model)
        sd_hijack.model_hijack.undo_hijack(model)
        data.sd_model = None
        sd_models.send_model_to_trash(model)
    del model
    gc.collect()
    release_free_memory()  # the freed weights' pages back to the OS (glibc keeps heap holes until trimmed)
    return info.title, weights


def release_tab_pipelines() -> tuple[int, int]:
    """Drop the tab's prepared pipelines (before the host loads its model again): (how many, their bytes)."""
    from ..optim.run.cache import default_cache

    cache = default_cache()
    count, held = len(cache.entries()), cache.memory_bytes()
    if count:
        cache.clear()
    return count, held


def tab_job_scope(session):
    """The GenerationService `job_scope` of the tab's session: takes the host's queue and makes room."""

    @contextlib.contextmanager
    def scope(job):
        mode = settings.value("sdaccel_tab_host_model")
        if mode == "keep":
            yield
            return
        from modules.call_queue import queue_lock

        with queue_lock:
            device = _tab_device(session)
            needed = _needed_bytes(_specs_of(job, session), device)
            if decide(mode, needed=needed, available=available_bytes(device)):
                unloaded = unload_host_model()
                if unloaded:
                    _state["unloaded"] = True
                    say(f"unloaded the host's model ({unloaded[0]}, {unloaded[1] / 2**30:.2f} GB of weights) while "
                        f"the tab generates ({mode}; the host loads it again at its next generation)")
            yield
    return scope


def host_generation_starts() -> None:
    """Called before each host generation (the accordion script's `before_process`): give the memory back to
    the host when the tab took it (`one-at-a-time`, or `auto` after it unloaded the host's model)."""
    mode = settings.value("sdaccel_tab_host_model")
    if mode == "keep" or (mode == "auto" and not _state["unloaded"]):
        return
    released, held = release_tab_pipelines()
    _state["unloaded"] = False
    if released:
        say(f"released the tab's pipeline ({released}, {held / 2**30:.2f} GB) so the host loads its model ({mode})")


__all__ = ["MODES", "decide", "weights_bytes", "available_bytes", "unload_host_model", "release_tab_pipelines",
           "tab_job_scope", "host_generation_starts"]
