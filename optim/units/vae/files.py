"""Reading replacement VAE weights the way users hold them: full AutoencoderKL VAEs and TAESD Tiny VAEs.

Full VAEs come as a diffusers folder or a single file (LDM keys, optionally under `first_stage_model.`,
converted by diffusers' own converter). Tiny VAEs come as the original TAESD `*_decoder` / `*_encoder`
files (one nn.Sequential each), ComfyUI's combined files, or a diffusers AutoencoderTiny folder; their
keys are mapped here onto diffusers' `AutoencoderTiny`. `synthetic` builds seeded random weights of the
right architecture, for cost measurements only.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ...models.checkpoint import PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES, open_checkpoint
from ...spec.errors import CheckpointError

log = logging.getLogger(__name__)

_WEIGHT_SUFFIXES = tuple(sorted(SAFETENSORS_SUFFIXES)) + tuple(sorted(PICKLE_SUFFIXES))
_TAESD_KEY = re.compile(r"^(?:taesd_)?(encoder|decoder)\.(\d+\..*)$")  # TAESD module / ComfyUI combined file
_TAESD_RAW_KEY = re.compile(r"^(\d+)\.(.*)$")  # one nn.Sequential: taesd_decoder.pth / taesd_encoder.pth
_VAE_PREFIXES = ("first_stage_model.", "vae.")  # a VAE inside a whole checkpoint (diffusers' converter's list)
_COMFY_EXTRA_KEYS = ("vae_scale", "vae_shift")  # ComfyUI's TAESD wrapper scales raw latents itself
_TINY_HINT = ("Use the original taesd_decoder.pth (+ taesd_encoder.pth) for SD1/SD2 or taesdxl_decoder.pth for "
              "SDXL from github.com/madebyollin/taesd (ComfyUI: models/vae_approx), or a diffusers "
              "AutoencoderTiny folder such as madebyollin/taesd")
_FULL_HINT = ("Use a diffusers AutoencoderKL folder or a single-file VAE such as sdxl_vae.safetensors from "
              "madebyollin/sdxl-vae-fp16-fix")


# ---------------------------------------------------------------- reading weights


@dataclass
class _Weights:
    """The VAE tensors of one file, the file they came from, and whether it was a whole model checkpoint."""

    source: Path
    tensors: dict
    whole_checkpoint: bool = False


def _read(path: Path) -> _Weights:
    """A file's VAE tensors, read safely (safetensors headers first, pickles weights-only).

    A whole checkpoint gives only its `first_stage_model.` part, and a safetensors one is read without
    its UNet and text encoders (a few hundred MB instead of several GB).
    """
    checkpoint = open_checkpoint(path)
    for prefix in _VAE_PREFIXES:
        if checkpoint.has_prefix(prefix):
            tensors = checkpoint.read(prefix)
            return _Weights(path, {k[len(prefix):]: v for k, v in tensors.items()},
                            checkpoint.has_prefix("model.diffusion_model."))
    return _Weights(path, checkpoint.read())


def _folder_weights(folder: Path) -> Path | None:
    for stem in ("diffusion_pytorch_model", "model"):
        for suffix in (".safetensors", ".bin"):
            if (folder / f"{stem}{suffix}").is_file():
                return folder / f"{stem}{suffix}"
    found = sorted(folder.glob("diffusion_pytorch_model.*safetensors"))
    return found[0] if found else None


def _diffusers_folder(path: Path) -> tuple[dict, Path] | None:
    """(config, weights file) of a diffusers model folder, or of the `vae/` folder of a whole pipeline."""
    for folder in (path, path / "vae"):
        config_file = folder / "config.json"
        if not config_file.is_file():
            continue
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(config_file, f"could not be read as JSON ({exc})",
                                  "Restore config.json from the original model") from exc
        weights = _folder_weights(folder)
        if weights is None:
            raise CheckpointError(folder, "has a config.json but no weights (expected "
                                  "diffusion_pytorch_model.safetensors)", "Copy the complete folder")
        return config, weights
    return None


def _layout(keys) -> str:
    """What a (prefix-stripped) state dict holds, judged by its key names."""
    keys = list(keys)
    if any("lora" in k.lower() for k in keys):
        return "lora"
    if any(k.startswith(("encoder.down.", "decoder.up.", "encoder.mid.", "decoder.mid.")) for k in keys):
        return "ldm_vae"
    if any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.", "decoder.mid_block.")) for k in keys):
        return "diffusers_vae"
    if any(k.startswith(("encoder.layers.", "decoder.layers.")) for k in keys):
        return "diffusers_tiny"
    if keys and all(_TAESD_KEY.match(k) or k in _COMFY_EXTRA_KEYS for k in keys):
        return "taesd_pair"
    if keys and all(_TAESD_RAW_KEY.match(k) for k in keys):
        return "taesd_encoder" if "0.weight" in keys else "taesd_decoder"
    if any(k.startswith(("model.diffusion_model.", "down_blocks.", "time_embedding.", "input_blocks."))
           for k in keys):
        return "unet"
    return "unknown"


def _refuse(source: Path, layout: str, wanted: str) -> CheckpointError:
    """The error for a file that holds something other than the VAE `wanted` ('full' or 'tiny')."""
    hint = _TINY_HINT if wanted == "tiny" else _FULL_HINT
    if layout == "lora":
        return CheckpointError(source, "is a LoRA, not a VAE", "Load LoRAs with a LoRA loader; " + hint)
    if layout == "unet":
        return CheckpointError(source, "is a UNet / diffusion model, not a VAE", hint)
    if layout in ("ldm_vae", "diffusers_vae"):
        return CheckpointError(source, "is a full VAE (AutoencoderKL), not Tiny VAE (TAESD) weights",
                               "Use variant fp16_fix for a full VAE file; " + hint)
    if layout.startswith(("taesd", "diffusers_tiny")):
        return CheckpointError(source, "is a Tiny VAE (TAESD), not a full VAE", "Use variant tiny for it")
    return CheckpointError(source, "holds no VAE weights SDAccel recognises", hint)


def _load_strict(module: torch.nn.Module, state: dict, source: Path, what: str) -> None:
    """Load `state` into a meta-device `module` (tensors assigned, no copy); a mismatch names the file."""
    try:
        missing, unexpected = module.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as exc:  # shape mismatch
        raise CheckpointError(source, f"does not fit the {what} architecture ({str(exc).splitlines()[-1].strip()})",
                              "Check that the file is the right model and not damaged") from exc
    if missing or unexpected:
        detail = f"missing {missing[:2]}" if missing else f"unexpected {unexpected[:2]}"
        raise CheckpointError(source, f"is not a complete {what} ({len(missing)} missing, {len(unexpected)} "
                              f"unexpected keys; {detail})", "Check that the file is the right model")


def _check_latent_channels(source: Path, found: int, wanted: int, family) -> None:
    if found != wanted:
        raise CheckpointError(source, f"has {found} latent channels but {family.title} uses {wanted}",
                              "Pick the VAE made for this family (SD3/FLUX Tiny VAEs such as taesd3_/taef1_ "
                              "have 16 channels; SD1/SD2 use taesd_*, SDXL taesdxl_*)")


# ---------------------------------------------------------------- full VAE (fp16-fix)


def _init_kwargs(cls, config: dict) -> dict:
    """The entries of a saved config that `cls.__init__` takes (diffusers also stores derived and private ones)."""
    import inspect

    accepted = inspect.signature(cls.__init__).parameters
    return {k: v for k, v in config.items() if k in accepted and k != "self"}


def kl_config(reference) -> dict:
    """The architecture of the pipeline's own VAE, marked safe to run in fp16 like the fp16-fix VAE."""
    from diffusers import AutoencoderKL

    return dict(_init_kwargs(AutoencoderKL, dict(reference.config)), force_upcast=False)


