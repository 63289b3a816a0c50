"""A real ComfyUI for the tests: its server on 127.0.0.1 and its own page in headless Chromium.

`COMFYUI_PATH` names an unmodified ComfyUI checkout (CI uses ../shared/hosts/comfyui) and `COMFYUI_PYTHON` the
interpreter of its venv. The server runs with a private --base-directory: the pack is linked into its
custom_nodes, tiny checkpoints are written into its models folders under the names the workflows use, and
images land in its output folder, so the checkout is never written to. Workflows become prompts through the
host's own frontend (`app.loadGraphData`, then `app.graphToPrompt`) in the page the server serves, so no
part of ComfyUI is imitated here. Chromium is Debian's (`CHROMIUM`, default /usr/bin/chromium), driven by
playwright with no browser download.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import host_native_kernel
from browser import browser_page
from sdaccel.optim.bench.comfyui_server import RUN_TIMEOUT_S  # noqa: F401 (for the tests)
from sdaccel.optim.bench.comfyui_server import ComfyServer as Server

ROOT = Path(__file__).resolve().parent.parent
COMFYUI_PATH = os.environ.get("COMFYUI_PATH", "")
SKIP_REASON = ("COMFYUI_PATH is not set: point it at a ComfyUI checkout (e.g. ../shared/hosts/comfyui) and "
               "COMFYUI_PYTHON at its venv's python to run the pack in a real ComfyUI (.ci/run does)")


def load_workflow(path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def host_python(checkout: Path) -> str:
    if os.environ.get("COMFYUI_PYTHON"):
        return os.environ["COMFYUI_PYTHON"]
    for candidate in (checkout / "venv" / "bin" / "python", checkout / ".venv" / "bin" / "python"):
        if candidate.exists():
            return str(candidate)
    return sys.executable


def write_models(models: Path, named: dict) -> None:
    """Tiny random checkpoints under the names the shipped workflows use (`named`: name -> family), and the
    VAE files their VAE toggles name, in the layouts users download them in (random weights)."""
    from sdaccel.optim.testing.random_weights import build_pipeline, write_checkpoint

    for name, family in named.items():
        pipe = build_pipeline(family, tiny=True)
        if name.startswith("diffusers/"):
            write_checkpoint(family, models / "diffusers" / name.split("/", 1)[1], layout="diffusers",
                             dtype="float32", pipe=pipe)
        else:
            write_checkpoint(family, models / "checkpoints" / name, dtype="float32", pipe=pipe)
        if family == "sdxl-base":  # the fp16-fix VAE has the model's own VAE architecture
            from safetensors.torch import save_file

            (models / "vae").mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in pipe.vae.state_dict().items()},
                      str(models / "vae" / "sdxl_vae_fp16_fix.safetensors"))
    for prefix in ("taesd", "taesdxl"):
        write_taesd(models / "vae_approx", prefix)


def write_taesd(folder: Path, prefix: str) -> None:
    """`<prefix>_encoder.pth` and `<prefix>_decoder.pth` as github.com/madebyollin/taesd ships them: one
    nn.Sequential each, the decoder's index 0 being a parameter-free clamp (so its layers start at 1)."""
    import torch
    from sdaccel.optim.testing.synthetic import synthetic_tiny_vae

    state = synthetic_tiny_vae(4).state_dict()
    folder.mkdir(parents=True, exist_ok=True)
    for side, shift in (("encoder", 0), ("decoder", 1)):
        raw = {}
        for key, value in state.items():
            layers = f"{side}.layers."
            if key.startswith(layers):
                index, rest = key.removeprefix(layers).split(".", 1)
                raw[f"{int(index) + shift}.{rest}"] = value.clone()
        torch.save(raw, folder / f"{prefix}_{side}.pth")


def write_host_models(models: Path, checkpoint: str, lora: str, controlnet: str | None = None,
                      control_image: str | None = None) -> None:
    """An SD 1.5 ComfyUI's own loaders accept (`build_host_shaped_sd15`), a kohya-format LoRA for it, and where
    named an LDM-format ControlNet for it and a control image in the input folder beside `models`."""
    from sdaccel.optim.testing.controlnet import ldm_controlnet
    from sdaccel.optim.testing.lora import kohya_unet_lora
    from sdaccel.optim.testing.random_weights import build_host_shaped_sd15, write_single_file

    pipe = build_host_shaped_sd15()
    write_single_file(pipe, "sd15", models / "checkpoints" / checkpoint, dtype="float16")
    kohya_unet_lora(pipe.unet, models / "loras" / lora)
    if controlnet:
        ldm_controlnet(pipe.unet, models / "controlnet" / controlnet)
    if control_image:
        import numpy as np
        from PIL import Image

        ramp = np.linspace(0, 255, 64, dtype=np.uint8)
        pixels = np.stack([np.tile(ramp, (64, 1)), np.tile(ramp[:, None], (1, 64)), np.full((64, 64), 128, np.uint8)],
                          axis=-1)  # edges to follow in every direction
        (models.parent / "input").mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(models.parent / "input" / control_image)


def start_server(base: Path, models: dict, write_extra=None):
    """Start ComfyUI on a free loopback port with `base` as its base directory; a generator for a fixture.
    `write_extra(models_folder)` adds files beyond the workflows' checkpoints."""
    import pytest
    from sdaccel.optim.bench.comfyui_server import HostError, launch

    checkout = Path(COMFYUI_PATH).expanduser().resolve()
    host_native_kernel.build_for(host_python(checkout))  # the Winograd tests check the kernel's results
    write_models(base / "models", models)
    if write_extra is not None:
        write_extra(base / "models")
    try:
        server = launch(checkout, host_python(checkout), base, pack=ROOT, client_id="sdaccel-tests")
    except HostError as exc:
        pytest.fail(str(exc))
    try:
        yield server
    finally:
        server.stop()
        print(f"\nComfyUI timings: {json.dumps(server.timings, indent=1)}")


class Frontend:
    """ComfyUI's own page in headless Chromium: loads UI-format workflows and converts or queues them."""

    def __init__(self, page, server: Server):
        self.page, self.server = page, server
        self.errors: list[str] = []  # uncaught page errors with their stacks, and console errors
        page.on("pageerror", lambda exc: self.errors.append(f"{exc.message}\n{exc.stack}"))
        page.on("console", lambda msg: self.errors.append(f"console: {msg.text}") if msg.type == "error" else None)

    def our_errors(self) -> list[str]:
        """The errors raised in the pack's extension (this ComfyUI's own page logs a few of its own)."""
        return [error for error in self.errors if "/extensions/sdaccel/" in error]

    def load(self, workflow: dict) -> None:
        self.page.evaluate("async (wf) => { await window.app.loadGraphData(wf); }", workflow)

    def prompt(self, workflow: dict) -> dict:
        """The API-format prompt the frontend queues for `workflow` (notes dropped, links followed, widgets named)."""
        self.load(workflow)
        return self.page.evaluate("async () => (await window.app.graphToPrompt()).output")


def open_frontend(server: Server):
    """A generator for a fixture: a Frontend on the server's page, once the pack's extension has registered."""
    server.request("/settings", {"Comfy.TutorialCompleted": True})  # no first-visit template dialog over the canvas
    with browser_page() as page:
        frontend = Frontend(page, server)
        page.goto(server.url, wait_until="load", timeout=120_000)
        page.wait_for_function("() => window.app?.graph && window.app.extensionManager !== undefined"
                               " && window.app.extensions?.some(e => e.name === 'SDAccel.RunStats')",
                               timeout=120_000)
        yield frontend
