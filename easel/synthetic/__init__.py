"""Synthetic weights: tiny random-weight models and full-size random checkpoints.

Each writer produces the exact on-disk format real weights use (diffusers folders, single-file
``.safetensors`` checkpoints, kohya/PEFT LoRAs, ONNX face models), so the real loading code runs
on them. Tests, benchmarks and the ``tiny``/``random`` model sources use them.
"""
