"""The A1111/Forge host adapter: the SDAccel tab (the web UI's Blocks inside the host) and the txt2img/img2img
accordion that applies SDAccel's host-native units to the host's own UNet for one generation.

`scripts/sdaccel.py` is the entry A1111 loads; it imports this package lazily. Host modules (`modules.*`) are
imported only inside functions, at run time in the host.
"""
