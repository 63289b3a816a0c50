"""Everything that talks to ComfyUI itself, imported lazily so the pack works without it.

Inside ComfyUI: model-folder dropdowns (`folder_paths`), the progress bar (`comfy.utils.ProgressBar`),
the interrupt flag (`comfy.model_management`), memory release through ComfyUI's own model manager,
and one read-only route listing the prepared pipelines. Outside ComfyUI each helper answers with a
plain default (no dropdown entries, no progress bar, never interrupted), so the nodes run in tests,
scripts and the other front-ends unchanged. Nothing here patches the host: only its public
extension points are used.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import threading
import weakref
from dataclasses import dataclass
from typing import Callable, NoReturn

log = logging.getLogger(__name__)

USE_PATH = "(use path)"  # the checkpoint dropdown entry that defers to the path input
DIFFUSERS_PREFIX = "diffusers/"  # dropdown entries for diffusers folders in models/diffusers
_CHECKPOINT_FOLDERS = ("checkpoints",)
PATH_FOLDERS = {("vae", "path"): ("vae_approx", "vae")}  # config fields naming files in ComfyUI model folders


def in_comfyui() -> bool:
    """True inside a running ComfyUI (it imports its model manager before loading any pack)."""
    return "comfy.model_management" in sys.modules and "folder_paths" in sys.modules


def _module(name: str):
    """A ComfyUI module when running inside ComfyUI, else None (never imported from outside it)."""
    if not in_comfyui():
        return None
    return importlib.import_module(name)


# ---------------------------------------------------------------- model folders


def _diffusers_folders(folder_paths) -> list[str]:
    found = []
    for root in folder_paths.get_folder_paths("diffusers"):
        if not os.path.isdir(root):
            continue
        for here, _dirs, files in os.walk(root, followlinks=True):
            if "model_index.json" in files:
                found.append(DIFFUSERS_PREFIX + os.path.relpath(here, root).replace(os.sep, "/"))
    return sorted(found)


def checkpoint_choices() -> list[str]:
    """The loader's dropdown: ComfyUI's checkpoints and diffusers folders, then the path option."""
    folder_paths = _module("folder_paths")
    if folder_paths is None:
        return [USE_PATH]
    names: list[str] = []
    for folder in _CHECKPOINT_FOLDERS:
        names.extend(folder_paths.get_filename_list(folder))
    names.extend(_diffusers_folders(folder_paths))
    return names + [USE_PATH]


def resolve_checkpoint(name: str) -> str | None:
    """The full path of a dropdown entry, or None when ComfyUI does not know it."""
    folder_paths = _module("folder_paths")
    if folder_paths is None:
        return None
    for folder in _CHECKPOINT_FOLDERS:
        path = folder_paths.get_full_path(folder, name)
        if path:
            return path
    if name.startswith(DIFFUSERS_PREFIX):
        rel = name[len(DIFFUSERS_PREFIX):]
        for root in folder_paths.get_folder_paths("diffusers"):
            candidate = os.path.join(root, rel)
            if os.path.isfile(os.path.join(candidate, "model_index.json")):
                return candidate
    return None


def lora_choices() -> list[str]:
    """The LoRA node's dropdown: ComfyUI's models/loras, then the path option."""
    folder_paths = _module("folder_paths")
    return (list(folder_paths.get_filename_list("loras")) if folder_paths is not None else []) + [USE_PATH]


def resolve_lora(name: str) -> str | None:
    folder_paths = _module("folder_paths")
    if folder_paths is None or name == USE_PATH:
        return None
    return folder_paths.get_full_path("loras", name)


def resolve_model_file(kind: str, field: str, value: str) -> str:
    """A bare file name in a config field that names weights (e.g. vae.path = taesd_decoder.pth), looked up
    in ComfyUI's model folders; anything else (absolute paths, 'synthetic', unknown names) is returned as is."""
    folders = PATH_FOLDERS.get((kind, field))
    folder_paths = _module("folder_paths")
    if not folders or folder_paths is None or not value or os.path.isabs(os.path.expanduser(value)):
        return value
    for folder in folders:
        try:
            path = folder_paths.get_full_path(folder, value)
        except KeyError:  # a folder name this ComfyUI version does not define
            continue
        if path:
            return path
    return value


def path_tooltip(kind: str, field: str) -> str:
    folders = PATH_FOLDERS.get((kind, field))
    if not folders:
        return ""
    return ". In ComfyUI a bare file name is looked up in " + " and ".join(f"models/{f}" for f in folders)


# ---------------------------------------------------------------- progress and interrupt


