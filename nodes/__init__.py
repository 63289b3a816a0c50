"""ComfyUI nodes over the engine: a loader, a LoRA node, one toggle per optimization unit, the CFG cutoff, the
memory-budget planner, the samplers, the SDXL refiner ensemble and the frame stream. Node ids are forever
(`SDAccel...`), categories live under `sdaccel/`.

Only class definitions happen at import; ComfyUI modules are imported lazily (`host.py`), so this
package imports and its nodes run without ComfyUI.
"""

from .ensemble import SDAccelRefinerEnsemble
from .fit_memory import SDAccelFitToMemory
from .generation import engine_cache
from .host import register_routes
from .loader import SDAccelLoader
from .lora import SDAccelLora
from .model_patches import MODEL_PATCH_NAMES, MODEL_PATCHES
from .sampler import SDAccelSampler, SDAccelSamplerImg2Img
from .stream import SDAccelStream
from .toggles import SDAccelCFGCutoff, display_name, toggle_nodes

_TOGGLES = toggle_nodes()

NODE_CLASS_MAPPINGS: dict = {
    "SDAccelLoader": SDAccelLoader,
    "SDAccelLora": SDAccelLora,
    **_TOGGLES,
    "SDAccelCFGCutoff": SDAccelCFGCutoff,
    "SDAccelRefinerEnsemble": SDAccelRefinerEnsemble,
    "SDAccelSampler": SDAccelSampler,
    "SDAccelSamplerImg2Img": SDAccelSamplerImg2Img,
    **MODEL_PATCHES,
    "SDAccelFitToMemory": SDAccelFitToMemory,
    "SDAccelStream": SDAccelStream,
}

NODE_DISPLAY_NAME_MAPPINGS: dict = {
    "SDAccelLoader": "SDAccel Load Checkpoint",
    "SDAccelLora": "SDAccel LoRA",
    **{node_id: display_name(cls) for node_id, cls in _TOGGLES.items()},
    "SDAccelCFGCutoff": "SDAccel CFG Cutoff",
    "SDAccelRefinerEnsemble": "SDAccel SDXL Refiner Ensemble",
    "SDAccelSampler": "SDAccel Sampler",
    "SDAccelSamplerImg2Img": "SDAccel Sampler (img2img)",
    **MODEL_PATCH_NAMES,
    "SDAccelFitToMemory": "SDAccel Fit to Memory",
    "SDAccelStream": "SDAccel Stream (video frames)",
}

register_routes(engine_cache)  # only inside ComfyUI: adds GET /sdaccel/pipelines

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
