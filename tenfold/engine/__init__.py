"""The vLLM plugin: tenfold's adapters served through vLLM's LoRA request machinery (see the plugin issue)."""
