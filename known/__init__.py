"""KNOWN: the per-scalar hyper-model, KNOW prediction and its baselines."""


from meta.errors import OblivionError


class KnownError(OblivionError, ValueError):
    """The package's error base: a bad input (stages, a predictor source, a registry URI) named in one line,
    which the CLIs print and exit 2 on instead of a traceback."""
