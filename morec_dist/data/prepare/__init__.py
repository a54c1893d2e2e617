"""Dataset preparation: turn a source (MovieLens-1M, or a synthetic generator) into the
prepared Parquet layout of ``morec_dist.data.schema``."""
