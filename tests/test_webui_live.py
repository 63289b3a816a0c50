"""The standalone web UI's Live tab (issue 13): the stream as one job of the generation queue, fed camera frames.

Unit level on a tiny SD-Turbo: frames in, the stream's images out in order (the same images a StreamPipeline
gives), stop and restart, a generation and the live stream waiting for each other in the one queue, a bad frame
reported while the stream goes on, a full queue refused. Then the page in headless Chromium with a fake camera
(SDACCEL_BROWSER=1): open the Live tab, Start, see images and the fps readout move, Stop.
"""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch
from sdaccel.optim.spec.errors import SDAccelError
from sdaccel.optim.spec.pipeline import GenerationRequest, PipelineSpec
from sdaccel.optim.stream.frames import load_frame
from sdaccel.optim.stream.pipeline import StreamPipeline
from sdaccel.optim.stream.settings import StreamSettings
from sdaccel.webui.live import LiveStream, live_fields, live_settings
from sdaccel.webui.service import GenerationService, QueueFull, engine_job

SIZE = 64
WAIT_S = 60.0


def frames(count: int):
    """Distinct smooth frames as PIL images of another size than the stream's (the page's camera: 640x480)."""
    from PIL import Image

    gen = torch.Generator().manual_seed(3)
    base = torch.nn.functional.interpolate(torch.rand(1, 3, 6, 8, generator=gen), size=(48, 80), mode="bilinear")
    out = []
    for i in range(count):
        pixels = (torch.roll(base, shifts=i * 7, dims=-1)[0].permute(1, 2, 0) * 255).round().to(torch.uint8)
        out.append(Image.fromarray(pixels.numpy()))
    return out


def until(condition, what: str, timeout: float = WAIT_S):
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def cache():
    from sdaccel.optim.run.cache import PipelineCache

    return PipelineCache(max_entries=2)


@pytest.fixture(scope="module")
def spec(checkpoints):
    return PipelineSpec(model=checkpoints.get("sd-turbo"), device="cpu")


@pytest.fixture
def service():
    service = GenerationService(queue_size=2)
    yield service
    service.close()


@pytest.fixture
def live(service, cache):
    live = LiveStream(service, cache=cache)
    yield live
    live.stop()


def settings(**changes):
    values = {"prompt": "a fox", "width": SIZE, "height": SIZE, "steps": 2, "cfg_mode": "none", "queue_size": 64,
              "queue_policy": "drop_oldest"}
    return StreamSettings(**{**values, **changes})


def feed_one(live, image):
    """Feed a frame and wait until the job has taken it (so no frame is dropped)."""
    live.feed(image)
    until(lambda: not len(live.current.frames), "the job to take the frame")


def test_frames_in_give_the_stream_images_out_in_order(live, cache, spec):
    inputs = frames(5)
    with StreamPipeline(cache.prepare(spec), settings()) as stream:  # the same frames through the engine itself
        expected = [o for image in inputs for o in stream.push(load_frame(image, SIZE, SIZE), None)]
    assert [o.frame for o in expected] == [0, 1, 2, 3]
    run = live.start(spec, settings())  # the job holds the cache (cache.use) until it stops
    for image in inputs:
        feed_one(live, image)
    until(lambda: run.frames_out == 4, "4 images (stream batch: the last frame is still in flight)")
    assert list(run.out_frames) == [0, 1, 2, 3]
    assert (torch.from_numpy(run.latest).int() - torch.from_numpy(_pixels(expected[-1].image)).int()).abs().max() <= 1
    text = live.readout()
    assert text.startswith("running: ") and " fps" in text and "latency p50 0." in text, text
    assert "frames 5 in / 4 out" in text and "skipped 0" in text, text


def _pixels(image):
    from sdaccel.webui.live import to_pixels

    return to_pixels(image)


def test_stop_ends_the_job_and_a_settings_change_restarts_it(live, spec):
    first = live.start(spec, settings())
    feed_one(live, frames(1)[0])
    until(lambda: first.stream is not None, "the stream to run")
    assert not live.restart(spec, settings()), "the same settings must not restart the stream"
    assert live.restart(spec, settings(seed=5))
    second = live.current
    assert second is not first and second.settings.seed == 5
    until(lambda: first.job.future.done(), "the replaced job to end")
    assert isinstance(first.job.future.result(), dict)  # it ended cleanly, with its statistics
    for image in frames(3):
        feed_one(live, image)
    until(lambda: second.frames_out == 2, "the restarted stream's images")
    live.stop()
    assert second.job.future.done() and live.readout().startswith("stopped: "), live.readout()
    assert not live.active and not live.restart(spec, settings(seed=6))  # nothing runs: nothing to restart
    live.feed(frames(1)[0])
    assert second.frames.dropped == 0 and len(second.frames) == 0  # a stopped stream queues nothing


