"""The web UI's form -> spec rules and its checkpoint list, without a browser (the page itself: test_webui_ui.py)."""

from __future__ import annotations

import json

import pytest
from sdaccel.optim.spec.ensemble import EnsembleSpec
from sdaccel.optim.spec.errors import ConfigError
from sdaccel.webui.catalog import ModelCatalog
from sdaccel.webui.form import NO_REFINER, build_job
from sdaccel.webui.session import WebSession


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "a.safetensors").write_bytes(b"x")
    (tmp_path / "a.safetensors.config" / "unet").mkdir(parents=True)
    (tmp_path / "a.safetensors.config" / "model_index.json").write_text("{}")  # a sidecar, not a model
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.ckpt").write_bytes(b"x")
    (tmp_path / "sub" / "notes.txt").write_text("not a model")
    (tmp_path / "xl-diffusers").mkdir()
    (tmp_path / "xl-diffusers" / "model_index.json").write_text(json.dumps({"_class_name": "X"}))
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "c.safetensors").write_bytes(b"x")
    return tmp_path


def test_catalog_lists_checkpoints_and_diffusers_folders_only(folder):
    catalog = ModelCatalog([folder], extra=["synthetic:sd15"])
    assert [e.title for e in catalog.entries()] == ["a.safetensors", "sub/b.ckpt", "synthetic:sd15", "xl-diffusers"]
    assert catalog.find("sub_b").title == "sub/b.ckpt"  # A1111's model_name
    assert catalog.find("a [deadbeef]").path == str(folder / "a.safetensors")  # a title with A1111's hash
    with pytest.raises(ConfigError, match="sd_model_checkpoint: no checkpoint named 'zzz'.*known: a.safetensors"):
        catalog.find("zzz")
    (folder / "new.safetensors").write_bytes(b"x")  # listed afresh on every call
    assert "new.safetensors" in [e.title for e in catalog.entries()]


def test_session_without_checkpoints_says_where_to_put_them(tmp_path):
    session = WebSession(ModelCatalog([tmp_path]))
    try:
        with pytest.raises(ConfigError, match="no checkpoint found.*--models"):
            session.selected
    finally:
        session.close()


def _form(items=None):
    form = {("model", "checkpoint"): "a.safetensors", ("model", "family"): "auto",
            ("request", "prompt"): "a fox", ("request", "width"): 64, ("request", "height"): 64,
            ("request", "steps"): 2.0, ("request", "seed"): 5.0, ("refiner", "checkpoint"): NO_REFINER}
    form.update(items or {})
    return form


def test_form_builds_the_spec_and_request_the_controls_show(folder):
    session = WebSession(ModelCatalog([folder]))
    try:
        spec, requests, title = build_job(session, _form({
            ("opt", "channels_last", "enabled"): True, ("opt", "channels_last", "vae"): True,
            ("opt", "deepcache", "enabled"): False, ("opt", "deepcache", "cache_interval"): 5.0}))
        assert title == "a.safetensors" and spec.model.path == str(folder / "a.safetensors")
        assert spec.optimization("channels_last").vae is True and spec.optimization("deepcache") is None
        request = requests[0]
        assert (request.prompt, request.steps, request.seed, request.width) == ("a fox", 2, 5, 64)
        assert isinstance(request.steps, int)  # gradio numbers arrive as floats
        ensemble, _, _ = build_job(session, _form({("refiner", "checkpoint"): "sub/b.ckpt",
                                                     ("ensemble", "switch_at"): 0.8}))
        assert isinstance(ensemble, EnsembleSpec) and ensemble.switch_at == 0.8
        assert ensemble.refiner.model.path.endswith("b.ckpt")
        elsewhere = folder.parent / "elsewhere.safetensors"  # a typed path outside the models folder
        elsewhere.write_bytes(b"x")
        spec, _, title = build_job(session, _form({("model", "checkpoint"): str(elsewhere)}))
        assert spec.model.path == str(elsewhere) and title == str(elsewhere)
    finally:
        session.close()


@pytest.mark.parametrize("items, match", [
    ({("model", "checkpoint"): None}, "Checkpoint: none selected"),
    ({("model", "checkpoint"): "gone.safetensors"}, "Checkpoint: no checkpoint named"),
    ({("model", "checkpoint"): "/nowhere/gone.safetensors"}, "or type the full path"),
    ({("request", "width"): 65}, "width: 65 is not a multiple of 8"),
    ({("request", "steps"): 0}, "steps: 0 is below the minimum"),
    ({("opt", "winograd", "enabled"): True, ("opt", "winograd", "tile"): "f9"}, "tile: 'f9' is not one of"),
    ({("refiner", "checkpoint"): "missing.ckpt"}, "Refiner: no checkpoint named"),
])
def test_bad_form_values_name_the_control(folder, items, match):
    session = WebSession(ModelCatalog([folder]))
    try:
        with pytest.raises(ConfigError, match=match):
            build_job(session, _form(items))
    finally:
        session.close()


def test_every_control_of_the_page_has_its_own_label(folder):
    """A1111 and Forge save and restore a tab's control values keyed by "tab/label" (ui-config.json): two
    controls with one label (each unit's "Vae") would get each other's values in the host's tab."""
    gr = pytest.importorskip("gradio")
    from sdaccel.webui.blocks import build_blocks

    blocks = build_blocks(WebSession(ModelCatalog([folder])))
    labels = [block.label for block in blocks.blocks.values()
              if isinstance(block, gr.components.Component) and getattr(block, "label", None)]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    assert len(labels) > 60 and not repeated, repeated


def test_fit_to_memory_is_checked_on_the_form_and_planned_inside_the_queued_job(plan_dir):
    from sdaccel.optim.spec.model_ref import ModelRef
    from sdaccel.optim.spec.pipeline import GenerationRequest, PipelineSpec
    from sdaccel.webui.form import fit_settings
    from sdaccel.webui.service import engine_job

    assert fit_settings(_form()) is None
    on = {("plan", "enabled"): True, ("plan", "budget_gb"): 1000, ("plan", "quality"): "lossless"}
    assert fit_settings(_form(on)) == {"budget": "1000.0GB", "quality": "lossless", "tiny_vae": ""}
    with pytest.raises(ConfigError, match="Fit to memory: budget.*6GB"):
        fit_settings(_form({**on, ("plan", "budget_gb"): -2}))
    with pytest.raises(ConfigError, match="Fit to memory: quality"):
        fit_settings(_form({**on, ("plan", "quality"): "best"}))
    with pytest.raises(ConfigError, match="Fit to memory.*refiner"):
        fit_settings(_form({**on, ("refiner", "checkpoint"): "xl.safetensors"}))
    spec = PipelineSpec(model=ModelRef.synthetic("sd15", tiny=True), device="cpu")
    requests = [GenerationRequest(prompt="a fox", width=64, height=64, steps=2, seed=s) for s in (1, 2)]
    results = engine_job(spec, requests, fit=fit_settings(_form(on)))(lambda done, total: None, lambda: False)
    assert len(results) == 2
    note = next(n for n in results[0].stats.notes if n.startswith("fit to 1000.0GB: "))
    chosen = note.split(": ", 1)[1].split(",")[0]
    from sdaccel.optim.bench.presets import resolve_preset

    planned = {c.kind for c in resolve_preset(chosen).configs()}
    assert planned <= {a["kind"] for a in results[0].stats.applied} | {"precision"}
    assert not {"deepcache", "tome", "vae"} & planned  # lossless asked for
