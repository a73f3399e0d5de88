"""Forgetting-sweep collection: data, architecture zoo, sweeps, and the Ray collection job."""

__version__ = "0.1.0"
