"""Each bad input gets its own clear error naming the file and the fix, and runs no code."""

from __future__ import annotations

import os
import pickle
import re
import shutil
import zipfile

import pytest
import torch
from sdaccel.optim.models.loader import load_model
from sdaccel.optim.spec.errors import CheckpointError
from sdaccel.optim.spec.model_ref import ModelRef


def _load(path, **kw):
    return load_model(ModelRef(path=str(path), **kw))


def _expect(path, problem: str, fix: str, **kw):
    with pytest.raises(CheckpointError) as err:
        _load(path, **kw)
    message = str(err.value)
    assert str(path) in message
    assert problem.lower() in message.lower(), message
    assert fix.lower() in message.lower(), message
    return err.value


def test_missing_path(tmp_path):
    _expect(tmp_path / "nope.safetensors", "no such file", "check the path")


def test_folder_without_model_index(tmp_path):
    (tmp_path / "unet").mkdir()
    _expect(tmp_path, "without model_index.json", "point at the folder that holds model_index.json")


def test_truncated_safetensors(checkpoints, tmp_path):
    src = checkpoints.get("sd15")
    cut = tmp_path / "cut.safetensors"
    data = open(src.path, "rb").read()
    cut.write_bytes(data[: len(data) // 2])
    _expect(cut, "is truncated", "download the file again", config_dir=src.config_dir)


def test_text_file_renamed_safetensors(tmp_path):
    fake = tmp_path / "model.safetensors"
    fake.write_text("<html><body>404 Not Found</body></html>\n" * 20)
    _expect(fake, "text file", "download the real checkpoint")


def test_safetensors_that_is_not_a_diffusion_model(tmp_path):
    from safetensors.torch import save_file

    lora = tmp_path / "style_lora.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8),
               "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(4.0)}, str(lora))
    _expect(lora, "is a lora", "lora loader")
    other = tmp_path / "classifier.safetensors"
    save_file({"fc.weight": torch.zeros(10, 10), "fc.bias": torch.zeros(10)}, str(other))
    _expect(other, "not a stable diffusion checkpoint", "pick a full")


def test_unknown_architecture(checkpoints, tmp_path):
    from safetensors.torch import load_file, save_file

    src = checkpoints.get("sd15")
    sd = load_file(src.path)
    key = "model.diffusion_model.input_blocks.0.0.weight"
    sd[key] = torch.zeros(sd[key].shape[0], 9, 3, 3)
    inpaint = tmp_path / "inpainting.safetensors"
    save_file(sd, str(inpaint))
    _expect(inpaint, "unsupported architecture", "use a text-to-image checkpoint")
    sd = load_file(src.path)
    for k in [k for k in sd if "attn2.to_k.weight" in k or "attn2.to_v.weight" in k]:
        sd[k] = torch.zeros(sd[k].shape[0], 77)
    odd = tmp_path / "odd.safetensors"
    save_file(sd, str(odd))
    _expect(odd, "unknown architecture", "supported:")


def test_ckpt_whose_pickle_carries_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)},
                "callback": Payload()}, str(evil))
    with zipfile.ZipFile(evil) as zf:  # the payload really is in the file
        assert any(b"system" in zf.read(n) for n in zf.namelist() if n.endswith(".pkl"))
    _expect(evil, "asks to run code", "safetensors")
    assert not marker.exists()
    legacy = tmp_path / "legacy.ckpt"
    legacy.write_bytes(pickle.dumps(Payload(), protocol=2))
    _expect(legacy, "asks to run code", "safetensors")
    assert not marker.exists()


def test_family_override_that_does_not_match_the_weights(checkpoints):
    src = checkpoints.get("sd15")
    err = _expect(src.path, "does not match family 'sdxl-base'", "remove the family override",
                  family="sdxl-base", config_dir=src.config_dir)
    assert "sd15" in str(err)


def test_empty_and_garbage_files(tmp_path):
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    _expect(empty, "is empty", "download the file again")
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(bytes(range(256)) * 64)
    _expect(garbage, "not a pytorch checkpoint", "download the file again")


