"""Load a pipeline from a single-file checkpoint, a diffusers folder or synthetic weights, offline.

Single files are read once per component prefix and converted by diffusers' own
`from_single_file(..., config=<shipped family folder>)`; every hub call is made with
`local_files_only=True`. After loading, `validate_pipeline` refuses anything that would generate
garbage (wrong tokenizer, weights left on the meta device, a missing component).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..spec.errors import CheckpointError
from ..spec.model_ref import ModelRef
from .checkpoint import open_checkpoint
from .detect import (
    REFINER_OPENCLIP_PREFIX,
    SD1_CLIP_PREFIX,
    SD2_OPENCLIP_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    XL_CLIP_PREFIX,
    XL_OPENCLIP_PREFIX,
    Detection,
    detect_folder,
    detect_single_file,
)
from .families import Family, TokenizerSpec
from .sources import source

log = logging.getLogger(__name__)

_TOKENIZER_PROBES = {"clip": "a photo of a cat", "bert_chinese": "长城, 清晨"}


@dataclass
class LoadedModel:
    """A pipeline as loaded from disk, before any optimization, plus what we learned loading it."""

    pipe: object
    family: Family
    prediction_type: str
    source: str
    format: str  # safetensors | pickle | diffusers | synthetic
    scheduler_config: dict
    load_s: float = 0.0
    assumed: tuple[str, ...] = ()
    notes: list[str] = field(default_factory=list)


def load_model(ref: ModelRef) -> LoadedModel:
    """Load the weights `ref` points at. Raises CheckpointError with the file and the fix on bad input."""
    start = time.perf_counter()
    if ref.is_synthetic:
        loaded = source("model", ref.path.split(":", 1)[0], "ModelRef.path")(ref)
    else:
        path = Path(ref.path).expanduser()
        if not ref.path:
            raise CheckpointError("<empty path>", "no checkpoint was given", "Pass a checkpoint file or folder")
        if not path.exists():
            raise CheckpointError(path, "no such file or folder",
                                  "Check the path; ComfyUI keeps checkpoints in models/checkpoints, A1111 in "
                                  "models/Stable-diffusion")
        loaded = _load_folder(path, ref) if path.is_dir() else _load_single_file(path, ref)
    validate_pipeline(loaded.pipe, loaded.family, loaded.source)
    loaded.load_s = time.perf_counter() - start
    log.info("loaded %s as %s (%s) in %.1fs", ref.display_name, loaded.family.name, loaded.format, loaded.load_s)
    return loaded


# ---------------------------------------------------------------- single file


def _torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def _normalise_clip_keys(tensors: dict, prefix: str) -> dict:
    """Old SD1 files store CLIP without the `text_model.` level; diffusers' converter expects it."""
    legacy = prefix + "embeddings."
    if not any(k.startswith(legacy) for k in tensors):
        return tensors
    return {(prefix + "text_model." + k[len(prefix):]) if k.startswith(prefix) else k: v for k, v in tensors.items()}


def _from_single_file(model_cls, tensors: dict, config_dir: Path, subfolder: str, dtype, path: Path):
    if not tensors:
        raise CheckpointError(path, f"holds no {subfolder} weights", "Pick a complete checkpoint")
    try:
        return model_cls.from_single_file(tensors, config=str(config_dir), subfolder=subfolder,
                                          local_files_only=True, torch_dtype=dtype)
    except CheckpointError:
        raise
    except Exception as exc:  # diffusers raises many types for shape/key mismatches
        raise CheckpointError(path, f"its {subfolder} weights do not fit the expected architecture ({exc})",
                              "Check the family override, or that the file is a complete checkpoint") from exc


def _clip_from_single_file(model_cls, tensors: dict, config_dir: Path, subfolder: str, dtype, path: Path):
    try:
        from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    except ImportError as exc:  # pragma: no cover - guarded by CI on diffusers 0.31 and current
        raise CheckpointError(path, "this diffusers version lacks the CLIP single-file converter",
                              "Install diffusers >= 0.31") from exc
    tensors = {k: v for k, v in tensors.items() if not k.endswith("position_ids")}
    try:
        return create_diffusers_clip_model_from_ldm(model_cls, tensors, subfolder=subfolder,
                                                    config=str(config_dir), torch_dtype=dtype,
                                                    local_files_only=True)
    except Exception as exc:
        raise CheckpointError(path, f"its {subfolder} weights do not fit the expected text encoder ({exc})",
                              "Check the family override, or that the file is a complete checkpoint") from exc


