"""SDAccel: measured Stable Diffusion acceleration for ComfyUI, the A1111 WebUI, a web UI and a CLI.

This file is the ComfyUI entry point (the repo root is the custom-node pack). It imports only the
node mappings; the engine lives in `optim/` and does no work at import time.
"""

if __package__:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
else:  # pytest imports this file on its own when the checkout's folder is no module name ("SDAccel-main")
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}

WEB_DIRECTORY = "./js"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
