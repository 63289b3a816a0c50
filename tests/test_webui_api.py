"""The A1111 API (`/sdapi/v1/...`) on the engine: A1111's request and response bodies, every endpoint, bad
payloads, the bounded queue and interrupt. FastAPI's in-process TestClient drives the real routes on a tiny SD 1.5
checkpoint written at test time; tests/test_webui_load.py drives a real server process over loopback.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402
from sdaccel.webui.api import create_app  # noqa: E402
from sdaccel.webui.catalog import ModelCatalog  # noqa: E402
from sdaccel.webui.session import WebSession  # noqa: E402

SIZE, STEPS = 64, 2
# A txt2img body as A1111's API documentation and its Python clients send it (fields SDAccel ignores included)
A1111_BODY = {"prompt": "a red fox in the snow", "negative_prompt": "blurry", "styles": [], "seed": 1234,
              "subseed": -1, "subseed_strength": 0, "sampler_name": "Euler a", "batch_size": 1, "n_iter": 1,
              "steps": STEPS, "cfg_scale": 7, "width": SIZE, "height": SIZE, "restore_faces": False,
              "tiling": False, "do_not_save_samples": True, "do_not_save_grid": True, "eta": 0,
              "override_settings": {}, "send_images": True, "save_images": False, "alwayson_scripts": {}}


@pytest.fixture(scope="module")
def models(tmp_path_factory, checkpoints):
    from sdaccel.optim.testing.random_weights import write_checkpoint

    folder = tmp_path_factory.mktemp("webui-models")
    pipe = checkpoints.pipeline("sd15")
    write_checkpoint("sd15", folder / "fox.safetensors", tiny=True, dtype="float32", pipe=pipe)
    write_checkpoint("sd15", folder / "sub" / "owl.safetensors", tiny=True, dtype="float32", pipe=pipe)
    from sdaccel.optim.testing.lora import random_lora

    random_lora(pipe, folder.parent / "webui-loras" / "styles" / "ink.safetensors")
    return folder


@pytest.fixture(scope="module")
def session(models):
    session = WebSession(ModelCatalog([models]), queue_size=2, lora_folders=[models.parent / "webui-loras"])
    yield session
    session.close()


@pytest.fixture(scope="module")
def client(session):
    with TestClient(create_app(session)) as client:
        yield client


def _image(text: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(text)))


def _pixels(text: str) -> np.ndarray:
    return np.asarray(_image(text).convert("RGB"), dtype=np.int16)


def txt2img(client, **changes):
    response = client.post("/sdapi/v1/txt2img", json={**A1111_BODY, **changes})
    assert response.status_code == 200, response.text
    body = response.json()
    return body, json.loads(body["info"])


def test_models_options_and_samplers(client, session):
    models = client.get("/sdapi/v1/sd-models").json()
    assert [m["title"] for m in models] == ["fox.safetensors", "sub/owl.safetensors"]  # no sidecar config folders
    assert models[1]["model_name"] == "sub_owl" and models[1]["filename"].endswith("owl.safetensors")
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "fox.safetensors"
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "sub/owl.safetensors [0123abcd]"}) \
        .status_code == 200  # A1111 titles carry a hash suffix
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "sub/owl.safetensors"
    bad = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "nope.safetensors"})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "sd_model_checkpoint"]
    assert "fox.safetensors" in bad.json()["detail"][0]["msg"]  # names what there is
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "sub/owl.safetensors"  # unchanged
    client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "fox"})
    assert session.selected.title == "fox.safetensors"
    names = [s["name"] for s in client.get("/sdapi/v1/samplers").json()]
    assert "Euler a" in names and "DPM++ 2M Karras" in names


def test_txt2img_answers_as_a1111_does(client):
    body, info = txt2img(client)
    assert len(body["images"]) == 1 and body["parameters"]["prompt"] == A1111_BODY["prompt"]
    image = _image(body["images"][0])
    assert image.size == (SIZE, SIZE) and image.format == "PNG"
    params = image.text["parameters"]
    assert params.startswith("a red fox in the snow\nNegative prompt: blurry\nSteps: 2, Sampler: Euler a, "
                             "CFG scale: 7.0, Seed: 1234, Size: 64x64, Model: fox")
    assert info["seed"] == 1234 and info["all_seeds"] == [1234] and info["infotexts"] == [params]
    assert info["sd_model_name"] == "fox" and info["steps"] == STEPS and info["sampler_name"] == "Euler a"
    assert info["sdaccel"]["stats"][0]["steps_run"] == STEPS and info["sdaccel"]["notes"] == []
    again, _ = txt2img(client)
    assert np.array_equal(_pixels(again["images"][0]), _pixels(body["images"][0]))  # same seed, same image
    other, _ = txt2img(client, seed=1235)
    assert not np.array_equal(_pixels(other["images"][0]), _pixels(body["images"][0]))


def test_random_seed_batches_and_iterations(client):
    body, info = txt2img(client, seed=-1, batch_size=2, n_iter=2)
    seed = info["seed"]
    assert 0 <= seed < 2**32 and info["all_seeds"] == [seed, seed + 1, seed + 2, seed + 3]
    assert len(body["images"]) == 4 and body["parameters"]["seed"] == seed
    single, _ = txt2img(client, seed=seed + 2)  # image 3 alone, from its own seed (batched: fp32 rounding apart)
    assert np.abs(_pixels(single["images"][0]) - _pixels(body["images"][2])).max() <= 2
    assert np.abs(_pixels(single["images"][0]) - _pixels(body["images"][1])).max() > 10
    quiet, info = txt2img(client, send_images=False)
    assert quiet["images"] == [] and info["all_seeds"] == [1234]


def test_unimplemented_a1111_fields_are_reported_not_dropped_silently(client):
    _, info = txt2img(client, enable_hr=True, restore_faces=True, override_settings={"CLIP_stop_at_last_layers": 2})
    notes = " ".join(info["sdaccel"]["notes"])
    assert "enable_hr" in notes and "restore_faces" in notes and "CLIP_stop_at_last_layers" in notes


def test_override_settings_picks_the_checkpoint_for_one_request(client, session):
    _, info = txt2img(client, override_settings={"sd_model_checkpoint": "sub/owl.safetensors"})
    assert info["sd_model_name"] == "sub/owl"
    assert session.selected.title == "fox.safetensors"  # for that request only


def test_scheduler_field_of_a1111_1_9(client):
    _, info = txt2img(client, sampler_name="DPM++ 2M", scheduler="Karras")
    assert info["sdaccel"]["stats"][0]["scheduler"] == "DPM++ 2M Karras"
    bad = client.post("/sdapi/v1/txt2img", json={**A1111_BODY, "sampler_name": "Euler", "scheduler": "Karras"})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "scheduler"]


def test_img2img(client):
    source = Image.new("RGB", (SIZE, SIZE), (200, 40, 40))
    buffer = io.BytesIO()
    source.save(buffer, format="PNG")
    encoded = base64.b64encode(buffer.getvalue()).decode()
    body = {**A1111_BODY, "init_images": ["data:image/png;base64," + encoded], "denoising_strength": 0.5}
    response = client.post("/sdapi/v1/img2img", json=body)
    assert response.status_code == 200, response.text
    info = json.loads(response.json()["info"])
    assert info["denoising_strength"] == 0.5 and info["sdaccel"]["stats"][0]["mode"] == "img2img"
    assert "Denoising strength: 0.5" in _image(response.json()["images"][0]).text["parameters"]
    assert info["sdaccel"]["stats"][0]["steps_run"] == 1  # half of 2 steps from the source


def test_sdaccel_optimizations_come_as_alwayson_script_args(client):
    plain, _ = txt2img(client)
    body, info = txt2img(client, alwayson_scripts={"SDAccel": {"args": [{"kind": "channels_last", "unet": True},
                                                                      "cfg-cutoff-50"]}})
    stats = info["sdaccel"]["stats"][0]
    assert any(label.startswith("channels_last") for label in stats["optimizations"]), stats["optimizations"]
    assert stats["cfg_steps"] == 1  # the preset's request change: guidance for half of the 2 steps
    assert "SDAccel: " in _image(body["images"][0]).text["parameters"]
    lossless, _ = txt2img(client, alwayson_scripts={"sdaccel": {"args": [{"kind": "channels_last"}]}})
    diff = np.abs(_pixels(lossless["images"][0]) - _pixels(plain["images"][0])).max()
    assert diff <= 2, diff  # channels-last is lossless (fp32 rounding)


@pytest.mark.parametrize("change, loc", [
    ({"steps": "ten"}, ["body", "steps"]),
    ({"steps": 0}, ["body", "steps"]),
    ({"width": 65}, ["body", "width"]),
    ({"cfg_scale": "high"}, ["body", "cfg_scale"]),
    ({"batch_size": 0}, ["body", "batch_size"]),
    ({"n_iter": 0}, ["body", "n_iter"]),
    ({"prompt": 5}, ["body", "prompt"]),
    ({"sampler_name": "Heun++ 9"}, ["body", "sampler_name"]),
    ({"alwayson_scripts": {"sdaccel": {"args": ["warp-drive"]}}}, ["body", "alwayson_scripts", "sdaccel", "args", "0"]),
    ({"alwayson_scripts": {"sdaccel": {"args": [{"kind": "winograd", "tile": "f9"}]}}},
     ["body", "alwayson_scripts", "sdaccel", "args", "0"]),
    ({"alwayson_scripts": {"sdaccel": {"args": [{"kind": "deepcache"}, {"kind": "compile", "backend": "openvino"},
                                                {"kind": "winograd"}]}}}, None),
    ({"override_settings": {"sd_model_checkpoint": "missing.safetensors"}},
     ["body", "override_settings", "sd_model_checkpoint"]),
])
def test_bad_payloads_get_422_naming_the_field(client, session, change, loc):
    before = session.service.state()["completed"]
    response = client.post("/sdapi/v1/txt2img", json={**A1111_BODY, **change})
    assert response.status_code == 422, response.text
    detail = response.json()["detail"][0]
    if loc is not None:
        assert detail["loc"] == loc, detail
    assert detail["msg"]
    assert session.service.state()["completed"] == before  # nothing ran


def test_unreadable_bodies_and_images_get_422(client):
    assert client.post("/sdapi/v1/txt2img", content=b"{not json").status_code == 422
    assert client.post("/sdapi/v1/txt2img", json=[1, 2]).status_code == 422
    for images, loc in (([], ["body", "init_images"]), (["%%%"], ["body", "init_images", "0"]),
                        ([base64.b64encode(b"not an image").decode()], ["body", "init_images", "0"])):
        response = client.post("/sdapi/v1/img2img", json={**A1111_BODY, "init_images": images})
        assert response.status_code == 422 and response.json()["detail"][0]["loc"] == loc, response.text


def _hold_worker(session):
    """Occupy the worker with a job that waits for `release`; return (release event, job)."""
    release, started = threading.Event(), threading.Event()

    def work(progress, should_interrupt):
        started.set()
        while not release.is_set():
            if should_interrupt():
                from sdaccel.optim.spec.errors import GenerationInterrupted

                raise GenerationInterrupted(0, 1)
            time.sleep(0.01)
        return []

    job = session.service.submit(work, label="hold")
    assert started.wait(10)
    return release, job


def test_full_queue_answers_503_and_loses_nothing(client, session):
    release, hold = _hold_worker(session)
    responses: list = []
    try:
        waiting = [threading.Thread(target=lambda s=s: responses.append(
            client.post("/sdapi/v1/txt2img", json={**A1111_BODY, "seed": s}))) for s in (1, 2)]
        for thread in waiting:
            thread.start()
        deadline = time.monotonic() + 30
        while session.service.waiting < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert session.service.waiting == 2  # the queue (size 2) is full
        full = client.post("/sdapi/v1/txt2img", json=A1111_BODY)
        assert full.status_code == 503 and "queue is full" in full.json()["detail"]
        assert full.headers["retry-after"]
        progress = client.get("/sdapi/v1/progress").json()
        assert progress["state"]["job_count"] == 3 and progress["state"]["job"] == f"task({hold.id})"
    finally:
        release.set()
    for thread in waiting:
        thread.join(120)
    assert sorted(r.status_code for r in responses) == [200, 200]
    seeds = sorted(json.loads(r.json()["info"])["seed"] for r in responses)
    assert seeds == [1, 2]  # both queued requests ran, with their own seeds


def test_interrupt_stops_the_running_generation_then_the_next_runs(client, session):
    results: list = []
    thread = threading.Thread(target=lambda: results.append(
        client.post("/sdapi/v1/txt2img", json={**A1111_BODY, "steps": 200, "width": 256, "height": 256})))
    thread.start()
    deadline = time.monotonic() + 120
    progress = {}
    while time.monotonic() < deadline:
        progress = client.get("/sdapi/v1/progress").json()
        if progress["state"]["sampling_step"] >= 2:
            break
        time.sleep(0.02)
    assert progress["state"]["sampling_steps"] == 200 and 0 < progress["progress"] < 1, progress
    assert client.post("/sdapi/v1/interrupt").status_code == 200
    thread.join(120)
    body = results[0].json()
    info = json.loads(body["info"])
    assert results[0].status_code == 200 and body["images"] == []
    assert any(note.startswith("interrupted") for note in info["sdaccel"]["notes"]), info["sdaccel"]
    after, _ = txt2img(client)  # the pipeline is still usable
    assert len(after["images"]) == 1
    assert client.get("/sdapi/v1/progress").json()["state"]["job_count"] == 0


def test_the_a1111_accordions_arguments_work_here_too(client):
    """A client written against SDAccel's A1111 accordion sends [enabled, winograd, channels_last, cfg_cutoff,
    deepcache]."""
    _, info = txt2img(client, alwayson_scripts={"SDAccel": {"args": [True, False, True, 0.5]}})
    stats = info["sdaccel"]["stats"][0]
    assert any(label.startswith("channels_last") for label in stats["optimizations"]) and stats["cfg_steps"] == 1
    _, info = txt2img(client, alwayson_scripts={"SDAccel": {"args": [False, False, True, 0.5]}})
    assert info["sdaccel"]["stats"][0]["cfg_steps"] == STEPS  # switched off: nothing applied
    bad = client.post("/sdapi/v1/txt2img", json={**A1111_BODY, "alwayson_scripts": {"SDAccel": {"args": [True, 1]}}})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"][-1] == "1"
    _, info = txt2img(client, alwayson_scripts={"SDAccel": {"args": [True, False, False, 1.0, 2]}})
    assert any(label.startswith("deepcache") for label in info["sdaccel"]["stats"][0]["optimizations"]), info
    for interval in (0, 2.5, "3", True):
        bad = client.post("/sdapi/v1/txt2img", json={
            **A1111_BODY, "alwayson_scripts": {"SDAccel": {"args": [True, False, False, 1.0, interval]}}})
        assert bad.status_code == 422 and bad.json()["detail"][0]["loc"][-1] == "4", (interval, bad.text)
        assert "deepcache" in bad.json()["detail"][0]["msg"]


def test_prompt_lora_tags_merge_the_named_lora(client):
    def pixels(body):
        return _image(body["images"][0]).convert("RGB").tobytes()

    plain, _ = txt2img(client, prompt="a lighthouse at dusk")
    tagged, info = txt2img(client, prompt="a lighthouse <lora:ink:0.8> at dusk")
    assert pixels(tagged) != pixels(plain)
    notes = info["sdaccel"]["stats"][0]["notes"]
    assert any(note.startswith("LoRA ink.safetensors x0.8:") for note in notes), notes
    # the prompt as sent, tag included, as A1111 reports it (so "send to txt2img" brings the LoRA back)
    assert info["prompt"] == "a lighthouse <lora:ink:0.8> at dusk" == info["all_prompts"][0]
    assert _image(tagged["images"][0]).text["parameters"].startswith("a lighthouse <lora:ink:0.8> at dusk\n")
    assert "<lora:ink:0.8>" in info["infotexts"][0]
    again, _ = txt2img(client, prompt="a lighthouse at dusk")
    assert pixels(again) == pixels(plain)  # taken out again: the plain image
    bad = client.post("/sdapi/v1/txt2img", json={**A1111_BODY, "prompt": "a fox <lora:nowhere:1>"})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"][-1] == "prompt", bad.text
    assert "no LoRA named 'nowhere'" in bad.text


def test_an_interrupted_series_returns_the_batches_finished_before_it(client):
    """A1111 answers an interrupted n_iter series with the images it finished: so does SDAccel (the batch that
    was running gives none: the engine stops without decoding it)."""
    steps, size = 150, 128
    results: list = []
    thread = threading.Thread(target=lambda: results.append(client.post("/sdapi/v1/txt2img", json={
        **A1111_BODY, "steps": steps, "width": size, "height": size, "n_iter": 3})))
    thread.start()
    deadline = time.monotonic() + 300
    progress = {}
    while time.monotonic() < deadline:
        progress = client.get("/sdapi/v1/progress").json()
        if progress["state"]["sampling_step"] > steps + 2:  # the second batch has taken steps
            break
        time.sleep(0.02)
    assert progress["state"]["sampling_steps"] == 3 * steps, progress
    assert client.post("/sdapi/v1/interrupt").status_code == 200
    thread.join(300)
    assert results[0].status_code == 200, results[0].text
    body = results[0].json()
    info = json.loads(body["info"])
    assert len(body["images"]) == 1 and info["all_seeds"] == [A1111_BODY["seed"]], info["all_seeds"]
    assert any("in batch 2 of 3 (1 finished, kept)" in note for note in info["sdaccel"]["notes"]), info["sdaccel"]
    alone, _ = txt2img(client, steps=steps, width=size, height=size)
    assert np.array_equal(_pixels(alone["images"][0]), _pixels(body["images"][0]))  # a finished image, not a draft


def test_sd_model_hash_is_a1111s_short_sha256_of_the_checkpoint(client, models):
    import hashlib

    expected = hashlib.sha256((models / "fox.safetensors").read_bytes()).hexdigest()
    _, info = txt2img(client)
    assert info["sd_model_hash"] == expected[:10]
    listed = {m["title"]: m for m in client.get("/sdapi/v1/sd-models").json()}
    assert listed["fox.safetensors"]["hash"] == expected[:10] and listed["fox.safetensors"]["sha256"] == expected


def test_the_model_hash_is_computed_once_per_file_version(tmp_path, monkeypatch):
    import hashlib
    import os

    from sdaccel.webui import hashes

    calls: list = []
    real = hashes.file_sha256
    monkeypatch.setattr(hashes, "file_sha256", lambda path: calls.append(path) or real(path))
    model = tmp_path / "m.safetensors"
    model.write_bytes(b"weights one")
    assert hashes.known_sha256(model) is None  # a listing never hashes
    assert hashes.short_hash(model) == hashlib.sha256(b"weights one").hexdigest()[:10]
    assert hashes.short_hash(model) == hashes.short_hash(str(model)) and len(calls) == 1  # cached
    model.write_bytes(b"weights two!")  # replaced in place: another size and time
    os.utime(model, ns=(1, 1))
    assert hashes.short_hash(model) == hashlib.sha256(b"weights two!").hexdigest()[:10] and len(calls) == 2
    assert hashes.short_hash("synthetic:sd15") is None and hashes.short_hash(tmp_path) is None
