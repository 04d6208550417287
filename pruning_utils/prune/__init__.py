"""The pruning method: calibration passes, importance criteria, allocation, budget search, least-squares refit."""
