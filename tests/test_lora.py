"""LoRAs: kohya/A1111 and diffusers/PEFT files merged as diffusers' own loader merges them (the reference: its
`load_lora_weights` + `fuse_lora`, a separate implementation), several at once with a strength each, switched
and removed without reading the checkpoint again and back to the exact loaded weights, under the units, and
bad files named with the fix while the pipeline keeps working."""

from __future__ import annotations

import pytest
import torch
from sdaccel.optim.lora.merge import set_loras
from sdaccel.optim.run.sampler import run
from sdaccel.optim.spec.errors import CheckpointError, ConfigError
from sdaccel.optim.spec.lora import LoraRef
from sdaccel.optim.spec.pipeline import GenerationRequest, PipelineSpec
from sdaccel.optim.testing.lora import kohya_unet_lora, random_lora, random_lycoris
from sdaccel.optim.testing.random_weights import build_pipeline

REQUEST = GenerationRequest(prompt="a lighthouse", negative_prompt="blurry", width=64, height=64, steps=2, seed=3)
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


def weights(pipe) -> dict:
    return {f"{c}.{k}": v.detach().clone() for c in COMPONENTS if getattr(pipe, c, None) is not None
            for k, v in getattr(pipe, c).state_dict().items()}


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def reference(family: str, files_and_strengths) -> dict:
    """The same LoRAs merged by diffusers' own loader (PEFT), into a fresh copy of the same random pipeline."""
    pytest.importorskip("peft")
    pipe = build_pipeline(family, tiny=True, seed=0)
    names = []
    for i, (path, _) in enumerate(files_and_strengths):
        pipe.load_lora_weights(str(path), adapter_name=f"l{i}")
        names.append(f"l{i}")
    pipe.set_adapters(names, adapter_weights=[s for _, s in files_and_strengths])
    pipe.fuse_lora(components=[c for c in COMPONENTS if getattr(pipe, c, None) is not None], lora_scale=1.0,
                   adapter_names=names)
    pipe.unload_lora_weights()
    return weights(pipe)


@pytest.mark.parametrize("family, fmt", [("sd15", "kohya"), ("sd15", "peft"), ("sdxl-base", "kohya"),
                                         ("sdxl-base", "ldm"), ("sd2-base", "kohya"), ("sd21-v", "peft")])
def test_merged_weights_equal_diffusers_own_loader(tmp_path, family, fmt):
    path = random_lora(build_pipeline(family, tiny=True, seed=0), tmp_path / f"{fmt}.safetensors", fmt=fmt,
                       alpha=None if fmt == "peft" else 2.0)
    pipe = build_pipeline(family, tiny=True, seed=0)
    loaded = weights(pipe)
    state = set_loras(pipe, (LoraRef(str(path), 0.7),), None)
    merged = weights(pipe)
    expected = reference(family, [(path, 0.7)])
    assert max_difference(merged, loaded) > 1e-3  # the LoRA changed the weights ...
    assert max_difference(merged, expected) < 2e-6  # ... as diffusers merges it
    adapted = {k for k in merged if not torch.equal(merged[k], loaded[k])}
    assert any(k.startswith("unet.") for k in adapted) and any(k.startswith("text_encoder.") for k in adapted)
    if family == "sdxl-base":
        assert any(k.startswith("text_encoder_2.") for k in adapted)
    assert state.lines[0].startswith(f"LoRA {path.name} x0.7:")


def test_original_layer_names_merge_like_diffusers_names(tmp_path):
    """The same factors named in the original layout (`lora_unet_input_blocks_1_1_...`, as kohya's SDXL LoRAs
    and some SD 1.x ones are) and in diffusers' layout give the same weights (diffusers' loader maps the
    original names for SDXL only: checked against it above)."""
    base = build_pipeline("sd15", tiny=True, seed=0)
    by_ldm = random_lora(base, tmp_path / "ldm.safetensors", fmt="ldm", seed=4)
    by_diffusers = random_lora(base, tmp_path / "kohya.safetensors", fmt="kohya", seed=4)
    assert any("input_blocks" in key for key in _keys(by_ldm)) and not any("down_blocks" in k for k in _keys(by_ldm))
    merged = []
    for path in (by_ldm, by_diffusers):
        pipe = build_pipeline("sd15", tiny=True, seed=0)
        set_loras(pipe, (LoraRef(str(path), 0.9),), None)
        merged.append(weights(pipe))
    assert max_difference(*merged) == 0 and max_difference(merged[0], weights(base)) > 1e-3


