"""Per-shape choice between F.conv2d and Winograd, measured once per machine and kept on disk.

For each convolution shape met (input size, channels, dtype, device, threads) the candidates are
timed side by side (warm-up, then the median of a few repeats) and the fastest kept, with a margin:
Winograd must beat F.conv2d by `MARGIN` or the layer stays on F.conv2d, so no shape runs slower
than before beyond noise. Results are cached per machine in a JSON file (written atomically; a
damaged file, or one from an older way of measuring, is ignored and rebuilt).

Every timed call starts with the CPU caches flushed and only the input re-read, as inside a model:
there the previous layer has just written the input, while this layer's weights (or its transformed
filters, 4x larger for F(4,3)) come from DRAM. Timed hot, as a loop over one layer runs, SD1.5's UNet
convolutions summed 2.11x faster with Winograd, but a whole UNet step only 1.05x.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import statistics
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .paths import default_cache_dir
from .winograd import Workspace, filter_transform, mkldnn_linear_available, pack_filters, winograd_conv2d

log = logging.getLogger(__name__)

MARGIN = 0.97  # Winograd is chosen only when it takes at most 97% of F.conv2d's time
MEASUREMENT = "cold-weights-workspace-v4"  # how timings were taken; files measured otherwise are re-measured
DEFAULT_TILES = (2, 4)  # eager transforms: F(6,3)'s larger transforms cost more than its products save
DEFAULT_BANDS = (0, 1, 2, 4, 8)
FUSED_TILES = (2, 4, 6)  # compiled transforms (cpukernels/fused.py): F(6,3) wins on the large maps
FUSED_BANDS = (0, 2, 4, 8, 16)


def machine_key() -> str:
    """Calibration results belong to one CPU model and thread count."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    raw = f"{cpu}|{torch.__version__}|{torch.get_num_threads()}"
    return hashlib.sha1(raw.encode()).hexdigest()[:12]


def shape_key(n: int, c: int, k: int, h: int, w: int, pad: int, dtype: torch.dtype, device: torch.device, *,
              channels_last: bool = False, fused: bool = False, native: bool = False) -> str:
    """One calibration entry: the shape, its memory layout, and the engines that would run it."""
    engine = "native" if native else ("onednn" if mkldnn_linear_available() else "bmm") + ("-fused" if fused else "")
    layout = "-nhwc" if channels_last else ""
    return (f"n{n}-c{c}-k{k}-h{h}-w{w}-p{pad}-{str(dtype).replace('torch.', '')}-{torch.device(device).type}"
            f"{layout}-{engine}")


def last_level_cache_bytes() -> int:
    """The largest CPU cache (sysfs on Linux), or 64 MiB where it cannot be read."""
    sizes = []
    root = Path("/sys/devices/system/cpu/cpu0/cache")
    for index in root.glob("index*") if root.is_dir() else ():
        try:
            text = (index / "size").read_text().strip().upper()
            sizes.append(int(text[:-1]) * {"K": 2**10, "M": 2**20, "G": 2**30}[text[-1]] if text[-1] in "KMG"
                         else int(text))
        except (OSError, ValueError, KeyError):
            continue
    return max(sizes) if sizes else 64 * 2**20


_FLUSH: list = []


