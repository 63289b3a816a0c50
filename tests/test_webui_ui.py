"""The standalone web UI (`python -m sdaccel webui`) in headless Chromium: the page a user opens, Generate and
Interrupt clicked, the image and the run statistics read back from the page. The server is a real process on
127.0.0.1 with a tiny SD 1.5 checkpoint in its models folder.
"""

from __future__ import annotations

import os

import pytest
import sdaccel_page
from browser import browser_page

pytest.importorskip("gradio")
pytestmark = pytest.mark.skipif(not os.environ.get("SDACCEL_BROWSER"), reason=(
    "set SDACCEL_BROWSER=1 to open the page in Debian's chromium (apt-get install chromium; pip install playwright);"
    " CI's browser lane does"))

from sdaccel.webui.loadtest import ServerProcess  # noqa: E402

TIMEOUT_MS = sdaccel_page.TIMEOUT_MS


@pytest.fixture(scope="module")
def server(tmp_path_factory, checkpoints):
    from sdaccel.optim.testing.random_weights import write_checkpoint

    from sdaccel.optim.testing.lora import random_lora

    folder = tmp_path_factory.mktemp("webui-ui-models")
    write_checkpoint("sd15", folder / "fox.safetensors", tiny=True, dtype="float32",
                     pipe=checkpoints.pipeline("sd15"))
    loras = tmp_path_factory.mktemp("webui-ui-loras")
    random_lora(checkpoints.pipeline("sd15"), loras / "ink.safetensors")
    log = folder.parent / "webui-ui-server.log"
    server = ServerProcess(models=[folder], ui=True, queue_size=4, log_path=log, loras=[loras])
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def page(server):
    with browser_page(viewport=(1400, 1800)) as page:
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(exc.message))
        page.goto(server.url + "/", wait_until="load", timeout=TIMEOUT_MS)
        page.wait_for_selector("#sdaccel_generate", timeout=TIMEOUT_MS)
        page.errors = errors
        yield page


def test_generate_shows_the_image_and_the_run_statistics(page, server):
    stats, size = sdaccel_page.generate(page)
    assert "sd15 txt2img 64x64x1" in stats and "2/2 steps" in stats, stats
    assert "toggles: " in stats and "channels_last" in stats, stats
    assert size == [64, 64], size
    assert sdaccel_page.status(page).startswith("done in"), sdaccel_page.status(page)
    sdaccel_page.keep_screenshot(page, "webui-standalone.png")
    assert not page.errors, page.errors


def test_the_lora_picker_puts_the_tag_into_the_prompt_and_the_lora_is_merged(page, server):
    page.locator("#sdaccel_prompt textarea").fill("a red fox")
    prompt = sdaccel_page.add_lora(page, "ink", 0.7)
    assert prompt == "a red fox <lora:ink:0.7>", prompt
    stats, _ = sdaccel_page.generate(page, prompt=prompt, channels_last=False)
    assert "note: LoRA ink.safetensors x0.7:" in stats, stats
    assert not page.errors, page.errors


def test_interrupt_stops_a_long_generation_from_the_page(page, server):
    assert "of 200" in sdaccel_page.interrupt_long_generation(page, steps=200)
    assert sdaccel_page.generate_again(page).startswith("done")  # the next generation runs normally
    assert not page.errors, page.errors


def test_bench_tab_runs_the_chosen_presets(page, server):
    table, status = sdaccel_page.run_bench(page)
    assert status.strip().startswith("done: 2 rows"), status
    assert "baseline" in table and "channels-last" in table, table
    assert not page.errors, page.errors
