"""Adaptive runtime: nested pruned model, prompt complexity, machine telemetry, the level controller."""