def test_taiyi_takes_a_unet_lora_and_names_what_does_not_fit(tmp_path):
    """Taiyi's UNet is SD 1.x's, its text encoder a Chinese BERT: a UNet LoRA merges as diffusers merges it; one
    that also adapts CLIP's text encoder is refused naming the layers it lacks, nothing merged."""
    taiyi = build_pipeline("taiyi", tiny=True, seed=0)
    unet_only = tmp_path / "unet-only.safetensors"
    kohya_unet_lora(taiyi.unet, unet_only, seed=3)
    loaded = weights(taiyi)
    set_loras(taiyi, (LoraRef(str(unet_only), 0.9),), None)
    merged = weights(taiyi)
    assert max_difference(merged, reference("taiyi", [(unet_only, 0.9)])) < 2e-6
    assert {k.split(".")[0] for k in merged if not torch.equal(merged[k], loaded[k])} == {"unet"}
    with_clip = random_lora(build_pipeline("sd15", tiny=True, seed=0), tmp_path / "sd15.safetensors")
    fresh = build_pipeline("taiyi", tiny=True, seed=0)
    with pytest.raises(CheckpointError, match="does not fit this model") as error:
        set_loras(fresh, (LoraRef(str(with_clip)),), None)
    assert "sd15.safetensors" in str(error.value)
    assert max_difference(weights(fresh), loaded) == 0


def _expected_lycoris(weight, factors: dict, alpha, strength: float):
    """The LyCORIS definitions written out longhand: LoHa's Hadamard product of two low-rank products, LoKr's
    Kronecker product (block by block), Tucker cores contracted one factor at a time."""
    f = {k: v.double() for k, v in factors.items()}

    def tucker(t, a, b):  # (r, r, kh, kw), (r, out), (r, in) -> (out, in, kh, kw)
        core = torch.tensordot(a, t, dims=([0], [0]))  # (out, r, kh, kw)
        return torch.tensordot(core, b, dims=([1], [0])).permute(0, 3, 1, 2)

    if "hada_w1_a" in f:
        rank = f["hada_w1_b"].shape[0]
        if "hada_t1" in f:
            product = tucker(f["hada_t1"], f["hada_w1_a"], f["hada_w1_b"]) * \
                tucker(f["hada_t2"], f["hada_w2_a"], f["hada_w2_b"])
        else:
            product = (f["hada_w1_a"] @ f["hada_w1_b"]) * (f["hada_w2_a"] @ f["hada_w2_b"])
    else:
        rank = f["lokr_w2_b"].shape[0]
        w1 = f["lokr_w1"]
        w2 = tucker(f["lokr_t2"], f["lokr_w2_a"], f["lokr_w2_b"]) if "lokr_t2" in f else \
            (f["lokr_w2_a"] @ f["lokr_w2_b"]).reshape(f["lokr_w2_a"].shape[0], -1, *weight.shape[2:])
        c, d = w2.shape[:2]
        product = torch.zeros(w1.shape[0] * c, w1.shape[1] * d, *w2.shape[2:], dtype=torch.float64)
        for i in range(w1.shape[0]):
            for j in range(w1.shape[1]):
                product[i * c:(i + 1) * c, j * d:(j + 1) * d] = w1[i, j] * w2
    change = product.reshape(weight.shape) * (alpha / rank if alpha is not None else 1.0)
    return weight.double() + strength * change


