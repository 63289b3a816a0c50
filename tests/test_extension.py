"""The A1111/Forge adapter's host-free parts: the accordion's arguments and infotext, and the one-line verdict on
what a host's Python can run. (The adapter in the real A1111 and Forge: test_webui_hosts.py.)"""

from __future__ import annotations

import importlib.metadata

import pytest
from sdaccel.extension import requirements
from sdaccel.extension.accordion import Choice


def test_accordion_choice_round_trips_through_the_infotext():
    choice = Choice.from_args([True, True, False, 0.5])
    assert choice.active and choice.label() == "winograd, cfg_cutoff=0.5"
    assert Choice.from_infotext(choice.label()) == choice
    assert Choice.from_infotext("") == Choice() and not Choice().active
    assert not Choice.from_args([False, True, True, 0.5]).active  # the accordion's own switch
    assert not Choice.from_args([True, False, False, 1.0]).active  # enabled with nothing chosen
    assert Choice.from_args([True, False, True, None]).cfg_cutoff == 1.0
    deep = Choice.from_args([True, False, True, 0.5, 3])
    assert deep.active and deep.label() == "channels_last, deepcache=3, cfg_cutoff=0.5"
    assert Choice.from_infotext(deep.label()) == deep
    assert Choice.from_args([True, False, False, 1.0]).deepcache == 1  # a four-argument client: DeepCache off
    assert Choice.from_args([True, False, False, 1.0, 2]).active


def test_engine_verdict_names_what_is_missing(monkeypatch):
    assert requirements.engine_problem() is None  # this venv runs the engine
    real = importlib.metadata.version

    def pinned(name):
        if name == "transformers":
            return "4.28.1"
        if name == "diffusers":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(requirements.metadata, "version", pinned)
    problem = requirements.engine_problem()
    assert "diffusers >= 0.31 (not installed)" in problem and "transformers >= 4.30 (version 4.28)" in problem
    assert "accordion works" in problem and "python -m sdaccel webui" in problem


def install_functions() -> dict:
    """install.py's helper functions (the file itself runs the host's pip on import: it needs A1111's `launch`)."""
    import ast
    from pathlib import Path

    tree = ast.parse((Path(__file__).resolve().parent.parent / "install.py").read_text(encoding="utf-8"))
    functions = [node for node in tree.body if isinstance(node, ast.FunctionDef)]
    namespace: dict = {}
    exec(compile(ast.Module(body=functions, type_ignores=[]), "install.py", "exec"), namespace)
    return namespace


@pytest.mark.parametrize("found, minimum, older", [("4.30.2", "4.46", True), ("0.31.0", "0.31", False),
                                                     ("0.26.2", "0.26", False), ("1.0.0rc1", "0.33", False)])
def test_install_never_upgrades_what_the_host_has(found, minimum, older):
    install = install_functions()
    assert install["_older"](found, minimum) is older
    assert install["_parse"]("diffusers>=0.31  # engine") == ("diffusers>=0.31", "diffusers", "0.31")


def test_install_adds_a_missing_requirement_in_its_floors_series():
    """A1111 has no diffusers: it gets the 0.31 series the host lane runs beside A1111's pins, not the newest."""
    floor = install_functions()["_floor_series"]
    assert floor("diffusers", "0.31") == "diffusers~=0.31.0"
    assert floor("accelerate", "0.21") == "accelerate~=0.21.0"
    assert floor("numpy", "2") == "numpy~=2.0.0"


# -- the tab's pipeline and the host's model (extension/host_memory.py) ------------------------------------------

def test_the_memory_setting_decides_when_the_host_model_is_unloaded():
    from sdaccel.extension.host_memory import HEADROOM, MODES, decide
    from sdaccel.optim.spec.errors import ConfigError

    assert MODES == ("auto", "keep", "one-at-a-time")
    gb = 2**30
    assert not decide("keep", needed=20 * gb, available=1 * gb)  # keep: never, even when it cannot fit
    assert decide("one-at-a-time", needed=0, available=100 * gb)  # always, even when both fit
    assert not decide("auto", needed=4 * gb, available=int(4 * gb * HEADROOM) + 1)
    assert decide("auto", needed=4 * gb, available=int(4 * gb * HEADROOM) - 1)
    assert not decide("auto", needed=0, available=0)  # the tab's pipeline already loaded: nothing to make room for
    with pytest.raises(ConfigError, match="sdaccel_tab_host_model.*'both'"):
        decide("both", needed=0, available=0)