def _build_kl(config: dict, state: dict, source: Path):
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL.from_config(config)
    _load_strict(vae, state, source, "AutoencoderKL VAE")
    return vae.eval()


def _ldm_to_diffusers(state: dict, config: dict, source: Path) -> dict:
    """Original LDM VAE keys -> diffusers keys, with diffusers' own converter."""
    try:
        from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    except ImportError as exc:  # pragma: no cover - present in every supported diffusers
        raise CheckpointError(source, "this diffusers version lacks the single-file VAE converter",
                              "Install diffusers >= 0.31") from exc
    return convert_ldm_vae_checkpoint(state, config)


def load_full_vae(path: Path, reference, family):
    """An AutoencoderKL from a diffusers folder or a single file (LDM or diffusers keys)."""
    if path.is_dir():
        found = _diffusers_folder(path)
        if found is None:
            raise CheckpointError(path, "is a folder without a VAE config.json", _FULL_HINT)
        config, weights_file = found
        if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
            raise CheckpointError(path, f"holds a {config.get('_class_name')}, not an AutoencoderKL",
                                  "Use variant tiny for an AutoencoderTiny folder" if
                                  config.get("_class_name") == "AutoencoderTiny" else _FULL_HINT)
        from diffusers import AutoencoderKL

        weights = _read(weights_file)
        state, layout = weights.tensors, _layout(weights.tensors)
        config = _init_kwargs(AutoencoderKL, config)
        _warn_scaling(weights.source, config, reference, family)
    else:
        weights = _read(path)
        state, layout = weights.tensors, _layout(weights.tensors)
        if weights.whole_checkpoint and layout in ("ldm_vae", "diffusers_vae"):
            log.info("vae: %s is a whole checkpoint; using only its VAE", path.name)
        config = kl_config(reference)
    if layout not in ("ldm_vae", "diffusers_vae"):
        raise _refuse(weights.source, layout, "full")
    conv_in = state.get("decoder.conv_in.weight")
    if conv_in is not None:
        _check_latent_channels(weights.source, conv_in.shape[1], reference.config.latent_channels, family)
    if layout == "ldm_vae":
        state = _ldm_to_diffusers(state, config, weights.source)
    return _build_kl(config, state, weights.source), weights.source


