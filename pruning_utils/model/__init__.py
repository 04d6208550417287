"""Model plumbing: the architecture adapter, hooks, pruning plans, surgery, checkpoints, loading,
layer-wise calibration."""