def _bert_from_single_file(tensors: dict, prefix: str, config_dir: Path, dtype, path: Path):
    from transformers import BertConfig, BertModel

    state = {k[len(prefix):]: v for k, v in tensors.items() if not k.endswith("position_ids")}
    config = BertConfig.from_pretrained(str(config_dir / "text_encoder"), local_files_only=True)
    model = BertModel(config, add_pooling_layer="pooler.dense.weight" in state)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith(("position_ids", "token_type_ids"))]
    if missing:
        raise CheckpointError(path, f"its Chinese BERT text encoder is incomplete (missing {missing[:3]})",
                              "Pick a complete Taiyi checkpoint")
    if unexpected:
        log.warning("%s: ignored %d unexpected text-encoder keys such as %s", path.name, len(unexpected),
                    unexpected[:2])
    return model.to(dtype).eval()


def _load_single_file(path: Path, ref: ModelRef) -> LoadedModel:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    ck = open_checkpoint(path)
    det = detect_single_file(ck, ref.family, ref.prediction_type)
    fam = det.family
    cfg = _config_dir(ref, fam, path)
    comps: dict = {}

    def component(prefix: str):
        return ck.read(prefix), _torch_dtype(ck.storage_dtype(prefix))

    tensors, dtype = component(UNET_PREFIX)
    comps["unet"] = _from_single_file(UNet2DConditionModel, tensors, cfg, "unet", dtype, path)
    tensors, dtype = component(VAE_PREFIX)
    comps["vae"] = _from_single_file(AutoencoderKL, tensors, cfg, "vae", dtype, path)
    del tensors
    if det.group == "taiyi":
        tensors, dtype = component(SD1_CLIP_PREFIX)
        comps["text_encoder"] = _bert_from_single_file(tensors, SD1_CLIP_PREFIX, cfg, dtype, path)
    elif det.group == "sd1":
        tensors, dtype = component(SD1_CLIP_PREFIX)
        tensors = _normalise_clip_keys(tensors, SD1_CLIP_PREFIX)
        comps["text_encoder"] = _clip_from_single_file(CLIPTextModel, tensors, cfg, "text_encoder", dtype, path)
    elif det.group == "sd2":
        tensors, dtype = component(SD2_OPENCLIP_PREFIX)
        comps["text_encoder"] = _clip_from_single_file(CLIPTextModel, tensors, cfg, "text_encoder", dtype, path)
    elif det.group == "sdxl":
        tensors, dtype = component(XL_CLIP_PREFIX)
        comps["text_encoder"] = _clip_from_single_file(CLIPTextModel, tensors, cfg, "text_encoder", dtype, path)
        tensors, dtype = component(XL_OPENCLIP_PREFIX)
        comps["text_encoder_2"] = _clip_from_single_file(CLIPTextModelWithProjection, tensors, cfg,
                                                         "text_encoder_2", dtype, path)
    else:  # sdxl-refiner
        tensors, dtype = component(REFINER_OPENCLIP_PREFIX)
        comps["text_encoder_2"] = _clip_from_single_file(CLIPTextModelWithProjection, tensors, cfg,
                                                         "text_encoder_2", dtype, path)
    for name, spec in fam.tokenizers.items():
        comps[name] = load_shipped_tokenizer(spec)
    scheduler_config = family_scheduler_config(fam, det.prediction_type, cfg)
    pipe = assemble_pipeline(fam, comps, scheduler_config)
    return LoadedModel(pipe, fam, det.prediction_type, str(path), ck.format, scheduler_config, assumed=det.assumed)


def sidecar_config_dir(path: Path) -> Path | None:
    """A config folder beside the checkpoint (`model.safetensors.config/` or `model.config/`), as A1111 reads a
    `model.yaml` beside `model.ckpt`: how a checkpoint with a non-standard architecture brings its own configs."""
    for candidate in (path.with_name(path.name + ".config"), path.with_suffix(".config")):
        if candidate.is_dir() and (candidate / "unet" / "config.json").exists():
            return candidate
    return None


def _config_dir(ref: ModelRef, fam: Family, path: Path | None = None) -> Path:
    """The user's config folder (explicit, or beside the file), else the family's shipped one."""
    folder = Path(ref.config_dir).expanduser() if ref.config_dir else (sidecar_config_dir(path) if path else None)
    if folder is None:
        return fam.config_dir
    if not ref.config_dir:
        log.info("%s: using the architecture configs beside it in %s", path.name, folder)
    for name in ("unet", "vae") + fam.text_encoders:
        if not (folder / name / "config.json").exists():
            raise CheckpointError(folder, f"is missing {name}/config.json",
                                  "A config folder needs one config.json per component, as in a diffusers model; "
                                  "or leave config_dir empty to use the family's shipped configs")
    return folder


# ---------------------------------------------------------------- shipped tokenizers and configs


