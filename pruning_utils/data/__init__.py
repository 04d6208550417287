"""Text sources, calibration mixtures and the model's own sampled text."""
