"""hvae-fast: Hermite variational autoencoders with fused OU-smoothing kernels."""

__version__ = "0.1.0"
