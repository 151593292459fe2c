"""tandem.kernels."""