@pytest.mark.parametrize("kind, tucker", [("loha", False), ("loha", True), ("lokr", False), ("lokr", True)])
def test_lycoris_loha_and_lokr_merge_as_lycoris_defines_them(tmp_path, kind, tucker):
    from safetensors import safe_open

    base = build_pipeline("sd15", tiny=True, seed=0)
    path = random_lycoris(base, tmp_path / f"{kind}.safetensors", kind=kind, tucker=tucker, seed=5)
    loaded = weights(base)
    state = set_loras(base, (LoraRef(str(path), 0.6),), None)
    merged = weights(base)
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
        layers = {}
        for key in keys:
            layer, _, role = key.partition(".")
            layers.setdefault(layer, {})[role] = f.get_tensor(key).float()
    assert any(".hada_t1" in k or ".lokr_t2" in k for k in keys) == tucker
    by_kohya = {("unet." if k.startswith("unet.") else "") + k: k for k in merged}
    checked = 0
    for name, module in [(f"unet.{n}", m) for n, m in base.unet.named_modules()] + \
            [(f"text_encoder.{n}", m) for n, m in base.text_encoder.named_modules()]:
        component, _, path_in = name.partition(".")
        prefix = "lora_unet_" if component == "unet" else "lora_te_"
        if component != "unet" and not path_in.startswith("text_model."):  # transformers 5 dropped the wrapper
            path_in = "text_model." + path_in
        kohya = prefix + path_in.replace(".", "_")
        if kohya not in layers:
            continue
        factors = {role: v for role, v in layers[kohya].items() if role != "alpha"}
        alpha = float(layers[kohya]["alpha"]) if "alpha" in layers[kohya] else None
        expected = _expected_lycoris(loaded[f"{name}.weight"], factors, alpha, 0.6)
        assert float((merged[f"{name}.weight"].double() - expected).abs().max()) < 1e-5, name
        checked += 1
    assert checked == len(layers) and by_kohya
    assert any(module.kernel_size == (3, 3) for module in base.unet.modules() if isinstance(module, torch.nn.Conv2d))
    assert f"LyCORIS {'LoHa' if kind == 'loha' else 'LoKr'}" in state.lines[0]
    set_loras(base, (), state)  # removed: the loaded weights, bit for bit
    assert max_difference(weights(base), loaded) == 0


def _keys(path) -> list:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return list(f.keys())


def test_two_loras_at_once_each_with_its_strength(tmp_path):
    base = build_pipeline("sd15", tiny=True, seed=0)
    first = random_lora(base, tmp_path / "a.safetensors", seed=1)
    second = random_lora(base, tmp_path / "b.safetensors", fmt="peft", seed=2, alpha=None)
    pipe = build_pipeline("sd15", tiny=True, seed=0)
    set_loras(pipe, (LoraRef(str(first), 0.8), LoraRef(str(second), -0.5)), None)
    assert max_difference(weights(pipe), reference("sd15", [(first, 0.8), (second, -0.5)])) < 2e-6


def test_switching_and_removing_restores_the_exact_weights_without_reading_the_checkpoint(checkpoints, cache,
                                                                                           tmp_path):
    model = checkpoints.get("sd15")
    path = random_lora(checkpoints.pipeline("sd15"), tmp_path / "style.safetensors")
    spec = PipelineSpec(model=model)
    plain = run(spec, REQUEST, cache=cache).images[0]
    loaded = weights(cache.prepare(spec).pipe)
    strong = run(spec.with_(loras=(LoraRef(str(path), 1.0),)), REQUEST, cache=cache)
    weak = run(spec.with_(loras=(LoraRef(str(path), 0.3),)), REQUEST, cache=cache).images[0]
    assert strong.images[0] != plain and weak not in (plain, strong.images[0])
    assert any(note.startswith("LoRA style.safetensors x1:") for note in strong.stats.notes), strong.stats.notes
    assert any("LoRAs merged in" in note for note in strong.stats.notes)
    again = run(spec, REQUEST, cache=cache).images[0]
    assert again == plain and cache.loads == 1  # the loaded weights again, and the checkpoint read once
    unloaded = weights(cache.prepare(spec).pipe)
    assert all(torch.equal(unloaded[k], loaded[k]) for k in loaded)  # bit for bit
    back = run(spec.with_(loras=(LoraRef(str(path), 0.3),)), REQUEST, cache=cache).images[0]
    assert back == weak


