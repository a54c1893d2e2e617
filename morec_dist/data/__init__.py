"""The data layer: prepared Parquet datasets, their validation, and streaming readers."""
