"""Inference: the Triton Inference Server gpulab manages, and its model repository."""