def test_the_pipeline_estimate_reads_the_checkpoint_header(tmp_path):
    import torch
    from safetensors.torch import save_file
    from sdaccel.extension.host_memory import weights_bytes

    tensors = {"model.diffusion_model.w": torch.zeros(10, 20, dtype=torch.float16),
               "first_stage_model.b": torch.zeros(30, dtype=torch.bfloat16),
               "model_ema.decay": torch.zeros(1000, dtype=torch.float16),  # an EMA copy is not loaded
               "cond_stage_model.position_ids": torch.zeros(77, dtype=torch.int64)}  # not a weight
    single = tmp_path / "model.safetensors"
    save_file(tensors, str(single))
    assert weights_bytes(single, "cpu") == (200 + 30) * 4  # fp32 on a CPU, whatever the file stores
    assert weights_bytes(single, "cuda") == (200 + 30) * 2
    folder = tmp_path / "diffusers" / "unet"
    folder.mkdir(parents=True)
    save_file({"w": torch.zeros(100, dtype=torch.float16)}, str(folder / "diffusion_pytorch_model.safetensors"))
    size = (folder / "diffusion_pytorch_model.safetensors").stat().st_size
    assert weights_bytes(tmp_path / "diffusers", "cpu") == 2 * size
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"x" * 1234)
    assert weights_bytes(pickle, "cpu") == 1234


def test_a_job_scope_wraps_every_job_and_its_error_fails_only_that_job():
    import contextlib

    from sdaccel.webui.service import GenerationService

    events = []

    @contextlib.contextmanager
    def scope(job):
        events.append(("enter", job.label))
        if job.label == "refused":
            raise RuntimeError("no room")
        try:
            yield
        finally:
            events.append(("exit", job.label))

    service = GenerationService(queue_size=4, job_scope=scope)
    try:
        ok = service.submit(lambda progress, interrupted: events.append(("work", "a")) or 1, label="a")
        refused = service.submit(lambda progress, interrupted: events.append(("work", "refused")), label="refused")
        failing = service.submit(lambda progress, interrupted: 1 / 0, label="failing")
        after = service.submit(lambda progress, interrupted: 2, label="after")
        assert ok.future.result(30) == 1 and after.future.result(30) == 2
        with pytest.raises(RuntimeError, match="no room"):
            refused.future.result(30)
        with pytest.raises(ZeroDivisionError):
            failing.future.result(30)
    finally:
        service.close()
    assert events == [("enter", "a"), ("work", "a"), ("exit", "a"), ("enter", "refused"), ("enter", "failing"),
                      ("exit", "failing"), ("enter", "after"), ("exit", "after")]


def test_weights_are_counted_once_per_tensor():
    import torch
    from sdaccel.extension.host_memory import tensor_bytes

    shared = torch.nn.Linear(10, 10)  # 110 floats
    tied = torch.nn.Sequential(shared, torch.nn.Linear(10, 5))  # + 55 floats
    other = torch.nn.Sequential(shared)  # the same tensors again: counted once
    gone = torch.nn.Linear(1000, 1000, device="meta")  # unloaded weights hold no memory
    tied.register_buffer("scale", torch.ones(4, dtype=torch.float16))
    assert tensor_bytes([tied, other, gone]) == (110 + 55) * 4 + 4 * 2


def test_available_memory_without_psutil_reads_proc_meminfo(monkeypatch):
    import sys
    from pathlib import Path

    from sdaccel.extension.host_memory import available_bytes

    meminfo = Path("/proc/meminfo")
    if not meminfo.exists():
        pytest.skip("Linux only")
    monkeypatch.setitem(sys.modules, "psutil", None)  # `import psutil` raises ImportError
    found = available_bytes("cpu")
    listed = next(int(line.split()[1]) * 1024 for line in meminfo.read_text().splitlines()
                  if line.startswith("MemAvailable:"))
    assert abs(found - listed) < 256 * 2**20  # the same counter, read a moment apart


def test_what_a_tab_job_would_load_skips_loaded_random_and_half_built_pipelines(checkpoints, monkeypatch):
    from sdaccel.extension.host_memory import _needed_bytes, weights_bytes
    from sdaccel.optim.run import cache as cache_module
    from sdaccel.optim.spec.model_ref import ModelRef
    from sdaccel.optim.spec.pipeline import PipelineSpec

    cache = cache_module.PipelineCache(max_entries=2)
    monkeypatch.setattr(cache_module, "default_cache", lambda: cache)
    sd15 = PipelineSpec(model=checkpoints.get("sd15"))
    turbo = PipelineSpec(model=checkpoints.get("sd-turbo"))
    synthetic = PipelineSpec(model=ModelRef.synthetic("sd15"))
    full = weights_bytes(sd15.model.path) + weights_bytes(turbo.model.path)
    assert _needed_bytes([sd15, turbo, synthetic], "cpu") == full > 0  # random weights are no file to size
    cache.prepare(sd15)
    assert _needed_bytes([sd15, turbo], "cpu") == weights_bytes(turbo.model.path)  # already loaded: nothing
    for entry in cache.entries():
        entry.spec = None  # what a failed LoRA merge leaves behind: not an error, just not "loaded"
    assert _needed_bytes([sd15, turbo], "cpu") == full
