"""Real-time generation (StreamDiffusion's techniques, arXiv 2312.12491) on the engine's prepared pipelines.

`schedule.py` the per-step coefficients computed once per stream, `guidance.py` residual CFG, `similarity.py` the
stochastic similarity filter, `pipeline.py` the stream batch itself, `queues.py` the input and output threads.
"""
