"""The gradio Blocks' own handlers, called as gradio calls them (the page's components in, the yielded updates
out) without a browser: img2img from the form with a source image, the progress bar, the Bench tab without
matplotlib. The page itself in Chromium: test_webui_ui.py.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
from PIL import Image

gr = pytest.importorskip("gradio")

from sdaccel.webui.blocks import build_blocks, generation_status  # noqa: E402
from sdaccel.webui.catalog import ModelCatalog  # noqa: E402
from sdaccel.webui.service import Job  # noqa: E402
from sdaccel.webui.session import WebSession  # noqa: E402


@pytest.fixture(scope="module")
def page(tmp_path_factory, checkpoints):
    from sdaccel.optim.testing.random_weights import write_checkpoint

    folder = tmp_path_factory.mktemp("webui-blocks-models")
    write_checkpoint("sd15", folder / "fox.safetensors", tiny=True, dtype="float32",
                     pipe=checkpoints.pipeline("sd15"))
    session = WebSession(ModelCatalog([folder]), device="cpu")
    try:
        blocks = build_blocks(session)
        blocks.model_path = str(folder / "fox.safetensors")
        yield blocks
    finally:
        session.close()


def _handler(blocks, name: str):
    fns = blocks.fns.values() if isinstance(blocks.fns, dict) else blocks.fns
    return next(dep for dep in fns if getattr(dep.fn, "__name__", None) == name)


def _call(blocks, name: str, **by_elem_id) -> list:
    """Every update the handler yields, its inputs the page's initial values with `by_elem_id` set."""
    dep = _handler(blocks, name)
    ids = {getattr(c, "elem_id", None) for c in dep.inputs}
    assert set(by_elem_id) <= ids, sorted(set(by_elem_id) - ids)
    values = [by_elem_id.get(getattr(c, "elem_id", None), c.value) for c in dep.inputs]
    return list(dep.fn(*values))


FORM = {"sdaccel_checkpoint": "fox.safetensors", "sdaccel_prompt": "a red fox", "sdaccel_width": 64,
        "sdaccel_height": 64, "sdaccel_steps": 4, "sdaccel_seed": 3}


def _gallery(update) -> np.ndarray:
    images, stats, status = update
    assert len(images) == 1 and status.startswith("done in"), status
    return np.asarray(images[0].convert("RGB"), dtype=np.int16)


def test_img2img_goes_from_the_form_with_a_source_image(page):
    red, blue = (Image.new("RGB", (64, 64), color) for color in ((220, 30, 30), (30, 30, 220)))
    txt = _call(page, "on_generate", **FORM)[-1]
    assert "txt2img 64x64" in txt[1], txt[1]
    from_red = _call(page, "on_generate", **FORM, sdaccel_init_image=red, sdaccel_strength=0.5)[-1]
    assert "img2img 64x64" in from_red[1], from_red[1]
    from_blue = _call(page, "on_generate", **FORM, sdaccel_init_image=blue, sdaccel_strength=0.5)[-1]
    red_px = _gallery(from_red)
    assert np.abs(red_px - _gallery(from_blue)).max() > 10 and np.abs(red_px - _gallery(txt)).max() > 10
    from sdaccel.optim.run.sampler import run
    from sdaccel.optim.spec.model_ref import ModelRef
    from sdaccel.optim.spec.pipeline import GenerationRequest, PipelineSpec

    direct = run(PipelineSpec(model=ModelRef(path=page.model_path), device="cpu"), GenerationRequest(
        prompt="a red fox", width=64, height=64, steps=4, seed=3, init_image=red, strength=0.5))
    assert direct.stats.mode == "img2img"  # the engine given the source directly draws the page's image
    assert np.abs(np.asarray(direct.images[0].convert("RGB"), dtype=np.int16) - red_px).max() <= 1
    bad = _call(page, "on_generate", **FORM, sdaccel_init_image=red, sdaccel_strength=1.5)[-1]
    assert bad[2].startswith("**Error:**") and "strength" in bad[2], bad


def test_the_status_shows_a_progress_bar_while_steps_run():
    job = Job(work=lambda progress, stop: None, step=3, total=12, started=1.0)
    status = generation_status(job, waiting=0)
    assert '<progress value="3" max="12"' in status and "step 3/12 (25%)" in status, status
    assert generation_status(Job(work=None), waiting=2) == "waiting (2 queued)"
    assert generation_status(Job(work=None, started=1.0), waiting=0) == "loading"


def test_generate_yields_the_bar_from_the_running_job(page, monkeypatch):
    import sdaccel.webui.blocks as blocks_module

    monkeypatch.setattr(blocks_module, "POLL_S", 0.005)  # catch the steps of a short run
    updates = _call(page, "on_generate", **{**FORM, "sdaccel_steps": 40})
    bars = [u[2] for u in updates[:-1] if "<progress" in u[2]]
    assert bars and all('max="40"' in bar for bar in bars), [u[2] for u in updates]
    assert updates[-1][2].startswith("done in")


@pytest.mark.parametrize("matplotlib", [True, False])
def test_the_bench_tab_shows_its_table_with_or_without_matplotlib(page, monkeypatch, matplotlib):
    if not matplotlib:
        monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    else:
        pytest.importorskip("matplotlib")
    dep = _handler(page, "on_bench")
    table, chart, status = list(dep.fn(["baseline"], 64, 1, 1, 0, True, "fox.safetensors"))[-1]
    assert "baseline" in table and status.startswith("done: 1 rows"), (table, status)
    if matplotlib:
        assert chart and Image.open(chart).format == "PNG" and "no chart" not in status
    else:
        assert chart is None and status == "done: 1 rows; no chart: it needs matplotlib (`pip install matplotlib`)"