def _warn_scaling(source: Path, config: dict, reference, family) -> None:
    """A different scaling factor means a VAE trained for another family (SD1 0.18215, SDXL 0.13025)."""
    theirs, ours = config.get("scaling_factor"), reference.config.scaling_factor
    if theirs is not None and abs(float(theirs) - float(ours)) > 1e-6:
        log.warning("vae: %s has scaling_factor %s but %s uses %s: it was made for another family; colours "
                    "will be off", source, theirs, family.title, ours)


# ---------------------------------------------------------------- Tiny VAE (TAESD)


def taesd_to_diffusers(encoder: dict | None, decoder: dict | None) -> dict:
    """Original TAESD keys (one nn.Sequential per side) -> diffusers AutoencoderTiny keys.

    The encoder Sequential maps index for index onto `encoder.layers`; the decoder's first entry is a
    parameter-free clamp that diffusers' DecoderTiny applies in `forward`, so its indices shift by one.
    """
    out = {}
    for key, value in (encoder or {}).items():
        out[f"encoder.layers.{key}"] = value
    for key, value in (decoder or {}).items():
        index, rest = _TAESD_RAW_KEY.match(key).groups()
        out[f"decoder.layers.{int(index) - 1}.{rest}"] = value
    return out


def _split_pair(tensors: dict) -> tuple[dict, dict]:
    """A combined TAESD file (`encoder.N` / `decoder.N`, or ComfyUI's `taesd_encoder.N` ...) -> (enc, dec)."""
    sides: dict[str, dict] = {"encoder": {}, "decoder": {}}
    for key, value in tensors.items():
        match = _TAESD_KEY.match(key)
        if match:
            sides[match.group(1)][match.group(2)] = value
    return sides["encoder"], sides["decoder"]


def _sibling(path: Path, want: str) -> Path | None:
    """The other half of a TAESD pair beside `path` (`..._decoder.pth` -> `..._encoder.pth`, any suffix)."""
    have = "decoder" if want == "encoder" else "encoder"
    stem = path.name[: -len(path.suffix)] if path.suffix else path.name
    if have not in stem:
        return None
    head, _, tail = stem.rpartition(have)
    name = head + want + tail
    for suffix in (path.suffix,) + _WEIGHT_SUFFIXES:
        candidate = path.with_name(name + suffix)
        if candidate.is_file():
            return candidate
    return None


def _taesd_in_folder(folder: Path, family) -> Path | None:
    """The family's decoder file in a folder of TAESD files (e.g. ComfyUI's models/vae_approx)."""
    stems = ("taesdxl_decoder",) if family.is_xl else ("taesd_decoder",)
    for stem in stems:
        for suffix in _WEIGHT_SUFFIXES:
            if (folder / (stem + suffix)).is_file():
                return folder / (stem + suffix)
    return None


def _warn_family_name(path: Path, family) -> None:
    """TAESD and TAESDXL share one architecture: only the file name can tell them apart, so warn on it."""
    name = path.name.lower()
    if family.is_xl and name.startswith("taesd_"):
        log.warning("vae: %s looks like the SD1/SD2 Tiny VAE but %s is SDXL; colours will be off (use "
                    "taesdxl_decoder)", path.name, family.title)
    elif not family.is_xl and name.startswith("taesdxl"):
        log.warning("vae: %s looks like the SDXL Tiny VAE but %s is not SDXL; colours will be off (use "
                    "taesd_decoder)", path.name, family.title)


@dataclass
class _TinyWeights:
    """A Tiny VAE's diffusers-layout state and where each half came from (encoder may be absent)."""

    state: dict
    decoder_source: Path
    encoder_source: Path | None
    config: dict


