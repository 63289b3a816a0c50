"""The SDAccel tab inside A1111/Forge (`script_callbacks.on_ui_tabs`): the standalone web UI's Blocks over the
host's checkpoint folder, with one queue of its own.

Memory: the tab runs the engine's own pipeline, beside the host's loaded model or instead of it, as the
`sdaccel_tab_host_model` setting says (`host_memory.py`: keep both, one at a time, or auto: one at a time when
both do not fit; measured by tests/test_webui_hosts.py into results/).
"""

from __future__ import annotations

import logging

from .requirements import engine_problem

log = logging.getLogger("sdaccel")
TAB_ID = "sdaccel"


def host_checkpoint_folders() -> list:
    from modules import sd_models, shared

    folders = [sd_models.model_path]
    extra = getattr(shared.cmd_opts, "ckpt_dir", None)
    if extra:
        folders.append(extra)
    return folders


def host_lora_folders() -> list:
    """The host's LoRA folder (`--lora-dir`, models/Lora by default), for the tab's `<lora:...>` tags."""
    import os

    from modules import paths, shared

    folder = getattr(shared.cmd_opts, "lora_dir", None) or os.path.join(paths.models_path, "Lora")
    return [folder]


def build_tab():
    """[(blocks, title, id)] for on_ui_tabs; a tab that says why when the engine cannot run in this Python."""
    import gradio as gr

    problem = engine_problem()
    if problem:
        log.warning("SDAccel: %s", problem)
        with gr.Blocks(analytics_enabled=False) as blocks:
            gr.Markdown(f"**The SDAccel tab is off:** {problem}.", elem_id="sdaccel_tab_off")
        return [(blocks, "SDAccel", TAB_ID)]
    from ..webui.blocks import build_blocks
    from ..webui.catalog import ModelCatalog
    from ..webui.session import WebSession

    from .host_memory import tab_job_scope

    session = WebSession(ModelCatalog(host_checkpoint_folders()), lora_folders=host_lora_folders())
    session.service.job_scope = tab_job_scope(session)
    return [(build_blocks(session), "SDAccel", TAB_ID)]
