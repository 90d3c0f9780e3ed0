"""Bridges to serving runtimes that load sparsecraft models without sparsecraft's own server (`vllm/`)."""
