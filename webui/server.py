"""Serve the API (and the gradio Blocks, mounted at /) with uvicorn; stop the generation worker on the way out."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def build_app(session, *, ui: bool = True):
    """The FastAPI app: `/sdapi/v1/...`, and the Blocks at `/` unless `ui` is False."""
    from .api import create_app

    app = create_app(session)
    if ui:
        import gradio as gr

        from .blocks import build_blocks

        blocks = build_blocks(session, live=True)
        if _accepts(blocks.queue, "default_concurrency_limit"):  # gradio 4+; 3.x queues without the option
            blocks.queue(default_concurrency_limit=4)
        else:
            blocks.queue()
        app = gr.mount_gradio_app(app, blocks, path="/")
    return app


def _accepts(fn, name: str) -> bool:
    import inspect

    return name in inspect.signature(fn).parameters


def serve(session, *, host: str, port: int, ui: bool = True) -> None:
    import uvicorn

    app = build_app(session, ui=ui)
    log.info("SDAccel web UI on http://%s:%d (API: /sdapi/v1/...)", host, port)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        session.close()
