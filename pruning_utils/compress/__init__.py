"""Other compression methods: depth pruning, low-rank, sparse + low-rank, INT8, and notebook 03b's comparison."""
