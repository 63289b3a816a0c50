"""Offload: keep weights out of the working memory while they are not computing.

- model: diffusers' model CPU offload; whole components visit the GPU when used (memory about halved).
- sequential: diffusers' sequential offload; every sub-module visits the GPU per call (lowest memory, slow).
- group: diffusers' group offloading (block or leaf groups, CUDA streams to overlap copies); on a CPU it
  spills the groups to disk instead (diffusers >= 0.35).
- staged (A1111 --medvram): encode every prompt, free the text encoders, denoise, free the UNet, then
  decode. On a GPU idle components wait in CPU RAM; on a CPU they wait in a file on disk, which is what
  lowers the resident memory of each stage there.
- lowvram (A1111 --lowvram): the UNet's blocks visit the GPU one at a time.

On a CPU-only machine model/sequential/lowvram have nothing to move (weights already live in RAM):
they are reported unavailable there and the run goes on without them, with that one line in the stats.
"""

from __future__ import annotations

import atexit
import logging
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path

import torch

from ...core.registry import ApplyContext, RunContext, Unit, register
from ...spec.errors import ConfigError, UnavailableError
from .config import OffloadConfig
from .stores import DeviceSwap, DiskSpill

log = logging.getLogger(__name__)

_STAGE_COMPONENTS = {"text_encode": ("text_encoder", "text_encoder_2"), "encode_image": ("vae",),
                     "denoise": ("unet",), "decode": ("vae",)}


def _components(pipe):
    names = ("unet", "vae", "text_encoder", "text_encoder_2")
    return {n: getattr(pipe, n) for n in names if getattr(pipe, n, None) is not None}


def _spill_folder(cfg: OffloadConfig) -> Path:
    """A new folder name for spilled weights, removed at process exit if no undo removed it before (a CLI run
    ends, or Ctrl+C stops it, with the pipeline still prepared)."""
    base = Path(cfg.spill_dir).expanduser() if cfg.spill_dir else Path(tempfile.gettempdir())
    if base.exists() and not base.is_dir():
        raise ConfigError("OffloadConfig.spill_dir", f"{base} is a file, not a folder",
                          "name a folder (it is created if missing), or leave it empty for the temp folder")
    folder = base / f"sdaccel-spill-{uuid.uuid4().hex[:12]}"
    if not _LIVE_SPILLS:
        atexit.register(_remove_live_spills)
    _LIVE_SPILLS.add(folder)
    return folder


_LIVE_SPILLS: set[Path] = set()


def _remove_spill(folder: Path | None) -> None:
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)
        _LIVE_SPILLS.discard(folder)


def _remove_live_spills() -> None:
    for folder in list(_LIVE_SPILLS):
        _remove_spill(folder)


def _group_offloading_api():
    try:
        from diffusers.hooks import apply_group_offloading
    except ImportError:
        return None
    return apply_group_offloading


def _supports_disk_groups() -> bool:
    import inspect

    api = _group_offloading_api()
    return api is not None and "offload_to_disk_path" in inspect.signature(api).parameters


class _Stager:
    """Moves components in and out at the sampler's stage boundaries."""

    def __init__(self, stores: dict):
        self.stores = stores

    def listener(self, event: str, stage: str) -> None:
        wanted = _STAGE_COMPONENTS.get(stage, ())
        if event == "start":
            for name, store in self.stores.items():
                if name not in wanted:
                    store.offload()
            for name in wanted:
                if name in self.stores:
                    self.stores[name].onload()
        else:
            for name in wanted:
                if name in self.stores:
                    self.stores[name].offload()

    def close(self) -> None:
        for store in self.stores.values():
            store.close()


def _tensor_entries(modules, skip_ids=frozenset()) -> list:
    """(store, key, data) for every parameter and buffer under `modules` (except ids in `skip_ids`): what
    offloading moves or replaces, to put back on removal."""
    return [(store, key, store[key].data) for m in modules for sub in m.modules()
            for store in (sub._parameters, sub._buffers)
            for key in store if store[key] is not None and id(store[key]) not in skip_ids]


def _put(entries, device=None) -> None:
    """Set each entry's tensor to its saved data (moved to `device` when given)."""
    for store, key, data in entries:
        value = data if device is None else data.to(device, copy=True)
        tensor = store[key]
        if isinstance(tensor, torch.nn.Parameter):
            tensor.data = value
        else:
            store[key] = value


def _enable_diffusers_offload(pipe, mode: str, device, patch) -> None:
    """model / sequential offload through diffusers, undone exactly (hooks removed, tensors restored)."""
    originals = _tensor_entries(_components(pipe).values())
    attrs = {k: pipe.__dict__.get(k, "_missing") for k in ("_offload_gpu_id", "_offload_device", "_all_hooks")}

    def undo():
        pipe.remove_all_hooks()
        _put(originals)
        for key, value in attrs.items():
            if value == "_missing":
                pipe.__dict__.pop(key, None)
            else:
                pipe.__dict__[key] = value

    patch.on_remove(undo)
    if mode == "model":
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.enable_sequential_cpu_offload(device=device)


