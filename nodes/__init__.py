"""ComfyUI nodes over the engine. The node classes arrive with the ComfyUI front-end; until then the
pack registers none, so ComfyUI loads it without adding anything to its menus."""

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