def progress_callback() -> Callable[[int, int], None] | None:
    """`progress(step, total)` driving ComfyUI's progress bar for the running node, or None outside ComfyUI."""
    utils = _module("comfy.utils")
    if utils is None:
        return None
    bar = None

    def report(step: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = utils.ProgressBar(total)
        bar.update_absolute(step, total)

    return report


def interrupt_check() -> Callable[[], bool] | None:
    """ComfyUI's interrupt flag (polled by the engine before every step), or None outside ComfyUI."""
    mm = _module("comfy.model_management")
    return mm.processing_interrupted if mm is not None else None


def raise_interrupted(exc: BaseException) -> NoReturn:
    """Turn the engine's GenerationInterrupted into ComfyUI's own interrupt (clearing its flag), so the
    queue reports the prompt as interrupted rather than failed; re-raise `exc` where there is no host."""
    mm = _module("comfy.model_management")
    if mm is not None:
        try:
            mm.throw_exception_if_processing_interrupted()
        except mm.InterruptProcessingException as host_exc:
            raise host_exc from exc
    raise exc


# ---------------------------------------------------------------- memory


@dataclass
class _Record:
    entry: weakref.ref  # the engine's PreparedPipeline
    cache: weakref.ref  # the PipelineCache holding it
    patcher: object  # comfy.model_patcher.ModelPatcher over a weightless marker module


class MemoryBridge:
    """Shows each prepared pipeline to ComfyUI's model manager as a weightless model.

    When ComfyUI unloads models (its Unload Models / Free button, `POST /free`, an out-of-memory
    error, or memory pressure before it loads one of its own models), it detaches that entry and
    SDAccel releases the real pipeline from its cache. The entry declares no size: the weights are
    SDAccel's to place (offload modes move them on their own), so ComfyUI never moves or counts them.
    """

    def __init__(self):
        self._records: dict[int, _Record] = {}
        self._released: list[_Record] = []  # unloaded by ComfyUI; kept alive until the next sync (see _detached)
        self._lock = threading.RLock()

    def sync(self, cache, used) -> None:
        """Forget entries the cache dropped; register (or mark as just used) the prepared pipelines `used`."""
        mm, mp, ext = (_module("comfy.model_management"), _module("comfy.model_patcher"),
                       _module("comfy.patcher_extension"))
        if mm is None or mp is None or ext is None:
            return
        live = cache.entries()
        patchers = []
        with self._lock:
            dropped, self._released = self._released, []
            for key, record in list(self._records.items()):
                entry, owner = record.entry(), record.cache()
                if owner is None or entry is None or (owner is cache and not any(entry is e for e in live)):
                    dropped.append(self._records.pop(key))
            for entry in used:
                record = self._records.get(id(entry))
                if record is None or record.entry() is not entry:
                    record = self._records[id(entry)] = self._register(entry, cache, mm, mp, ext)
                patchers.append(record.patcher)
        # Dropping a patcher runs its __del__ (a detach): only outside the lock. ComfyUI's own finalizer
        # then removes its entry from the loaded-model list.
        del dropped
        if patchers:
            mm.load_models_gpu(patchers)

    def _register(self, entry, cache, mm, mp, ext) -> _Record:
        import torch

        marker = _marker_class(torch)()
        device = torch.device(str(entry.device))
        host_device = mm.get_torch_device()
        if device.type == host_device.type and device.index in (None, host_device.index):
            device = host_device  # "cuda" and "cuda:0" must compare equal when ComfyUI frees that device
        patcher = mp.ModelPatcher(marker, load_device=device, offload_device=torch.device("cpu"), size=0)
        key = id(entry)
        patcher.add_callback(ext.CallbacksMP.ON_DETACH, lambda _patcher, unpatch_all: self._detached(key, unpatch_all))
        return _Record(weakref.ref(entry), weakref.ref(cache), patcher)

    def _detached(self, key: int, unpatch_all: bool) -> None:
        """ComfyUI unloaded our entry: release the prepared pipeline it stands for.

        Only a real unload counts (`model_unload`, which detaches with unpatch_all=True); ComfyUI also
        detaches with unpatch_all=False when it re-loads a model and when a patcher is garbage-collected.
        """
        if not unpatch_all:
            return
        with self._lock:
            record = self._records.pop(key, None)
            if record is None:
                return
            # ComfyUI holds its models weakly and removes list entries when they die: if this patcher died
            # now, inside ComfyUI's unload loop, the list would shrink under the loop. It dies at our next sync.
            self._released.append(record)
        entry, cache = record.entry(), record.cache()
        if entry is None or cache is None:
            return
        name = entry.spec.model.display_name if entry.spec is not None else str(entry.device)
        if cache.release(entry):
            log.info("ComfyUI is freeing memory: releasing %s", name)

    def tracked(self) -> int:
        with self._lock:
            return len(self._records)


_MARKER = None


def _marker_class(torch):
    """A parameterless module class named so ComfyUI's logs read 'Requested to load SDAccelPipeline'."""
    global _MARKER
    if _MARKER is None:
        _MARKER = type("SDAccelPipeline", (torch.nn.Module,), {"__doc__": "Stands for an SDAccel pipeline."})
    return _MARKER


BRIDGE = MemoryBridge()


# ---------------------------------------------------------------- routes


def register_routes(cache_fn: Callable) -> bool:
    """Add `GET /sdaccel/pipelines` (what SDAccel holds in memory) to ComfyUI's server, if running in it."""
    if not in_comfyui():
        return False
    server = sys.modules.get("server")
    prompt_server = getattr(getattr(server, "PromptServer", None), "instance", None)
    if prompt_server is None:
        return False
    from aiohttp import web

    @prompt_server.routes.get("/sdaccel/pipelines")
    async def _pipelines(_request):
        cache = cache_fn()
        rows = [{"model": e.spec.model.display_name if e.spec else str(e.loaded.source),
                 "family": e.family.name, "device": str(e.device),
                 "optimizations": [c.kind for c in e.spec.optimizations] if e.spec else []}
                for e in cache.entries()]
        return web.json_response({"pipelines": rows, "max_entries": cache.max_entries,
                                  "tracked_by_comfyui": BRIDGE.tracked()})

    return True