def load_shipped_tokenizer(spec: TokenizerSpec):
    """The tokenizer SDAccel ships for `spec` (CLIP BPE or bert-base-chinese vocab), from local files.

    CLIP uses the Rust ("fast") tokenizer everywhere: transformers 4.x's Python one falls back to a
    BERT-style splitter without ftfy and tokenizes CJK and accented text differently from CLIP.
    """
    from transformers import BertTokenizer, CLIPTokenizerFast

    if spec.kind == "clip":
        return _with_added_tokens_encoder(CLIPTokenizerFast.from_pretrained(
            str(spec.folder), pad_token=spec.pad_token, local_files_only=True))
    return BertTokenizer.from_pretrained(str(spec.folder), local_files_only=True)


def _with_added_tokens_encoder(tokenizer):
    """diffusers' prompt conversion (textual inversion) reads `tokenizer.added_tokens_encoder`, which fast
    tokenizers only have from transformers 4.34 on; A1111 1.10 pins 4.30.2, where SDAccel's tab runs too. The
    same mapping (added token -> id) from the method those versions do have."""
    if not hasattr(tokenizer, "added_tokens_encoder"):
        tokenizer.added_tokens_encoder = tokenizer.get_added_vocab()
    return tokenizer


def family_scheduler_config(fam: Family, prediction_type: str, config_dir: Path | None = None) -> dict:
    """The noise schedule of `fam` (from `config_dir` when it has one), with the prediction type set."""
    path = (config_dir or fam.config_dir) / "scheduler" / "scheduler_config.json"
    if not path.exists():
        path = fam.config_dir / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["prediction_type"] = prediction_type
    if fam.turbo:
        config["timestep_spacing"] = "trailing"
    return config


def assemble_pipeline(fam: Family, comps: dict, scheduler_config: dict):
    """Build the family's diffusers pipeline object from loaded components (no safety checker, no watermark)."""
    import diffusers
    from diffusers import EulerDiscreteScheduler

    scheduler = EulerDiscreteScheduler.from_config(scheduler_config)
    cls = getattr(diffusers, fam.pipeline)
    if fam.pipeline == "StableDiffusionPipeline":
        return cls(vae=comps["vae"], text_encoder=comps["text_encoder"], tokenizer=comps["tokenizer"],
                   unet=comps["unet"], scheduler=scheduler, safety_checker=None, feature_extractor=None,
                   requires_safety_checker=False)
    if fam.pipeline == "StableDiffusionXLPipeline":
        return cls(vae=comps["vae"], text_encoder=comps["text_encoder"], text_encoder_2=comps["text_encoder_2"],
                   tokenizer=comps["tokenizer"], tokenizer_2=comps["tokenizer_2"], unet=comps["unet"],
                   scheduler=scheduler, force_zeros_for_empty_prompt=True, add_watermarker=False)
    return cls(vae=comps["vae"], text_encoder=None, text_encoder_2=comps["text_encoder_2"], tokenizer=None,
               tokenizer_2=comps["tokenizer_2"], unet=comps["unet"], scheduler=scheduler,
               requires_aesthetics_score=True, force_zeros_for_empty_prompt=False, add_watermarker=False)


# ---------------------------------------------------------------- diffusers folders


def _weights_file(sub: Path) -> tuple[Path | None, str | None]:
    """The weight file of a component folder and the diffusers `variant` it needs (e.g. fp16)."""
    if not sub.is_dir():
        return None, None
    for stem in ("diffusion_pytorch_model", "model"):
        for suffix in (".safetensors", ".bin"):
            if (sub / f"{stem}{suffix}").exists():
                return sub / f"{stem}{suffix}", None
    for stem in ("diffusion_pytorch_model", "model"):
        for suffix in (".safetensors", ".bin"):
            found = sorted(sub.glob(f"{stem}.*{suffix}"))
            if found:
                return found[0], found[0].name[len(stem) + 1: -len(suffix)]
    return None, None


def _transformers_dtype_kwarg(dtype) -> dict:
    import transformers
    from packaging.version import Version

    new_api = Version(transformers.__version__.split("+")[0]) >= Version("4.56")
    return {"dtype": dtype} if new_api else {"torch_dtype": dtype}