def _enable_group_offload(pipe, cfg: OffloadConfig, device, patch) -> None:
    api = _group_offloading_api()
    on_cpu = torch.device(device).type == "cpu"
    folder = _spill_folder(cfg) if on_cpu else None
    originals = _tensor_entries(_components(pipe).values())
    kwargs = {"onload_device": device, "offload_device": torch.device("cpu"), "offload_type": cfg.group_type}
    if cfg.group_type == "block_level":
        kwargs["num_blocks_per_group"] = cfg.blocks_per_group
    if not on_cpu and cfg.use_streams and torch.device(device).type == "cuda":
        kwargs["use_stream"] = True
    for name, module in _components(pipe).items():
        extra = {"offload_to_disk_path": str(folder / name)} if folder else {}
        api(module, **kwargs, **extra)

    def undo():
        from diffusers.hooks import HookRegistry

        for module in _components(pipe).values():
            for sub in module.modules():
                registry = getattr(sub, "_diffusers_hook", None)
                if isinstance(registry, HookRegistry):
                    for name in list(registry.hooks):
                        registry.remove_hook(name, recurse=False)
        _put(originals)
        _remove_spill(folder)

    patch.on_remove(undo)


def _enable_lowvram(pipe, device, patch) -> None:
    """UNet blocks visit the GPU one at a time; the small layers stay there during denoising."""
    unet = pipe.unet
    blocks = list(unet.down_blocks) + ([unet.mid_block] if unet.mid_block is not None else []) + list(unet.up_blocks)
    swaps = []
    for block in blocks:
        swap = DeviceSwap(block, device)
        swaps.append(swap)
        patch.add_hook(block.register_forward_pre_hook(lambda m, a, s=swap: s.onload()))
        patch.add_hook(block.register_forward_hook(lambda m, a, o, s=swap: s.offload()))
    block_ids = {id(t) for b in blocks for t in list(b.parameters()) + list(b.buffers())}
    rest = _tensor_entries([unet], block_ids)
    _put(rest, device)

    def undo():
        for swap in swaps:
            swap.close()
        _put(rest)

    patch.on_remove(undo)
    others = {n: DeviceSwap(m, device) for n, m in _components(pipe).items() if n != "unet"}
    patch.info["stager"] = _Stager(others)
    patch.on_remove(patch.info["stager"].close)


@register
class Offload(Unit):
    config_cls = OffloadConfig

    def examples(self) -> list[OffloadConfig]:
        # group offload goes through diffusers' hook registry, whose removal leaves residue we must undo
        return [OffloadConfig(mode="staged")] + ([OffloadConfig(mode="group")] if _supports_disk_groups() else [])

    def check(self, cfg: OffloadConfig, ctx: ApplyContext) -> None:
        kind = torch.device(ctx.device).type
        if cfg.mode in ("model", "sequential", "lowvram") and kind == "cpu":
            raise UnavailableError(f"offload.mode={cfg.mode}", "on a CPU-only machine the weights already live in "
                                   "system RAM, so there is nothing to move", "use staged (spills idle parts to "
                                   "disk) or no offload")
        if cfg.mode == "group":
            if _group_offloading_api() is None:
                raise UnavailableError("offload.mode=group", "this diffusers has no group offloading",
                                       "upgrade diffusers to 0.33 or newer, or use staged")
            if kind == "cpu" and not _supports_disk_groups():
                raise UnavailableError("offload.mode=group", "this diffusers cannot spill groups to disk, which "
                                       "is the only thing group offload can do on a CPU", "upgrade diffusers or use "
                                       "staged")

    def _apply(self, pipe, cfg: OffloadConfig, ctx: ApplyContext, patch) -> None:
        device = torch.device(ctx.device)
        for module in _components(pipe).values():  # runs last on removal: hook libraries leave residue
            patch.keep_attributes(module)
        if cfg.mode in ("model", "sequential"):
            _enable_diffusers_offload(pipe, cfg.mode, device, patch)
        elif cfg.mode == "group":
            _enable_group_offload(pipe, cfg, device, patch)
        elif cfg.mode == "lowvram":
            _enable_lowvram(pipe, device, patch)
        else:
            if device.type == "cpu":
                folder = _spill_folder(cfg)
                stores = {n: DiskSpill(m, folder / f"{n}.bin") for n, m in _components(pipe).items()}
            else:
                stores = {n: DeviceSwap(m, device) for n, m in _components(pipe).items()}
            stager = _Stager(stores)
            patch.info["stager"] = stager

            def undo(stager=stager, folder=locals().get("folder")):
                stager.close()
                _remove_spill(folder)

            patch.on_remove(undo)

    def run_scope(self, cfg: OffloadConfig, handle, run: RunContext):
        stager = handle.info.get("stager")
        if stager is None:
            return None

        @contextmanager
        def scope():
            run.stage_listeners.append(stager.listener)
            try:
                yield
            finally:
                run.stage_listeners.remove(stager.listener)
                for store in stager.stores.values():  # idle again: everything back in storage
                    store.offload()

        return scope()
