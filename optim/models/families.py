"""The model families SDAccel knows: architecture config folder, tokenizers and generation defaults.

Architecture facts live as diffusers-format JSON under `data/families/<name>/`, shipped with the
pack, so loading a single-file checkpoint never needs the hub.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..spec.errors import ConfigError

DATA_DIR = Path(__file__).resolve().parent / "data"
FAMILIES_DIR = DATA_DIR / "families"
TOKENIZERS_DIR = DATA_DIR / "tokenizers"

PREDICTION_TYPES = ("auto", "epsilon", "v_prediction")
CLIP_VOCAB_SIZE = 49408
BERT_CHINESE_VOCAB_SIZE = 21128


@dataclass(frozen=True)
class TokenizerSpec:
    """Which shipped tokenizer a text encoder uses, and its expected length."""

    kind: str  # "clip" or "bert_chinese"
    pad_token: str | None = None

    @property
    def folder(self) -> Path:
        return TOKENIZERS_DIR / self.kind

    @property
    def expected_length(self) -> int:
        return CLIP_VOCAB_SIZE if self.kind == "clip" else BERT_CHINESE_VOCAB_SIZE


@dataclass(frozen=True)
class Family:
    """One model family: what its pipeline holds and how it likes to be sampled."""

    name: str
    title: str
    pipeline: str  # diffusers pipeline class name
    size: int  # native image side in pixels
    steps: int
    cfg: float
    scheduler: str
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    text_encoders: tuple[str, ...] = ("text_encoder",)
    tokenizers: dict = field(default_factory=dict)  # component name -> TokenizerSpec
    group: str = ""  # families whose weights look identical share a group (override allowed within it)
    turbo: bool = False
    max_steps_hint: int | None = None

    @property
    def config_dir(self) -> Path:
        return FAMILIES_DIR / self.name

    @property
    def unet_arch(self) -> str:
        """The UNet architecture the family shares: sd1 (SD1.x, Taiyi), sd2 or sdxl (base, Turbo, refiner)."""
        return {"taiyi": "sd1", "sdxl-refiner": "sdxl"}.get(self.group, self.group)

    @property
    def is_xl(self) -> bool:
        return self.pipeline.startswith("StableDiffusionXL")

    @property
    def components(self) -> tuple[str, ...]:
        """Every pipeline component that must be present after loading."""
        return ("unet", "vae", "scheduler") + self.text_encoders + tuple(self.tokenizers)


_CLIP = TokenizerSpec("clip", pad_token="<|endoftext|>")
_OPENCLIP = TokenizerSpec("clip", pad_token="!")

FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("sd15", "Stable Diffusion 1.x", "StableDiffusionPipeline", 512, 25, 7.0, "dpmpp_2m_karras",
           tokenizers={"tokenizer": _CLIP}, group="sd1"),
    Family("taiyi", "Taiyi Stable Diffusion 1B Chinese v0.1", "StableDiffusionPipeline", 512, 25, 7.0,
           "dpmpp_2m_karras", tokenizers={"tokenizer": TokenizerSpec("bert_chinese")}, group="taiyi"),
    Family("sd2-base", "Stable Diffusion 2.x base (512, epsilon)", "StableDiffusionPipeline", 512, 25, 7.0,
           "dpmpp_2m_karras", tokenizers={"tokenizer": _OPENCLIP}, group="sd2"),
    Family("sd21-v", "Stable Diffusion 2.1 768-v (v-prediction)", "StableDiffusionPipeline", 768, 25, 7.0,
           "dpmpp_2m_karras", prediction_type="v_prediction", tokenizers={"tokenizer": _OPENCLIP}, group="sd2"),
    Family("sd-turbo", "SD-Turbo", "StableDiffusionPipeline", 512, 1, 0.0, "euler_a",
           timestep_spacing="trailing", tokenizers={"tokenizer": _OPENCLIP}, group="sd2", turbo=True,
           max_steps_hint=4),
    Family("sdxl-base", "Stable Diffusion XL base 1.0", "StableDiffusionXLPipeline", 1024, 30, 6.0,
           "dpmpp_2m_karras", text_encoders=("text_encoder", "text_encoder_2"),
           tokenizers={"tokenizer": _CLIP, "tokenizer_2": _OPENCLIP}, group="sdxl"),
    Family("sdxl-turbo", "SDXL-Turbo", "StableDiffusionXLPipeline", 512, 1, 0.0, "euler_a",
           timestep_spacing="trailing", text_encoders=("text_encoder", "text_encoder_2"),
           tokenizers={"tokenizer": _CLIP, "tokenizer_2": _OPENCLIP}, group="sdxl", turbo=True, max_steps_hint=4),
    Family("sdxl-refiner", "Stable Diffusion XL refiner 1.0", "StableDiffusionXLImg2ImgPipeline", 1024, 30, 6.0,
           "dpmpp_2m_karras", text_encoders=("text_encoder_2",), tokenizers={"tokenizer_2": _OPENCLIP},
           group="sdxl-refiner"),
)}

FAMILY_ALIASES = {
    "sd1": "sd15", "sd14": "sd15", "sd1.5": "sd15", "sd-1.5": "sd15", "sd2": "sd2-base", "sd21-base": "sd2-base",
    "sd2.1-base": "sd2-base", "sd21": "sd21-v", "sd2.1": "sd21-v", "sd21-768": "sd21-v", "sdxl": "sdxl-base",
    "refiner": "sdxl-refiner", "sdturbo": "sd-turbo", "sdxlturbo": "sdxl-turbo",
}


def get_family(name: str) -> Family:
    """The family called `name` (aliases such as `sdxl` accepted), or a ConfigError listing the choices."""
    key = FAMILY_ALIASES.get(name.lower(), name.lower())
    try:
        return FAMILIES[key]
    except KeyError:
        raise ConfigError("family", f"unknown family {name!r}", f"choose one of: {', '.join(FAMILIES)}") from None
