"""A real A1111 (or Forge) for the tests: started offline on the CPU on 127.0.0.1 by ../shared/hosts' own
script, from a writable copy of the tree, with this checkout linked in as the extension `sdaccel` (its install.py
run by the host's own installer step first) and an SD 1.5 checkpoint of the real architecture (random weights;
A1111 builds the full model from its own config) in its models folder. `A1111_PATH`/`A1111_PYTHON` (or `FORGE_PATH`/`FORGE_PYTHON`) name the tree and its venv.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from sdaccel.optim.bench.processes import free_port, stop_process, wait_for_http

ROOT = Path(__file__).resolve().parent.parent
CHECKPOINT = "sdaccel-random-sd15.safetensors"
HOSTS = ("a1111", "forge")
READY_TIMEOUT_S = 600


def host_env(host: str) -> tuple[str, str]:
    prefix = host.upper()
    return os.environ.get(f"{prefix}_PATH", ""), os.environ.get(f"{prefix}_PYTHON", "")


def skip_reason(host: str) -> str:
    prefix = host.upper()
    return (f"{prefix}_PATH / {prefix}_PYTHON are not set: point them at ../shared/hosts/{host} and a venv built by "
            f"../shared/hosts/setup/venv.sh {host} (CI does)")


def write_random_sd15(path: Path) -> None:
    from sdaccel.optim.testing.random_weights import build_pipeline, write_single_file

    path.parent.mkdir(parents=True, exist_ok=True)
    pipe = build_pipeline("sd15")
    write_single_file(pipe, "sd15", path, dtype="float16")


def run_extension_installer(tree: str, python: str, extension: Path) -> str:
    """The host's own step for an extension's install.py (`launch_utils.run_extension_installer`, what its
    launcher runs at start-up; start-webui.sh starts with --skip-install): its output."""
    code = "import sys; from modules import launch_utils; launch_utils.run_extension_installer(sys.argv[1])"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    done = subprocess.run([python, "-c", code, str(extension)], cwd=tree, env=env, capture_output=True, text=True,
                          timeout=READY_TIMEOUT_S)
    if done.returncode != 0 or "Error running install.py" in done.stdout + done.stderr:
        raise RuntimeError(f"the host's installer failed for {extension}:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    return done.stdout


class WebUIHost:
    """`host` started by the start-webui.sh beside its tree (`tree`: ../shared/hosts/<host>) with the venv of
    `python`."""

    def __init__(self, host: str, tree: str, python: str, workdir: Path, extra=()):
        self.host, self.workdir, self.tree, self.python = host, workdir, tree, python
        start_script = Path(tree).resolve().parent / "setup" / "start-webui.sh"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        (workdir / "extensions").mkdir(parents=True, exist_ok=True)
        link = workdir / "extensions" / "sdaccel"
        if not link.exists():
            link.symlink_to(ROOT, target_is_directory=True)
        self.installer_output = run_extension_installer(tree, python, link)
        checkpoint = workdir / "models" / "Stable-diffusion" / CHECKPOINT
        if not checkpoint.exists():
            write_random_sd15(checkpoint)
        self.log = workdir.parent / f"{host}-{self.port}.log"
        flags = ["--ckpt", str(checkpoint), "--disable-nan-check"]
        self._log = open(self.log, "wb")  # noqa: SIM115 - closed in stop()
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
        self.proc = subprocess.Popen(["bash", str(start_script), host, str(Path(python).parent.parent), str(workdir),
                                      str(self.port), *flags, *extra], stdout=self._log, stderr=subprocess.STDOUT,
                                     env=env)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self) -> None:
        wait_for_http(self.url + "/sdapi/v1/sd-models", self.proc, READY_TIMEOUT_S, name=self.host, interval=1,
                      detail=lambda: ":\n" + self.log_text()[-4000:])

    def stop(self) -> None:
        stop_process(self.proc, 60)
        self._log.close()
