"""Runs optimum-intel's OpenVINO Stable Diffusion pipeline on a diffusers folder and prints one JSON line.

Started by `bench --optimum` as a plain script (`python peer_optimum_worker.py SETTINGS.json`) with whichever Python has
optimum-intel installed, so it imports nothing of SDAccel: optimum-intel pins transformers and pulls torchvision,
which a venv of its own keeps away from the engine's. The folder holds the very weights SDAccel's rows ran and
`latents.pt`, the initial noise of SDAccel's baseline, so the images can be compared.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time


def _peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def main() -> int:
    # run as a script, this file's folder comes first on sys.path: none of its neighbours may shadow a package
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    with open(sys.argv[1], encoding="utf-8") as fh:
        settings = json.load(fh)
    import numpy as np
    import torch
    from optimum.intel import OVStableDiffusionPipeline

    folder, size, steps = settings["folder"], settings["size"], settings["steps"]
    ov_config = {"INFERENCE_PRECISION_HINT": "f32"} if settings["precision"] == "f32" else {}
    start = time.perf_counter()
    pipe = OVStableDiffusionPipeline.from_pretrained(folder, export=True, compile=False, ov_config=ov_config)
    pipe.reshape(batch_size=1, height=size, width=size, num_images_per_prompt=1)
    pipe.compile()
    setup_s = time.perf_counter() - start
    latents = torch.load(f"{folder}/latents.pt", weights_only=True)
    kwargs = {"prompt": settings["prompt"], "negative_prompt": settings.get("negative") or None,
              "num_inference_steps": steps, "guidance_scale": settings["cfg"], "height": size, "width": size,
              "latents": latents, "output_type": "np"}
    times, image = [], None
    for i in range(settings["warmup"] + settings["repeats"]):
        t0 = time.perf_counter()
        image = pipe(**kwargs).images
        if i >= settings["warmup"]:
            times.append(time.perf_counter() - t0)
    np.save(settings["image_out"], np.asarray(image, dtype=np.float32))
    print(json.dumps({"runs_s": times, "median_s": statistics.median(times), "setup_s": setup_s,
                      "peak_mem_mb": _peak_rss_mb(), "precision": settings["precision"],
                      "openvino_precision_hint": pipe.unet.request.get_property("INFERENCE_PRECISION_HINT").__str__()
                      if hasattr(pipe.unet, "request") and pipe.unet.request is not None else None}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
