"""Serving front ends: the `tenfold` command line, the HTTP server (vLLM's OpenAI app with tenfold's routes), gRPC and
metrics."""
