"""`tenfold bench`: throughput and latency of serving many adapters, side by side with the bare base model and
vLLM's own LoRA path (see `runner`)."""
