"""KNOWN: the per-scalar hyper-model, KNOW prediction and its baselines."""