def test_a_control_change_applies_only_its_own_field_even_when_it_arrives_late(live, spec):
    """The page sends each control's own value: a width event that reaches the server after Start (it left the
    page while the height still had its old value) must not bring that old height back."""
    first = live.start(spec, settings(width=SIZE, height=SIZE, steps=2))
    until(lambda: first.stream is not None, "the stream to run")
    assert not live.change("width", float(SIZE)), "a value already in force must not restart the stream"
    assert live.change("steps", 1.0)
    second = live.current
    assert (second.settings.width, second.settings.height, second.settings.steps) == (SIZE, SIZE, 1)
    with pytest.raises(SDAccelError, match="StreamSettings.height"):
        live.change("height", 100)  # not a multiple of 8: named, and the stream goes on unchanged
    assert live.current is second and live.active
    with pytest.raises(KeyError, match="queue_policy"):
        live.change("queue_policy", "block")  # not a live control
    live.stop()
    assert not live.change("steps", 3.0), "nothing runs: nothing to change"


def test_the_prompts_lora_tags_go_into_the_streams_pipeline(service, cache, checkpoints, tmp_path):
    """An SD 1.5 stream with an LCM-LoRA named in the prompt, as the Generate tab takes tags: the LoRA is merged
    into the stream's pipeline, the tag leaves the prompt, a later change keeps it, an unknown name is refused."""
    from sdaccel.optim.spec.errors import ConfigError
    from sdaccel.optim.testing.lora import random_lora
    from sdaccel.optim.testing.random_weights import build_pipeline
    from sdaccel.webui.catalog import ModelCatalog
    from sdaccel.webui.session import WebSession

    random_lora(build_pipeline("sd15", tiny=True), tmp_path / "loras" / "lcm.safetensors")
    session = WebSession(ModelCatalog([tmp_path]), lora_folders=[tmp_path / "loras"])
    live = LiveStream(service, cache=cache, resolve=lambda spec, s: session.prompt_loras(spec, s, field="Live: prompt"))
    spec = PipelineSpec(model=checkpoints.get("sd15"), device="cpu")
    try:
        run = live.start(spec, settings(prompt="a fox <lora:lcm:0.8>", scheduler="lcm"))
        assert run.settings.prompt == "a fox" and [(r.path, r.strength) for r in run.spec.loras] == [
            (str(tmp_path / "loras" / "lcm.safetensors"), 0.8)]
        for image in frames(2):
            feed_one(live, image)
        until(lambda: run.frames_out == 1, "an image from the stream with the LoRA")
        assert run.stream.kind == "lcm"
        merged = [e for e in cache.entries() if e.spec is not None and e.spec.loras == run.spec.loras]
        assert merged and merged[0].spec.model == spec.model  # the stream ran on the pipeline with the LoRA merged
        assert live.change("steps", 1.0)
        assert live.current.spec.loras == run.spec.loras and live.current.settings.prompt == "a fox"
        with pytest.raises(ConfigError, match="Live: prompt.*'nope'"):
            live.change("prompt", "a fox <lora:nope:1>")
        assert live.active and live.current.settings.steps == 1  # the stream goes on as it was
    finally:
        live.stop()
        session.close()


def test_a_generation_waits_for_the_live_stream_and_the_stream_for_a_generation(live, service, spec):
    run = live.start(spec, settings())
    until(lambda: run.stream is not None, "the stream to run")
    request = GenerationRequest(prompt="a fox", width=SIZE, height=SIZE, steps=1, seed=1)
    txt2img = service.submit(engine_job(spec, [request]), label="txt2img")
    feed_one(live, frames(1)[0])
    time.sleep(0.5)
    assert txt2img.started is None, "a txt2img ran beside the live stream"
    live.stop()
    assert len(txt2img.future.result(WAIT_S)) == 1

    release = threading.Event()
    blocker = service.submit(lambda progress, should_interrupt: release.wait(WAIT_S), label="txt2img")
    until(lambda: blocker.started is not None, "the generation to start")
    run = live.start(spec, settings())
    assert live.readout().startswith("waiting for the generation queue"), live.readout()
    for image in frames(3):
        live.feed(image)
    time.sleep(0.3)
    assert run.stream is None and run.frames_out == 0, "the live stream ran beside a generation"
    release.set()
    until(lambda: run.frames_out >= 2, "the live stream to run once the generation is done")