def test_truncated_ckpt(checkpoints, tmp_path):
    src = checkpoints.get("sd15", suffix=".ckpt", dtype="float16")
    cut = tmp_path / "cut.ckpt"
    data = open(src.path, "rb").read()
    cut.write_bytes(data[: len(data) * 2 // 3])
    _expect(cut, "damaged", "download the file again", config_dir=src.config_dir)


def test_failed_loads_leave_no_files_behind(checkpoints, tmp_path):
    src = checkpoints.get("sd15")
    folder = tmp_path / "models"
    folder.mkdir()
    cut = folder / "cut.safetensors"
    cut.write_bytes(open(src.path, "rb").read()[:5000])
    before = sorted(p.name for p in folder.iterdir())
    with pytest.raises(CheckpointError):
        _load(cut)
    assert sorted(p.name for p in folder.iterdir()) == before
    shutil.rmtree(folder)


def test_a_safetensors_file_whose_header_length_starts_with_0x80_is_not_taken_for_a_pickle(tmp_path):
    """Byte 0 of a safetensors file is the low byte of its header length: 0x80 for one valid file in 32."""
    from safetensors.torch import save_file
    from sdaccel.optim.models.checkpoint import open_checkpoint

    path = tmp_path / "weights.sft"
    for pad in range(64):
        save_file({"w": torch.zeros(2)}, str(path), metadata={"pad": "x" * pad})
        if path.read_bytes()[:1] == b"\x80":
            break
    else:
        pytest.fail("no padding gave a header length ending in 0x80")
    ck = open_checkpoint(path)
    assert list(ck.keys()) == ["w"]


def test_img2img_sources_are_checked_before_any_pixel_is_decoded(tmp_path):
    from PIL import Image
    from sdaccel.optim.run.sampler import load_image_tensor
    from sdaccel.optim.spec.errors import ConfigError

    big = tmp_path / "big.png"
    Image.new("RGB", (4608, 64)).save(big)
    with pytest.raises(ConfigError, match=r"init_image: the image .*big.png is 4608x64 pixels.*at most 4096"):
        load_image_tensor(str(big))
    with pytest.raises(ConfigError, match="4608x64"):
        load_image_tensor(Image.new("RGB", (4608, 64)))
    with pytest.raises(ConfigError, match="NaN or infinite"):
        load_image_tensor(torch.full((8, 8, 3), float("nan")))
    with pytest.raises(ConfigError, match="is not an image"):
        load_image_tensor(torch.zeros(0, 8, 3))
    assert load_image_tensor(torch.rand(64, 72, 3)).shape == (1, 3, 64, 72)


def test_decompression_bombs_are_a_clear_error(tmp_path, monkeypatch):
    from PIL import Image
    from sdaccel.optim.run.sampler import load_image_tensor
    from sdaccel.optim.spec.errors import ConfigError

    path = tmp_path / "bomb.png"
    Image.new("RGB", (300, 300)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 300x300 is then more than twice the limit
    with pytest.raises(ConfigError, match="too large to decode safely"):
        load_image_tensor(str(path))


def test_text_and_number_fields_refuse_what_they_cannot_hold():
    from sdaccel.optim.spec.errors import ConfigError
    from sdaccel.optim.spec.pipeline import GenerationRequest, PipelineSpec
    from sdaccel.optim.units.deepcache import DeepCacheConfig
    from sdaccel.optim.units.freeu import FreeUConfig

    with pytest.raises(ConfigError, match="GenerationRequest.prompt: is not valid text"):
        GenerationRequest(prompt="a cat \udcff")
    for bad in (float("inf"), float("nan")):
        with pytest.raises(ConfigError, match="DeepCacheConfig.cache_interval: expected a whole number"):
            DeepCacheConfig(cache_interval=bad)
        with pytest.raises(ConfigError, match="FreeUConfig.s1: is .*finite"):
            FreeUConfig(s1=bad)
    with pytest.raises(ConfigError, match="ModelRef: expected a mapping of field names to values, got str"):
        PipelineSpec.from_dict({"model": "x"})


def _safetensors_with_header(path, header: dict | str, data: bytes = b"\0" * 16):
    import json
    import struct

    raw = (header if isinstance(header, str) else json.dumps(header)).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


@pytest.mark.parametrize("entry, problem", [
    ({"dtype": "F32", "shape": [4], "data_offsets": ["0", "16"]}, "data_offsets"),
    ({"dtype": "ZEROS", "shape": [4], "data_offsets": [0, 16]}, "unknown dtype 'ZEROS'"),
    ({"dtype": 7, "shape": [4], "data_offsets": [0, 16]}, "unknown dtype 7"),
    ({"dtype": "F32", "shape": "4", "data_offsets": [0, 16]}, "shape"),
    ({"dtype": "F32", "shape": [4], "data_offsets": [16, 0]}, "data_offsets"),
    ("not an object", "expected an object"),
])
def test_malformed_safetensors_headers_are_checkpoint_errors(tmp_path, entry, problem):
    from sdaccel.optim.models.checkpoint import open_checkpoint

    path = _safetensors_with_header(tmp_path / "bad.safetensors", {"w": entry})
    with pytest.raises(CheckpointError, match=f"corrupt safetensors header entry for 'w'.*{re.escape(problem)}"):
        open_checkpoint(path)


def test_a_model_index_that_is_a_list_is_a_checkpoint_error(tmp_path):
    folder = tmp_path / "diffusers"
    folder.mkdir()
    (folder / "model_index.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="holds a JSON list"):
        _load(folder)


@pytest.mark.parametrize("depth_bytes", [b"[" * 200_000 + b"]" * 200_000,  # 400 000: low byte 0x80
                                         b'{"w":' + b"[" * 100_000 + b"]" * 100_000 + b"}"])
def test_a_header_nested_thousands_deep_is_a_corrupt_header(tmp_path, depth_bytes):
    from sdaccel.optim.models.checkpoint import open_checkpoint

    path = _safetensors_with_header(tmp_path / "deep.safetensors", depth_bytes.decode())
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        open_checkpoint(path)


def test_a_download_cut_inside_its_header_is_called_cut_short_not_a_text_file(checkpoints, tmp_path):
    src = open(checkpoints.get("sd15").path, "rb").read()
    cut = tmp_path / "v1-5.safetensors"
    cut.write_bytes(src[:200])  # the 8-byte length and the start of the JSON header
    error = _expect(cut, "is truncated", "download the file again")
    assert "text file" not in str(error)


@pytest.mark.parametrize("protocol", ["zip", 2])
def test_a_pytorch_checkpoint_renamed_safetensors_is_read_by_its_content(tmp_path, protocol):
    """torch.load given the path would read a `.safetensors` name as safetensors and fail in Rust."""
    from sdaccel.optim.models.checkpoint import open_checkpoint

    path = tmp_path / "model.safetensors"
    weights = {"w": torch.arange(6.0).reshape(2, 3)}
    if protocol == "zip":
        torch.save(weights, path)
    else:
        torch.save(weights, path, _use_new_zipfile_serialization=False, pickle_protocol=protocol)
    opened = open_checkpoint(path)
    assert opened.format == "pickle" and torch.equal(opened.read()["w"], weights["w"])


@pytest.mark.parametrize("unet, problem", [
    ({"sample_size": 64}, "has no cross_attention_dim"),
    ({"cross_attention_dim": "wide"}, "cross_attention_dim 'wide', not a whole number"),
    ({"cross_attention_dim": 768, "in_channels": None}, "in_channels None, not a whole number"),
])
def test_a_garbage_unet_config_is_named_with_its_field(checkpoints, tmp_path, unet, problem):
    import json

    folder = tmp_path / "model"
    shutil.copytree(checkpoints.get("sd15", layout="diffusers").path, folder)
    config = folder / "unet" / "config.json"
    config.write_text(json.dumps(unet))
    error = _expect(folder, problem, "restore unet/config.json")
    assert str(config) in str(error) and "cross-attention width" not in str(error)
