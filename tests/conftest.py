"""Shared fixtures: tiny checkpoints of every family written at test time, in the real key layouts."""

from __future__ import annotations

import logging
import socket

import pytest

ALL_FAMILIES = ["sd15", "taiyi", "sd2-base", "sd21-v", "sd-turbo", "sdxl-base", "sdxl-turbo", "sdxl-refiner"]


@pytest.fixture(autouse=True, scope="session")
def _quiet_libraries():
    from sdaccel.optim.testing import enable_synthetic

    enable_synthetic()  # `synthetic:<family>` models and the `synthetic` VAE, as the bench uses them
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.set_verbosity_error()
    dlog.disable_progress_bar()
    tlog.set_verbosity_error()
    logging.getLogger("sdaccel").setLevel(logging.INFO)


class _Checkpoints:
    """Writes each (family, layout, dtype, suffix) checkpoint once per session and hands out ModelRefs."""

    def __init__(self, root):
        self.root = root
        self._refs = {}
        self._pipes = {}

    def pipeline(self, family: str):
        from sdaccel.optim.testing.random_weights import build_pipeline

        if family not in self._pipes:
            self._pipes[family] = build_pipeline(family, tiny=True, seed=0)
        return self._pipes[family]

    def get(self, family: str, layout: str = "single", dtype: str = "float32", suffix: str = ".safetensors"):
        from sdaccel.optim.testing.random_weights import write_checkpoint

        key = (family, layout, dtype, suffix)
        if key not in self._refs:
            name = f"{family}-{dtype}" + (suffix if layout == "single" else "-diffusers")
            self._refs[key] = write_checkpoint(family, self.root / name, tiny=True, layout=layout, dtype=dtype,
                                               pipe=self.pipeline(family))
        return self._refs[key]


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    return _Checkpoints(tmp_path_factory.mktemp("checkpoints"))


@pytest.fixture
def cache():
    from sdaccel.optim.run.cache import PipelineCache

    c = PipelineCache(max_entries=2)
    yield c
    c.clear()


@pytest.fixture
def no_network(monkeypatch):
    """Fail any attempt to open a network connection, and record it."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access attempted during an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return attempts


@pytest.fixture(scope="session")
def tiny_plan(tmp_path_factory):
    """The planner's profile of the tiny SD 1.5 model (64 px, 2 steps), measured once a session the way users'
    are (one process per candidate): {"folder", "plan", "report", "said"}. Tests copy the folder before use."""
    from sdaccel.optim.plan.planner import make_plan

    folder = tmp_path_factory.mktemp("plans")
    said: list = []
    plan, report = make_plan("1000GB", family="sd15", size=64, steps=2, model="synthetic-tiny:sd15", folder=folder,
                             repeats=1, warmup=1, say=said.append)
    return {"folder": folder, "plan": plan, "report": report, "said": said}


@pytest.fixture
def plan_dir(tiny_plan, tmp_path, monkeypatch):
    """$SDACCEL_PLAN_DIR: a copy of the session's tiny profile folder, so front-ends find it measured."""
    import shutil

    folder = tmp_path / "plans"
    shutil.copytree(tiny_plan["folder"], folder)
    monkeypatch.setenv("SDACCEL_PLAN_DIR", str(folder))
    return folder
