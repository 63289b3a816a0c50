"""SDAccel in a real A1111 1.10.1 (../shared/hosts/a1111, started offline on the CPU): the tab is mounted, and the
txt2img accordion's units change the host's own generation as promised, driven through the host's own
`/sdapi/v1/txt2img` with the accordion's arguments (what a user's clicks send), on and off.
"""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import webui_host

A1111_PATH, A1111_PYTHON = webui_host.host_env("a1111")
pytestmark = pytest.mark.skipif(not (A1111_PATH and A1111_PYTHON), reason=webui_host.skip_reason("a1111"))
BODY = {"prompt": "a lighthouse at dusk", "negative_prompt": "blurry", "seed": 77, "steps": 4, "cfg_scale": 7,
        "width": 64, "height": 64, "sampler_name": "Euler", "batch_size": 1}


@pytest.fixture(scope="module")
def a1111(tmp_path_factory):
    host = webui_host.WebUIHost("a1111", A1111_PATH, A1111_PYTHON, tmp_path_factory.mktemp("a1111") / "webui")
    try:
        host.wait_ready()
        yield host
    finally:
        host.stop()
        print(host.log_text()[-3000:])


def txt2img(a1111, choice=None, **changes):
    import httpx

    body = {**BODY, **changes}
    if choice is not None:
        body["alwayson_scripts"] = {"SDAccel": {"args": list(choice)}}
    response = httpx.post(a1111.url + "/sdapi/v1/txt2img", json=body, timeout=600)
    assert response.status_code == 200, response.text[:2000]
    data = response.json()
    from PIL import Image

    with Image.open(io.BytesIO(base64.b64decode(data["images"][0]))) as image:
        pixels = np.asarray(image.convert("RGB"), dtype=np.int16)
    return pixels, json.loads(data["info"])


def test_tab_and_accordion_are_mounted(a1111):
    import httpx

    config = httpx.get(a1111.url + "/config", timeout=60).json()
    labels = [c.get("props", {}).get("label") for c in config["components"]]
    ids = {c.get("props", {}).get("elem_id") for c in config["components"]}
    assert "SDAccel" in labels  # the tab (and the accordion)
    assert {"sdaccel_accordion_txt2img", "sdaccel_winograd_txt2img", "sdaccel_accordion_img2img"} <= ids
    # A1111 pins transformers 4.30: the engine's tab says so instead of failing, and the host keeps its pins
    assert "sdaccel_tab_off" in ids or "sdaccel_generate" in ids, sorted(i for i in ids if i and "sdaccel" in i)


def test_winograd_and_channels_last_give_the_host_image(a1111):
    plain, info = txt2img(a1111)
    assert "SDAccel" not in info["infotexts"][0]
    winograd, info = txt2img(a1111, (True, True, False, 1.0))
    assert np.abs(winograd - plain).max() <= 2, np.abs(winograd - plain).max()
    assert "SDAccel: winograd" in info["infotexts"][0], info["infotexts"][0]
    log = a1111.log_text()
    assert "SDAccel: " in log and "Winograd and" in log and "F.conv2d calls over" in log, log[-3000:]
    both, info = txt2img(a1111, (True, True, True, 1.0))
    assert np.abs(both - plain).max() <= 2
    assert "SDAccel: \"winograd, channels_last\"" in info["infotexts"][0] or \
        "SDAccel: winograd, channels_last" in info["infotexts"][0], info["infotexts"][0]
    again, info = txt2img(a1111)  # removed after each generation: the host's own image again
    assert np.array_equal(again, plain) and "SDAccel" not in info["infotexts"][0]
    off, _ = txt2img(a1111, (False, True, True, 0.5))  # the accordion's own switch
    assert np.array_equal(off, plain)


def test_cfg_cutoff_skips_the_unconditional_pass_late(a1111):
    plain, _ = txt2img(a1111)
    cut, info = txt2img(a1111, (True, False, False, 0.5))
    text = info["infotexts"][0]
    assert "cfg_cutoff=0.5" in text and "NGMS" not in text, text
    assert np.abs(cut - plain).max() > 0  # guidance left out for the last half changes the image
    assert "CFG cutoff: 2 denoiser calls without the unconditional pass" in a1111.log_text()
    again, _ = txt2img(a1111)
    assert np.array_equal(again, plain)
