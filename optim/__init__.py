"""SDAccel's host-free engine: specs, loaders, optimization units, sampler and benchmarks.

Nothing here imports ComfyUI, A1111 or gradio, and importing the package does no work:
submodules are imported where they are used.
"""
