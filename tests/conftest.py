"""Shared fixtures: the prepared reference dataset (cached across runs) and small synthetic ones."""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import typing
from collections.abc import Iterator
from pathlib import Path

import pytest

from morec_dist.data.dataset import DatasetError, PreparedDataset

REPO = Path(__file__).resolve().parent.parent
# fixtures that several test modules share, each in the module of its kind
pytest_plugins = ["tests.e2e_fixtures", "tests.prometheus_server"]
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(autouse=True)
def _environment_restored():
    """os.environ as it was before each test: a variable a test (or the in-process CLI it
    calls) sets does not reach the tests after it. Use monkeypatch.setenv in tests."""
    before = dict(os.environ)
    yield
    if dict(os.environ) != before:
        os.environ.clear()
        os.environ.update(before)


def _live_registries() -> list:
    """Every Registry held at module level by an imported morec_dist module."""
    from morec_dist.registry import Registry

    found: dict[int, Registry] = {}
    for name, module in list(sys.modules.items()):
        if name.startswith("morec_dist") and module is not None:
            for value in list(vars(module).values()):
                if isinstance(value, Registry):
                    found[id(value)] = value
    return list(found.values())


_INSTALLED = (
    *{sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")},
    str(REPO / "morec_dist"),
)


def _outside_installation(module: object) -> bool:
    """A module from neither the Python installation / venv nor morec_dist: a plugin or
    helper a test imported (from tests/plugins or a tmp_path)."""
    file = str(getattr(module, "__file__", None) or "")
    return bool(file) and not file.startswith(_INSTALLED)


# every module that holds a Registry at module level (tests/test_harness.py checks the list
# against the source): imported before the first test, so each registry's own parts are in
# the snapshot below and a part a test registers is always the test's to undo
REGISTRY_MODULES = (
    "morec_dist.coordinator.baselines",
    "morec_dist.coordinator.laws",
    "morec_dist.coordinator.objectives",
    "morec_dist.eval.metrics",
    "morec_dist.eval.signal_kinds",
    "morec_dist.model.choices",
    "morec_dist.model.loss",
    "morec_dist.model.registry",
    "morec_dist.train.methods",
)


@pytest.fixture(scope="session", autouse=True)
def _registries_imported():
    for name in REGISTRY_MODULES:
        importlib.import_module(name)


@pytest.fixture(autouse=True)
def _registries_restored(_registries_imported):
    """The registries (models, losses, objective kinds, ...) as they were before each test,
    and the plugin modules it imported forgotten, so a later import registers them again:
    a part one test registers is never silently present, or half present, in the next."""
    saved = [(registry, dict(registry._entries)) for registry in _live_registries()]
    modules = set(sys.modules)
    yield
    for registry, entries in saved:
        if registry._entries != entries:
            registry._entries.clear()
            registry._entries.update(entries)
    for name in set(sys.modules) - modules:
        if _outside_installation(sys.modules[name]):
            del sys.modules[name]


# the code a prepared dataset's bytes depend on: a change to any of these makes a cached
# preparation stale
PREPARATION_SOURCES = ("morec_dist/data/prepare/*.py", "morec_dist/data/schema.py")
MOVIELENS_CACHE = REPO / ".data" / "tests"


def preparation_fingerprint() -> str:
    """sha256 over the preparation code (PREPARATION_SOURCES), path and bytes of each file."""
    digest = hashlib.sha256()
    for path in sorted(p for pattern in PREPARATION_SOURCES for p in REPO.glob(pattern)):
        digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


@pytest.fixture(scope="session")
def movielens_dir() -> Path:
    """MovieLens-1M as the current preparation code writes it, in a directory the tests own
    (.data/tests/movielens-1m-<fingerprint of that code>), prepared when missing and reused
    across runs (the download is cached too). A user's .data/movielens-1m is never read: it
    may have been made by older code. Preparations by older code are removed."""
    from morec_dist.data.prepare.movielens import prepare_movielens_1m

    path = MOVIELENS_CACHE / f"movielens-1m-{preparation_fingerprint()}"
    for stale in MOVIELENS_CACHE.glob("movielens-1m-*"):
        if stale != path and stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
    try:
        PreparedDataset.open(path, verify_values=False)
    except DatasetError:  # missing or incomplete (an interrupted preparation)
        prepare_movielens_1m(path, overwrite=True)
    return path


@pytest.fixture(scope="session")
def small_synthetic(tmp_path_factory) -> Path:
    from morec_dist.data.prepare.synthetic import generate

    return generate(tmp_path_factory.mktemp("syn") / "small", users=500, items=300, rows=30_000, seed=7)


# fixtures that start what `make test-fast` leaves out: a pretraining under torchrun
# (pretrained), the MovieLens download and preparation (movielens_dir), a real Prometheus
# (prometheus). A test that uses one, however indirectly, is marked slow here, so
# `-m "not slow"` excludes it even where its module forgot the mark.
SLOW_FIXTURES = frozenset({"pretrained", "movielens_dir", "prometheus"})


@pytest.hookimpl(tryfirst=True)  # before the -m selection reads the marks
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def in_ci() -> bool:
    """CI=true (set by .ci/run, and by most CI services): the run that must prove everything."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def skip_or_fail_in_ci(reason: str) -> typing.NoReturn:
    """A test that cannot run here (not root, a tool missing) skips on a developer's
    machine but fails in CI, where a skip would let the run pass without the test."""
    if in_ci():
        pytest.fail(f"CI=true and this test cannot run: {reason}", pytrace=False)
    pytest.skip(reason)


def free_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_ray_head(state: Path) -> Iterator[str]:
    """A real Ray head on loopback (launch/ray_head.sh: token auth, no dashboard, its state
    under ``state``), stopped on exit; yields its address."""
    port = free_tcp_port()
    env = {**os.environ, "MOREC_RAY_STATE": str(state)}
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


@pytest.fixture
def ray_head(tmp_path):
    """A real Ray head for one test (``running_ray_head``)."""
    with running_ray_head(tmp_path / "ray-state") as address:
        yield address


@pytest.fixture(scope="session")
def shared_ray_head(tmp_path_factory):
    """One Ray head for the session's fine-tunes whose subject is not Ray's start-up: a job
    given ``coordinator.ray_address`` starts no head of its own (3-15 s each on this machine,
    by load). Each job names its own ``coordinator.namespace`` (``e2e_fixtures.on_ray``), so
    no job can meet another's actor. The embedded head stays covered by the jobs that keep
    the default (the shared fine-tuning, the listeners, fault and container tests)."""
    with running_ray_head(tmp_path_factory.mktemp("shared-ray") / "state") as address:
        yield address


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
