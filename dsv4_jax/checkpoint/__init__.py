"""Checkpoint I/O: safetensors reading, the released fp8/fp4 formats, tensor naming."""
