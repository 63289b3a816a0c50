"""Numerical kernels: Winograd convolution as pure torch functions, a Conv2d adapter and a reversible patcher.

Imports torch only (never a host, never the engine), so the kernels can be tested and reused alone.
"""
