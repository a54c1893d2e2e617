"""Shared fixtures: the prepared reference dataset (cached across runs) and small synthetic ones."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from morec_dist.data.dataset import DatasetError, PreparedDataset

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session")
def movielens_dir() -> Path:
    """MovieLens-1M prepared once into .data/ and reused (the download is cached too)."""
    from morec_dist.data.prepare.movielens import prepare_movielens_1m

    path = REPO / ".data" / "movielens-1m"
    try:
        PreparedDataset.open(path, verify_values=False)
    except DatasetError:
        prepare_movielens_1m(path, overwrite=True)
    return path


@pytest.fixture(scope="session")
def small_synthetic(tmp_path_factory) -> Path:
    from morec_dist.data.prepare.synthetic import generate

    return generate(tmp_path_factory.mktemp("syn") / "small", users=500, items=300, rows=30_000, seed=7)
