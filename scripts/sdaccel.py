"""A1111/Forge entry: registers the SDAccel tab, its Settings entries and the txt2img/img2img accordion, nothing else.

A1111 loads this file on its own (not as part of a package), so the pack is imported here as the package
`sdaccel` from the folder above (whatever the extension folder is called), unless it is pip-installed already.
"""

import importlib.util
import logging
import sys
from pathlib import Path

import gradio as gr
from modules import script_callbacks, scripts

log = logging.getLogger("sdaccel")
_ROOT = Path(__file__).resolve().parent.parent


def _pack():
    module = sys.modules.get("sdaccel")
    if module is not None and Path(getattr(module, "__file__", "") or "").resolve().parent == _ROOT:
        return module
    spec = importlib.util.spec_from_file_location("sdaccel", _ROOT / "__init__.py",
                                                  submodule_search_locations=[str(_ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["sdaccel"] = module
    spec.loader.exec_module(module)
    return module


_pack()
from sdaccel.extension import accordion, host_memory, settings  # noqa: E402
from sdaccel.extension.tab import build_tab  # noqa: E402

script_callbacks.on_ui_tabs(build_tab)
script_callbacks.on_ui_settings(settings.register)


class SDAccelScript(scripts.Script):
    """The "SDAccel" accordion: Winograd, channels-last, DeepCache and CFG cutoff on the host's own UNet, per
    generation."""

    sorting_priority = 20

    def __init__(self):
        self.run = accordion.AccordionRun()

    def title(self):
        return "SDAccel"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        return accordion.build_ui(gr, self, is_img2img)

    def before_process(self, p, *args):
        host_memory.host_generation_starts()  # before the host (re)loads its model: the tab's memory back

    def process(self, p, *args):
        self.run.remove(p)

    def process_before_every_sampling(self, p, *args, **kwargs):
        self.run.install(p, accordion.Choice.from_args(args))

    def postprocess_batch(self, p, *args, **kwargs):
        self.run.remove(p)

    def postprocess(self, p, processed, *args):
        self.run.remove(p)
