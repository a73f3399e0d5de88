"""The meta-dataset: webdataset shards of sweeps, a parquet catalog, and streaming readers."""
