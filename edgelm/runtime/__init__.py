"""The runtime: llama.cpp models, contexts, sampling and generation."""
