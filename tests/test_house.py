"""The engine's house rules: specs import no torch, no import circles, the engine never imports `testing`,
and every technique has a public `apply_<technique>(pipe, config)` whose example runs."""

from __future__ import annotations

import ast
import doctest
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OPTIM = ROOT / "optim"
UNITS = ("precision", "attention", "channels_last", "winograd", "deepcache", "freeu", "vae", "offload", "compile")


def _imports_after(code: str) -> dict:
    """Run `code` in a fresh interpreter and report which heavy libraries it imported."""
    probe = code + "\nimport json, sys\nprint(json.dumps({m: m in sys.modules for m in " \
                   "('torch', 'diffusers', 'transformers', 'sdaccel.optim.core.registry')}))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, cwd=ROOT.parent)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_building_specs_imports_no_torch():
    loaded = _imports_after(
        "from sdaccel.optim.spec import PipelineSpec, GenerationRequest, EnsembleSpec\n"
        "from sdaccel.optim.units.deepcache import DeepCacheConfig\n"
        "from sdaccel.optim.units.compile import CompileConfig\n"
        "from sdaccel.optim.spec.optimization import check_conflicts\n"
        "spec = PipelineSpec.for_model('a.safetensors').with_optimization(DeepCacheConfig())\n"
        "spec = PipelineSpec.from_json(spec.to_json())\n"
        "ens = EnsembleSpec.for_models(spec, 'refiner.safetensors').with_optimization(CompileConfig())\n"
        "check_conflicts(ens.base.optimizations)\n"
        "GenerationRequest(prompt='x', steps=4)")
    assert loaded == {"torch": False, "diffusers": False, "transformers": False,
                      "sdaccel.optim.core.registry": False}


def test_listing_presets_and_the_comfyui_node_list_import_no_torch():
    loaded = _imports_after(
        "import contextlib, io\n"
        "from sdaccel.optim.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
        "    assert main(['bench', '--list-presets']) == 0\n"
        "assert 'baseline' in out.getvalue()\n"
        "import sdaccel\n"
        "assert 'SDAccelDeepCache' in sdaccel.NODE_CLASS_MAPPINGS\n"
        "sdaccel.NODE_CLASS_MAPPINGS['SDAccelDeepCache'].INPUT_TYPES()")
    assert not loaded["torch"] and not loaded["diffusers"] and not loaded["transformers"]


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = ["sdaccel", *rel.parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _top_level_imports(path: Path) -> set[str]:
    """Pack modules `path` imports when it is imported (function-local imports left out)."""
    tree = ast.parse(path.read_text())
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in tree.body:
        if isinstance(node, ast.If):  # `if TYPE_CHECKING:` imports never run
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("sdaccel"):
                out.add(target)
                out.update(f"{target}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("sdaccel"))
    return out


def _graph() -> dict[str, set[str]]:
    files = [p for p in ROOT.glob("**/*.py") if ".venv" not in p.parts and "tests" not in p.parts
             and p.relative_to(ROOT).parts[0] in ("optim", "cpukernels", "nodes")]
    modules = {_module_name(p): p for p in files}
    # a module's own parent packages are always imported before it: `from . import host` is not a circle
    return {name: {t for t in _top_level_imports(path) if t in modules and not name.startswith(t + ".")}
            for name, path in modules.items()}


def test_no_module_imports_itself_through_a_circle():
    graph = _graph()
    state: dict[str, int] = {}

    def visit(node, trail):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                pytest.fail("import circle: " + " -> ".join(trail[trail.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_the_engine_never_imports_the_testing_package():
    """Only the bench, the CLI (both front doors for random-weight models) and `testing` itself may."""
    allowed = ("sdaccel.optim.testing", "sdaccel.optim.bench", "sdaccel.optim.cli")
    offenders = []
    for path in OPTIM.glob("**/*.py"):
        name = _module_name(path)
        if name.startswith(allowed):
            continue
        text = path.read_text()
        tree = ast.parse(text)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and "testing" in node.module.split("."):
                offenders.append(f"{name}: from {'.' * node.level}{node.module}")
    assert not offenders, offenders


def test_synthetic_weights_need_enabling_with_a_clear_error():
    out = subprocess.run([sys.executable, "-c",
                          "from sdaccel.optim.models.loader import load_model\n"
                          "from sdaccel.optim.spec.model_ref import ModelRef\n"
                          "from sdaccel.optim.spec.errors import ConfigError\n"
                          "try:\n    load_model(ModelRef.synthetic('sd15', tiny=True))\n"
                          "except ConfigError as exc:\n    print(exc)\n"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT.parent)
    assert "ModelRef.path" in out.stdout and "enable_synthetic()" in out.stdout, out.stdout + out.stderr


@pytest.mark.parametrize("unit", [u for u in UNITS if u != "compile"])
def test_every_technique_has_a_public_apply_with_a_runnable_example(unit):
    module = importlib.import_module(f"sdaccel.optim.units.{unit}")
    helper = getattr(module, f"apply_{unit}")
    finder = doctest.DocTestFinder()
    tests = [t for t in finder.find(helper, f"apply_{unit}", module=module) if t.examples]
    assert tests, f"apply_{unit} has no example"
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for test in tests:
        runner.run(test)
    assert runner.failures == 0 and runner.tries >= 4


def test_public_apply_fills_in_the_context_and_refuses_the_wrong_order():
    from sdaccel.optim.core.patching import installed
    from sdaccel.optim.spec.errors import ConfigError, ConflictError
    from sdaccel.optim.testing import build_pipeline
    from sdaccel.optim.units.channels_last import ChannelsLastConfig, apply_channels_last
    from sdaccel.optim.units.compile import CompileConfig, apply_compile
    from sdaccel.optim.units.freeu import apply_freeu
    from sdaccel.optim.units.offload import OffloadConfig, apply_offload

    pipe = build_pipeline("sd2-base", tiny=True)
    freeu = apply_freeu(pipe)
    assert freeu.info["config"].kind == "freeu" and list(installed(pipe)) == ["freeu"]
    with pytest.raises(ConfigError, match="channels_last must be applied before freeu"):
        apply_channels_last(pipe, ChannelsLastConfig())
    freeu.remove()
    offload = apply_offload(pipe, OffloadConfig(mode="staged"))
    with pytest.raises(ConflictError, match="offload"):
        apply_compile(pipe, CompileConfig())
    offload.remove()
    with pytest.raises(ConfigError, match="expected an optimization config"):
        apply_channels_last(pipe, "channels_last")
    assert not installed(pipe)


@pytest.mark.parametrize("family, expected", [("sd15", "sd15"), ("taiyi", "taiyi"), ("sd2-base", "sd2-base"),
                                              ("sd21-v", "sd21-v"), ("sdxl-base", "sdxl-base"),
                                              ("sdxl-refiner", "sdxl-refiner")])
def test_the_family_of_a_pipeline_is_read_from_its_components(family, expected):
    from sdaccel.optim.models.detect import family_of_pipeline
    from sdaccel.optim.testing import build_pipeline

    assert family_of_pipeline(build_pipeline(family, tiny=True)).name == expected
