"""Every family loads offline from the layouts users hold, bit-exact, with the family detected."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch
from conftest import ALL_FAMILIES
from sdaccel.optim.models.loader import load_model
from sdaccel.optim.spec.errors import CheckpointError
from sdaccel.optim.spec.model_ref import ModelRef

LAYOUTS = [("single", "float32", ".safetensors"), ("single", "float16", ".safetensors"),
           ("single", "float16", ".ckpt"), ("diffusers", "float32", "")]


def _assert_same_weights(original, loaded, stored_dtype):
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(original, name, None), getattr(loaded, name, None)
        assert (a is None) == (b is None), name
        if a is None:
            continue
        sa, sb = a.state_dict(), b.state_dict()
        assert set(sa) == set(sb), (name, sorted(set(sa) ^ set(sb))[:4])
        for key, value in sa.items():
            expect = value.to(stored_dtype) if value.is_floating_point() else value
            assert sb[key].dtype == expect.dtype, (name, key)
            assert torch.equal(sb[key], expect), (name, key)


@pytest.mark.parametrize("layout, dtype, suffix", LAYOUTS, ids=lambda v: str(v))
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_every_family_loads_bit_exact_from_every_layout(checkpoints, family, layout, dtype, suffix, no_network):
    ref = checkpoints.get(family, layout, dtype, suffix)
    loaded = load_model(ref)
    assert loaded.family.name == family
    assert loaded.format == {"single": "pickle" if suffix == ".ckpt" else "safetensors"}.get(layout, "diffusers")
    _assert_same_weights(checkpoints.pipeline(family), loaded.pipe, getattr(torch, dtype))
    assert no_network == []


def test_taiyi_text_encoder_comes_from_cond_stage_model_keys(checkpoints):
    from safetensors import safe_open
    from transformers import BertModel

    ref = checkpoints.get("taiyi")
    with safe_open(ref.path, "pt") as f:
        keys = list(f.keys())
        word_emb = f.get_tensor("cond_stage_model.transformer.embeddings.word_embeddings.weight")
    assert not any(k.startswith("cond_stage_model.transformer.text_model") for k in keys)
    loaded = load_model(ref)
    te = loaded.pipe.text_encoder
    assert isinstance(te, BertModel) and te.config.vocab_size == 21128
    assert torch.equal(te.embeddings.word_embeddings.weight, word_emb)
    ids = loaded.pipe.tokenizer("长城, 清晨, 朦胧, 唯美, 插画").input_ids
    assert loaded.pipe.tokenizer.unk_token_id not in ids and len(ids) == 16


@pytest.mark.parametrize("family, auto_family", [("sd21-v", "sd2-base"), ("sd-turbo", "sd2-base"),
                                                 ("sdxl-turbo", "sdxl-base")])
def test_ambiguous_families_log_the_assumption_and_accept_an_override(checkpoints, caplog, tmp_path, family,
                                                                       auto_family):
    ref = checkpoints.get(family)
    neutral = tmp_path / "model.safetensors"  # no "turbo" in the name: only the weights speak
    shutil.copy(ref.path, neutral)
    ref = ref.with_(path=str(neutral))
    with caplog.at_level(logging.INFO, logger="sdaccel"):
        auto = load_model(ref.with_(family="auto"))
    assert auto.family.name == auto_family and auto.assumed
    assert "assumed" in caplog.text and auto_family in caplog.text
    assert load_model(ref).family.name == family


def test_sd2_v_prediction_is_detected_from_weight_statistics(checkpoints, tmp_path):
    """ComfyUI's statistic: a spread-out norm bias in the last output block means a 768-v model."""
    from safetensors.torch import load_file, save_file

    ref = checkpoints.get("sd2-base")
    sd = load_file(ref.path)
    key = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"
    sd[key] = torch.linspace(-0.5, 0.5, sd[key].numel())
    path = tmp_path / "sd21-768.safetensors"
    save_file(sd, str(path))
    loaded = load_model(ModelRef(path=str(path), config_dir=ref.config_dir))
    assert loaded.family.name == "sd21-v" and loaded.prediction_type == "v_prediction"
    assert loaded.scheduler_config["prediction_type"] == "v_prediction"