def test_a_bad_frame_is_reported_and_the_stream_goes_on(live, spec, tmp_path):
    run = live.start(spec, settings())
    corrupt = tmp_path / "frame.png"
    corrupt.write_bytes(b"not a png")
    live.feed(str(corrupt))
    live.feed(torch.rand(2, 5))  # not an image
    text = live.readout()
    assert "2 bad frames" in text and "not an image" in text, text
    for image in frames(3):
        feed_one(live, image)
    until(lambda: run.frames_out == 2, "images after the bad frames")


def test_a_full_queue_is_refused_with_a_clear_message_and_the_stream_goes_on(live, service, spec):
    run = live.start(spec, settings())
    until(lambda: run.stream is not None, "the stream to run")
    release = threading.Event()
    waiting = [service.submit(lambda p, i: release.wait(WAIT_S)) for _ in range(2)]
    with pytest.raises(QueueFull, match="queue is full"):
        live.start(spec, settings(seed=9))
    assert live.current is run and live.active
    release.set()
    live.stop()
    for job in waiting:
        job.future.result(WAIT_S)


def test_interrupt_ends_the_live_job_and_errors_reach_the_readout(live, service, spec):
    run = live.start(spec, settings())
    until(lambda: run.stream is not None, "the stream to run")
    assert service.interrupt()
    until(lambda: run.job.future.done(), "the interrupted stream to end")
    assert live.readout().startswith("stopped: "), live.readout()
    live.start(spec, settings(strength=1.0, cfg_mode="self", cfg=1.4))  # refused once the model is loaded
    until(lambda: live.current.job.future.done(), "the refused stream to end")
    assert live.readout().startswith("**Error:** StreamSettings.cfg_mode"), live.readout()


def test_the_controls_come_from_the_stream_settings_and_only_the_standalone_page_has_live(tmp_path):
    gr = pytest.importorskip("gradio")
    from sdaccel.webui.blocks import build_blocks
    from sdaccel.webui.catalog import ModelCatalog
    from sdaccel.webui.session import WebSession

    names = [info.name for info in live_fields()]
    assert "queue_policy" not in names and {"prompt", "cfg_mode", "similarity_filter", "max_skip"} <= set(names)
    assert live_settings({"width": 64.0, "steps": 3.0}).queue_policy == "drop_oldest"
    with pytest.raises(Exception, match="StreamSettings.width"):
        live_settings({"width": 100})
    session = WebSession(ModelCatalog([tmp_path]))
    try:
        ids = {getattr(b, "elem_id", None) for b in build_blocks(session, live=True).blocks.values()}
        assert {"sdaccel_live_tab", "sdaccel_live_camera", "sdaccel_live_output", "sdaccel_live_start",
                "sdaccel_live_readout"} | {f"sdaccel_live_{n}" for n in names} <= ids
        host = {getattr(b, "elem_id", None) for b in build_blocks(session).blocks.values()}
        assert not any(str(i).startswith("sdaccel_live") for i in host)  # the A1111/Forge tab is unchanged
        camera = next(b for b in build_blocks(session, live=True).blocks.values()
                      if getattr(b, "elem_id", None) == "sdaccel_live_camera")
        assert isinstance(camera, gr.Image) and camera.streaming and camera.sources == ["webcam"]
    finally:
        session.close()


# -- the page in headless Chromium with a fake camera -------------------------------------------------------

browser = pytest.mark.skipif(not os.environ.get("SDACCEL_BROWSER"), reason=(
    "set SDACCEL_BROWSER=1 to open the page in Debian's chromium (apt-get install chromium; pip install playwright)"))
FAKE_CAMERA = ["--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"]