def flush_caches() -> None:
    """Evict the CPU caches by reading and writing a buffer twice the last-level cache (at most 512 MiB)."""
    if not _FLUSH:
        _FLUSH.append(torch.zeros(min(2 * last_level_cache_bytes(), 512 * 2**20) // 4))
    _FLUSH[0].add_(1.0)


def _times(fn, count: int, before=None) -> list[float]:
    """Wall times of `count` calls of `fn`; `before()` runs untimed ahead of every call."""
    times = []
    for _ in range(count):
        if before is not None:
            before()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


SCREEN = 1.15  # candidates whose first timing is within 15% of the fastest are timed again


def _example(n, c, k, h, w, dtype, device, seed: int, channels_last: bool):
    """A random input, weight (scaled like a trained layer's) and zero bias for timing one shape."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g).to(device, dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = (torch.randn(k, c, 3, 3, generator=g) / (3 * c ** 0.5)).to(device, dtype)
    return x, weight, torch.zeros(k, dtype=dtype, device=device)


def measure_shape(n, c, k, h, w, pad, dtype=torch.float32, device="cpu", *, tiles=DEFAULT_TILES,
                  bands=DEFAULT_BANDS, repeats: int = 3, seed: int = 0, channels_last: bool = False,
                  fused: bool = False, native: bool = False, progress=None) -> dict:
    """Time F.conv2d against the Winograd tile/band candidates for one shape (in the given memory layout, with
    the eager or the compiled transforms); return the timings (seconds per call, by candidate).

    A staged search rather than every tile with every band: each tile on the whole map first, then the bands of
    the fastest tile only (a band keeps a tile's working set in cache; it does not change which tile does fewer
    multiplications). Each candidate gets a warm-up and one timing; F.conv2d, and the candidates within
    `SCREEN` of the fastest, then get `repeats` timings in all (the median is kept), so a clearly slower
    candidate costs two calls instead of `repeats + 1`. SD1.5's UNet at 512x512 (18 shapes, batch 2, eager
    transforms, a 2-core AMD EPYC): 39.7 s instead of the full search's 77.2 s.

    `progress(done, total)`, if given, is called before each candidate; it may raise (an interrupt) to stop:
    nothing of this shape is then kept.

    `native`: the candidates are the native kernel's (cpukernels/native.py) instead, see `_measure_native`.
    """
    if native:
        return _measure_native(n, c, k, h, w, pad, dtype, device, repeats=repeats, seed=seed,
                               channels_last=channels_last, progress=progress)
    x, weight, bias = _example(n, c, k, h, w, dtype, device, seed, channels_last)

    def cold_weights() -> None:  # as in a model: the input was just written, the weights were not
        if x.device.type == "cpu":
            flush_caches()
            x.add_(0.0)

    tiles_h = {m: -(-(h + 2 * pad - 2) // m) for m in tiles}
    tiles_w = {m: -(-(w + 2 * pad - 2) // m) for m in tiles}
    bands = [b for b in bands if b]  # band 0 (the whole map) is each tile's first candidate
    max_band_count = max((sum(1 for b in bands if b < tiles_h[m]) for m in tiles), default=0)
    total = 1 + len(tiles) + max_band_count
    workspace = Workspace()  # as the adapter runs it: scratch buffers reused between calls
    filters: dict[int, torch.Tensor] = {}
    calls: dict[str, object] = {}
    samples: dict[str, list[float]] = {}

    def winograd(m: int, band: int):
        if m not in filters:
            filters[m] = filter_transform(weight, m)
        packed = pack_filters(filters[m], n * (band or tiles_h[m]) * tiles_w[m])
        return lambda: winograd_conv2d(x, filters[m], bias, m=m, padding=pad, band_tiles=band or None,
                                       packed=packed, workspace=workspace, fused=fused)

    def screen(name: str, fn) -> None:
        if progress is not None:
            progress(len(samples), total)
        calls[name] = fn
        samples[name] = _times(fn, 2, cold_weights)[1:]  # the first call is the warm-up

    with torch.inference_mode():
        screen("conv2d", lambda: F.conv2d(x, weight, bias, padding=pad))
        for m in tiles:
            screen(f"f{m}b0", winograd(m, 0))
        best_tile = min(tiles, key=lambda m: samples[f"f{m}b0"][0])
        for band in bands:
            if band < tiles_h[best_tile]:  # a band as tall as the image is the whole image
                screen(f"f{best_tile}b{band}", winograd(best_tile, band))
        fastest = min(times[0] for times in samples.values())
        for name, times in samples.items():
            if name == "conv2d" or times[0] <= fastest * SCREEN:
                times.extend(_times(calls[name], repeats - 1, cold_weights))
    if progress is not None:
        progress(total, total)
    return {name: statistics.median(times) for name, times in samples.items()}


# The native kernel's candidates: tile m, and how the work is split: blocks of T output tiles ("t", large maps) or
# chunks of Kc output channels over all tiles ("k", small maps with large filters). Timed with the filters
# transformed inside the call ("on the fly", what runs when no memory is set aside for them); each tile's fastest
# is then also timed with stored filters (suffix "s"), which tells the filter budget what keeping them would save
# (on small maps a smaller tile's kept filters can beat a larger tile on the fly; on the largest layers, where the
# products wait on memory, streaming the weight once beats reading the larger transformed filters).
NATIVE_SPLITS = (("t", 32), ("k", 32))
BY_CHANNELS_MAX_BYTES = 64 * 2**20  # the by-channels split's transformed input of every tile, at most
NATIVE_REFINE = {"t": (16, 64), "k": (16, 64)}


def native_tiles(ho: int, wo: int) -> tuple[int, ...]:
    """Tiles worth timing for an output map: F(2,3) only pays on small maps (its filters are the smallest to
    stream), F(6,3) only on large ones (its transforms are the most expensive per output)."""
    side = min(ho, wo)
    if side <= 16:
        return (2, 4)
    if side < 64:
        return (4,)
    return (4, 6)


def native_name(m: int, split: str, block: int, stored: bool = False) -> str:
    return f"n{m}{split}{block}" + ("s" if stored else "")


def _measure_native(n, c, k, h, w, pad, dtype, device, *, repeats: int, seed: int, channels_last: bool,
                    progress) -> dict:
    from .native import native_ops, release_scratch

    ops = native_ops()
    x, weight, bias = _example(n, c, k, h, w, dtype, device, seed, channels_last)
    ho, wo = h + 2 * pad - 2, w + 2 * pad - 2
    tiles = native_tiles(ho, wo)

    def cold_weights() -> None:
        flush_caches()
        x.add_(0.0)

    def call(m: int, split: str, block: int, filters):
        return lambda: ops.conv2d(x, filters, bias, m, pad, block, False, split == "k")

    samples: dict[str, list[float]] = {}
    calls: dict[str, object] = {}
    total = 1 + len(tiles) * len(NATIVE_SPLITS) + 2 + len(tiles)

    def screen(name: str, fn) -> None:
        if progress is not None:
            progress(len(samples), total)
        calls[name] = fn
        samples[name] = _times(fn, 2, cold_weights)[1:]

    def splits(m: int):
        """The by-channels split holds every tile's transformed input at once: only for maps where that is small."""
        tiles_all = n * -(-ho // m) * -(-wo // m)
        fits = (m + 2) ** 2 * tiles_all * c * 4 <= BY_CHANNELS_MAX_BYTES
        return [(split, block) for split, block in NATIVE_SPLITS if split == "t" or fits]

    with torch.inference_mode():
        screen("conv2d", lambda: F.conv2d(x, weight, bias, padding=pad))
        for m in tiles:
            for split, block in splits(m):
                screen(native_name(m, split, block), call(m, split, block, weight))
        best = min((t[0], name) for name, t in samples.items() if name != "conv2d")[1]
        m, split, block = parse_native(best)
        for other in NATIVE_REFINE[split]:
            screen(native_name(m, split, other), call(m, split, other, weight))
        for m in tiles:  # each tile's best split, with its filters kept: what the filter budget can buy
            best = min((t[0], name) for name, t in samples.items() if name != "conv2d" and name[1] == str(m))[1]
            _, split, block = parse_native(best)
            stored = ops.transform_filters(weight, m, False)
            screen(native_name(m, split, block, stored=True), call(m, split, block, stored))
        fastest = min(times[0] for times in samples.values())
        for name, times in samples.items():
            if name == "conv2d" or times[0] <= fastest * SCREEN:
                times.extend(_times(calls[name], repeats - 1, cold_weights))
    release_scratch()  # the candidates' scratch is not what the chosen one will hold
    if progress is not None:
        progress(total, total)
    return {name: statistics.median(times) for name, times in samples.items()}


def parse_native(name: str) -> tuple[int, str, int] | None:
    """(tile m, split "t"/"k", block) of a native timing entry n{m}{split}{block}[s]; None for others."""
    if len(name) < 4 or name[0] != "n" or name[2] not in "tk" or not name[1].isdigit():
        return None
    digits = name[3:].rstrip("s")
    return (int(name[1]), name[2], int(digits)) if digits.isdigit() else None


def parse_candidate(name: str) -> tuple[int, int] | None:
    """(tile m, band) of a Winograd timing entry named f{m}b{band}; None for F.conv2d and other entries."""
    if not name.startswith("f") or name.startswith("filter"):
        return None
    return int(name[1:name.index("b")]), int(name[name.index("b") + 1:])


def ranked_choices(timings: dict) -> list[tuple[str, int, int]]:
    """Winograd candidates within the margin of F.conv2d, fastest first (ties in measurement order), then
    ("conv2d", 0, 0): a layer whose filters find no room takes the next one. Native candidates come as
    ("native", m, block) with block > 0 for T tiles per work item and block < 0 for -Kc channels per work item,
    ranked by their time with the filters transformed on the fly (which needs no room)."""
    base = timings["conv2d"]
    fast = []
    for name, t in timings.items():
        if t > base * MARGIN:
            continue
        tile_band = parse_candidate(name)
        native = parse_native(name)
        if tile_band is not None:
            fast.append((t, ("winograd", *tile_band)))
        elif native is not None and not name.endswith("s"):
            m, split, block = native
            fast.append((t, ("native", m, block if split == "t" else -block)))
    fast.sort(key=lambda item: item[0])
    return [choice for _, choice in fast] + [("conv2d", 0, 0)]


def stored_alternative(timings: dict, choice: tuple[str, int, int]) -> tuple[float, tuple[str, int, int]] | None:
    """(seconds per call saved, the native choice to run) when a layer keeps its filters instead of running
    `choice` with them transformed on the fly; None when keeping them saves nothing (or was not measured)."""
    kind, m, block = choice
    if kind != "native":
        return None
    current = timings.get(native_name(m, "t" if block > 0 else "k", abs(block)))
    kept = [(t, parse_native(name)) for name, t in timings.items() if name.endswith("s") and parse_native(name)]
    if current is None or not kept:
        return None
    t, (km, split, kblock) = min(kept)
    if t >= current:
        return None
    return current - t, ("native", km, kblock if split == "t" else -kblock)


def best_choice(timings: dict) -> tuple[str, int, int]:
    """("conv2d", 0, 0) or ("winograd", m, band) from a timing table, honouring the margin."""
    return ranked_choices(timings)[0]


class Calibration:
    """The per-machine table of measured choices, loaded from and saved to disk."""

    def __init__(self, folder: Path | None = None, *, tiles=None, bands=None, repeats: int = 3, fused: bool = False,
                 native: bool = False):
        """`fused`: measure (and later run) the compiled transforms; the caller checks `fused_transforms_work()`.
        `native`: measure the native kernel's candidates; the caller checks `native.native_ops()`."""
        self.folder = Path(folder) if folder else default_cache_dir()
        self.path = self.folder / f"winograd-{machine_key()}.json"
        self.fused = fused
        self.native = native
        self.tiles = tuple(tiles or (FUSED_TILES if fused else DEFAULT_TILES))
        self.bands = tuple(bands or (FUSED_BANDS if fused else DEFAULT_BANDS))
        self.repeats = repeats
        self.table: dict[str, dict] = self._load()
        self.measured_s = 0.0
        self.measured_shapes = 0
        self._lock = threading.Lock()

    def _load(self) -> dict:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            if isinstance(data, dict) and isinstance(data.get("shapes"), dict):
                if data.get("measurement") == MEASUREMENT:
                    return data["shapes"]
                log.info("re-measuring Winograd calibration %s (taken the old way)", self.path)
                return {}
            log.warning("ignoring malformed Winograd calibration %s", self.path)
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable Winograd calibration %s (%s); it will be rebuilt", self.path, exc)
        return {}

    def save(self) -> None:
        # cpukernels/ stands alone (torch and the standard library only), so it keeps its own complete-or-absent
        # write rather than optim's helper: a failed write leaves the old table and no partial file.
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.stem}.{os.getpid()}.partial{self.path.suffix}")
        try:
            tmp.write_text(json.dumps({"measurement": MEASUREMENT, "machine": machine_key(),
                                       "torch": torch.__version__, "threads": torch.get_num_threads(),
                                       "shapes": self.table}, indent=1), encoding="utf-8")
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def known(self, n, c, k, h, w, pad, dtype, device, channels_last: bool = False) -> bool:
        """Whether this shape is already measured (asking for its timings then costs nothing)."""
        return shape_key(n, c, k, h, w, pad, dtype, device, channels_last=channels_last,
                         fused=self.fused, native=self.native) in self.table

    def timings(self, n, c, k, h, w, pad, dtype, device, channels_last: bool = False, progress=None) -> dict:
        """The shape's timings, measured now if this machine has not measured it (`progress` as in
        `measure_shape`: an exception it raises stops the measurement and keeps nothing of it)."""
        key = shape_key(n, c, k, h, w, pad, dtype, device, channels_last=channels_last, fused=self.fused,
                        native=self.native)
        with self._lock:
            entry = self.table.get(key)
            if entry is None:
                start = time.perf_counter()
                entry = measure_shape(n, c, k, h, w, pad, dtype, device, tiles=self.tiles, bands=self.bands,
                                      repeats=self.repeats, channels_last=channels_last, fused=self.fused,
                                      native=self.native, progress=progress)
                seconds = time.perf_counter() - start
                self.measured_s += seconds
                self.measured_shapes += 1
                log.info("winograd: measured %s in %.1f s", key, seconds)
                self.table[key] = entry
                self.save()
            return entry

    def other_batch(self, n, c, k, h, w, pad, dtype, device, channels_last: bool = False) -> tuple[int, dict] | None:
        """(batch, timings scaled to batch `n`) of this shape measured at the nearest other batch size, or None.

        A host meets the same layer at two batch sizes (ComfyUI runs the conditional and unconditional passes
        batched or one by one as memory allows; a CFG cutoff drops to one): the ranking of the candidates follows
        the layer's shape, and the time per call grows with the batch, so a known batch stands in for an unknown
        one instead of measuring the layer again (at 512x512 that is about half a minute per layout)."""
        key = shape_key(n, c, k, h, w, pad, dtype, device, channels_last=channels_last, fused=self.fused,
                        native=self.native)
        rest = key.split("-", 1)[1]
        found = []
        for other, entry in self.table.items():
            head, _, tail = other.partition("-")
            if tail == rest and head[1:].isdigit() and int(head[1:]) != n:
                found.append((abs(int(head[1:]) - n), int(head[1:]), entry))
        if not found:
            return None
        _, batch, entry = min(found, key=lambda item: item[:2])
        return batch, {name: t * n / batch for name, t in entry.items()}

    def choose(self, n, c, k, h, w, pad, dtype, device, channels_last: bool = False) -> tuple[str, int, int]:
        """The fastest way to run this shape (F.conv2d unless Winograd wins by the margin)."""
        return best_choice(self.timings(n, c, k, h, w, pad, dtype, device, channels_last))
