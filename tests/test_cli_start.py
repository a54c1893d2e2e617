"""The CLI's process start and end (morec_dist/lazy.py, morec_dist/fast_exit.py).

- Building the parser and importing what the launcher needs to start torchrun (the
  coordinator's service module, the method table, the packages' re-exports) loads neither
  torch nor TorchRec: the ranks import them, the launcher must not pay for them twice.
- ``exit_without_final_gc`` exits with the given code and still runs atexit handlers and
  flushes what was written (it only skips the collection of cyclic garbage).
"""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO

HEAVY = ("torch", "torchrec", "fbgemm_gpu", "numba")


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)


def test_the_launchers_imports_load_no_training_stack():
    proc = run_python(
        "import sys\n"
        "from morec_dist.cli import build_parser\n"
        "build_parser().parse_args(['train', '--config', 'x.toml'])\n"
        "import morec_dist.coordinator, morec_dist.eval, morec_dist.model\n"
        "from morec_dist.coordinator.service import start_local_ray\n"
        "from morec_dist.train.launch import relaunch\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "[]", proc.stdout


def test_the_packages_re_exports_still_resolve():
    proc = run_python(
        "import morec_dist.coordinator as c, morec_dist.eval as e, morec_dist.model as m\n"
        "for pkg in (c, e, m):\n"
        "    for name in pkg.__all__:\n"
        "        getattr(pkg, name)\n"
        "try:\n"
        "    c.no_such_name\n"
        "except AttributeError as exc:\n"
        "    print(exc)\n"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "module 'morec_dist.coordinator' has no attribute 'no_such_name'" in proc.stdout


def test_fast_exit_keeps_the_code_atexit_and_buffered_output(tmp_path):
    marker = tmp_path / "atexit-ran"
    proc = run_python(
        "import atexit, sys, torch\n"
        f"atexit.register(lambda: open({str(marker)!r}, 'w').write('yes'))\n"
        "sys.stdout.write('buffered, no newline')\n"
        "from morec_dist.fast_exit import exit_without_final_gc\n"
        "exit_without_final_gc(3)\n"
    )
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert proc.stdout == "buffered, no newline"
    assert marker.read_text() == "yes"