@pytest.fixture(scope="module")
def live_server(tmp_path_factory, checkpoints):
    from sdaccel.optim.testing.random_weights import write_checkpoint
    from sdaccel.webui.loadtest import ServerProcess

    folder = tmp_path_factory.mktemp("webui-live-models")
    write_checkpoint("sd-turbo", folder / "turbo.safetensors", tiny=True, dtype="float32",
                     pipe=checkpoints.pipeline("sd-turbo"))
    server = ServerProcess(models=[folder], ui=True, queue_size=4, log_path=folder.parent / "webui-live.log")
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def open_live_tab(page) -> None:
    """Click the Live tab, in the tab row or (a narrow page) in gradio's overflow menu."""
    tab = page.get_by_role("tab", name="Live", exact=True)
    if tab.count():
        tab.first.click()
        return
    page.locator(".overflow-menu button").first.click()
    page.locator(".overflow-dropdown button", has_text="Live").first.click()


def start_live(page) -> str:
    """Press Start and the camera's Record button; wait for the first image and a running readout."""
    import sdaccel_page

    page.click("#sdaccel_live_start")
    camera = page.locator("#sdaccel_live_camera")
    grant = camera.locator('[title="grant webcam access"]')
    camera.locator('[title="grant webcam access"], button.capture-button').first.wait_for(
        state="visible", timeout=sdaccel_page.TIMEOUT_MS)
    if grant.count():  # gradio asks before opening the camera; the fake UI then grants it
        grant.first.click()
    camera.locator("button.capture-button").first.click(timeout=sdaccel_page.TIMEOUT_MS)
    page.locator("#sdaccel_live_output img").first.wait_for(state="visible", timeout=sdaccel_page.TIMEOUT_MS)
    page.wait_for_function("() => /running: .* out/.test(document.querySelector('#sdaccel_live_readout')"
                           "?.innerText || '')", timeout=sdaccel_page.TIMEOUT_MS)
    return readout(page)


def readout(page) -> str:
    """The readout's line (while an event runs, gradio draws its timer, "0.0s", above it)."""
    return page.locator("#sdaccel_live_readout").first.inner_text().strip().splitlines()[-1]


@browser
def test_the_live_tab_streams_the_fake_camera(live_server):
    import sdaccel_page
    from browser import browser_page

    with browser_page(viewport=(1400, 1100), extra_args=FAKE_CAMERA) as page:
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(exc.message))
        page.goto(live_server.url + "/", wait_until="load", timeout=sdaccel_page.TIMEOUT_MS)
        page.wait_for_selector("#sdaccel_generate", timeout=sdaccel_page.TIMEOUT_MS)  # the page is drawn
        open_live_tab(page)
        page.wait_for_selector("#sdaccel_live_start", state="visible", timeout=sdaccel_page.TIMEOUT_MS)
        for name, value in (("width", SIZE), ("height", SIZE), ("steps", 1)):
            sdaccel_page.set_number(page, f"sdaccel_live_{name}", value)
            page.wait_for_function("([id, v]) => document.querySelector(`#${id} input[type=range]`)?.value == v",
                                   arg=[f"sdaccel_live_{name}", value], timeout=sdaccel_page.TIMEOUT_MS)
        text = start_live(page)
        assert text.startswith("running: ") and "latency p50 0." in text, text
        first = text.split(" fps")[0].split()[-1]
        page.wait_for_function("(f) => { const m = /([0-9.]+) fps/.exec(document.querySelector("
                               "'#sdaccel_live_readout')?.innerText || ''); return m && m[1] !== f; }",
                               arg=first, timeout=sdaccel_page.TIMEOUT_MS)
        size_of = ("() => { const i = document.querySelector('#sdaccel_live_output img');"
                   " return i ? [i.naturalWidth, i.naturalHeight] : null; }")
        sizes = []
        for _ in range(120):  # the stream's images take the size set above (each new image loads a moment)
            sizes.append(page.evaluate(size_of))
            if sizes[-1] == [SIZE, SIZE]:
                break
            page.wait_for_timeout(500)
        assert sizes[-1] == [SIZE, SIZE], sizes[-5:]
        sdaccel_page.keep_screenshot(page, "webui-live.png")
        page.click("#sdaccel_live_stop")
        page.wait_for_function("() => (document.querySelector('#sdaccel_live_readout')?.innerText || '')"
                               ".startsWith('stopped')", timeout=sdaccel_page.TIMEOUT_MS)
        assert not errors, errors
