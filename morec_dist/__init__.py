"""morec_dist: MoRec multi-objective recommender training on TorchRec, Ray and Parquet."""

__version__ = "0.1.0"
