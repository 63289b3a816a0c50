"""Read single-file checkpoints safely: headers first, tensors only on demand, pickles never executed.

`.safetensors` headers are parsed here (so a text file or a cut-short download gets a precise
message before any tensor is read); `.ckpt`/`.pt` files go only through
`torch.load(weights_only=True)`, which refuses any pickle that asks to run code.
"""

from __future__ import annotations

import json
import logging
import pickle
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from ..spec.errors import CheckpointError

log = logging.getLogger(__name__)

SAFETENSORS_SUFFIXES = {".safetensors", ".sft"}
PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin"}
_MAX_HEADER = 100 * 1024 * 1024
_ST_DTYPE_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                   "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
                   "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}

_REDOWNLOAD = "Download the file again (compare its size with the source) or pick another checkpoint"


@dataclass
class TensorMeta:
    shape: tuple[int, ...]
    dtype: str  # torch dtype name without the "torch." prefix
    offsets: tuple[int, int] | None = None  # byte range in a safetensors file, after the header


@dataclass
class CheckpointFile:
    """An opened single-file checkpoint: key -> shape/dtype known up front, tensors read per prefix."""

    path: Path
    format: str  # "safetensors" or "pickle"
    meta: dict[str, TensorMeta]
    size_bytes: int
    _tensors: dict | None = field(default=None, repr=False)  # pickle checkpoints are read whole
    data_start: int = 0  # where safetensors tensor data begins

    def keys(self):
        return self.meta.keys()

    def has(self, key: str) -> bool:
        return key in self.meta

    def has_prefix(self, prefix: str) -> bool:
        return any(k.startswith(prefix) for k in self.meta)

    def shape(self, key: str) -> tuple[int, ...] | None:
        m = self.meta.get(key)
        return m.shape if m else None

    def read(self, prefix: str = "", keys=None) -> dict:
        """Tensors whose key starts with `prefix` (or exactly `keys`), on the CPU, keys unchanged.

        Safetensors data is read with plain file reads into private memory rather than memory-mapped:
        the loaded model then never depends on the file (replacing a checkpoint while it is cached
        cannot crash the host) and resident-memory figures count only what SDAccel holds.
        """
        wanted = [k for k in self.meta if k.startswith(prefix)] if keys is None else [k for k in keys if k in self.meta]
        if self._tensors is not None:
            return {k: self._tensors[k] for k in wanted}
        import torch

        out = {}
        try:
            with open(self.path, "rb") as fh:
                for key in sorted(wanted, key=lambda k: self.meta[k].offsets[0]):
                    meta = self.meta[key]
                    start, end = meta.offsets
                    dtype = getattr(torch, meta.dtype)
                    count = 1
                    for dim in meta.shape:
                        count *= dim
                    if end - start != count * torch.empty((), dtype=dtype).element_size():
                        raise CheckpointError(self.path, f"has a corrupt entry for {key!r} (size does not match "
                                              "its shape)", _REDOWNLOAD)
                    buf = bytearray(end - start)
                    fh.seek(self.data_start + start)
                    if fh.readinto(buf) != len(buf):
                        raise CheckpointError(self.path, "ended early while reading tensors (truncated)", _REDOWNLOAD)
                    tensor = torch.frombuffer(buf, dtype=dtype) if buf else torch.empty(0, dtype=dtype)
                    out[key] = tensor.reshape(meta.shape)
        except OSError as exc:
            raise CheckpointError(self.path, f"could not be read ({exc})", _REDOWNLOAD) from exc
        except AttributeError as exc:
            raise CheckpointError(self.path, f"holds a tensor type this PyTorch cannot read ({exc})",
                                  "Convert the file to fp16/fp32 safetensors") from exc
        return out

    def storage_dtype(self, prefix: str) -> str:
        """The floating dtype most tensors under `prefix` are stored in (for a lossless load)."""
        counts: dict[str, int] = {}
        for k, m in self.meta.items():
            if k.startswith(prefix) and m.dtype in ("float16", "bfloat16", "float32", "float64"):
                counts[m.dtype] = counts.get(m.dtype, 0) + 1
        if not counts:
            return "float32"
        best = max(counts, key=counts.get)
        return "float32" if best == "float64" else best


