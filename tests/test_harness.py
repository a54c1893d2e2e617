"""The test harness's own guarantees: a job run by a test ends whole (torchrun's ranks sit
in sessions of their own), a root-only test fails rather than skips in CI, and neither
the environment nor a registry change leaks from one test into the next."""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from morec_dist.model.loss import LOSSES  # imported before the tests: see test_leak_2
from tests.conftest import REGISTRY_MODULES, REPO, skip_or_fail_in_ci
from tests.procs import run_job

# a parent that starts a child in a session of its own, as torch's elastic agent starts each
# rank, writes the child's pid, then waits (or exits at once, orphaning it)
PARENT = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
open(sys.argv[1], "w").write(str(child.pid))
if sys.argv[2] == "wait":
    time.sleep(600)
"""


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def test_a_timed_out_job_ends_with_the_rank_in_its_own_session(tmp_path):
    pid_file = tmp_path / "child.pid"
    with pytest.raises(subprocess.TimeoutExpired):
        run_job([sys.executable, "-c", PARENT, str(pid_file), "wait"], timeout=5)
    child = int(pid_file.read_text())
    assert os.getsid(os.getpid()) != child  # it was a session of its own, out of killpg's reach
    assert not alive(child), f"pid {child} outlived the job"


def test_a_finished_job_leaves_no_orphan(tmp_path):
    pid_file = tmp_path / "child.pid"
    proc = run_job([sys.executable, "-c", PARENT, str(pid_file), "exit"], timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert not alive(int(pid_file.read_text()))


# a rank writes its pid (whole: written aside, then renamed) and sleeps past any timeout
RANK = """
import os, sys, time
path = os.path.join(sys.argv[1], "rank" + os.environ["RANK"])
open(path + ".tmp", "w").write(str(os.getpid()))
os.replace(path + ".tmp", path)
time.sleep(600)
"""


@pytest.mark.slow
def test_a_timed_out_torchrun_ends_with_its_ranks(tmp_path):
    """The real case: torchrun and two ranks, cut off by the timeout while they sleep.

    The check needs the timeout to fall after both ranks started, an order no fixed wait
    guarantees on a loaded machine: each rank writes its pid before it sleeps, and a try in
    which the timeout came first (fewer than two pids) is checked all the same (what did
    start has ended) and repeated with twice the time. 12 s is several times what torchrun
    takes to start both ranks here (about 3 s at load 4)."""
    script = tmp_path / "rank.py"
    script.write_text(RANK)
    timeout = 12.0
    for attempt in range(4):  # 12, 24, 48, 96 s
        pids_dir = tmp_path / f"try-{attempt}"
        pids_dir.mkdir()
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(script),
            str(pids_dir),
        ]
        started = time.monotonic()
        with pytest.raises(subprocess.TimeoutExpired):
            run_job(cmd, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert time.monotonic() - started < timeout + 60  # the timeout, the grace period and the kill
        ranks = [int(path.read_text()) for path in sorted(pids_dir.glob("rank[01]"))]
        assert not [pid for pid in ranks if alive(pid)]
        if len(ranks) == 2:
            break
        timeout *= 2
    else:
        pytest.fail("torchrun's two ranks never both started before the timeout (4 tries, up to 96 s)")


def test_a_root_only_test_fails_in_ci_and_skips_elsewhere(monkeypatch):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true and this test cannot run: needs root"):
        skip_or_fail_in_ci("needs root")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="needs root"):
        skip_or_fail_in_ci("needs root")


# The two tests below run in this order (pytest keeps file order): the first changes the
# environment and a registry without cleaning up, the second checks that nothing arrived.
LEAK = "MOREC_TEST_LEAK_CHECK"


def test_leak_1_a_test_that_leaves_a_variable_and_a_registration_behind():
    os.environ[LEAK] = "leaked"
    LOSSES.register("leak_check_loss", lambda *a: None)
    assert "leak_check_loss" in LOSSES.names()


def test_leak_2_the_next_test_sees_neither():
    """Only registries that existed before the test are restored (the restore cannot tell
    a module's own parts from a test's in a registry created during the test): LOSSES was
    imported with this file."""
    assert LEAK not in os.environ
    assert "leak_check_loss" not in LOSSES.names()


def test_leak_3_a_plugin_registers_again_in_a_later_test(tmp_path, monkeypatch):
    """Restoring a registry without forgetting the plugin module would leave the module
    imported and its parts unregistered: the next import would be a no-op."""
    (tmp_path / "leak_plugin.py").write_text(
        "from morec_dist.model.loss import LOSSES\nLOSSES.register('leak_plugin_loss', lambda *a: None)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.import_module("leak_plugin")

    assert "leak_plugin_loss" in LOSSES.names()


def test_leak_4_the_plugin_module_was_forgotten_with_its_registration():
    assert "leak_plugin" not in sys.modules and "leak_plugin_loss" not in LOSSES.names()


def test_the_registry_modules_list_names_every_module_holding_a_registry():
    """A registry missing from conftest.REGISTRY_MODULES would be created inside the first
    test that imports it, with that test's registrations counted as its own parts."""
    holders = set()
    for path in (REPO / "morec_dist").rglob("*.py"):
        if re.search(r"^[A-Z_]+: Registry\[", path.read_text(), re.MULTILINE):
            module = path.relative_to(REPO).with_suffix("").parts
            holders.add(".".join(module[:-1] if module[-1] == "__init__" else module))
    assert holders == set(REGISTRY_MODULES)


def test_the_movielens_cache_is_keyed_by_the_preparation_code(tmp_path, monkeypatch):
    """A change to the preparation code changes the fixture's directory, so a dataset made
    by older code is never reused."""
    import tests.conftest as conftest

    fake = tmp_path / "repo"
    (fake / "morec_dist" / "data" / "prepare").mkdir(parents=True)
    (fake / "morec_dist" / "data" / "schema.py").write_text("SCHEMA = 1\n")
    (fake / "morec_dist" / "data" / "prepare" / "movielens.py").write_text("PRICE = 1\n")
    monkeypatch.setattr(conftest, "REPO", fake)
    before = conftest.preparation_fingerprint()
    (fake / "morec_dist" / "data" / "prepare" / "movielens.py").write_text("PRICE = 2\n")
    assert conftest.preparation_fingerprint() != before
    (fake / "morec_dist" / "data" / "prepare" / "movielens.py").write_text("PRICE = 1\n")
    assert conftest.preparation_fingerprint() == before
    (fake / "morec_dist" / "data" / "schema.py").write_text("SCHEMA = 2\n")
    assert conftest.preparation_fingerprint() != before
