"""The pack inside a real ComfyUI: every example workflow queued through /prompt on the CPU.

Runs only when COMFYUI_PATH points at a ComfyUI checkout (COMFYUI_PYTHON: the interpreter of its venv,
default `<checkout>/venv/bin/python`, then `.venv`, then this one). The server runs on 127.0.0.1 with a
private --base-directory: the pack is linked into its custom_nodes, tiny checkpoints are written into
its models folders under the very names the workflows use, and images land in its output folder, so
the checkout itself is never touched. No part of ComfyUI is imitated here.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import comfy_examples as examples
import pytest
from comfy_runner import input_types_from_object_info, load_workflow, override, ui_to_api

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "example_workflows"
WORKFLOWS = sorted(EXAMPLES.glob("*.json"))
COMFYUI_PATH = os.environ.get("COMFYUI_PATH", "")
TEST_SIZE, TEST_STEPS = 64, 3
START_TIMEOUT_S, RUN_TIMEOUT_S = 420, 600

pytestmark = pytest.mark.skipif(not COMFYUI_PATH, reason="COMFYUI_PATH is not set: point it at a ComfyUI checkout "
                                "(and COMFYUI_PYTHON at its venv's python) to run the pack in a real ComfyUI")


def _python(checkout: Path) -> str:
    if os.environ.get("COMFYUI_PYTHON"):
        return os.environ["COMFYUI_PYTHON"]
    for candidate in (checkout / "venv" / "bin" / "python", checkout / ".venv" / "bin" / "python"):
        if candidate.exists():
            return str(candidate)
    return sys.executable


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    url: str
    base: Path
    log: Path
    process: subprocess.Popen
    timings: dict = field(default_factory=dict)

    def request(self, path: str, body=None, timeout: float = 30):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as response:
            raw = response.read()
        return json.loads(raw) if raw[:1] in (b"{", b"[") else raw

    def log_tail(self, chars: int = 6000) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")[-chars:]

    def queue(self, prompt: dict) -> str:
        try:
            answer = self.request("/prompt", {"prompt": prompt, "client_id": "sdaccel-tests"})
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"/prompt rejected the prompt: {exc.read().decode()[:3000]}") from exc
        assert not answer.get("node_errors"), answer
        return answer["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = RUN_TIMEOUT_S) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.request(f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None \
                    and history[prompt_id]["status"].get("status_str") in ("success", "error"):
                return history[prompt_id]
            if self.process.poll() is not None:
                raise AssertionError(f"ComfyUI exited ({self.process.returncode}):\n{self.log_tail()}")
            time.sleep(0.25)
        raise AssertionError(f"prompt {prompt_id} did not finish in {timeout}s:\n{self.log_tail()}")

    def run(self, prompt: dict) -> tuple[dict, float]:
        start = time.perf_counter()
        entry = self.wait(self.queue(prompt))
        return entry, time.perf_counter() - start


def _write_models(models: Path) -> None:
    """Tiny random checkpoints under the names the shipped workflows use (each with its config beside it)."""
    from sdaccel.optim.testing.random_weights import write_checkpoint

    for name, model in examples.MODELS.items():
        if name.startswith("diffusers/"):
            write_checkpoint(model.family, models / "diffusers" / name.split("/", 1)[1], layout="diffusers",
                             dtype="float32")
        else:
            write_checkpoint(model.family, models / "checkpoints" / name, dtype="float32")


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=20)


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    checkout = Path(COMFYUI_PATH).expanduser().resolve()
    if not (checkout / "main.py").is_file():
        pytest.fail(f"COMFYUI_PATH={COMFYUI_PATH} holds no ComfyUI main.py")
    base = tmp_path_factory.mktemp("comfy-base")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "sdaccel").symlink_to(ROOT, target_is_directory=True)
    _write_models(base / "models")
    port = _free_port()
    env = {**os.environ, "SDACCEL_CACHE_DIR": str(base / "sdaccel-cache"), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("PYTHONPATH", None)
    log = base / "server.log"
    with open(log, "wb") as sink:
        process = subprocess.Popen(
            [_python(checkout), "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--base-directory",
             str(base), "--database-url", "sqlite:///:memory:", "--disable-auto-launch"],
            cwd=checkout, env=env, stdout=sink, stderr=subprocess.STDOUT)
    server = Server(f"http://127.0.0.1:{port}", base, log, process)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"ComfyUI exited during start-up ({process.returncode}):\n{server.log_tail()}")
            try:
                server.request("/object_info/SDAccelSampler", timeout=5)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
                if time.monotonic() > deadline:
                    pytest.fail(f"ComfyUI did not answer in {START_TIMEOUT_S}s:\n{server.log_tail()}")
                time.sleep(1)
        server.timings["start_s"] = round(START_TIMEOUT_S - (deadline - time.monotonic()), 1)
        yield server
    finally:
        _stop(process)
        print(f"\nComfyUI timings: {json.dumps(server.timings, indent=1)}")


@pytest.fixture(scope="module")
def object_info(comfy):
    return comfy.request("/object_info", timeout=120)


def _prompt(path: Path, object_info: dict, base: Path) -> dict:
    """The workflow as the frontend would queue it, shrunk: tiny sizes and steps, random-weight VAEs."""

    def small(class_type: str, inputs: dict) -> dict:
        if class_type == "SDAccelSampler":
            return {"width": TEST_SIZE, "height": TEST_SIZE, "steps": TEST_STEPS}
        if class_type == "SDAccelVAE" and inputs["variant"] != "default":
            return {"path": "synthetic"}  # no TAESD / fp16-fix weights on this machine
        if class_type == "SDAccelOffload":
            return {"spill_dir": str(base / "spill")}
        return {}

    return override(ui_to_api(load_workflow(path), input_types_from_object_info(object_info)), small)


def _node(prompt: dict, class_type: str) -> str:
    return next(node_id for node_id, node in prompt.items() if node["class_type"] == class_type)


def test_pack_loads_and_serves_its_nodes_extension_and_templates(comfy, object_info):
    from sdaccel.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

    log = comfy.log.read_text(encoding="utf-8", errors="replace")
    ours = [line for line in log.splitlines() if line.rstrip().endswith("custom_nodes/sdaccel")]
    assert ours and not any("IMPORT FAILED" in line for line in ours), log[-6000:]
    for node_type, cls in NODE_CLASS_MAPPINGS.items():
        info = object_info[node_type]
        assert info["category"] == cls.CATEGORY and info["display_name"] == NODE_DISPLAY_NAME_MAPPINGS[node_type]
    choices = object_info["SDAccelLoader"]["input"]["required"]["ckpt_name"][0]
    assert set(examples.MODELS) <= set(choices) and choices[-1] == "(use path)"
    extensions = comfy.request("/extensions")
    assert "/extensions/sdaccel/sdaccel_stats.js" in extensions
    assert comfy.request("/extensions/sdaccel/sdaccel_stats.js") == (ROOT / "js" / "sdaccel_stats.js").read_bytes()
    templates = comfy.request("/workflow_templates")
    assert sorted(templates["sdaccel"]) == sorted(p.stem for p in WORKFLOWS)
    assert comfy.request("/api/workflow_templates/sdaccel/fastest.json") == load_workflow(EXAMPLES / "fastest.json")


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_example_workflow_runs_and_writes_images(comfy, object_info, path):
    prompt = _prompt(path, object_info, comfy.base)
    entry, seconds = comfy.run(prompt)
    status = entry["status"]
    assert status["status_str"] == "success", json.dumps(status["messages"], indent=1)[-4000:]
    save, sampler = _node(prompt, "SaveImage"), _node(prompt, "SDAccelSampler")
    images = entry["outputs"][save]["images"]
    assert len(images) == 1
    from PIL import Image

    written = comfy.base / "output" / images[0]["subfolder"] / images[0]["filename"]
    with Image.open(written) as image:
        assert image.size == (TEST_SIZE, TEST_SIZE)
    stats = entry["outputs"][sampler]["sdaccel_stats"][0]
    assert any("it/s" in line for line in stats["lines"]) and stats["summary"]
    comfy.timings[path.stem] = {"wall_s": round(seconds, 2), "run_s": stats["total_s"],
                                "toggles": stats["toggles"], "notes": stats["notes"]}


def test_identical_prompt_is_served_from_comfyuis_cache(comfy, object_info):
    prompt = _prompt(EXAMPLES / "baseline.json", object_info, comfy.base)
    first, _ = comfy.run(prompt)
    again, seconds = comfy.run(prompt)
    assert again["status"]["status_str"] == "success"
    cached = [data for event, data in again["status"]["messages"] if event == "execution_cached"]
    assert cached and _node(prompt, "SDAccelSampler") in cached[0]["nodes"]
    comfy.timings["baseline_cached_wall_s"] = round(seconds, 2)


def test_impossible_combination_reaches_the_error_panel_and_the_server_goes_on(comfy, object_info):
    from sdaccel.optim.core.registry import all_units

    prompt = _prompt(EXAMPLES / "baseline.json", object_info, comfy.base)
    loader, sampler = _node(prompt, "SDAccelLoader"), _node(prompt, "SDAccelSampler")
    prompt["90"] = {"class_type": "SDAccelCompile", "inputs": {"pipe": [loader, 0]}}
    prompt["91"] = {"class_type": "SDAccelOffload", "inputs": {"pipe": ["90", 0], "mode": "staged"}}
    for node_id, node_type in (("90", "SDAccelCompile"), ("91", "SDAccelOffload")):
        for name, spec in object_info[node_type]["input"]["required"].items():
            if len(spec) > 1 and "default" in spec[1]:
                prompt[node_id]["inputs"].setdefault(name, spec[1]["default"])
    prompt[sampler]["inputs"]["pipe"] = ["91", 0]
    entry, _ = comfy.run(prompt)
    assert entry["status"]["status_str"] == "error"
    errors = [data for event, data in entry["status"]["messages"] if event == "execution_error"]
    assert errors and errors[0]["node_type"] == "SDAccelOffload"
    assert all_units()["offload"].config_cls.conflicts["compile"] in errors[0]["exception_message"]
    assert errors[0]["exception_type"].endswith("ConflictError")
    ok, _ = comfy.run(_prompt(EXAMPLES / "channels-last.json", object_info, comfy.base))
    assert ok["status"]["status_str"] == "success"


def test_interrupt_stops_the_run_and_the_pipeline_stays_usable(comfy, object_info):
    prompt = _prompt(EXAMPLES / "freeu.json", object_info, comfy.base)
    sampler = _node(prompt, "SDAccelSampler")
    prompt[sampler]["inputs"].update({"steps": 200, "width": 512, "height": 512, "seed": 7})
    prompt_id = comfy.queue(prompt)
    deadline = time.monotonic() + 120
    while not comfy.request("/queue")["queue_running"]:
        assert time.monotonic() < deadline, "the prompt never started"
        time.sleep(0.1)
    time.sleep(1.0)  # a few steps into the 200 (a tiny model, already loaded)
    comfy.request("/interrupt", {})
    entry = comfy.wait(prompt_id)
    events = [event for event, _ in entry["status"]["messages"]]
    assert "execution_interrupted" in events and "execution_error" not in events, events
    after = _prompt(EXAMPLES / "freeu.json", object_info, comfy.base)
    after[sampler]["inputs"]["seed"] = 8  # not a prompt ComfyUI has cached
    ok, _ = comfy.run(after)
    assert ok["status"]["status_str"] == "success"
    summary = ok["outputs"][sampler]["sdaccel_stats"][0]["summary"]
    assert "cache hit" in summary  # the interrupted run left the prepared pipeline in place


def test_comfyui_unload_models_releases_sdaccel_pipelines(comfy, object_info):
    held = comfy.request("/sdaccel/pipelines")
    assert held["pipelines"] and held["tracked_by_comfyui"] >= 1
    comfy.request("/free", {"unload_models": True})
    deadline = time.monotonic() + 30
    while comfy.request("/sdaccel/pipelines")["pipelines"]:
        assert time.monotonic() < deadline, comfy.log_tail()
        time.sleep(0.25)
    assert comfy.request("/sdaccel/pipelines")["tracked_by_comfyui"] == 0
    log = comfy.log_tail(20000)
    assert "releasing" in log and "Traceback" not in log[log.index("releasing"):]
    # ComfyUI's worker survived the unload and SDAccel loads again on the next run
    prompt = _prompt(EXAMPLES / "baseline.json", object_info, comfy.base)
    prompt[_node(prompt, "SDAccelSampler")]["inputs"]["seed"] = 9
    entry, _ = comfy.run(prompt)
    assert entry["status"]["status_str"] == "success"
    assert "cache loaded" in entry["outputs"][_node(prompt, "SDAccelSampler")]["sdaccel_stats"][0]["summary"]
    assert comfy.request("/sdaccel/pipelines")["tracked_by_comfyui"] == 1
