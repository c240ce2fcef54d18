"""The vLLM plugin: tenfold's adapters served through vLLM's LoRA request machinery (`vllm_compat.py` lists every
change it makes to vLLM)."""
