"""Host-native patches: the units' numerical work on a host's own UNet in the original LDM layout
(ComfyUI, A1111 and Forge all hold one), installed for one sampling run and removed after it.

Host-free: these modules see only torch modules and plain arguments; the host adapters (nodes/ for ComfyUI)
decide when a run starts and which weights the host uses.
"""
