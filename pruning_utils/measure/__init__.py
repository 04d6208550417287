"""Measurement: perplexity, fidelity, KL, latency, memory, the semantic judge, and variant rows."""
