"""SDAccel's gradio front-end and A1111-compatible API, shared by the standalone `python -m sdaccel webui` and
the A1111/Forge tab (`scripts/`). Importing the package does no work; gradio is imported only where it is used.
"""