@pytest.mark.parametrize("kind, fields", [("channels_last", {}), ("winograd", {"tile": "f2", "vae": False}),
                                          ("precision", {"unet": "bf16"}), ("offload", {"mode": "staged"}),
                                          ("offload", {"mode": "group"})])
def test_units_apply_on_the_merged_weights_in_any_order(checkpoints, cache, tmp_path, kind, fields):
    from sdaccel.optim.spec.optimization import config_class

    model = checkpoints.get("sd15")
    path = random_lora(checkpoints.pipeline("sd15"), tmp_path / "style.safetensors")
    lora = (LoraRef(str(path), 1.0),)
    unit = config_class(kind)(**fields)
    with_lora = run(PipelineSpec(model=model, loras=lora), REQUEST, cache=cache)
    lora_then_unit = run(PipelineSpec(model=model, loras=lora, optimizations=(unit,)), REQUEST, cache=cache)
    unit_alone = run(PipelineSpec(model=model, optimizations=(unit,)), REQUEST, cache=cache)
    unit_then_lora = run(PipelineSpec(model=model, loras=lora, optimizations=(unit,)), REQUEST, cache=cache)
    assert unit_then_lora.images[0] == lora_then_unit.images[0]  # the same pipeline whichever came first
    assert unit_alone.images[0] != lora_then_unit.images[0]  # the unit did not drop the LoRA
    if kind != "precision":  # lossless units: the LoRA image itself
        import numpy as np

        a = np.asarray(with_lora.images[0], dtype=np.int16)
        b = np.asarray(lora_then_unit.images[0], dtype=np.int16)
        assert np.abs(a - b).max() <= 2


def test_cli_lora_argument(tmp_path, checkpoints):
    from sdaccel.optim.cli import main

    model = checkpoints.get("sd15")
    path = random_lora(checkpoints.pipeline("sd15"), tmp_path / "style.safetensors")
    out = tmp_path / "out"
    code = main(["generate", "--checkpoint", model.path, "--config-dir", model.config_dir, "--width", "64",
                 "--height", "64", "--steps", "2", "--prompt", "a fox", "--lora", f"{path}:0.6", "--out", str(out)])
    assert code == 0 and len(list(out.glob("*.png"))) == 1
    assert LoraRef.parse(f"{path}:0.6") == LoraRef(str(path), 0.6) and LoraRef.parse(str(path)).strength == 1.0
    assert LoraRef.parse(r"C:\loras\style.safetensors").path == r"C:\loras\style.safetensors"
    with pytest.raises(ConfigError, match="not a strength"):
        LoraRef.parse(f"{path}:strong")
    with pytest.raises(ConfigError, match="strength"):
        LoraRef.parse(f"{path}:40")


def test_spec_round_trips_with_its_loras(tmp_path):
    spec = PipelineSpec.for_model("x.safetensors", family="sd15").with_(loras=("a.safetensors:0.5",))
    assert spec.loras == (LoraRef("a.safetensors", 0.5),)
    assert PipelineSpec.from_json(spec.to_json()) == spec
    assert "loras" not in PipelineSpec.for_model("x.safetensors").to_dict()  # older specs read back the same


def _write(path, tensors):
    from safetensors.torch import save_file

    save_file(tensors, str(path))
    return path


