"""Triton GPU kernels for each family's on-the-fly apply, each beside its torch twin (see the kernels issue)."""
