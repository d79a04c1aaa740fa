"""Fused Triton kernels for the OU smoothing ops, installed as ``hvae_fast.kernels``."""