def open_checkpoint(path) -> CheckpointFile:
    """Open a single-file checkpoint by its content (not only its suffix) and describe its tensors."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(path, "no such file or folder",
                              "Check the path; ComfyUI and A1111 keep checkpoints in models/checkpoints or "
                              "models/Stable-diffusion")
    if path.is_dir():
        raise CheckpointError(path, "is a folder, not a checkpoint file",
                              "Pass a .safetensors/.ckpt file, or a diffusers folder holding model_index.json")
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(16)
    if size == 0:
        raise CheckpointError(path, "is empty (0 bytes)", _REDOWNLOAD)
    # safetensors first: its first byte is the low byte of the header length, which is 0x80 (a pickle's
    # protocol marker) for one valid file in 32. A plausible length decides, so that a download cut inside
    # its header is reported as cut short (a text file's first 8 bytes read as an absurd length).
    suffix = path.suffix.lower()
    plausible = len(head) >= 9 and 0 < int.from_bytes(head[:8], "little") <= _MAX_HEADER
    if plausible and (head[8:9] == b"{" or suffix in SAFETENSORS_SUFFIXES):
        return _open_safetensors(path, size)
    if head.startswith(b"PK\x03\x04") or (len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5):  # PROTO 2-5
        return _open_pickle(path, size, head)
    if _looks_like_text(path):
        raise CheckpointError(path, "is a text file, not model weights (it was probably renamed or is an "
                              "error page saved by a browser)", "Download the real checkpoint file")
    if suffix in SAFETENSORS_SUFFIXES:
        return _open_safetensors(path, size)
    if suffix in PICKLE_SUFFIXES:
        raise CheckpointError(path, "is not a PyTorch checkpoint (no zip or pickle signature)", _REDOWNLOAD)
    raise CheckpointError(path, f"has an unknown format (suffix {suffix or 'none'})",
                          "SDAccel reads .safetensors, .ckpt/.pt and diffusers folders")


def _looks_like_text(path: Path) -> bool:
    with open(path, "rb") as fh:
        sample = fh.read(4096)
    if not sample:
        return False
    try:
        sample.decode("utf-8")
    except UnicodeDecodeError:
        return False
    printable = sum(32 <= b < 127 or b in (9, 10, 13) for b in sample)
    return printable / len(sample) > 0.95


def _open_safetensors(path: Path, size: int) -> CheckpointFile:
    with open(path, "rb") as fh:
        raw_len = fh.read(8)
        if len(raw_len) < 8:
            raise CheckpointError(path, f"is only {size} bytes, too short to be a safetensors file", _REDOWNLOAD)
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > _MAX_HEADER or header_len > size - 8:
            if header_len > _MAX_HEADER and _looks_like_text(path):
                raise CheckpointError(path, "is a text file renamed to .safetensors, not model weights",
                                      "Download the real checkpoint file")
            raise CheckpointError(path, "is truncated or not a safetensors file (its header length is "
                                  f"{header_len} bytes but the file holds {size})", _REDOWNLOAD)
        header_bytes = fh.read(header_len)
    try:
        header = json.loads(header_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointError(path, "has a corrupt safetensors header", _REDOWNLOAD) from exc
    if not isinstance(header, dict):
        raise CheckpointError(path, "has a corrupt safetensors header", _REDOWNLOAD)
    meta: dict[str, TensorMeta] = {}
    data_end = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        problem = _entry_problem(info)
        if problem:
            raise CheckpointError(path, f"has a corrupt safetensors header entry for {key!r} ({problem})",
                                  _REDOWNLOAD)
        dtype, shape, (start, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        data_end = max(data_end, end)
        meta[key] = TensorMeta(shape, _ST_DTYPE_NAMES[dtype], (start, end))
    expected = 8 + header_len + data_end
    if size < expected:
        raise CheckpointError(path, f"is truncated: it holds {size} bytes but its header describes {expected} "
                              f"({(expected - size) / 2**20:.1f} MiB missing)", _REDOWNLOAD)
    return CheckpointFile(path, "safetensors", meta, size, data_start=8 + header_len)


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _entry_problem(info) -> str | None:
    """What is wrong with one tensor entry of a safetensors header, or None."""
    if not isinstance(info, dict):
        return f"expected an object, got {type(info).__name__}"
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in _ST_DTYPE_NAMES:
        return f"unknown dtype {dtype!r}"
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        return f"shape {shape!r} is not a list of sizes"
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
            and offsets[0] <= offsets[1]):
        return f"data_offsets {offsets!r} are not two ascending byte offsets"
    return None


def _unwrap_state_dict(obj):
    """Find the tensor dict inside a Lightning/LDM pickle ({'state_dict': {...}} and variants)."""
    import torch

    while isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        return None
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def _open_pickle(path: Path, size: int, head: bytes) -> CheckpointFile:
    import torch

    if head.startswith(b"PK") and not zipfile.is_zipfile(path):
        raise CheckpointError(path, "is a truncated or damaged zip archive", _REDOWNLOAD)
    try:  # from an open file: given a path, torch.load reads a `.safetensors` name as safetensors
        with open(path, "rb") as fh:
            obj = torch.load(fh, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = str(exc).splitlines()
        detail = next((line.strip() for line in reason if "Unsupported global" in line or "GLOBAL" in line),
                      reason[0] if reason else "")
        raise CheckpointError(
            path, f"was refused: its pickle asks to run code or build objects that are not plain weights "
            f"({detail}); SDAccel never executes code from checkpoint files",
            "Use a .safetensors version of this model, or convert it with a tool you trust") from exc
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        raise CheckpointError(path, f"could not be read as a PyTorch checkpoint ({exc})", _REDOWNLOAD) from exc
    tensors = _unwrap_state_dict(obj)
    if not tensors:
        raise CheckpointError(path, "holds no tensors", "Pick a model checkpoint, not a training state or config")
    meta = {k: TensorMeta(tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in tensors.items()}
    return CheckpointFile(path, "pickle", meta, size, _tensors=tensors)
