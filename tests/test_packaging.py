"""The pack imports cleanly without a host, the engine stays host-free, and the docs match CI."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HOST_MODULES = ("comfy", "comfy_extras", "folder_paths", "server", "execution", "modules", "launch", "gradio",
                "webui")


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("folder", ["optim", "cpukernels"])
def test_engine_imports_no_host(folder):
    files = sorted((ROOT / folder).rglob("*.py"))
    if folder == "optim":
        assert files
    for path in files:
        bad = _imports(path) & set(HOST_MODULES)
        assert not bad, f"{path.relative_to(ROOT)} imports host module(s) {sorted(bad)}"


def test_inside_the_pack_imports_are_relative():
    for path in list((ROOT / "optim").rglob("*.py")) + list((ROOT / "nodes").rglob("*.py")) + [ROOT / "__init__.py"]:
        bad = _imports(path) & {"optim", "nodes", "cpukernels", "kernels", "webui", "sdaccel"}
        assert not bad, f"{path.relative_to(ROOT)} uses an absolute import of the pack ({sorted(bad)})"


def test_pack_imports_without_comfyui_and_does_no_work_at_import():
    code = ("import sys, sdaccel; "
            "assert isinstance(sdaccel.NODE_CLASS_MAPPINGS, dict) and sdaccel.WEB_DIRECTORY == './js'; "
            "import sdaccel.optim.spec.pipeline, sdaccel.optim.run.sampler, sdaccel.optim.cli; "
            "heavy = [m for m in ('comfy', 'gradio', 'diffusers', 'transformers') if m in sys.modules]; "
            "print(heavy)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd="/")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", proc.stdout  # diffusers/transformers load on first use, not at import


def test_readme_has_exactly_the_two_commands_and_ci_runs_the_test_one():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for name in ("setup-and-bench", "setup-and-test"):
        out = subprocess.run([sys.executable, str(ROOT / ".ci" / "readme_command.py"), name], capture_output=True,
                             text=True, check=True).stdout.strip()
        assert out.startswith("python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0")
    bench = subprocess.run([sys.executable, str(ROOT / ".ci" / "readme_command.py"), "setup-and-bench"],
                           capture_output=True, text=True, check=True).stdout
    assert "python -m sdaccel bench --family sd15" in bench
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "readme_command.py setup-and-test" in ci and 'bash -euo pipefail -c "$TEST_CMD"' in ci
    assert readme.count("<!-- setup-and-") == 2


def test_requirements_do_not_pin_torch_for_hosts():
    reqs = (ROOT / "requirements.txt").read_text(encoding="utf-8")
    assert not any(line.strip().startswith("torch") for line in reqs.splitlines())
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    for extra in ("dev", "openvino", "gradio"):
        assert f"\n{extra} = [" in pyproject


def test_kernels_import_torch_and_the_standard_library_only():
    import sys as _sys

    allowed = {"torch", "__future__"} | set(getattr(_sys, "stdlib_module_names", ()))
    for path in sorted((ROOT / "cpukernels").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level > 1:
                raise AssertionError(f"{path.name} reaches outside cpukernels/ ({'.' * node.level}{node.module})")
        assert _imports(path) <= allowed, f"{path.name}: {sorted(_imports(path) - allowed)}"


def test_no_top_level_folder_of_the_checkout_shadows_an_installed_package():
    """`python -m pytest` (or any `python -m`) run in the checkout puts it first on sys.path: a folder there named
    like an installed package is imported in that package's place (transformers 5.25 imports Hugging Face's
    `kernels`, which a folder of ours named so once hid, breaking every diffusers import)."""
    from importlib.metadata import packages_distributions

    ours = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()} | {p.stem for p in ROOT.glob("*.py")}
    clashes = {name: packages_distributions()[name] for name in ours if name in packages_distributions()}
    assert not clashes, f"top-level names of the checkout that installed distributions also provide: {clashes}"


def test_every_package_folder_is_in_the_distribution():
    """`pip install .` copies only the packages pyproject names: a folder with an `__init__.py` left out is
    missing from a wheel install (the editable install used in development finds it anyway)."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
                 ["packages"])
    skip = {"tests", "build", "tools", "example_workflows", "results", "js", "scripts"}
    folders = {".".join(("sdaccel",) + p.parent.relative_to(ROOT).parts) for p in ROOT.rglob("__init__.py")
               if not any(part.startswith(".") or part in skip or part.endswith(".egg-info")
                          for part in p.relative_to(ROOT).parts)}
    assert folders - listed == set(), f"package folders pyproject.toml does not list: {sorted(folders - listed)}"
    assert listed - folders == set(), f"listed packages with no folder: {sorted(listed - folders)}"