def test_turbo_is_read_from_the_file_name_and_from_diffusers_scheduler_configs(checkpoints, tmp_path):
    ref = checkpoints.get("sdxl-base")
    renamed = tmp_path / "sd_xl_turbo_1.0_fp16.safetensors"
    shutil.copy(ref.path, renamed)
    loaded = load_model(ModelRef(path=str(renamed), config_dir=ref.config_dir))
    assert loaded.family.name == "sdxl-turbo" and loaded.scheduler_config["timestep_spacing"] == "trailing"
    folder = checkpoints.get("sd-turbo", "diffusers")
    assert load_model(folder.with_(family="auto")).family.name == "sd-turbo"
    folder_v = checkpoints.get("sd21-v", "diffusers")
    assert load_model(folder_v.with_(family="auto")).family.name == "sd21-v"


def test_prediction_type_override_reaches_the_scheduler(checkpoints):
    loaded = load_model(checkpoints.get("sd15").with_(prediction_type="v_prediction"))
    assert loaded.prediction_type == "v_prediction"
    assert loaded.pipe.scheduler.config.prediction_type == "v_prediction"


def test_legacy_sd1_clip_keys_without_text_model_level_load(checkpoints, tmp_path):
    from safetensors.torch import load_file, save_file

    ref = checkpoints.get("sd15")
    sd = load_file(ref.path)
    prefix = "cond_stage_model.transformer.text_model."
    legacy = {(k.replace(prefix, "cond_stage_model.transformer.") if k.startswith(prefix) else k): v
              for k, v in sd.items()}
    path = tmp_path / "old.safetensors"
    save_file(legacy, str(path))
    loaded = load_model(ModelRef(path=str(path), config_dir=ref.config_dir))
    _assert_same_weights(checkpoints.pipeline("sd15"), loaded.pipe, torch.float32)


def test_a_missing_tokenizer_folder_fails_loudly(checkpoints, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(checkpoints.get("sd15", "diffusers").path, folder)
    shutil.rmtree(folder / "tokenizer")
    with pytest.raises(CheckpointError, match=r"tokenizer.*missing.*Copy the tokenizer folder"):
        load_model(ModelRef(path=str(folder)))


def test_a_wrong_tokenizer_is_refused(checkpoints, tmp_path):
    import json

    from sdaccel.optim.models.families import TOKENIZERS_DIR

    folder = tmp_path / "model"
    shutil.copytree(checkpoints.get("sd15", "diffusers").path, folder)
    tok_dir = folder / "tokenizer"
    (tok_dir / "tokenizer.json").unlink(missing_ok=True)
    vocab = json.loads((TOKENIZERS_DIR / "clip" / "vocab.json").read_text(encoding="utf-8"))
    small = dict(list(vocab.items())[:1000])
    small.update({"<|startoftext|>": 1000, "<|endoftext|>": 1001})
    (tok_dir / "vocab.json").write_text(json.dumps(small), encoding="utf-8")
    (tok_dir / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    with pytest.raises(CheckpointError, match="tokens instead of 49408"):
        load_model(ModelRef(path=str(folder)))


def test_weights_missing_from_the_file_are_refused_not_left_random(checkpoints, tmp_path):
    from safetensors.torch import load_file, save_file

    ref = checkpoints.get("sd15")
    sd = load_file(ref.path)
    dropped = [k for k in sd if k.startswith("model.diffusion_model.output_blocks.5.")]
    for k in dropped:
        del sd[k]
    path = tmp_path / "partial.safetensors"
    save_file(sd, str(path))
    with pytest.raises(CheckpointError, match="partial.safetensors.*(missing|do not fit)"):
        load_model(ModelRef(path=str(path), config_dir=ref.config_dir))


def test_config_dir_must_hold_every_component(checkpoints, tmp_path):
    ref = checkpoints.get("sd15")
    bad = tmp_path / "cfg"
    shutil.copytree(ref.config_dir, bad)
    shutil.rmtree(bad / "vae")
    with pytest.raises(CheckpointError, match="vae/config.json"):
        load_model(ref.with_(config_dir=str(bad)))


def test_a_config_folder_beside_the_checkpoint_is_used(checkpoints, caplog):
    ref = checkpoints.get("sd15")  # the fixture writes <file>.config beside each tiny checkpoint
    with caplog.at_level(logging.INFO, logger="sdaccel"):
        loaded = load_model(ref.with_(config_dir=""))
    assert loaded.pipe.unet.config.block_out_channels == [32, 32, 64, 64]
    assert "architecture configs beside it" in caplog.text
