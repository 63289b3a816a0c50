"""Run inside ComfyUI's venv by test_comfy_native.py: the engine's native patches on ComfyUI's own UNetModel,
loaded by ComfyUI's own checkpoint and LoRA loaders. Prints one JSON line of measured facts; the test judges them.

Usage: python comfy_native_check.py COMFYUI_PATH PACK_ROOT CHECKPOINT LORA
"""

from __future__ import annotations

import importlib.util
import json
import sys


def main(comfy_path: str, pack_root: str, checkpoint: str, lora_path: str) -> dict:
    sys.path.insert(0, comfy_path)
    import comfy.options

    comfy.options.enable_args_parsing(False)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.sd
    import comfy.utils
    import torch

    spec = importlib.util.spec_from_file_location("sdaccel", f"{pack_root}/__init__.py",
                                                  submodule_search_locations=[pack_root])
    pack = importlib.util.module_from_spec(spec)
    sys.modules["sdaccel"] = pack
    spec.loader.exec_module(pack)
    from sdaccel.nodes.model_patches import comfy_conv_weights
    from sdaccel.optim.core.registry import RunContext
    from sdaccel.optim.native.deepcache import LDMDeepCache
    from sdaccel.optim.native.ldm import find_ldm_unet
    from sdaccel.optim.native.winograd import NativeWinograd
    from sdaccel.optim.spec.errors import UnavailableError
    from sdaccel.optim.units.deepcache.config import DeepCacheConfig
    from sdaccel.optim.units.winograd.config import WinogradConfig

    facts: dict = {}
    patcher, clip = comfy.sd.load_checkpoint_guess_config(checkpoint, output_vae=False, output_clip=True)[:2]
    base_model = patcher.model
    unet = base_model.diffusion_model
    facts["unet_class"] = f"{type(unet).__module__}.{type(unet).__name__}"
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    t = torch.tensor([500.0, 500.0])
    context = torch.randn(2, 77, 768, generator=gen)

    def forward(step: int = 0):
        """The UNet on this test's input at `step` (each step a different sample and timestep)."""
        with torch.inference_mode():
            return unet(x + 0.3 * step, t - 150 * step, context=context, transformer_options={}).clone()

    def rel(a, b) -> float:
        return float((a - b).abs().max() / b.abs().max())

    def ctx():
        return RunContext(pipe=None, family=None, device="cpu", steps=3, batch=2, cfg_steps=3)

    def instance_forwards() -> int:
        return sum("forward" in m.__dict__ for m in unet.modules())

    # Winograd: hooks on ComfyUI's own comfy.ops Conv2d layers, exact to fp32 rounding, gone afterwards
    winograd = NativeWinograd(WinogradConfig(tile="f4", fused_transforms=False), weights=comfy_conv_weights)
    base = forward()
    run = ctx()
    with winograd.run(base_model, run):
        facts["hooked_forwards_during_run"] = instance_forwards()
        patched = forward()
    facts["winograd_rel_error"] = rel(patched, base)
    facts["winograd_counters"] = run.counters
    facts["instance_forwards_after"] = instance_forwards()
    facts["rerun_equal_base"] = bool(torch.equal(forward(), base))

    # LoRA through ComfyUI's own loader and weight patching, at two strengths in turn: the filters follow
    lora = comfy.utils.load_torch_file(lora_path)
    facts["lora"] = []
    for strength in (0.8, 0.3, 0.8):
        lora_model, _ = comfy.sd.load_lora_for_models(patcher, clip, lora, strength, 0.0)
        lora_model.patch_model()
        try:
            reference = forward()
            run = ctx()
            with winograd.run(lora_model.model, run):
                patched = forward()
            facts["lora"].append({"strength": strength, "rel_error": rel(patched, reference),
                                  "differs_from_base": rel(reference, base),
                                  "winograd_calls": run.counters.get("winograd_winograd_calls", 0)})
        finally:
            lora_model.unpatch_model()
    facts["after_lora_equal_base"] = bool(torch.equal(forward(), base))

    # DeepCache on ComfyUI's forward: interval 1 is the host's own forward; a cached call equals the full
    # forward with the kept hidden state put in front of the live skip (the definition, checked by a plain hook)
    for interval in (1, 2):
        cache = LDMDeepCache(base_model, DeepCacheConfig(cache_interval=interval, cache_branch_id=0))
        run = ctx()
        cache.install()
        outs = []
        try:
            for step in range(3):
                with cache.call(step, x, run) as mode:
                    outs.append((mode, forward(step)))
                if step == 0:
                    kept = cache.kept[0].hidden.clone()
        finally:
            cache.uninstall()
        facts[f"deepcache_{interval}_modes"] = [mode for mode, _ in outs]
        facts[f"deepcache_{interval}_counters"] = run.counters
        if interval == 1:
            facts["deepcache_1_equal_base"] = all(torch.equal(out, forward(step)) for step, (_, out) in enumerate(outs))
        else:
            boundary = cache.boundary

            def put_kept(module, args):
                skip = args[0][:, kept.shape[1]:]
                return (torch.cat([kept, skip], dim=1),) + tuple(args[1:])

            handle = boundary.register_forward_pre_hook(put_kept)
            try:
                reference = forward(1)
            finally:
                handle.remove()
            facts["deepcache_cached_rel_error"] = rel(outs[1][1], reference)
            facts["deepcache_cached_differs_from_full"] = rel(outs[1][1], forward(1))
        facts[f"deepcache_{interval}_instance_forwards_after"] = instance_forwards()
    try:
        LDMDeepCache(base_model, DeepCacheConfig(cache_branch_id=40))
        facts["branch_error"] = ""
    except Exception as exc:  # noqa: BLE001 - reported to the test
        facts["branch_error"] = f"{type(exc).__name__}: {exc}"
    try:
        find_ldm_unet(torch.nn.Sequential(torch.nn.Linear(2, 2)), "SDAccel Winograd")
        facts["dit_error"] = ""
    except UnavailableError as exc:
        facts["dit_error"] = str(exc)
    return facts


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:5])))