def _tiny_from_file(path: Path) -> _TinyWeights:
    weights = _read(path)
    layout = _layout(weights.tensors)
    if layout == "diffusers_tiny":
        has_encoder = any(k.startswith("encoder.") for k in weights.tensors)
        return _TinyWeights(weights.tensors, path, path if has_encoder else None, {})
    if layout == "taesd_pair":
        encoder, decoder = _split_pair(weights.tensors)
        if not decoder:
            raise CheckpointError(path, "holds only a TAESD encoder", "Pass the decoder file; " + _TINY_HINT)
        return _TinyWeights(taesd_to_diffusers(encoder, decoder), path, path if encoder else None, {})
    if layout == "taesd_encoder":
        decoder_path = _sibling(path, "decoder")
        if decoder_path is None:
            raise CheckpointError(path, "is a TAESD encoder; decoding needs the decoder and none was found "
                                  "beside it", "Pass the *_decoder file (its *_encoder is found by name)")
        return _tiny_pair(decoder_path, path)
    if layout == "taesd_decoder":
        return _tiny_pair(path, _sibling(path, "encoder"))
    raise _refuse(path, layout, "tiny")


def _tiny_pair(decoder_path: Path, encoder_path: Path | None) -> _TinyWeights:
    decoder = _read(decoder_path)
    if _layout(decoder.tensors) != "taesd_decoder":
        raise _refuse(decoder_path, _layout(decoder.tensors), "tiny")
    encoder = None
    if encoder_path is not None:
        encoder = _read(encoder_path)
        if _layout(encoder.tensors) != "taesd_encoder":
            raise CheckpointError(encoder_path, "was found beside the decoder by name but is not a TAESD encoder",
                                  "Rename or remove it, or replace it with the matching *_encoder file")
    state = taesd_to_diffusers(encoder.tensors if encoder else None, decoder.tensors)
    return _TinyWeights(state, decoder_path, encoder_path, {})


def _tiny_weights(path: Path, family) -> _TinyWeights:
    """Find and read Tiny VAE weights: a file, a diffusers AutoencoderTiny folder, or a folder of TAESD files."""
    if not path.is_dir():
        _warn_family_name(path, family)
        return _tiny_from_file(path)
    found = _diffusers_folder(path)
    if found is not None:
        config, weights_file = found
        if config.get("_class_name") != "AutoencoderTiny":
            raise CheckpointError(path, f"holds a {config.get('_class_name', 'model')}, not an AutoencoderTiny",
                                  "Use variant fp16_fix for a full VAE folder; " + _TINY_HINT)
        weights = _read(weights_file)
        if _layout(weights.tensors) != "diffusers_tiny":
            raise _refuse(weights_file, _layout(weights.tensors), "tiny")
        from diffusers import AutoencoderTiny

        has_encoder = any(k.startswith("encoder.") for k in weights.tensors)
        config = _init_kwargs(AutoencoderTiny, config)
        return _TinyWeights(weights.tensors, weights_file, weights_file if has_encoder else None, config)
    decoder = _taesd_in_folder(path, family)
    if decoder is None:
        wanted = "taesdxl_decoder" if family.is_xl else "taesd_decoder"
        raise CheckpointError(path, f"holds neither a diffusers AutoencoderTiny nor {wanted}.* for "
                              f"{family.title}", _TINY_HINT)
    return _tiny_from_file(decoder)


def _latent_channels_of(state: dict, source: Path) -> int:
    first = state.get("decoder.layers.0.weight")
    if first is None or first.dim() != 4:
        raise CheckpointError(source, "is not a TAESD decoder (no first convolution)", _TINY_HINT)
    return int(first.shape[1])


def _build_tiny(weights: _TinyWeights, family, latent_channels: int):
    """An AutoencoderTiny holding the weights; a decoder-only one gets a stand-in encoder that refuses to run."""
    from diffusers import AutoencoderTiny

    found = _latent_channels_of(weights.state, weights.decoder_source)
    _check_latent_channels(weights.decoder_source, found, latent_channels, family)
    config = dict(weights.config or {}, latent_channels=found)
    with torch.device("meta"):
        tiny = AutoencoderTiny.from_config(config)
    if weights.encoder_source is None:
        tiny.encoder = _MissingEncoder()
    _load_strict(tiny, weights.state, weights.decoder_source, "Tiny VAE (TAESD)")
    return tiny.eval()


class _MissingEncoder(torch.nn.Module):
    """Stands in for the TAESD encoder a decoder-only file lacks; img2img encodes with the original VAE."""

    def forward(self, x):
        raise RuntimeError("this Tiny VAE was loaded from a decoder-only file and cannot encode images")
