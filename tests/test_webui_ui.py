"""The standalone web UI (`python -m sdaccel webui`) in headless Chromium: the page a user opens, Generate and
Interrupt clicked, the image and the run statistics read back from the page. The server is a real process on
127.0.0.1 with a tiny SD 1.5 checkpoint in its models folder.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from browser import browser_page

pytest.importorskip("gradio")
pytestmark = pytest.mark.skipif(not os.environ.get("SDACCEL_BROWSER"), reason=(
    "set SDACCEL_BROWSER=1 to open the page in Debian's chromium (apt-get install chromium; pip install playwright);"
    " CI's browser lane does"))

from sdaccel.webui.loadtest import ServerProcess  # noqa: E402

TIMEOUT_MS = 180_000


@pytest.fixture(scope="module")
def server(tmp_path_factory, checkpoints):
    from sdaccel.optim.testing.random_weights import write_checkpoint

    folder = tmp_path_factory.mktemp("webui-ui-models")
    write_checkpoint("sd15", folder / "fox.safetensors", tiny=True, dtype="float32",
                     pipe=checkpoints.pipeline("sd15"))
    log = folder.parent / "webui-ui-server.log"
    server = ServerProcess(models=[folder], ui=True, queue_size=4, log_path=log)
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


def _set_number(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} input[type=number]").first
    box.fill(str(value))
    box.press("Enter")
    box.blur()


def _status(page) -> str:
    return page.locator("#sdaccel_status").inner_text()


def test_generate_shows_the_image_and_the_run_statistics(page, server):
    page.locator("#sdaccel_prompt textarea").fill("a red fox in the snow")
    for elem_id, value in (("sdaccel_width", 64), ("sdaccel_height", 64), ("sdaccel_steps", 2),
                           ("sdaccel_seed", 7)):
        _set_number(page, elem_id, value)
    page.locator("#sdaccel_opt_channels_last").get_by_text("Channels-last", exact=True).first.click()  # open it
    page.locator("#sdaccel_use_channels_last input").check()
    page.click("#sdaccel_generate")
    page.wait_for_function("() => (document.querySelector('#sdaccel_stats textarea')?.value || '').includes('it/s')",
                           timeout=TIMEOUT_MS)
    stats = page.locator("#sdaccel_stats textarea").input_value()
    assert "sd15 txt2img 64x64x1" in stats and "2/2 steps" in stats, stats
    assert "toggles: " in stats and "channels_last" in stats, stats
    image = page.locator("#sdaccel_gallery img").first
    image.wait_for(state="visible", timeout=TIMEOUT_MS)
    size = page.evaluate("(img) => [img.naturalWidth, img.naturalHeight]", image.element_handle())
    assert size == [64, 64], size
    assert _status(page).startswith("done in"), _status(page)
    keep = os.environ.get("SDACCEL_SCREENSHOT_DIR")  # set to results/ to refresh the README's screenshot
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(keep) / "webui-standalone.png"), full_page=False)
    assert not page.errors, page.errors


def test_interrupt_stops_a_long_generation_from_the_page(page, server):
    for elem_id, value in (("sdaccel_width", 256), ("sdaccel_height", 256), ("sdaccel_steps", 200)):
        _set_number(page, elem_id, value)
    page.click("#sdaccel_generate")
    page.wait_for_function("() => /step [1-9]/.test(document.querySelector('#sdaccel_status')?.innerText || '')",
                           timeout=TIMEOUT_MS)
    page.click("#sdaccel_interrupt")
    page.wait_for_function("() => (document.querySelector('#sdaccel_status')?.innerText || '')"
                           ".includes('Interrupted')", timeout=TIMEOUT_MS)
    assert "of 200" in _status(page), _status(page)
    # the next generation runs normally
    for elem_id, value in (("sdaccel_width", 64), ("sdaccel_height", 64), ("sdaccel_steps", 2)):
        _set_number(page, elem_id, value)
    page.click("#sdaccel_generate")
    page.wait_for_function("() => (document.querySelector('#sdaccel_status')?.innerText || '').startsWith('done')",
                           timeout=TIMEOUT_MS)
    assert not page.errors, page.errors
