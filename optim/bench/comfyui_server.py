"""A real ComfyUI started from a given checkout and venv, on 127.0.0.1, with this pack linked into it.

Used by `bench comfyui` and by the real-host tests. It talks to the host over its HTTP API only (the engine never
imports ComfyUI): a private --base-directory holds the pack link, the models, the outputs and the log, so the
checkout is never written to.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from .processes import free_port, stop_process

START_TIMEOUT_S, RUN_TIMEOUT_S = 420, 600
PACK_ROOT = Path(__file__).resolve().parents[2]


class HostError(RuntimeError):
    """The host did not start, rejected a prompt or did not finish it; the message carries its log's tail."""


@dataclass
class ComfyServer:
    """A running ComfyUI: its HTTP API, its log, and how long things took."""

    url: str
    base: Path
    log: Path
    process: subprocess.Popen
    client_id: str = "sdaccel"
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
            answer = self.request("/prompt", {"prompt": prompt, "client_id": self.client_id})
        except urllib.error.HTTPError as exc:
            raise HostError(f"/prompt rejected the prompt: {exc.read().decode()[:3000]}") from exc
        if answer.get("node_errors"):
            raise HostError(f"/prompt rejected the prompt: {json.dumps(answer['node_errors'])[:3000]}")
        return answer["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = RUN_TIMEOUT_S) -> dict:
        """The prompt's history entry once it has succeeded or failed."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.request(f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None \
                    and history[prompt_id]["status"].get("status_str") in ("success", "error"):
                return history[prompt_id]
            if self.process.poll() is not None:
                raise HostError(f"ComfyUI exited ({self.process.returncode}):\n{self.log_tail()}")
            time.sleep(0.1)
        raise HostError(f"prompt {prompt_id} did not finish in {timeout}s:\n{self.log_tail()}")

    def run(self, prompt: dict) -> tuple[dict, float]:
        start = time.perf_counter()
        entry = self.wait(self.queue(prompt))
        return entry, time.perf_counter() - start

    def stop(self) -> None:
        stop_process(self.process, 20, signal.SIGINT)


def execution_seconds(entry: dict) -> float:
    """How long ComfyUI spent executing a prompt, from its own history timestamps (queueing and polling left
    out)."""
    stamps = {kind: data.get("timestamp") for kind, data in entry.get("status", {}).get("messages", [])}
    start, end = stamps.get("execution_start"), stamps.get("execution_success")
    if start is None or end is None:
        raise HostError(f"the prompt did not succeed: {json.dumps(entry.get('status'))[-2000:]}")
    return (end - start) / 1000.0


def launch(checkout: Path, python: str, base: Path, *, pack: Path = PACK_ROOT, env: dict | None = None,
           client_id: str = "sdaccel", start_timeout: float = START_TIMEOUT_S) -> ComfyServer:
    """Start ComfyUI (`checkout`/main.py under `python`) on a free loopback port with `base` as its base directory
    and this pack in its custom_nodes; return once it serves the pack's nodes. Put models under `base`/models
    first. Stop it with `.stop()`."""
    checkout = Path(checkout).expanduser().resolve()
    if not (checkout / "main.py").is_file():
        raise HostError(f"{checkout} holds no ComfyUI main.py: give the ComfyUI checkout's folder")
    if not Path(python).is_file():
        raise HostError(f"{python} does not exist: give the python of ComfyUI's venv (VENV/bin/python)")
    link = base / "custom_nodes" / "sdaccel"
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.exists():
        link.symlink_to(pack, target_is_directory=True)
    port = free_port()
    from ...cpukernels.paths import native_build_root

    # a fresh cache folder (calibration) per server, but one build of the native kernel per machine and torch: the
    # server finds the builds this process would use (about 2.5 minutes each to make on 2 cores)
    environment = {**os.environ, "SDACCEL_CACHE_DIR": str(base / "sdaccel-cache"),
                   "SDACCEL_NATIVE_DIR": str(native_build_root()), "HF_HUB_OFFLINE": "1",
                   "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    environment.pop("PYTHONPATH", None)
    log = base / "server.log"
    with open(log, "wb") as sink:
        process = subprocess.Popen(
            [python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--base-directory", str(base),
             "--database-url", "sqlite:///:memory:", "--disable-auto-launch"],
            cwd=checkout, env=environment, stdout=sink, stderr=subprocess.STDOUT)
    server = ComfyServer(f"http://127.0.0.1:{port}", base, log, process, client_id)
    started = time.monotonic()
    try:
        while True:
            if process.poll() is not None:
                raise HostError(f"ComfyUI exited during start-up ({process.returncode}):\n{server.log_tail()}")
            try:
                server.request("/object_info/SDAccelSampler", timeout=5)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError) as exc:
                if time.monotonic() - started > start_timeout:
                    raise HostError(f"ComfyUI did not answer in {start_timeout}s:\n{server.log_tail()}") from exc
                time.sleep(1)
    except BaseException:
        server.stop()
        raise
    server.timings["start_s"] = round(time.monotonic() - started, 1)
    return server
