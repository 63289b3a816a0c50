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
