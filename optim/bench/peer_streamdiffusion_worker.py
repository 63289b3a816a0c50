"""Runs the `streamdiffusion` package (StreamDiffusion's own pipeline) over a clip and prints one JSON line.

Started by `bench stream --streamdiffusion-python` as a plain script with the Python of a venv that has the package
(it pins diffusers 0.24, so it cannot share the engine's venv); it imports nothing of SDAccel. The folder holds the
very weights SDAccel's rows ran (a diffusers folder) and `frames.pt`, the clip. On a machine without CUDA the
package's own timing calls (`torch.cuda.Event`, `torch.cuda.synchronize`, in `StreamDiffusion.__call__`) cannot run;
they are replaced by wall-clock stand-ins, which is reported (`cuda_timing_replaced`), and nothing else is changed.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time


class _WallClockEvent:
    """What `torch.cuda.Event(enable_timing=True)` does, with the CPU's clock."""

    def __init__(self, *args, **kwargs):
        self._t = None

    def record(self, *args, **kwargs):
        self._t = time.perf_counter()

    def elapsed_time(self, end) -> float:
        return (end._t - self._t) * 1000.0


def main() -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    with open(sys.argv[1], encoding="utf-8") as fh:
        settings = json.load(fh)
    import torch

    replaced = not torch.cuda.is_available()
    if replaced:
        torch.cuda.Event = _WallClockEvent
        torch.cuda.synchronize = lambda *args, **kwargs: None
    from diffusers import StableDiffusionPipeline
    from PIL import Image
    from streamdiffusion import StreamDiffusion

    torch.set_num_threads(settings["threads"])
    folder, size = settings["folder"], settings["size"]
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    stream = StreamDiffusion(pipe, t_index_list=settings["t_index_list"], torch_dtype=torch.float32, width=size,
                             height=size, cfg_type="none")
    stream.prepare(settings["prompt"], num_inference_steps=50)
    clip = torch.load(os.path.join(folder, "frames.pt"), weights_only=True)
    images = [Image.fromarray((f[0].permute(1, 2, 0) * 255).round().byte().numpy()) for f in clip]
    warmup = settings["warmup"]
    for image in images[:warmup]:
        stream(image)
    times = []
    for image in images[warmup:]:
        start = time.perf_counter()
        stream(image)
        times.append(time.perf_counter() - start)
    ordered = sorted(times)
    print(json.dumps({"fps": len(times) / sum(times), "frames": len(times), "wall_s": sum(times),
                      "latency_p50_s": ordered[len(ordered) // 2], "latency_p95_s": ordered[-1] if len(ordered) < 20
                      else ordered[int(0.95 * (len(ordered) - 1))], "median_frame_s": statistics.median(times),
                      "cuda_timing_replaced": replaced, "t_index_list": settings["t_index_list"],
                      "timesteps": [int(t) for t in getattr(stream, "sub_timesteps", [])]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
