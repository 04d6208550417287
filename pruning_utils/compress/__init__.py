"""Other compression methods: depth pruning, low-rank, sparse + low-rank, INT8, GGUF export for llama.cpp, and
notebook 03b's comparison."""
