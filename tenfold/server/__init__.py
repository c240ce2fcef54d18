"""Serving front ends: the `tenfold` command line (and, with the server issue, HTTP, gRPC and metrics)."""