def _load_folder(folder: Path, ref: ModelRef) -> LoadedModel:
    import diffusers
    import transformers

    det: Detection = detect_folder(folder, ref.family, ref.prediction_type)
    fam = det.family
    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    comps: dict = {}
    for name in ("unet", "vae") + fam.text_encoders:
        weights, variant = _weights_file(folder / name)
        if weights is None:
            raise CheckpointError(folder / name, "has no weights (expected diffusion_pytorch_model.safetensors "
                                  "or model.safetensors)", "Copy the complete diffusers folder")
        checked = open_checkpoint(weights)  # .bin files go through weights_only here before the library reads them
        dtype = _torch_dtype(checked.storage_dtype(""))
        library, class_name = index.get(name, [None, None])
        if name in ("unet", "vae"):
            cls = getattr(diffusers, class_name or ("UNet2DConditionModel" if name == "unet" else "AutoencoderKL"))
            kwargs = {"torch_dtype": dtype}
        else:
            cls = getattr(transformers, class_name or "CLIPTextModel")
            kwargs = _transformers_dtype_kwarg(dtype)
        if variant:
            kwargs["variant"] = variant
        try:
            comps[name] = cls.from_pretrained(str(folder), subfolder=name, local_files_only=True, **kwargs)
        except Exception as exc:
            raise CheckpointError(folder / name, f"could not be loaded ({exc})",
                                  "Check that the folder is a complete, uncorrupted diffusers model") from exc
    for name, spec in fam.tokenizers.items():
        comps[name] = _folder_tokenizer(folder, name, spec)
    sched_path = folder / "scheduler" / "scheduler_config.json"
    scheduler_config = (json.loads(sched_path.read_text(encoding="utf-8")) if sched_path.exists()
                        else family_scheduler_config(fam, det.prediction_type))
    scheduler_config["prediction_type"] = det.prediction_type
    if fam.turbo:
        scheduler_config["timestep_spacing"] = "trailing"
    pipe = assemble_pipeline(fam, comps, scheduler_config)
    return LoadedModel(pipe, fam, det.prediction_type, str(folder), "diffusers", scheduler_config,
                       assumed=det.assumed)


def _folder_tokenizer(folder: Path, name: str, spec: TokenizerSpec):
    from transformers import BertTokenizer, CLIPTokenizerFast

    sub = folder / name
    needed = ("vocab.json", "merges.txt") if spec.kind == "clip" else ("vocab.txt",)
    missing = [f for f in needed if not (sub / f).exists()] if not (sub / "tokenizer.json").exists() else []
    if not sub.is_dir() or missing:
        raise CheckpointError(sub, "is missing or incomplete" + (f" (no {', '.join(missing)})" if missing else ""),
                              "Copy the tokenizer folder from the original model; without it the text encoder "
                              "would read garbage tokens")
    cls = CLIPTokenizerFast if spec.kind == "clip" else BertTokenizer
    try:
        return _with_added_tokens_encoder(cls.from_pretrained(str(folder), subfolder=name, local_files_only=True))
    except Exception as exc:
        raise CheckpointError(sub, f"could not be read ({exc})", "Restore the tokenizer files") from exc


# ---------------------------------------------------------------- validation


def validate_pipeline(pipe, fam: Family, source: str) -> None:
    """Refuse a pipeline that would silently generate garbage."""
    for name in fam.components:
        if getattr(pipe, name, None) is None:
            raise CheckpointError(source, f"loaded without its {name}", "Pick a complete checkpoint")
    for name, spec in fam.tokenizers.items():
        tok = getattr(pipe, name)
        if len(tok) != spec.expected_length:
            raise CheckpointError(source, f"its {name} has {len(tok)} tokens instead of {spec.expected_length}",
                                  "The tokenizer files are missing or wrong; restore them from the original model")
        ids = tok(_TOKENIZER_PROBES[spec.kind]).input_ids
        unk = getattr(tok, "unk_token_id", None)
        if spec.kind == "bert_chinese" and unk is not None and unk in ids:
            raise CheckpointError(source, f"its {name} cannot read Chinese text", "Restore the tokenizer files")
    widths = []
    for name in fam.text_encoders:
        te = getattr(pipe, name)
        spec = fam.tokenizers["tokenizer" + name[len("text_encoder"):]]
        if te.config.vocab_size != spec.expected_length:
            raise CheckpointError(source, f"its {name} has a {te.config.vocab_size}-token embedding but the "
                                  f"tokenizer has {spec.expected_length}", "Pick a checkpoint of this family")
        widths.append(te.config.hidden_size)
    context = pipe.unet.config.cross_attention_dim
    if context != sum(widths):
        raise CheckpointError(source, f"UNet cross-attention width {context} does not match the text encoders "
                              f"({'+'.join(map(str, widths))})", "Pick a checkpoint of this family")
    for name in ("unet", "vae") + fam.text_encoders:
        module = getattr(pipe, name)
        meta = [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
        if meta:
            raise CheckpointError(source, f"its {name} is missing {len(meta)} weights (for example {meta[0]})",
                                  "The file is incomplete or not of this family; download it again")
