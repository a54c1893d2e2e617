"""Shared fixtures: the prepared reference dataset (cached across runs) and small synthetic ones."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest

from morec_dist.data.dataset import DatasetError, PreparedDataset

REPO = Path(__file__).resolve().parent.parent
# fixtures that several test modules share, each in the module of its kind
pytest_plugins = ["tests.e2e_fixtures", "tests.prometheus_server"]
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


def free_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path):
    """A real Ray head on loopback (launch/ray_head.sh: token auth, no dashboard), stopped after."""
    port = free_tcp_port()
    env = {**os.environ, "MOREC_RAY_STATE": str(tmp_path / "ray-state")}
    script = str(REPO / "launch" / "ray_head.sh")
    subprocess.run(
        ["bash", script, "--port", str(port), "--num-cpus", "2", "--object-store-mb", "100"],
        check=True,
        env=env,
        timeout=120,
        capture_output=True,
    )
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run(["bash", script, "--stop", "--port", str(port)], env=env, timeout=120, capture_output=True)


def toy_group_stats(**extra):
    """Group statistics of a tiny made-up dataset for the coordinator's unit tests."""
    import numpy as np

    from morec_dist.coordinator.sampler import GroupStats

    return GroupStats(
        num_groups={"fair_group": 4, "align_group": 3, "rev_group": 2},
        train_counts={
            "fair_group": np.array([40.0, 30.0, 20.0, 10.0]),
            "align_group": np.array([50.0, 30.0, 20.0]),
            "rev_group": np.array([60.0, 40.0]),
        },
        mean_prices={"rev_group": np.array([30.0, 10.0])},
        **extra,
    )