def test_bad_lora_files_are_named_and_the_pipeline_keeps_working(checkpoints, cache, tmp_path):
    model = checkpoints.get("sd15")
    spec = PipelineSpec(model=model)
    plain = run(spec, REQUEST, cache=cache).images[0]
    xl = random_lora(checkpoints.pipeline("sdxl-base"), tmp_path / "xl.safetensors")
    oft = _write(tmp_path / "oft.safetensors", {"lora_unet_x.oft_blocks": torch.zeros(2, 2)})
    loha = _write(tmp_path / "loha.safetensors", {"lora_unet_x.hada_w1_a": torch.zeros(2, 2),
                                                  "lora_unet_x.hada_w1_b": torch.zeros(2, 2)})
    half = _write(tmp_path / "half.safetensors", {"lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight":
                                                  torch.zeros(2, 4, 3, 3)})
    cases = [(xl, "made for SDXL"), (oft, "LyCORIS OFT file"), (loha, "without all their factors"),
             (half, "without all their factors"),
             (tmp_path / "missing.safetensors", "does not exist"), (model.path, "full model checkpoint, not a LoRA")]
    for path, message in cases:
        with pytest.raises(CheckpointError, match=message) as error:
            run(spec.with_(loras=(LoraRef(str(path)),)), REQUEST, cache=cache)
        assert str(path) in str(error.value)
    assert run(spec, REQUEST, cache=cache).images[0] == plain  # nothing half-merged
    good = random_lora(checkpoints.pipeline("sd15"), tmp_path / "good.safetensors")
    with pytest.raises(CheckpointError, match="made for SDXL"):  # a good one beside a bad one: neither merged
        run(spec.with_(loras=(LoraRef(str(good)), LoraRef(str(xl)))), REQUEST, cache=cache)
    assert run(spec, REQUEST, cache=cache).images[0] == plain


@pytest.mark.parametrize("prompt, clean, tags", [
    ("a fox <lora:ink:0.8>, snow", "a fox, snow", [("ink", 0.8)]),
    ("<lora:ink>a fox", "a fox", [("ink", 1.0)]),
    ("a fox <lora:ink:0.5:0.2> <lora:paper:-1>", "a fox", [("ink", 0.5), ("paper", -1.0)]),
    ("a fox", "a fox", []),
])
def test_a1111_prompt_tags(prompt, clean, tags):
    from sdaccel.optim.lora.prompt import split_lora_tags

    assert split_lora_tags(prompt) == (clean, tags)


def test_a1111_prompt_tag_with_a_bad_strength_and_finding_files(tmp_path):
    from sdaccel.optim.lora.prompt import find_lora, split_lora_tags

    with pytest.raises(ConfigError, match="where a strength goes"):
        split_lora_tags("a fox <lora:ink:strong>")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "ink.safetensors").write_bytes(b"x")
    (tmp_path / "ink.txt").write_text("notes")
    assert find_lora("ink", [tmp_path]) == tmp_path / "sub" / "ink.safetensors"
    assert find_lora("ink.safetensors", [tmp_path / "missing", tmp_path]) == tmp_path / "sub" / "ink.safetensors"
    assert find_lora("paper", [tmp_path]) is None


def test_the_web_ui_picker_lists_the_folder_and_writes_the_tag(tmp_path):
    from sdaccel.optim.lora.prompt import list_loras, split_lora_tags, with_lora_tag

    (tmp_path / "sub").mkdir()
    for name in ("sub/ink.safetensors", "Paper.safetensors", "notes.txt", "ink.pt"):
        (tmp_path / name).write_bytes(b"x")
    assert list_loras([tmp_path, tmp_path / "missing"]) == ["ink", "Paper"]
    prompt = with_lora_tag("a fox", "ink", 0.7)
    assert prompt == "a fox <lora:ink:0.7>" and split_lora_tags(prompt) == ("a fox", [("ink", 0.7)])
    assert with_lora_tag(prompt, "ink", 1.0) == "a fox <lora:ink:1>"  # the same LoRA again: its strength changes
    assert with_lora_tag("", "Paper", -0.5) == "<lora:Paper:-0.5>"
    with pytest.raises(ConfigError, match="LoRA: none picked"):
        with_lora_tag("a fox", "", 1.0)
